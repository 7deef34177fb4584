"""SamplingParams validation, top-k / top-p filtering and the statistics of the sampler."""

import math

import pytest
import torch

from longseq.errors import LongseqError
from longseq.generation.sampling import SamplingParams, filter_logits, sample

# Chi-square critical value for p = 0.001; with a fixed seed the test is deterministic, the margin is for honesty.
CHI2_999 = {2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def _draw(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return sample(logits_row.expand(n, -1).contiguous(), params, g)


# ---- SamplingParams ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_new_tokens=0),
        dict(max_new_tokens=-3),
        dict(temperature=-0.1),
        dict(temperature=float("nan")),  # would reach torch.multinomial as NaN probabilities
        dict(temperature=float("inf")),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=-0.5),
        dict(top_p=1.01),
        dict(top_p=float("nan")),
        dict(min_p=-0.1),
        dict(min_p=1.5),
        dict(min_p=float("nan")),
        dict(repetition_penalty=0.0),
        dict(repetition_penalty=-1.0),
        dict(repetition_penalty=float("inf")),
        dict(logit_bias={"5": 1.0}),  # keys are token ids (the server converts OpenAI's strings)
        dict(logit_bias={-1: 1.0}),
        dict(logit_bias={5: 100.5}),
        dict(logit_bias={5: float("nan")}),
        dict(logit_bias={5: "1"}),
        dict(logit_bias={True: 1.0}),
        dict(stop_token_ids=(3, -1)),
        dict(stop_token_ids=("3",)),
    ],
)
def test_params_validation(kw):
    with pytest.raises(LongseqError) as e:
        SamplingParams(**kw)
    field = next(iter(kw))
    assert e.value.field == field and str(e.value).startswith(field) and "\n" not in str(e.value)


def test_new_params_normalised():
    p = SamplingParams(min_p=0.1, repetition_penalty=1.2, logit_bias={3: -100, 7: 2}, stop_token_ids=[4, 5])
    assert p.stop_token_ids == (4, 5) and p.logit_bias == {3: -100, 7: 2}
    assert SamplingParams().logit_bias == {} and SamplingParams().stop_token_ids == ()


def test_params_valid_edges_and_stop_normalisation():
    SamplingParams(max_new_tokens=1, temperature=0.0, top_k=0, top_p=1.0)
    SamplingParams(top_p=1e-6)
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=("a", "", "bc")).stop == ("a", "bc")


def test_greedy_property():
    assert SamplingParams().greedy
    assert SamplingParams(temperature=0.7, top_k=1).greedy
    assert not SamplingParams(temperature=0.7).greedy
    assert not SamplingParams(temperature=0.7, top_k=2).greedy


# ---- greedy --------------------------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    expected = logits.argmax(-1)
    assert torch.equal(sample(logits, SamplingParams()), expected)
    assert torch.equal(sample(logits, SamplingParams(temperature=2.0, top_k=1)), expected)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(sample(logits, SamplingParams(), g), expected)


# ---- filter_logits -------------------------------------------------------------------------------------


def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, -2.0, 3.0]])
    torch.testing.assert_close(filter_logits(logits, 0.5, 0, 1.0), torch.tensor([[2.0, -4.0, 6.0]]))
    torch.testing.assert_close(filter_logits(logits, 2.0, 0, 1.0), torch.tensor([[0.5, -1.0, 1.5]]))


@pytest.mark.parametrize("k", [1, 2, 5, 9])
def test_top_k_keeps_exactly_k(k):
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(k))  # continuous: no ties
    out = filter_logits(logits, 1.0, k, 1.0)
    finite = torch.isfinite(out)
    assert finite.sum(-1).tolist() == [k, k, k]
    for row in range(3):
        top = set(torch.topk(logits[row], k).indices.tolist())
        assert set(finite[row].nonzero().flatten().tolist()) == top
    torch.testing.assert_close(out[finite], logits[finite])  # kept values untouched
    assert torch.all(out[~finite] == float("-inf"))


@pytest.mark.parametrize("k", [0, 10, 25])
def test_top_k_zero_or_large_keeps_all(k):
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(filter_logits(logits, 1.0, k, 1.0), logits)


# Probabilities placed out of order so sorting and scattering back are exercised.
PROBS = torch.tensor([0.10, 0.50, 0.15, 0.25])  # sorted: 0.50 (1), 0.25 (3), 0.15 (2), 0.10 (0)


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (0.01, {1}),  # the most likely token always stays
        (0.3, {1}),
        (0.49, {1}),
        (0.51, {1, 3}),
        (0.7, {1, 3}),
        (0.74, {1, 3}),
        (0.76, {1, 3, 2}),
        (0.89, {1, 3, 2}),
        (0.91, {0, 1, 2, 3}),
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_hand_computed(top_p, kept):
    logits = PROBS.log()[None]
    out = filter_logits(logits, 1.0, 0, top_p)
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == kept
    idx = sorted(kept)
    torch.testing.assert_close(out[0, idx], logits[0, idx])  # kept logits are not changed


