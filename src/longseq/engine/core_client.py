"""The engine in a process of its own (`longseq serve`'s default): the server's side, AsyncLLMEngine's surface.

The child process (engine/core_process.py) runs the engine; here a sender thread forwards the commands that
`generate` and `abort` queue (batched: one pipe write for all that queued meanwhile), and a receiver thread, blocked
on the pipe without the GIL while it waits, rebuilds each request's RequestOutput snapshots from the per-step deltas
and hands them to the streams' event loops with one call_soon_threadsafe per loop per message (`deliver_all`).
LoRA adapters are loaded and unloaded by the child, each call answered over the same pipe; the adapters registered
are kept here too (updated by each successful answer), as the server reads them for every request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import multiprocessing
import os
import pickle
import queue
import threading
from collections.abc import Callable
from multiprocessing.util import Finalize
from typing import TYPE_CHECKING, Any

from longseq.engine.async_engine import AsyncLLMEngine, deliver_all
from longseq.engine.core_process import PICKLE, Delta, run_core
from longseq.engine.outputs import RequestOutput
from longseq.errors import LongseqError

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from longseq.engine.llm_engine import LLMEngine


class EngineDeadError(RuntimeError):
    """The engine process is gone: every request in flight fails with this, and every later one (HTTP 500)."""


class _Request:
    """A request's output so far, from its deltas: what the next snapshot is built from."""

    __slots__ = ("prompt_ids", "token_ids", "text", "logprobs", "metrics")

    def __init__(self, prompt_ids: list[int], logprobs: bool):
        self.prompt_ids = prompt_ids
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list | None = [] if logprobs else None
        self.metrics: dict[str, float] = {}

    def snapshot(self, d: Delta) -> RequestOutput:
        self.token_ids += d.token_ids
        self.text += d.new_text
        if d.logprobs:
            self.logprobs += d.logprobs
        if d.metrics is not None:
            self.metrics = d.metrics
        return RequestOutput(d.request_id, self.prompt_ids, self.text, list(self.token_ids), d.finished,
                             d.finish_reason, None if self.logprobs is None else list(self.logprobs), d.new_text,
                             dict(self.metrics))


