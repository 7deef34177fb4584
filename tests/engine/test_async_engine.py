"""AsyncLLMEngine: concurrent streams, cancellation frees blocks, the waiting-queue limit, errors, shutdown."""

import asyncio
import threading
import time

import pytest
from engine_helpers import make_engine, random_prompts, run_engine, slow_steps, tiny_lm

from longseq.engine import SamplingParams
from longseq.engine.async_engine import AsyncLLMEngine, QueueFullError, coalesce
from longseq.engine.outputs import RequestOutput
from longseq.errors import LongseqError

GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
LONG = SamplingParams(max_new_tokens=200, ignore_eos=True)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture
def engines():
    """Async engines made by a test, shut down after it even if it fails."""
    made = []

    def make(lm, step_delay=0.0, max_queue=None, **options):
        engine = make_engine(lm, **options)
        if step_delay:
            slow_steps(engine, step_delay)
        made.append(AsyncLLMEngine(engine, max_queue=max_queue))
        return made[-1]

    yield make
    for eng in made:
        eng.shutdown()


def run(coro, timeout=30.0):
    """asyncio.run, failing instead of hanging."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(agen):
    return [out async for out in agen]


async def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def idle(eng: AsyncLLMEngine) -> bool:
    e = eng.engine
    return not e.has_unfinished() and e.blocks.num_free_blocks == e.blocks.num_blocks and not e.seqs


def check_stream(outs):
    final = outs[-1]
    assert final.finished and not any(o.finished for o in outs[:-1])
    assert "".join(o.new_text for o in outs) == final.text  # the pieces add up to the text
    lens = [len(o.token_ids) for o in outs]  # a snapshot a token, or fewer when the consumer fell behind
    assert lens == sorted(set(lens)) and lens[0] >= 1 and lens[-1] == len(final.token_ids)
    return final


def test_snapshots_that_queued_up_go_out_as_one():
    def snap(n, finished=False):
        return RequestOutput("r", [1], "abcd"[:n], list(range(n)), finished, "length" if finished else None,
                             new_text="abcd"[n - 1])

    async def run():
        q = asyncio.Queue()
        for item in (snap(2), snap(3), snap(4, finished=True)):
            q.put_nowait(item)
        merged = coalesce(snap(1), q)
        assert (merged.new_text, merged.finished, q.empty()) == ("abcd", True, True)
        q.put_nowait(snap(3))
        q.put_nowait(RuntimeError("step failed"))
        q.put_nowait(snap(4))
        assert isinstance(coalesce(snap(2), q), RuntimeError) and q.qsize() == 1  # an error ends the merge
        assert coalesce(snap(4, finished=True), q).new_text == "d"  # nothing merges past the end

    asyncio.run(run())


def test_concurrent_streams_match_the_offline_engine(lm, engines):
    prompts = random_prompts(8, 1, 30, seed=2)
    params = [GREEDY, SamplingParams(max_new_tokens=7, ignore_eos=True, stop=("w1",))] * 4
    ref = run_engine(make_engine(lm), prompts, params)
    eng = engines(lm, kv_block_size=4, num_kv_blocks=30, max_num_batched_tokens=16)

    async def main():
        streams = [collect(eng.generate(p, sp, f"r{i}")) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
        return await asyncio.gather(*streams)

    results = run(main())
    for outs, r in zip(results, ref, strict=True):
        final = check_stream(outs)
        assert (final.token_ids, final.text, final.finish_reason) == (r.token_ids, r.text, r.finish_reason)
    assert idle(eng)


def test_streams_equal_llm_generate_on_the_default_model(default_llm, engines):
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "Water boils at"]
    params = SamplingParams(max_new_tokens=10)
    ref = default_llm.generate(texts, params)
    eng = engines(default_llm.engine.lm)

    async def main():
        return await asyncio.gather(*(collect(eng.generate(eng.encode(t), params, t)) for t in texts))

    for outs, r in zip(run(main()), ref, strict=True):
        final = check_stream(outs)
        assert final.text == r.text and final.token_ids == r.token_ids


@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_leaving_a_stream_aborts_the_request(lm, engines, how):
    eng = engines(lm, step_delay=0.01)
    prompts = random_prompts(2, 5, 10, seed=3)

    async def main():
        other = asyncio.create_task(collect(eng.generate(prompts[1], GREEDY, "other")))
        agen = eng.generate(prompts[0], LONG, "leaver")
        seq = None
        if how == "aclose":
            async for out in agen:
                seq = eng.engine.seqs[out.request_id]
                if len(out.token_ids) == 2:
                    break
            await agen.aclose()
        else:
            got = []

            async def consume():
                async for out in agen:
                    got.append(out)

            task = asyncio.create_task(consume())
            await wait_until(lambda: len(got) >= 2)
            seq = eng.engine.seqs["leaver"]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await wait_until(lambda: "leaver" not in eng.engine.seqs, timeout=2.0)
        assert seq.finish_reason == "abort" and len(seq.output_ids) < 20
        return await other

    check_stream(run(main()))
    time.sleep(0.05)
    assert idle(eng)


def test_leaving_while_waiting_removes_the_request(lm, engines):
    eng = engines(lm, step_delay=0.01, max_num_seqs=1)
    prompts = random_prompts(2, 5, 10, seed=4)

    async def main():
        first = eng.generate(prompts[0], LONG, "first")
        await first.__anext__()  # running, and holds the only sequence slot
        second = asyncio.create_task(collect(eng.generate(prompts[1], GREEDY, "second")))
        await wait_until(lambda: [s.request_id for s in eng.engine.scheduler.waiting] == ["second"])
        seq = eng.engine.seqs["second"]
        second.cancel()
        await wait_until(lambda: "second" not in eng.engine.seqs, timeout=2.0)
        assert seq.finish_reason == "abort" and not seq.output_ids and not eng.engine.scheduler.waiting
        await first.aclose()
        await wait_until(lambda: idle(eng), timeout=2.0)

    run(main())


def test_full_queue_is_refused(lm, engines):
    eng = engines(lm, max_queue=1)
    gate, entered = threading.Event(), threading.Event()
    add, step = eng.engine.add_request, eng.engine.step

    def slow_add(*args):  # widen the hand-over from "pending" to "waiting" that generate() must never miss
        entered.set()
        time.sleep(0.2)
        return add(*args)

    eng.engine.add_request = slow_add
    eng.engine.step = lambda: (gate.wait(), step())[1]  # nothing leaves the waiting queue until the gate opens

    async def main():
        first = asyncio.create_task(collect(eng.generate([1, 2, 3], GREEDY, "first")))
        await asyncio.sleep(0)  # the first request is sent to the engine thread
        assert eng.stats()["num_waiting"] == 1  # pending, being taken in, or waiting: counted once
        await asyncio.get_running_loop().run_in_executor(None, entered.wait)  # it is being taken in
        assert eng.stats()["num_waiting"] == 1
        with pytest.raises(QueueFullError):
            await eng.generate([4, 5], GREEDY, "second").__anext__()
        await wait_until(lambda: "first" in eng.engine.seqs)
        with pytest.raises(QueueFullError):
            await eng.generate([4, 5], GREEDY, "third").__anext__()
        assert eng.stats()["num_waiting"] == 1 and set(eng._streams) == {"first"}
        gate.set()
        outs = await first
        again = await collect(eng.generate([4, 5], GREEDY, "second"))  # room again
        return outs, again

    outs, again = run(main())
    check_stream(outs)
    check_stream(again)
    assert idle(eng)


def test_bad_requests_raise(lm, engines):
    eng = engines(lm, step_delay=0.01)

    async def main():
        with pytest.raises(LongseqError, match="empty"):
            await eng.generate([], GREEDY, "a").__anext__()
        with pytest.raises(LongseqError, match="context"):
            await eng.generate([1] * 300, GREEDY, "b").__anext__()
        first = eng.generate([1, 2], LONG, "dup")
        await first.__anext__()
        with pytest.raises(LongseqError, match="already in use"):
            await eng.generate([3, 4], GREEDY, "dup").__anext__()
        out = await first.__anext__()  # the first stream still gets its outputs
        assert out.request_id == "dup" and len(out.token_ids) == 2
        await eng.abort("dup")
        outs = [o async for o in first]
        assert outs[-1].finished and outs[-1].finish_reason == "abort"
        await wait_until(lambda: idle(eng), timeout=2.0)

    run(main())


def test_shutdown_stops_the_thread(lm):
    eng = AsyncLLMEngine(make_engine(lm), max_queue=4)
    assert eng._thread.is_alive()

    async def main():
        agen = eng.generate([1, 2, 3], LONG, "busy")
        await agen.__anext__()
        eng.shutdown()  # mid-request: the loop checks its commands between steps
        await agen.aclose()

    run(main())
    assert not eng._thread.is_alive()
    idle_eng = AsyncLLMEngine(make_engine(lm))
    idle_eng.shutdown()  # blocked waiting for commands
    assert not idle_eng._thread.is_alive()
