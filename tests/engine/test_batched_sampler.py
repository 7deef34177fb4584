"""The batched sampler (engine/sampler.py) against the per-row reference (generation/sampling.py): greedy rows,
top-k / top-p / min-p masks, the sampled distribution (chi-square), seeded batch invariance, penalties, logit_bias,
stop tokens and logprobs; the counter-based noise; the Triton draw under the interpreter."""

import math
import random

import pytest
import torch
from engine_helpers import make_engine, run_engine, tiny_lm

from longseq.engine import sampler as sampler_module
from longseq.engine import sampling_batch
from longseq.engine.gumbel_max import gumbel_max_reference, kept
from longseq.engine.sampler import Sampler
from longseq.engine.sequence import Sequence
from longseq.generation import counter_rng
from longseq.generation.sampling import SamplingParams, filter_logits, sample_gumbel

# Chi-square critical values for p = 0.001 by degrees of freedom; with fixed seeds the tests are deterministic.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def seq(params: SamplingParams, prompt=(0,), position: int = 0, seed: int = 0) -> Sequence:
    """A sequence about to sample its output token `position` (its prompt computed, `position` tokens out)."""
    s = Sequence("r", list(prompt), params, None, 1 << 20, seed=seed)
    s.token_ids += [0] * position
    s.num_computed_tokens = len(s)
    return s


def advance(s: Sequence, token: int) -> None:
    s.token_ids.append(token)
    s.num_computed_tokens = len(s)


def kept_mask(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The sampler's kept tokens (B, V) for its non-greedy rows."""
    b = sampler.batch(seqs)
    return kept(logits * b.inv_temp[:, None], *sampler.cuts(logits, b))


# ---- counter-based noise ----------------------------------------------------------------------------------


def test_mix64_matches_python_ints():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-(2**63), 2**63 - 1, (2000,), generator=g, dtype=torch.int64)
    x[:4] = torch.tensor([0, -1, -(2**63), 2**63 - 1])
    ours = counter_rng.mix64(x).tolist()
    assert ours == [counter_rng.signed64(counter_rng.mix64_int(v)) for v in x.tolist()]
    assert len(set(ours)) == len(ours)


def test_uniforms_are_open_unit_and_uniform():
    states = counter_rng.row_states(torch.arange(64) * 7919, torch.arange(64) % 5)
    u = counter_rng.uniforms(states, 4096).flatten()
    assert 0 < u.min() and u.max() < 1
    counts = torch.histc(u, bins=16, min=0, max=1)
    expected = u.numel() / 16
    assert float(((counts - expected) ** 2 / expected).sum()) < 37.7  # chi-square, 15 dof, p = 0.001
    assert abs(float(u[1:] @ u[:-1]) / (u.numel() - 1) - 0.25) < 0.002  # neighbours uncorrelated
    g = counter_rng.gumbel(states, 4096)
    assert abs(float(g.mean()) - 0.5772) < 0.01 and abs(float(g.var()) - math.pi**2 / 6) < 0.03


def test_noise_depends_on_key_position_and_token_only():
    keys = torch.tensor([counter_rng.seed_key(s) for s in (1, 1, 2, 1)])
    u = counter_rng.uniforms(counter_rng.row_states(keys, torch.tensor([0, 0, 0, 1])), 50)
    assert torch.equal(u[0], u[1])
    assert not torch.equal(u[0], u[2]) and not torch.equal(u[0], u[3])
    assert torch.equal(counter_rng.uniforms(counter_rng.row_states(keys[:1], torch.tensor([1])), 50), u[3:4])


# ---- greedy --------------------------------------------------------------------------------------------------


