"""Async scheduling (the next decode step launched from the device's samples before the host reads them) gives
exactly the outputs of the synchronous engine: through EOS and stop strings mid-batch, length limits, seeds,
preemption, chunked prefill and aborts, with every block returned."""

import random

import pytest
from engine_helpers import assert_idle, make_engine, random_prompts, random_traffic, run_engine, tiny_lm

from longseq.engine import SamplingParams

CONFIGS = {
    "roomy": dict(kv_block_size=16, num_kv_blocks=64),
    "tight": dict(kv_block_size=4, num_kv_blocks=20, max_num_batched_tokens=16),
    "few-seqs": dict(kv_block_size=8, num_kv_blocks=40, max_num_seqs=3, max_num_batched_tokens=7),
}


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(10, 1, 30, seed=3)


def mixed_params(n: int) -> list[SamplingParams]:
    """Lengths that end at different steps, greedy and seeded sampling, a stop string that some outputs hit."""
    out = []
    for i in range(n):
        extra = dict(temperature=0.8, top_k=20, seed=i) if i % 3 == 1 else {}
        stop = (" w5",) if i % 4 == 2 else ()
        out.append(SamplingParams(max_new_tokens=3 + 2 * i, ignore_eos=i % 2 == 0, stop=stop, **extra))
    return out


def summary(outs):
    return [(o.token_ids, o.text, o.finish_reason) for o in outs]


@pytest.mark.parametrize("config", CONFIGS)
def test_async_equals_sync(prompts, config):
    # EOS = a token the greedy outputs do produce, so some requests stop while a step runs ahead of them.
    lm = tiny_lm(eos_token_id=7)
    params = mixed_params(len(prompts))
    sync = make_engine(lm, async_scheduling=False, **CONFIGS[config])
    expected = summary(run_engine(sync, prompts, params))
    assert sync.num_steps_ahead == 0
    engine = make_engine(lm, **CONFIGS[config])
    assert summary(run_engine(engine, prompts, params)) == expected
    assert engine.num_steps_ahead > 10
    assert any(reason == "stop" for _, _, reason in expected) and any(r == "length" for _, _, r in expected)
    assert_idle(engine)


def test_a_lone_request_runs_ahead_every_decode_step():
    lm = tiny_lm()
    engine = make_engine(lm)
    out = run_engine(engine, [[1, 2, 3]], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    assert len(out.token_ids) == 20
    # The prefill samples token 1; each of the 19 decode steps after it is launched ahead of its input token.
    assert engine.num_steps_ahead == 19
    assert out.token_ids == run_engine(make_engine(lm, async_scheduling=False), [[1, 2, 3]],
                                       SamplingParams(max_new_tokens=20, ignore_eos=True))[0].token_ids
    assert_idle(engine)


def test_logprobs_and_penalties_run_ahead(prompts):
    # Both are computed on the device (engine/sampler.py, engine/penalties.py): no step waits for the host.
    lm = tiny_lm()
    params = [SamplingParams(max_new_tokens=8, logprobs=2), SamplingParams(max_new_tokens=8, frequency_penalty=0.5),
              SamplingParams(max_new_tokens=8, temperature=0.9, seed=1, presence_penalty=1.0, repetition_penalty=1.3,
                             logprobs=0, logit_bias={5: 2.0})]
    for config in ("roomy", "tight"):
        sync = run_engine(make_engine(lm, async_scheduling=False, **CONFIGS[config]), prompts[:3], params)
        engine = make_engine(lm, **CONFIGS[config])
        outs = run_engine(engine, prompts[:3], params)
        assert engine.num_steps_ahead > 0
        assert summary(outs) == summary(sync)
        assert [o.logprobs for o in outs] == [o.logprobs for o in sync]
        assert_idle(engine)


@pytest.mark.parametrize("seed", range(3))
def test_aborts_while_a_step_is_ahead(seed):
    lm = tiny_lm()
    rng = random.Random(seed)
    engine = make_engine(lm, kv_block_size=4, num_kv_blocks=40, max_num_seqs=4)
    counts = random_traffic(engine, rng, 200, add=0.15, abort=0.10, max_prompt=20, max_new=30)
    assert counts["aborted_ahead"] > 0 and engine.num_steps_ahead > 0
    assert_idle(engine)
