"""A step that raises fails only the request that caused it (engine/isolation.py): the others finish with the same
tokens as in a run without it, and the engine is left with every block free."""

import asyncio

import pytest
from engine_helpers import assert_idle, make_engine, random_prompts, run_engine, tiny_lm

from longseq.engine import SamplingParams
from longseq.engine.async_engine import AsyncLLMEngine
from longseq.generation.sampling import SamplingParamsError

POISON = 99  # the seed that marks the poisoned request


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def workload(n: int = 6):
    """n prompts, greedy and seeded-sampled alternately (the sampled ones check that recomputing a sequence after
    a failure draws the same noise), with penalties on some rows (their device-side counts are rebuilt)."""
    prompts = random_prompts(n, 3, 30, seed=11)
    params = [SamplingParams(max_new_tokens=15, ignore_eos=True, temperature=0.9 * (i % 2), seed=i,
                             presence_penalty=0.5 * (i % 3 == 0)) for i in range(n)]
    return prompts, params


def poisoned() -> SamplingParams:
    return SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.7, seed=POISON)


def is_poison(seq) -> bool:
    return seq.params.seed == POISON


class PoisonedSampler:
    """The engine's sampler, raising once a poisoned sequence in the batch has `after` tokens: a failure after the
    model ran and the sequences counted the step's tokens as computed."""

    def __init__(self, sampler, after: int, times: int | None = None):
        self.sampler, self.after, self.times = sampler, after, times

    def __getattr__(self, name):
        return getattr(self.sampler, name)

    def __call__(self, logits, seqs):
        if any(is_poison(s) and len(s.output_ids) >= self.after for s in seqs) and self.times != 0:
            self.times = None if self.times is None else self.times - 1
            raise RuntimeError("poisoned row")
        return self.sampler(logits, seqs)


def poison_runner(engine, after: int) -> None:
    """The model step raises for a batch holding a poisoned sequence with `after` tokens (before any state moves)."""
    run = engine.runner.run

    def poisoned_run(scheduled, ids=None):
        if any(is_poison(s) and len(s.output_ids) >= after for s, _ in scheduled):
            raise RuntimeError("poisoned row")
        return run(scheduled, ids)

    engine.runner.run = poisoned_run


def poison_detokenizer(engine, after: int) -> None:
    """One row's output processing raises (the host side of a step, per row)."""
    add_request = engine.add_request

    def add(prompt, params, *args):
        rid = add_request(prompt, params, *args)
        seq = engine.seqs[rid]
        if is_poison(seq):
            add_token = seq.detok.add

            def bad_add(token):
                if len(seq.output_ids) > after:
                    raise RuntimeError("poisoned row")
                return add_token(token)

            seq.detok.add = bad_add
        return rid

    engine.add_request = add


@pytest.mark.parametrize("where", ["runner", "sampler", "detokenizer"])
@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("position", [0, 3, 6])  # the poisoned request first, among, or after the others
def test_a_poisoned_request_fails_alone(lm, where, async_scheduling, position):
    prompts, params = workload()
    options = dict(async_scheduling=async_scheduling, kv_block_size=4, max_num_batched_tokens=32)
    ref = run_engine(make_engine(lm, **options), prompts, params)
    engine = make_engine(lm, **options)
    if where == "runner":
        poison_runner(engine, after=2)
    elif where == "sampler":
        engine.sampler = PoisonedSampler(engine.sampler, after=2)
    else:
        poison_detokenizer(engine, after=2)
    outs = run_engine(engine, prompts[:position] + [[5, 6, 7]] + prompts[position:],
                      params[:position] + [poisoned()] + params[position:])
    bad = outs.pop(position)
    assert bad.finish_reason == "error" and "poisoned row" in str(bad.error)
    for out, r in zip(outs, ref, strict=True):
        assert (out.token_ids, out.text, out.finish_reason, out.error) == (r.token_ids, r.text, r.finish_reason, None)
    assert_idle(engine)
    assert not engine.isolation.active and engine.stats()["kv_cache_usage"] == 0


def test_a_failure_that_does_not_recur_fails_nobody(lm):
    prompts, params = workload()
    ref = run_engine(make_engine(lm), prompts, params)
    engine = make_engine(lm)
    engine.sampler = PoisonedSampler(engine.sampler, after=4, times=1)  # one bad step (out of memory, say)
    params = [*params[:2], poisoned(), *params[2:]]
    outs = run_engine(engine, [*prompts[:2], [5, 6, 7], *prompts[2:]], params)
    assert [o.finish_reason for o in outs] == ["length"] * len(outs)
    del outs[2]
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert_idle(engine)


