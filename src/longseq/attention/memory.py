"""Training-free memory attention: InfLLM (Xiao et al. 2024, "InfLLM: Training-Free Long-Context Extrapolation for
LLMs with an Efficient Context Memory", arXiv 2402.04617).

Queries come in query blocks of up to `block_size` tokens (a forward's tokens cut from its first one; one token
when decoding). A query block starting at position s0 sees
- local keys: positions local_start .. its own, causally, local_start = max(0, s0 - window + 1): its first query
  sees `window` keys, itself included, as a sliding window does;
- sinks: the first `sink_tokens` positions, always (InfLLM's initial tokens);
- the memory: tokens from `sink_tokens` on, beyond the local window, cut into blocks of `block_size`. The query
  block retrieves the `retrieved_blocks` blocks whose representative key has the largest inner product with its
  mean query (summed over heads, as InfLLM's concatenated-heads dot product); tokens beyond the window that do not
  yet fill a block (fewer than `block_size`, InfLLM's "global remainder") are always seen. A token's block is fixed
  by its position, so a block enters the memory once, whole, and never changes.

Positions. Local keys keep their true distances. Every memory key (sinks and remainder included) sits at one
position, s0 - window, just beyond the farthest local key of the block's first query: query s0 + i sees it at
distance window + i. When decoding (one query) that is InfLLM's choice exactly (its global part puts every key at
distance n_local, following ReRoPE); for a query block of n > 1 the distance grows by one per query, which keeps
one rotation per query, so memory and local keys share one softmax and one attention call (InfLLM rotates its
global queries a second time and merges two attention passes by their log-sum-exp). Either way no query ever
sees a distance beyond window + block_size - 1, which must be within the trained context (config.AttentionConfig
.check_context), so RoPE meets only distances the model was trained on however long the text grows.

Representative key: the mean of the block's keys (InfLLM picks the few keys that received the most attention from
the local window when the block was evicted). The mean is what the inner-product score needs: the mean query's
product with the mean key is the block's average attention logit under the memory's positions (both linear), so
the retrieval ranks blocks by exactly the quantity the dense reference computes token by token; it needs no
attention weights (which fused kernels do not return) and costs one D-vector per block and KV head.

The fast path (`LayerMemory`) works in a frame local to each query block, RoPE scores depending only on position
differences: query i at window + i, memory keys at 0 (stored un-rotated, so memory needs no rotation and
representative keys are plain means), local key t at t - s0 + window; every position stays below
window + block_size. `reference_memory_attention` works at true positions, naively. They are tested against each
other, and with every block retrieved and RoPE switched off against plain causal attention.
"""

from __future__ import annotations

import math

import torch

from longseq.attention.sdpa import attention
from longseq.config import AttentionConfig
from longseq.config.policy import MEMORY_FIRST_BLOCKS, MEMORY_PREFILL_TOKENS


def query_positions(num_tokens: int, spec: AttentionConfig, device: torch.device | str) -> torch.Tensor:
    """(num_tokens,) RoPE positions of a forward's tokens in their query blocks' frames: window + i for the i-th
    token of its block, the blocks cut every `block_size` tokens from the first."""
    return spec.local_window + torch.arange(num_tokens, device=device) % spec.block_size


