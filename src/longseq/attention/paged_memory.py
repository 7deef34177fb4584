"""Memory attention (InfLLM, Xiao et al. 2024, arXiv 2402.04617; attention/memory.py) over the engine's paged KV pool.

The pool holds every token's K rotated at its true position, as plain serving does, so the K/V write path, prefix
caching and the block manager are unchanged; positions run past the model's context. Beside the pool each layer
keeps a mean key per memory block (its un-rotated keys averaged, float32, (pool blocks + 1, H_kv, D)), filled in the
step that writes the block's last token. For each query block of a step (attention/paged_memory_plan.py) a layer
- scores the memory blocks that have left the window: the block's mean query moved into the memory's frame, times
  each mean key, summed over heads (attention/memory.py's block_scores), and takes the top `retrieved_blocks`;
- gathers from the pool [sinks beyond the window, remainder, retrieved blocks, local keys] and rotates each memory
  key from its true position t to s0 - window (by s0 - window - t, angles in float64): RoPE scores depend only on
  position differences, so query s0 + i sees memory at distance window + i and local key t at s0 + i - t, exactly
  the distances of generate's frame (queries at window + i, memory at 0);
- runs one masked SDPA per group of query blocks (single tokens; blocks cut from prompt chunks).
A decode token thus reads sinks + retrieved_blocks * block_size + remainder (< block_size) + window keys and one mean
key per memory block, however long its context. Runs eager (no CUDA graphs): the key widths change with the step.
The slow reference is `generate`'s memory cache (generation/memory_cache.py, tested against the dense
reference_memory_attention): tests/engine/test_memory_engine.py compares the engine's tokens and log-probabilities
with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from longseq.attention.kv_fp8 import dequantize_kv
from longseq.attention.memory import select_blocks
from longseq.attention.paged import PagedKVCache
from longseq.attention.paged_memory_plan import MemoryStep, QueryBlocks
from longseq.config import AttentionConfig

_MASKED_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # as paged.gather_decode's


class PagedMemoryKVCache(PagedKVCache):
    """The engine's KV pool under memory attention: `set_plan` gives it each step's MemoryStep, as `batch` its
    PagedBatch (built with slots_only: the new K/V are written as in plain serving)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, spec: AttentionConfig, inv_freq: torch.Tensor | None,
                 work_dtype: torch.dtype = torch.float32):
        """num_blocks: the pool blocks the block manager hands out (the pool has one more, the scratch block);
        inv_freq (D/2,): the model's RoPE frequencies (None: no RoPE, keys are never moved); work_dtype: what keys
        are rotated in (the model's dtype, at least float32)."""
        super().__init__(num_layers, (num_blocks + 1) * block_size, num_kv_heads, head_dim, dtype, device)
        self.spec, self.work_dtype = spec, work_dtype
        self.inv_freq = None if inv_freq is None else inv_freq.double().to(device)
        self.means = [torch.zeros(num_blocks + 1, num_kv_heads, head_dim, device=device) for _ in range(num_layers)]
        self.plan: MemoryStep | None = None

    def set_plan(self, plan: MemoryStep) -> None:
        """The step's plan, with the rotations every layer shares worked out once (float64 angles)."""
        self.plan = plan
        if self.inv_freq is None:
            return
        inv_freq, work = self.inv_freq, self.work_dtype
        plan.inv_freq = inv_freq
        plan.update_rot = angles(-plan.update_pos[..., None], inv_freq, torch.float32)  # (U, bs, 1, D/2)
        plan.offset_rot = angles(-torch.arange(self.spec.block_size, device=inv_freq.device), inv_freq, work)
        for blocks in plan.groups:
            blocks.memory_rot = angles((blocks.frame[:, None] - blocks.memory_pos)[..., None], inv_freq, work)
            blocks.query_rot = angles(blocks.rotate_query[:, None], inv_freq, torch.float32)  # (Q, 1, D/2)

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  window: int | None) -> torch.Tensor:
        """q (1, H, N, D), k/v (1, H_kv, N, D) of this step's N new tokens -> (1, H, N, D). `window`: the layer's
        own sliding window, None under memory attention."""
        scales = self.write(layer_idx, k, v)
        pool_k, pool_v, means = self.k[layer_idx], self.v[layer_idx], self.means[layer_idx]
        plan = self.plan
        if len(plan.update_block):  # before scoring: a long chunk retrieves blocks it completed itself
            keys = _gather(pool_k, plan.update_slots, scales, 0, torch.float32)  # (U, bs, H_kv, D)
            if plan.update_rot is not None:
                keys = rotate_with(keys, *plan.update_rot)
            means[plan.update_block] = keys.mean(1)
        out = torch.empty_like(q)
        for blocks in plan.groups:
            got = attend_blocks(q, pool_k, pool_v, means, blocks, self.spec, scales, plan)
            out[0, :, blocks.out_rows] = got.flatten(0, 1)[blocks.real].transpose(0, 1)
        return out


