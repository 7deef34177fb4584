"""Int8 weight-only linear layers in llama.cpp's Q8_0 layout: an int8 per weight, a 16-bit scale per 32 inputs.

W[n, k] = q[n, k] · d[n, k // 32], q in -127..127, d an fp16 scale: `--quantization int8` rounds 16-bit weights so
(d = max |w| / 127 over the 32, q = round(w / d): ggml-quants.c's quantize_row_q8_0_ref), and a GGUF file's Q8_0
blocks load as they are (gguf_q8.py). Storage: `qweight` (N, K) int8 and `scales` (N, K/32) float16, 8.5 bits a
weight, the file's own size. A scale per 32 inputs rather than per output channel because that is what Q8_0 files
hold: a per-channel layout would have to requantize them, adding a second rounding.

Compute: a single row (batch-1 decode) through a Triton GEMV (int8_kernel.py) that widens the int8 weights and
applies each block's scale in registers, so a step reads 8.5 bits a weight; more rows (batched decode, prefill)
dequantize the weight to 16 bits in one Triton pass and run one cuBLAS matmul (a few-row kernel, as int4 has, would
spare batched decode that pass; there is none yet). The reference
(`reference_linear`: dequantize, float32 matmul) is the CPU path and the tests' oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longseq.errors import LongseqError

GROUP = 32  # Q8_0's block: inputs per scale
Q_MAX = 127  # q = round(w / d) with d = amax / 127, so |q| <= 127 (-128 never appears)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (N, K) int8 and (N, K/32) float16 scales, Q8_0's rounding (an all-zero block gets d = 0)."""
    N, K = weight.shape
    if K % GROUP:
        raise LongseqError(f"int8 needs input sizes divisible by {GROUP}; got {K} inputs")
    w = weight.float().reshape(N, K // GROUP, GROUP)
    d = w.abs().amax(-1) / Q_MAX  # (N, K/32)
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    # round half away from zero, as ggml's roundf (torch.round is half to even)
    q = (w * inv[..., None]).abs().add_(0.5).floor_().mul_(w.sign()).clamp_(-Q_MAX, Q_MAX)
    return q.to(torch.int8).reshape(N, K), d.to(torch.float16)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K) in `dtype`: q · d block by block, in float32 (an fp16 d times an int8 is exact there)."""
    N, K = qweight.shape
    w = qweight.reshape(N, K // GROUP, GROUP).float() * scales.float()[..., None]
    return w.reshape(N, K).to(dtype)


def reference_linear(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    """Dequantize, then multiply in float32."""
    y = x.float() @ dequantize(layer.qweight, layer.scales).t()
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype)


class Int8Linear(nn.Module):
    """A frozen linear layer with Q8_0 weights: a layer swap for nn.Linear in serving (models/quant/__init__.py)."""

    group_size = GROUP

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        """qweight (N, K) int8, scales (N, K/32) float16."""
        super().__init__()
        N, K = qweight.shape
        assert qweight.dtype == torch.int8 and scales.shape == (N, K // GROUP) and K % GROUP == 0
        self.out_features, self.in_features = N, K
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.to(torch.float16))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        return cls(*quantize_weight(weight), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            return reference_linear(x, self)
        from longseq.models.quant.int8_kernel import int8_dequantize, int8_gemv

        if x.numel() == x.shape[-1] and x.dtype in (torch.float16, torch.bfloat16):
            y = int8_gemv(x, self.qweight, self.scales).view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, int8_dequantize(self.qweight, self.scales, x.dtype), self.bias)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, dtype)

    @staticmethod
    def fused(layers: list[nn.Module]):
        """fused_linear.fuse's hook: one int8 matmul over layers that read the same input; their buffers become
        views of the concatenation, as FusedLinear does for 16-bit layers."""
        from longseq.models.quant import fuse_rows

        first = layers[0]
        if not all(type(m) is Int8Linear and not m._forward_hooks and (m.bias is None) == (first.bias is None)
                   for m in layers):
            return None
        return fuse_rows(layers, ("qweight", "scales"), lambda p, bias: Int8Linear(p["qweight"], p["scales"], bias))