def rope_table(inv_freq: torch.Tensor | None, num_positions: int, dtype: torch.dtype, device: torch.device | str
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Plain RoPE cos, sin (num_positions, D) for positions 0 .. num_positions-1, angles in float64: a key is
    un-rotated once and re-rotated at every step, so R(p') R(-p) must be exact. None: no RoPE (identity)."""
    if inv_freq is None:
        return None
    freqs = torch.arange(num_positions, dtype=torch.float64)[:, None] * inv_freq.double().cpu()  # (P, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout, as models/rope.py
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D) rotated by the angles of cos, sin (L, D): pairs (i, i + D/2), the HF layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def block_scores(q: torch.Tensor, reprs: torch.Tensor) -> torch.Tensor:
    """q (B, H, n, D) in the memory frame, reprs (B, N, H_kv, D) -> (B, N) float32: the mean query's inner product
    with each block's representative key, summed over heads (a query head scores with its KV head's key)."""
    B, H, _, D = q.shape
    num_kv_heads = reprs.shape[2]
    q_mean = q.float().mean(2).view(B, num_kv_heads, H // num_kv_heads, D).sum(2)  # (B, H_kv, D)
    return torch.einsum("bhd,bnhd->bn", q_mean, reprs.float())


def select_blocks(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """scores (B, N) -> (B, min(top_k, N)) block indices of the highest scores, ascending."""
    return scores.topk(min(top_k, scores.shape[1]), dim=-1).indices.sort(dim=-1).values


class BlockMemory:
    """One layer's memory: blocks of un-rotated K/V (B, N, H_kv, block, D) with a mean key each (B, N, H_kv, D).

    placement "gpu": the blocks stay on the compute device. "host": they live in CPU memory and each query block's
    retrieved blocks are copied to the device, so device memory holds only sinks, window and what is retrieved.
    The representative keys stay on the device either way: scoring every block is one small matmul there."""

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, block_size: int,
                 device: torch.device | str, dtype: torch.dtype, placement: str):
        self.device, self.placement = torch.device(device), placement
        self.storage = torch.device("cpu") if placement == "host" else self.device
        self.shape = (batch_size, 0, num_kv_heads, block_size, head_dim)
        self.k = torch.empty(self.shape, device=self.storage, dtype=dtype)  # capacity grows by doubling
        self.v = torch.empty(self.shape, device=self.storage, dtype=dtype)
        self.reprs = torch.empty((batch_size, 0, num_kv_heads, head_dim), device=self.device, dtype=torch.float32)
        self.num_blocks = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store blocks k, v (B, H_kv, n * block, D) (un-rotated, on the device) after the others."""
        B, H_kv, L, D = k.shape
        n = L // self.shape[3]
        blocks_k = k.reshape(B, H_kv, n, -1, D).transpose(1, 2)  # (B, n, H_kv, block, D)
        blocks_v = v.reshape(B, H_kv, n, -1, D).transpose(1, 2)
        if self.num_blocks + n > self.k.shape[1]:
            self._grow(self.num_blocks + n)
        end = self.num_blocks + n
        self.k[:, self.num_blocks : end] = blocks_k  # device -> host for "host": a blocking copy, once per block
        self.v[:, self.num_blocks : end] = blocks_v
        self.reprs[:, self.num_blocks : end] = blocks_k.float().mean(3)
        self.num_blocks = end

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.k.shape[1], MEMORY_FIRST_BLOCKS)
        for name in ("k", "v", "reprs"):
            old = getattr(self, name)
            new = old.new_empty((old.shape[0], capacity, *old.shape[2:]))
            new[:, : self.num_blocks] = old[:, : self.num_blocks]
            setattr(self, name, new)

    def select(self, q: torch.Tensor, top_k: int) -> torch.Tensor:
        """q (B, H, n, D) in the memory frame -> (B, k) indices of the blocks to retrieve, ascending."""
        return select_blocks(block_scores(q, self.reprs[:, : self.num_blocks]), top_k)

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks idx (B, k) -> their keys and values (B, k, H_kv, block, D) on the device."""
        B = idx.shape[0]
        if self.placement == "host":
            idx = idx.cpu()  # host sync: the CPU indexes its own memory (InfLLM also moves its top-k to the host)
        rows = torch.arange(B, device=idx.device)[:, None]
        k_sel, v_sel = self.k[rows, idx], self.v[rows, idx]  # (B, k, H_kv, block, D)
        if self.placement == "host":
            k_sel, v_sel = _to_device(k_sel, self.device), _to_device(v_sel, self.device)
        return k_sel, v_sel

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.reprs))


def _length(x: torch.Tensor) -> int:
    """Tokens in a piece of keys: (B, H_kv, L, D), or retrieved blocks (B, k, H_kv, block, D)."""
    return x.shape[1] * x.shape[3] if x.dim() == 5 else x.shape[2]


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """out = rotate(x, cos, sin), written in place without rotate's temporaries (cos, sin (L, D) have equal
    halves)."""
    half = x.shape[-1] // 2
    x1, x2, out1, out2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    cos, sin = cos[:, :half], sin[:, :half]
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin)
    return out


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return x.to(device)
    # Through page-locked memory so the copy runs asynchronously; PyTorch's caching host allocator keeps the
    # buffer until the copy has finished, so the next layer's gather cannot overwrite it in flight.
    return x.pin_memory().to(device, non_blocking=True)


