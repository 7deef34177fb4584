"""One request in the engine as the server runs it: its snapshots, its metrics, and its abort if it is cut short."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import anyio
from fastapi import Request

from longseq.engine.outputs import RequestOutput
from longseq.generation.sampling import SamplingParams
from longseq.serve.engine import ServingEngine
from longseq.serve.metrics import RequestTracker, ServerMetrics

log = logging.getLogger("longseq.serve")
T = TypeVar("T")


class Generation:
    """One request in the engine: its outputs, its metrics, and the abort that frees its blocks if it is cut short."""

    def __init__(
        self, engine: ServingEngine, rid: str, prompt_ids: list[int], params: SamplingParams, max_output_tokens: int,
        metrics: ServerMetrics, arrival: float, lora: str | None = None,
    ):
        """`lora`: the LoRA adapter to run the request with (None: the base model)."""
        self.engine, self.rid, self.prompt_ids, self.params = engine, rid, prompt_ids, params
        self.lora = lora
        self.max_output_tokens = max_output_tokens
        self.tracker = RequestTracker(metrics, len(prompt_ids), arrival)
        self._it: AsyncIterator[RequestOutput] | None = None
        self.last: RequestOutput | None = None

    async def next(self) -> RequestOutput | None:
        """The next snapshot, or None after the last one."""
        if self._it is None:
            it = self.engine.generate(self.prompt_ids, self.params, self.rid, self.max_output_tokens, lora=self.lora)
            self._it = await it if inspect.isawaitable(it) else it
        if self.last is not None and self.last.finished:
            return None
        try:
            out = await self._it.__anext__()
        except StopAsyncIteration:
            # An engine that ends without a finished snapshot: treat what we have as the end.
            self.tracker.finish(self.last.finish_reason if self.last else "abort")
            return None
        self.last = out
        self.tracker.on_output(out)
        if out.finished:
            self.tracker.finish(out.finish_reason)
        return out

    async def collect(self) -> RequestOutput:
        while (out := await self.next()) is not None:
            if out.finished:
                return out
        if self.last is None:
            raise RuntimeError(f"engine produced no output for {self.rid}")
        return self.last

    async def abort(self, rejected: bool = False) -> None:
        """Idempotent; shielded because it usually runs while the request's task is being cancelled.
        rejected: the engine refused the request, so it is no finished request for the metrics."""
        if self.tracker.done:
            return
        if rejected:
            self.tracker.done = True
        else:
            self.tracker.finish("abort")
        with anyio.CancelScope(shield=True):
            try:
                await self.engine.abort(self.rid)
            except Exception:
                log.exception("aborting %s failed", self.rid)


async def _wait_disconnect(request: Request) -> None:
    # The body has been read, so the next message is http.disconnect (client gone, or our response done).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Runs work; (True, result), or (False, None) when the client went away first and work was cancelled."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return True, task.result()
    task.cancel()
    await asyncio.wait({task})  # let the cancellation land in the engine's generator before aborting
    return False, None
