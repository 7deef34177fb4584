"""LoRA adapters through the engine process (issue 26): a mixed batch of adapters and the base streams the greedy
tokens that the thread engine streams; adapters given at start-up are registered before the child says ready, and a
bad one stops the start naming it; loads and unloads are answered over the pipe with the engine's own errors
(LoRAError, UnknownLoRAError), after which the child goes on serving; the server's list follows the answers."""

import asyncio
import time
from functools import partial

import pytest
from engine_helpers import lora_tiny_engine, random_prompts, tiny_lm

from longseq.engine import SamplingParams
from longseq.engine.async_engine import AsyncLLMEngine
from longseq.engine.core_client import EngineCoreClient
from longseq.engine.lora import LoRAError, UnknownLoRAError
from longseq.errors import LongseqError
from lora_adapters import write_adapter

OPTIONS = dict(num_kv_blocks=64, kv_block_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_loras=2,
               max_lora_rank=8)
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)
NAMES = (None, "attn", "all")  # each prompt runs under the base and both adapters


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, str]:
    root, model = tmp_path_factory.mktemp("adapters"), tiny_lm().model
    write_adapter(root / "attn", model, 4, ("q_proj", "v_proj"), seed=1)
    write_adapter(root / "all", model, 8, seed=2)
    return {name: str(root / name) for name in ("attn", "all")}


@pytest.fixture(scope="module")
def client(adapters):
    """One engine process for the module, "attn" given at start-up (--lora); each test leaves it as it found it."""
    c = EngineCoreClient(partial(lora_tiny_engine, {"attn": adapters["attn"]}, **OPTIONS), model_name="tiny")
    yield c
    c.shutdown()


def run(coro, timeout=60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(agen):
    return [out async for out in agen]


async def greedy_tokens(eng, prompts, names) -> list[list[int]]:
    outs = await asyncio.gather(*(collect(eng.generate(p, GREEDY, f"r{i}", lora=n))
                                  for i, (p, n) in enumerate(zip(prompts, names, strict=True))))
    return [o[-1].token_ids for o in outs]


def test_a_mixed_batch_equals_the_thread_engine(client, adapters):
    assert client.lora_adapters() == {"attn": adapters["attn"]}  # from start-up
    run(client.load_lora("all", adapters["all"]))
    assert client.lora_adapters() == adapters
    prompts = [p for p in random_prompts(3, 3, 12, seed=2) for _ in NAMES]
    names = list(NAMES) * 3
    thread = AsyncLLMEngine(lora_tiny_engine(adapters, **OPTIONS))
    try:
        ref = run(greedy_tokens(thread, prompts, names))
    finally:
        thread.shutdown()
    try:
        got = run(greedy_tokens(client, prompts, names))
    finally:
        run(client.unload_lora("all"))
    assert got == ref
    for i in range(0, len(got), len(NAMES)):  # the adapters do change the tokens
        assert len({tuple(t) for t in got[i:i + len(NAMES)]}) == len(NAMES)
    assert client.lora_adapters() == {"attn": adapters["attn"]}


def test_errors_come_back_and_the_child_goes_on(client, adapters, tmp_path):
    prompt = random_prompts(1, 3, 6, seed=3)[0]

    async def main():
        with pytest.raises(LoRAError, match="no such adapter folder"):
            await client.load_lora("bad", str(tmp_path / "none"))
        with pytest.raises(LoRAError, match="'attn' has already been loaded"):
            await client.load_lora("attn", adapters["all"])
        with pytest.raises(UnknownLoRAError, match="'nope' does not exist"):
            await client.unload_lora("nope")
        await client.load_lora("gone", adapters["all"])
        await client.unload_lora("gone")
        with pytest.raises(UnknownLoRAError, match="'gone' does not exist"):
            await collect(client.generate(prompt, GREEDY, "r-gone", lora="gone"))
        # A caller that gives up does not stop the load, nor the answers after it.
        late = asyncio.ensure_future(client.load_lora("late", adapters["all"]))
        await asyncio.sleep(0)
        late.cancel()
        await asyncio.gather(late, return_exceptions=True)
        deadline = time.monotonic() + 10
        while "late" not in client.lora_adapters():
            assert time.monotonic() < deadline, "the load was never answered"
            await asyncio.sleep(0.01)
        await client.unload_lora("late")
        return await collect(client.generate(prompt, GREEDY, "r-attn", lora="attn"))

    outs = run(main())
    assert outs[-1].finished and len(outs[-1].token_ids) == GREEDY.max_new_tokens
    assert client.lora_adapters() == {"attn": adapters["attn"]}


def test_a_bad_start_up_adapter_stops_the_start(adapters, tmp_path):
    loras = {"attn": adapters["attn"], "bad": str(tmp_path / "none")}
    with pytest.raises(LongseqError, match="the engine did not start: --lora bad: .* no such adapter folder"):
        EngineCoreClient(partial(lora_tiny_engine, loras, **OPTIONS))
