"""Memory attention's footprint (InfLLM, attention/memory.py): what one sequence holds on the GPU and in host memory
at a given context, what a decoded token reads, and the longest context a GPU budget allows.

Per layer, following LayerMemory and BlockMemory: the sink tokens and a buffer of recent tokens (the local window,
up to two blocks, and a whole prefill forward while the prompt goes in) on the GPU; the memory's blocks of K/V
(on the GPU, or in host memory with `memory_placement` host); one float32 representative key per block and KV head,
always on the GPU. Block storage grows by doubling from 16 blocks, so what is allocated can reach twice what is
filled; the planner counts the allocation. Each query block also assembles its keys and values (sinks, retrieved
blocks, remainder, local window) in one buffer, one layer at a time: counted once, as a transient.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from longseq.config import AttentionConfig
from longseq.config.policy import MEMORY_FIRST_BLOCKS, MEMORY_PREFILL_TOKENS
from longseq.plan.models import ModelSpec

REPR_BYTES = 4  # representative keys are float32


@dataclass
class MemoryAttentionPlan:
    context: int
    placement: str  # gpu | host
    blocks: int  # memory blocks per layer at this context
    blocks_allocated: int  # their storage's capacity (doubling)
    gpu_parts: dict[str, float] = field(default_factory=dict)  # bytes per sequence on the GPU, by part
    host_bytes: float = 0.0  # bytes per sequence in host memory
    keys_per_token: int = 0  # keys one decoded token attends to (full attention: the whole context)
    read_bytes: float = 0.0  # K/V and representative keys a decoded token reads, every layer
    host_copy_bytes: float = 0.0  # host placement: retrieved blocks copied to the GPU per decoded token

    @property
    def gpu_bytes(self) -> float:
        return sum(self.gpu_parts.values())

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), gpu_bytes=self.gpu_bytes)


def _blocks(spec: AttentionConfig, context: int) -> int:
    """Blocks in the memory once `context` tokens are in: those wholly behind the newest token's local window."""
    local_start = max(0, context - spec.local_window)
    return max(0, (local_start - spec.sink_tokens) // spec.block_size)


def _allocated(blocks: int) -> int:
    if not blocks:
        return 0
    return MEMORY_FIRST_BLOCKS << max(0, math.ceil(math.log2(blocks / MEMORY_FIRST_BLOCKS)))


def plan_memory_attention(model: ModelSpec, spec: AttentionConfig, context: int, kv_bytes: float = 2
                          ) -> MemoryAttentionPlan:
    """One sequence at `context` tokens; kv_bytes: bytes of a K or V element (the model's dtype)."""
    cfg = model.config
    spec.check_context(cfg.max_seq_len)
    L, kv_tok = cfg.num_layers, cfg.num_kv_heads * cfg.head_dim * kv_bytes  # one of K or V, one token, one layer
    bs = spec.block_size
    blocks = _blocks(spec, context)
    allocated = _allocated(blocks)
    chunk = bs * max(1, MEMORY_PREFILL_TOKENS // bs)
    # The recent buffer (LayerMemory._store): the window and two blocks, or more where a prefill forward appends
    # its tokens at once: the first forward onto nothing, each later one onto at most window + 2 blocks - 2. As if
    # the whole context were the prompt: an upper bound, within a few tokens of the buffer then.
    window = spec.local_window + 2 * bs
    later = window - 2 + min(chunk, context - chunk) if context > chunk else 0
    recent = max(window, min(chunk, context), later)
    memory = 2 * L * allocated * bs * kv_tok
    retrieved = min(spec.retrieved_blocks, blocks)
    # one layer's assembled keys and values for a prefill forward's query block
    assembled = 2 * (spec.sink_tokens + retrieved * bs + bs + spec.local_window + bs) * kv_tok
    parts = {"sinks": 2 * L * spec.sink_tokens * kv_tok, "recent tokens": 2 * L * recent * kv_tok,
             "representative keys": L * allocated * cfg.num_kv_heads * cfg.head_dim * REPR_BYTES,
             "attention buffer": assembled}
    if spec.memory_placement == "gpu":
        parts["memory blocks"] = memory
    else:
        parts["retrieved blocks"] = 2 * retrieved * bs * kv_tok  # copied over for one layer at a time
    remainder = min(bs - 1, max(0, context - spec.local_window - spec.sink_tokens))
    keys = min(context, spec.sink_tokens + retrieved * bs + remainder + spec.local_window)
    host = spec.memory_placement == "host"
    return MemoryAttentionPlan(
        context=context, placement=spec.memory_placement, blocks=blocks, blocks_allocated=allocated,
        gpu_parts=parts, host_bytes=memory if host else 0.0, keys_per_token=keys,
        read_bytes=2 * L * keys * kv_tok + L * blocks * cfg.num_kv_heads * cfg.head_dim * REPR_BYTES,
        host_copy_bytes=2 * L * retrieved * bs * kv_tok if host else 0.0)


def longest_context(model: ModelSpec, spec: AttentionConfig, gpu_bytes: float, batch: int = 1,
                    kv_bytes: float = 2, limit: int = 1 << 40) -> int:
    """The most tokens per sequence whose GPU footprint, times `batch`, fits in `gpu_bytes` (`limit` when it
    never stops fitting below it); 0 when not even an empty context fits."""
    def fits(n: int) -> bool:
        return batch * plan_memory_attention(model, spec, n, kv_bytes).gpu_bytes <= gpu_bytes

    if not fits(1):
        return 0
    lo, hi = 1, limit
    if fits(hi):
        return hi
    while hi - lo > 1:  # the footprint does not shrink as the context grows
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
