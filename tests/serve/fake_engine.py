"""A deterministic stand-in for AsyncLLMEngine: replies with a fixed text, one word per step."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from longseq.engine.lora import LoRAError, UnknownLoRAError
from longseq.engine.outputs import RequestOutput, TokenLogprob
from longseq.engine.requests import RequestLimits
from longseq.errors import LongseqError
from longseq.generation.sampling import SamplingParams
from longseq.serve.app import QueueFullError

REPLY = "Hello there! This is a fake reply from the longseq test engine."
VOCAB = 1000


def reply_pieces(reply: str = REPLY) -> list[str]:
    """The reply's tokens: one per word, with its leading space."""
    return re.findall(r"\s*\S+", reply)


class FakeTokenizer:
    chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }} {% endfor %}assistant:"

    def __len__(self) -> int:
        return VOCAB

    def encode(self, text: str) -> list[int]:
        return [sum(map(ord, w)) % VOCAB for w in text.split()]


class FakeEngine:
    model_name = "fake-model"
    max_model_len = 64
    limits = RequestLimits(max_model_len, VOCAB, kv_block_size=16, num_kv_blocks=4)  # the pool holds one context

    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.reset()

    def reset(self) -> None:
        self.reply = REPLY
        self.step_delay = 0.0  # seconds per generated token
        self.queue_full = False
        self.crash = False
        self.crash_after: int | None = None  # raise after this many tokens
        self.calls: list[tuple[str, list[int], SamplingParams]] = []
        self.loras: dict[str, str] = {}  # LoRA adapters: name -> path
        self.lora_calls: list[str | None] = []  # the adapter of each generate call
        self.aborted: list[str] = []
        self.num_running = 0
        self._abort_events: dict[str, asyncio.Event] = {}

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        for m in messages:
            if m["role"] not in ("system", "user", "assistant"):
                raise LongseqError(f"unknown role {m['role']!r}")
        return self.encode(" ".join(f"{m['role']}: {m['content'] or ''}" for m in messages) + " assistant:")

    def stats(self) -> dict:
        return {"num_waiting": 0, "num_running": self.num_running, "kv_cache_usage": 0.25, "num_preempted": 3}

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        if request_id in self._abort_events:
            self._abort_events[request_id].set()

    def lora_adapters(self) -> dict[str, str]:
        return dict(self.loras)

    async def load_lora(self, name: str, path: str) -> None:
        if not path.startswith("/adapters/"):
            raise LoRAError(f"{path}: no such adapter folder")
        self.loras[name] = path

    async def unload_lora(self, name: str) -> None:
        if self.loras.pop(name, None) is None:
            raise UnknownLoRAError(name)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, max_output_tokens: int | None = None,
        lora: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        self.lora_calls.append(lora)
        if self.queue_full:
            raise QueueFullError("the waiting queue is full (0 slots)")
        if self.crash:
            raise RuntimeError("the fake engine crashed")
        if any(not 0 <= t < VOCAB for t in prompt_ids):
            raise LongseqError(f"prompt token ids must be in [0, {VOCAB})")
        if len(prompt_ids) + params.max_new_tokens > self.max_model_len:
            raise LongseqError("prompt + max_new_tokens is longer than max_model_len")
        self.calls.append((request_id, list(prompt_ids), params))
        aborted = self._abort_events[request_id] = asyncio.Event()
        self.num_running += 1
        try:
            pieces = reply_pieces(self.reply)
            text, ids, lps = "", [], []
            for i, piece in enumerate(pieces):
                try:
                    await asyncio.wait_for(aborted.wait(), self.step_delay)
                except asyncio.TimeoutError:
                    pass
                if self.crash_after is not None and i >= self.crash_after:
                    raise RuntimeError("the fake engine crashed mid-request")
                if aborted.is_set():
                    yield RequestOutput(request_id, prompt_ids, text, list(ids), True, "abort", lps or None)
                    return
                ids.append(100 + i)
                if params.logprobs is not None:
                    top = [(100 + i, piece, -0.25), (7, " x", -3.0), (8, " y", float("-inf"))][: params.logprobs]
                    lps.append(TokenLogprob(100 + i, piece, -0.25, top))
                new_text, reason = piece, None
                hit = [s for s in params.stop if s in text + piece]
                if hit:
                    new_text, reason = (text + piece).split(hit[0])[0][len(text) :], "stop"
                elif i == len(pieces) - 1:
                    reason = "stop"
                elif len(ids) >= params.max_new_tokens:
                    reason = "length"
                text += new_text
                out = RequestOutput(
                    request_id, prompt_ids, text, list(ids), reason is not None, reason,
                    list(lps) if params.logprobs is not None else None, new_text,
                )
                yield out
                if out.finished:
                    return
        finally:
            self.num_running -= 1
            self._abort_events.pop(request_id, None)
