"""The decoder's maths without autograd: what `generate`, evaluation and every serving step run.

The same layers as llama.py's forward, over a residual stream: each layer returns its MLP output not yet added, so
the add fuses with the next layer's first norm (one kernel, fused.add_rms_norm, where the fused kernels run). The
projections go through the FusedLinear layers that `CausalLM.fuse_projections` made (q/k/v and gate/up one matmul
each, single rows maybe through the Triton GEMV), or through the model's own layers where there are none.

The engine's eager prefill and mixed steps run this layer by layer from Python (its decode steps replay CUDA graphs
captured from it), so it stays lean: no recompute, tiling or offload (training only: llama.py's forwards), and the
layers' pieces called directly instead of through their modules' __call__. A linear layer is still called as a
module: tensor parallelism hooks its all-reduce onto o_proj and down_proj (distributed/tensor_parallel.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from longseq.models import fused
from longseq.models.fused_linear import FusedLinear, fuse
from longseq.models.sparse_moe import SparseMoeBlock

if TYPE_CHECKING:
    from longseq.models.llama import MLP, Attention, CausalLM, Decoder, DecoderLayer, RMSNorm


def hidden(decoder: Decoder, x: torch.Tensor, cos, sin, cache=None, doc_ids=None) -> torch.Tensor:
    """Embeddings x (B, S, d) -> the final-norm hidden states (B, S, d)."""
    delta = None
    for layer in decoder.layers:
        x, delta = layer_step(layer, x, delta, cos, sin, cache, doc_ids)
    return add_norm(decoder.norm, x, delta)[1]


def layer_step(layer: DecoderLayer, x, delta, cos, sin, cache=None, doc_ids=None):
    """DecoderLayer.forward over a residual stream: the layer's input is x + delta (the previous layer's MLP output,
    not yet added); returns (h, MLP output), whose sum is the layer's output."""
    x, normed = add_norm(layer.input_layernorm, x, delta)
    out = attention(layer.self_attn, normed, cos, sin, cache, doc_ids)
    x, normed = add_norm(layer.post_attention_layernorm, x, out)
    return x, mlp(layer.mlp, normed)


def add_norm(norm: RMSNorm, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, norm(h)) for h = x + delta (x alone when delta is None): one kernel where the fused kernels run."""
    if delta is None:
        return x, norm(x)
    if fused.active(x) and delta.dtype == x.dtype:
        return fused.add_rms_norm(x, delta, norm.weight, norm.eps)
    h = x + delta
    return h, norm(h)


def attention(attn: Attention, x, cos, sin, cache=None, doc_ids=None) -> torch.Tensor:
    """Attention.forward: x (B, S, d) -> (B, S, d)."""
    q, k, v = attn.heads(*attn.qkv(x)) if attn.qkv is not None else attn.project(x)
    q, k, v = attn.position(q, k, v, cos, sin)
    out = attn.merge_heads(attn.attend(q, k, v, cache, doc_ids))
    return attn.o(out) if attn.o is not None else attn.o_proj(out)


def mlp(module: MLP | SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """MLP.forward: x (B, S, d) -> (B, S, d)."""
    if isinstance(module, SparseMoeBlock):  # a mixture of experts: its own forward, routing included
        return module(x)
    gate, up = module.gate_up(x) if module.gate_up is not None else (module.gate_proj(x), module.up_proj(x))
    act = module.swiglu(gate, up)
    return module.down(act) if module.down is not None else module.down_proj(act)


def logits(model: CausalLM, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head over final hidden states (..., d) -> (..., V)."""
    return model.head(hidden) if model.head is not None else model.lm_head(hidden)


def fuse_projections(model: CausalLM, enabled: bool = True) -> list[FusedLinear]:
    """CausalLM.fuse_projections: set (or, enabled=False, clear) every layer's FusedLinear projections; returns
    those set."""
    dense = [layer.mlp for layer in model.model.layers if not isinstance(layer.mlp, SparseMoeBlock)]
    if not enabled:
        for layer in model.model.layers:
            layer.self_attn.qkv = layer.self_attn.o = None
        for module in dense:
            module.gate_up = module.down = None
        model.head = None
        return []
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.qkv = attn.qkv or fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        attn.o = attn.o or fuse([attn.o_proj])
    for module in dense:  # a mixture of experts keeps its stacked expert weights (models/moe.py)
        module.gate_up = module.gate_up or fuse([module.gate_proj, module.up_proj])
        module.down = module.down or fuse([module.down_proj])
    found = [m for layer in model.model.layers for m in (layer.self_attn.qkv, layer.self_attn.o)]
    found += [m for module in dense for m in (module.gate_up, module.down)]
    model.head = model.head or fuse([model.lm_head])
    return [m for m in [*found, model.head] if m is not None]
