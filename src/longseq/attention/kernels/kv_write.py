"""This step's K and V into their pool slots, both in one launch.

Indexed assignment (`pool[slots] = k`) is one index kernel per tensor: two per layer, 64 launches in a decode step
of a 32-layer model, each mostly launch latency. Here one program per new token copies its K and V rows, rounding
them to e4m3 by the layer's K and V scales for an FP8 pool (attention/kv_fp8.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_write_kernel(K, V, KPool, VPool, Slots, Scales, stride_kn, stride_kh, stride_vn, stride_vh,
                     D: tl.constexpr, HD: tl.constexpr, HD_PAD: tl.constexpr, FP8_KV: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + n).to(tl.int64)
    i = tl.arange(0, HD_PAD)
    h, d = i // D, i % D
    mask = i < HD
    k = tl.load(K + n * stride_kn + h * stride_kh + d, mask=mask)
    v = tl.load(V + n * stride_vn + h * stride_vh + d, mask=mask)
    if FP8_KV:  # x / scale, saturated at e4m3's ±448
        k = tl.minimum(tl.maximum(k.to(tl.float32) / tl.load(Scales), -448.0), 448.0).to(KPool.dtype.element_ty)
        v = tl.minimum(tl.maximum(v.to(tl.float32) / tl.load(Scales + 1), -448.0), 448.0).to(VPool.dtype.element_ty)
    tl.store(KPool + slot * HD + i, k, mask=mask)  # the pools are contiguous (slots, H_kv, D)
    tl.store(VPool + slot * HD + i, v, mask=mask)


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor, scales: torch.Tensor | None = None) -> None:
    """k/v (N, H_kv, D), any strides with unit stride in D -> k_pool/v_pool[slots[n]] (pools (slots, H_kv, D)).
    `scales` (2,) float32: an FP8 pool's K and V scales."""
    N, H, D = k.shape
    if N == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    fp8 = scales is not None
    assert k_pool.is_contiguous() and v_pool.is_contiguous() and k.dtype == v.dtype
    assert fp8 or k_pool.dtype == k.dtype
    _kv_write_kernel[(N,)](k, v, k_pool, v_pool, slots, scales if fp8 else slots, k.stride(0), k.stride(1),
                           v.stride(0), v.stride(1), D=D, HD=H * D, HD_PAD=triton.next_power_of_2(H * D), FP8_KV=fp8)
