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

from longseq.attention.sdpa import attention


@dataclass
class PagedBatch:
    slot_mapping: torch.Tensor  # (N,) pool slot of each new token
    query_lens: list[int]  # per sequence
    context_lens: list[int]  # per sequence, after this step
    context_slots: list[torch.Tensor]  # per sequence: (context_len,) slots of its whole context, in order
    decode_slots: torch.Tensor | None = None  # (B, T_max) padded slots when every query_len is 1
    decode_mask: torch.Tensor | None = None  # (B, T_max) True where a slot is part of the context

    @classmethod
    def build(cls, block_tables: list[list[int]], query_lens: list[int], context_lens: list[int], block_size: int,
              device: torch.device) -> PagedBatch:
        context_slots, new_slots = [], []
        for table, q_len, ctx in zip(block_tables, query_lens, context_lens, strict=True):
            blocks = torch.tensor(table, dtype=torch.int64)
            pos = torch.arange(ctx, dtype=torch.int64)
            slots = blocks[pos // block_size] * block_size + pos % block_size  # (ctx,)
            context_slots.append(slots.to(device))
            new_slots.append(slots[ctx - q_len :])
        batch = cls(torch.cat(new_slots).to(device), query_lens, context_lens, context_slots)
        if all(q == 1 for q in query_lens):
            t_max = max(context_lens)
            padded = torch.empty(len(query_lens), t_max, dtype=torch.int64)
            for j, slots in enumerate(context_slots):
                # Pad with the sequence's own last slot, not slot 0: masked keys still enter the weighted sum with
                # weight 0, and a NaN left in another request's block would turn 0 * NaN into NaN here.
                slots = slots.cpu()
                padded[j] = slots[-1]
                padded[j, : len(slots)] = slots
            batch.decode_slots = padded.to(device)
            batch.decode_mask = torch.arange(t_max).expand(len(query_lens), t_max).to(device) < torch.tensor(
                context_lens, device=device
            ).unsqueeze(1)
        return batch


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
