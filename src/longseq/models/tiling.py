"""Sequence tiling for long-context training: RMSNorm and the MLP run over tiles of tokens.

At 512K tokens one S x d fp32 tensor of Llama-3-8B is 8 GiB and one S x intermediate bf16 tensor 14 GiB, so the
plain RMSNorm (fp32 copies of its input, five fp32 S x d temporaries in backward) and the plain MLP (gate, up,
silu(gate) and their gradients) cannot exist for the whole sequence at once. Both are row-wise, so running them
tile by tile is exact; backward recomputes each tile's intermediates (after Arctic Long Sequence Training's
TiledMLP, arXiv 2506.13996). The plain modules in llama.py stay the reference these are tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from longseq.models import recompute


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _TiledRMSNorm(torch.autograd.Function):
    """y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), computed in fp32 `tile` rows at a time.

    Saves the input (alive anyway: the residual stream) and one fp32 rsqrt per row, never a fp32 copy of x.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, tile: int) -> torch.Tensor:
        d = x.shape[-1]
        rows = x.reshape(-1, d)  # (N, d)
        out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        acc = torch.promote_types(x.dtype, torch.float32)
        rstd = torch.empty(rows.shape[0], dtype=acc, device=x.device)  # (N,)
        for i in range(0, rows.shape[0], tile):
            xf = rows[i : i + tile].to(acc)
            r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            rstd[i : i + tile] = r.squeeze(-1)
            out[i : i + tile] = weight * (xf * r).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        ctx.tile = tile
        return out.view(*x.shape[:-1], d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        d, tile = x.shape[-1], ctx.tile
        rows, grad = x.reshape(-1, d), grad.reshape(-1, d)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = torch.empty_like(rows) if need_x else None
        dw = torch.zeros(d, dtype=rstd.dtype, device=x.device) if need_w else None
        for i in range(0, rows.shape[0], tile):
            xf, r = rows[i : i + tile].to(rstd.dtype), rstd[i : i + tile, None]
            g = grad[i : i + tile]
            if need_w:  # d(weight * n)/d weight, n = (x * r) in x's dtype, as the forward rounded it
                dw += (g * (xf * r).to(x.dtype)).to(dw.dtype).sum(0)
            if need_x:
                dn = (g * weight).to(rstd.dtype)
                # d/dx of x * (mean(x^2) + eps)^-1/2 = r * dn - r^3 / d * x * sum(dn * x)
                dxf = r * dn - (r.pow(3) / d) * xf * (dn * xf).sum(-1, keepdim=True)
                dx[i : i + tile] = dxf.to(x.dtype)
        return (dx.view_as(x) if need_x else None), (dw.to(weight.dtype) if need_w else None), None, None


def tiled_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, tile: int) -> torch.Tensor:
    return _TiledRMSNorm.apply(x, weight, eps, tile)


class _TiledMLP(torch.autograd.Function):
    """fn applied to `tile` tokens at a time; backward recomputes each tile and differentiates it alone. Inside a
    checkpoint's recompute of a call marked output_unused (models/recompute.py) the forward computes nothing: only
    its saved input matters there; fn maps d to d (the MLP).

    The trainable parameters are explicit inputs, so their gradients flow through autograd (they are not
    accumulated behind its back) even when x itself needs no gradient.
    """

    @staticmethod
    def forward(ctx, fn: Callable, tile: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        rows = x.reshape(-1, d)  # (N, d)
        ctx.device_type = x.device.type
        ctx.autocast = _autocast_state(ctx.device_type)
        ctx.rng = _rng_state(x.device)  # dropout inside fn (LoRA) must draw the same masks again in backward
        ctx.save_for_backward(x)
        ctx.fn, ctx.tile, ctx.params = fn, tile, params  # parameters are leaves: no saved-tensor bookkeeping
        if recompute.skip():  # a checkpoint's recompute reads only the saved input: backward recomputes the tiles
            return recompute.unused_output(x.shape, x)  # an MLP maps d to d
        out = None
        for i in range(0, rows.shape[0], tile):
            y = fn(rows[i : i + tile])
            if out is None:
                out = torch.empty((rows.shape[0], y.shape[-1]), dtype=y.dtype, device=y.device)
            out[i : i + tile] = y
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        d = x.shape[-1]
        rows, grad = x.reshape(-1, d), grad.reshape(-1, grad.shape[-1])
        need_x = ctx.needs_input_grad[2]
        params = [p for p, need in zip(ctx.params, ctx.needs_input_grad[3:], strict=True) if need]
        dx = torch.empty_like(rows) if need_x else None
        dparams: list[torch.Tensor | None] = [None] * len(params)
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=_rng_devices(x.device)), torch.enable_grad(), \
                torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled), recompute.recomputing():
            _set_rng_state(x.device, ctx.rng)
            for i in range(0, rows.shape[0], ctx.tile):
                xt = rows[i : i + ctx.tile].detach().requires_grad_(need_x)
                y = ctx.fn(xt)
                inputs = ([xt] if need_x else []) + params
                grads = torch.autograd.grad(y, inputs, grad[i : i + ctx.tile], allow_unused=True)
                if need_x:
                    dx[i : i + ctx.tile] = grads[0]
                    grads = grads[1:]
                for j, g in enumerate(grads):
                    if g is not None:
                        dparams[j] = g if dparams[j] is None else dparams[j] + g
        it = iter(dparams)
        param_grads = [next(it) if need else None for need in ctx.needs_input_grad[3:]]
        return (None, None, dx.view_as(x) if need_x else None, *param_grads)


def tiled_mlp(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: list[torch.Tensor],
              tile: int) -> torch.Tensor:
    """fn(x) for a row-wise fn (the MLP), `tile` tokens at a time; `params` are fn's trainable parameters."""
    return _TiledMLP.apply(fn, tile, x, *params)


def mlp(module, x: torch.Tensor) -> torch.Tensor:
    """llama.MLP's forward x (B, S, d) -> (B, S, d), `module.tile` tokens at a time. Each tile runs that same forward
    (the SwiGLU recompute included, where set), which takes it whole: a tile is never longer than the tile size, and
    the tiled forward itself runs without autograd. The output only feeds the residual add (MLP.output), so a
    checkpoint's recompute of it computes nothing (models/recompute.py)."""
    params = [p for p in module.parameters() if p.requires_grad]
    with recompute.output_unused():
        return tiled_mlp(module.forward, x, params, module.tile)


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(device: torch.device, state) -> None:
    cpu, gpu = state
    torch.set_rng_state(cpu)
    if gpu is not None:
        torch.cuda.set_rng_state(gpu, device)
