"""Which path the model's RMSNorm, RoPE and SwiGLU take: the fused Triton kernels (models/kernels/) on a GPU, the
eager PyTorch reference everywhere else.

At 32K tokens the eager float32 RMSNorm alone is about a tenth of an 8B LoRA training step, and in a batch-1 decode
step the eager ops are ~25 of the ~40 kernels a layer launches; the kernels do each op in one pass forward and one
backward. LONGSEQ_FUSED=0 forces the reference path (to compare the two); LONGSEQ_FUSED=1 also runs the kernels on
CPU tensors, which works under Triton's interpreter (TRITON_INTERPRET=1: how CI tests them).
"""

from __future__ import annotations

import importlib.util
import os

import torch

MODE = os.environ.get("LONGSEQ_FUSED", "auto")  # auto: CUDA tensors; 1: every tensor; 0: never
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HAS_TRITON = importlib.util.find_spec("triton") is not None


def available() -> bool:
    """Whether a GPU run takes the kernels (what `longseq train --plan auto` plans memory for)."""
    return HAS_TRITON and MODE != "0"


def active(x: torch.Tensor) -> bool:
    """Whether the kernels take `x`: a floating type they compute in float32 (not float64 reference runs)."""
    if not available() or x.dtype not in DTYPES or type(x) is not torch.Tensor:  # DTensors: through their ops
        return False
    return MODE == "1" or x.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from longseq.models.kernels.rms_norm import rms_norm as kernel

    return kernel(x, weight, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    from longseq.models.kernels.rms_norm import add_rms_norm as kernel

    return kernel(x, delta, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from longseq.models.kernels.swiglu import swiglu as kernel

    return kernel(gate, up)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from longseq.models.kernels.rope import rope as kernel

    return kernel(q, k, cos, sin)
