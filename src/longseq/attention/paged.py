"""Attention over a paged KV pool: the serving engine's flat, variable-length batches.

The pool of one layer is (num_slots, H_kv, D) with num_slots = num_blocks * block_size; a token's K/V lives at
slot block_table[i // block_size] * block_size + i % block_size. A step's batch is all scheduled sequences'
new tokens back to back, (1, N); sequence j owns queries cu_q[j]:cu_q[j+1] and has context_lens[j] tokens of
K/V after this step's writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from longseq.attention.sdpa import attention

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
    decode_slots: torch.Tensor | None = None  # (B, T) padded slots when every query_len is 1
    decode_mask: torch.Tensor | None = None  # (B, T) True where a slot is part of the context
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
              device: torch.device) -> PagedBatch:
        # A handful of vectorized host ops and three copies to the device, whatever the batch size: per-sequence
        # tensors here cost more host time than the whole decode step's GPU time.
        B, bs = len(query_lens), block_size
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int64)  # (B, W)
        ctx, q_lens = torch.tensor(context_lens), torch.tensor(query_lens)
        if all(q == 1 for q in query_lens):
            T = -(-max(context_lens) // DECODE_BUCKET) * DECODE_BUCKET
            slots, mask, slot_mapping = decode_slots(tables, ctx, T, bs)
            return cls(slot_mapping.to(device), query_lens, context_lens, tables, bs, device,
                       decode_slots=slots.to(device), decode_mask=mask.to(device))
        seq = torch.repeat_interleave(torch.arange(B), q_lens)  # (N,) owning sequence of each new token
        first = torch.repeat_interleave(torch.cumsum(q_lens, 0) - q_lens, q_lens)
        pos = (ctx - q_lens)[seq] + torch.arange(int(q_lens.sum())) - first  # (N,) position within its sequence
        slot_mapping = tables[seq, pos // bs] * bs + pos % bs
        return cls(slot_mapping.to(device), query_lens, context_lens, tables, bs, device)


def decode_slots(tables: torch.Tensor, ctx: torch.Tensor, width: int, block_size: int):
    """Host tensors for a decode batch: (B, width) context slots, (B, width) key mask, (B,) slot of each new token.

    Padding repeats each sequence's own last slot, never another request's: masked keys still enter the weighted
    sum with weight 0, and 0 * NaN left in someone else's block would be NaN.
    """
    B, bs = ctx.shape[0], block_size
    pos = torch.minimum(torch.arange(width).expand(B, width), (ctx - 1).unsqueeze(1))  # (B, width)
    slots = tables.gather(1, pos // bs) * bs + pos % bs
    mask = torch.arange(width).unsqueeze(0) < ctx.unsqueeze(1)
    return slots, mask, slots[torch.arange(B), ctx - 1]


def paged_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, batch: PagedBatch, window: int | None = None
) -> torch.Tensor:
    """q (1, H, N, D) -> (1, H, N, D). New K/V must already be written into the pools."""
    if batch.decode_slots is not None:
        return _decode(q, k_pool, v_pool, batch, window)
    return reference_paged_attention(q, k_pool, v_pool, batch, window)


def reference_paged_attention(q, k_pool, v_pool, batch: PagedBatch, window: int | None = None) -> torch.Tensor:
    """One contiguous attention per sequence over its gathered context: the reference path (also used for
    prefill chunks, whose few long sequences make the loop cheap)."""
    outs, start = [], 0
    for q_len, ctx, slots in zip(batch.query_lens, batch.context_lens, batch.context_slots, strict=True):
        k = k_pool[slots].transpose(0, 1).unsqueeze(0)  # (1, H_kv, ctx, D)
        v = v_pool[slots].transpose(0, 1).unsqueeze(0)
        outs.append(attention(q[:, :, start : start + q_len], k, v, q_start=ctx - q_len, window=window))
        start += q_len
    return torch.cat(outs, dim=2)


def _decode(q, k_pool, v_pool, batch: PagedBatch, window: int | None) -> torch.Tensor:
    # Every sequence has one query: gather all contexts padded to the longest, one batched SDPA with a key mask.
    B, T = batch.decode_slots.shape
    H, num_kv_heads = q.shape[1], k_pool.shape[1]
    k = k_pool[batch.decode_slots].transpose(1, 2)  # (B, H_kv, T, D)
    v = v_pool[batch.decode_slots].transpose(1, 2)
    mask = batch.decode_mask
    if window is not None:
        lens = mask.sum(-1, keepdim=True)  # (B, 1)
        mask = mask & (torch.arange(T, device=mask.device) >= lens - window)
    # GQA without copying K/V per query head: the group of query heads sharing a KV head (head h uses KV head
    # h // group, as HF's repeat_kv) stands in for the query-length dimension of one attention per KV head.
    D = q.shape[-1]
    qb = q[0].transpose(0, 1).reshape(B, num_kv_heads, H // num_kv_heads, D)  # (B, H_kv, group, D)
    with sdpa_kernel(_MASKED_BACKENDS):
        out = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask[:, None, None, :])  # (B, H_kv, group, D)
    return out.reshape(B, H, D).transpose(0, 1).unsqueeze(0)  # (1, H, B, D)


class PagedKVCache:
    """The engine's KV pool as the model sees it: `attention(layer, q, k, v, window)` writes this step's K/V into
    the pool, then attends over each sequence's context."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (num_slots, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch: PagedBatch | None = None

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  window: int | None) -> torch.Tensor:
        """q (1, H, N, D), k/v (1, H_kv, N, D) for this step's N new tokens."""
        slots = self.batch.slot_mapping
        self.k[layer_idx][slots] = k[0].transpose(0, 1)  # (N, H_kv, D)
        self.v[layer_idx][slots] = v[0].transpose(0, 1)
        return paged_attention(q, self.k[layer_idx], self.v[layer_idx], self.batch, window)