def test_greedy_batch_is_one_argmax_and_uploads_nothing(monkeypatch):
    calls = []
    for module in (sampler_module, sampling_batch):
        monkeypatch.setattr(module, "upload", lambda *a, **k: calls.append(a))
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    seqs = [seq(SamplingParams(max_new_tokens=4)), seq(SamplingParams(temperature=0.8, top_k=1))] * 2
    seqs.append(seq(SamplingParams()))
    out = Sampler(40, "cpu")(logits.clone(), seqs)
    assert torch.equal(out.tokens, logits.argmax(-1)) and out.logprobs is None and not calls


def test_greedy_rows_of_a_mixed_batch_are_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 3
    params = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=1),
              SamplingParams(temperature=0.7, top_p=0.5), SamplingParams(), SamplingParams(temperature=2.0, min_p=0.1)]
    tokens = Sampler(50, "cpu")(logits.clone(), [seq(p, seed=i) for i, p in enumerate(params)]).tokens
    greedy = [i for i, p in enumerate(params) if p.greedy]
    assert tokens[greedy].tolist() == logits[greedy].argmax(-1).tolist()


# ---- top-k / top-p / min-p masks ---------------------------------------------------------------------------

MASK_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_k=200),  # k beyond the vocabulary keeps all
    dict(temperature=1.0, top_p=0.6),
    dict(temperature=0.5, top_p=0.95),
    dict(temperature=1.0, top_p=1e-6),
    dict(temperature=0.9, min_p=0.05),
    dict(temperature=1.7, min_p=0.5),
    dict(temperature=0.8, top_k=12, top_p=0.7),
    dict(temperature=1.1, top_k=30, top_p=0.9, min_p=0.02),
    dict(temperature=1.0, top_p=0.8, min_p=0.1),
    dict(temperature=0.6, top_k=3, min_p=0.3),
]


@pytest.mark.parametrize("quantized", [False, True])
def test_masks_equal_the_per_row_reference(quantized):
    """Every row of a mixed batch keeps exactly the tokens filter_logits keeps for it alone; quantized logits
    (as bf16 logits are) have ties at the cuts, settled the same way."""
    g = torch.Generator().manual_seed(2)
    V = 100
    params = [SamplingParams(**c) for c in MASK_CASES for _ in range(3)]
    random.Random(0).shuffle(params)
    logits = torch.randn(len(params), V, generator=g) * 4
    if quantized:
        logits = (logits * 2).round() / 2
    seqs = [seq(p) for p in params]
    mask = kept_mask(Sampler(V, "cpu"), logits, seqs)
    for i, p in enumerate(params):
        ref = torch.isfinite(filter_logits(logits[i : i + 1], p.temperature, p.top_k, p.top_p, p.min_p))[0]
        assert torch.equal(mask[i], ref), (p, mask[i].sum(), ref.sum())


