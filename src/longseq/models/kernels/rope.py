"""Rotary embedding of q and k in one kernel, forward and backward (the HF "rotate_half" layout).

Eager `apply_rope` runs five kernels per tensor (negate, concatenate, two products, a sum); here one launch rotates
every (token, head) row of q and k, reading each token's cos/sin row from the cache. Nothing is saved but cos and
sin, which the model keeps for every layer anyway.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longseq.models.kernels import elements_per_program


@triton.jit
def _rotate(X, Y, Cos, Sin, n_rows, S, H, stride_xb, stride_xs, stride_xh, stride_cb, stride_cs, row0,
            HALF: tl.constexpr, HALF_PAD: tl.constexpr, ROWS: tl.constexpr, BACKWARD: tl.constexpr):
    r = row0 + tl.arange(0, ROWS)[:, None]  # (ROWS, 1): row = (b * S + s) * H + h of the (B, S, H, D) tensor
    j = tl.arange(0, HALF_PAD)[None, :]
    mask = (r < n_rows) & (j < HALF)
    token, h = r // H, r % H
    b, s = token // S, token % S
    c = b * stride_cb + s * stride_cs + j
    c1 = tl.load(Cos + c, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(Cos + c + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(Sin + c, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(Sin + c + HALF, mask=mask, other=0.0).to(tl.float32)
    x = X + b * stride_xb + s * stride_xs + h * stride_xh + j
    x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose of the rotation: dx = dy * cos + rotate_half^T(dy * sin)
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:  # y = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    y = Y + r * (2 * HALF) + j  # output: contiguous (B, S, H, D)
    tl.store(y, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y + HALF, y2.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["S", "n_q", "n_k"])  # one variant whatever the step size
def _rope_kernel(Q, K, Cos, Sin, QO, KO, S, H_Q, H_K, n_q, n_k, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks,
                 stride_kh, stride_cb, stride_cs, HALF: tl.constexpr, HALF_PAD: tl.constexpr, ROWS: tl.constexpr,
                 BACKWARD: tl.constexpr):
    row0 = tl.program_id(0).to(tl.int64) * ROWS
    if tl.program_id(1) == 0:
        _rotate(Q, QO, Cos, Sin, n_q, S, H_Q, stride_qb, stride_qs, stride_qh, stride_cb, stride_cs, row0, HALF,
                HALF_PAD, ROWS, BACKWARD)
    else:
        _rotate(K, KO, Cos, Sin, n_k, S, H_K, stride_kb, stride_ks, stride_kh, stride_cb, stride_cs, row0, HALF,
                HALF_PAD, ROWS, BACKWARD)


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool):
    """q (B, S, H, D), k (B, S, H_kv, D), cos/sin (B, S, D) -> rotated q, k, contiguous (B, S, H, D)."""
    B, S, Hq, D = q.shape
    Hk = k.shape[2]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos, sin = cos.expand(B, S, D), sin.expand(B, S, D)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    qo, ko = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    half = D // 2
    half_pad = triton.next_power_of_2(half)
    rows = max(1, elements_per_program(q.device, 4096) // half_pad)
    n_q, n_k = B * S * Hq, B * S * Hk
    if n_q:
        _rope_kernel[(triton.cdiv(n_q, rows), 2)](
            q, k, cos, sin, qo, ko, S, Hq, Hk, n_q, n_k, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
            k.stride(1), k.stride(2), cos.stride(0), cos.stride(1), HALF=half, HALF_PAD=half_pad, ROWS=rows,
            BACKWARD=backward,
        )
    return qo, ko


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq, dk = _launch(dq, dk, cos, sin, backward=True)
        return dq, dk, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, S, H, D), k (B, S, H_kv, D), cos/sin (B, S, D) -> RoPE'd q and k, (B, S, H, D) and (B, S, H_kv, D)."""
    return RopeFunction.apply(q, k, cos, sin)
