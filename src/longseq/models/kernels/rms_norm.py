"""RMSNorm forward and backward in one kernel each: y = w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype).

The eager module (models/llama.py RMSNorm) runs about eight kernels forward and more backward, through a float32
copy of x; here each row is read once in float32 registers. The Function saves x and one float32 rstd per row, as
the tiled norm does (models/tiling.py), and its backward allocates no float32 (N, d) temporaries.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longseq.models.kernels import elements_per_program


@triton.jit(do_not_specialize=["n_rows"])  # one compiled variant whatever the step size
def _rms_norm_fwd(X, W, Y, Rstd, D, H, stride_x, stride_y, stride_d, stride_h, n_rows, n_cols, eps,
                  BLOCK: tl.constexpr, ROWS: tl.constexpr, ADD: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]  # (ROWS, 1)
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD:  # the residual add before the norm: h = x + d, rounded as the eager add rounds, kept for the next add
        x = (x + tl.load(D + rows * stride_d + cols, mask=mask, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + rows * stride_h + cols, x, mask=mask)
        x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / n_cols + eps)  # (ROWS,)
    # As HF Llama: normalise in float32, round to x's dtype, then scale by the weight.
    xn = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(Y + rows * stride_y + cols, (xn * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + rows, rstd[:, None], mask=rows < n_rows)


@triton.jit
def _rms_norm_bwd(DY, X, W, Rstd, DX, DW, stride_dy, stride_x, stride_dx, n_rows, n_cols, BLOCK: tl.constexpr,
                  ROWS: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr):
    # Program p handles row blocks p, p + P, p + 2P, ... so that it can sum its rows' share of dw in registers.
    p, num_programs = tl.program_id(0).to(tl.int64), tl.num_programs(0)
    cols = tl.arange(0, BLOCK)[None, :]
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)  # (1, BLOCK)
    dw = tl.zeros([ROWS, BLOCK], tl.float32)
    for i in range(0, tl.cdiv(tl.cdiv(n_rows, ROWS) - p, num_programs)):
        rows = (p + i * num_programs) * ROWS + tl.arange(0, ROWS)[:, None]
        mask = (rows < n_rows) & (cols < n_cols)
        x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=rows < n_rows, other=0.0)  # (ROWS, 1)
        xn = x * rstd
        g = dy * w  # gradient at the normalised row (the forward's rounding to x's dtype passes it through)
        if NEED_DX:  # d/dx of x * (mean(x^2) + eps)^-1/2 = rstd * (g - xn * mean(g * xn))
            dx = rstd * (g - xn * (tl.sum(g * xn, 1) / n_cols)[:, None])
            tl.store(DX + rows * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw += dy * xn.to(X.dtype.element_ty).to(tl.float32)
    if NEED_DW:
        tl.store(DW + p * n_cols + cols, tl.sum(dw, 0)[None, :], mask=cols < n_cols)


def _rows(block: int, device: torch.device) -> int:
    """Rows a program takes: ~4K elements on a GPU (one row of an 8B model)."""
    return max(1, elements_per_program(device, 4096) // block)


def _programs(blocks: int, device: torch.device) -> int:
    if device.type != "cuda":
        return min(blocks, 2)
    return min(blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = _unit_stride_rows(x)
        y, rstd, _ = _forward(rows, weight, eps)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, d = rows.shape
        dy = dy.reshape(n, d)
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx = torch.empty_like(rows) if need_x else rows  # (unused when x needs no grad: NEED_DX is off)
        block = triton.next_power_of_2(d)
        per = _rows(block, rows.device)
        programs = _programs(triton.cdiv(n, per), rows.device)
        dw = torch.empty(programs, d, dtype=torch.float32, device=rows.device) if need_w else rstd
        if n:
            _rms_norm_bwd[(programs,)](dy, rows, weight, rstd, dx, dw, dy.stride(0), rows.stride(0), dx.stride(0), n,
                                       d, BLOCK=block, ROWS=per, NEED_DX=need_x, NEED_DW=need_w)
        grad_w = None
        if need_w:
            grad_w = (dw.sum(0) if n else torch.zeros(d, device=rows.device)).to(weight.dtype)
        return (dx.view(ctx.shape) if need_x else None), grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference only (no autograd): h = x + delta and rms_norm(h) in one pass; returns (h, normed). Saves a decode
    layer two elementwise launches and a round trip of h through memory."""
    y, _, h = _forward(_unit_stride_rows(x), weight, eps, _unit_stride_rows(delta))
    return h.view(x.shape), y.view(x.shape)


def _unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., d) as (N, d) rows with unit column stride (a copy only where the layout needs one)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _forward(rows: torch.Tensor, weight: torch.Tensor, eps: float,
             delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One launch over rows (N, d): y = norm(rows), or norm(h) with h = rows + delta; returns y, the float32 rstd
    (N,) and h (None without delta)."""
    (n, d), dev = rows.shape, rows.device
    y = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, rows.dtype), device=dev)
    rstd = torch.empty(n, dtype=torch.float32, device=dev)
    add = delta is not None
    h = torch.empty(rows.shape, dtype=rows.dtype, device=dev) if add else None
    if n:
        block = triton.next_power_of_2(d)
        per = _rows(block, dev)
        _rms_norm_fwd[(triton.cdiv(n, per),)](
            rows, weight, y, rstd, delta if add else rows, h if add else rows, rows.stride(0), y.stride(0),
            delta.stride(0) if add else 0, h.stride(0) if add else 0, n, d, eps, BLOCK=block, ROWS=per, ADD=add)
    return y, rstd, h
