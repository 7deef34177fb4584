"""Typed configuration: the one source of truth. HF `config.json` and GGUF metadata map onto these fields."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longseq.errors import LongseqError

# HF `model_type` -> our family. Everything on the Llama architecture (SmolLM2, TinyLlama, Vicuna, ...) is "llama".
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
ATTENTION_VARIANTS = ("causal", "streaming", "dilated", "block_sparse")
ATTENTION_KERNELS = ("auto", "sdpa", "fa4")  # causal attention: attention/flash.py (FA4) or PyTorch SDPA


@dataclass
class RopeConfig:
    """Rotary position embedding and its context-extension scaling."""

    theta: float = 10000.0
    type: str = "default"
    """default | linear (position interpolation) | dynamic (NTK) | yarn | llama3"""
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    """Pre-training context; yarn and llama3 derive their frequency bands from it."""
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: cos/sin scale; None derives 0.1*ln(factor)+1
    mscale: float | None = None  # yarn (DeepSeek style)
    mscale_all_dim: float | None = None  # yarn (DeepSeek style)
    truncate: bool = True  # yarn: round the correction range to whole dims

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise LongseqError(f"unsupported rope scaling type {self.type!r}; supported: {', '.join(ROPE_TYPES)}")
        if self.theta <= 0 or self.factor <= 0:
            raise LongseqError("rope theta and factor must be positive")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> RopeConfig:
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
        return cls(**kw)


@dataclass
class AttentionConfig:
    """Which keys each query sees beyond causality, and how attention is computed. A layer's sliding window
    (`ModelConfig.sliding_window`, Mistral) applies on top of every variant."""

    variant: str = "causal"
    """causal | streaming (sinks + window) | dilated (LongNet) | block_sparse"""
    sink_tokens: int = 4
    """streaming: the first tokens every query keeps seeing (StreamingLLM's attention sinks)"""
    segment_lengths: tuple[int, ...] = (2048,)
    """dilated: segment length w of each pattern (one pattern per (w, r) pair)"""
    dilation_rates: tuple[int, ...] = (1,)
    """dilated: dilation rate r of each pattern; w must be a multiple of r"""
    block_size: int = 64
    """block_sparse: tokens per block"""
    local_blocks: int = 4
    """block_sparse: a query block sees this many blocks ending at its own"""
    global_blocks: int = 1
    """block_sparse: the first blocks every query block sees"""
    alibi: bool = False
    """ALiBi linear distance bias (Press et al. 2021) instead of RoPE"""
    chunk_size: int = 0
    """> 0: exact attention in (chunk x chunk) tiles with an online softmax, O(chunk * T) memory"""
    kernel: str = "auto"
    """auto | sdpa | fa4: causal prefill and training attention (auto: FlashAttention-4 where flash-attn-4 is
    installed and the GPU is a Hopper or Blackwell, else PyTorch SDPA; fa4: fail where it cannot run)"""

    def __post_init__(self):
        if self.variant not in ATTENTION_VARIANTS:
            raise LongseqError(f"unknown attention variant {self.variant!r}; use {', '.join(ATTENTION_VARIANTS)}")
        if self.kernel not in ATTENTION_KERNELS:
            raise LongseqError(f"unknown attention kernel {self.kernel!r}; use {', '.join(ATTENTION_KERNELS)}")
        self.segment_lengths = tuple(int(w) for w in self.segment_lengths)
        self.dilation_rates = tuple(int(r) for r in self.dilation_rates)
        if len(self.segment_lengths) != len(self.dilation_rates) or not self.segment_lengths:
            raise LongseqError("dilated attention needs one dilation rate per segment length")
        for w, r in zip(self.segment_lengths, self.dilation_rates, strict=True):
            if w <= 0 or r <= 0 or w % r:
                raise LongseqError(f"dilated attention: segment length {w} must be a positive multiple of rate {r}")
        for name in ("block_size", "local_blocks"):
            if getattr(self, name) <= 0:
                raise LongseqError(f"attention {name} must be positive, got {getattr(self, name)}")
        for name in ("sink_tokens", "global_blocks", "chunk_size"):
            if getattr(self, name) < 0:
                raise LongseqError(f"attention {name} must be >= 0, got {getattr(self, name)}")

    @property
    def plain(self) -> bool:
        """Causal (or sliding-window) attention on the SDPA fast path."""
        return self.variant == "causal" and not self.alibi and not self.chunk_size


@dataclass
class ModelConfig:
    """A Llama-family decoder: Llama 1/2/3, Mistral, Qwen2/2.5, Qwen3 and everything on the Llama architecture."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0
    """0 means hidden_size // num_heads (Qwen3 sets it explicitly)."""
    max_seq_len: int = 2048
    """The model's native context (`max_position_embeddings`)."""
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 always; Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None
    """Keys further back than this many positions are not attended to (Mistral)."""
    sliding_layers: tuple[bool, ...] = ()
    """Which layers use the sliding window; empty means all of them when `sliding_window` is set."""
    arch: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Attention variant (not part of HF configs: set by `longseq.models.overrides` or in code)."""

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise LongseqError(
                f"unsupported architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise LongseqError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise LongseqError(
                f"model config: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise LongseqError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise LongseqError("model config: sliding_layers needs one entry per layer")
        if self.rope.original_max_position_embeddings is None:
            self.rope.original_max_position_embeddings = self.max_seq_len
        if self.attention.variant == "streaming" and self.sliding_window is None:
            raise LongseqError("streaming attention needs a window (the recent tokens kept besides the sinks)")

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of one layer, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.sliding_layers and not self.sliding_layers[layer_idx]:
            return None
        return self.sliding_window

    # ---- constructors -------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """From the dict of an HF `config.json`."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            arch = model_type or (hf.get("architectures") or ["<none>"])[0]
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
                rope=RopeConfig.from_hf(hf),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=_as_ids(hf.get("eos_token_id")),
            )
        except KeyError as e:
            raise LongseqError(f"config.json is missing the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise LongseqError(f"config.json has a field of the wrong type: {e}") from None

        attention_bias = bool(hf.get("attention_bias", False))
        if model_type == "qwen2":
            cfg.update(qkv_bias=True)
        else:
            cfg.update(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(hf.get("mlp_bias", False)))
        if model_type == "qwen3":
            cfg.update(qk_norm=True)

        window = hf.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
            window = None
        if window is not None:
            cfg["sliding_window"] = int(window)
            layer_types = hf.get("layer_types")
            if layer_types:
                cfg["sliding_layers"] = tuple(t == "sliding_attention" for t in layer_types)
            elif model_type in ("qwen2", "qwen3"):
                first = int(hf.get("max_window_layers", num_layers))
                cfg["sliding_layers"] = tuple(i >= first for i in range(num_layers))
        return cls(**cfg)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise LongseqError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LongseqError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(hf, dict):
            raise LongseqError(f"{path}: expected a JSON object")
        return cls.from_hf(hf)

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], vocab_size: int | None = None) -> ModelConfig:
        """From GGUF metadata (key -> value); keys follow llama.cpp's `{arch}.*` naming."""
        arch = meta.get("general.architecture")
        if arch not in ("llama", "qwen2", "qwen3"):
            raise LongseqError(
                f"unsupported GGUF architecture {arch!r}; supported: llama (incl. Mistral), qwen2, qwen3"
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
            cfg = cls(
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
                eos_token_ids=_as_ids(
                    [meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")]
                ),
            )
        except (TypeError, ValueError) as e:
            raise LongseqError(f"GGUF metadata is incomplete or malformed: {e}") from None
        return cfg

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict of this config (used by export and by parity tests)."""
        rope: dict[str, Any] = {"rope_type": self.rope.type, "rope_theta": self.rope.theta}
        if self.rope.type != "default":
            rope["factor"] = self.rope.factor
        if self.rope.type in ("yarn", "llama3"):
            rope["original_max_position_embeddings"] = self.rope.original_max_position_embeddings
        if self.rope.type == "llama3":
            rope.update(low_freq_factor=self.rope.low_freq_factor, high_freq_factor=self.rope.high_freq_factor)
        if self.rope.type == "yarn":
            rope.update(beta_fast=self.rope.beta_fast, beta_slow=self.rope.beta_slow, truncate=self.rope.truncate)
            for name in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self.rope, name) is not None:
                    rope[name] = getattr(self.rope, name)
        hf: dict[str, Any] = {
            "model_type": self.arch,
            "architectures": [
                {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}[self.arch]
            ],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "rope_theta": self.rope.theta,
            "rope_scaling": None if self.rope.type == "default" else rope,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else
            (self.eos_token_ids[0] if self.eos_token_ids else None),
        }
        if self.arch in ("llama", "mistral", "qwen3"):
            hf["attention_bias"] = self.qkv_bias
        if self.arch == "llama":
            hf["mlp_bias"] = self.mlp_bias
        if self.arch == "mistral":
            hf["sliding_window"] = self.sliding_window
        if self.arch in ("qwen2", "qwen3"):
            hf["use_sliding_window"] = self.sliding_window is not None
            hf["sliding_window"] = self.sliding_window
            if self.sliding_window is not None:
                hf["layer_types"] = [
                    "sliding_attention" if self.layer_window(i) else "full_attention" for i in range(self.num_layers)
                ]
        return hf


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(dict.fromkeys(int(v) for v in value if v is not None))


METHODS = ("lora", "qlora", "full")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd", "adafactor")
SCHEDULES = ("cosine", "linear", "constant")
RECOMPUTE_POLICIES = ("none", "selective", "keep_attention", "full", "offloaded")
PLAIN_LAYER_POLICIES = ("keep_attention", "full")  # the policies whose last layers may run plain (SwiGLU only)
ATTENTION_GROUP_TOKENS = 1 << 18  # training attention over this many tokens or more runs by groups of KV heads
MAX_ATTENTION_GROUPS = 8
DEFAULT_TILE_TOKENS = 8192  # tiled norms / MLP: at Llama-3-8B width one S x 14336 bf16 tile is 224 MiB
PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
KV_POOL_MODES = ("measure", "plan")
LORA_TARGETS_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def attention_groups(num_kv_heads: int, seq_len: int) -> int:
    """Groups of KV heads that training attention over seq_len tokens runs one after another (attention/sdpa.py).

    Long sequences only: the backward kernel's workspace (an fp32 dQ accumulator and, under GQA, K/V gradients
    expanded to every query head) is 16 GiB at 512K tokens for Llama-3-8B; by groups it exists for one group at a
    time. On an H100 the grouped kernels ran as fast as the whole call at 256K and 512K tokens (cuDNN; measured in
    benchmarks/results/2026-11-25-long-context-h100). At 128K the workspace is 4 GiB: grouping starts at 256K."""
    if seq_len < ATTENTION_GROUP_TOKENS:
        return 1
    return max(g for g in range(1, MAX_ATTENTION_GROUPS + 1) if num_kv_heads % g == 0)


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


OVERRIDE_ATTENTION = ("causal", "sliding", *ATTENTION_VARIANTS[1:])
ROPE_SCALINGS = ("none", "linear", "dynamic", "ntk", "yarn")  # ntk: dynamic NTK


@dataclass
class ModelOverrides:
    """Attention variant and RoPE scaling applied to a loaded model (`longseq.models.overrides.apply_overrides`);
    flags and YAML keys of `longseq train` and `longseq eval`. Unset (None) keeps what the model has."""

    attention: str | None = _help("causal | sliding | streaming | dilated | block_sparse", default=None)
    window: int | None = _help("sliding / streaming: recent tokens a query sees, itself included", default=None)
    sink_tokens: int | None = _help("streaming: first tokens always kept, the attention sinks (None: 4)", default=None)
    segment_lengths: tuple[int, ...] = _help("dilated: segment length of each pattern (none given: 2048)", default=())
    dilation_rates: tuple[int, ...] = _help("dilated: dilation rate of each pattern (none given: 1 each)", default=())
    block_size: int | None = _help("block_sparse: tokens per block (None: 64)", default=None)
    local_blocks: int | None = _help("block_sparse: blocks seen up to a query's own (None: 4)", default=None)
    global_blocks: int | None = _help("block_sparse: first blocks every query sees (None: 1)", default=None)
    alibi: bool = _help("ALiBi distance bias instead of RoPE (for models trained with it)", default=False)
    attention_chunk: int | None = _help("exact attention in tiles of this many tokens; 0: off", default=None)
    attention_kernel: str | None = _help("auto | sdpa | fa4: causal attention kernel (auto: FlashAttention-4 where "
                                         "flash-attn-4 is installed on a Hopper/Blackwell GPU, else SDPA)",
                                         default=None)
    rope_scaling: str | None = _help("none | linear | dynamic (= ntk) | yarn: RoPE context extension", default=None)
    rope_factor: float | None = _help("RoPE scaling factor: the context multiple", default=None)
    max_seq_len: int | None = _help("context limit (default: the native context x rope factor)", default=None)

    def __post_init__(self):
        for name in ("segment_lengths", "dilation_rates"):  # "2048,4096", [2048, 4096] and (2048,) alike
            value = getattr(self, name)
            items = value.split(",") if isinstance(value, str) else [x for v in value for x in str(v).split(",")]
            try:
                setattr(self, name, tuple(int(x) for x in items if x.strip()))
            except ValueError:
                raise LongseqError(f"{name} takes integers; got {value!r}") from None
        if self.attention is not None and self.attention not in OVERRIDE_ATTENTION:
            raise LongseqError(f"attention must be one of {', '.join(OVERRIDE_ATTENTION)}; got {self.attention!r}")
        if self.attention_kernel is not None and self.attention_kernel not in ATTENTION_KERNELS:
            raise LongseqError(f"attention_kernel must be one of {', '.join(ATTENTION_KERNELS)}; "
                               f"got {self.attention_kernel!r}")
        if self.rope_scaling is not None and self.rope_scaling not in ROPE_SCALINGS:
            raise LongseqError(f"rope_scaling must be one of {', '.join(ROPE_SCALINGS)}; got {self.rope_scaling!r}")
        for name in ("window", "block_size", "local_blocks", "max_seq_len"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise LongseqError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("sink_tokens", "global_blocks", "attention_chunk"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise LongseqError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.rope_factor is not None and not self.rope_factor >= 1:
            raise LongseqError(f"rope_factor must be >= 1, got {self.rope_factor}")
        if self.attention in ("sliding", "streaming") and self.window is None:
            raise LongseqError(f"--attention {self.attention} needs --window N")


@dataclass
class TrainConfig(ModelOverrides):
    """Everything a training run needs. `longseq train` flags and YAML keys are these field names."""

    data: tuple[str, ...] = _help("JSONL (text or chat messages) or .txt files / folders", default=())
    model: str | None = _help("HF model directory or .gguf file (default: the built-in model)", default=None)
    out_dir: str = _help("where checkpoints, metrics and exports go", default="runs/train")
    method: str = _help("lora | qlora | full", default="lora")
    seq_len: int = _help("tokens per packed sequence", default=2048)
    batch_size: int = _help("sequences per micro-batch", default=1)
    grad_accum: int = _help("micro-batches per optimizer step", default=1)
    max_steps: int = _help("optimizer steps", default=100)
    lr: float = _help("peak learning rate", default=2e-4)
    weight_decay: float = _help("decoupled weight decay", default=0.0)
    warmup_steps: int = _help("linear warm-up steps", default=0)
    schedule: str = _help("cosine | linear | constant decay after warm-up", default="cosine")
    min_lr_ratio: float = _help("final learning rate as a fraction of lr", default=0.0)
    max_grad_norm: float = _help("gradient clipping norm; 0 disables", default=1.0)
    optimizer: str = _help("adamw | adamw8bit | sgd | adafactor", default="adamw")
    precision: str = _help("auto | bf16 | fp16 | fp32 (auto: bf16 on GPU, fp32 on CPU)", default="auto")
    plan: str = _help("auto: choose recompute, tiling and offload from the planner and the free memory; off: "
                      "as the flags say", default="auto")
    recompute: str = _help("activation checkpointing: auto | none | selective | keep_attention (recompute all but "
                           "attention) | full | offloaded (full, with layer inputs in pinned host memory)",
                           default="auto")
    tile_tokens: int | None = _help("tokens per RMSNorm / MLP tile for long sequences; 0: off (default: planned)",
                                    default=None)
    offload_keep: int | None = _help("recompute offloaded: the last layers whose inputs stay on the GPU "
                                     "(default: planned from free memory)", default=None)
    plain_layers: int | None = _help("recompute keep_attention / full: the last layers that recompute only the "
                                     "SwiGLU product (default: as many as fit)", default=None)
    lora_rank: int = _help("LoRA rank r", default=16)
    lora_alpha: float = _help("LoRA alpha (scale = alpha / r)", default=32.0)
    lora_dropout: float = _help("dropout on the LoRA input", default=0.0)
    lora_targets: tuple[str, ...] = _help("linear layers that get adapters", default=LORA_TARGETS_ALL)
    lora_train_extra: tuple[str, ...] = _help("also train: embed, norm (LongLoRA)", default=())
    loss_chunk: int = _help("tokens per chunk of the fused LM-head + cross-entropy", default=1024)
    seed: int = _help("data order, initialisation and dropout", default=0)
    device: str = _help("cpu, cuda or cuda:N", default="auto")
    save_every: int = _help("checkpoint every N steps; 0: only at the end", default=100)
    keep_last: int = _help("checkpoints kept", default=3)
    resume: str | None = _help("checkpoint directory, or 'latest' in out_dir", default=None)
    log_every: int = _help("steps between metric lines", default=1)
    on_bad_row: str = _help("skip | fail on malformed data rows", default="skip")
    parallel: str = _help("auto | none | ddp | fsdp: data parallelism over the processes (auto: ddp when several "
                          "run, none on one; fsdp shards weights, gradients and optimizer state, ZeRO-3)",
                          default="auto")
    fsdp_offload: bool = _help("fsdp: keep the sharded weights, gradients and optimizer state in CPU memory",
                               default=False)
    sequence_parallel: int = _help("Ulysses degree: processes that share each sequence (divides the model's KV "
                                   "heads and seq_len)", default=1)
    nproc: int = _help("processes to start on this machine (re-launches itself under torchrun); ignored when "
                       "already launched by torchrun", default=1)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.data, str):
            self.data = (self.data,)
        for name in ("lora_targets", "lora_train_extra"):  # "q_proj,v_proj" and ["q_proj", "v_proj"] alike
            value = getattr(self, name)
            items = value.split(",") if isinstance(value, str) else [x for v in value for x in str(v).split(",")]
            setattr(self, name, tuple(x.strip() for x in items if x.strip()))
        self.data = tuple(str(d) for d in self.data)
        for name, allowed in (("method", METHODS), ("precision", PRECISIONS), ("optimizer", OPTIMIZERS),
                              ("schedule", SCHEDULES), ("recompute", ("auto", *RECOMPUTE_POLICIES)),
                              ("on_bad_row", ("skip", "fail")), ("plan", ("auto", "off")),
                              ("parallel", PARALLEL_MODES)):
            if getattr(self, name) not in allowed:
                raise LongseqError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "lora_rank", "loss_chunk", "keep_last",
                     "log_every", "sequence_parallel", "nproc"):
            if getattr(self, name) <= 0:
                raise LongseqError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "warmup_steps", "min_lr_ratio", "max_grad_norm", "save_every"):
            if not getattr(self, name) >= 0:
                raise LongseqError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("tile_tokens", "offload_keep", "plain_layers"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise LongseqError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise LongseqError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        bad = set(self.lora_targets) - set(LORA_TARGETS_ALL)
        if bad or not self.lora_targets:
            raise LongseqError(f"lora_targets must be among {', '.join(LORA_TARGETS_ALL)}; got {sorted(bad) or 'none'}")
        bad = set(self.lora_train_extra) - {"embed", "norm"}
        if bad:
            raise LongseqError(f"lora_train_extra takes embed and/or norm; got {sorted(bad)}")
        if self.seq_len % self.sequence_parallel:
            raise LongseqError(f"seq_len {self.seq_len} must be a multiple of sequence_parallel "
                               f"{self.sequence_parallel} (each process holds seq_len / sequence_parallel tokens)")
        if self.fsdp_offload and self.parallel != "fsdp":
            raise LongseqError("fsdp_offload needs --parallel fsdp")
        if self.parallel == "none" and self.sequence_parallel > 1:
            raise LongseqError("sequence_parallel needs several processes: use --parallel ddp or fsdp")


@dataclass
class EngineConfig:
    """The serving engine: KV pool, batching limits, queue."""

    kv_block_size: int = _help("tokens per KV block", default=16)
    max_num_seqs: int = _help("sequences running at once", default=256)
    max_num_batched_tokens: int = _help("tokens computed per step (chunked-prefill budget)", default=2048)
    max_model_len: int | None = _help("longest prompt + output (default: the model's context)", default=None)
    gpu_memory_fraction: float = _help("share of the GPU's memory the engine may use (weights included)",
                                       default=0.9)
    num_kv_blocks: int | None = _help("KV blocks (default: from free memory; on CPU from --kv-cache-gib)",
                                      default=None)
    kv_cache_gib: float = _help("KV pool size on CPU", default=1.0)
    kv_pool: str = _help("GPU KV pool sizing: measure (run the largest step, give the pool what is left) | plan "
                         "(weights and that step's peak predicted by longseq.plan, nothing run)", default="measure")
    enable_prefix_caching: bool = _help("reuse the KV of shared prompt prefixes", default=True)
    max_queue: int = _help("waiting requests accepted before new ones are refused (429)", default=1024)
    cuda_graphs: bool = _help("replay decode steps as CUDA graphs (GPU only)", default=True)
    fuse_projections: bool = _help("q/k/v and gate/up each as one matmul (fewer, larger decode GEMVs; same "
                                   "memory)", default=True)
    decode_gemv: bool = _help("single-row matmuls (batch-1 decode) by a Triton GEMV for the weight shapes where "
                              "timing at start finds it faster than cuBLAS (GPU; needs fuse_projections)", default=True)
    async_scheduling: bool = _help("queue the next decode step before reading this step's tokens, so host work "
                                   "overlaps the GPU's", default=True)
    tensor_parallel: int = _help("GPUs (processes) the model is split over: weights, heads and KV cache / N",
                                 default=1)

    def __post_init__(self):
        for name in ("kv_block_size", "max_num_seqs", "max_num_batched_tokens", "max_queue", "tensor_parallel"):
            if getattr(self, name) <= 0:
                raise LongseqError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise LongseqError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise LongseqError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.kv_cache_gib <= 0:
            raise LongseqError(f"kv_cache_gib must be positive, got {self.kv_cache_gib}")
        if self.kv_pool not in KV_POOL_MODES:
            raise LongseqError(f"kv_pool must be one of {', '.join(KV_POOL_MODES)}, got {self.kv_pool!r}")