def naive_kept(logits: list[float], temperature: float, top_k: int, top_p: float, min_p: float) -> set[int]:
    """The definitions in plain Python: rank by logit (ties: lower id first), top-k, then the nucleus of what is
    left, then tokens at least min_p times as likely as the best."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: (-scaled[i], i))
    if top_k:
        order = [i for i in order if scaled[i] >= scaled[order[top_k - 1]]]
    z = sum(math.exp(scaled[i]) for i in order)
    nucleus, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        nucleus.append(i)
        mass += math.exp(scaled[i]) / z
    best = scaled[order[0]]
    return {i for i in nucleus if math.exp(scaled[i] - best) >= min_p}


def test_masks_equal_the_definitions():
    probs = [0.04, 0.3, 0.01, 0.2, 0.15, 0.1, 0.12, 0.08]  # ranked: 1, 3, 4, 6, 5, 7, 0, 2
    logits = torch.tensor([probs]).log()
    cases = [dict(top_k=3), dict(top_p=0.5), dict(top_p=0.51), dict(top_p=0.9), dict(min_p=0.45),
             dict(top_k=4, top_p=0.6), dict(top_p=0.75, min_p=0.55), dict(top_k=6, top_p=0.95, min_p=0.3)]
    for c in cases:
        p = SamplingParams(temperature=1.0, **c)
        mask = kept_mask(Sampler(8, "cpu"), logits.clone(), [seq(p)])[0]
        expected = naive_kept(logits[0].tolist(), 1.0, p.top_k, p.top_p, p.min_p)
        assert set(mask.nonzero().flatten().tolist()) == expected, c


# ---- the sampled distribution ------------------------------------------------------------------------------

PROBS = torch.tensor([0.06, 0.22, 0.02, 0.30, 0.09, 0.15, 0.04, 0.12])  # out of order: the sorts are exercised
DIST_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=1.5, top_k=3),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=0.8, top_k=5, top_p=0.9),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=1.2, top_p=0.95, min_p=0.1),
    dict(temperature=0.9, top_k=6, top_p=0.85, min_p=0.05),
]


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "drew a token the reference never draws"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_sampled_distribution_matches_the_reference():
    """Each case draws N tokens, one per row, in one batch with every other case and some greedy rows: N
    requests with their own seeds, at various output positions. The counts fit the reference distribution
    softmax(filter_logits) by a chi-square test, and would not fit a different one."""
    n = 20_000
    V = len(PROBS)
    logits_row = PROBS.log()
    params = [SamplingParams(**c) for c in DIST_CASES] + [SamplingParams()]
    seqs = [seq(params[i % len(params)], position=i % 37, seed=i) for i in range(n * len(params))]
    tokens = Sampler(V, "cpu")(logits_row.expand(len(seqs), V).contiguous(), seqs).tokens
    for c, case in enumerate(DIST_CASES):
        p = params[c]
        counts = torch.bincount(tokens[c :: len(params)], minlength=V).float()
        target = filter_logits(logits_row[None], p.temperature, p.top_k, p.top_p, p.min_p).softmax(-1)[0]
        dof = int((target > 0).sum()) - 1
        if dof:
            assert chi2(counts, target) < CHI2_999[dof], case
        else:
            assert counts.count_nonzero() == 1
        # The test has the power to tell: the same counts fail it against the distribution with 3% of the mass
        # moved between two kept tokens, and against the distribution without the case's cuts.
        shifted = target.clone()
        shifted[target.argmax()] -= 0.03
        shifted[torch.where(target > 0, target, 2).argmin()] += 0.03
        assert chi2(counts, shifted) > CHI2_999[dof], case
        uncut = (logits_row / p.temperature).softmax(-1)
        assert torch.equal(uncut > 0, target > 0) or chi2(counts, uncut) > CHI2_999[7], case
    assert tokens[len(DIST_CASES) :: len(params)].unique().tolist() == [int(PROBS.argmax())]


def test_draws_match_the_reference_sampler_token_for_token():
    """sample_gumbel (the per-row reference with the same noise) draws the batched sampler's tokens."""
    g = torch.Generator().manual_seed(3)
    V = 64
    params = [SamplingParams(**c) for c in MASK_CASES] * 4
    logits = torch.randn(len(params), V, generator=g) * 3
    seqs = [seq(p, position=i, seed=100 + i) for i, p in enumerate(params)]
    tokens = Sampler(V, "cpu")(logits.clone(), seqs).tokens
    for i, (p, s) in enumerate(zip(params, seqs, strict=True)):
        states = counter_rng.row_states(torch.tensor([s.rng_key]), torch.tensor([i]))
        assert int(sample_gumbel(logits[i : i + 1], p, states)) == int(tokens[i])


# ---- seeded batch invariance -------------------------------------------------------------------------------


def step_logits(step: int, V: int) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(1000 + step)) * 2


