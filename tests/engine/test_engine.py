"""LLMEngine end to end on a tiny random float64 model: batching, preemption and chunked prefill change nothing;
aborts free every block; prefix caching; stop strings, EOS, length; logprobs; penalties; seeds; bad requests."""

import random
from pathlib import Path

import pytest
import torch
from engine_helpers import (
    TINY_VOCAB,
    FakeTokenizer,
    assert_idle,
    make_engine,
    random_prompts,
    random_traffic,
    run_engine,
    tiny_lm,
)

from longseq.engine import SamplingParams
from longseq.engine.sampler import Sampler
from longseq.engine.sequence import Sequence
from longseq.errors import LongseqError
from longseq.generation import generate_tokens
from longseq.models.loader import LoadedModel
from tiny_models import random_model

N_OUT = 12
GREEDY = SamplingParams(max_new_tokens=N_OUT, ignore_eos=True)

CONFIGS = {
    "roomy": dict(kv_block_size=16, num_kv_blocks=64),
    "tight": dict(kv_block_size=4, num_kv_blocks=20, max_num_batched_tokens=16),  # preempts and chunks
    "few-seqs": dict(kv_block_size=8, num_kv_blocks=40, max_num_seqs=3, max_num_batched_tokens=7),
    "no-prefix-cache": dict(kv_block_size=4, num_kv_blocks=20, max_num_batched_tokens=16,
                            enable_prefix_caching=False),
}


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def prompts():
    stem = random_prompts(1, 10, 10, seed=9)[0]  # some prompts share a prefix, to exercise the prefix cache
    return random_prompts(8, 1, 40, seed=0) + [stem + p for p in random_prompts(4, 1, 30, seed=1)]


def solo(lm, prompt, params=GREEDY, **options):
    return run_engine(make_engine(lm, **options), [prompt], params)[0]


@pytest.fixture(scope="module")
def singles(lm, prompts):
    return [solo(lm, p) for p in prompts]


