"""Int8 (Q8_0 layout) weight-only kernels in Triton: the single-row GEMV of batch-1 decode, and the one-pass
dequantize that feeds cuBLAS for more rows. Layout: models/quant/int8.py.

The GEMV is the 16-bit one's loop (kernels/gemv.py: BN output rows a program, a (BN, BK) tile of W streamed along
K, summed into a (BN, BK) float32 accumulator reduced once at the end), except that each tile's 32-input blocks are
multiplied by their scale before they join the sums. `row_dots` itself does not fit: it has no place for a scale
that changes every 32 inputs, and applying d after the row's sum is only right for one scale per row (fp8_kernel.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longseq.models.quant.fp8_kernel import BYTE_GEMV_CONFIGS

GROUP = 32


@triton.jit
def _scaled_tile(W, S, n64, n_mask, k0, K, G: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """(BN, BK) float32: q · d for weight rows n64, inputs k0 .. k0 + BK (K a multiple of G, so a block is either
    wholly inside K or wholly masked)."""
    k = k0 + tl.arange(0, BK)
    b = k0 // G + tl.arange(0, BK // G)
    q = tl.load(W + n64[:, None] * K + k[None, :], mask=n_mask[:, None] & (k < K)[None, :], other=0)
    d = tl.load(S + n64[:, None] * (K // G) + b[None, :], mask=n_mask[:, None] & (b < K // G)[None, :], other=0.0)
    w = tl.reshape(q.to(tl.float32), (BN, BK // G, G)) * d.to(tl.float32)[:, :, None]
    return tl.reshape(w, (BN, BK))


@triton.jit
def _int8_gemv_kernel(X, W, S, Y, N, K, G: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # y[n] = Σ_k q[n, k] d[n, k // G] x[k]
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_mask = n < N
    n64 = n.to(tl.int64)
    acc = tl.zeros((BN, BK), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        x = tl.load(X + k, mask=k < K, other=0.0).to(tl.float32)
        acc += _scaled_tile(W, S, n64, n_mask, k0, K, G, BN, BK) * x[None, :]
    tl.store(Y + n, tl.sum(acc, 1).to(Y.dtype.element_ty), mask=n_mask)


_int8_gemv_tuned = triton.autotune(configs=BYTE_GEMV_CONFIGS, key=["N", "K"])(_int8_gemv_kernel)


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """One row x (K,) or (1, K), qweight (N, K) int8 contiguous, scales (N, K/32) -> (N,) in x's dtype."""
    N, K = qweight.shape
    assert x.numel() == K and qweight.is_contiguous() and scales.is_contiguous() and scales.shape == (N, K // GROUP)
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    x1 = x.reshape(K)
    if x.is_cuda:  # autotuned on the first call per shape (the engine warms up before capturing graphs)
        _int8_gemv_tuned[lambda meta: (triton.cdiv(N, meta["BN"]),)](x1, qweight, scales, y, N, K, G=GROUP)
    else:  # Triton's CPU interpreter (tests): one fixed configuration, few programs
        _int8_gemv_kernel[(triton.cdiv(N, 16),)](x1, qweight, scales, y, N, K, G=GROUP, BN=16,
                                                 BK=max(GROUP, triton.next_power_of_2(K)))
    return y


@triton.jit
def _int8_dequantize_kernel(W, S, Out, N, K, G: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    n_mask = n < N
    n64 = n.to(tl.int64)
    w = _scaled_tile(W, S, n64, n_mask, k0, K, G, BN, BK)
    k = k0 + tl.arange(0, BK)
    tl.store(Out + n64[:, None] * K + k[None, :], w.to(Out.dtype.element_ty), mask=n_mask[:, None] & (k < K)[None, :])


def int8_dequantize(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) weight in `dtype` in one pass (the many-row path): one byte read, two written, per weight."""
    N, K = qweight.shape
    assert qweight.is_contiguous() and scales.is_contiguous() and scales.shape == (N, K // GROUP)
    out = torch.empty(N, K, dtype=dtype, device=qweight.device)
    BN, BK = 32, 128
    _int8_dequantize_kernel[(triton.cdiv(N, BN), triton.cdiv(K, BK))](qweight, scales, out, N, K, G=GROUP, BN=BN,
                                                                      BK=BK, num_warps=4)
    return out