def test_the_searchs_candidate_shortcut_draws_the_reference_tokens(monkeypatch):
    """Through the kernels (fused.MODE 1: the top-p search with each row's draw as its candidate, the Triton draw;
    under the interpreter) the tokens equal the eager path's (sort cut, reference draw), row by row, over several
    output positions: a candidate the cut keeps is the draw among the kept tokens too."""
    import longseq.engine.kernels.top_p as kernels
    from longseq.engine import top_p
    from longseq.models import fused

    search, taken = kernels.top_p_cut, []

    def recording(*args):  # how many rows the candidate shortcut took
        cut = search(*args)
        if len(args) > 5:
            taken.append(int((cut[1] == args[5]).sum()))
        return cut

    monkeypatch.setattr(kernels, "top_p_cut", recording)
    monkeypatch.setattr(top_p, "_checked", {})
    V = 257
    g = torch.Generator().manual_seed(9)
    cases = [dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, top_p=0.5), dict(temperature=1.3, top_p=0.3),
             dict(temperature=1.0, top_k=20, top_p=0.8), dict(temperature=0.9, top_p=0.95, min_p=0.05),
             dict(temperature=0.0, top_p=0.9), dict(temperature=1.0)]
    logits = torch.randn(len(cases), V, generator=g) * 3
    draws = {}
    for mode in ("0", "1"):
        monkeypatch.setattr(fused, "MODE", mode)
        sampler = Sampler(V, "cpu")
        draws[mode] = [sampler(logits.clone(), [seq(SamplingParams(**c), position=pos, seed=11 * i + 1)
                                               for i, c in enumerate(cases)]).tokens.tolist() for pos in range(6)]
    assert draws["1"] == draws["0"]
    assert top_p._checked[(torch.device("cpu"), V)] and len(taken) == 1 + 6  # the device check, then every step
    assert 0 < sum(taken[1:]) < 6 * 5  # the shortcut took some rows, the search the others


def test_seeded_request_draws_the_same_tokens_in_any_batch():
    """A seeded request's tokens over several steps: alone, and at different rows of changing batches of greedy,
    seeded and unseeded requests with other parameters (its penalty counts follow it between compositions)."""
    V, steps = 60, 8
    mine = SamplingParams(temperature=0.9, top_k=30, top_p=0.95, min_p=0.02, seed=1234, presence_penalty=0.5,
                          repetition_penalty=1.1, logit_bias={3: 1.0})

    def run(params, row_of_step, others_of_step) -> list[int]:
        sampler, s, out = Sampler(V, "cpu"), seq(params, prompt=[3, 4, 5]), []
        for step in range(steps):
            others = others_of_step(step)
            row = row_of_step(step, len(others))
            batch = others[:row] + [s] + others[row:]
            logits = torch.stack([step_logits(step, V) if x is s else torch.randn(V) * 3 for x in batch])
            tokens = sampler(logits, batch).tokens.tolist()
            for x, t in zip(batch, tokens, strict=True):
                advance(x, t)
            out.append(tokens[row])
        return out

    alone = run(mine, lambda step, n: 0, lambda step: [])
    crowd = [seq(SamplingParams(**c), seed=i) for i, c in enumerate(MASK_CASES)]
    crowd += [seq(SamplingParams()), seq(SamplingParams(temperature=1.0, seed=1234)),
              seq(SamplingParams(temperature=0.5, frequency_penalty=1.0, logprobs=3))]
    assert run(mine, lambda step, n: n // 2, lambda step: crowd) == alone  # a steady batch
    assert run(mine, lambda step, n: step % (n + 1), lambda step: crowd[: 2 + step]) == alone  # changing ones
    assert run(mine, lambda step, n: n, lambda step: crowd[step:]) == alone
    assert run(SamplingParams(**{**mine.__dict__, "seed": 1235}), lambda step, n: 0, lambda step: []) != alone


def test_unseeded_requests_get_their_own_seeds():
    engine = make_engine(tiny_lm())
    engine.seeds = random.Random(0)  # the engine's own generator draws each unseeded request's seed
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=1.0)
    a, b = run_engine(engine, [[1, 2, 3], [1, 2, 3]], params)
    assert a.token_ids != b.token_ids


# ---- penalties and logit_bias --------------------------------------------------------------------------------


