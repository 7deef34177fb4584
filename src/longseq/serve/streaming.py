"""A generation's answer: one JSON response, or server-sent events that abort the generation if the stream ends
early."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from longseq.engine.outputs import RequestOutput
from longseq.serve import protocol as p
from longseq.serve.errors import api_error_response, as_api_error
from longseq.serve.generation import Generation, unless_disconnected


class Reply:
    """How one endpoint shapes a generation: the whole response, or the stream's chunks (stateful: each call
    gets what the snapshot added since the last)."""

    object = ""  # the chunks' "object"

    def __init__(self, rid: str, created: int, model: str, num_prompt_tokens: int, include_usage: bool):
        self.rid, self.created, self.model = rid, created, model
        self.num_prompt_tokens, self.include_usage = num_prompt_tokens, include_usage

    def response(self, out: RequestOutput) -> dict[str, Any]:
        raise NotImplementedError

    def chunks(self, out: RequestOutput) -> list[dict[str, Any]]:
        raise NotImplementedError

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        return p.chunk(self.rid, self.object, self.created, self.model, choices, self.include_usage, usage)

    def usage_chunk(self, out: RequestOutput) -> dict[str, Any]:
        """The last event with stream_options.include_usage: no choices, the request's usage."""
        return self.chunk([], p.usage(self.num_prompt_tokens, len(out.token_ids)))


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _SSEResponse(StreamingResponse):
    """Streams SSE and aborts the generation however the stream ends early (disconnect, cancel, send error)."""

    def __init__(self, content: AsyncIterator[str], gen: Generation):
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


async def stream_events(gen: Generation, first: RequestOutput, reply: Reply) -> AsyncIterator[str]:
    out: RequestOutput | None = first
    try:
        while out is not None:
            for c in reply.chunks(out):
                yield _sse(c)
            out = await gen.next()
        if reply.include_usage and gen.last is not None:
            yield _sse(reply.usage_chunk(gen.last))
    except Exception as e:  # headers are sent: the error goes into the stream, as OpenAI does
        err = as_api_error(e)
        yield _sse(p.error_body(err.message, err.type, err.param, err.code))
    yield "data: [DONE]\n\n"


async def respond(request: Request, gen: Generation, stream: bool, reply: Reply) -> Response:
    """Runs the generation and answers with it: the finished response, or a stream of its chunks."""
    # The first snapshot is awaited before answering so that a full queue or a rejected request still gets its
    # status code when streaming; a client that leaves meanwhile has its request aborted.
    try:
        alive, first = await unless_disconnected(request, gen.next() if stream else gen.collect())
        if alive and first is None:
            raise RuntimeError(f"the engine produced no output for {gen.rid}")
    except Exception as e:
        await gen.abort(rejected=gen.last is None)
        return api_error_response(as_api_error(e))
    if not alive or first is None:
        await gen.abort()
        return Response(status_code=499)  # nobody is listening
    if not stream:
        return JSONResponse(reply.response(first))
    return _SSEResponse(stream_events(gen, first, reply), gen)
