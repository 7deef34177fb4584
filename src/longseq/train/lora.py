"""LoRA and QLoRA as layer swaps on the shared model (Hu et al. 2021, arXiv 2106.09685; Dettmers et al. 2023,
arXiv 2305.14314). Parameter names match PEFT's (`q_proj.lora_A.weight`), so adapters export one to one."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from longseq.config import TrainConfig
from longseq.models import recompute
from longseq.models.sparse_moe import SparseMoeBlock
from longseq.train.expert_lora import STACKED, LoRAExperts, expert_layers, expert_targets
from longseq.train.nf4 import NF4_BLOCK, is_nf4, quiet_torchao, to_nf4_weight  # noqa: F401 (imported from here)


def new_adapter(in_features: int, out_features: int, rank: int, device) -> tuple[nn.Linear, nn.Linear]:
    """The factors A (r, in) and B (out, r) in float32 (the master copy, whatever the frozen weight's dtype),
    initialised as PEFT does: B = 0 so that W starts at W0."""
    kw = dict(device=device, dtype=torch.float32)
    lora_a = nn.Linear(in_features, rank, bias=False, **kw)
    lora_b = nn.Linear(rank, out_features, bias=False, **kw)
    nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
    nn.init.zeros_(lora_b.weight)
    return lora_a, lora_b


class LoRALinear(nn.Module):
    """y = x W0^T + b + (alpha / r) * B A dropout(x), with W0 (and b) frozen; W0 optionally NF4 (QLoRA).

    rank 0 means no adapter: a frozen (possibly quantized) linear layer.
    """

    frozen_base = True  # backward needs no input for the base matmul, and a recompute may skip it (models/recompute.py)

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, quantize: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        weight = base.weight.detach()
        self.weight = nn.Parameter(to_nf4_weight(weight) if quantize else weight, requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        self.rank, self.scaling = rank, (alpha / rank if rank else 0.0)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if rank:
            self.lora_A, self.lora_B = new_adapter(self.in_features, self.out_features, rank, weight.device)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # no activation saved; skipped where a recompute never reads the output
            return recompute.frozen_linear(x, self.weight, self.bias, is_nf4(self.weight))
        return recompute.frozen_matmul(x, self.weight, self.bias, is_nf4(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(0, -2)  # (N, in): 2-D, so that y is a fresh tensor (not a view) and may take addmm_
        y = self.base_forward(rows)  # (N, out)
        if self.rank:
            a = self.lora_A.weight.to(x.dtype) if not torch.is_autocast_enabled() else self.lora_A.weight
            # The scale goes on the rank-r product and the add into the second matmul, in place on the base output
            # (addmm_; out-of-place addmm would first copy y): PEFT's `y + B(A(x)) * s` makes three more passes
            # over the (tokens, out) output. Nothing reads y in backward, so it may be overwritten.
            xa = F.linear(self.dropout(rows), a) * self.scaling  # (N, r)
            y.addmm_(xa, self.lora_B.weight.to(y.dtype).t())
        return y.view(*x.shape[:-1], self.out_features)

    def merged_weight(self) -> torch.Tensor:
        """W0 + (alpha / r) B A in float32 (what a merged export writes)."""
        w = self.weight.get_original_weight() if is_nf4(self.weight) else self.weight
        w = w.float()
        if self.rank:
            w = w + self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        return w


def apply_lora(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """Swap target linear layers for LoRALinear (QLoRA: every decoder linear layer becomes NF4), and a mixture of
    experts' stacked experts for LoRAExperts (train/expert_lora.py); freeze the rest. The router (and Qwen2-MoE's
    shared-expert gate) stay frozen in full precision.

    Returns the names of the trainable parameters.
    """
    quantize = cfg.method == "qlora"
    for p in model.parameters():
        p.requires_grad_(False)
    experts = expert_targets(cfg.lora_targets)
    for layer in model.model.layers:
        mlp = layer.mlp
        sparse = isinstance(mlp, SparseMoeBlock)
        for parent in (layer.self_attn, mlp.shared_expert if sparse else mlp):
            for name, child in list(parent.named_children()) if parent is not None else ():
                if not isinstance(child, nn.Linear):
                    continue
                target = name in cfg.lora_targets
                if target or quantize:
                    rank = cfg.lora_rank if target else 0
                    setattr(parent, name, LoRALinear(child, rank, cfg.lora_alpha, cfg.lora_dropout, quantize))
        if sparse and (experts or quantize):
            mlp.experts = LoRAExperts(mlp.experts, cfg.lora_rank if experts else 0, cfg.lora_alpha, cfg.lora_dropout,
                                      experts, quantize)
        if sparse and "router" in cfg.lora_train_extra:
            mlp.gate.weight.requires_grad_(True)
    if "embed" in cfg.lora_train_extra:  # LongLoRA: embeddings and norms matter for extending context
        model.model.embed_tokens.weight.requires_grad_(True)
    if "norm" in cfg.lora_train_extra:
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def adapted_layers(layer: nn.Module) -> list[nn.Module]:
    """A decoder layer's LoRALinear and LoRAExperts modules in the order apply_lora swaps them in (and draws their
    adapters from the random stream): attention, the MLP (a sparse block's shared expert), then the experts."""
    mlp = layer.mlp
    sparse = isinstance(mlp, SparseMoeBlock)
    parents = [p for p in (layer.self_attn, mlp.shared_expert if sparse else mlp) if p is not None]
    out = [child for parent in parents for child in parent.children() if isinstance(child, LoRALinear)]
    return out + [mlp.experts] if sparse and isinstance(mlp.experts, LoRAExperts) else out


def make_trainable(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """Full fine-tuning: every weight trains; LoRA / QLoRA: adapters are swapped in. Returns the trainable names."""
    if cfg.method != "full":
        return apply_lora(model, cfg)
    for p in model.parameters():
        p.requires_grad_(True)
    return [n for n, _ in model.named_parameters()]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merged_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's weights with every adapter merged in, under HF names, in `dtype` (for export)."""
    layers, experts = lora_layers(model), expert_layers(model)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        if ".lora_" in name:
            continue
        if module_name in layers and leaf == "weight":
            tensor = layers[module_name].merged_weight()
        elif module_name in experts and leaf in STACKED:
            tensor = experts[module_name].merged_weight(leaf)
        out[name] = tensor.detach().to(dtype).contiguous()
    return out
