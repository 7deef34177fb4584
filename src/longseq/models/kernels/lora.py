"""The batched LoRA delta of a fused projection in two Triton kernels, SGMV-style (Punica, arXiv 2310.18547):

- shrink: xa[t] = x[t] · a[slot(t)]ᵀ, (N, in) -> (N, n·R) in float32, every projection's rank slice at once;
- expand: y[t, cols] += xa[t, iR:(i+1)R] · b[slot(t), :, cols] for the projection i the column block belongs to.

Programs walk LoRABatch's row blocks (up to 16 tokens of one slot, gathered through the sorted order), so each
adapter's factors are read once per block of its tokens, not once per token; blocks holding no rows return at once.
The shrink splits K when the step has few row blocks (decode), its partial sums added with atomics into a zeroed
float32 buffer, so a handful of adapters still spreads over the GPU. Every launch has a grid fixed by N and the pool's
shape and reads the slots from device tensors: a CUDA graph replays it for any adapter mix. The reference is
models/lora_batched.lora_add_reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block_rows(ORDER, BLOCK_SLOT, BLOCK_START, blk, n_rows, BM: tl.constexpr):
    """Block `blk`'s adapter slot, its token rows (BM,) and which of them exist (the first n_rows)."""
    slot = tl.load(BLOCK_SLOT + blk).to(tl.int64)
    start = tl.load(BLOCK_START + blk)
    m = tl.arange(0, BM)
    m_mask = m < n_rows
    return slot, tl.load(ORDER + start + m, mask=m_mask, other=0).to(tl.int64), m_mask


@triton.jit
def _shrink_kernel(X, A, XA, ORDER, BLOCK_SLOT, BLOCK_START, BLOCK_ROWS, K, RT, K_PER_SPLIT,
                   stride_x, stride_as, stride_ar, stride_xa,
                   BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    blk, rb, ks = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_rows = tl.load(BLOCK_ROWS + blk)
    if n_rows > 0:
        slot, rows, m_mask = _block_rows(ORDER, BLOCK_SLOT, BLOCK_START, blk, n_rows, BM)
        r = rb * BR + tl.arange(0, BR)
        r_mask = r < RT
        a_rows = A + slot * stride_as + r[None, :] * stride_ar  # (1, BR): read transposed, (BK, BR)
        acc = tl.zeros((BM, BR), tl.float32)
        k_start = ks * K_PER_SPLIT
        for k0 in range(k_start, k_start + K_PER_SPLIT, BK):
            k = k0 + tl.arange(0, BK)
            k_mask = k < K
            x = tl.load(X + rows[:, None] * stride_x + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            a = tl.load(a_rows + k[:, None], mask=r_mask[None, :] & k_mask[:, None], other=0.0)
            if IEEE:
                acc += tl.dot(x, a, input_precision="ieee")
            else:
                acc += tl.dot(x, a)
        out = XA + rows[:, None] * stride_xa + r[None, :]
        tl.atomic_add(out, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_kernel(XA, B, Y, ORDER, BLOCK_SLOT, BLOCK_START, BLOCK_ROWS, N_OUT, R, OFF1, OFF2,
                   stride_xa, stride_bs, stride_br, stride_y,
                   BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr):
    blk, nb = tl.program_id(0), tl.program_id(1)
    n_rows = tl.load(BLOCK_ROWS + blk)
    if n_rows > 0:
        slot, rows, m_mask = _block_rows(ORDER, BLOCK_SLOT, BLOCK_START, blk, n_rows, BM)
        n0 = nb * BN
        cols = n0 + tl.arange(0, BN)
        c_mask = cols < N_OUT
        sub = (n0 >= OFF1).to(tl.int32) + (n0 >= OFF2).to(tl.int32)  # the projection of this column block
        r = tl.arange(0, BR)
        r_mask = r < R
        xa_mask = m_mask[:, None] & r_mask[None, :]
        xa = tl.load(XA + rows[:, None] * stride_xa + (sub * R + r)[None, :], mask=xa_mask, other=0.0)
        b_mask = r_mask[:, None] & c_mask[None, :]
        b = tl.load(B + slot * stride_bs + r[:, None] * stride_br + cols[None, :], mask=b_mask, other=0.0)
        if IEEE:
            delta = tl.dot(xa.to(b.dtype), b, input_precision="ieee")
        else:
            delta = tl.dot(xa.to(b.dtype), b)
        y_ptrs = Y + rows[:, None] * stride_y + cols[None, :]
        y_mask = m_mask[:, None] & c_mask[None, :]
        y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + delta).to(Y.dtype.element_ty), mask=y_mask)


def _split_k(num_blocks: int, rank_blocks: int, K: int, BK: int) -> int:
    """K splits so that a decode step's few row blocks still give ~512 programs (a power of two, >= 1 BK each)."""
    split = 1
    while num_blocks * rank_blocks * split < 512 and K // (2 * split) >= BK:
        split *= 2
    return split


def lora_shrink_expand(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch,
                       sizes: list[int], rank: int) -> None:
    """y (N, out) += LoRA deltas of x (N, in) by the slots of `batch` (a models.lora_batched.LoRABatch: its row
    blocks of at most batch.block_m tokens). a (S, n·R, in) and b (S, R, out) with unit stride on their last
    dimension (views into the pool's storage); at most 3 projections (q/k/v)."""
    N, K = x.shape
    S, RT, _ = a.shape
    n_out = y.shape[1]
    assert x.stride(1) == 1 and y.stride(1) == 1 and a.stride(2) == 1 and b.stride(2) == 1
    assert a.shape[2] == K and b.shape == (S, rank, n_out) and RT == len(sizes) * rank and len(sizes) <= 3
    assert x.dtype == a.dtype == b.dtype and sum(sizes) == n_out and batch.slots.numel() == N
    if N == 0:
        return
    num_blocks = batch.block_rows.numel()
    ieee = x.dtype == torch.float32
    # Shrink: (row blocks, rank blocks, K splits).
    BR = max(16, min(64, triton.next_power_of_2(RT)))
    BK = 64 if x.is_cuda else triton.next_power_of_2(min(K, 64))
    BK = max(16, BK)
    rank_blocks = triton.cdiv(RT, BR)
    split = _split_k(num_blocks, rank_blocks, K, BK) if x.is_cuda else 1
    k_per_split = triton.cdiv(triton.cdiv(K, split), BK) * BK
    xa = torch.zeros(N, RT, dtype=torch.float32, device=x.device)
    _shrink_kernel[(num_blocks, rank_blocks, split)](
        x, a, xa, batch.order, batch.block_slot, batch.block_start, batch.block_rows, K, RT, k_per_split,
        x.stride(0), a.stride(0), a.stride(1), xa.stride(0), BM=batch.block_m, BR=BR, BK=BK, IEEE=ieee)
    # Expand: (row blocks, column blocks), a column block inside one projection.
    bn = 16
    while bn < 128 and all(s % (2 * bn) == 0 for s in sizes):
        bn *= 2
    offsets = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    off1 = offsets[0] if len(sizes) > 1 else n_out
    off2 = offsets[1] if len(sizes) > 2 else n_out
    _expand_kernel[(num_blocks, triton.cdiv(n_out, bn))](
        xa, b, y, batch.order, batch.block_slot, batch.block_start, batch.block_rows, n_out, rank, off1, off2,
        xa.stride(0), b.stride(0), b.stride(1), y.stride(0),
        BM=batch.block_m, BN=bn, BR=max(16, triton.next_power_of_2(rank)), IEEE=ieee)
