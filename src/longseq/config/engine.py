"""Options of the serving engine (`longseq serve`, `LLM(...)`): KV pool, batching limits, queue, fast paths."""

from __future__ import annotations

from dataclasses import dataclass

from longseq.config.flags import flag
from longseq.config.model import ModelConfig
from longseq.config.overrides import ModelOverrides
from longseq.config.policy import INT4_GROUP_SIZES, KV_CACHE_DTYPES, KV_POOL_MODES, MAX_LORA_RANK, QUANT_METHODS
from longseq.errors import LongseqError


@dataclass
class EngineConfig:
    """The serving engine: KV pool, batching limits, queue."""

    kv_block_size: int = flag("tokens per KV block", default=16)
    max_num_seqs: int = flag("sequences running at once", default=256)
    max_num_batched_tokens: int = flag("tokens computed per step (chunked-prefill budget)", default=2048)
    max_model_len: int | None = flag("longest prompt + output (default: the model's context)", default=None)
    gpu_memory_fraction: float = flag("share of the GPU's memory the engine may use (weights included)",
                                      default=0.9)
    num_kv_blocks: int | None = flag("KV blocks (default: from free memory; on CPU from --kv-cache-gib)",
                                     default=None)
    kv_cache_gib: float = flag("KV pool size on CPU", default=1.0)
    kv_pool: str = flag("GPU KV pool sizing: measure (run the largest step, give the pool what is left) | plan "
                         "(weights and that step's peak predicted by longseq.plan, nothing run)", default="measure")
    enable_prefix_caching: bool = flag("reuse the KV of shared prompt prefixes", default=True)
    max_queue: int = flag("waiting requests accepted before new ones are refused (429)", default=1024)
    cuda_graphs: bool = flag("replay decode steps as CUDA graphs (GPU only)", default=True)
    fuse_projections: bool = flag("q/k/v and gate/up each as one matmul (fewer, larger decode GEMVs; same "
                                  "memory)", default=True)
    decode_gemv: bool = flag("single-row matmuls (batch-1 decode) by a Triton GEMV for the weight shapes where "
                             "timing at start finds it faster than cuBLAS (GPU; needs fuse_projections)", default=True)
    async_scheduling: bool = flag("queue the next decode step before reading this step's tokens, so host work "
                                  "overlaps the GPU's", default=True)
    enable_lora: bool = flag("serve LoRA adapters (PEFT folders) beside the base model, many in one batch (implied by "
                             "`longseq serve --lora`)", default=False)
    max_loras: int = flag("adapters held on the GPU at once (slots of the LoRA pool); more may be registered, kept in "
                          "host memory and loaded into a slot least recently used first", default=8)
    max_lora_rank: int = flag("the largest adapter rank served (every slot is sized for it)", default=16)
    tensor_parallel: int = flag("GPUs (processes) the model is split over: weights, heads and KV cache / N",
                                default=1)
    engine_process: bool = flag("`longseq serve`: run the engine in a process of its own (the server's Python work "
                                "then never holds the GIL its step loop needs) instead of on a thread of the server; "
                                "off by default: slower than the thread under load on an H200 "
                                "(benchmarks/results/2026-12-03-serve-http-h200)",
                                default=False)
    quantization: str | None = flag("weights quantized at load: fp8 (e4m3, a scale per output channel, activations "
                                    "scaled per token; GPUs of compute capability 8.9+) | int4 (weight-only, a scale "
                                    "and zero per group of --quant-group-size inputs) | int8 (weight-only, GGUF's "
                                    "Q8_0 layout: an fp16 scale per 32 inputs; a .gguf's Q8_0 tensors kept as "
                                    "they are); default: as the checkpoint stores them (FP8, GPTQ and AWQ "
                                    "checkpoints load quantized)", default=None)
    quant_group_size: int = flag("int4: input channels per scale and zero (32, 64 or 128)", default=128)
    kv_cache_dtype: str = flag("KV pool: auto (the model's dtype) | fp8 (e4m3 with a scale per layer: twice the "
                               "blocks in the same memory)", default="auto")

    def __post_init__(self):
        for name in ("kv_block_size", "max_num_seqs", "max_num_batched_tokens", "max_queue", "tensor_parallel",
                     "max_loras", "max_lora_rank"):
            if getattr(self, name) <= 0:
                raise LongseqError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise LongseqError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise LongseqError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.kv_cache_gib <= 0:
            raise LongseqError(f"kv_cache_gib must be positive, got {self.kv_cache_gib}")
        if self.enable_lora and not 1 <= self.max_lora_rank <= MAX_LORA_RANK:
            raise LongseqError(f"max_lora_rank must be in [1, {MAX_LORA_RANK}], got {self.max_lora_rank}")
        if self.enable_lora and self.tensor_parallel > 1:
            raise LongseqError("LoRA adapters are served on one GPU: drop --tensor-parallel or the adapters")
        if self.kv_pool not in KV_POOL_MODES:
            raise LongseqError(f"kv_pool must be one of {', '.join(KV_POOL_MODES)}, got {self.kv_pool!r}")
        check_quantization(self.quantization, self.quant_group_size)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise LongseqError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got "
                               f"{self.kv_cache_dtype!r}")
        if self.quantization is not None and self.tensor_parallel > 1:
            raise LongseqError("quantized weights are served on one GPU for now (--tensor-parallel 1)")


def check_quantization(method: str | None, group_size: int = 128) -> None:
    """One line for a quantization method or int4 group size longseq does not know."""
    if method is not None and method not in QUANT_METHODS:
        raise LongseqError(f"quantization must be one of {', '.join(QUANT_METHODS)}, got {method!r}")
    if group_size not in INT4_GROUP_SIZES:
        raise LongseqError(f"quant_group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got "
                           f"{group_size}")


def check_served_attention(cfg: EngineConfig, model: ModelConfig) -> None:
    """One line for an attention the serving engine cannot run: it serves causal (or sliding-window) attention, and
    memory attention (attention/paged_memory.py) with its blocks made of whole KV blocks, on one GPU."""
    attn = model.attention
    if attn.variant not in ("causal", "memory") or attn.alibi:  # the paged kernels know causal masks and windows
        raise LongseqError(f"the serving engine runs causal or sliding-window attention, or memory attention; not "
                           f"{attn.variant}"
                           + (" with ALiBi" if attn.alibi else ""))
    if attn.variant != "memory":
        return
    if attn.block_size % cfg.kv_block_size:
        raise LongseqError(f"memory attention's block size ({attn.block_size}) must be a multiple of the KV block "
                           f"size ({cfg.kv_block_size}): its blocks are made of whole KV blocks")
    if cfg.tensor_parallel > 1:
        raise LongseqError("memory attention is served on one GPU for now (--tensor-parallel 1)")
    if attn.memory_placement != "gpu":
        raise LongseqError("the serving engine keeps memory attention's blocks in its GPU KV pool; "
                           "--memory-placement host is for `longseq generate` and `longseq eval`")
    if model.rope.type == "dynamic":
        raise LongseqError("memory attention in the serving engine needs fixed RoPE frequencies, not dynamic NTK "
                           "(its positions run far past the context)")
    attn.check_context(model.max_seq_len)


def check_served_overrides(overrides: ModelOverrides) -> None:
    """One line for a model override the serving engine would not use (the contiguous attention paths' options)."""
    for name in ("attention_chunk", "attention_kernel"):
        if getattr(overrides, name) is not None:
            raise LongseqError(f"--{name.replace('_', '-')} does not apply to the serving engine (its paged attention "
                               "has kernels of its own)")
