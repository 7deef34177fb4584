"""An FP8 KV pool: K and V stored as float8_e4m3fn, one float32 scale per layer for K and one for V.

Half the bytes of a 16-bit pool, so twice the KV blocks in the same memory and half the KV bytes each decode step
reads. A value is stored as x / scale rounded to e4m3 (saturated at ±448; a cast past it would give NaN on some
devices) and read back as q · scale: the decode kernel folds the K scale into its softmax scale and the V scale into
its output (attention/kernels/paged_decode.py), the prefill and reference paths dequantize the blocks they gather.
Scales are 1.0 unless the checkpoint brings calibrated ones (compressed-tensors' `k_scale` / `v_scale`), as in
vLLM: e4m3 keeps about two significant digits from 2^-6 to 448, the range of K and V in the models served here.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., D) float -> float8_e4m3fn x / scale, saturated."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Gathered pool rows in `dtype`: q · scale for an FP8 pool (scale not None), else as they are."""
    if scale is None:
        return x
    # e4m3 widens exactly to 16 bits; one rounding of the product, without a float32 copy of a long context
    return x.to(dtype).mul_(scale.to(dtype))