def adjusted(params: list[SamplingParams], prompts: list[list[int]], outputs: list[list[int]],
             logits: torch.Tensor) -> torch.Tensor:
    sampler = Sampler(logits.shape[1], "cpu")
    seqs = [seq(p, prompt=pr) for p, pr in zip(params, prompts, strict=True)]
    for s, out in zip(seqs, outputs, strict=True):
        s.token_ids += out
    logits = logits.clone()
    sampler.adjust(logits, sampler.batch(seqs))
    return logits


def test_presence_and_frequency_penalties_hand_computed():
    # OpenAI: logit -= presence * [count > 0] + frequency * count, over the output only.
    out = adjusted([SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)], [[1, 1, 2]], [[2, 4, 4, 4]],
                   torch.ones(1, 6))
    assert out[0].tolist() == [1, 1, 1 - 0.5 - 0.25, 1, 1 - 0.5 - 0.75, 1]


def test_repetition_penalty_hand_computed():
    # HF / vLLM: over prompt and output, positive logits divided, negative multiplied.
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5, 0.0]])
    out = adjusted([SamplingParams(repetition_penalty=2.0)], [[0, 1]], [[3, 5]], logits)
    assert out[0].tolist() == [1.0, -4.0, 3.0, -2.0, 0.5, 0.0]


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(4)
    prompt, output = [5, 9, 9, 30], [2, 5, 41]
    logits = torch.randn(1, 50, generator=g)
    ours = adjusted([SamplingParams(repetition_penalty=1.3)], [prompt], [output], logits)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_all_penalties_together_and_neighbours_untouched():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 20, generator=g)
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.5, presence_penalty=-1.0, frequency_penalty=0.5),
              SamplingParams(temperature=0.7)]
    prompts, outputs = [[1, 2], [3, 4], [5, 6]], [[7, 7], [4, 8, 8, 8], [9]]
    out = adjusted(params, prompts, outputs, logits)
    assert torch.equal(out[[0, 2]], logits[[0, 2]])
    x = logits[1].clone()
    for t in (3, 4, 8):  # repetition first (vLLM's order), then OpenAI's two
        x[t] = x[t] / 1.5 if x[t] > 0 else x[t] * 1.5
    counts = torch.bincount(torch.tensor([4, 8, 8, 8]), minlength=20).float()
    x -= 0.5 * counts - 1.0 * (counts > 0).float()
    torch.testing.assert_close(out[1], x)


def test_penalty_counts_follow_the_sampled_tokens_on_the_device():
    """The counts grow by each step's sampled token without the host telling them (async scheduling)."""
    V = 10
    sampler = Sampler(V, "cpu")
    s = seq(SamplingParams(frequency_penalty=1.0))
    logits = torch.zeros(1, V)
    logits[0, 4] = 2.5  # greedy: 4, 4, 4 (penalised to 1.5, 0.5), then 0 once 4 drops below the rest
    tokens = []
    for _ in range(4):
        tokens.append(int(sampler(logits.clone(), [s]).tokens[0]))  # the host never appends them
    assert tokens == [4, 4, 4, 0]
    sampler.release(s)
    assert sampler.penalties.free and not sampler.penalties.slot_of


def test_logit_bias():
    logits = torch.zeros(2, 8)
    params = [SamplingParams(logit_bias={3: 5.0, 6: -100}), SamplingParams(temperature=1.0, logit_bias={1: 100})]
    out = adjusted(params, [[0], [0]], [[], []], logits)
    assert out[0].tolist() == [0, 0, 0, 5.0, 0, 0, -100, 0] and out[1].tolist() == [0, 100, 0, 0, 0, 0, 0, 0]
    seqs = [seq(p, seed=i) for i, p in enumerate(params)]
    assert Sampler(8, "cpu")(logits.clone(), seqs).tokens.tolist() == [3, 1]


