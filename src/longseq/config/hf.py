"""HF `config.json` <-> ModelConfig: what transformers writes for Llama, Mistral, Qwen2 and Qwen3 models, and for
their mixture-of-experts relatives Mixtral, Qwen2-MoE and Qwen3-MoE."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from longseq.config.model import MOE_ARCHITECTURES, SUPPORTED_ARCHITECTURES, ModelConfig, RopeConfig
from longseq.errors import LongseqError

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                    "qwen3_moe": "Qwen3MoeForCausalLM"}
# config.json keys that only mixture-of-experts families have (DeepSeek's n_routed_experts among them).
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")
_QWEN = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")


def rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older configs `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    omp = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    kw: dict[str, Any] = dict(theta=float(theta), type=rope_type)
    for name in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
        if params.get(name) is not None:
            kw[name] = float(params[name])
    for name in ("attention_factor", "mscale", "mscale_all_dim"):
        if params.get(name) is not None:
            kw[name] = float(params[name])
    if "truncate" in params:
        kw["truncate"] = bool(params["truncate"])
    if omp is not None:
        kw["original_max_position_embeddings"] = int(omp)
    return RopeConfig(**kw)


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    """From the dict of an HF `config.json`."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        arch = model_type or (hf.get("architectures") or ["<none>"])[0]
        if any(hf.get(key) for key in _EXPERT_KEYS):
            raise LongseqError(f"unsupported mixture-of-experts architecture {arch!r}; supported MoE: "
                               f"{', '.join(MOE_ARCHITECTURES)}")
        raise LongseqError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(and models on the Llama architecture)"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise LongseqError(f"unsupported hidden_act {hf['hidden_act']!r}; only silu (SwiGLU) is supported")
    try:
        num_layers = int(hf["num_hidden_layers"])
        num_heads = int(hf["num_attention_heads"])
        cfg = dict(
            arch=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or 0),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=rope_from_hf(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=as_ids(hf.get("eos_token_id")),
        )
    except KeyError as e:
        raise LongseqError(f"config.json is missing the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise LongseqError(f"config.json has a field of the wrong type: {e}") from None

    attention_bias = bool(hf.get("attention_bias", False))
    if model_type == "qwen2":
        cfg.update(qkv_bias=True)
    elif model_type == "qwen2_moe":
        cfg.update(qkv_bias=bool(hf.get("qkv_bias", True)))
    else:
        cfg.update(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    if model_type in ("qwen3", "qwen3_moe"):
        cfg.update(qk_norm=True)
    if model_type in MOE_ARCHITECTURES:
        cfg.update(experts_from_hf(hf, model_type, num_layers))

    window = hf.get("sliding_window")
    if model_type in _QWEN and not hf.get("use_sliding_window", False):
        window = None
    if window is not None:
        cfg["sliding_window"] = int(window)
        layer_types = hf.get("layer_types")
        if layer_types:
            cfg["sliding_layers"] = tuple(t == "sliding_attention" for t in layer_types)
        elif model_type in ("qwen2", "qwen3"):
            first = int(hf.get("max_window_layers", num_layers))
            cfg["sliding_layers"] = tuple(i >= first for i in range(num_layers))
        elif model_type == "qwen2_moe":  # transformers' Qwen2MoeConfig default: even layers below max_window_layers
            last = int(hf.get("max_window_layers", num_layers))
            cfg["sliding_layers"] = tuple(i % 2 == 0 and i < last for i in range(num_layers))
        # Mixtral and Qwen3-MoE window every layer
    return ModelConfig(**cfg)


def experts_from_hf(hf: dict[str, Any], model_type: str, num_layers: int) -> dict[str, Any]:
    """The ModelConfig fields of a mixture-of-experts config.json (transformers' Mixtral, Qwen2-MoE, Qwen3-MoE)."""
    try:
        if model_type == "mixtral":
            if float(hf.get("router_jitter_noise") or 0.0):  # training-time noise on the router input
                raise LongseqError("mixtral router_jitter_noise is not supported; set it to 0")
            return dict(num_experts=int(hf.get("num_local_experts", 8)),
                        experts_per_token=int(hf.get("num_experts_per_tok", 2)),
                        moe_intermediate_size=int(hf["intermediate_size"]), norm_topk_prob=True,
                        router_aux_loss_coef=router_aux_loss_coef(hf))
        # Qwen: a layer is sparse unless listed in mlp_only_layers, and only every decoder_sparse_step-th one
        # (transformers' Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer).
        dense = {int(i) for i in hf.get("mlp_only_layers") or ()}
        step = int(hf.get("decoder_sparse_step") or 1)
        sparse = tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
        experts = dict(num_experts=int(hf.get("num_experts", hf.get("num_local_experts", 0))),
                       experts_per_token=int(hf.get("num_experts_per_tok", 0)),
                       moe_intermediate_size=int(hf.get("moe_intermediate_size") or 0),
                       norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                       sparse_layers=() if all(sparse) else sparse)
        if model_type == "qwen2_moe":
            experts["shared_expert_intermediate_size"] = int(hf.get("shared_expert_intermediate_size") or 0)
    except (TypeError, ValueError) as e:
        raise LongseqError(f"config.json has an expert field of the wrong type: {e}") from None
    if not experts["num_experts"]:  # transformers builds every layer dense then
        experts["sparse_layers"] = ()
    experts["router_aux_loss_coef"] = router_aux_loss_coef(hf)
    return experts


def router_aux_loss_coef(hf: dict[str, Any]) -> float:
    """The load-balancing loss weight transformers trains with: router_aux_loss_coef, only where
    output_router_logits is set (its MixtralForCausalLM / Qwen*MoeForCausalLM add no aux loss otherwise)."""
    if not hf.get("output_router_logits"):
        return 0.0
    try:
        return float(hf.get("router_aux_loss_coef", 0.001))  # transformers' default
    except (TypeError, ValueError) as e:
        raise LongseqError(f"config.json has a router_aux_loss_coef of the wrong type: {e}") from None


def read_hf_config(path: str | Path) -> ModelConfig:
    """A model directory's `config.json`."""
    path = Path(path)
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise LongseqError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LongseqError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(hf, dict):
        raise LongseqError(f"{path}: expected a JSON object")
    return from_hf(hf)


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF `config.json` dict of this config (used by export and by parity tests)."""
    rope: dict[str, Any] = {"rope_type": cfg.rope.type, "rope_theta": cfg.rope.theta}
    if cfg.rope.type != "default":
        rope["factor"] = cfg.rope.factor
    if cfg.rope.type in ("yarn", "llama3"):
        rope["original_max_position_embeddings"] = cfg.rope.original_max_position_embeddings
    if cfg.rope.type == "llama3":
        rope.update(low_freq_factor=cfg.rope.low_freq_factor, high_freq_factor=cfg.rope.high_freq_factor)
    if cfg.rope.type == "yarn":
        rope.update(beta_fast=cfg.rope.beta_fast, beta_slow=cfg.rope.beta_slow, truncate=cfg.rope.truncate)
        for name in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(cfg.rope, name) is not None:
                rope[name] = getattr(cfg.rope, name)
    hf: dict[str, Any] = {
        "model_type": cfg.arch,
        "architectures": [HF_ARCHITECTURES[cfg.arch]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": "silu",
        "rope_theta": cfg.rope.theta,
        "rope_scaling": None if cfg.rope.type == "default" else rope,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else
        (cfg.eos_token_ids[0] if cfg.eos_token_ids else None),
    }
    if cfg.arch in ("llama", "mistral", "qwen3", "mixtral", "qwen3_moe"):
        hf["attention_bias"] = cfg.qkv_bias
    if cfg.arch == "qwen2_moe":
        hf["qkv_bias"] = cfg.qkv_bias
    if cfg.arch == "llama":
        hf["mlp_bias"] = cfg.mlp_bias
    if cfg.arch in ("mistral", "mixtral"):
        hf["sliding_window"] = cfg.sliding_window
    if cfg.arch in _QWEN:
        hf["use_sliding_window"] = cfg.sliding_window is not None
        hf["sliding_window"] = cfg.sliding_window
        if cfg.sliding_window is not None and cfg.arch != "qwen3_moe":
            hf["layer_types"] = [
                "sliding_attention" if cfg.layer_window(i) else "full_attention" for i in range(cfg.num_layers)
            ]
    if cfg.arch in MOE_ARCHITECTURES:
        hf.update(experts_to_hf(cfg))
    return hf


def experts_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The expert fields of a mixture-of-experts config.json; a config its family cannot express fails."""
    if cfg.arch == "mixtral":
        if cfg.sparse_layers and not all(cfg.sparse_layers) or cfg.shared_expert_intermediate_size or \
                not cfg.norm_topk_prob or cfg.moe_intermediate_size != cfg.intermediate_size or not cfg.is_moe:
            raise LongseqError("a mixtral config.json cannot express dense layers, a shared expert, unnormalised "
                               "top-k weights or an expert width other than intermediate_size")
        return {"num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.experts_per_token,
                "router_jitter_noise": 0.0, **_router_loss_to_hf(cfg)}
    if cfg.arch == "qwen3_moe" and (cfg.shared_expert_intermediate_size or cfg.sliding_layers):
        raise LongseqError("a qwen3_moe config.json cannot express a shared expert or a window on some layers only")
    hf: dict[str, Any] = {
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.experts_per_token,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "norm_topk_prob": cfg.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(cfg.num_layers) if not cfg.layer_sparse(i)] if cfg.is_moe else [],
    }
    if cfg.arch == "qwen2_moe":
        hf["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
    return {**hf, **_router_loss_to_hf(cfg)}


def _router_loss_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if not cfg.router_aux_loss_coef:
        return {"output_router_logits": False}
    return {"output_router_logits": True, "router_aux_loss_coef": cfg.router_aux_loss_coef}


def as_ids(value: Any) -> tuple[int, ...]:
    """An `eos_token_id` field (one id, a list, or None) as distinct ids in order."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(dict.fromkeys(int(v) for v in value if v is not None))
