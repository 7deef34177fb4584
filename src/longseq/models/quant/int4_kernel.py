"""Int4 weight-only matmul for few rows (decode) in Triton: y = x · dequantize(W)^T, W read as 4-bit nibbles.

Each program owns BLOCK_N output channels and 1/SPLIT_K of the input channels; it loads a (BLOCK_N, BLOCK_K / 2)
tile of packed bytes, splits the nibbles, applies the tile's group scale and zero in registers and feeds tl.dot with
the rows of x (padded to 16 for the tensor cores). A decode step has too few output tiles to fill the GPU, so the
input channels are split over SPLIT_K programs whose partial sums meet by atomic adds in float32 (split-K), as in
the int4 GEMV kernels of gpt-fast and vLLM's Marlin. Layout: models/quant/int4.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64
BLOCK_M = 16


@triton.jit
def _int4_mm_kernel(X, W, S, Z, Y, M, N, K, stride_xm, stride_ym, k_per_split,
                    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    ATOMIC: tl.constexpr):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=(rm < M)[:, None], other=0.0)  # (BM, BK)
        rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b = tl.load(W + rn64[:, None] * (K // 2) + rb[None, :], mask=(rn < N)[:, None], other=0)  # (BN, BK/2)
        q = tl.reshape(tl.join(b >> 4, b & 0xF), (BLOCK_N, BLOCK_K))  # k = 2j: high nibble, 2j + 1: low
        g = k0 // G  # BLOCK_K divides G: one group per tile
        s = tl.load(S + rn64 * (K // G) + g, mask=rn < N, other=0.0).to(tl.float32)
        z = tl.load(Z + rn64 * (K // G) + g, mask=rn < N, other=0.0).to(tl.float32)
        w = ((q.to(tl.float32) - z[:, None]) * s[:, None]).to(x.dtype)
        acc += tl.dot(x, tl.trans(w))
    y_ptr = Y + rm[:, None] * stride_ym + rn[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptr, acc, mask=mask)
    else:
        tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=mask)


def split_k(N: int, K: int, block_k: int, num_sms: int) -> int:
    """Input-channel splits so that about two programs run per SM, each over at least two tiles."""
    tiles_n = triton.cdiv(N, BLOCK_N)
    return max(1, min(triton.cdiv(2 * num_sms, tiles_n), K // (2 * block_k)))


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, splits: int | None = None) -> torch.Tensor:
    """x (M, K) 16-bit, qweight (N, K/2) uint8, scales / zeros (N, K/G) -> (M, N) in x's dtype."""
    M, K = x.shape
    N = qweight.shape[0]
    assert qweight.shape[1] * 2 == K and scales.shape == (N, K // group_size) and qweight.is_contiguous()
    if x.stride(-1) != 1:
        x = x.contiguous()
    block_k = min(group_size, 128)
    if splits is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 8
        splits = split_k(N, K, block_k, sms)
    k_per_split = triton.cdiv(K // block_k, splits) * block_k
    splits = triton.cdiv(K, k_per_split)
    atomic = splits > 1
    y = torch.zeros(M, N, dtype=torch.float32, device=x.device) if atomic else x.new_empty(M, N)
    grid = (triton.cdiv(N, BLOCK_N), splits, triton.cdiv(M, BLOCK_M))
    _int4_mm_kernel[grid](x, qweight, scales, zeros, y, M, N, K, x.stride(0), y.stride(0), k_per_split,
                          G=group_size, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=block_k, ATOMIC=atomic)
    return y.to(x.dtype) if atomic else y


_GEMV_CONFIGS = [
    triton.Config({"BN": bn}, num_warps=w, num_stages=s)
    for bn in (8, 16, 32)
    for w in (4, 8)
    for s in (1, 3)
]


@triton.jit
def _int4_gemv_kernel(X, W, S, Z, Y, N, K, G: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # One row x: y[n] = Σ_k (q[n, k] - z[n, g]) s[n, g] x[k], g = k // G; a tile of BK inputs lies in one group.
    # (Measured on an H200, benchmarks/quant_kernels.py: splitting the loaded bytes in registers beat loading each
    # byte once per nibble, and moving the zero out of the loop as s·(Σ q x - z Σ x) was slower.)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_mask = n < N
    n64 = n.to(tl.int64)
    acc = tl.zeros((BN, BK), tl.float32)
    for k0 in range(0, K, BK):
        x = tl.load(X + k0 + tl.arange(0, BK)).to(tl.float32)
        b = tl.load(W + n64[:, None] * (K // 2) + k0 // 2 + tl.arange(0, BK // 2)[None, :], mask=n_mask[:, None],
                    other=0)
        q = tl.reshape(tl.join(b >> 4, b & 0xF), (BN, BK)).to(tl.float32)
        g = k0 // G
        s = tl.load(S + n64 * (K // G) + g, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(Z + n64 * (K // G) + g, mask=n_mask, other=0.0).to(tl.float32)
        acc += (q - z[:, None]) * s[:, None] * x[None, :]
    tl.store(Y + n, tl.sum(acc, 1).to(Y.dtype.element_ty), mask=n_mask)


_int4_gemv_tuned = triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K"])(_int4_gemv_kernel)


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """One row x (K,) or (1, K) -> (N,) in x's dtype (batch-1 decode)."""
    N = qweight.shape[0]
    K = 2 * qweight.shape[1]
    assert x.numel() == K and qweight.is_contiguous()
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    x1 = x.reshape(K)
    block_k = min(group_size, 128)
    if x.is_cuda:
        _int4_gemv_tuned[lambda meta: (triton.cdiv(N, meta["BN"]),)](x1, qweight, scales, zeros, y, N, K,
                                                                      G=group_size, BK=block_k)
    else:
        _int4_gemv_kernel[(triton.cdiv(N, 16),)](x1, qweight, scales, zeros, y, N, K, G=group_size, BN=16,
                                                  BK=block_k)
    return y


@triton.jit
def _int4_dequantize_kernel(W, S, Z, Out, N, K, G: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # One (BN, BK) tile of the 16-bit weight from its packed bytes and its group's scale and zero (BK divides G).
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    n_mask = n < N
    n64 = n.to(tl.int64)
    b = tl.load(W + n64[:, None] * (K // 2) + k0 // 2 + tl.arange(0, BK // 2)[None, :], mask=n_mask[:, None], other=0)
    q = tl.reshape(tl.join(b >> 4, b & 0xF), (BN, BK)).to(tl.float32)
    s = tl.load(S + n64 * (K // G) + k0 // G, mask=n_mask, other=0.0).to(tl.float32)
    z = tl.load(Z + n64 * (K // G) + k0 // G, mask=n_mask, other=0.0).to(tl.float32)
    w = (q - z[:, None]) * s[:, None]
    tl.store(Out + n64[:, None] * K + k0 + tl.arange(0, BK)[None, :], w.to(Out.dtype.element_ty), mask=n_mask[:, None])


def int4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """(N, K) weight in `dtype` in one pass: half a byte read, two written, per weight (the prefill path; as torch
    ops it was five passes and a uint8 copy, 6-13x the bf16 matmul's time at 256 rows on an H200)."""
    N = qweight.shape[0]
    K = 2 * qweight.shape[1]
    assert qweight.is_contiguous() and scales.shape == (N, K // group_size)
    out = torch.empty(N, K, dtype=dtype, device=qweight.device)
    block_k = min(group_size, 128)
    grid = (triton.cdiv(N, 32), K // block_k)
    _int4_dequantize_kernel[grid](qweight, scales, zeros, out, N, K, G=group_size, BN=32, BK=block_k, num_warps=4)
    return out


@triton.jit
def _int4_dequantize_tinygemm_kernel(P, SZ, Out, N, K, G: tl.constexpr, TILES: tl.constexpr, BN: tl.constexpr,
                                     BK: tl.constexpr):
    # One (BN, BK) tile of the 16-bit weight from tinygemm's layout (int4_tinygemm.py): input k of row n is nibble
    # lo · 4 + half · 2 + which of word [n // 8][b // (8 TILES)][4 (n % 8) + t4][(b % (8 TILES)) // 16], with
    # b = k // 2, lo = k % 2 and (half, which, t4) the bits of b % 16; W = (q - 8) · s + z_tg (BK divides G).
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    n_mask = n < N
    n64 = n.to(tl.int64)
    b = k // 2
    r = b % 16
    slot = (k % 2) * 4 + (r // 8) * 2 + (r % 8) // 4  # (BK,)
    lane_k = ((b // (8 * TILES)) * 32 + r % 4) * (TILES // 2) + (b % (8 * TILES)) // 16  # (BK,)
    word = (n64 // 8) * (K // (16 * TILES)) * 32 * (TILES // 2) + (n64 % 8) * 4 * (TILES // 2)  # (BN,)
    v = tl.load(P + word[:, None] + lane_k[None, :], mask=n_mask[:, None], other=0)  # (BN, BK) int32
    q = ((v >> (4 * slot)[None, :]) & 0xF).to(tl.float32)
    g = (tl.program_id(1) * BK) // G
    s = tl.load(SZ + (g * N + n64) * 2, mask=n_mask, other=0.0).to(tl.float32)
    z = tl.load(SZ + (g * N + n64) * 2 + 1, mask=n_mask, other=0.0).to(tl.float32)
    w = (q - 8.0) * s[:, None] + z[:, None]
    tl.store(Out + n64[:, None] * K + k[None, :], w.to(Out.dtype.element_ty), mask=n_mask[:, None])


def int4_dequantize_tinygemm(packed: torch.Tensor, sz: torch.Tensor, group_size: int,
                             dtype: torch.dtype) -> torch.Tensor:
    """(N, K) weight in `dtype` from tinygemm's packed int32 (N/8, K / (16 tiles), 32, tiles/2) and its
    scales_and_zeros (K/G, N, 2) in one pass (the prefill path of a layer that keeps only that layout)."""
    n_tiles, supers, _, words = packed.shape
    tiles = 2 * words
    N, K = 8 * n_tiles, supers * 16 * tiles
    assert packed.is_contiguous() and sz.is_contiguous() and sz.shape == (K // group_size, N, 2)
    out = torch.empty(N, K, dtype=dtype, device=packed.device)
    block_k = min(group_size, 128)
    grid = (triton.cdiv(N, 32), K // block_k)
    _int4_dequantize_tinygemm_kernel[grid](packed, sz, out, N, K, G=group_size, TILES=tiles, BN=32, BK=block_k,
                                           num_warps=4)
    return out
