"""Switch a built model's attention variant and RoPE scaling in place (`--attention`, `--rope-scaling`, ...).

Weights are untouched; the config, each layer's window / variant and the rotary tables change. Used by
`longseq eval`, the trainer and export (a checkpoint records the overrides it was trained with).
"""

from __future__ import annotations

import copy
from dataclasses import replace

from longseq.config import AttentionConfig, ModelConfig, ModelOverrides, RopeConfig
from longseq.config.model import UNBOUNDED_VARIANTS
from longseq.errors import LongseqError
from longseq.models.llama import CausalLM
from longseq.models.rope import RotaryEmbedding


def apply_overrides(model: CausalLM, ov: ModelOverrides) -> CausalLM:
    """Apply the set fields of `ov` to `model` (returned for chaining)."""
    cfg = model.config
    if ov.rope_scaling is not None or ov.rope_factor is not None:
        _set_rope(model, ov)
    if ov.max_seq_len is not None:
        cfg.max_seq_len = ov.max_seq_len
    attn = cfg.attention
    names = ("sink_tokens", "block_size", "local_blocks", "global_blocks", "retrieved_blocks", "memory_placement")
    updates = {name: getattr(ov, name) for name in names if getattr(ov, name) is not None}
    if ov.segment_lengths:
        updates["segment_lengths"] = ov.segment_lengths
        if not ov.dilation_rates:
            updates["dilation_rates"] = (1,) * len(ov.segment_lengths)
    if ov.dilation_rates:
        updates["dilation_rates"] = ov.dilation_rates
    if ov.alibi:
        updates["alibi"] = True
    if ov.attention_chunk is not None:
        updates["chunk_size"] = ov.attention_chunk
    if ov.attention_kernel is not None:
        updates["kernel"] = ov.attention_kernel
    window = cfg.sliding_window
    if ov.attention is not None:
        updates["variant"] = "causal" if ov.attention == "sliding" else ov.attention
        # causal means full attention: an explicit request drops a model's own window
        window = ov.window if ov.attention in ("sliding", "streaming") else None
    elif ov.window is not None:
        window = ov.window
    if updates.get("variant", attn.variant) == "memory":  # --window is the memory's local window, not a layer's
        if ov.window is not None:
            updates["local_window"] = ov.window
        window = None
    attn = replace(attn, **updates)  # __post_init__ validates the combination
    set_attention(model, attn, window)
    return model


def set_attention(model: CausalLM, attention: AttentionConfig, sliding_window: int | None) -> None:
    """Give every layer the variant and window (layers marked full in `sliding_layers` keep full attention)."""
    cfg = model.config
    if attention.variant == "streaming" and sliding_window is None:
        raise LongseqError("streaming attention needs a window (--window N)")
    attention.check_context(cfg.max_seq_len)
    cfg.attention, cfg.sliding_window = attention, sliding_window
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.variant = attention
        layer.self_attn.window = cfg.layer_window(i)


def overridden_context(cfg: ModelConfig, *overrides: ModelOverrides) -> int | None:
    """The context (max_seq_len) of a model of `cfg` after apply_overrides with each of `overrides` in turn, worked
    out without a model, for checks made before one loads; None where attention streams or uses a memory (no
    limit)."""
    cfg = copy.copy(cfg)  # only rope and max_seq_len are reassigned
    variant = cfg.attention.variant
    for ov in overrides:
        if ov.rope_scaling is not None or ov.rope_factor is not None:
            cfg.rope, cfg.max_seq_len = _scaled_rope(cfg, ov)
        if ov.max_seq_len is not None:
            cfg.max_seq_len = ov.max_seq_len
        if ov.attention is not None:
            variant = "causal" if ov.attention == "sliding" else ov.attention
    return None if variant in UNBOUNDED_VARIANTS else cfg.max_seq_len


def _scaled_rope(cfg: ModelConfig, ov: ModelOverrides) -> tuple[RopeConfig, int]:
    """The RoPE config and context that `ov`'s RoPE scaling gives a model of `cfg`."""
    old = cfg.rope
    scaling = ov.rope_scaling if ov.rope_scaling is not None else old.type
    rope_type = {"none": "default", "ntk": "dynamic"}.get(scaling, scaling)
    factor = 1.0 if rope_type == "default" else (ov.rope_factor or old.factor)
    if rope_type not in ("default", "linear", "dynamic", "yarn"):
        raise LongseqError(f"rope scaling {scaling!r} cannot be set from flags; use none, linear, dynamic or yarn")
    native = old.original_max_position_embeddings or cfg.max_seq_len
    if rope_type != "default" and factor <= 1:
        raise LongseqError(f"--rope-scaling {scaling} needs --rope-factor > 1")
    # Keep theta and the native context; the new type derives its frequencies from them.
    rope = RopeConfig(theta=old.theta, type=rope_type, factor=factor, original_max_position_embeddings=native)
    return rope, int(native * factor)


def _set_rope(model: CausalLM, ov: ModelOverrides) -> None:
    cfg = model.config
    cfg.rope, cfg.max_seq_len = _scaled_rope(cfg, ov)
    device = model.lm_head.weight.device
    rotary = RotaryEmbedding(cfg.rope, cfg.head_dim)
    rotary.freq_factors = None  # llama.cpp's Llama 3.1 divisors belong to the llama3 scaling being replaced
    rotary.reset(device)
    model.rotary = rotary
