"""Paged decode attention in Triton: every sequence has one new query and reads its K/V where it lies in the pool.

The reference path (`attention.paged._decode_gather`) first copies every sequence's context out of the pool into a
padded (B, T) batch, then runs SDPA over it: three passes over the KV cache per layer per step. This kernel reads
each key once, in place, through the block table (the idea of vLLM's PagedAttention), with all query heads of one
GQA group in one program so a KV head is loaded once for its `group` query heads. Long contexts with few sequences
split the keys over several programs and merge their partial softmaxes afterwards (flash-decoding, Dao et al. 2023).
An FP8 pool (attention/kv_fp8.py) is read as e4m3 and widened to q's dtype in registers; its K scale joins the
softmax scale and its V scale the output, so no element is multiplied by a scale.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per tile


@triton.jit
def _paged_decode_kernel(
    Q, K, V, Tables, Lens, Out, Lse, Scales,
    stride_qb, stride_qh, stride_tb, stride_ob, stride_oh, stride_os,
    scale_log2, window,
    H_KV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, FP8_KV: tl.constexpr,
):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    v_scale = 1.0
    if FP8_KV:  # read on the device: a captured graph sees scales set after its capture
        scale_log2 = scale_log2 * tl.load(Scales)
        v_scale = tl.load(Scales + 1)
    ctx = tl.load(Lens + b)
    lo = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    # This program's share of the tiles that hold keys in [lo, ctx).
    first, last = lo // BLOCK_N, tl.cdiv(ctx, BLOCK_N)
    per = tl.cdiv(last - first, NUM_SPLITS)
    t0 = first + split * per
    t1 = tl.minimum(t0 + per, last)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    heads = kvh * GROUP + g  # query head h uses KV head h // GROUP (HF's repeat_kv)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], -1e30, tl.float32)  # finite: a split with no keys must not compute -inf - -inf
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for t in range(t0, t1):
        pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = (pos < ctx) & (pos >= lo)
        block = tl.load(Tables + b * stride_tb + pos // BS, mask=valid, other=0)
        slot = block.to(tl.int64) * BS + pos % BS  # pool row of each key: (BLOCK_N,)
        kv_off = slot[:, None] * (H_KV * D) + kvh * D + d[None, :]
        k = tl.load(K + kv_off, mask=valid[:, None], other=0.0).to(q.dtype)  # (BLOCK_N, D)
        s = tl.dot(q, tl.trans(k)) * scale_log2  # (GROUP_PAD, BLOCK_N), log2 units
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off, mask=valid[:, None], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    empty = l_i == 0.0
    if FP8_KV:
        out = acc * (v_scale / tl.where(empty, 1.0, l_i))[:, None]
    else:
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptr = Out + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=(g < GROUP)[:, None])
    if NUM_SPLITS > 1:
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))  # log2-sum-exp2
        tl.store(Lse + (b * (H_KV * GROUP) + heads) * NUM_SPLITS + split, lse, mask=g < GROUP)


@triton.jit
def _merge_splits_kernel(Part, Lse, Out, stride_pb, stride_ph, stride_ob, stride_oh, H: tl.constexpr,
                         D: tl.constexpr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
    # One program per (sequence, head): weights 2^(lse_s - max) (log2 units), normalised over the splits.
    b, h = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D)
    lse = tl.load(Lse + (b * H + h) * SPLITS + s, mask=s < SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(s < SPLITS, tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m)), 0.0)  # empty splits weigh 0
    part = tl.load(Part + b * stride_pb + h * stride_ph + s[:, None] * D + d[None, :], mask=(s < SPLITS)[:, None],
                   other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + b * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty))


LONG_SPLITS = 16  # parts a context that dominates the step is cut into, at least
LONG_KEYS = LONG_SPLITS * 4 * BLOCK_N  # shorter contexts are never split for that reason


def num_splits(batch: int, num_kv_heads: int, max_keys: int, num_sms: int, lens: list[int] | None = None) -> int:
    """Split the keys only when (sequence, KV head) programs alone would leave most SMs idle, and never below a
    few tiles per split: a split's fixed cost is one extra partial output and its share of the merge. `lens`, the
    step's context lengths where known: a long context beside short ones is split too (see `dominated`)."""
    programs = batch * num_kv_heads
    base = 1 if programs >= num_sms else max(1, min(triton.cdiv(2 * num_sms, programs),
                                                    triton.cdiv(max_keys, 4 * BLOCK_N), 32))
    return max(base, LONG_SPLITS) if lens is not None and dominated(lens, num_kv_heads, num_sms) else base


def dominated(lens: list[int], num_kv_heads: int, num_sms: int) -> bool:
    """Whether the longest context, read unsplit by one program per KV head, would take over twice as long as the
    whole step balanced over every SM (a 128K context decoding beside short chats): its programs set the step's
    time while the other SMs idle."""
    longest = max(lens)
    return longest >= LONG_KEYS and longest * num_sms > 2 * sum(lens) * num_kv_heads


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, block_size: int, window: int | None = None,
                 splits: int = 1, scales: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, D), pools (num_slots, H_kv, D), tables (B, W) int32, lens (B,) int32 -> (B, H, D).

    `splits` must be fixed for a captured CUDA graph, so the caller picks it from the graph's static shape.
    `scales` (2,) float32 on the device: K's and V's of FP8 pools (None: pools in q's dtype).
    """
    B, H, D = q.shape
    H_kv = k_pool.shape[1]
    group = H // H_kv
    assert k_pool.stride(-1) == 1 and k_pool.stride(0) == H_kv * D and q.stride(-1) == 1
    scale_log2 = (1.0 / math.sqrt(D)) * 1.4426950408889634  # softmax(x / sqrt(D)) computed with exp2
    grid = (B, H_kv, splits)
    if splits == 1:
        out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
        lse, stride_os = out, 0  # Lse is never written with one split
    else:
        out = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
        stride_os = out.stride(2)
    fp8 = scales is not None
    assert fp8 == (k_pool.dtype == torch.float8_e4m3fn)
    _paged_decode_kernel[grid](
        q, k_pool, v_pool, tables, lens, out, lse, scales if fp8 else lens,
        q.stride(0), q.stride(1), tables.stride(0), out.stride(0), out.stride(1), stride_os,
        scale_log2, window or 0,
        H_KV=H_kv, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=D, BS=block_size,
        BLOCK_N=BLOCK_N, NUM_SPLITS=splits, FP8_KV=fp8,
    )
    if splits == 1:
        return out
    # Merge the partial softmaxes in one launch (as torch ops it was six kernels a layer, a tenth of a batch-1
    # decode step's non-matmul time).
    merged = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    _merge_splits_kernel[(B, H)](out, lse, merged, out.stride(0), out.stride(1), merged.stride(0), merged.stride(1),
                                 H=H, D=D, SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits))
    return merged