def test_requests_arriving_during_isolation_wait_and_are_served(lm):
    prompts, params = workload(4)
    ref = run_engine(make_engine(lm), prompts, params)
    engine = make_engine(lm)
    engine.sampler = PoisonedSampler(engine.sampler, after=1)
    engine.add_request([5, 6, 7], poisoned(), "poison")
    engine.add_request(prompts[0], params[0], "r0")
    while not engine.isolation.active:
        engine.step()
    for i in range(1, 4):  # held until the culprit is found
        engine.add_request(prompts[i], params[i], f"r{i}")
    assert engine.stats()["num_waiting"] >= 3
    done = {}
    for _ in range(500):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if not engine.has_unfinished():
            break
    assert done.pop("poison").finish_reason == "error"
    assert [done[f"r{i}"].token_ids for i in range(4)] == [r.token_ids for r in ref]
    assert_idle(engine)


def test_a_step_that_always_fails_fails_each_request_alone(lm):
    prompts, params = workload(5)
    engine = make_engine(lm)

    def broken(*_):
        raise RuntimeError("the device is gone")

    engine.runner.run = broken
    outs = run_engine(engine, prompts, params, max_steps=100)  # about 2N failing steps, never a livelock
    assert [o.finish_reason for o in outs] == ["error"] * 5
    assert_idle(engine)


def test_aborting_a_suspect_or_a_held_request(lm):
    prompts, params = workload(4)
    engine = make_engine(lm)
    engine.sampler = PoisonedSampler(engine.sampler, after=1)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    engine.add_request([5, 6, 7], poisoned(), "poison")
    while not engine.isolation.active:
        engine.step()
    held = engine.add_request(prompts[0], params[0])
    for rid in (ids[0], held):
        assert engine.abort(rid).finish_reason == "abort"
    finished = {}
    while engine.has_unfinished():
        finished.update({o.request_id: o.finish_reason for o in engine.step() if o.finished})
    assert finished == {**dict.fromkeys(ids[1:], "length"), "poison": "error"}
    assert_idle(engine)


def test_async_engine_fails_only_the_poisoned_stream(lm):
    prompts, params = workload()
    ref = run_engine(make_engine(lm), prompts, params)
    engine = make_engine(lm)
    engine.sampler = PoisonedSampler(engine.sampler, after=3)
    eng = AsyncLLMEngine(engine)

    async def final(rid, prompt, sp):
        async for out in eng.generate(prompt, sp, rid):
            last = out
        return last

    async def main():
        runs = [final(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
        runs.insert(3, final("poison", [5, 6, 7], poisoned()))
        return await asyncio.gather(*runs, return_exceptions=True)

    try:
        outs = asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        eng.shutdown()
    bad = outs.pop(3)
    assert isinstance(bad, RuntimeError) and "poisoned row" in str(bad)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert_idle(engine)


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 18446744073709551616, 1.5, True])
def test_seed_outside_64_bits_is_refused(seed):
    with pytest.raises(SamplingParamsError, match="seed") as e:
        SamplingParams(seed=seed)
    assert e.value.field == "seed"


def test_seeds_at_the_64_bit_edges_run(lm):
    edges = [SamplingParams(max_new_tokens=5, temperature=1.0, seed=s) for s in (2**63 - 1, -(2**63), 0)]
    outs = run_engine(make_engine(lm), [[1, 2, 3]] * 3, edges)
    assert all(len(o.token_ids) == 5 for o in outs)


def test_a_tiny_temperature_is_greedy(lm):
    # 1 / 1e-126 overflowed float32: the scaled logits became NaN and top-p indexed out of bounds, failing the step.
    prompts = random_prompts(3, 3, 10, seed=5)
    greedy = run_engine(make_engine(lm), prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    tiny = [SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=t, top_p=0.5, seed=1)
            for t in (1.9e-126, 5e-324, 9e-6)]
    outs = run_engine(make_engine(lm), prompts, tiny)
    assert [o.token_ids for o in outs] == [g.token_ids for g in greedy]


def test_llm_generate_raises_the_failure_after_the_others_finish(lm):
    from longseq.engine import LLM

    llm = LLM.__new__(LLM)  # the offline API over an engine built here (LLM() would load a model)
    llm.engine = make_engine(lm)
    llm.tokenizer = lm.tokenizer
    llm.engine.sampler = PoisonedSampler(llm.engine.sampler, after=1)
    prompts, params = workload(3)
    with pytest.raises(RuntimeError, match="poisoned row"):
        llm.generate([*prompts, [5, 6, 7]], [*params, poisoned()])
    assert_idle(llm.engine)