@torch.no_grad()
def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Float64 logits of the last position by one full forward pass, no cache."""
    return model(torch.tensor([ids]))[0, -1].double()


# ---- batching, preemption, chunked prefill ------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_batched_equals_one_at_a_time(lm, prompts, singles, config):
    engine = make_engine(lm, **CONFIGS[config])
    outs = run_engine(engine, prompts, GREEDY)
    assert [o.token_ids for o in outs] == [s.token_ids for s in singles]
    assert [o.text for o in outs] == [s.text for s in singles]
    assert all(o.finished and o.finish_reason == "length" and len(o.token_ids) == N_OUT for o in outs)
    if config.startswith(("tight", "no-prefix")):
        assert engine.stats()["num_preempted"] > 0
    assert_idle(engine)


def test_single_requests_equal_generate_tokens(lm, prompts, singles):
    for prompt, out in zip(prompts, singles, strict=True):
        assert out.token_ids == list(generate_tokens(lm.model, prompt, GREEDY))


@pytest.mark.parametrize("window", [3, 8])
def test_sliding_window_model(window, prompts):
    lm = tiny_lm(sliding_window=window)
    outs = run_engine(make_engine(lm, **CONFIGS["tight"]), prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == list(generate_tokens(lm.model, prompt, GREEDY))


def test_mixture_of_experts_model(prompts):
    # Qwen3-MoE-like: routed experts (top 2 of 4) on every layer; chunked, preempted batches as the dense model
    lm = LoadedModel(random_model(3, vocab_size=TINY_VOCAB, num_experts=4, experts_per_token=2,
                                  moe_intermediate_size=24, norm_topk_prob=True).double(), FakeTokenizer(), Path("moe"))
    outs = run_engine(make_engine(lm, **CONFIGS["tight"]), prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == list(generate_tokens(lm.model, prompt, GREEDY))


def test_generation_reaches_past_many_blocks(lm):
    prompt = [3, 1, 4, 1, 5]
    params = SamplingParams(max_new_tokens=60, ignore_eos=True)
    out = solo(lm, prompt, params, kv_block_size=4, num_kv_blocks=17)
    assert out.token_ids == list(generate_tokens(lm.model, prompt, params))


# ---- aborts and block accounting ----------------------------------------------------------------------------


def test_abort_running_and_waiting(lm, prompts, singles):
    engine = make_engine(lm, kv_block_size=4, num_kv_blocks=30, max_num_seqs=4, max_num_batched_tokens=16)
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    for _ in range(3):
        engine.step()
    running = [s.request_id for s in engine.scheduler.running]
    waiting = [s.request_id for s in engine.scheduler.waiting]
    assert len(running) >= 2 and len(waiting) >= 2
    victims = running[:2] + waiting[-2:]
    for rid in victims:
        out = engine.abort(rid)
        assert out.finished and out.finish_reason == "abort" and out.request_id == rid
    assert engine.abort(victims[0]) is None and engine.abort("no-such-request") is None
    assert engine.stats()["num_running"] == len(running) - 2
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id not in victims
            if out.finished:
                done[out.request_id] = out
    assert_idle(engine)
    assert set(done) == set(ids) - set(victims)
    for rid, single in zip(ids, singles, strict=True):
        if rid in done:
            assert done[rid].token_ids == single.token_ids


def test_abort_mid_prefill(lm):
    engine = make_engine(lm, kv_block_size=4, num_kv_blocks=30, max_num_batched_tokens=8)
    rid = engine.add_request(list(range(40)), GREEDY)
    assert engine.step() == []  # first chunk only
    seq = engine.seqs[rid]
    assert 0 < seq.num_computed_tokens < 40 and seq.block_table
    engine.abort(rid)
    assert_idle(engine)


@pytest.mark.parametrize("seed", range(3))
def test_random_adds_aborts_and_steps_leave_nothing_behind(lm, seed):
    rng = random.Random(seed)
    engine = make_engine(lm, kv_block_size=4, num_kv_blocks=24, max_num_seqs=rng.randint(2, 6),
                         max_num_batched_tokens=rng.randint(8, 40))
    counts = random_traffic(engine, rng, 150, add=0.25, abort=0.10, max_prompt=40, max_new=20)
    assert counts["finished"] > 5
    assert_idle(engine)


def test_no_deadlock_when_queue_head_has_prefix_hits(lm):
    # The queue head finds cached blocks but not enough free ones; the running request is then preempted and
    # needs every block but those. (The scheduler test has the details; here the whole engine must finish.)
    engine = make_engine(lm, kv_block_size=4, num_kv_blocks=10)
    shared = list(range(50, 59))
    run_engine(engine, [shared], SamplingParams(max_new_tokens=1))
    rid = engine.add_request([1, 2, 3, 4], SamplingParams(max_new_tokens=32, ignore_eos=True))
    while len(engine.seqs[rid]) < 32:
        engine.step()
    out = run_engine(engine, [shared], SamplingParams(max_new_tokens=1), max_steps=200)[0]
    assert out.finished and rid not in engine.seqs
    assert_idle(engine)


# ---- prefix caching -----------------------------------------------------------------------------------------


def test_prefix_cache_hits_and_changes_nothing(lm):
    bs = 8
    shared = random_prompts(1, 3 * bs + 5, 3 * bs + 5, seed=5)[0]  # 3 full blocks and a bit
    a, b = shared + [1, 2, 3], shared + [4, 5]
    engine = make_engine(lm, kv_block_size=bs)
    out_a = run_engine(engine, [a], GREEDY)[0]
    rid = engine.add_request(b, GREEDY)
    engine.step()
    assert engine.seqs[rid].num_cached_tokens == 3 * bs
    while engine.has_unfinished():
        for out in engine.step():
            out_b = out
    # The cache holds A's output blocks too: a prompt that continues A's output hits beyond A's prompt.
    c = a + out_a.token_ids[:9]
    rid = engine.add_request(c, GREEDY)
    engine.step()
    assert engine.seqs[rid].num_cached_tokens == (len(c) - 1) // bs * bs > len(a)
    while engine.has_unfinished():
        for out in engine.step():
            out_c = out
    assert_idle(engine)
    uncached = run_engine(make_engine(lm, kv_block_size=bs, enable_prefix_caching=False), [a, b, c], GREEDY)
    assert [o.token_ids for o in uncached] == [out_a.token_ids, out_b.token_ids, out_c.token_ids]
    assert out_c.token_ids[: N_OUT - 9] == out_a.token_ids[9:]  # the same greedy continuation


def test_prefix_cache_concurrent_requests(lm):
    shared = random_prompts(1, 20, 20, seed=6)[0]
    prompts = [shared + [i] for i in range(6)]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    engine = make_engine(lm, kv_block_size=4, max_num_seqs=2)  # the later ones find the first ones' blocks
    outs = run_engine(engine, prompts, params)
    assert engine.blocks.cached
    ref = run_engine(make_engine(lm, kv_block_size=4, enable_prefix_caching=False), prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]


# ---- finishing: stop strings, EOS, length -------------------------------------------------------------------


def test_stop_strings_cut_text_and_stream(lm, prompts, singles):
    text = singles[0].text
    words = text.split(" ")
    assert len(words) > 8
    cut = text.index(" " + words[4])
    stop = text[cut + 2 : cut + 2 + len(words[4]) + 2]  # straddles two tokens: "<digits> w<digit>"
    first = text.find(stop)
    streams = {}
    engine = make_engine(lm)
    params = [
        SamplingParams(max_new_tokens=N_OUT, ignore_eos=True, stop=("zzz", stop)),
        GREEDY,
        SamplingParams(max_new_tokens=N_OUT, ignore_eos=True, stop=("never seen",)),  # holds back text to the end
    ]
    out, plain, unhit = run_engine(engine, prompts[:3], params, streams=streams)
    assert out.finish_reason == "stop" and out.text == text[:first]
    assert len(out.token_ids) < N_OUT
    assert plain.token_ids == singles[1].token_ids and plain.finish_reason == "length"
    assert unhit.token_ids == singles[2].token_ids and unhit.finish_reason == "length"
    for o in (out, plain, unhit):
        assert "".join(streams[o.request_id]) == o.text  # streamed pieces add up to the text
    assert plain.text == singles[1].text and unhit.text == singles[2].text
    assert_idle(engine)


def test_max_tokens_and_context_limit(lm, prompts):
    out = solo(lm, prompts[0], SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    engine = make_engine(lm, max_model_len=20)
    out = run_engine(engine, [list(range(15))], SamplingParams(max_new_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_eos_finishes_with_stop(prompts, singles):
    ref = singles[2].token_ids
    eos = ref[3]
    lm = tiny_lm(eos_token_id=eos)
    stop_at = ref.index(eos)
    out = solo(lm, prompts[2], SamplingParams(max_new_tokens=N_OUT))
    assert out.finish_reason == "stop" and out.token_ids == ref[: stop_at + 1]  # the EOS token is kept
    assert out.text == lm.tokenizer.decode(ref[:stop_at])  # but not its text
    assert solo(lm, prompts[2], GREEDY).token_ids == ref  # ignore_eos


# ---- logprobs -----------------------------------------------------------------------------------------------


def test_logprobs_are_the_models(lm, prompts):
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=5)
    engine = make_engine(lm, kv_block_size=4, max_num_batched_tokens=8)
    outs = run_engine(engine, prompts[:3], params)
    for prompt, out in zip(prompts[:3], outs, strict=True):
        assert len(out.logprobs) == len(out.token_ids)
        for t, lp in enumerate(out.logprobs):
            ref = torch.log_softmax(full_logits(lm.model, prompt + out.token_ids[:t]), -1)
            assert lp.token_id == out.token_ids[t] and lp.token == lm.tokenizer.decode([lp.token_id])
            assert abs(lp.logprob - ref[lp.token_id].item()) < 1e-4
            assert len(lp.top) == 5
            assert [v for _, _, v in lp.top] == sorted((v for _, _, v in lp.top), reverse=True)
            assert lp.top[0][0] == lp.token_id and lp.top[0][2] == lp.logprob  # greedy: the best one
            assert [i for i, _, _ in lp.top] == ref.topk(5).indices.tolist()
            for i, text, v in lp.top:
                assert text == lm.tokenizer.decode([i]) and abs(v - ref[i].item()) < 1e-4


def test_logprobs_optional_and_raw(lm, prompts):
    outs = run_engine(make_engine(lm), prompts[:3], [
        SamplingParams(max_new_tokens=4, ignore_eos=True),
        SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=0),
        SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=2, frequency_penalty=2.0, presence_penalty=2.0),
    ])
    assert outs[0].logprobs is None
    assert len(outs[1].logprobs) == 4 and all(lp.top == [] for lp in outs[1].logprobs)
    for t, lp in enumerate(outs[2].logprobs):  # of the model's distribution, before penalties
        ref = torch.log_softmax(full_logits(lm.model, prompts[2] + outs[2].token_ids[:t]), -1)
        assert abs(lp.logprob - ref[lp.token_id].item()) < 1e-4


# ---- penalties ----------------------------------------------------------------------------------------------


def penalized_reference(model, prompt, n, presence, frequency):
    """Greedy decoding by full forward passes with OpenAI-style penalties over the generated tokens."""
    out = []
    for _ in range(n):
        logits = full_logits(model, prompt + out)
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[-1]).double()
        out.append(int((logits - frequency * counts - presence * (counts > 0).double()).argmax()))
    return out


def test_apply_penalties_formula():
    seqs = [Sequence(str(i), [0, 1], SamplingParams(presence_penalty=p, frequency_penalty=f), None, 8)
            for i, (p, f) in enumerate([(0.5, 0.25), (0.0, 0.0), (-1.0, 0.0)])]
    for s in seqs:
        s.token_ids += [3, 3, 5]
    sampler = Sampler(8, "cpu")
    out = torch.zeros(3, 8)
    sampler.adjust(out, sampler.batch(seqs))
    assert out[0].tolist() == [0, 0, 0, -1.0, 0, -0.75, 0, 0]  # prompt tokens 0 and 1 do not count
    assert out[1].tolist() == [0.0] * 8
    assert out[2].tolist() == [0, 0, 0, 1.0, 0, 1.0, 0, 0]


@pytest.mark.parametrize("presence, frequency", [(1.5, 0.0), (0.0, 0.7), (0.5, 1.0), (-1.0, -0.5)])
def test_penalties_match_reference(lm, presence, frequency):
    prompt = [7, 8, 9, 7, 8, 9, 7, 8, 9]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True, presence_penalty=presence,
                            frequency_penalty=frequency)
    engine = make_engine(lm, kv_block_size=4)
    pen, plain = run_engine(engine, [prompt, prompt], [params, SamplingParams(max_new_tokens=20, ignore_eos=True)])
    assert pen.token_ids == penalized_reference(lm.model, prompt, 20, presence, frequency)
    assert plain.token_ids == penalized_reference(lm.model, prompt, 20, 0.0, 0.0)  # its neighbour is unaffected
    assert pen.token_ids != plain.token_ids
    repeats = lambda ids: len(ids) - len(set(ids))
    if presence + frequency > 0:
        assert repeats(pen.token_ids) < repeats(plain.token_ids)
    else:
        assert repeats(pen.token_ids) > repeats(plain.token_ids)


# ---- seeded sampling ----------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_batch_independent(lm, prompts):
    params = SamplingParams(max_new_tokens=N_OUT, ignore_eos=True, temperature=0.9, top_k=30, top_p=0.95, seed=7)
    alone = solo(lm, prompts[4], params).token_ids
    assert alone == list(generate_tokens(lm.model, prompts[4], params))
    others = [SamplingParams(max_new_tokens=N_OUT, ignore_eos=True, temperature=1.0),
              SamplingParams(max_new_tokens=N_OUT, ignore_eos=True, temperature=1.2, seed=8), GREEDY]
    for config in ("roomy", "tight"):  # in a crowd, with preemption and chunked prefill
        mix = [params, *others, params, *others]
        outs = run_engine(make_engine(lm, **CONFIGS[config]), [prompts[4], *prompts[:3], prompts[4], *prompts[5:8]],
                          mix)
        assert outs[0].token_ids == alone and outs[4].token_ids == alone
    other_seed = solo(lm, prompts[4], SamplingParams(**{**params.__dict__, "seed": 8}))
    assert other_seed.token_ids != alone


# ---- invalid requests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, options, match", [
    ([], {}, "empty"),
    (list(range(30)), dict(max_model_len=30), "context"),
    (list(range(40)), dict(max_model_len=30), "context"),
    ([5] * 10, dict(kv_block_size=4, num_kv_blocks=3), "KV blocks"),
    ([1, TINY_VOCAB], {}, "token ids"),
    ([1, -1], {}, "token ids"),
])
def test_invalid_requests(lm, prompt, options, match):
    engine = make_engine(lm, **options)
    with pytest.raises(LongseqError, match=match):
        engine.add_request(prompt, GREEDY)
    assert not engine.seqs and not engine.has_unfinished()


def test_duplicate_request_id(lm):
    engine = make_engine(lm)
    engine.add_request([1, 2, 3], GREEDY, request_id="x")
    with pytest.raises(LongseqError, match="already in use"):
        engine.add_request([4, 5], GREEDY, request_id="x")
    assert len(engine.scheduler.waiting) == 1
