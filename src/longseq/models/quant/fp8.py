"""FP8 linear layers: e4m3 weights with one scale per output channel, activations quantized per token at run time.

y = (x_q · s_x) (W_q · s_w)^T: each row of x (a token) is scaled so its largest magnitude is e4m3's 448 and rounded
to float8_e4m3fn, each row of W (an output channel) once at load. The product runs as one FP8 tensor-core matmul,
`torch._scaled_mm` with row-wise scales (cuBLASLt), whose epilogue applies s_x · s_w: half the weight bytes of bf16
read per decode step, twice bf16's peak FLOP/s in prefill. FP8 tensor cores exist from compute capability 8.9 (Ada,
Hopper, Blackwell); other GPUs are refused in one line. A single row (batch-1 decode) takes a Triton GEMV instead
(fp8_kernel.py): cuBLASLt's FP8 kernels read a one-row product's weights slower than its bf16 GEMV does, and the
activation is then used unrounded. The reference (`reference_linear`: dequantize, then a float32
matmul) is the CPU path and the tests' oracle; per-channel rather than per-tensor weight scales because an outlier
channel then costs only its own row's precision (vLLM's and FBGEMM's "FP8 rowwise").
"""

from __future__ import annotations

import torch
from torch import nn

from longseq.errors import LongseqError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
_MIN_AMAX = 1e-12  # an all-zero row gets a tiny scale, not a division by zero


def check_device(device: torch.device) -> None:
    """Raise one line where `device` is a GPU without FP8 tensor cores (CPU runs the reference path)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        raise LongseqError(f"fp8 needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell); {name} is "
                           f"{major}.{minor}: serve it in bf16 or with --quantization int4")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (N, K) float8_e4m3fn and (N,) float32 scales, W ≈ W_q · scale[:, None]."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=_MIN_AMAX) / FP8_MAX  # (N,)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (M, K) float8_e4m3fn and (M, 1) float32 scales, one per row (token): the reference maths of the
    Triton kernel (fp8_kernel.py)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_MIN_AMAX)
    return (xf * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8), amax / FP8_MAX


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization, by one Triton launch on a GPU."""
    if x.is_cuda:
        from longseq.models.quant.fp8_kernel import quantize_rows_triton

        return quantize_rows_triton(x)
    return quantize_rows(x)


def dequantize(wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(N, K) e4m3 and (N,) scales -> float32 (N, K)."""
    return wq.float() * scale.float()[:, None]


def reference_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same product without FP8 matmuls: per-token quantized x and W dequantized, multiplied in float32."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, x_scale = quantize_rows(x2)
    y = (xq.float() * x_scale) @ dequantize(wq, w_scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], wq.shape[0])


def scaled_mm_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N) through torch._scaled_mm with row-wise scales (also runs on CPU, where the tests
    compare it with the reference)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], wq.shape[0])
    xq, x_scale = quantize_activations(x2)
    # Row-wise scaling takes bf16 output on GPUs; a float32 model (CPU) asks for float32, which is exact there.
    out_dtype = torch.float32 if x.dtype == torch.float32 and not x.is_cuda else torch.bfloat16
    y = torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=out_dtype)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], wq.shape[0])


def fp8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """The FP8 matmul on GPUs (its shapes need K and N divisible by 16), a single row (batch-1 decode) through the
    Triton GEMV; the reference elsewhere."""
    if x.is_cuda and x.numel() == x.shape[-1] and x.dtype in (torch.float16, torch.bfloat16):
        from longseq.models.quant.fp8_kernel import fp8_gemv

        y = fp8_gemv(x, wq, w_scale).view(*x.shape[:-1], wq.shape[0])
        return y if bias is None else y + bias
    if x.is_cuda and wq.shape[0] % 16 == 0 and wq.shape[1] % 16 == 0:
        return scaled_mm_linear(x, wq, w_scale, bias)
    return reference_linear(x, wq, w_scale, bias)


class Fp8Linear(nn.Module):
    """A frozen linear layer with FP8 weights: a layer swap for nn.Linear in serving (models/quant/__init__.py).
    `weight` (N, K) float8_e4m3fn and `weight_scale` (N,) float32 are buffers: state_dict names match FP8
    checkpoints' (`q_proj.weight`, `q_proj.weight_scale`)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        assert weight.dtype == FP8 and weight_scale.shape == (weight.shape[0],)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Fp8Linear:
        return cls(*quantize_weight(weight), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale)

    @staticmethod
    def fused(layers: list[nn.Module]):
        """fused_linear.fuse's hook: q/k/v (or gate/up) as one FP8 matmul over concatenated weights and scales;
        the layers' buffers become views of them, as FusedLinear does for 16-bit layers."""
        from longseq.models.quant import fuse_rows

        first = layers[0]
        if not all(type(m) is Fp8Linear and not m._forward_hooks and (m.bias is None) == (first.bias is None)
                   for m in layers):
            return None
        return fuse_rows(layers, ("weight", "weight_scale"), lambda p, bias: Fp8Linear(p["weight"],
                                                                                          p["weight_scale"], bias))
