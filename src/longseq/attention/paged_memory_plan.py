"""Which pool slots each query block of an engine step reads under memory attention (InfLLM, attention/memory.py),
worked out once per step for every layer: the host cuts the step into query blocks and computes a few numbers per
block; the device expands them into slots, positions and masks (attention/paged_memory.py attends with them).

Query blocks. A sequence's new tokens of a step are cut at its first new position and at every multiple of the
memory's block_size: a decode token is a block of its own, as in `generate`; a prompt chunk that starts on a multiple
of block_size (the scheduler cuts them there, prefix-cache hits are rounded down to one) is cut exactly as
`generate` cuts its prompt. Where max_num_batched_tokens is below block_size chunks start mid-block: such a chunk
begins with a shorter query block whose frame starts at its own first token; every distance stays below
window + block_size, but its retrieval and positions differ from those of a whole block.

A query block at s0..s0+n-1 reads, as LayerMemory does (positions are true positions, pool slots through the block
table): sinks beyond the window [0, min(sinks, local_start)) and the remainder [mem_end, local_start), the memory
keys, all placed at s0 - window; the retrieved memory blocks (chosen per layer); the local keys
[local_start, s0 + n), causal. local_start = max(0, s0 - window + 1); memory block c holds positions
sinks + c * block_size .. + block_size - 1, and is in the memory once it has left the window: c < num_blocks =
(local_start - sinks) // block_size; mem_end = sinks + num_blocks * block_size.

Representative keys are kept per pool block: the mean key of memory block c is stored at the pool block holding its
last token (distinct blocks for distinct c, since block_size >= the KV block size; a block shared through the prefix
cache holds the same tokens at the same positions, so its mean is the same). It is computed in the step that writes
that token (`updates`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from longseq.attention.host_copy import upload_ints
from longseq.config import AttentionConfig


@dataclass
class QueryBlocks:
    """Query blocks of one kind (single tokens, or cut from prompt chunks), on the device, padded to the widest."""

    rows: torch.Tensor  # (Q, n) query rows in the step's flat batch; padding repeats the block's last row
    valid: torch.Tensor  # (Q, n) bool: real queries
    real: torch.Tensor  # (R,) the real queries' indices into the flattened (Q * n)
    frame: torch.Tensor  # (Q,) s0 - window: the true position every memory key is moved to
    rotate_query: torch.Tensor  # (Q,) window - s0: moves the block's queries into the memory's frame (scoring)
    memory_slots: torch.Tensor  # (Q, M) sinks beyond the window, then the remainder
    memory_pos: torch.Tensor  # (Q, M) their true positions
    memory_mask: torch.Tensor  # (Q, M) bool
    local_slots: torch.Tensor  # (Q, L) positions local_start .. s0+n-1
    local_mask: torch.Tensor  # (Q, n, L) bool, causal
    table_start: torch.Tensor  # (Q,) where the block's sequence's table starts in MemoryStep.tables
    # Candidates: the memory blocks that have left a query block's window, 0 .. num_blocks-1, scored by the mean
    # key kept at the pool block of their last token (pair_block, or each set's blocks).
    num_blocks: torch.Tensor  # (Q,)
    max_blocks: int  # the most of any query block
    # Single tokens: every (query block, candidate) pair, flat (P,), since each block is its own sequence.
    pair_qb: torch.Tensor | None = None
    pair_col: torch.Tensor | None = None
    pair_block: torch.Tensor | None = None
    # Chunks: per sequence, its query blocks a..b-1 and its candidates' pool blocks (N,), shared by them all.
    sets: list[tuple[int, int, torch.Tensor]] | None = None
    out_rows: torch.Tensor | None = None  # (R,) rows[real]: where the real queries' outputs go
    # Rotations every layer shares (cos, sin): memory keys into the frame (Q, M, 1, D/2), the block's mean query
    # into the memory's (Q, 1, D/2); set by the cache (PagedMemoryKVCache.set_plan), None without RoPE.
    memory_rot: tuple[torch.Tensor, torch.Tensor] | None = None
    query_rot: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class MemoryStep:
    """One step's memory-attention plan: its query block groups, the block tables, the means to compute."""

    tables: torch.Tensor  # (sum of table widths,) every scheduled sequence's block table, back to back
    groups: list[QueryBlocks]  # single-token blocks first, then the prompt chunks' (each where there are any)
    update_slots: torch.Tensor  # (U, block_size) slots of the memory blocks completed this step
    update_pos: torch.Tensor  # (U, block_size) their positions
    update_block: torch.Tensor  # (U,) the pool block their mean key goes to
    kv_block_size: int
    # Set by the cache with the step's rotations: RoPE's frequencies (float64), the completed blocks' keys back to
    # position 0 (U, bs, 1, D/2), and the table over a block's offsets j, a move by -j (bs, D/2).
    inv_freq: torch.Tensor | None = None
    update_rot: tuple[torch.Tensor, torch.Tensor] | None = None
    offset_rot: tuple[torch.Tensor, torch.Tensor] | None = None


