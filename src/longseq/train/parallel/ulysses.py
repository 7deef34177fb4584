"""Ulysses sequence parallelism (Jacobs et al. 2023, DeepSpeed-Ulysses, arXiv 2309.14509).

Each of the N processes of a sequence-parallel group holds S/N consecutive tokens of every sequence. Everything but
attention is per token, so it runs on the shard as is (RoPE with the shard's global positions). Attention needs
the whole sequence: an all-to-all turns the sequence shards of all heads, (B, H, S/N, D), into all tokens of H/N
heads, (B, H/N, S, D); attention runs unchanged on those heads; a second all-to-all turns the output back. With
GQA the KV heads are split the same way, so N must divide the number of KV heads: query head h reads KV head
h // (H / H_kv), and both ranges split into N contiguous, matching blocks.

Per layer and direction each GPU sends (N-1)/N of its q, k, v (forward) and of the output: O(S·d / N), independent
of N at fixed S/N, unlike ring attention's O(S·d) (the paper's section 3.2).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longseq.attention import attention
from longseq.errors import LongseqError
from longseq.train.parallel.env import DistEnv
from longseq.train.parallel.ring_attention import RingAttention


class _AllToAll(torch.autograd.Function):
    """x (N, ...) -> chunk j of the output is chunk `rank` of process j's input. Its gradient is the same exchange
    run backwards, which is again an all-to-all (chunk j of the grad goes back to process j)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()  # before empty_like, which would copy a permuted view's strides
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    return _AllToAll.apply(x, group)


def heads_from_sequence(tensors: list[torch.Tensor], group, n: int) -> list[torch.Tensor]:
    """Each (B, H_i, S/n, D) sequence shard -> (B, H_i/n, S, D): this rank's heads over the whole sequence.

    One all-to-all for all of them (q, k, v together), each tensor's heads split into n contiguous blocks.
    """
    B, _, s, D = tensors[0].shape
    heads = [t.shape[1] // n for t in tensors]
    x = torch.cat([t.reshape(B, n, h, s, D) for t, h in zip(tensors, heads, strict=True)], dim=2)
    x = all_to_all(x.permute(1, 0, 2, 3, 4), group)  # (n, B, sum h, s, D): block j of my heads <- rank j's tokens
    x = x.permute(1, 2, 0, 3, 4).reshape(B, sum(heads), n * s, D)  # sequence shards in rank order = whole sequence
    return list(x.split(heads, dim=1))


def sequence_from_heads(x: torch.Tensor, group, n: int) -> torch.Tensor:
    """(B, H/n, S, D) -> (B, H, S/n, D): the inverse of `heads_from_sequence` for one tensor."""
    B, h, S, D = x.shape
    x = all_to_all(x.reshape(B, h, n, S // n, D).permute(2, 0, 1, 3, 4), group)  # (n, B, h, s, D): rank j's heads
    return x.permute(1, 0, 2, 3, 4).reshape(B, n * h, S // n, D)


class UlyssesAttention:
    """What an Attention layer calls instead of `attention` when its sequence is split over `group`.

    q (B, H, S/N, D), k/v (B, H_kv, S/N, D), RoPE already applied at global positions; doc_ids (B, S) are the WHOLE
    sequence's (every rank has the batch, so they need no exchange). Returns (B, H, S/N, D). `inner` attends over
    the gathered tokens: `attention`, or (Ulysses inside ring attention) a RingAttention over the ring's ranks.
    """

    def __init__(self, group, degree: int, inner=None):
        self.group, self.degree, self.inner = group, degree, inner or attention

    def __call__(self, q, k, v, *, window=None, doc_ids=None) -> torch.Tensor:
        q, k, v = heads_from_sequence([q, k, v], self.group, self.degree)
        out = self.inner(q, k, v, window=window, doc_ids=doc_ids)  # (B, H/N, S, D)
        return sequence_from_heads(out, self.group, self.degree)


def check_degree(num_kv_heads: int, degree: int) -> None:
    if degree > num_kv_heads:
        raise LongseqError(f"sp {degree} is more than the model's {num_kv_heads} KV heads: Ulysses splits heads over "
                           "processes, so at most that many can share a sequence this way (--cp has no such limit)")
    if num_kv_heads % degree:
        raise LongseqError(f"sp {degree} must divide the model's {num_kv_heads} KV heads")


def enable_sequence_parallel(model, env: DistEnv) -> None:
    """Make every attention layer of `model` (a CausalLM) attend over the sequence its cp × sp ranks share:
    Ulysses over sp, ring attention over cp, or Ulysses inside each ring rank (both)."""
    if env.cp * env.sp == 1:
        return
    if env.sp > 1:
        check_degree(model.config.num_kv_heads, env.sp)
    ring = RingAttention(env.group("cp"), env.cp) if env.cp > 1 else None
    for layer in model.model.layers:
        layer.self_attn.sequence_parallel = UlyssesAttention(env.group("sp"), env.sp, ring) if env.sp > 1 else ring
