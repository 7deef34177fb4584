"""The model schema: a Llama-family decoder (dense, or with mixture-of-experts MLPs), its RoPE scaling and its
attention variant.

Torch-free and format-free: HF `config.json` maps onto it in config/hf.py, GGUF metadata in config/gguf.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from longseq.errors import LongseqError

# HF `model_type` -> our family. Everything on the Llama architecture (SmolLM2, TinyLlama, Vicuna, ...) is "llama".
# Mixture-of-experts families: the same decoder with routed expert MLPs in some or all layers.
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", *MOE_ARCHITECTURES)
# How a token picks its experts. softmax_topk: softmax over all router logits, the top k of those probabilities,
# optionally renormalised to sum to 1 (Mixtral; Qwen2/3-MoE with norm_topk_prob).
ROUTERS = ("softmax_topk",)
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
ATTENTION_VARIANTS = ("causal", "streaming", "dilated", "block_sparse", "memory")
UNBOUNDED_VARIANTS = ("streaming", "memory")  # their caches bound RoPE positions: generation runs past the context
MEMORY_PLACEMENTS = ("gpu", "host")  # memory attention: where the blocks beyond the local window live
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


@dataclass
class AttentionConfig:
    """Which keys each query sees beyond causality, and how attention is computed. A layer's sliding window
    (`ModelConfig.sliding_window`, Mistral) applies on top of every variant."""

    variant: str = "causal"
    """causal | streaming (sinks + window) | dilated (LongNet) | block_sparse | memory (InfLLM: sinks + window +
    blocks retrieved from a memory of the past, attention/memory.py; generation only)"""
    sink_tokens: int = 4
    """streaming / memory: the first tokens every query keeps seeing (StreamingLLM's attention sinks)"""
    segment_lengths: tuple[int, ...] = (2048,)
    """dilated: segment length w of each pattern (one pattern per (w, r) pair)"""
    dilation_rates: tuple[int, ...] = (1,)
    """dilated: dilation rate r of each pattern; w must be a multiple of r"""
    block_size: int = 64
    """block_sparse / memory: tokens per block (memory: also queries per query block)"""
    local_blocks: int = 4
    """block_sparse: a query block sees this many blocks ending at its own"""
    global_blocks: int = 1
    """block_sparse: the first blocks every query block sees"""
    alibi: bool = False
    """ALiBi linear distance bias (Press et al. 2021) instead of RoPE"""
    chunk_size: int = 0
    """> 0: exact attention in (chunk x chunk) tiles with an online softmax, O(chunk * T) memory"""
    local_window: int = 4096
    """memory: the recent tokens a query block sees at their true distances, the first query itself included"""
    retrieved_blocks: int = 16
    """memory: past blocks each query block retrieves from the memory (top-k by inner product with its mean query)"""
    memory_placement: str = "gpu"
    """memory: gpu (the model's device) | host (CPU memory; each query block's retrieved blocks are copied over)"""
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
        if self.memory_placement not in MEMORY_PLACEMENTS:
            raise LongseqError(f"unknown memory placement {self.memory_placement!r}; use "
                               f"{', '.join(MEMORY_PLACEMENTS)}")
        if self.variant == "memory" and self.alibi:
            raise LongseqError("memory attention places retrieved blocks by RoPE position; it cannot run with ALiBi")
        for name in ("block_size", "local_blocks", "local_window"):
            if getattr(self, name) <= 0:
                raise LongseqError(f"attention {name} must be positive, got {getattr(self, name)}")
        for name in ("sink_tokens", "global_blocks", "chunk_size", "retrieved_blocks"):
            if getattr(self, name) < 0:
                raise LongseqError(f"attention {name} must be >= 0, got {getattr(self, name)}")

    def check_context(self, max_seq_len: int) -> None:
        """Memory attention: the farthest RoPE distance a query sees (local window + a query block, less one) must
        be one the model was trained on."""
        if self.variant == "memory" and self.local_window + self.block_size > max_seq_len:
            raise LongseqError(f"memory attention: local window {self.local_window} + block size {self.block_size} "
                               f"must fit the model's context ({max_seq_len}); use a smaller --window")

    @property
    def plain(self) -> bool:
        """Causal (or sliding-window) attention on the SDPA fast path."""
        return self.variant == "causal" and not self.alibi and not self.chunk_size


@dataclass
class ModelConfig:
    """A Llama-family decoder: Llama 1/2/3, Mistral, Qwen2/2.5, Qwen3 and everything on the Llama architecture;
    with routed expert MLPs: Mixtral, Qwen2-MoE (Qwen1.5-MoE) and Qwen3-MoE."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    """The MLP width of dense layers (Mixtral: each expert's, as its config.json says)."""
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
    num_experts: int = 0
    """Routed expert MLPs in each sparse layer; 0: a dense model."""
    experts_per_token: int = 0
    """Experts each token is routed to (top-k)."""
    moe_intermediate_size: int = 0
    """Each expert's MLP width; 0 means intermediate_size (Mixtral)."""
    shared_expert_intermediate_size: int = 0
    """Qwen2-MoE: an always-on expert of this width, scaled by a sigmoid gate, beside the routed ones; 0: none."""
    norm_topk_prob: bool = True
    """Renormalise the top-k routing probabilities to sum to 1 (Mixtral always; Qwen's `norm_topk_prob`)."""
    router: str = "softmax_topk"
    """How a token picks its experts (ROUTERS)."""
    sparse_layers: tuple[bool, ...] = ()
    """Which layers are sparse (the rest run a dense MLP of intermediate_size); empty means all, when
    num_experts is set."""
    router_aux_loss_coef: float = 0.0
    """Training: the router load-balancing loss weight transformers adds (config.json's router_aux_loss_coef where
    output_router_logits is set; else 0)."""

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
        self.attention.check_context(self.max_seq_len)
        self._check_experts()

    def _check_experts(self) -> None:
        self.sparse_layers = tuple(bool(s) for s in self.sparse_layers)
        if not self.num_experts:
            if self.num_experts < 0 or self.sparse_layers:
                raise LongseqError("model config: sparse_layers needs num_experts > 0")
            return
        if self.router not in ROUTERS:
            raise LongseqError(f"unsupported MoE router {self.router!r}; supported: {', '.join(ROUTERS)}")
        if not 0 < self.experts_per_token <= self.num_experts:
            raise LongseqError(f"model config: experts_per_token must be in 1..num_experts ({self.num_experts}), "
                               f"got {self.experts_per_token}")
        if self.moe_intermediate_size == 0:
            self.moe_intermediate_size = self.intermediate_size
        if self.moe_intermediate_size < 0 or self.shared_expert_intermediate_size < 0:
            raise LongseqError("model config: expert MLP widths must be positive")
        if self.sparse_layers and len(self.sparse_layers) != self.num_layers:
            raise LongseqError("model config: sparse_layers needs one entry per layer")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_sparse(self, layer_idx: int) -> bool:
        """Whether a layer's MLP is a sparse mixture of experts."""
        return self.is_moe and (not self.sparse_layers or self.sparse_layers[layer_idx])

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of one layer, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.sliding_layers and not self.sliding_layers[layer_idx]:
            return None
        return self.sliding_window
