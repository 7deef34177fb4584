"""Helpers for the engine tests: a tiny random model with a fake tokenizer, and a driver that runs an engine to
completion."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from longseq.config import EngineConfig
from longseq.engine import LLMEngine, SamplingParams
from longseq.engine.core_process import register_loras
from longseq.errors import LongseqError
from longseq.generation import generate_tokens
from longseq.models.loader import LoadedModel
from tiny_models import random_model

TINY_VOCAB = 97


class FakeTokenizer:
    """Token i is the word " w<i>": every token adds text, so stop strings and streaming are easy to check."""

    chat_template = None

    def __init__(self, eos_token_id: int | None = None):
        self.eos_token_id = eos_token_id

    def decode(self, ids, **_) -> str:
        return "".join(f" w{int(i)}" for i in ids)

    def __call__(self, text: str) -> dict:
        return {"input_ids": [int(w[1:]) for w in text.split()]}


def tiny_lm(sliding_window: int | None = None, eos_token_id: int | None = None, max_seq_len: int = 256,
            seed: int = 0) -> LoadedModel:
    """A 2-layer GQA model in float64 (batched and single runs then agree far beyond any argmax tie)."""
    model = random_model(seed, vocab_size=TINY_VOCAB, max_seq_len=max_seq_len, sliding_window=sliding_window)
    return LoadedModel(model.double(), FakeTokenizer(eos_token_id), Path("tiny"))


def make_engine(lm: LoadedModel, **options) -> LLMEngine:
    options.setdefault("num_kv_blocks", 64)  # never the 1 GiB CPU default
    return LLMEngine(lm, EngineConfig(**options))


def tiny_engine(step_delay: float = 0.0, **options) -> LLMEngine:
    """make_engine over tiny_lm(): what a test hands an engine process to build (it pickles by name).
    step_delay: seconds added to every step (slow_steps)."""
    engine = make_engine(tiny_lm(), **options)
    if step_delay:
        slow_steps(engine, step_delay)
    return engine


def lora_tiny_engine(loras: dict[str, str], **options) -> LLMEngine:
    """tiny_engine serving LoRA adapters, `loras` (name -> folder) registered as `longseq serve --lora` registers
    them: what a test hands an engine process to build."""
    engine = tiny_engine(enable_lora=True, **options)
    register_loras(engine, loras)
    return engine


def slow_steps(engine: LLMEngine, delay: float) -> None:
    """Every step `delay` seconds longer, so that requests are surely still in flight when a test acts."""
    step = engine.step
    engine.step = lambda: (time.sleep(delay), step())[1]


def failing_engine(reason: str) -> LLMEngine:
    raise LongseqError(reason)


def run_engine(engine: LLMEngine, prompts: list[list[int]], params, max_steps: int = 20_000,
               streams: dict[str, list[str]] | None = None) -> list:
    """Add every request, step until all finish (failing instead of hanging), return the final outputs in order.

    `streams`, if given, receives each request's new_text pieces under its request id."""
    per_request = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, per_request, strict=True)]
    done = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if streams is not None:
                streams.setdefault(out.request_id, []).append(out.new_text)
            if out.finished:
                done[out.request_id] = out
    else:
        raise AssertionError(f"the engine did not finish in {max_steps} steps: {engine.stats()}")
    return [done[r] for r in ids]


def random_traffic(engine: LLMEngine, rng, iterations: int, add: float, abort: float, max_prompt: int,
                   max_new: int) -> dict[str, int]:
    """Random adds (probability `add`), aborts (`abort`) and steps, checking after each that every output belongs
    to a live request and that the block accounting holds; then steps until all finish. Returns how many requests
    finished during the random phase and how many aborts came while a step was launched ahead."""
    live: list[str] = []
    counts = {"finished": 0, "aborted_ahead": 0}
    for _ in range(iterations):
        r = rng.random()
        if r < add:
            p = [rng.randrange(TINY_VOCAB) for _ in range(rng.randint(1, max_prompt))]
            params = SamplingParams(max_new_tokens=rng.randint(1, max_new), ignore_eos=True)
            live.append(engine.add_request(p, params))
        elif r < add + abort and live:
            counts["aborted_ahead"] += engine.inflight is not None
            assert engine.abort(live.pop(rng.randrange(len(live)))).finish_reason == "abort"
        else:
            for out in engine.step():
                assert out.request_id in live
                if out.finished:
                    live.remove(out.request_id)
                    counts["finished"] += 1
        bm = engine.blocks
        assert sum(bm.ref_counts) == sum(len(s.block_table) for s in engine.scheduler.running)
        assert all((b in bm.free) == (bm.ref_counts[b] == 0) for b in range(bm.num_blocks))
        assert set(engine.seqs) == set(live)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                live.remove(out.request_id)
    assert not live
    return counts


def assert_idle(engine: LLMEngine) -> None:
    """Nothing running or waiting, every KV block free, no request left behind."""
    assert not engine.has_unfinished()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert all(r == 0 for r in engine.blocks.ref_counts)
    assert not engine.seqs


def random_prompts(n: int, lo: int, hi: int, seed: int = 0, vocab: int = TINY_VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lens]


def assert_follows_generate(model, prompts: list[list[int]], outs, params: SamplingParams, agree: float) -> None:
    """The engine's greedy outputs against `generate` run alone with the same `params`: the first token equal (the
    same prefill maths), at least `agree` of all tokens equal (the GPU tests' batched kernels round differently
    from generate's single row, so a random model's greedy paths may part at a near-tie)."""
    same = total = 0
    for prompt, out in zip(prompts, outs, strict=True):
        ref = list(generate_tokens(model, prompt, params))
        assert out.token_ids[0] == ref[0]
        same += sum(a == b for a, b in zip(out.token_ids, ref, strict=True))
        total += len(ref)
    assert same >= agree * total, f"{same} of {total} tokens agree"
