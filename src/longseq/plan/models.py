"""Preset shapes of popular open models (a data table), and models from a config.json, a model folder or a GGUF.

Every shape is copied from the model's published `config.json` (vocab_size, hidden_size, intermediate_size,
num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, tie_word_embeddings, context). GPT-3 175B is
from Brown et al. 2020 (arXiv 2005.14165), table 2.1: 96 layers, d 12288, 96 heads of 128, 4d GELU MLP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from longseq.config import ModelConfig, RopeConfig
from longseq.config.gguf import from_gguf
from longseq.config.hf import read_hf_config
from longseq.errors import LongseqError, first_line


@dataclass(frozen=True)
class ModelSpec:
    """A model shape for planning: a longseq ModelConfig plus what the planner needs beyond it."""

    name: str
    config: ModelConfig
    num_experts: int = 1  # MoE: expert MLPs per layer (Mixtral: 8)
    experts_per_token: int = 1  # MoE: top-k routing (Mixtral: 2)
    shared_experts: int = 0  # of num_experts, Qwen2-MoE's always-routed shared expert (not split by --ep)
    mlp: str = "swiglu"  # swiglu (gate, up, down) | gelu (up, down: GPT-2/3)
    extra_params: int = 0  # parameters outside the Llama layout (GPT-3's learned position embeddings)
    source: str = ""

    @property
    def q_dim(self) -> int:
        return self.config.num_heads * self.config.head_dim

    @property
    def kv_dim(self) -> int:
        return self.config.num_kv_heads * self.config.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def routed_experts(self) -> int:
        """Experts a router chooses among: what expert parallelism splits over its ranks."""
        return self.num_experts - self.shared_experts


def _llama(name: str, source: str, vocab: int, d: int, inter: int, layers: int, heads: int, kv: int, *,
           head_dim: int = 0, tie: bool = False, context: int = 2048, theta: float = 10000.0, arch: str = "llama",
           rope: RopeConfig | None = None, window: int | None = None, **spec: Any) -> ModelSpec:
    cfg = ModelConfig(vocab_size=vocab, hidden_size=d, intermediate_size=inter, num_layers=layers, num_heads=heads,
                      num_kv_heads=kv, head_dim=head_dim, max_seq_len=context, tie_word_embeddings=tie, arch=arch,
                      rope=rope or RopeConfig(theta=theta), qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
                      sliding_window=window)
    return ModelSpec(name=name, config=cfg, source=source, **spec)


def _llama31(theta: float = 500000.0) -> RopeConfig:
    # Llama 3.1 config.json: rope_scaling {rope_type: llama3, factor 8, low 1, high 4, original 8192}
    return RopeConfig(theta=theta, type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)


_PRESETS = [
    _llama("Llama-3-8B", "meta-llama/Meta-Llama-3-8B", 128256, 4096, 14336, 32, 32, 8, context=8192, theta=5e5),
    _llama("Llama-3.1-8B", "meta-llama/Llama-3.1-8B", 128256, 4096, 14336, 32, 32, 8, context=131072,
           rope=_llama31()),
    _llama("Llama-3-70B", "meta-llama/Meta-Llama-3-70B", 128256, 8192, 28672, 80, 64, 8, context=8192, theta=5e5),
    _llama("Llama-3.1-70B", "meta-llama/Llama-3.1-70B", 128256, 8192, 28672, 80, 64, 8, context=131072,
           rope=_llama31()),
    _llama("Llama-3.1-405B", "meta-llama/Llama-3.1-405B", 128256, 16384, 53248, 126, 128, 8, context=131072,
           rope=_llama31()),
    _llama("Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B", 151936, 896, 4864, 24, 14, 2, tie=True, context=32768, theta=1e6,
           arch="qwen2"),
    _llama("Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B", 151936, 1536, 8960, 28, 12, 2, tie=True, context=131072, theta=1e6,
           arch="qwen2"),
    _llama("Qwen2.5-3B", "Qwen/Qwen2.5-3B", 151936, 2048, 11008, 36, 16, 2, tie=True, context=32768, theta=1e6,
           arch="qwen2"),
    _llama("Qwen2.5-7B", "Qwen/Qwen2.5-7B", 152064, 3584, 18944, 28, 28, 4, context=131072, theta=1e6, arch="qwen2"),
    _llama("Qwen2.5-14B", "Qwen/Qwen2.5-14B", 152064, 5120, 13824, 48, 40, 8, context=131072, theta=1e6,
           arch="qwen2"),
    _llama("Qwen2.5-32B", "Qwen/Qwen2.5-32B", 152064, 5120, 27648, 64, 40, 8, context=131072, theta=1e6,
           arch="qwen2"),
    _llama("Qwen2.5-72B", "Qwen/Qwen2.5-72B", 152064, 8192, 29568, 80, 64, 8, context=131072, theta=1e6,
           arch="qwen2"),
    _llama("Qwen3-0.6B", "Qwen/Qwen3-0.6B", 151936, 1024, 3072, 28, 16, 8, head_dim=128, tie=True, context=40960,
           theta=1e6, arch="qwen3"),
    _llama("Qwen3-1.7B", "Qwen/Qwen3-1.7B", 151936, 2048, 6144, 28, 16, 8, head_dim=128, tie=True, context=40960,
           theta=1e6, arch="qwen3"),
    _llama("Qwen3-4B", "Qwen/Qwen3-4B", 151936, 2560, 9728, 36, 32, 8, head_dim=128, tie=True, context=40960,
           theta=1e6, arch="qwen3"),
    _llama("Qwen3-8B", "Qwen/Qwen3-8B", 151936, 4096, 12288, 36, 32, 8, head_dim=128, context=40960, theta=1e6,
           arch="qwen3"),
    _llama("Qwen3-14B", "Qwen/Qwen3-14B", 151936, 5120, 17408, 40, 40, 8, head_dim=128, context=40960, theta=1e6,
           arch="qwen3"),
    _llama("Qwen3-32B", "Qwen/Qwen3-32B", 151936, 5120, 25600, 64, 64, 8, head_dim=128, context=40960, theta=1e6,
           arch="qwen3"),
    _llama("Mistral-7B", "mistralai/Mistral-7B-v0.1", 32000, 4096, 14336, 32, 32, 8, context=32768, window=4096,
           arch="mistral"),
    _llama("Mixtral-8x7B", "mistralai/Mixtral-8x7B-v0.1", 32000, 4096, 14336, 32, 32, 8, context=32768, theta=1e6,
           arch="mistral", num_experts=8, experts_per_token=2),
    _llama("SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M", 49152, 576, 1536, 30, 9, 3, tie=True, context=8192,
           theta=1e5),
    _llama("SmolLM2-360M", "HuggingFaceTB/SmolLM2-360M", 49152, 960, 2560, 32, 15, 5, tie=True, context=8192,
           theta=1e5),
    _llama("SmolLM2-1.7B", "HuggingFaceTB/SmolLM2-1.7B", 49152, 2048, 8192, 24, 32, 32, tie=True, context=8192,
           theta=130000.0),
    _llama("TinyLlama-1.1B", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", 32000, 2048, 5632, 22, 32, 4,
           context=2048),
    # Dense MHA, biases everywhere, tied embeddings, 2048 learned positions (Brown et al. 2020, table 2.1).
    _llama("GPT-3-175B", "Brown et al. 2020 (arXiv 2005.14165)", 50257, 12288, 4 * 12288, 96, 96, 96, tie=True,
           context=2048, mlp="gelu", extra_params=2048 * 12288),
]
PRESETS: dict[str, ModelSpec] = {spec.name: spec for spec in _PRESETS}
_ALIASES = {"mixtral": "Mixtral-8x7B", "gpt3": "GPT-3-175B", "gpt-3": "GPT-3-175B", "mistral-7b-v0.1": "Mistral-7B",
            "tinyllama": "TinyLlama-1.1B"}


def _norm(name: str) -> str:
    name = name.lower().rsplit("/", 1)[-1].removeprefix("meta-")
    name = re.sub(r"[-_](instruct|chat|base|hf)$", "", name)
    return re.sub(r"[^a-z0-9.]", "", name)


def get_model(name_or_path: str) -> ModelSpec:
    """A preset by name (case and punctuation ignored: 'llama-3-8b', 'Meta-Llama-3-8B', 'qwen2.5-7b-instruct'),
    or a config.json, a model folder holding one, or a .gguf file."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" or path.suffix == ".json" or path.is_dir():
        return load_model_file(path)
    wanted = _norm(name_or_path)
    aliases = {_norm(k): v for k, v in _ALIASES.items()}
    if wanted in aliases:
        return PRESETS[aliases[wanted]]
    for key, spec in PRESETS.items():
        if _norm(key) == wanted:
            return spec
    raise LongseqError(f"unknown model {name_or_path!r}; known: {', '.join(PRESETS)} (or a config.json / model "
                       "folder / .gguf path)")


