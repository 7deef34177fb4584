"""The top-p cut's Triton search (engine/kernels/top_p.py) against the sort path (engine/top_p.py), under Triton's
CPU interpreter (conftest sets TRITON_INTERPRET=1), compiled on a GPU with LONGSEQ_TEST_CUDA=1; and the sampler's
kept tokens, cut by the search, against filter_logits."""

import os

import pytest
import torch

from longseq.engine.gumbel_max import kept
from longseq.engine.kernels.top_p import top_p_cut
from longseq.engine.sampler import Sampler
from longseq.engine.sequence import Sequence
from longseq.engine.top_p import candidate_cuts, sorted_cut, top_p_cut_reference
from longseq.generation.sampling import SamplingParams, filter_logits
from longseq.models import fused

ON_GPU = os.environ.get("LONGSEQ_TEST_CUDA") == "1" and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
NEG_INF = float("-inf")


def batch(V: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(logits, inv_temp, floor, top_p, on) for rows that stress the cut: plain, bf16-rounded and coarsely rounded
    logits (many exact ties, also at the cut), top-k floors, top_p tiny (one token) and near 1, -inf outside a
    top-k, a row whose every logit ties, a row of -inf only and rows without top-p."""
    g = torch.Generator().manual_seed(seed)
    B = 14
    logits = torch.randn(B, V, generator=g) * 3
    logits[1:4] = logits[1:4].bfloat16().float()
    logits[4:6] = (logits[4:6] * 2).round() / 2
    logits[6, torch.randperm(V, generator=g)[: V - 40]] = NEG_INF  # as a model that masks all but 40 tokens
    logits[7] = 1.25  # every token ties: the cut falls inside the tie, whichever chunk it reaches
    logits[8] = NEG_INF
    inv_temp = torch.rand(B, generator=g) + 0.4
    top_p = torch.rand(B, generator=g) * 0.9 + 0.05
    top_p[[2, 9]] = 1e-6
    top_p[[3, 10]] = 0.99
    top_p[7] = 0.3337
    on = torch.ones(B, dtype=torch.int64)
    on[[11, 12]] = 0
    scaled = logits * inv_temp[:, None]
    floor = torch.full((B,), NEG_INF)
    for row, k in ((1, 5), (4, 30), (5, 2), (10, 100), (11, 7), (13, V // 2)):
        floor[row] = scaled[row].topk(k).values[-1]
    return tuple(x.to(DEVICE) for x in (logits, inv_temp, floor, top_p, on))


# Triton's interpreter pays per program: the default tiling (one program per row on CPU) sees every row; the small
# tilings, which split rows into chunks and their ties across chunks, see the rows with ties and -inf.
TIED_ROWS = [1, 4, 6, 7, 8, 11]


@pytest.mark.parametrize("V, seed, tiling", [(2053, 0, {}), (1000, 1, dict(block=128, blocks_per_chunk=3)),
                                             (777, 2, dict(thresholds=8)),
                                             (300, 3, dict(block=64, blocks_per_chunk=2, thresholds=32))])
def test_search_equals_the_sort_path(V, seed, tiling):
    args = batch(V, seed)
    if tiling:
        args = tuple(a[TIED_ROWS] for a in args)
    value, index = top_p_cut(*args, **tiling)
    ref_value, ref_index = top_p_cut_reference(*args)
    assert torch.equal(value, ref_value) and torch.equal(index, ref_index)
    assert_cut_where_the_exact_mass_crosses_top_p(args, value.cpu(), index.cpu(), tol=1e-6)
    row = {r: i for i, r in enumerate(TIED_ROWS if tiling else range(len(index)))}
    assert index[row[11]] == V and index[row[8]] == 0  # off rows keep all; a row of -inf cuts at its first
    assert int(index[row[7]]) == int(0.3337 * V)  # inside the tie of every token


def test_a_rows_cut_does_not_depend_on_the_batch_size():
    """Batches of 32 rows and more search with fewer thresholds a pass; each row's cut stays the same (a seeded
    request samples the same tokens whatever shares its batch)."""
    args = batch(300, 4)
    small = top_p_cut(*args)
    large = top_p_cut(*(torch.cat([a] * 3) for a in args))  # 42 rows
    assert all(torch.equal(torch.cat([s] * 3), big) for s, big in zip(small, large, strict=True))


def test_a_kept_candidate_is_the_cut_and_the_others_are_searched():
    """With candidates (the sampler's draw were top-p to keep everything): a row whose candidate the true cut keeps
    gets (its value, its id); the others, the true cut: candidates outside the top-p mass, below the top-k floor,
    inside a tie (kept or not by id), -1, and rows without top-p."""
    args = batch(300, 5)
    logits, inv_temp, floor, top_p, on = args
    scaled = logits * inv_temp[:, None]
    ranked, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    ref = top_p_cut_reference(*args)
    candidate = order[:, 0].clone()  # the top token: kept wherever the row has a token at all
    candidate[[1, 5]] = order[[1, 5], -1]  # the last: below the floor / outside the mass
    candidate[3] = -1
    candidate[4] = order[4, 3]  # inside the coarse ties
    candidate[7] = ref[1][7]  # the row where every token ties: the last kept tie ...
    candidate[10] = ref[1][10] + 1 if ref[1][10] + 1 < 300 else 0  # ... and a token of id just past a cut
    candidate[13] = order[13, 40]
    got = top_p_cut(*args, candidate=candidate)
    want = candidate_cuts(scaled, floor, *ref, candidate, on)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    taken = got[1] == candidate
    assert taken[[0, 7]].all() and not taken[[3, 11, 12]].any()  # kept; -1 and rows without top-p


def assert_cut_where_the_exact_mass_crosses_top_p(args, value, index, tol):
    """Each row's cut, ranked in the stable descending order, has exact (float64) mass < top_p + tol ahead of it,
    and the next token has >= top_p - tol ahead: the cut of the definition, up to float32 rounding."""
    logits, inv_temp, floor, top_p, on = (a.cpu() for a in args)
    ranked, order = torch.sort(logits * inv_temp[:, None], dim=-1, descending=True, stable=True)
    probs = ranked.double().masked_fill(ranked < floor[:, None], NEG_INF).softmax(-1)
    before = probs.cumsum(-1) - probs
    for r in torch.nonzero((on > 0) & torch.isfinite(logits).any(-1)).flatten().tolist():
        n = int((order[r] == int(index[r])).nonzero()) + 1  # tokens kept
        assert float(ranked[r, n - 1]) == float(value[r])
        assert before[r, n - 1] < top_p[r] + tol and (n == logits.shape[1] or before[r, n] >= top_p[r] - tol), r


@pytest.mark.skipif(not ON_GPU, reason="a full Llama-3 vocabulary: LONGSEQ_TEST_CUDA=1")
def test_search_at_full_vocabulary():
    """At 128K tokens the sort path's float32 cumsum strays from the exact mass over a long tie at the cut (the
    bf16 rows): there the search must be the closer of the two; elsewhere they agree."""
    for seed in range(3):
        args = batch(128_256, seed)
        value, index = top_p_cut(*args)
        assert_cut_where_the_exact_mass_crosses_top_p(args, value.cpu(), index.cpu(), tol=1e-6)
        ref_value, ref_index = top_p_cut_reference(*args)
        logits, inv_temp, floor, top_p, on = args
        ranked, order = torch.sort(logits * inv_temp[:, None], dim=-1, descending=True, stable=True)
        exact = sorted_cut(ranked.double(), order, floor[:, None].double(), top_p.double(), on)  # float64 masses
        agree = exact[1] == ref_index
        assert agree.sum() >= len(agree) - 2
        assert torch.equal(value[agree], ref_value[agree]) and torch.equal(index[agree], ref_index[agree])


@pytest.mark.parametrize("quantized", [False, True])
def test_sampler_with_the_search_keeps_what_filter_logits_keeps(monkeypatch, quantized):
    """The sampler's cuts take the kernel (fused.MODE 1: CPU tensors too); each row of a mixed batch keeps exactly
    the tokens filter_logits keeps for it alone."""
    monkeypatch.setattr(fused, "MODE", "1")
    cases = [dict(temperature=1.0, top_p=0.6), dict(temperature=0.5, top_p=0.95), dict(temperature=1.0, top_p=1e-6),
             dict(temperature=0.8, top_k=12, top_p=0.7), dict(temperature=1.1, top_k=30, top_p=0.9, min_p=0.02),
             dict(temperature=1.0, top_p=0.8, min_p=0.1), dict(temperature=0.7, top_k=5), dict(temperature=1.0),
             dict(temperature=0.7, top_p=0.999), dict()]
    V = 500
    logits = torch.randn(len(cases), V, generator=torch.Generator().manual_seed(4)) * 4
    if quantized:
        logits = (logits * 2).round() / 2
    params = [SamplingParams(**c) for c in cases]
    seqs = [Sequence("r", [0], p, None, 1 << 20) for p in params]
    sampler = Sampler(V, DEVICE)
    b = sampler.batch(seqs)
    logits = logits.to(DEVICE)
    mask = kept(logits * b.inv_temp[:, None], *sampler.cuts(logits, b))
    for i, p in enumerate(params[:-1]):
        ref = torch.isfinite(filter_logits(logits[i : i + 1], p.temperature, p.top_k, p.top_p, p.min_p))[0]
        assert torch.equal(mask[i], ref), (p, mask[i].sum(), ref.sum())


def test_the_kernel_is_checked_once_per_device_and_a_wrong_one_is_not_used(monkeypatch, caplog):
    """Before a device's first kernel cut the kernel is checked against the sort (the check's floors are a strided
    view, which the wrapper once read wrongly); a kernel that disagrees (here one that returns the rows' cuts in
    reverse order) leaves the sort in place, with a warning."""
    import logging

    import longseq.engine.kernels.top_p as kernels
    import longseq.engine.top_p as cuts

    monkeypatch.setattr(fused, "MODE", "1")
    monkeypatch.setattr(cuts, "_checked", {})
    device = torch.device(DEVICE)
    assert cuts._kernel_agrees(device, 300) and cuts._checked == {(device, 300): True}
    monkeypatch.setattr(cuts, "_checked", {})
    monkeypatch.setattr(kernels, "top_p_cut", lambda *args: tuple(x.flip(0) for x in top_p_cut(*args)))
    args = [x.to(DEVICE) for x in batch(300, 0)]
    with caplog.at_level(logging.WARNING, logger="longseq.engine"):
        got = cuts.top_p_cut(*args)
    want = top_p_cut_reference(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # keyed by the tensors' device: cuda:0 where DEVICE says cuda
    assert list(cuts._checked.values()) == [False] and "disagrees with the sort" in caplog.text
