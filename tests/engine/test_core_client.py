"""EngineCoreClient: the engine in a child process streams what AsyncLLMEngine on a thread streams (greedy, seeded
sampling, logprobs, stop strings), frees the child's blocks when a stream is left or aborted, keeps the queue limit
and request ids, says why a child could not start, serves the HTTP app, and leaves no process behind. LoRA
adapters through it: test_core_client_lora.py."""

import asyncio
import multiprocessing
import os
import time
from functools import partial

import httpx
import pytest
from engine_helpers import failing_engine, random_prompts, tiny_engine

from longseq.engine import SamplingParams
from longseq.engine.async_engine import AsyncLLMEngine, QueueFullError
from longseq.engine.core_client import EngineCoreClient, EngineDeadError
from longseq.engine.requests import InvalidRequestError
from longseq.errors import LongseqError
from longseq.serve import create_app
from longseq.serve.background import running

OPTIONS = dict(num_kv_blocks=64, kv_block_size=4, max_num_seqs=4, max_num_batched_tokens=32)
LONG = SamplingParams(max_new_tokens=200, ignore_eos=True)
PARAMS = [
    SamplingParams(max_new_tokens=12, ignore_eos=True),
    SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True),
    SamplingParams(max_new_tokens=9, temperature=1.0, seed=8, logprobs=3, ignore_eos=True),
    SamplingParams(max_new_tokens=7, ignore_eos=True, stop=("w1",)),
    SamplingParams(max_new_tokens=11, temperature=0.7, top_k=20, seed=9, presence_penalty=0.5,
                   frequency_penalty=0.3, repetition_penalty=1.1, logprobs=0, ignore_eos=True),
    SamplingParams(max_new_tokens=8, logprobs=2, ignore_eos=True),
]


@pytest.fixture(scope="module")
def client():
    """One engine process for the module (spawning one costs seconds); each test leaves it idle."""
    c = EngineCoreClient(partial(tiny_engine, step_delay=0.005, **OPTIONS), model_name="tiny")
    yield c
    c.shutdown()
    c.shutdown()  # idempotent
    assert c._process.exitcode == 0 and c._process not in multiprocessing.active_children()
    assert not c._sender.is_alive() and not c._receiver.is_alive()


