"""Policy constants: the accepted values of training options and the rules derived from them at run time."""

from __future__ import annotations

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
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
KV_POOL_MODES = ("measure", "plan")
MAX_LORA_RANK = 64  # the largest adapter rank serving takes (the pool pads every adapter to --max-lora-rank)
QUANT_METHODS = ("fp8", "int4", "int8")  # serving: weights quantized at load (models/quant)
INT4_GROUP_SIZES = (32, 64, 128)
MEMORY_FIRST_BLOCKS = 16  # memory attention: a layer's first block storage, doubled as it fills
MEMORY_PREFILL_TOKENS = 1024  # memory attention: prompt tokens per forward (whole query blocks), matmuls stay large
KV_CACHE_DTYPES = ("auto", "fp8")  # auto: the model's dtype
LORA_TARGETS_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def attention_groups(num_kv_heads: int, seq_len: int) -> int:
    """Groups of KV heads that training attention over seq_len tokens runs one after another (attention/sdpa.py).

    Long sequences only: the backward kernel's workspace (an fp32 dQ accumulator and, under GQA, K/V gradients
    expanded to every query head) is 16 GiB at 512K tokens for Llama-3-8B; by groups it exists for one group at a
    time, at the speed of the whole call (benchmarks/results/2026-11-25-long-context-h100). At 128K the workspace
    is 4 GiB: grouping starts at 256K."""
    if seq_len < ATTENTION_GROUP_TOKENS:
        return 1
    return max(g for g in range(1, MAX_ATTENTION_GROUPS + 1) if num_kv_heads % g == 0)
