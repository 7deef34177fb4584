"""The engine in a process of its own (`longseq serve`'s default): the engine core's side.

On a thread of the server (engine/async_engine.py) the engine's step loop and the server's Python work (FastAPI,
SSE, JSON) take turns holding one GIL, so a busy server slows every step. Here the engine runs alone in a child
process, as vLLM v1's EngineCore does; the server's side is engine/core_client.py.

The wire is one duplex Pipe carrying pickled messages (send_bytes / recv_bytes):
- parent -> child: lists of commands, the tuples AsyncLLMEngine's thread takes: ("add", request_id, prompt_ids,
  params, max_output_tokens, lora), ("abort", request_id), ("stop",); and LoRA adapters' registration, each with
  the id of the call that waits for its answer: ("load_lora", call_id, name, path), ("unload_lora", call_id, name);
- child -> parent: first ("ready", info, tokenizer) or ("failed", one line); then, after every turn of the loop
  (the commands taken in, one engine step), one ("step", deltas, stats, num_added): per request only what the step
  added (`Delta`), never the prompt or the whole output again; the engine's stats; and how many adds the child has
  taken in so far (the parent counts a request once, as pending or as waiting, as AsyncLLMEngine does). A LoRA
  command is answered by ("reply", call_id, error, result): error None and the result (a load: the adapter's
  folder), or the error the engine raised (a LoRAError, an UnknownLoRAError), for the server to answer as it
  would on a thread.
The child exits on "stop", when the pipe closes, or when its parent is gone.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from longseq.errors import LongseqError, first_line

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from longseq.config import AttentionConfig, EngineConfig, ModelOverrides
    from longseq.engine.llm_engine import LLMEngine
    from longseq.engine.lora import LoRAAdapter
    from longseq.engine.outputs import RequestOutput, TokenLogprob

PICKLE = pickle.HIGHEST_PROTOCOL


class Delta(NamedTuple):
    """What one step added to one request: the parent rebuilds the RequestOutput snapshot from these."""

    request_id: str
    token_ids: list[int]  # the new output tokens
    new_text: str
    finished: bool
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None  # the new tokens' entries, where the request asked for logprobs
    metrics: dict[str, float] | None  # with the request's first delta and its last; unchanged in between
    error: Exception | None = None  # the request failed (it is retired): the parent raises this in its stream


def load_engine(path: str | Path, dtype: str, device: str, cfg: EngineConfig,
                loras: dict[str, str] | None = None, overrides: ModelOverrides | None = None) -> LLMEngine:
    """`longseq serve`'s engine: the model at `path` on one GPU, or tensor-parallel over cfg.tensor_parallel, with
    the LoRA adapters `loras` (name -> folder: --lora) registered and `overrides` (--attention memory, ...)
    applied."""
    if cfg.tensor_parallel > 1:  # this process is rank 0; it starts the other ranks (no adapters: EngineConfig)
        if overrides is not None:
            raise LongseqError("model overrides (--attention, --rope-scaling, ...) are applied on one GPU; drop "
                               "--tensor-parallel")
        from longseq.engine.tp_engine import start_engine

        return start_engine(path, dtype, device, cfg)
    from longseq.engine.llm import with_overrides
    from longseq.engine.llm_engine import LLMEngine
    from longseq.models.loader import load

    lm = load(path, dtype=dtype, device=device, quantization=cfg.quantization, group_size=cfg.quant_group_size)
    engine = LLMEngine(with_overrides(lm, overrides), cfg)
    try:
        register_loras(engine, loras or {})
    except BaseException:
        engine.close()
        raise
    return engine


def register_loras(engine: LLMEngine, loras: dict[str, str]) -> None:
    """--lora NAME=PATH ...: each adapter registered before the engine serves (in the engine process, before it
    says ready); one that cannot be served ends the start with its reason, naming it."""
    for name, path in loras.items():
        try:
            engine.add_lora(name, path)
        except LongseqError as e:
            raise LongseqError(f"--lora {name}: {first_line(e)}") from None


def describe(engine: LLMEngine) -> dict[str, Any]:
    """What the server says of the engine it serves, and what its side needs: the request limits, the queue."""
    return {"limits": engine.limits, "device": str(engine.lm.device), "num_kv_blocks": engine.blocks.num_blocks,
            "kv_block_size": engine.cfg.kv_block_size, "max_model_len": engine.max_model_len,
            "max_queue": engine.cfg.max_queue, "tensor_parallel": engine.cfg.tensor_parallel,
            "quantization": getattr(engine.lm.model, "quantization", None),
            "memory": memory_knobs(engine.lm.config.attention),
            "loras": {name: {"path": a.path, "rank": a.rank, "targets": a.targets}
                      for name, a in (engine.loras.adapters.items() if engine.loras is not None else ())},
            "lora_pool": None if engine.runner.lora is None else {
                "num_slots": engine.runner.lora.num_slots, "max_rank": engine.runner.lora.max_rank,
                "nbytes": engine.runner.lora.nbytes}}


def memory_knobs(attn: AttentionConfig) -> dict[str, int] | None:
    """Memory attention's settings as the server reports them (None: another attention)."""
    if attn.variant != "memory":
        return None
    return {"sink_tokens": attn.sink_tokens, "window": attn.local_window, "block_size": attn.block_size,
            "retrieved_blocks": attn.retrieved_blocks}


