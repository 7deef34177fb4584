"""Attention over a paged KV pool: the serving engine's flat, variable-length batches.

The pool of one layer is (num_slots, H_kv, D) with num_slots = num_blocks * block_size; a token's K/V lives at
slot block_table[i // block_size] * block_size + i % block_size. A step's batch is all scheduled sequences'
new tokens back to back, (1, N); sequence j owns queries cu_q[j]:cu_q[j+1] and has context_lens[j] tokens of
K/V after this step's writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from longseq.attention.host_copy import upload_ints
from longseq.attention.kv_fp8 import FP8, dequantize_kv, quantize_kv
from longseq.attention.sdpa import attention
from longseq.attention.varlen import Chunks, chunk_attention

# Not cuDNN for the masked decode: it builds an execution plan per (batch, length) shape on the host (~3 ms, measured
# on an H100), and the batch size changes whenever a request joins or leaves.
_MASKED_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# Decode key lengths are rounded up to this: repeated shapes let SDPA backends (cuDNN builds an execution plan per
# shape, ~3 ms on the host) reuse their plans instead of rebuilding them every step.
DECODE_BUCKET = 64


@dataclass
class PagedBatch:
    slot_mapping: torch.Tensor  # (N,) pool slot of each new token
    query_lens: list[int]  # per sequence
    context_lens: list[int]  # per sequence, after this step
    block_tables: torch.Tensor  # (B, max_blocks) on the host, zero-padded
    block_size: int
    device: torch.device
    # The sequences with one new token (decodes, and prompts down to their last token) attend through the decode
    # path; on the device, static in shape so a CUDA graph can hold them:
    decode_tables: torch.Tensor | None = None  # (B_dec, W) int32 block tables, W * block_size >= longest context
    decode_lens: torch.Tensor | None = None  # (B_dec,) int32 context lengths
    decode_rows: torch.Tensor | None = None  # (B_dec,) their query rows in a mixed batch; None: every row
    splits: int = 1  # key splits of the decode kernel (fixed per captured graph)
    chunks: Chunks | None = None  # the sequences with more than one new token (prompt chunks), packed
    _context_slots: list[torch.Tensor] | None = None

    @property
    def context_slots(self) -> list[torch.Tensor]:
        """Per sequence, the (context_len,) slots of its whole context in order (built on first use)."""
        if self._context_slots is None:
            bs, out = self.block_size, []
            for j, ctx in enumerate(self.context_lens):
                pos = torch.arange(ctx)
                out.append((self.block_tables[j, pos // bs] * bs + pos % bs).to(self.device))
            self._context_slots = out
        return self._context_slots

    @classmethod
    def build(cls, block_tables: list[list[int]], query_lens: list[int], context_lens: list[int], block_size: int,
              device: torch.device, num_kv_heads: int = 1, slots_only: bool = False) -> PagedBatch:
        """`slots_only`: just where the new K/V go (block_tables then stays empty), for an attention that plans its
        own reads (memory attention: attention/paged_memory_plan.py); host work grows with the new tokens only, not
        with the contexts."""
        # A handful of vectorized host ops and a few copies to the device, whatever the batch size: per-sequence
        # tensors here cost more host time than the whole decode step's GPU time.
        B, bs, dev = len(query_lens), block_size, torch.device(device)
        ctx, q_lens = torch.tensor(context_lens), torch.tensor(query_lens)
        seq = torch.repeat_interleave(torch.arange(B), q_lens)  # (N,) owning sequence of each new token
        first = torch.repeat_interleave(torch.cumsum(q_lens, 0) - q_lens, q_lens)
        pos = (ctx - q_lens)[seq] + torch.arange(int(q_lens.sum())) - first  # (N,) position within its sequence
        if slots_only:  # the blocks the new tokens fall in, each table from its first such block
            lo = [(c - n) // bs for n, c in zip(query_lens, context_lens, strict=True)]
            tail = [t[a : (c - 1) // bs + 1] for t, a, c in zip(block_tables, lo, context_lens, strict=True)]
            tables = pad_tables(tail, max(len(t) for t in tail))
            (slots,) = upload_ints(dev, tables[seq, pos // bs - torch.tensor(lo)[seq]] * bs + pos % bs)
            return cls(slots, query_lens, context_lens, tables[:, :0], bs, dev)
        tables = pad_tables(block_tables, max(len(t) for t in block_tables))
        host = [tables[seq, pos // bs] * bs + pos % bs]  # every index tensor of the step goes over in one copy
        chunks = Chunks.host(tables, q_lens, ctx, bs)
        if chunks is not None:
            host += chunks[:4]
        single = (q_lens == 1).nonzero().flatten()  # (B_dec,) sequences with one new token
        if len(single):
            keys = -(-int(ctx[single].max()) // DECODE_BUCKET) * DECODE_BUCKET
            width = -(-keys // bs)
            host += [F.pad(tables[single, :width], (0, max(0, width - tables.shape[1]))), ctx[single]]
            if len(single) < B:
                host.append((torch.cumsum(q_lens, 0) - 1)[single])
        on_device = upload_ints(dev, *host)
        batch = cls(on_device[0], query_lens, context_lens, tables, bs, dev)
        if chunks is not None:
            batch.chunks = Chunks.from_device(on_device[1:5], *chunks[4:])
        if len(single):
            decode = on_device[5 if chunks is not None else 1:]
            batch.decode_tables, batch.decode_lens = decode[0].to(torch.int32), decode[1].to(torch.int32)
            if len(single) < B:
                batch.decode_rows = decode[2]
            batch.splits = decode_splits(len(single), num_kv_heads, keys, dev, ctx[single].tolist())
        return batch


def pad_tables(block_tables: list[list[int]], width: int) -> torch.Tensor:
    """(B, width) int64 host tensor of the block tables, zero-padded (entries past a context are never read)."""
    return torch.tensor([t[:width] + [0] * (width - len(t)) for t in block_tables], dtype=torch.int64)


def last_slots(tables: torch.Tensor, ctx: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B,) pool slot of each sequence's newest token (position ctx - 1)."""
    last = ctx - 1
    return tables[torch.arange(tables.shape[0]), last // block_size] * block_size + last % block_size


def decode_splits(batch: int, num_kv_heads: int, keys: int, device: torch.device,
                  lens: list[int] | None = None) -> int:
    """Key splits of the decode kernel for `batch` sequences of at most `keys` keys (and these context lengths,
    where known)."""
    if device.type != "cuda":
        return 1
    from longseq.attention.kernels.paged_decode import num_splits

    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return num_splits(batch, num_kv_heads, keys, sms, lens)


def paged_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, batch: PagedBatch, window: int | None = None,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (1, H, N, D) -> (1, H, N, D). New K/V must already be written into the pools. `scales` (2,) float32: the
    K and V scales of FP8 pools (attention/kv_fp8.py), None for pools in q's dtype."""
    if batch.chunks is None:
        return decode_attention(q, k_pool, v_pool, batch, window, scales)
    if batch.decode_tables is None:
        return chunk_attention(q, k_pool, v_pool, batch.chunks, window, scales)
    # A mixed step: the single-token rows in one decode call, the prompt chunks in one variable-length call.
    out = torch.empty_like(q)
    out[:, :, batch.decode_rows] = decode_attention(q[:, :, batch.decode_rows], k_pool, v_pool, batch, window,
                                                    scales)
    rows = batch.chunks.rows
    out[:, :, rows] = chunk_attention(q[:, :, rows], k_pool, v_pool, batch.chunks, window, scales)
    return out


def decode_attention(q, k_pool, v_pool, batch: PagedBatch, window: int | None,
                     scales: torch.Tensor | None = None) -> torch.Tensor:
    """One query per decode sequence, q (1, H, B_dec, D): the Triton kernel on a GPU, the gather path elsewhere."""
    if use_decode_kernel(q.device, q.shape[-1]):
        from longseq.attention.kernels.paged_decode import paged_decode

        out = paged_decode(q[0].transpose(0, 1), k_pool, v_pool, batch.decode_tables, batch.decode_lens,
                           batch.block_size, window, batch.splits, scales)  # (B_dec, H, D)
        return out.transpose(0, 1).unsqueeze(0)
    return gather_decode(q, k_pool, v_pool, batch, window, scales)


def use_decode_kernel(device: torch.device, head_dim: int) -> bool:
    """The Triton kernel needs a GPU and a power-of-two head size (tl.arange); otherwise decode takes the gather
    path. LONGSEQ_PAGED_KERNEL=0 forces the gather path (to compare the two)."""
    D = head_dim
    return (torch.device(device).type == "cuda" and D >= 16 and D & (D - 1) == 0
            and os.environ.get("LONGSEQ_PAGED_KERNEL", "1") != "0")


def reference_paged_attention(q, k_pool, v_pool, batch: PagedBatch, window: int | None = None,
                              scales: torch.Tensor | None = None) -> torch.Tensor:
    """One contiguous attention per sequence over its gathered context: the reference path."""
    outs, start = [], 0
    for q_len, ctx, slots in zip(batch.query_lens, batch.context_lens, batch.context_slots, strict=True):
        outs.append(_attend_context(q[:, :, start : start + q_len], k_pool, v_pool, slots, ctx, window, scales))
        start += q_len
    return torch.cat(outs, dim=2)


def _attend_context(q, k_pool, v_pool, slots, ctx: int, window: int | None, scales=None) -> torch.Tensor:
    k, v = _gather(k_pool, v_pool, slots, scales, q.dtype)
    k = k.transpose(0, 1).unsqueeze(0)  # (1, H_kv, ctx, D)
    v = v.transpose(0, 1).unsqueeze(0)
    return attention(q, k, v, q_start=ctx - q.shape[2], window=window)


def _gather(k_pool, v_pool, slots, scales, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool rows at `slots`, dequantized to `dtype` from an FP8 pool."""
    if scales is None:
        return k_pool[slots], v_pool[slots]
    return dequantize_kv(k_pool[slots], scales[0], dtype), dequantize_kv(v_pool[slots], scales[1], dtype)


def decode_slots(tables: torch.Tensor, lens: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) context slots and (B, T) key mask of a decode batch, T = tables' width * block_size.

    Padding repeats each sequence's own last slot, never another request's: masked keys still enter the weighted
    sum with weight 0, and 0 * NaN left in someone else's block would be NaN.
    """
    B, bs = tables.shape[0], block_size
    T = tables.shape[1] * bs
    cols = torch.arange(T, device=tables.device)
    pos = torch.minimum(cols.expand(B, T), (lens.long() - 1).unsqueeze(1))  # (B, T)
    slots = tables.long().gather(1, pos // bs) * bs + pos % bs
    return slots, cols.unsqueeze(0) < lens.unsqueeze(1)


def gather_decode(q, k_pool, v_pool, batch: PagedBatch, window: int | None,
                  scales: torch.Tensor | None = None) -> torch.Tensor:
    """Decode without the kernel: gather all contexts padded to the longest, one batched SDPA with a key mask."""
    slots, mask = decode_slots(batch.decode_tables, batch.decode_lens, batch.block_size)
    B, T = slots.shape
    H, num_kv_heads = q.shape[1], k_pool.shape[1]
    k, v = _gather(k_pool, v_pool, slots, scales, q.dtype)
    k = k.transpose(1, 2)  # (B, H_kv, T, D)
    v = v.transpose(1, 2)
    if window is not None:
        mask = mask & (torch.arange(T, device=mask.device) >= batch.decode_lens.unsqueeze(1) - window)
    # GQA without copying K/V per query head: the group of query heads sharing a KV head (head h uses KV head
    # h // group, as HF's repeat_kv) stands in for the query-length dimension of one attention per KV head.
    D = q.shape[-1]
    qb = q[0].transpose(0, 1).reshape(B, num_kv_heads, H // num_kv_heads, D)  # (B, H_kv, group, D)
    with sdpa_kernel(_MASKED_BACKENDS):
        out = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask[:, None, None, :])  # (B, H_kv, group, D)
    return out.reshape(B, H, D).transpose(0, 1).unsqueeze(0)  # (1, H, B, D)


class PagedKVCache:
    """The engine's KV pool as the model sees it: `attention(layer, q, k, v, window)` writes this step's K/V into
    the pool, then attends over each sequence's context. A float8_e4m3fn `dtype` makes an FP8 pool with a K and a
    V scale per layer (`scales` (L, 2) float32 on the device, 1.0 until set; attention/kv_fp8.py)."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (num_slots, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_kv_heads = num_kv_heads
        self.batch: PagedBatch | None = None
        self.write_kernel = use_decode_kernel(device, head_dim)  # one Triton launch writes K and V
        self.scales = torch.ones(num_layers, 2, device=device) if dtype == FP8 else None

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  window: int | None) -> torch.Tensor:
        """q (1, H, N, D), k/v (1, H_kv, N, D) for this step's N new tokens."""
        scales = self.write(layer_idx, k, v)
        return paged_attention(q, self.k[layer_idx], self.v[layer_idx], self.batch, window, scales)

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """Store k/v (1, H_kv, N, D) at the step's slots; returns the layer's FP8 scales (None: no FP8 pool)."""
        slots = self.batch.slot_mapping
        k, v = k[0].transpose(0, 1), v[0].transpose(0, 1)  # (N, H_kv, D)
        scales = None if self.scales is None else self.scales[layer_idx]  # (2,): K's and V's
        if self.write_kernel and (k.dtype == self.k[layer_idx].dtype or scales is not None):
            from longseq.attention.kernels.kv_write import write_kv

            write_kv(self.k[layer_idx], self.v[layer_idx], k, v, slots, scales)
        else:
            if scales is not None:
                k, v = quantize_kv(k, scales[0]), quantize_kv(v, scales[1])
            self.k[layer_idx][slots] = k
            self.v[layer_idx][slots] = v
        return scales
