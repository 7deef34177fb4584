"""Attention over a sequence split across processes equals attention over the whole sequence (float64): outputs and
the gradients of q, k and v, with GQA, sliding windows and packed documents, for Ulysses (sp), ring attention
(cp, load-balanced chunks) and both at once (2D); bad degrees are one-line errors."""

import pytest
import torch
import torch.distributed as dist

from dist_helpers import run_workers
from longseq.attention import attention
from longseq.config import TrainConfig
from longseq.errors import LongseqError
from longseq.train.parallel.env import DistEnv, init_distributed
from longseq.train.parallel.ring_attention import RingAttention, ring_token_index
from longseq.train.parallel.ulysses import UlyssesAttention, check_degree

B, S, D = 2, 32, 8
# (query heads, KV heads, window, packed documents)
CASES = [(4, 2, None, False), (4, 2, 7, False), (4, 4, None, True), (8, 4, 5, True)]
LAYOUTS = {2: [(1, 2), (2, 1)], 4: [(1, 4), (4, 1), (2, 2)]}  # world -> (cp, sp) layouts


def _inputs(h: int, h_kv: int, packed: bool):
    g = torch.Generator().manual_seed(h * 10 + h_kv)
    q = torch.randn(B, h, S, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, h_kv, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    doc_ids = (torch.arange(S) >= torch.tensor([[9], [21]])).long() if packed else None
    grad_out = torch.randn(B, h, S, D, generator=g, dtype=torch.float64)
    return q, k, v, doc_ids, grad_out


def _tokens(env: DistEnv, t: torch.Tensor) -> torch.Tensor:
    """This rank's tokens of a (B, H, S, D) tensor: DistEnv.shard_sequence along dim 2."""
    index = env.shard_sequence(torch.arange(S)[None])[0]
    return t[:, :, index]


def _runs(cp: int, sp: int, h_kv: int) -> bool:
    return h_kv % sp == 0  # Ulysses splits KV heads; the ring has no such limit


def _worker(rank: int, world: int, cases: list):
    out = {}
    for cp, sp in LAYOUTS[world]:
        env = init_distributed(TrainConfig(parallel="ddp", cp=cp, sp=sp, device="cpu", seq_len=S))
        ring = RingAttention(env.group("cp"), cp) if cp > 1 else None
        split = UlyssesAttention(env.group("sp"), sp, ring) if sp > 1 else ring
        for h, h_kv, window, packed in cases:
            if not _runs(cp, sp, h_kv):
                continue
            q, k, v, doc_ids, grad_out = _inputs(h, h_kv, packed)
            qs, ks, vs = (_tokens(env, t).clone().requires_grad_() for t in (q, k, v))
            o = split(qs, ks, vs, window=window, doc_ids=doc_ids)
            o.backward(_tokens(env, grad_out))
            out[(cp, sp, h, h_kv, window, packed)] = [o.detach(), qs.grad, ks.grad, vs.grad]
    dist.barrier()
    return out


def _reference(h, h_kv, window, packed):
    q, k, v, doc_ids, grad_out = _inputs(h, h_kv, packed)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = attention(q, k, v, window=window, doc_ids=doc_ids)  # float64; attention itself is tested against the naive one
    o.backward(grad_out)
    return [o.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("world", [2, 4])
def test_split_attention_equals_full_attention(world):
    results = run_workers(_worker, world, CASES)
    checked = 0
    for rank, rank_out in enumerate(results):
        for (cp, sp, *case), parts in rank_out.items():
            env = DistEnv(rank=rank, world_size=world, parallel="ddp", cp=cp, sp=sp)
            for got, want, what in zip(parts, _reference(*case), ("out", "dq", "dk", "dv"), strict=True):
                torch.testing.assert_close(got, _tokens(env, want), rtol=1e-10, atol=1e-10,
                                           msg=lambda m, c=(cp, sp, *case), w=what: f"{c} {w}: {m}")
            checked += 1
    expected = sum(_runs(cp, sp, c[1]) for cp, sp in LAYOUTS[world] for c in CASES)
    assert checked == world * expected > 0


def test_ring_layout_balances_causal_work():
    # 2·N chunks, rank i holds chunks i and 2N-1-i: every position once, and every rank the same causal work
    for degree in (2, 3, 4):
        held = [ring_token_index(48, degree, r) for r in range(degree)]
        assert sorted(torch.cat(held).tolist()) == list(range(48))
        work = {int((idx + 1).sum()) for idx in held}  # keys a causal query at position p sees: p + 1
        assert len(work) == 1
    assert ring_token_index(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert ring_token_index(8, 2, 1).tolist() == [2, 3, 4, 5]


def test_degree_must_divide_kv_heads():
    check_degree(8, 4)
    with pytest.raises(LongseqError, match="more than the model's 2 KV heads.*--cp has no such limit"):
        check_degree(2, 4)
    with pytest.raises(LongseqError, match="must divide the model's 8 KV heads"):
        check_degree(8, 3)
