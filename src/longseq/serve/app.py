"""`longseq serve`'s HTTP layer: an OpenAI-compatible API over an AsyncLLMEngine, plus /health and /metrics."""

from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from longseq.engine.async_engine import QueueFullError
from longseq.engine.outputs import RequestOutput
from longseq.errors import LongseqError
from longseq.generation.sampling import SamplingParams
from longseq.serve import protocol as p
from longseq.serve.metrics import CONTENT_TYPE, RequestTracker, ServerMetrics

log = logging.getLogger("longseq.serve")
T = TypeVar("T")
M = TypeVar("M", bound=p.SamplingFields)


def _error(status: int, message: str, type: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 429 else None
    return JSONResponse(p.error_body(message, type, param, code), status_code=status, headers=headers)


def _api_error_response(e: p.ApiError) -> JSONResponse:
    return _error(e.status, e.message, e.type, e.param, e.code)


def _as_api_error(e: Exception) -> p.ApiError:
    """Maps what the engine (or tokenizer) raised to the answer; anything unexpected is logged and becomes a 500."""
    if isinstance(e, p.ApiError):
        return e
    if isinstance(e, QueueFullError):  # first: it may well be a LongseqError too
        return p.ApiError(
            f"the server is busy: {e or 'the waiting queue is full'}; retry later", 429, "rate_limit_error",
            code="queue_full",
        )
    if isinstance(e, LongseqError):
        return p.ApiError(str(e))
    log.error("unhandled error", exc_info=e)
    return p.ApiError(f"internal server error: {type(e).__name__}: {e}", 500, "server_error")


def _guarded(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Answers any exception of a route as OpenAI error JSON. Starlette's catch-all handler would also answer,
    but it re-raises afterwards and uvicorn then drops the connection, which clients see as a network error."""

    @functools.wraps(handler)
    async def route(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except Exception as e:
            return _api_error_response(_as_api_error(e))

    return route


class _Generation:
    """One request in the engine: its outputs, its metrics, and the abort that frees its blocks if it is cut short."""

    def __init__(
        self, engine: Any, rid: str, prompt_ids: list[int], params: SamplingParams, metrics: ServerMetrics,
        arrival: float,
    ):
        self.engine, self.rid, self.prompt_ids, self.params = engine, rid, prompt_ids, params
        self.tracker = RequestTracker(metrics, len(prompt_ids), arrival)
        self._it: AsyncIterator[RequestOutput] | None = None
        self.last: RequestOutput | None = None

    async def next(self) -> RequestOutput | None:
        """The next snapshot, or None after the last one."""
        if self._it is None:
            it = self.engine.generate(self.prompt_ids, self.params, self.rid)
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


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
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


class _SSEResponse(StreamingResponse):
    """Streams SSE and aborts the generation however the stream ends early (disconnect, cancel, send error)."""

    def __init__(self, content: AsyncIterator[str], gen: _Generation):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._gen = gen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._gen.abort()
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def create_app(engine: Any, api_key: str | None = None, served_model_name: str | None = None) -> FastAPI:
    """The FastAPI app over engine (an AsyncLLMEngine). api_key: required as a Bearer token on /v1/* when set."""
    model_name = served_model_name or engine.model_name
    accepted_models = {None, "", model_name, engine.model_name}
    created = p.now()
    metrics = ServerMetrics(engine.stats)

    app = FastAPI(title="longseq", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.metrics = metrics

    @app.exception_handler(p.ApiError)
    async def _on_api_error(_: Request, e: p.ApiError) -> JSONResponse:
        return _api_error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return _error(400, str(e.errors()), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _error(e.status_code, str(e.detail), kind)

    @app.exception_handler(Exception)
    async def _on_crash(_: Request, e: Exception) -> JSONResponse:  # a last resort: see _guarded
        return _api_error_response(_as_api_error(e))

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise p.ApiError("invalid or missing API key", 401, "invalid_request_error", code="invalid_api_key")

    async def parse(request: Request, schema: type[M]) -> M:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise p.ApiError(f"the request body is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise p.ApiError("the request body must be a JSON object")
        try:
            body = schema.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise p.ApiError(f"{where}: {first['msg']}", param=where or None) from e
        if body.model not in accepted_models:
            raise p.ApiError(
                f"the model '{body.model}' does not exist; this server serves '{model_name}'",
                404, "invalid_request_error", "model", "model_not_found",
            )
        body.check_supported()
        return body

    def check_prompt(ids: list[int], params_max: int | None, param: str) -> None:
        if not ids:
            raise p.ApiError("the prompt is empty", param=param)
        n = len(ids)
        if n >= engine.max_model_len or (params_max is not None and n + params_max > engine.max_model_len):
            want = f"{n} prompt tokens" + (f" + {params_max} max_tokens" if params_max is not None else "")
            raise p.ApiError(
                f"this model's maximum context length is {engine.max_model_len} tokens, but {want} were requested",
                param=param, code="context_length_exceeded",
            )

    async def run(
        request: Request, gen: _Generation, stream: bool, respond: Callable[[RequestOutput], dict[str, Any]],
        chunks: Callable[[RequestOutput], AsyncIterator[str]],
    ) -> Response:
        # The first snapshot is awaited before answering so that a full queue or a rejected request still gets
        # its status code when streaming; a client that leaves meanwhile has its request aborted.
        try:
            alive, first = await _unless_disconnected(request, gen.next() if stream else gen.collect())
            if alive and first is None:
                raise RuntimeError(f"the engine produced no output for {gen.rid}")
        except Exception as e:
            await gen.abort(rejected=gen.last is None)
            return _api_error_response(_as_api_error(e))
        if not alive or first is None:
            await gen.abort()
            return Response(status_code=499)  # nobody is listening
        if not stream:
            return JSONResponse(respond(first))
        return _SSEResponse(chunks(first), gen)

    async def stream_events(
        gen: _Generation, first: RequestOutput, chunk: Callable[[RequestOutput], list[dict[str, Any]]],
        final_usage: Callable[[RequestOutput], dict[str, Any]] | None,
    ) -> AsyncIterator[str]:
        out: RequestOutput | None = first
        try:
            while out is not None:
                for c in chunk(out):
                    yield _sse(c)
                out = await gen.next()
            if final_usage is not None and gen.last is not None:
                yield _sse(final_usage(gen.last))
        except Exception as e:  # headers are sent: the error goes into the stream, as OpenAI does
            err = _as_api_error(e)
            yield _sse(p.error_body(err.message, err.type, err.param, err.code))
        yield "data: [DONE]\n\n"

    @app.get("/health")
    @_guarded
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    @_guarded
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict[str, Any]:
        return {
            "id": model_name, "object": "model", "created": created, "owned_by": "longseq",
            "max_model_len": engine.max_model_len,
        }

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    @_guarded
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(check_key)])
    @_guarded
    async def get_model(model: str) -> dict[str, Any]:
        if model not in accepted_models:
            raise p.ApiError(f"the model '{model}' does not exist", 404, param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    @_guarded
    async def completions(request: Request) -> Response:
        arrival = time.monotonic()
        body = await parse(request, p.CompletionRequest)
        prompt = body.single_prompt()
        if isinstance(prompt, str):
            try:
                ids = engine.encode(prompt)
            except LongseqError as e:
                raise p.ApiError(str(e), param="prompt") from e
        else:
            ids = list(prompt)  # the engine checks that they are inside the vocabulary
        params = body.sampling_params()
        check_prompt(ids, params.max_new_tokens, "prompt")
        rid, t0 = p.new_id("cmpl"), p.now()
        gen = _Generation(engine, rid, ids, params, metrics, arrival)
        want_lps = body.logprobs is not None

        def respond(out: RequestOutput) -> dict[str, Any]:
            return p.completion_response(rid, t0, model_name, out, want_lps)

        def chunk(out: RequestOutput) -> list[dict[str, Any]]:
            nonlocal sent_chars, sent_lps
            lps = None
            if want_lps and out.logprobs is not None:
                lps = p.completion_logprobs(out.logprobs[sent_lps:], sent_chars)
                sent_lps = len(out.logprobs)
            if not (out.new_text or out.finished or (lps and lps["tokens"])):
                return []
            sent_chars += len(out.new_text)
            choice = {"index": 0, "text": out.new_text, "logprobs": lps, "finish_reason": out.finish_reason}
            return [p.chunk(rid, "text_completion", t0, model_name, [choice], body.include_usage)]

        def final_usage(out: RequestOutput) -> dict[str, Any]:
            u = p.usage(len(ids), len(out.token_ids))
            return p.chunk(rid, "text_completion", t0, model_name, [], True, u)

        sent_chars = sent_lps = 0
        return await run(
            request, gen, bool(body.stream), respond,
            lambda first: stream_events(gen, first, chunk, final_usage if body.include_usage else None),
        )

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    @_guarded
    async def chat_completions(request: Request) -> Response:
        arrival = time.monotonic()
        body = await parse(request, p.ChatCompletionRequest)
        try:
            ids = engine.encode_chat(body.chat_messages())
        except LongseqError as e:
            raise p.ApiError(str(e), param="messages") from e
        check_prompt(ids, None, "messages")
        params = body.sampling_params(engine.max_model_len - len(ids))
        check_prompt(ids, params.max_new_tokens, "messages")
        rid, t0 = p.new_id("chatcmpl"), p.now()
        gen = _Generation(engine, rid, ids, params, metrics, arrival)
        want_lps = bool(body.logprobs)

        def respond(out: RequestOutput) -> dict[str, Any]:
            return p.chat_response(rid, t0, model_name, out, want_lps)

        def wrap(delta: dict[str, Any], finish_reason: str | None, lps: dict[str, Any] | None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": lps, "finish_reason": finish_reason}
            return p.chunk(rid, "chat.completion.chunk", t0, model_name, [choice], body.include_usage)

        def chunk(out: RequestOutput) -> list[dict[str, Any]]:
            nonlocal started, sent_lps
            cs = []
            if not started:
                started = True
                cs.append(wrap({"role": "assistant", "content": ""}, None, None))
            lps = None
            if want_lps and out.logprobs is not None and len(out.logprobs) > sent_lps:
                lps = p.chat_logprobs(out.logprobs[sent_lps:])
                sent_lps = len(out.logprobs)
            if out.new_text or lps:
                cs.append(wrap({"content": out.new_text}, None, lps))
            if out.finished:
                cs.append(wrap({}, out.finish_reason, None))
            return cs

        def final_usage(out: RequestOutput) -> dict[str, Any]:
            u = p.usage(len(ids), len(out.token_ids))
            return p.chunk(rid, "chat.completion.chunk", t0, model_name, [], True, u)

        started, sent_lps = False, 0
        return await run(
            request, gen, bool(body.stream), respond,
            lambda first: stream_events(gen, first, chunk, final_usage if body.include_usage else None),
        )

    return app


def serve(
    engine: Any, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
    served_model_name: str | None = None, log_level: str = "info",
) -> None:
    """Runs the server until interrupted (blocking)."""
    import uvicorn

    app = create_app(engine, api_key=api_key, served_model_name=served_model_name)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=30)


__all__ = ["QueueFullError", "create_app", "serve"]