def test_stop_token_ids_finish_like_eos():
    lm = tiny_lm()
    prompt = [5, 6, 7, 8]
    free = run_engine(make_engine(lm), [prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))[0].token_ids
    stop = free[4]
    first = free.index(stop)
    for ignore_eos in (False, True):
        params = SamplingParams(max_new_tokens=12, ignore_eos=ignore_eos, stop_token_ids=(stop, 96))
        out = run_engine(make_engine(lm), [prompt], params)[0]
        assert out.finish_reason == "stop" and out.token_ids == free[: first + 1]  # kept, as EOS is
        assert out.text == lm.tokenizer.decode(free[:first])  # but not its text


def test_token_ids_outside_the_vocabulary_are_refused():
    engine = make_engine(tiny_lm())
    for params in (SamplingParams(logit_bias={97: 1.0}), SamplingParams(stop_token_ids=(2, 97))):
        with pytest.raises(Exception, match="must be in \\[0, 97\\)") as e:
            engine.add_request([1, 2], params)
        assert e.value.param in ("logit_bias", "stop_token_ids")


# ---- logprobs ----------------------------------------------------------------------------------------------


def test_logprobs_equal_the_per_row_reference():
    g = torch.Generator().manual_seed(6)
    V = 80
    params = [SamplingParams(logprobs=3), SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, logprobs=0),
              SamplingParams(temperature=1.2, top_p=0.9, logprobs=5, presence_penalty=1.0, logit_bias={7: 3.0}),
              SamplingParams(logprobs=20, repetition_penalty=1.4)]
    logits = torch.randn(len(params), V, generator=g) * 3
    seqs = [seq(p, prompt=[7, 8], seed=i) for i, p in enumerate(params)]
    out = Sampler(V, "cpu")(logits.clone(), seqs)
    lp = out.logprobs
    assert lp.rows == [0, 2, 3, 4] and lp.top_values.shape == (4, 20)
    for r, row in enumerate(lp.rows):
        ref = torch.log_softmax(logits[row], -1)  # the model's distribution, before bias and penalties
        assert float(lp.chosen[r]) == float(ref[out.tokens[row]])
        top = ref.topk(20)
        assert torch.equal(lp.top_values[r], top.values) and torch.equal(lp.top_ids[r], top.indices)


# ---- the Triton draw ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("B, V, tiling", [(1, 7, {}), (9, 1000, {}), (33, 4099, {}), (17, 1000, dict(block=64)),
                                          (12, 1000, dict(block=32, blocks_per_chunk=3))])
def test_triton_draw_equals_the_reference(B, V, tiling):
    from longseq.engine.kernels.gumbel_max import gumbel_max

    g = torch.Generator().manual_seed(B)
    logits = torch.randn(B, V, generator=g) * 3
    logits[0, V // 3] = logits[0, V - 1] = logits[0].max() + 1  # a tie, in different chunks: the lower id wins
    inv_temp = torch.rand(B, generator=g) + 0.3
    inv_temp[::4] = 0  # greedy rows
    scaled = logits * inv_temp[:, None]
    ranked, order = scaled.sort(dim=-1, descending=True, stable=True)
    k = torch.randint(0, V, (B,), generator=g)
    floor = torch.where(torch.arange(B) % 3 == 1, ranked.gather(1, k[:, None])[:, 0], float("-inf"))
    on = torch.arange(B) % 2 == 0
    cut_value = torch.where(on, ranked.gather(1, k[:, None] // 2)[:, 0], float("-inf"))
    cut_index = torch.where(on, order.gather(1, k[:, None] // 2)[:, 0], V)
    keys = torch.randint(-(2**63), 2**63 - 1, (B,), generator=g)
    positions = torch.randint(0, 5000, (B,), generator=g)
    args = (logits, inv_temp, floor, cut_value, cut_index, keys, positions)
    expected = gumbel_max_reference(*args)
    assert torch.equal(gumbel_max(*args, **tiling), expected)
    assert int(expected[0]) == V // 3
