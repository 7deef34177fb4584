"""The engine on its own thread, for the HTTP server: async request streams in, engine steps out of the event loop.

The model step is blocking compute, so it must not run on the event loop; the engine thread owns all engine state,
and the event loop talks to it only through a command queue (add / abort, and LoRA adapters' registration) and
per-request asyncio queues. The same surface over an engine in a process of its own (no GIL shared with the
server): engine/core_client.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from longseq.engine.llm_engine import LLMEngine
from longseq.engine.outputs import RequestOutput
from longseq.engine.requests import RequestLimits
from longseq.errors import LongseqError, first_line
from longseq.generation.generate import render_prompt
from longseq.generation.sampling import SamplingParams


class QueueFullError(Exception):
    """Too many requests are waiting; the server answers 429."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, model_name: str = "longseq", max_queue: int | None = None):
        self.engine = engine
        self._frontend(model_name, engine.tokenizer, engine.limits, max_queue or engine.cfg.max_queue)
        self._thread = threading.Thread(target=self._loop, name="longseq-engine", daemon=True)
        self._thread.start()

    def _frontend(self, model_name: str, tokenizer: Any, limits: RequestLimits, max_queue: int) -> None:
        """The state the event loop's side keeps, wherever the engine runs (here, or engine/core_client.py)."""
        self.model_name, self.tokenizer, self.limits, self.max_queue = model_name, tokenizer, limits, max_queue
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending = 0  # adds sent to the engine but not yet taken in
        self._lock = threading.Lock()

    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise LongseqError("messages must be a non-empty list of {role, content} objects with string values")
        try:
            return render_prompt(self.tokenizer, messages, chat=True)
        except LongseqError:
            raise
        except Exception as e:  # the template rejected the conversation (e.g. roles out of order)
            raise LongseqError(f"the chat template rejected these messages: {first_line(e)}") from None

    def stats(self) -> dict[str, Any]:
        with self._lock:  # a request being handed to the engine counts once, as pending or as waiting
            stats = self.engine.stats()
            stats["num_waiting"] += self._pending
        return stats

    def _num_waiting(self) -> int:
        """Requests waiting, those still being handed to the engine included; the caller holds the lock."""
        return self.engine.stats()["num_waiting"] + self._pending

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       max_output_tokens: int | None = None, lora: str | None = None) -> AsyncIterator[RequestOutput]:
        """The request's snapshots, one per step that gave it a token. `max_output_tokens`: what `limits.check`
        returned for it, where the caller has checked it already (the server); otherwise it is checked here.
        `lora`: the registered adapter to run it with (None: the base model)."""
        if max_output_tokens is None:
            max_output_tokens = self.limits.check(prompt_ids, params.max_new_tokens)  # pure: safe from this thread
        with self._lock:
            if request_id in self._streams:  # a second stream would steal the first one's outputs
                raise LongseqError(f"request id {request_id!r} is already in use")
            if self._num_waiting() >= self.max_queue:
                raise QueueFullError(f"{self.max_queue} requests are already waiting")
            self._pending += 1
            stream: asyncio.Queue = asyncio.Queue()
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(("add", request_id, prompt_ids, params, max_output_tokens, lora))
        finished = False
        try:
            while not finished:
                out = coalesce(await stream.get(), stream)
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the consumer went away (client disconnect, cancellation): free the blocks now
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    # ---- LoRA adapters ----------------------------------------------------------------------------------

    def lora_adapters(self) -> dict[str, str]:
        """The registered adapters: name -> the folder each was read from."""
        loras = self.engine.loras
        return {} if loras is None else {name: a.path for name, a in list(loras.adapters.items())}

    async def load_lora(self, name: str, path: str) -> None:
        """Read and pack the adapter on a worker thread (the engine keeps stepping), then register it on the engine
        thread. LoRAError where it cannot be served."""
        adapter = await asyncio.to_thread(self.engine.prepare_lora, name, path)
        await self._on_engine_thread(lambda: self.engine.add_lora(name, adapter))

    async def unload_lora(self, name: str) -> None:
        """UnknownLoRAError where no adapter has that name."""
        await self._on_engine_thread(lambda: self.engine.remove_lora(name))

    async def _on_engine_thread(self, fn: Callable[[], Any]) -> Any:
        """fn() run by the engine thread between two steps, which owns every engine structure it may touch."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        # Running: a caller that gives up (a cancelled request) cannot cancel it under the engine thread, which sets it.
        done.set_running_or_notify_cancel()
        self._commands.put(("call", fn, done))
        return await asyncio.wrap_future(done)

    def shutdown(self) -> None:
        self._commands.put(("stop",))
        self._thread.join(timeout=10)

    # ---- engine thread ----------------------------------------------------------------------------------

    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, Any]]) -> None:
        deliver_all(self._streams, items)

    def _loop(self) -> None:
        while True:
            block = not self.engine.has_unfinished()
            while True:
                try:
                    command = self._commands.get(block=block, timeout=None)
                except queue.Empty:
                    break
                block = False
                if command[0] == "stop":
                    return
                if command[0] == "add":
                    _, request_id, prompt_ids, params, max_output_tokens, lora = command
                    with self._lock:  # leave pending and join the waiting queue at once, as generate() counts both
                        self._pending -= 1
                        try:
                            self.engine.add_request(prompt_ids, params, request_id, max_output_tokens, lora)
                        except Exception as e:
                            self._deliver(request_id, e)
                elif command[0] == "call":
                    _, fn, done = command
                    try:
                        done.set_result(fn())
                    except Exception as e:
                        done.set_exception(e)
                else:
                    out = self.engine.abort(command[1])
                    if out is not None:
                        self._deliver(out.request_id, out)
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # nothing to blame (engine/isolation.py): fail the requests in flight, keep serving
                for request_id in list(self.engine.seqs):
                    self.engine.abort(request_id)
                    self._deliver(request_id, e)
                continue
            # a request the step failed gets its error, the others their tokens
            self._deliver_all([(out.request_id, out if out.error is None else out.error) for out in outputs])


def deliver_all(streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]],
                items: list[tuple[str, Any]]) -> None:
    """Each (request id, snapshot or error) into its stream, from a thread other than the streams' loops. One
    wake-up of each event loop per step, not one per request: every call_soon_threadsafe takes the loop's lock and
    writes to its wake-up pipe. A request whose stream is gone (its consumer left) is skipped."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for request_id, item in items:
        target = streams.get(request_id)
        if target is not None:
            by_loop.setdefault(target[0], []).append((target[1], item))
    for loop, puts in by_loop.items():
        loop.call_soon_threadsafe(_put_all, puts)


def coalesce(out: RequestOutput | BaseException, stream: asyncio.Queue) -> RequestOutput | BaseException:
    """Snapshots that queued up behind `out` while the consumer was busy (a loaded event loop) as one: the latest,
    with the text they added together; an error or the finished snapshot ends the merge. Fewer, larger stream
    events keep a saturated server from falling further behind."""
    while not stream.empty() and isinstance(out, RequestOutput) and not out.finished:
        later = stream.get_nowait()
        if isinstance(later, RequestOutput):
            later.new_text = out.new_text + later.new_text
        out = later
    return out


def _put_all(puts: list[tuple[asyncio.Queue, Any]]) -> None:
    for stream, item in puts:
        stream.put_nowait(item)