def portable(e: BaseException) -> Exception:
    """`e` as it can cross the pipe: itself where it pickles back to the same, else one line of it (a LongseqError
    stays one, so the server still answers 400, not 500)."""
    try:
        back = pickle.loads(pickle.dumps(e, PICKLE))
        if type(back) is type(e) and str(back) == str(e):
            return back
    except Exception:
        pass
    if isinstance(e, LongseqError):
        return LongseqError(first_line(e))
    return RuntimeError(f"{type(e).__name__}: {first_line(e)}")


def run_core(make_engine: Callable[[], LLMEngine], conn: Connection, parent_pid: int) -> None:
    """The child's whole life (the Process target): build the engine, say ready or why not, serve until stopped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    # terminate() from the parent: unwind (engine.close, multiprocessing's exit ends tensor-parallel ranks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="longseq-parent-watch", daemon=True).start()
    try:
        engine = make_engine()
    except BaseException as e:  # noqa: BLE001 - whatever it is, the parent gets one line and this process ends
        reason = first_line(e) if isinstance(e, LongseqError) else f"{type(e).__name__}: {first_line(e)}"
        _send_quietly(conn, ("failed", reason))
        return
    try:
        if _send_quietly(conn, ("ready", describe(engine), engine.tokenizer)):
            EngineCore(engine, conn).run()
    except (EOFError, OSError):  # the parent is gone
        pass
    finally:
        engine.close()


def _send_quietly(conn: Connection, message: Any) -> bool:
    try:
        conn.send_bytes(pickle.dumps(message, PICKLE))
        return True
    except (OSError, EOFError):  # the parent is gone
        return False


def _watch_parent(parent_pid: int) -> None:
    """Ends this process once its parent is gone, even while the model loads (the pipe is not read then)."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    for child in multiprocessing.active_children():  # tensor-parallel ranks
        child.terminate()
    os._exit(1)


