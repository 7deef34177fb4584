"""The GPU memory of multi-LoRA serving's adapter pool (engine/lora/pool.py): `max_loras` slots, each holding one
adapter's factors for every dense linear layer, padded to `max_lora_rank`.

Per layer and rank, a slot holds lora_A (rank x in) and lora_B (out x rank) of q, k, v, o, gate, up and down: one
rank costs (in + out) values of each, `rank_elements_per_layer`. For a Llama-3-8B shape that is 81,920 values per
layer and rank: rank 16 over 32 layers in bf16 is 84 MB a slot. Layers whose MLP is a mixture of experts take
adapters on attention only.
"""

from __future__ import annotations

from longseq.plan.models import ModelSpec


def rank_elements_per_layer(spec: ModelSpec, layer: int) -> int:
    """Values of one rank of one layer's factors: (in + out) of each adapted linear layer."""
    cfg = spec.config
    d, q, kv = cfg.hidden_size, spec.q_dim, spec.kv_dim
    attention = (d + q) + 2 * (d + kv) + (q + d)  # q, k, v: d -> q / kv; o: q -> d
    if spec.is_moe or cfg.layer_sparse(layer):
        return attention
    inter = cfg.intermediate_size
    return attention + 2 * (d + inter) + (inter + d)  # gate, up: d -> I; down: I -> d


def lora_pool_bytes(spec: ModelSpec, max_loras: int, max_rank: int, dtype_bytes: float = 2) -> float:
    """The pool's bytes: max_loras slots x max_rank x every layer's factors, in the serving dtype."""
    per_rank = sum(rank_elements_per_layer(spec, i) for i in range(spec.config.num_layers))
    return float(max_loras * max_rank * per_rank * dtype_bytes)
