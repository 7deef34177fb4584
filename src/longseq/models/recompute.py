"""Activation recompute, and the frozen matmuls whose outputs backward never reads.

When backward recomputes a checkpointed region it needs what the region's backward reads (the saved tensors), not
the region's outputs. Some frozen matmuls feed only ops whose backward reads no values: the MLP's output goes only
into the residual add that ends the layer, and under keep_attention the q/k/v projections feed only RoPE (linear
in q and k) and attention, which kept its own inputs from the forward. A frozen weight's input gradient is dY·W,
which needs no activation either. So in recompute those matmuls are skipped (LoRA's frozen base returns an
uninitialised tensor of its output's shape; its adapter still runs: its backward needs x and x·Aᵀ), and a tiled
MLP, whose backward recomputes its tiles anyway, skips its whole forward. For Llama-3-8B that is 38% of the
recomputed matmul FLOPs under keep_attention (q, k, v and down of q, k, v, o, gate, up, down) and 27% under full
recompute (down); tiled, the whole MLP forward of the recompute (81% of a layer's matmuls).

Regions: `checkpoint` (non-reentrant, as llama.py and the offloader use it) enters `recomputing()` for its recompute
only; the tiled MLP's backward enters it itself. `output_unused()` marks a call whose output no backward reads; the
two together make `skip()` true.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

ENABLED = os.environ.get("LONGSEQ_RECOMPUTE_SKIP", "1") != "0"  # 0: compute everything (benchmark ablations)
_state = threading.local()  # backward recomputes on autograd's device threads: a flag per thread
FILL: float | None = None  # tests: fill skipped outputs with this (NaN) so that any read of one shows


@contextmanager
def _flag(name: str, value: bool = True):
    old = getattr(_state, name, False)
    setattr(_state, name, value)
    try:
        yield
    finally:
        setattr(_state, name, old)


def recomputing(active: bool = True):
    """Context: backward's recompute of a checkpointed region (no-op with active=False)."""
    return _flag("recomputing", active)


def output_unused(active: bool = True):
    """Context: the frozen matmuls called inside feed nothing whose backward reads values."""
    return _flag("unused", active)


def skip() -> bool:
    """True inside a recompute, for a call marked output_unused: compute only what backward saves."""
    return ENABLED and getattr(_state, "recomputing", False) and getattr(_state, "unused", False)


def unused_output(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """The stand-in for a skipped output computed from `like`: its dtype (the autocast dtype under autocast, as the
    matmul's would be), uninitialised (NaN under tests)."""
    device = like.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else like.dtype
    out = torch.empty(shape, dtype=dtype, device=like.device)
    return out if FILL is None else out.fill_(FILL)


def _contexts():
    return nullcontext(), recomputing()


def checkpoint(fn, *args):
    """torch.utils.checkpoint, non-reentrant (works with autocast, closures and inputs that need no grad), whose
    recompute runs under `recomputing()`."""
    return _torch_checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts)


class _FrozenLinear(torch.autograd.Function):
    """x Wᵀ + b for a frozen W (plain or NF4): saves no activation, input gradient dY·W; skipped under `skip()`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, nf4: bool) -> torch.Tensor:
        ctx.weight = weight  # a parameter: kept by reference, out of the saved-tensor hooks (checkpoint, offload)
        if skip():
            return unused_output((*x.shape[:-1], weight.shape[0]), x)
        return frozen_matmul(x, weight, bias, nf4)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.weight.to(grad.dtype), None, None, None


def frozen_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, nf4: bool) -> torch.Tensor:
    """x Wᵀ + b; an NF4 weight (QLoRA) is dequantized to the input's dtype first, as torchao's linear_nf4 does."""
    return F.linear(x, weight.to(x.dtype) if nf4 else weight, bias)


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, nf4: bool) -> torch.Tensor:
    """The frozen base of a LoRA layer under autograd: one node whichever way the forward went (the checkpoint's
    original forward and its recompute save the same tensors)."""
    return _FrozenLinear.apply(x, weight, bias, nf4)