class EngineCore:
    """The add / abort / step loop over the pipe: AsyncLLMEngine's engine thread, with deltas for outputs, and the
    LoRA adapters' registration."""

    def __init__(self, engine: LLMEngine, conn: Connection):
        self.engine, self.conn = engine, conn
        self.num_sent: dict[str, int] = {}  # output tokens sent so far, per request that has had a delta
        self.num_added = 0
        self.num_steps = 0
        # Messages go out from a thread of their own: a server that falls behind reading (a pipe holds a few
        # steps' messages) must not hold up the next step.
        self.outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.sender = threading.Thread(target=self._send_loop, name="longseq-core-send", daemon=True)
        # An adapter is read and packed on a thread of its own (the slow part: a file read, checks, a copy) while
        # steps go on, as AsyncLLMEngine.load_lora does; the loop registers it between two steps. `wake` ends the
        # loop's idle wait when one is ready.
        self.prepared: queue.SimpleQueue[tuple[int, LoRAAdapter | Exception]] = queue.SimpleQueue()
        self.woken, self.wake = multiprocessing.Pipe(duplex=False)

    def run(self) -> None:
        self.sender.start()
        try:
            self._loop()
        finally:
            self.outbox.put(None)  # what is queued still goes out, then the sender ends
            self.sender.join(timeout=10)

    def _loop(self) -> None:
        engine = self.engine
        while True:
            deltas: list[Delta] = []
            # Idle: wait for a command (the pipe closing reads as one: an EOFError) or an adapter read; busy: take
            # what is there.
            if not engine.has_unfinished():
                wait([self.conn, self.woken])
            while self.conn.poll():
                for command in pickle.loads(self.conn.recv_bytes()):
                    if command[0] == "stop":
                        return
                    self._command(command, deltas)
            self._register_prepared()
            if engine.has_unfinished():
                self._step(deltas)
            stats = dict(engine.stats(), num_steps=self.num_steps, num_steps_ahead=engine.num_steps_ahead)
            self.outbox.put(pickle.dumps(("step", deltas, stats, self.num_added), PICKLE))

    def _send_loop(self) -> None:
        while (data := self.outbox.get()) is not None:
            try:
                self.conn.send_bytes(data)
            except OSError:  # the parent is gone; the loop sees the pipe close
                return

    def _command(self, command: tuple, deltas: list[Delta]) -> None:
        if command[0] == "add":
            _, request_id, prompt_ids, params, max_output_tokens, lora = command
            self.num_added += 1
            try:
                self.engine.add_request(prompt_ids, params, request_id, max_output_tokens, lora)
            except Exception as e:
                deltas.append(self._failed(request_id, e))
        elif command[0] == "abort":
            out = self.engine.abort(command[1])
            if out is not None:
                deltas.append(self._delta(out))
        elif command[0] == "load_lora":
            threading.Thread(target=self._prepare, args=command[1:], name="longseq-lora-read", daemon=True).start()
        else:  # ("unload_lora", call_id, name)
            self._reply(command[1], partial(self.engine.remove_lora, command[2]))

    # ---- LoRA adapters ----------------------------------------------------------------------------------

    def _prepare(self, call_id: int, name: str, path: str) -> None:
        """On a thread of its own: the adapter read and packed (prepare_lora touches no engine state)."""
        try:
            adapter: LoRAAdapter | Exception = self.engine.prepare_lora(name, path)
        except Exception as e:
            adapter = e
        self.prepared.put((call_id, adapter))
        self.wake.send_bytes(b"")

    def _register_prepared(self) -> None:
        while self.woken.poll():  # before the queue: a wake-up sent after this is for an item still queued
            self.woken.recv_bytes()
        while True:
            try:
                call_id, adapter = self.prepared.get_nowait()
            except queue.Empty:
                return
            self._reply(call_id, partial(self._register, adapter))

    def _register(self, adapter: LoRAAdapter | Exception) -> str:
        if isinstance(adapter, Exception):
            raise adapter
        return self.engine.add_lora(adapter.name, adapter).path

    def _reply(self, call_id: int, fn: Callable[[], Any]) -> None:
        """fn() run here, between two steps; its result or its error goes back to the call waiting for it."""
        try:
            result, error = fn(), None
        except Exception as e:
            result, error = None, portable(e)
        self.outbox.put(pickle.dumps(("reply", call_id, error, result), PICKLE))

    def _step(self, deltas: list[Delta]) -> None:
        self.num_steps += 1
        try:
            outputs = self.engine.step()
        except Exception as e:  # nothing to blame (engine/isolation.py): fail the requests in flight, keep serving
            for request_id in list(self.engine.seqs):
                self.engine.abort(request_id)
                deltas.append(self._failed(request_id, e))
            return
        # a request the step failed gets its error, the others their tokens
        deltas += [self._delta(out) if out.error is None else self._failed(out.request_id, out.error)
                   for out in outputs]

    def _delta(self, out: RequestOutput) -> Delta:
        first = out.request_id not in self.num_sent
        n = self.num_sent.get(out.request_id, 0)
        if out.finished:
            self.num_sent.pop(out.request_id, None)
        else:
            self.num_sent[out.request_id] = len(out.token_ids)
        return Delta(out.request_id, out.token_ids[n:], out.new_text, out.finished, out.finish_reason,
                     None if out.logprobs is None else out.logprobs[n:],
                     out.metrics if first or out.finished else None)

    def _failed(self, request_id: str, error: BaseException) -> Delta:
        self.num_sent.pop(request_id, None)
        return Delta(request_id, [], "", True, "error", None, None, portable(error))
