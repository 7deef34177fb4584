"""Per-token FP8 quantization of activations in one launch: row amax, scale, round to e4m3.

As torch ops it is five kernels (abs, amax, divide, clamp, cast) before every FP8 matmul, four matmuls a layer: at
batch-1 decode their launches would cost more than the matmuls they feed. One program per row reads it twice (amax,
then scale and store), the second time from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longseq.models.kernels.gemv import row_dots

FP8_MAX = 448.0
BLOCK = 1024


@triton.jit
def _quantize_rows_kernel(X, Q, S, stride_x, K, FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], tl.float32)
    for k in range(0, K, BLOCK):
        x = tl.load(X + row * stride_x + k + cols, mask=k + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    top = tl.maximum(tl.max(amax, 0), MIN_AMAX)
    inv = FP8_MAX / top
    for k in range(0, K, BLOCK):
        mask = k + cols < K
        x = tl.load(X + row * stride_x + k + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x * inv, -FP8_MAX), FP8_MAX)
        tl.store(Q + row * K + k + cols, q.to(Q.dtype.element_ty), mask=mask)
    tl.store(S + row, top / FP8_MAX)


def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) with unit stride in K -> (M, K) float8_e4m3fn (contiguous) and (M, 1) float32 scales."""
    M, K = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    if M:
        _quantize_rows_kernel[(M,)](x, q, s, x.stride(0), K, FP8_MAX=FP8_MAX, MIN_AMAX=1e-12,
                                    BLOCK=min(BLOCK, triton.next_power_of_2(K)), num_warps=4)
    return q, s


BYTE_GEMV_CONFIGS = [  # also int8_kernel.py's: a byte a weight either way
    triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
    for bn, bk in ((8, 256), (8, 512), (16, 256), (16, 512), (32, 256))
    for w in (4, 8)
    for s in (1, 3)
]


@triton.jit
def _fp8_gemv_kernel(X, W, S, Y, N, K, BN: tl.constexpr, BK: tl.constexpr):
    # y[n] = s[n] · Σ_k W[n, k] x[k]: the e4m3 weights widened in registers, x unquantized (the 16-bit GEMV's
    # loop over a slice of rows, with half its bytes to read)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_mask = n < N
    y = row_dots(X, W + n[:, None].to(tl.int64) * K, n_mask, K, BN, BK) * tl.load(S + n, mask=n_mask, other=0.0)
    tl.store(Y + n, y.to(Y.dtype.element_ty), mask=n_mask)


_fp8_gemv_tuned = triton.autotune(configs=BYTE_GEMV_CONFIGS, key=["N", "K"])(_fp8_gemv_kernel)


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One row x (K,) or (1, K), 16-bit, weight (N, K) e4m3 contiguous, scale (N,) float32 -> (N,) in x's dtype:
    batch-1 decode, weight-only (the activation is not rounded to e4m3)."""
    N, K = weight.shape
    assert x.numel() == K and weight.is_contiguous()
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    x1 = x.reshape(K)
    if x.is_cuda:  # autotuned on the first call per shape (the engine warms up before capturing graphs)
        _fp8_gemv_tuned[lambda meta: (triton.cdiv(N, meta["BN"]),)](x1, weight, scale, y, N, K)
    else:  # Triton's CPU interpreter (tests)
        _fp8_gemv_kernel[(triton.cdiv(N, 16),)](x1, weight, scale, y, N, K, BN=16, BK=triton.next_power_of_2(K))
    return y