def plan_step(block_tables: list[list[int]], query_lens: list[int], context_lens: list[int], kv_block_size: int,
              spec: AttentionConfig, device: torch.device) -> MemoryStep:
    """The plan of a step (the engine's flat batch: sequence j has query_lens[j] new tokens and context_lens[j]
    tokens of K/V after them)."""
    bs, sink, window, kv = spec.block_size, spec.sink_tokens, spec.local_window, kv_block_size
    widths = torch.tensor([len(t) for t in block_tables])
    table_start = torch.cumsum(widths, 0) - widths
    tables = torch.tensor(list(itertools.chain.from_iterable(block_tables)), dtype=torch.int64)
    ctx, q_lens = torch.tensor(context_lens), torch.tensor(query_lens)
    first, row0 = ctx - q_lens, torch.cumsum(q_lens, 0) - q_lens
    single = q_lens == 1
    # Query blocks (sequence, s0, n, first row): decode tokens as they are, chunks cut at multiples of block_size.
    blocks = [torch.stack([torch.nonzero(single).flatten(), first[single], q_lens[single], row0[single]], 1)]
    cut = []
    for j in torch.nonzero(~single).flatten().tolist():
        b, end = int(first[j]), int(ctx[j])
        while b < end:
            e = min(end, (b // bs + 1) * bs)
            cut.append((j, b, e - b, int(row0[j]) + b - int(first[j])))
            b = e
    blocks.append(torch.tensor(cut, dtype=torch.int64).view(-1, 4))
    host, shapes = [tables], []
    for kind, qb in enumerate(blocks):
        if not len(qb):
            continue
        seq, s0, n = qb[:, 0], qb[:, 1], qb[:, 2]
        local_start = (s0 - window + 1).clamp(min=0)
        num_blocks = torch.div(local_start - sink, bs, rounding_mode="floor").clamp(min=0)
        mem_end = sink + num_blocks * bs
        len_sinks, len_rest = local_start.clamp(max=sink), (local_start - mem_end).clamp(min=0)
        host.append(torch.stack([s0, n, qb[:, 3], table_start[seq], local_start, num_blocks, mem_end, len_sinks,
                                 len_rest], 1))
        # real queries, then the widths: queries, memory keys, local keys, candidates
        sizes = (int(n.sum()), int(n.max()), int((len_sinks + len_rest).max()), int((s0 + n - local_start).max()),
                 int(num_blocks.max()))
        if kind == 0:
            scoring = int(num_blocks.sum())  # pairs
        else:  # per sequence: its query blocks (consecutive) and its last block's candidates (the most)
            ends = (torch.nonzero(torch.diff(seq, append=torch.tensor([-1]))).flatten() + 1).tolist()
            scoring = [(a, b, int(num_blocks[b - 1])) for a, b in zip([0, *ends[:-1]], ends, strict=True)
                       if num_blocks[b - 1] > 0]
        shapes.append((kind, sizes, scoring))
    # Memory blocks whose last token (sink + (c+1) * bs - 1) is written this step: c + 1 in [lo, hi].
    lo = torch.div(first - sink + 1 + bs - 1, bs, rounding_mode="floor").clamp(min=1)
    hi = torch.div(ctx - sink, bs, rounding_mode="floor")
    count = (hi - lo + 1).clamp(min=0)
    owner = torch.repeat_interleave(torch.arange(len(ctx)), count)
    c = torch.arange(int(count.sum())) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    c = c + lo[owner] - 1
    host += [c, table_start[owner]]
    on_device = upload_ints(torch.device(device), *host)
    tables_d, rest = on_device[0], on_device[1:]
    groups = [_expand(rest.pop(0), shape, tables_d, spec, kv) for shape in shapes]
    c_d, start_d = rest
    upos = sink + c_d[:, None] * bs + torch.arange(bs, device=c_d.device)  # (U, bs)
    return MemoryStep(tables_d, groups, _slots(tables_d, start_d, upos, kv), upos,
                      _last_blocks(tables_d, start_d, c_d, spec, kv), kv)


def _slots(tables: torch.Tensor, start: torch.Tensor, pos: torch.Tensor, kv: int) -> torch.Tensor:
    """Pool slots of positions pos (Q, W) of the sequences whose tables start at start (Q,)."""
    return tables[start[:, None] + pos // kv] * kv + pos % kv


def _expand(scalars: torch.Tensor, shape: tuple, tables: torch.Tensor, spec: AttentionConfig,
            kv: int) -> QueryBlocks:
    """Per-block numbers (Q, 9) on the device -> the padded slots, positions and masks of those query blocks."""
    s0, n, row0, start, local_start, num_blocks, mem_end, len_sinks, len_rest = scalars.unbind(1)
    kind, (num_real, width_q, width_m, width_l, max_blocks), scoring = shape
    dev = scalars.device
    col = torch.arange(width_q, device=dev)[None]
    clamped = torch.minimum(col, (n - 1)[:, None])  # (Q, n)
    valid = col < n[:, None]
    first = torch.repeat_interleave(torch.arange(len(n), device=dev) * width_q - torch.cumsum(n, 0) + n, n,
                                    output_size=num_real)
    real = first + torch.arange(num_real, device=dev)
    # Memory keys: sinks, then the remainder; padding points at the block's first query (always written).
    col = torch.arange(width_m, device=dev)[None]
    mem_pos = torch.where(col < len_sinks[:, None], col, mem_end[:, None] + col - len_sinks[:, None])
    mem_mask = col < (len_sinks + len_rest)[:, None]
    mem_pos = torch.where(mem_mask, mem_pos, s0[:, None])
    col = torch.arange(width_l, device=dev)[None]
    local_pos = local_start[:, None] + col  # (Q, L)
    local_valid = local_pos < (s0 + n)[:, None]
    local_pos = torch.where(local_valid, local_pos, s0[:, None])
    query_pos = s0[:, None] + clamped  # (Q, n)
    local_mask = local_valid[:, None, :] & (local_pos[:, None, :] <= query_pos[:, :, None])
    blocks = QueryBlocks(
        rows=row0[:, None] + clamped, valid=valid, real=real, frame=s0 - spec.local_window,
        rotate_query=spec.local_window - s0,
        memory_slots=_slots(tables, start, mem_pos, kv), memory_pos=mem_pos, memory_mask=mem_mask,
        local_slots=_slots(tables, start, local_pos, kv), local_mask=local_mask, table_start=start,
        num_blocks=num_blocks, max_blocks=max_blocks)
    blocks.out_rows = blocks.rows.flatten()[real]
    if kind == 0:
        pairs = scoring
        qb = torch.repeat_interleave(torch.arange(len(s0), device=dev), num_blocks, output_size=pairs)
        offset = torch.repeat_interleave(torch.cumsum(num_blocks, 0) - num_blocks, num_blocks, output_size=pairs)
        blocks.pair_qb, blocks.pair_col = qb, torch.arange(pairs, device=dev) - offset
        blocks.pair_block = _last_blocks(tables, start[qb], blocks.pair_col, spec, kv)
    else:
        blocks.sets = [(a, b, _last_blocks(tables, start[a], torch.arange(count, device=dev), spec, kv))
                       for a, b, count in scoring]
    return blocks


def _last_blocks(tables: torch.Tensor, start: torch.Tensor, c: torch.Tensor, spec: AttentionConfig,
                 kv: int) -> torch.Tensor:
    """The pool block holding the last token of memory block c (where its mean key is kept)."""
    return tables[start + (spec.sink_tokens + (c + 1) * spec.block_size - 1) // kv]