def run(coro, timeout=60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(agen):
    return [out async for out in agen]


async def all_streams(eng, prompts, params):
    return await asyncio.gather(*(collect(eng.generate(p, sp, f"r{i}"))
                                  for i, (p, sp) in enumerate(zip(prompts, params, strict=True))))


async def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def idle(client) -> bool:
    s = client.stats()
    return s["num_running"] == s["num_waiting"] == 0 and s["kv_cache_usage"] == 0.0


def final_of(outs):
    final = outs[-1]
    assert final.finished and not any(o.finished for o in outs[:-1])
    assert "".join(o.new_text for o in outs) == final.text
    lens = [len(o.token_ids) for o in outs]
    assert lens == sorted(set(lens)) and lens[-1] == len(final.token_ids)
    assert {"arrival", "first_token", "finished"} <= final.metrics.keys()
    return final


def test_streams_equal_the_thread_engine(client):
    prompts = random_prompts(len(PARAMS), 1, 30, seed=5)
    thread = AsyncLLMEngine(tiny_engine(**OPTIONS))
    try:
        ref = run(all_streams(thread, prompts, PARAMS))
    finally:
        thread.shutdown()
    got = run(all_streams(client, prompts, PARAMS))
    for outs, ref_outs in zip(got, ref, strict=True):
        a, b = final_of(outs), final_of(ref_outs)
        assert (a.token_ids, a.text, a.finish_reason, a.prompt_token_ids) == (
            b.token_ids, b.text, b.finish_reason, b.prompt_token_ids)
        assert (a.logprobs is None) == (b.logprobs is None)
        for x, y in zip(a.logprobs or [], b.logprobs or [], strict=True):  # batches differ: float noise only
            assert (x.token_id, x.token, [t[:2] for t in x.top]) == (y.token_id, y.token, [t[:2] for t in y.top])
            assert x.logprob == pytest.approx(y.logprob, abs=1e-9)
    assert [o.finish_reason for o in (outs[-1] for outs in got)] == ["length", "length", "length", "stop", "length",
                                                                     "length"]
    assert idle(client)


def test_leaving_or_aborting_frees_the_request(client):
    a, b = random_prompts(2, 5, 10, seed=3)

    async def main():
        agen = client.generate(a, LONG, "leaver")
        async for out in agen:
            if len(out.token_ids) >= 2:
                break
        await agen.aclose()  # the consumer goes away: the child aborts the request
        other = client.generate(b, LONG, "aborted")
        await other.__anext__()
        await client.abort("aborted")
        outs = await collect(other)
        await wait_until(lambda: idle(client))
        return outs

    outs = run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort" and len(outs[-1].token_ids) < 200


def test_queue_limit_request_ids_and_refused_requests(client):
    prompts = random_prompts(6, 3, 6, seed=4)

    async def main():
        running_ = [client.generate(p, LONG, f"run{i}") for i, p in enumerate(prompts[:4])]
        for agen in running_:  # all four slots taken
            await agen.__anext__()
        waiting = asyncio.ensure_future(collect(client.generate(prompts[4], LONG, "waits")))
        await wait_until(lambda: client.stats()["num_waiting"] == 1)
        client.max_queue = 1
        try:
            with pytest.raises(QueueFullError):
                await client.generate(prompts[5], LONG, "refused").__anext__()
        finally:
            client.max_queue = OPTIONS.get("max_queue", 1024)
        with pytest.raises(LongseqError, match="already in use"):
            await client.generate(prompts[5], LONG, "run0").__anext__()
        bad = SamplingParams(max_new_tokens=3, stop_token_ids=(5000,))  # refused by the child's engine
        with pytest.raises(InvalidRequestError, match="stop_token_ids"):
            await client.generate(prompts[5], bad, "bad").__anext__()
        for agen in running_:
            await agen.aclose()
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await wait_until(lambda: idle(client))

    run(main())


def test_the_server_runs_over_the_process_client(client):
    with running(create_app(client)) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "w3 w4 w5", "max_tokens": 5, "temperature": 0},
                       timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                          json={"prompt": "w3 w4 w5", "max_tokens": 5, "temperature": 0, "stream": True}) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 3
        assert "longseq_num_requests_running" in httpx.get(f"{url}/metrics").text
        # an engine without LoRA refuses adapters as it does on a thread (tests/serve/test_lora_server.py)
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"}, timeout=30)
        assert r.status_code == 400 and "LoRA adapters are off" in r.json()["error"]["message"]


def test_a_dead_engine_process_fails_its_streams_and_later_requests():
    client = EngineCoreClient(partial(tiny_engine, **OPTIONS))
    prompt = random_prompts(1, 3, 6, seed=6)[0]

    async def main():
        agen = client.generate(prompt, LONG, "doomed")
        await agen.__anext__()
        client._process.kill()
        with pytest.raises(EngineDeadError, match=r"exited \(code -9\)"):
            await collect(agen)
        with pytest.raises(EngineDeadError):
            await client.generate(prompt, LONG, "later").__anext__()
        with pytest.raises(EngineDeadError):
            await client.load_lora("a", "/x")

    try:
        run(main())
    finally:
        client.shutdown()
    assert client._process not in multiprocessing.active_children()


@pytest.mark.parametrize("make, reason", [
    (partial(failing_engine, "no such model"), "the engine did not start: no such model"),
    (partial(os._exit, 3), r"the engine process exited \(code 3\) before it was ready"),
])
def test_a_child_that_cannot_start_says_why(make, reason):
    before = set(multiprocessing.active_children())
    with pytest.raises(LongseqError, match=reason):
        EngineCoreClient(make)
    assert set(multiprocessing.active_children()) <= before