def load_model_file(path: Path) -> ModelSpec:
    """A ModelSpec from an HF config.json (or the folder holding it) or from a GGUF file's metadata."""
    if path.suffix == ".gguf":
        meta, tensors = _gguf_metadata(path)
        cfg = from_gguf(meta, meta.get("vocab_size"))
        cfg.tie_word_embeddings = "output.weight" not in tensors  # llama.cpp omits the LM head when it is tied
        return model_spec(path.stem, cfg, str(path))
    file = path / "config.json" if path.is_dir() else path
    name = path.name if path.is_dir() else path.parent.name or path.stem
    return model_spec(name, read_hf_config(file), str(file))


def model_spec(name: str, cfg: ModelConfig, source: str = "") -> ModelSpec:
    """The planner's shape of a model config: a mixture of experts as the dense layout of its family with routed
    expert MLPs (ModelSpec.num_experts, experts_per_token). Mixtral is that layout exactly. Qwen2/3-MoE are
    approximated: every layer sparse (dense mlp_only_layers counted as expert layers), experts of
    moe_intermediate_size, and Qwen2-MoE's shared expert as as many more always-routed experts as its width takes."""
    if not cfg.is_moe:
        return ModelSpec(name=name, config=cfg, source=source)
    width, shared = cfg.moe_intermediate_size, 0
    if cfg.shared_expert_intermediate_size:
        shared = -(-cfg.shared_expert_intermediate_size // width)  # ceil
    dense = replace(cfg, arch=_DENSE_ARCH[cfg.arch], intermediate_size=width, num_experts=0, experts_per_token=0,
                    moe_intermediate_size=0, shared_expert_intermediate_size=0, sparse_layers=(),
                    router_aux_loss_coef=0.0)
    return ModelSpec(name=name, config=dense, num_experts=cfg.num_experts + shared,
                     experts_per_token=cfg.experts_per_token + shared, shared_experts=shared, source=source)


_DENSE_ARCH = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}


def _gguf_metadata(path: Path) -> tuple[dict[str, Any], set[str]]:
    """The GGUF's metadata (key -> value, without the tokenizer's large arrays) and its tensor names."""
    if not path.is_file():
        raise LongseqError(f"{path}: no such file")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception as e:  # truncated, corrupt or not a GGUF
        raise LongseqError(f"{path}: not a readable GGUF file ({first_line(e, 200)})") from None
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.bos_token_id",
                                                            "tokenizer.ggml.eos_token_id"):
            if key == "tokenizer.ggml.tokens":
                meta["vocab_size"] = len(field.data)
            continue
        try:
            meta[key] = field.contents()
        except Exception:
            continue
    return meta, {t.name for t in reader.tensors}
