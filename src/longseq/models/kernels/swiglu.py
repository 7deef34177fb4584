"""SwiGLU's product silu(gate) * up, forward and backward each in one elementwise pass.

Eager autograd keeps gate, silu(gate) and up (three S x intermediate tensors) and runs five kernels; this Function
keeps gate and up, and recomputes the sigmoid in backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longseq.models.kernels import elements_per_program


def _block(x: torch.Tensor) -> int:
    return elements_per_program(x.device, 1024)


@triton.jit(do_not_specialize=["n"])  # one compiled variant whatever the step size
def _swiglu_fwd(G, U, Y, n, cols, stride_row, BLOCK: tl.constexpr, STRIDED: tl.constexpr):
    if STRIDED:  # gate/up as column halves of one matmul: program (row, column block), no per-element division
        row, col = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = col < cols
        src, offs = row * stride_row + col, row * cols + col
    else:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        src = offs
    g = tl.load(G + src, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + src, mask=mask, other=0.0).to(tl.float32)
    act = (g * tl.sigmoid(g)).to(G.dtype.element_ty).to(tl.float32)  # rounded as eager F.silu rounds it
    tl.store(Y + offs, (act * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    act = g * sig
    # d silu(g) / dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * act.to(G.dtype.element_ty).to(tl.float32)).to(DU.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        cols = gate.shape[-1]
        stride = _row_stride(gate)
        if stride is None or stride != _row_stride(up):
            gate, up, stride = gate.contiguous(), up.contiguous(), cols
        y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        n = gate.numel()
        if n:
            block = _block(y)
            grid = (n // cols, triton.cdiv(cols, block)) if stride != cols else (triton.cdiv(n, block),)
            _swiglu_fwd[grid](gate, up, y, n, cols, stride, BLOCK=block, STRIDED=stride != cols)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = (t.contiguous() for t in ctx.saved_tensors)
        dy = dy.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            _swiglu_bwd[(triton.cdiv(n, _block(dg)),)](dy, gate, up, dg, du, n, BLOCK=_block(dg))
        return dg, du


def _row_stride(x: torch.Tensor) -> int | None:
    """Stride between the rows of x (..., C) seen as (R, C) with unit column stride; None if it has no such view
    (empty tensors included)."""
    if x.numel() == 0 or x.stride(-1) != 1:
        return None
    try:
        return x.view(-1, x.shape[-1]).stride(0)
    except RuntimeError:
        return None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return SwiGLUFunction.apply(gate, up)
