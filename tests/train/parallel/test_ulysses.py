"""Ulysses attention over sequence shards equals attention over the whole sequence (float64): outputs and the
gradients of q, k and v, with GQA, sliding windows and packed documents; bad degrees are one-line errors."""

import pytest
import torch
import torch.distributed as dist

from dist_helpers import run_workers
from longseq.attention import attention
from longseq.config import TrainConfig
from longseq.errors import LongseqError
from longseq.train.parallel.env import init_distributed
from longseq.train.parallel.ulysses import UlyssesAttention, check_degree

B, S, D = 2, 24, 8
# (query heads, KV heads, window, packed documents)
CASES = [(4, 2, None, False), (4, 2, 7, False), (4, 4, None, True), (8, 4, 5, True)]


def _inputs(h: int, h_kv: int, packed: bool):
    g = torch.Generator().manual_seed(h * 10 + h_kv)
    q = torch.randn(B, h, S, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, h_kv, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    doc_ids = (torch.arange(S) >= torch.tensor([[9], [15]])).long() if packed else None
    grad_out = torch.randn(B, h, S, D, generator=g, dtype=torch.float64)
    return q, k, v, doc_ids, grad_out


def _worker(rank: int, world: int, cases: list):
    env = init_distributed(TrainConfig(parallel="ddp", sequence_parallel=world, device="cpu", seq_len=S))
    shard = slice(rank * S // world, (rank + 1) * S // world)
    out = []
    for h, h_kv, window, packed in cases:
        if h_kv % world:
            continue
        q, k, v, doc_ids, grad_out = _inputs(h, h_kv, packed)
        qs, ks, vs = (t[:, :, shard].clone().requires_grad_() for t in (q, k, v))
        o = UlyssesAttention(env.sp_group, world)(qs, ks, vs, window=window, doc_ids=doc_ids)
        o.backward(grad_out[:, :, shard])
        # Gather every rank's shard of the output and of the input gradients, in rank order.
        parts = []
        for t in (o.detach(), qs.grad, ks.grad, vs.grad):
            pieces = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(pieces, t.contiguous())
            parts.append(torch.cat(pieces, dim=2))
        out.append(((h, h_kv, window, packed), parts))
    return out


def _reference(h, h_kv, window, packed):
    q, k, v, doc_ids, grad_out = _inputs(h, h_kv, packed)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = attention(q, k, v, window=window, doc_ids=doc_ids)  # float64; attention itself is tested against the naive one
    o.backward(grad_out)
    return [o.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_equals_full_attention(world):
    results = run_workers(_worker, world, CASES)
    checked = 0
    for rank_out in results:
        for case, parts in rank_out:
            for got, want, what in zip(parts, _reference(*case), ("out", "dq", "dk", "dv"), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10,
                                           msg=lambda m, c=case, w=what: f"{c} {w}: {m}")
            checked += 1
    assert checked == world * sum(1 for c in CASES if c[1] % world == 0) > 0


def test_degree_must_divide_kv_heads():
    check_degree(8, 4)
    with pytest.raises(LongseqError, match="more than the model's 2 KV heads"):
        check_degree(2, 4)
    with pytest.raises(LongseqError, match="must divide the model's 8 KV heads"):
        check_degree(8, 3)


def test_config_checks():
    with pytest.raises(LongseqError, match="multiple of sequence_parallel"):
        TrainConfig(seq_len=30, sequence_parallel=4)
    with pytest.raises(LongseqError, match="fsdp_offload needs --parallel fsdp"):
        TrainConfig(parallel="ddp", fsdp_offload=True)
    with pytest.raises(LongseqError, match="sequence_parallel needs several processes"):
        TrainConfig(parallel="none", sequence_parallel=2)