def test_top_p_rows_are_independent():
    logits = torch.stack([PROBS.log(), torch.tensor([0.7, 0.1, 0.1, 0.1]).log()])
    out = filter_logits(logits, 1.0, 0, 0.6)
    assert torch.isfinite(out).tolist() == [[False, True, False, True], [True, False, False, False]]


def test_top_p_after_temperature_and_top_k():
    # Temperature 0.5 squares the probabilities: 0.5^2, 0.25^2, 0.15^2, 0.1^2 normalised -> 0.7143, 0.1786, ...
    logits = PROBS.log()[None]
    assert torch.isfinite(filter_logits(logits, 0.5, 0, 0.7)).sum() == 1
    assert torch.isfinite(filter_logits(logits, 1.0, 0, 0.7)).sum() == 2
    # top-k first (renormalised over 0.5, 0.25 -> 2/3, 1/3), then top-p: 0.6 keeps only the first
    assert torch.isfinite(filter_logits(logits, 1.0, 2, 0.6)).sum() == 1
    assert torch.isfinite(filter_logits(logits, 1.0, 2, 0.7)).sum() == 2


@pytest.mark.parametrize("min_p, kept", [
    (0.0, {0, 1, 2, 3}), (0.19, {0, 1, 2, 3}), (0.29, {1, 2, 3}), (0.31, {1, 3}), (0.49, {1, 3}), (0.51, {1}),
    (1.0, {1}),
])
def test_min_p_hand_computed(min_p, kept):
    # Tokens at least min_p times as likely as the best (0.50): 0.25, 0.15, 0.10 stay up to min_p 0.5, 0.3, 0.2.
    out = filter_logits(PROBS.log()[None], 1.0, 0, 1.0, min_p)
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == kept


def test_top_p_tiny_keeps_one_even_with_flat_logits():
    out = filter_logits(torch.zeros(1, 8), 1.0, 0, 1e-6)
    assert torch.isfinite(out).sum() == 1


# ---- sampling ------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0)
    draws = [
        torch.cat([sample(logits, params, g) for _ in range(20)])
        for g in (torch.Generator().manual_seed(7), torch.Generator().manual_seed(7), torch.Generator().manual_seed(8))
    ]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


@pytest.mark.parametrize("probs", [[0.1, 0.2, 0.3, 0.4], [0.05, 0.6, 0.25, 0.02, 0.08]])
def test_empirical_frequencies_match(probs):
    probs = torch.tensor(probs)
    n = 20000
    tokens = _draw(probs.log(), SamplingParams(temperature=1.0), n, seed=123)
    counts = torch.bincount(tokens, minlength=len(probs)).float()
    assert _chi2(counts, probs) < CHI2_999[len(probs) - 1]
    torch.testing.assert_close(counts / n, probs, atol=0.015, rtol=0)


def test_temperature_sharpens_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 20000
    tokens = _draw(probs.log(), SamplingParams(temperature=0.5), n, seed=5)
    counts = torch.bincount(tokens, minlength=4).float()
    target = probs**2 / (probs**2).sum()  # softmax(log p / 0.5)
    assert _chi2(counts, target) < CHI2_999[3]


def test_top_k_renormalises_and_never_draws_excluded():
    probs = torch.tensor([0.05, 0.3, 0.1, 0.2, 0.25, 0.1])
    n = 20000
    tokens = _draw(probs.log(), SamplingParams(temperature=1.0, top_k=3), n, seed=11)
    counts = torch.bincount(tokens, minlength=6).float()
    assert counts[[0, 2, 5]].sum() == 0
    target = torch.zeros(6)
    target[[1, 3, 4]] = probs[[1, 3, 4]] / probs[[1, 3, 4]].sum()
    assert _chi2(counts, target) < CHI2_999[2]


def test_top_p_never_draws_excluded():
    n = 20000
    tokens = _draw(PROBS.log(), SamplingParams(temperature=1.0, top_p=0.7), n, seed=3)
    counts = torch.bincount(tokens, minlength=4).float()
    assert counts[0] == 0 and counts[2] == 0
    assert _chi2(counts, torch.tensor([0.0, 2 / 3, 0.0, 1 / 3])) < CHI2_999[2]


def test_top_k_and_top_p_together_never_draw_excluded():
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(9)) * 2
    params = SamplingParams(temperature=1.3, top_k=10, top_p=0.8)
    allowed = torch.isfinite(filter_logits(logits, 1.3, 10, 0.8))[0]
    assert 1 < allowed.sum() <= 10
    tokens = _draw(logits[0], params, 5000, seed=4)
    assert allowed[tokens].all()
    assert len(set(tokens.tolist())) == int(allowed.sum())  # every allowed token shows up in 5000 draws


def test_sample_accepts_half_precision_logits():
    probs = torch.tensor([0.25, 0.75])
    tokens = _draw(probs.log().to(torch.bfloat16), SamplingParams(temperature=1.0), 4000, seed=0)
    assert tokens.dtype == torch.int64
    assert math.isclose(float((tokens == 1).float().mean()), 0.75, abs_tol=0.03)