class LayerMemory:
    """One layer's K/V under memory attention, and its attention over them (the fast block path).

    Held: the sink tokens (B, H_kv, sink, D) and the recent tokens (the remainder and the local window, up to the
    newest) on the device, and the `BlockMemory` of the rest; keys un-rotated. Each forward passes its queries and
    keys rotated at `query_positions`; `attend` stores the keys, then for each query block moves the blocks that
    have left its local window into the memory, retrieves the best ones, rotates the local keys into the block's
    frame and runs one attention call over [sinks, retrieved blocks, remainder, local keys]."""

    def __init__(self, spec: AttentionConfig, batch_size: int, num_kv_heads: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype, table: tuple[torch.Tensor, torch.Tensor] | None):
        self.spec, self.table = spec, table  # table: rope_table over window + block_size positions, or None
        self.device = torch.device(device)
        B, H_kv, D = batch_size, num_kv_heads, head_dim
        self.sink_k = torch.zeros((B, H_kv, spec.sink_tokens, D), device=device, dtype=dtype)
        self.sink_v = torch.zeros_like(self.sink_k)
        # Recent tokens, positions mem_end .. seen-1, at buffer slots [start, start + len): eviction moves `start`,
        # appends compact the buffer when it is full.
        capacity = spec.local_window + 2 * spec.block_size
        self.recent_k = torch.zeros((B, H_kv, capacity, D), device=device, dtype=dtype)
        self.recent_v = torch.zeros_like(self.recent_k)
        self.recent_start = self.recent_len = 0
        self.memory = BlockMemory(B, H_kv, D, spec.block_size, device, dtype, spec.memory_placement)
        self.mem_end = spec.sink_tokens  # the first position not yet in the memory (blocks start after the sinks)
        self.seen = 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, H, n, D), k/v (B, H_kv, n, D) of the next n positions, rotated at query_positions(n)
        -> (B, H, n, D)."""
        n, bs = q.shape[2], self.spec.block_size
        if self.table is not None:  # store keys un-rotated: R(-p) at the positions the model rotated them at
            cos, sin = self.table
            frame = query_positions(n, self.spec, self.device)
            k = rotate(k, cos[frame], -sin[frame])
        self._store(k, v)
        out, a = [], 0
        while a < n:
            batch = self.batch_blocks if self.batch_blocks is not None else self.device.type == "cuda"
            m = self._steady_blocks(self.seen + a, n - a) if batch else 0
            if m > 1:  # whole blocks past the warm-up: one pass for all of them (_blocks), same result as _block's
                out.append(self._blocks(q[:, :, a : a + m * bs], self.seen + a, m))
                a += m * bs
            else:
                out.append(self._block(q[:, :, a : a + bs], self.seen + a))
                a += bs
        self.seen += n
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

    def skip(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, H_kv, n, D) of the next n positions, rotated as for `attend`, without attending: a context
        whose outputs nobody reads (a decode benchmark's synthetic prefix). Blocks that have left the window of the
        next query move to the memory in steps of a block, so the buffers end as a real prefill leaves them."""
        n = k.shape[2]
        if self.table is not None:
            cos, sin = self.table
            frame = query_positions(n, self.spec, self.device)
            k = rotate(k, cos[frame], -sin[frame])
        bs = self.spec.block_size
        step = bs * max(1, MEMORY_PREFILL_TOKENS // bs)  # a prefill's pieces: the recent buffer grows as under attend
        for a in range(0, n, step):
            b = min(n, a + step)
            self._store(k[:, :, a:b], v[:, :, a:b])
            self.seen += b - a
            self._evict(max(0, self.seen - self.spec.local_window + 1))

    def _store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append un-rotated k, v (B, H_kv, n, D) of positions seen .. seen+n-1: sinks first, then recent."""
        n = k.shape[2]
        to_sinks = max(0, min(n, self.spec.sink_tokens - self.seen))
        if to_sinks:
            self.sink_k[:, :, self.seen : self.seen + to_sinks] = k[:, :, :to_sinks]
            self.sink_v[:, :, self.seen : self.seen + to_sinks] = v[:, :, :to_sinks]
            k, v = k[:, :, to_sinks:], v[:, :, to_sinks:]
        m = k.shape[2]
        if self.recent_start + self.recent_len + m > self.recent_k.shape[2]:
            self._compact(self.recent_len + m)
        end = self.recent_start + self.recent_len
        self.recent_k[:, :, end : end + m] = k
        self.recent_v[:, :, end : end + m] = v
        self.recent_len += m

    def _compact(self, needed: int) -> None:
        """Move the recent tokens to the front of a buffer with room for `needed` (grown if it is too small)."""
        capacity = max(self.recent_k.shape[2], needed)
        live = slice(self.recent_start, self.recent_start + self.recent_len)
        for name in ("recent_k", "recent_v"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], capacity, old.shape[3]))
            new[:, :, : self.recent_len] = old[:, :, live]  # a copy: source and destination may overlap
            setattr(self, name, new)
        self.recent_start = 0

    def _evict(self, local_start: int) -> None:
        """Move every whole block that has left the local window from the recent tokens into the memory."""
        bs = self.spec.block_size
        n = max(0, (local_start - self.mem_end) // bs)
        if n:
            span = slice(self.recent_start, self.recent_start + n * bs)
            self.memory.append(self.recent_k[:, :, span], self.recent_v[:, :, span])
            self.recent_start += n * bs
            self.recent_len -= n * bs
            self.mem_end += n * bs

    def _recent(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Recent keys and values of positions start .. end-1 (views)."""
        span = slice(self.recent_start + start - self.mem_end, self.recent_start + end - self.mem_end)
        return self.recent_k[:, :, span], self.recent_v[:, :, span]

    def _block(self, q: torch.Tensor, s0: int) -> torch.Tensor:
        """One query block q (B, H, n, D) at positions s0 .. s0+n-1 -> (B, H, n, D)."""
        n, window, sink = q.shape[2], self.spec.local_window, self.spec.sink_tokens
        local_start = max(0, s0 - window + 1)
        self._evict(local_start)
        # Memory keys, all at frame position 0 (un-rotated): sinks that left the window, retrieved blocks, remainder.
        memory = [(self.sink_k[:, :, : min(sink, local_start)], self.sink_v[:, :, : min(sink, local_start)])]
        if self.memory.num_blocks and self.spec.retrieved_blocks:
            memory.append(self.memory.gather(self.memory.select(q, self.spec.retrieved_blocks)))
        if local_start > self.mem_end:  # the remainder: beyond the window, not a whole block yet
            memory.append(self._recent(self.mem_end, local_start))
        # Local keys, positions local_start .. s0+n-1: sinks still inside the window, then recent tokens.
        split = max(local_start, min(sink, s0 + n))
        first_recent = max(split, self.mem_end)  # the memory ends at the sinks until the first block leaves
        local = [(self.sink_k[:, :, local_start:split], self.sink_v[:, :, local_start:split]),
                 self._recent(first_recent, max(first_recent, s0 + n))]
        # One (B, H_kv, M + L, D) buffer each for keys and values, every piece copied once: local keys are rotated
        # on their way in (key t to t - s0 + window, the block's frame).
        B, H_kv, _, D = self.sink_k.shape
        total = sum(_length(k) for k, _ in memory + local)
        keys, values = q.new_empty((B, H_kv, total, D)), q.new_empty((B, H_kv, total, D))
        at = 0
        for i, (k, v) in enumerate(memory + local):
            size = _length(k)
            if not size:  # an empty piece (sinks inside the window, no remainder): no operations to launch
                continue
            dst_k, dst_v = keys[:, :, at : at + size], values[:, :, at : at + size]
            if k.dim() == 5:  # retrieved blocks (B, k, H_kv, block, D): into the (B, H_kv, k * block, D) layout
                dst_k, dst_v = (dst.unflatten(2, (k.shape[1], k.shape[3])).transpose(1, 2) for dst in (dst_k, dst_v))
            if i >= len(memory) and self.table is not None:
                frame = at - total + window + n  # key t's frame position: t - s0 + window
                _rotate_into(dst_k, k, self.table[0][frame : frame + size], self.table[1][frame : frame + size])
            else:
                dst_k.copy_(k)
            dst_v.copy_(v)
            at += size
        # Causal from the last key: the memory keys, in front, are visible to every query. One call, no mask.
        return attention(q, keys, values, q_start=total - n)

    # ---- the batched path: every whole query block of a forward past the warm-up in one attention call ----------
    #
    # Once a query block's window has passed the sinks (local_start >= sink_tokens) and the memory holds at least
    # `retrieved_blocks` blocks, consecutive query blocks differ only by a shift of one block: each evicts one block,
    # keeps the same remainder length (local_start - mem_end), retrieves exactly k blocks and sees the same number of
    # keys. `_blocks` builds their key buffers side by side, (B, m, H_kv, total, D), and runs one attention call over
    # the m blocks as a batch: per forward a fixed number of launches instead of m times _block's (a GPU runs
    # _block's small operations one launch at a time). `_block` stays the reference; a test compares them. On a CPU
    # the batch is slower (m key buffers at once leave the caches that one block's buffer stays in), so by default
    # only GPUs batch.

    batch_blocks: bool | None = None  # None: on GPUs only; True / False force it (tests)

    def _steady_blocks(self, s0: int, left: int) -> int:
        """How many whole query blocks from position s0 (of `left` queries) _blocks takes: all of them once the
        first is in the steady state, else 0."""
        bs, sink, k = self.spec.block_size, self.spec.sink_tokens, self.spec.retrieved_blocks
        local_start = s0 - self.spec.local_window + 1
        if local_start < sink:
            return 0
        blocks_then = (local_start - sink) // bs  # the memory's blocks once this query block has evicted
        return left // bs if blocks_then >= k else 0

    def _blocks(self, q: torch.Tensor, s0: int, m: int) -> torch.Tensor:
        """m whole query blocks q (B, H, m * block, D) at positions s0 .. s0 + m * block - 1, in the steady state
        (_steady_blocks) -> (B, H, m * block, D): for each, what _block computes."""
        B, H, _, D = q.shape
        bs, window, sink, k = self.spec.block_size, self.spec.local_window, self.spec.sink_tokens, \
            self.spec.retrieved_blocks
        H_kv = self.sink_k.shape[1]
        local_start = s0 - window + 1
        self._evict(local_start)  # the first block's memory: n0 blocks, its remainder from mem_end
        n0, first_slot = self.memory.num_blocks, self.recent_start
        remainder = local_start - self.mem_end
        span = remainder + window - 1 + bs  # per block: remainder, then local keys up to its last query
        # Block j's remainder and local keys: recent slots first_slot + j * block .. + span (read before the
        # evictions below move recent_start; they leave the buffer's contents in place).
        slots = first_slot + bs * torch.arange(m, device=self.device)[:, None] + torch.arange(span, device=self.device)
        windows_k, windows_v = self.recent_k[:, :, slots], self.recent_v[:, :, slots]  # (B, H_kv, m, span, D)
        self._evict(local_start + (m - 1) * bs)  # block j sees the first n0 + j blocks
        total = sink + k * bs + span
        keys, values = q.new_empty((B, m, H_kv, total, D)), q.new_empty((B, m, H_kv, total, D))
        keys[:, :, :, :sink] = self.sink_k[:, None]
        values[:, :, :, :sink] = self.sink_v[:, None]
        q_blocks = q.unflatten(2, (m, bs))  # (B, H, m, block, D)
        if k:
            # Each block's mean query against every representative key, as block_scores (summed over heads)
            q_mean = q_blocks.float().mean(3).unflatten(1, (H_kv, H // H_kv)).sum(2)  # (B, H_kv, m, D)
            scores = torch.einsum("bhmd,bnhd->bmn", q_mean, self.memory.reprs[:, : self.memory.num_blocks].float())
            visible = torch.arange(scores.shape[2], device=scores.device) < n0 + torch.arange(m, device=scores.device
                                                                                              )[:, None]  # (m, N)
            idx = scores.masked_fill(~visible, float("-inf")).topk(k, dim=-1).indices.sort(dim=-1).values  # (B, m, k)
            k_sel, v_sel = self.memory.gather(idx.flatten(1))  # (B, m * k, H_kv, block, D)
            for dst, src in ((keys, k_sel), (values, v_sel)):
                dst[:, :, :, sink : sink + k * bs].unflatten(3, (k, bs)).copy_(
                    src.unflatten(1, (m, k)).transpose(2, 3))  # (B, m, H_kv, k, block, D)
        at = sink + k * bs
        keys[:, :, :, at : at + remainder] = windows_k[:, :, :, :remainder].transpose(1, 2)
        values[:, :, :, at:] = windows_v.transpose(1, 2)
        local = windows_k[:, :, :, remainder:].transpose(1, 2)  # (B, m, H_kv, window - 1 + block, D)
        if self.table is not None:  # local key t to t - s0 + window: frame positions 1 .. window + block - 1
            _rotate_into(keys[:, :, :, at + remainder :], local, self.table[0][1 : window + bs],
                         self.table[1][1 : window + bs])
        else:
            keys[:, :, :, at + remainder :] = local
        out = attention(q_blocks.transpose(1, 2).flatten(0, 1), keys.flatten(0, 1), values.flatten(0, 1),
                        q_start=total - bs)  # (B * m, H, block, D)
        return out.unflatten(0, (B, m)).transpose(1, 2).flatten(2, 3)

    def nbytes(self) -> int:
        held = (self.sink_k, self.sink_v, self.recent_k, self.recent_v)
        return sum(t.numel() * t.element_size() for t in held) + self.memory.nbytes()


def reference_memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionConfig,
    inv_freq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Memory attention of one query block, naively at true positions, in float64: for tests.

    q (B, H, n, D) un-rotated, the queries of positions T-n .. T-1; k, v (B, H_kv, T, D) un-rotated, positions
    0 .. T-1; inv_freq (D/2,) RoPE's frequencies, None for no positions at all. Every key is scored under both its
    local position (its own) and the memory's (s0 - window); blocks are scored by the mean of their tokens' memory
    logits over the block's queries and heads, picked by a full sort, and one (n, T) mask says what each query
    sees. Returns (B, H, n, D)."""
    B, H, n, D = q.shape
    T, window, bs, sink = k.shape[2], spec.local_window, spec.block_size, spec.sink_tokens
    s0 = T - n
    k = k.double().repeat_interleave(H // k.shape[1], dim=1)  # (B, H, T, D)
    v = v.double().repeat_interleave(H // v.shape[1], dim=1)
    t = torch.arange(T)
    q_rot = _rotate_complex(q.double(), t[s0:], inv_freq)
    local_logits = q_rot @ _rotate_complex(k, t, inv_freq).transpose(-1, -2)  # (B, H, n, T)
    memory_logits = q_rot @ _rotate_complex(k, torch.full((T,), s0 - window), inv_freq).transpose(-1, -2)
    local_start = max(0, s0 - window + 1)
    local = (t[None, :] >= local_start) & (t[None, :] <= t[s0:, None])  # (n, T)
    num_blocks = max(0, (local_start - sink) // bs)
    block_of = torch.where(t >= sink, (t - sink) // bs, -1)
    members = (block_of[None, :] == torch.arange(num_blocks)[:, None]).double()  # (N, T)
    scores = memory_logits.mean(2).sum(1) @ members.T / bs  # (B, N): each block's mean logit, summed over heads
    chosen = scores.argsort(dim=-1, descending=True, stable=True)[:, : spec.retrieved_blocks]  # (B, k)
    retrieved = members[chosen].sum(1) > 0  # (B, T)
    mem_end = sink + num_blocks * bs
    always = (t < min(sink, local_start)) | ((t >= mem_end) & (t < local_start))  # sinks out of window, remainder
    in_memory = (retrieved | always[None, :])[:, None, None, :]  # (B, 1, 1, T)
    logits = torch.where(local, local_logits, memory_logits) / math.sqrt(D)
    logits = logits.masked_fill(~(local | in_memory), float("-inf"))
    return (logits.softmax(-1) @ v).to(q.dtype)


def _rotate_complex(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor | None) -> torch.Tensor:
    """x (B, H, L, D) float64 rotated to positions (L,) with complex arithmetic (pair (i, i + D/2) is the number
    x_i + i x_{i+D/2}): independent of `rotate` and its tables."""
    if inv_freq is None:
        return x
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:])
    angle = positions.double()[:, None] * inv_freq.double().cpu()  # (L, D/2)
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)
