"""Parameter counts of a model shape: total, per part, in matmuls (the N of 6N), LoRA adapters."""

from __future__ import annotations

from dataclasses import dataclass

from longseq.plan.models import ModelSpec

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Linear:
    in_features: int
    out_features: int
    copies: int = 1  # MoE: one per expert

    @property
    def params(self) -> int:
        return self.in_features * self.out_features * self.copies


@dataclass(frozen=True)
class ParamCounts:
    embedding: int
    lm_head: int  # 0 when tied to the embedding
    attention: int  # all layers: q, k, v, o, their biases, Qwen3's q/k norms
    mlp: int  # all layers, every expert, the MoE router
    norms: int  # the RMSNorm weights around each block and the final one
    extra: int  # outside the Llama layout (learned positions)
    matmul: int  # weights a token multiplies through: linears (top-k experts) + LM head, tied or not (6N's N)
    linear: int  # decoder linear weights, every layer and expert: what QLoRA stores in NF4

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.attention + self.mlp + self.norms + self.extra

    @property
    def not_linear(self) -> int:
        """What QLoRA keeps in bf16: embedding, LM head, norms, biases, router."""
        return self.total - self.linear


def layer_linears(spec: ModelSpec) -> dict[str, Linear]:
    """The linear layers of one decoder layer, under longseq/HF names (GELU MLPs: up and down only)."""
    d, inter, e = spec.config.hidden_size, spec.config.intermediate_size, spec.num_experts
    linears = {
        "q_proj": Linear(d, spec.q_dim), "k_proj": Linear(d, spec.kv_dim), "v_proj": Linear(d, spec.kv_dim),
        "o_proj": Linear(spec.q_dim, d),
    }
    if spec.mlp == "swiglu":
        linears["gate_proj"] = Linear(d, inter, e)
    linears["up_proj"] = Linear(d, inter, e)
    linears["down_proj"] = Linear(inter, d, e)
    return linears


def count_params(spec: ModelSpec) -> ParamCounts:
    cfg = spec.config
    d, layers = cfg.hidden_size, cfg.num_layers
    lin = layer_linears(spec)
    attn = sum(lin[n].params for n in ATTENTION_LINEARS)
    attn += (spec.q_dim + 2 * spec.kv_dim) * cfg.qkv_bias + d * cfg.o_bias + 2 * cfg.head_dim * cfg.qk_norm
    mlp_names = [n for n in lin if n not in ATTENTION_LINEARS]
    mlp = sum(lin[n].params for n in mlp_names)
    mlp += spec.num_experts * (cfg.intermediate_size * (len(mlp_names) - 1) + d) * cfg.mlp_bias
    mlp += d * spec.num_experts * spec.is_moe  # router
    active_mlp = sum(lin[n].in_features * lin[n].out_features for n in mlp_names) * spec.experts_per_token
    embedding = cfg.vocab_size * d
    matmul = layers * (sum(lin[n].params for n in ATTENTION_LINEARS) + active_mlp) + embedding
    return ParamCounts(
        embedding=embedding,
        lm_head=0 if cfg.tie_word_embeddings else embedding,
        attention=layers * attn,
        mlp=layers * mlp,
        norms=(2 * layers + 1) * d,
        extra=spec.extra_params,
        matmul=matmul,
        linear=layers * sum(x.params for x in lin.values()),
    )


def lora_params(spec: ModelSpec, rank: int, targets: tuple[str, ...]) -> int:
    """Trainable adapter parameters as longseq's apply_lora makes them: A (r, in) and B (out, r) per target linear,
    every layer (Hu et al. 2021, arXiv 2106.09685)."""
    lin = layer_linears(spec)
    if spec.is_moe and {"gate_proj", "up_proj"} & set(targets):
        # Stacked experts: one adapter per expert on gate and up together (train/expert_lora.py), A (d, r) and
        # B (r, 2I), where separate linears would have two.
        gate = lin["gate_proj"]
        lin["gate_proj"] = Linear(gate.in_features, 2 * gate.out_features, gate.copies)
        targets = tuple(t for t in targets if t != "up_proj") + ("gate_proj",)
    per_layer = sum(rank * (lin[t].in_features + lin[t].out_features) * lin[t].copies for t in set(targets)
                    if t in lin)
    return spec.config.num_layers * per_layer


def lora_weight_elements(spec: ModelSpec, rank: int, targets: tuple[str, ...]) -> int:
    """Adapter elements of one layer (what autocast casts to bf16 per layer in forward)."""
    return lora_params(spec, rank, targets) // spec.config.num_layers


def routed_expert_params(spec: ModelSpec, biases: bool = True) -> int:
    """Weights (and biases) of the routed experts, every layer: what `longseq train --ep` splits over its ranks (the
    router and Qwen2-MoE's shared expert stay whole on each); 0 for a dense model."""
    if not spec.is_moe:
        return 0
    cfg, lin = spec.config, layer_linears(spec)
    mlp_names = [n for n in lin if n in MLP_LINEARS]
    per_expert = sum(lin[n].in_features * lin[n].out_features for n in mlp_names)
    per_expert += (cfg.intermediate_size * (len(mlp_names) - 1) + cfg.hidden_size) * cfg.mlp_bias * biases
    return cfg.num_layers * spec.routed_experts * per_expert


def lora_expert_params(spec: ModelSpec, rank: int, targets: tuple[str, ...]) -> int:
    """Of `lora_params`, the routed experts' adapters (split with their experts by --ep); 0 for a dense model."""
    if not spec.is_moe:
        return 0
    mlp_targets = tuple(t for t in targets if t in MLP_LINEARS)
    return lora_params(spec, rank, mlp_targets) // spec.num_experts * spec.routed_experts
