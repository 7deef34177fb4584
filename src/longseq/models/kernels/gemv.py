"""y = x @ W^T (+ b) for a single row x: the matrix-vector product of batch-1 decode, in Triton.

A batch-1 step is bound by reading the weights once. cuBLAS picks its GEMV kernels by heuristics and, on an H100,
reads some Llama-3-8B shapes at about half the bandwidth it reaches on others (o_proj, 4096 x 4096: ~1.6 TB/s
against ~3 TB/s for q/k/v in one launch). This kernel gives each program BN output rows and streams its slice of W
along K; which of the two a shape takes is decided by timing both at engine start (models/fused_linear.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_CONFIGS = [
    triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
    for bn, bk in ((4, 128), (4, 256), (8, 128), (8, 256), (8, 512), (16, 128), (16, 256))
    for w in (4, 8)
    for s in (1, 3)
]


@triton.jit
def row_dots(X, rows, n_mask, K, BN: tl.constexpr, BK: tl.constexpr):
    """(BN,) float32: Σ_k W[n, k] x[k] for the BN weight rows `rows` points at ((BN, 1) pointers; n_mask: those
    that exist), each widened to float32 in registers, x (K,) streamed along with them."""
    acc = tl.zeros((BN, BK), tl.float32)  # reduced once at the end, not every step of the K loop
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        k_mask = k < K
        x = tl.load(X + k, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += w * x[None, :]
    return tl.sum(acc, 1)


@triton.jit
def _gemv_kernel(X, W, B, Y, N, K, stride_w, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_mask = n < N
    y = row_dots(X, W + n[:, None].to(tl.int64) * stride_w, n_mask, K, BN, BK)
    if HAS_BIAS:
        y += tl.load(B + n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(Y + n, y.to(Y.dtype.element_ty), mask=n_mask)


_gemv_tuned = triton.autotune(configs=_CONFIGS, key=["N", "K"])(_gemv_kernel)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) holding one row, weight (N, K) with unit stride along K -> (..., N)."""
    N, K = weight.shape
    assert x.numel() == K and weight.stride(1) == 1
    x1 = x.reshape(K)
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    args = (x1, weight, bias if bias is not None else weight, y, N, K, weight.stride(0))
    if x.is_cuda:  # autotuned on the first call per shape (never inside a graph capture: the engine warms up first)
        _gemv_tuned[lambda meta: (triton.cdiv(N, meta["BN"]),)](*args, HAS_BIAS=bias is not None)
    else:  # Triton's CPU interpreter (tests): one fixed configuration, few programs
        BN = 16
        _gemv_kernel[(triton.cdiv(N, BN),)](*args, HAS_BIAS=bias is not None, BN=BN, BK=triton.next_power_of_2(K))
    return y
