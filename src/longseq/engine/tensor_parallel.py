"""Tensor parallelism for inference (Shoeybi et al. 2019, Megatron-LM, arXiv 1909.08053, section 3).

Each of N processes keeps 1/N of every layer and the model code stays as it is:
- q, k, v, gate and up projections are column-parallel: each rank keeps the output rows of its H/N query heads,
  H_kv/N KV heads and I/N MLP channels, so attention and SwiGLU run on local heads / channels with no exchange;
- o and down projections are row-parallel: each rank multiplies its slice of the input features, and one
  all-reduce per projection sums the partial outputs (two per layer, as in Megatron);
- the embedding and the LM head are vocabulary-parallel: V/N rows each; a lookup outside the rank's rows gives
  zeros and an all-reduce fills them in; the head's partial logits are all-gathered to (..., V);
- each rank's KV cache holds only its own KV heads (the engine sizes it from `local_kv_heads`).

Why not DTensor's `parallelize_module`: the same placements, but every op of a decode step would go through
DTensor dispatch on the host, and a decode step of an 8B model is ~1,200 ops already launch-bound; plain sharded
weights plus four collectives per layer keep the step as cheap as the single-GPU one and capturable in CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from longseq.errors import LongseqError


@dataclass
class TensorParallel:
    size: int
    rank: int
    group: Any = None  # the process group of the N ranks (None: the default group)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + num_embeddings) of the (padded) vocabulary; other ids contribute zeros here."""

    def __init__(self, weight: torch.Tensor, start: int, tp: TensorParallel):
        super().__init__(weight.shape[0], weight.shape[1], _weight=weight, _freeze=True)
        self.start, self.tp = start, tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0)
        dist.all_reduce(out, group=self.tp.group)  # exactly one rank holds each id's row
        return out


class VocabParallelHead(nn.Linear):
    """Logits of this rank's vocabulary rows, all-gathered to the whole vocabulary (padding rows dropped)."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, tp: TensorParallel):
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta")  # weight set below
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.vocab_size, self.tp = vocab_size, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight).contiguous()  # (..., V_pad / N)
        parts = [torch.empty_like(local) for _ in range(self.tp.size)]
        dist.all_gather(parts, local, group=self.tp.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]


def local_kv_heads(model: nn.Module) -> int:
    """KV heads this process holds (and caches): all of them unless the model is tensor-parallel."""
    tp = getattr(model, "tensor_parallel", None)
    return model.config.num_kv_heads // (tp.size if tp else 1)


def check_tensor_parallel(cfg, size: int) -> None:
    if cfg.is_moe:  # the experts are stacked weights, not the linears sharded here (issue 25: expert parallelism)
        raise LongseqError("tensor-parallel serving of mixture-of-experts models is not supported yet; serve it on "
                           "one GPU (--tensor-parallel 1)")
    if cfg.num_kv_heads % size:
        raise LongseqError(f"tensor parallel {size} must divide the model's {cfg.num_kv_heads} KV heads (each GPU "
                           "keeps whole heads)")
    if cfg.intermediate_size % size:
        raise LongseqError(f"tensor parallel {size} must divide the model's MLP width {cfg.intermediate_size}")


def _rows(weight: torch.Tensor, index: int, size: int) -> torch.Tensor:
    n = weight.shape[0] // size
    return weight[index * n : (index + 1) * n]


def _cols(weight: torch.Tensor, index: int, size: int) -> torch.Tensor:
    n = weight.shape[1] // size
    return weight[:, index * n : (index + 1) * n]


def _keep(t: torch.Tensor) -> nn.Parameter:
    # A copy, not a view: the full weight's storage can then be freed.
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=False)


def _all_reduce_output(tp: TensorParallel):
    def hook(module, inputs, output):
        dist.all_reduce(output, group=tp.group)  # sum of the row-parallel partial products
        return output

    return hook


def _row_parallel(linear: nn.Linear, tp: TensorParallel) -> None:
    linear.weight = _keep(_cols(linear.weight, tp.rank, tp.size))
    linear.in_features = linear.weight.shape[1]
    if linear.bias is not None and tp.rank != 0:  # added once, by rank 0, not N times by the all-reduce
        linear.bias = _keep(torch.zeros_like(linear.bias))
    linear.register_forward_hook(_all_reduce_output(tp))


def _column_parallel(linear: nn.Linear, tp: TensorParallel) -> None:
    linear.weight = _keep(_rows(linear.weight, tp.rank, tp.size))
    linear.out_features = linear.weight.shape[0]
    if linear.bias is not None:
        linear.bias = _keep(_rows(linear.bias, tp.rank, tp.size))


def shard_model(model: nn.Module, tp: TensorParallel) -> nn.Module:
    """Keep this rank's slices of a (full, loaded) CausalLM in place and add the collectives; returns it."""
    cfg = model.config
    check_tensor_parallel(cfg, tp.size)
    if getattr(model, "quantization", None):  # a checkpoint stored quantized (models/quant): not sliced here yet
        raise LongseqError(f"quantized weights ({model.quantization}) are served on one GPU for now "
                           "(--tensor-parallel 1)")
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _column_parallel(linear, tp)  # heads are contiguous row blocks of head_dim: whole heads per rank
        for linear in (attn.o_proj, mlp.down_proj):
            _row_parallel(linear, tp)
        attn.num_heads, attn.num_kv_heads = cfg.num_heads // tp.size, cfg.num_kv_heads // tp.size
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    per_rank = -(-cfg.vocab_size // tp.size)  # vocabulary padded to a multiple of N
    start = tp.rank * per_rank

    def vocab_rows(weight: torch.Tensor) -> torch.Tensor:
        rows = weight[start : min(start + per_rank, cfg.vocab_size)]
        pad = rows.new_zeros(per_rank - rows.shape[0], rows.shape[1])
        return torch.cat([rows, pad]) if pad.shape[0] else rows

    embed = VocabParallelEmbedding(_keep(vocab_rows(model.model.embed_tokens.weight)), start, tp)
    head_weight = embed.weight if tied else _keep(vocab_rows(model.lm_head.weight))
    model.model.embed_tokens = embed
    model.lm_head = VocabParallelHead(head_weight, cfg.vocab_size, tp)
    model.tensor_parallel = tp
    return model