class EngineCoreClient(AsyncLLMEngine):
    """AsyncLLMEngine's surface (generate, abort, stats, encode, limits, shutdown) over an engine that
    `make_engine` builds in a child process. `make_engine` must pickle (a module-level function, or a
    functools.partial of one: the child is spawned, so CUDA starts fresh there). Raises LongseqError, with the
    child's reason in one line, when the engine cannot be built."""

    def __init__(self, make_engine: Callable[[], LLMEngine], model_name: str = "longseq",
                 max_queue: int | None = None):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        # Not a daemon: the child may start processes of its own (tensor-parallel ranks). It ends on "stop", when
        # this end of the pipe closes, or when this process is gone (core_process._watch_parent).
        self._process = ctx.Process(target=run_core, args=(make_engine, child_conn, os.getpid()),
                                    name="longseq-engine-core", daemon=False)
        self._process.start()
        child_conn.close()  # else this process holds the child's end open and never sees it close
        try:
            _, self.info, tokenizer = self._wait_ready()
        except BaseException:  # it failed, or this process was interrupted while the model loads
            self._process.terminate()
            _stop(self._process, self._conn, None, None, None)
            raise
        self._frontend(model_name, tokenizer, self.info["limits"], max_queue or self.info["max_queue"])
        self._requests: dict[str, _Request] = {}
        self._stats: dict[str, Any] = {"num_waiting": 0, "num_running": 0, "kv_cache_usage": 0.0,
                                       "num_preempted": 0, "num_steps": 0, "num_steps_ahead": 0}
        self._num_added = 0  # adds the child has taken in, as it last said
        self._loras: dict[str, str] = {name: a["path"] for name, a in self.info["loras"].items()}
        # LoRA commands sent and not yet answered: call id -> (the command, what its caller awaits)
        self._calls: dict[int, tuple[tuple, concurrent.futures.Future]] = {}
        self._call_ids = itertools.count()
        self._dead: EngineDeadError | None = None
        self._stopping = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="longseq-core-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive_loop, name="longseq-core-receive", daemon=True)
        self._sender.start()
        self._receiver.start()
        # At exit, before multiprocessing joins its non-daemon children (exitpriority >= 0 runs first).
        self._finalizer = Finalize(self, _stop, args=(self._process, self._conn, self._commands, self._sender,
                                                      self._receiver, self._stopping), exitpriority=10)

    def _wait_ready(self) -> tuple:
        while not self._conn.poll(0.5):  # the model loads meanwhile: minutes for a large one
            if not self._process.is_alive():
                break
        try:
            message = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            self._process.join(timeout=5)
            raise LongseqError(f"the engine process exited (code {self._process.exitcode}) before it was "
                               "ready") from None
        if message[0] == "failed":
            raise LongseqError(f"the engine did not start: {message[1]}")
        return message

    def stats(self) -> dict[str, Any]:
        with self._lock:
            stats = dict(self._stats)
            stats["num_waiting"] += self._pending
        return stats

    def _num_waiting(self) -> int:
        return self._stats["num_waiting"] + self._pending

    def shutdown(self) -> None:
        """Stops the engine process and waits for it; idempotent."""
        self._finalizer()

    # ---- LoRA adapters: registered on the child's engine -----------------------------------------------

    def lora_adapters(self) -> dict[str, str]:
        with self._lock:
            return dict(self._loras)

    async def load_lora(self, name: str, path: str) -> None:
        """The child reads and packs the adapter while it keeps stepping, then registers it between two steps;
        its LoRAError where the adapter cannot be served."""
        await self._call("load_lora", name, path)

    async def unload_lora(self, name: str) -> None:
        """UnknownLoRAError where no adapter has that name."""
        await self._call("unload_lora", name)

    async def _call(self, kind: str, *args: str) -> None:
        done: concurrent.futures.Future = concurrent.futures.Future()
        # Running: a caller that gives up (a cancelled request) cannot cancel it under the receiver, which sets it.
        done.set_running_or_notify_cancel()
        command = (kind, next(self._call_ids), *args)
        self._calls[command[1]] = (command, done)  # before it is queued: the answer may come at once
        self._commands.put(command)
        await asyncio.wrap_future(done)

    def _answer(self, call_id: int, error: Exception | None, result: Any) -> None:
        call = self._calls.pop(call_id, None)
        if call is None:  # failed already (the engine died)
            return
        command, done = call
        if error is not None:
            done.set_exception(error)
            return
        with self._lock:
            if command[0] == "load_lora":
                self._loras[command[2]] = result  # the folder the child read
            else:
                self._loras.pop(command[2], None)
        done.set_result(None)

    def _fail_calls(self, call_ids: list[int]) -> None:
        for call_id in call_ids:
            call = self._calls.pop(call_id, None)
            if call is not None:
                call[1].set_exception(self._dead)

    # ---- sender thread ----------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            commands = [self._commands.get()]
            while True:  # everything that queued up meanwhile goes in the same write
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            if self._dead is not None:
                self._refuse(commands)
            else:
                for command in commands:
                    if command[0] == "add":  # before the child can answer it
                        self._requests[command[1]] = _Request(command[2], command[3].logprobs is not None)
                try:
                    self._conn.send_bytes(pickle.dumps(commands, PICKLE))
                except OSError:  # the child is gone; the receiver says why
                    pass
            if commands[-1][0] == "stop":
                return

    def _refuse(self, commands: list[tuple]) -> None:
        adds = [c[1] for c in commands if c[0] == "add"]
        with self._lock:
            self._pending = max(0, self._pending - len(adds))
        deliver_all(self._streams, [(request_id, self._dead) for request_id in adds])
        self._fail_calls([c[1] for c in commands if c[0] in ("load_lora", "unload_lora")])

    # ---- receiver thread --------------------------------------------------------------------------------

    def _receive_loop(self) -> None:
        try:
            while True:
                message = pickle.loads(self._conn.recv_bytes())  # waits without the GIL
                if message[0] == "reply":
                    self._answer(*message[1:])
                else:
                    self._receive(*message[1:])
        except (EOFError, OSError):
            pass
        self._process.join(timeout=5)
        stopped = self._stopping.is_set()
        why = "the engine was shut down" if stopped else f"the engine process exited (code {self._process.exitcode})"
        with self._lock:
            self._dead = EngineDeadError(why)
            self._pending = 0
        deliver_all(self._streams, [(request_id, self._dead) for request_id in list(self._streams)])
        self._fail_calls(list(self._calls))  # after _dead is set: a later call is refused by the sender

    def _receive(self, deltas: list[Delta], stats: dict[str, Any], num_added: int) -> None:
        items: list[tuple[str, Any]] = []
        for d in deltas:
            request = self._requests.get(d.request_id)
            if request is None:
                continue
            if d.finished:
                self._requests.pop(d.request_id, None)
            items.append((d.request_id, d.error if d.error is not None else request.snapshot(d)))
        with self._lock:  # the adds taken in leave pending as they join the child's waiting count
            self._pending -= num_added - self._num_added
            self._num_added, self._stats = num_added, stats
        deliver_all(self._streams, items)


def _stop(process, conn: Connection, commands: queue.Queue | None, sender: threading.Thread | None,
          receiver: threading.Thread | None, stopping: threading.Event | None = None) -> None:
    """Stop the child and the threads talking to it; what `shutdown` and the exit-time finalizer run."""
    if stopping is not None:
        stopping.set()
    if commands is not None and sender is not None and sender.is_alive():
        commands.put(("stop",))
        sender.join(timeout=10)
    process.join(timeout=30)
    if process.is_alive():  # a step that does not end, or a child that ignores its pipe
        process.terminate()
        process.join(timeout=10)
    if process.is_alive():
        process.kill()
        process.join()
    if receiver is not None:
        receiver.join(timeout=10)
    conn.close()
