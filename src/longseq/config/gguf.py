"""GGUF metadata -> ModelConfig; keys follow llama.cpp's `{arch}.*` naming. llama.cpp stores Mixtral as a "llama"
with `llama.expert_count` experts (its convert_hf_to_gguf.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from longseq.config.hf import as_ids
from longseq.config.model import ModelConfig, RopeConfig
from longseq.errors import LongseqError


def from_gguf(meta: dict[str, Any], vocab_size: int | None = None) -> ModelConfig:
    """From GGUF metadata (key -> value)."""
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        raise LongseqError(
            f"unsupported GGUF architecture {arch!r}; supported: llama (incl. Mistral and Mixtral), qwen2, qwen3"
        )

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    try:
        num_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        rope = RopeConfig(theta=float(get("rope.freq_base", 10000.0)))
        scaling = get("rope.scaling.type")
        if scaling in ("linear", "yarn"):
            rope = RopeConfig(
                theta=rope.theta,
                type=scaling,
                factor=float(get("rope.scaling.factor", 1.0)),
                original_max_position_embeddings=get("rope.scaling.original_context_length"),
            )
        cfg = ModelConfig(
            arch=arch,
            vocab_size=int(get("vocab_size") or vocab_size),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(get("attention.head_count_kv", num_heads)),
            head_dim=int(get("attention.key_length", 0)),
            max_seq_len=int(get("context_length", 2048)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope=rope,
            qkv_bias=arch == "qwen2",
            qk_norm=arch == "qwen3",
            sliding_window=get("attention.sliding_window"),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=as_ids(
                [meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")]
            ),
        )
        experts = int(get("expert_count") or 0)
        if experts and arch != "llama":
            raise LongseqError(f"unsupported GGUF mixture of experts in a {arch!r} file; supported: Mixtral (llama)")
        if experts:  # llama.cpp's Llama graph routes as Mixtral does: softmax, top k, renormalised
            cfg = replace(cfg, arch="mixtral", num_experts=experts, experts_per_token=int(get("expert_used_count")),
                          moe_intermediate_size=cfg.intermediate_size, norm_topk_prob=True)
    except (TypeError, ValueError) as e:
        raise LongseqError(f"GGUF metadata is incomplete or malformed: {e}") from None
    return cfg