def angles(shift: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (..., D/2) in `dtype` of shift (...) positions, computed in float64."""
    angle = shift.double()[..., None] * inv_freq  # (..., D/2)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def rotate_with(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., D) rotated by the angles of cos, sin (..., D/2) (broadcast), in their dtype, back in x's."""
    x1, x2 = x.to(cos.dtype).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _gather(pool: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor | None, which: int,
            dtype: torch.dtype) -> torch.Tensor:
    """Pool rows at slots (...,) -> (..., H_kv, D) in `dtype`, dequantized from an FP8 pool."""
    rows = pool[slots]
    return rows.to(dtype) if scales is None else dequantize_kv(rows, scales[which], dtype)


def retrieve(q: torch.Tensor, means: torch.Tensor, blocks: QueryBlocks,
             spec: AttentionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """q (Q, H, n, D) at true positions -> the memory blocks each query block reads (Q, k), ascending, and whether
    each is one (Q, k) bool (a block with fewer than k candidates pads with nothing)."""
    Q, H, _, D = q.shape
    num_kv_heads = means.shape[1]
    valid = blocks.valid[:, None, :, None]
    q_mean = (q.float() * valid).sum(2) / blocks.valid.sum(1)[:, None, None]  # (Q, H, D)
    if blocks.query_rot is not None:  # queries at window + i, memory at 0
        q_mean = rotate_with(q_mean, *blocks.query_rot)
    q_mean = q_mean.view(Q, num_kv_heads, H // num_kv_heads, D).sum(2)  # (Q, H_kv, D): heads share their KV's key
    scores = q_mean.new_full((Q, blocks.max_blocks), float("-inf"))
    if blocks.pair_qb is not None:
        flat = torch.einsum("phd,phd->p", q_mean[blocks.pair_qb], means[blocks.pair_block])
        scores[blocks.pair_qb, blocks.pair_col] = flat
    else:
        for a, b, cand in blocks.sets:  # one sequence's query blocks share its candidates
            s = q_mean[a:b].flatten(1) @ means[cand].flatten(1).T  # (b - a, N)
            late = torch.arange(len(cand), device=s.device)[None] >= blocks.num_blocks[a:b, None]
            scores[a:b, : len(cand)] = s.masked_fill(late, float("-inf"))
    top = select_blocks(scores, spec.retrieved_blocks)
    return top, scores.gather(1, top) > float("-inf")


def attend_blocks(q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, means: torch.Tensor,
                  blocks: QueryBlocks, spec: AttentionConfig, scales: torch.Tensor | None,
                  plan: MemoryStep) -> torch.Tensor:
    """The step's queries q (1, H, N, D) -> those of `blocks`, (Q, n, H, D) (padded query rows included)."""
    H, D = q.shape[1], q.shape[3]
    num_kv_heads = pool_k.shape[1]
    qb = q[0][:, blocks.rows].transpose(0, 1)  # (Q, H, n, D)
    Q, _, n, _ = qb.shape
    dtype = qb.dtype
    # Memory keys, moved from their true positions to the block's frame: sinks beyond the window and remainder...
    keys = [_gather(pool_k, blocks.memory_slots, scales, 0, dtype)]  # (Q, M, H_kv, D)
    if blocks.memory_rot is not None:
        keys[0] = rotate_with(keys[0], *blocks.memory_rot)
    values, masks = [_gather(pool_v, blocks.memory_slots, scales, 1, dtype)], [blocks.memory_mask]
    if blocks.max_blocks and spec.retrieved_blocks:  # ... then the retrieved blocks
        top, found = retrieve(qb, means, blocks, spec)  # (Q, k)
        bs, kv = spec.block_size, plan.kv_block_size
        start = spec.sink_tokens + top * bs  # (Q, k) each block's first position
        pos = torch.where(found[..., None], start[..., None] + torch.arange(bs, device=top.device),
                          (blocks.frame + spec.local_window)[:, None, None]).flatten(1)  # (Q, k * bs)
        slots = plan.tables[blocks.table_start[:, None] + pos // kv] * kv + pos % kv
        k_ret = _gather(pool_k, slots, scales, 0, dtype)  # (Q, k * bs, H_kv, D)
        if plan.offset_rot is not None:
            # Token start + j moves by (frame - start) - j: float64 angles once per block, composed with the
            # step's table over j, rather than per token.
            cos_j, sin_j = plan.offset_rot  # (bs, D/2)
            cos_b, sin_b = angles(blocks.frame[:, None] - start, plan.inv_freq, cos_j.dtype)  # (Q, k, D/2)
            cos = cos_b[:, :, None] * cos_j - sin_b[:, :, None] * sin_j  # (Q, k, bs, D/2)
            sin = sin_b[:, :, None] * cos_j + cos_b[:, :, None] * sin_j
            k_ret = rotate_with(k_ret, cos.flatten(1, 2)[:, :, None], sin.flatten(1, 2)[:, :, None])
        keys.append(k_ret)
        values.append(_gather(pool_v, slots, scales, 1, dtype))
        masks.append(found.repeat_interleave(bs, 1))
    keys.append(_gather(pool_k, blocks.local_slots, scales, 0, dtype))  # local keys at their true positions
    values.append(_gather(pool_v, blocks.local_slots, scales, 1, dtype))
    k, v = torch.cat(keys, 1).transpose(1, 2), torch.cat(values, 1).transpose(1, 2)  # (Q, H_kv, T, D)
    mask = torch.cat([torch.cat(masks, 1)[:, None, :].expand(Q, n, -1), blocks.local_mask], 2)  # (Q, n, T)
    # GQA without copying K/V per query head: a KV head's group of query heads (head h uses KV head h // group,
    # as HF's repeat_kv) stands in the query-length dimension, each with its query's mask.
    group = H // num_kv_heads
    qg = qb.reshape(Q, num_kv_heads, group * n, D)
    mask = mask[:, None, None].expand(Q, 1, group, n, mask.shape[2]).reshape(Q, 1, group * n, -1)
    with sdpa_kernel(_MASKED_BACKENDS):
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)  # (Q, H_kv, group * n, D)
    return out.reshape(Q, H, n, D).transpose(1, 2)  # (Q, n, H, D)


def keys_read(blocks: QueryBlocks, spec: AttentionConfig) -> int:
    """Keys gathered per query block of `blocks` (its padded width): memory keys, retrieved blocks, local keys."""
    retrieved = min(spec.retrieved_blocks, blocks.max_blocks) * spec.block_size
    return blocks.memory_slots.shape[1] + retrieved + blocks.local_slots.shape[1]
