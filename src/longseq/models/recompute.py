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

Regions: `checkpoint` (non-reentrant, as the policies below and the offloader use it) enters `recomputing()` for its
recompute only; the tiled MLP's backward enters it itself. `output_unused()` marks a call whose output no backward
reads; the two together make `skip()` true.

The policies (CausalLM.set_recompute chooses, per layer, which of these run): each spells a decoder layer's maths
(llama.py's forwards, h = x + attention(norm(x)); out = h + mlp(norm(h))) with its checkpoints placed, from the
layer's own pieces, so the numbers are the plain forward's and only what backward keeps differs.
- whole_layer (full; offloaded, whose layer inputs models/offload.py moves to the host): keep the layer's input,
  backward reruns the layer. Around the layer's module call, so FSDP gathers the layer again for the recompute.
- selective (after Korthikanti et al. 2022, arXiv 2205.05198): keep every matmul output; backward recomputes what
  lies between them and holds no weights: q/k norms, RoPE and attention, and the SwiGLU product.
- keep_attention: recompute everything but attention, whose inputs and output stay.
- swiglu_output (selective; plain layers, the last layers of keep_attention / full): recompute silu(gate)·up only.
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


def active() -> bool:
    """True inside backward's recompute of a checkpointed region."""
    return getattr(_state, "recomputing", False)


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


# -- policies ---------------------------------------------------------------------------------------------------------


def whole_layer(layer, x, cos, sin, doc_ids):
    """Full recompute: the layer (B, S, d) -> (B, S, d) keeping only its input x."""
    return checkpoint(layer, x, cos, sin, None, doc_ids)


def selective(layer, x, cos, sin, doc_ids):
    """DecoderLayer.forward keeping every matmul output (B, S, d) -> (B, S, d): the attention core (q/k norms,
    RoPE, attention) is recomputed, and the SwiGLU product, as the layer's MLP does (mlp.recompute_act)."""
    attn = layer.self_attn
    q, k, v = attn.project(layer.input_layernorm(x))
    h = x + attn.output(checkpoint(_attention_core, attn, q, k, v, cos, sin, doc_ids))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _attention_core(attn, q, k, v, cos, sin, doc_ids):
    """q (B, S, H, D), k/v (B, S, H_kv, D) from the projections -> attention output (B, H, S, D)."""
    return attn.attend(*attn.position(q, k, v, cos, sin), None, doc_ids)


def keep_attention(layer, x, cos, sin, doc_ids):
    """DecoderLayer.forward (B, S, d) -> (B, S, d) under two checkpoints around attention instead of one over the
    layer: backward recomputes the norms and projections, but attention's saved q, k, v, output and log-sum-exp
    stay from the forward, so the layer's costliest kernel at long sequences runs once, not twice."""
    q, k, v = checkpoint(_before_attention, layer, x, cos, sin)
    out = layer.self_attn.attend(q, k, v, None, doc_ids)
    return checkpoint(_after_attention, layer, x, out)


def _before_attention(layer, x, cos, sin):
    attn = layer.self_attn
    normed = layer.input_layernorm(x)
    # The recompute needs only the projections' inputs (their adapters'): attention kept q, k and v from the
    # forward, and RoPE's backward reads no values. Qwen3's q/k norms do, so they keep the matmuls.
    with output_unused(attn.q_norm is None):
        q, k, v = attn.project(normed)
    return attn.position(q, k, v, cos, sin)


def _after_attention(layer, x, out):
    h = x + layer.self_attn.output(out)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def swiglu_output(mlp, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """MLP.forward after its projections, silu(gate)·up recomputed in backward: gate, up (B, S, I) -> (B, S, d)."""
    if getattr(mlp.down_proj, "frozen_base", False):
        # LoRA: the checkpoint takes in down_proj too, so silu(gate)·up is not kept as the adapter's input
        # either; its recompute skips the frozen matmul, only the adapter runs again.
        return checkpoint(_swiglu_output, mlp, gate, up)
    return mlp.output(checkpoint(mlp.swiglu, gate, up))


def _swiglu_output(mlp, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return mlp.output(mlp.swiglu(gate, up))
