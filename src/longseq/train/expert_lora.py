"""LoRA and QLoRA on a mixture of experts' stacked expert weights: one adapter per expert, batched.

Each adapted projection W (E, out, in) (gate_up_proj (E, 2I, d) and down_proj (E, d, I), as models/sparse_moe.py
stacks them) gets A (E, in, r) and B (E, r, out): expert e computes x W_eᵀ + (alpha / r) · x A_e B_e. The adapters
run inside the expert compute (models/moe.py), for the rows routed to each expert: on the sorted path as two more
grouped GEMMs per projection, on the reference loop expert by expert. Gate and up are one stacked projection, as
transformers (>= 5) and PEFT's `target_parameters` hold them: targeting gate_proj or up_proj adapts gate_up_proj.
The router stays frozen (lora_train_extra `router` trains it whole). QLoRA stores the frozen stacks in NF4 with
train/nf4.py's quantizer, over the (E·out, in) matrix (torchao's NF4 tensors are 2-D).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from longseq.models import moe
from longseq.models.sparse_moe import Experts
from longseq.train.nf4 import is_nf4, to_nf4_weight

STACKED = ("gate_up_proj", "down_proj")
# LoRA target names (config.policy.LORA_TARGETS_ALL) -> the stacked projection they adapt in an expert layer
TARGETS = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


def expert_targets(lora_targets: tuple[str, ...]) -> tuple[str, ...]:
    """The stacked projections that lora_targets adapt, in STACKED order."""
    return tuple(name for name in STACKED if name in {TARGETS.get(t) for t in lora_targets})


def new_expert_adapter(shape: tuple[int, int, int], rank: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors A (E, in, r) and B (E, r, out) of a stacked weight of `shape` (E, out, in), in float32 (the master
    copy). PEFT's init per expert: A ~ kaiming_uniform(a=√5) of an (r, in) matrix, i.e. U(±1/√in); B = 0, so
    training starts from W."""
    E, out, inp = shape
    bound = 1 / math.sqrt(inp)
    return (torch.empty(E, inp, rank, device=device).uniform_(-bound, bound),
            torch.zeros(E, rank, out, device=device))


class LoRAExperts(nn.Module):
    """Experts with frozen stacked weights (NF4 under QLoRA) and per-expert adapters on `targets` (STACKED names).
    Parameters: gate_up_proj, down_proj (frozen) and lora_A.<name> (E, in, r), lora_B.<name> (E, r, out)."""

    def __init__(self, base: Experts, rank: int, alpha: float, dropout: float = 0.0,
                 targets: tuple[str, ...] = STACKED, quantize: bool = False):
        super().__init__()
        self.shapes: dict[str, tuple[int, int, int]] = {}
        for name in STACKED:
            weight = getattr(base, name).detach()  # (E, out, in)
            self.shapes[name] = tuple(weight.shape)
            stored = to_nf4_weight(weight.reshape(-1, weight.shape[-1])) if quantize else weight
            setattr(self, name, nn.Parameter(stored, requires_grad=False))
        self.rank, self.scaling = rank, (alpha / rank if rank else 0.0)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name in targets if rank else ():
            A, B = new_expert_adapter(self.shapes[name], rank, self.gate_up_proj.device)
            self.lora_A[name], self.lora_B[name] = nn.Parameter(A), nn.Parameter(B)

    def stacked(self, name: str) -> torch.Tensor | moe.PackedExperts:
        """The frozen weight (E, out, in) as models/moe.py takes it."""
        weight = getattr(self, name)
        return moe.PackedExperts(weight, self.shapes[name]) if is_nf4(weight) else weight

    def adapter(self, name: str) -> moe.ExpertAdapter | None:
        if name not in self.lora_A:
            return None
        return moe.ExpertAdapter(self.lora_A[name], self.lora_B[name], self.scaling, self.dropout)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, mode: str | None = None):
        """Experts.forward: tokens x (T, d), top-k ids and weights (T, k) -> (T, d)."""
        return moe.experts(x, ids, weights, self.stacked("gate_up_proj"), self.stacked("down_proj"), mode,
                           adapters=(self.adapter("gate_up_proj"), self.adapter("down_proj")))

    def merged_weight(self, name: str) -> torch.Tensor:
        """W + (alpha / r) (A_e B_e)ᵀ per expert, (E, out, in) in float32 (NF4 dequantized): a merged export's."""
        weight = getattr(self, name)
        w = (weight.get_original_weight() if is_nf4(weight) else weight).float().view(self.shapes[name])
        if name in self.lora_A:
            w = w + self.scaling * (self.lora_A[name].float() @ self.lora_B[name].float()).transpose(-2, -1)
        return w


def expert_layers(model: nn.Module) -> dict[str, LoRAExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAExperts)}


def peft_tensors(module_name: str, layer: LoRAExperts) -> dict[str, torch.Tensor]:
    """The layer's adapters under PEFT's `target_parameters` names and layouts (peft 0.17+ ParamWrapper, as
    transformers >= 5 stacks experts): lora_A.weight (E·r, in), expert-major rows; lora_B.weight (out, r·E),
    rank-major columns (its get_delta_weight reshapes them (E, r, in) and (out, r, E)). PEFT nests one wrapper per
    targeted parameter, the first in target_parameters innermost: its keys carry one `base_layer.` per wrapper
    outside it."""
    names = [name for name in STACKED if name in layer.lora_A]
    out = {}
    for i, name in enumerate(names):
        prefix = f"{module_name}.{'base_layer.' * (len(names) - 1 - i)}"
        A, B = layer.lora_A[name].detach().float(), layer.lora_B[name].detach().float()  # (E, in, r), (E, r, out)
        E, inp, r = A.shape
        out[prefix + "lora_A.weight"] = A.transpose(1, 2).reshape(E * r, inp).contiguous()
        out[prefix + "lora_B.weight"] = B.permute(2, 1, 0).reshape(B.shape[-1], r * E).contiguous()
    return out


def peft_target_parameters(model: nn.Module) -> list[str]:
    """PEFT's target_parameters for the adapted expert stacks, in the order peft_tensors nests them."""
    adapted = {name for layer in expert_layers(model).values() for name in layer.lora_A}
    return [f"mlp.experts.{name}" for name in STACKED if name in adapted]
