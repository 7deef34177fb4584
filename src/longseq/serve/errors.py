"""Errors as OpenAI error JSON: what the client did wrong, what the engine refused, and anything unexpected."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse

from longseq.engine.async_engine import QueueFullError
from longseq.engine.lora import UnknownLoRAError
from longseq.engine.requests import ContextLengthError, InvalidRequestError
from longseq.errors import LongseqError
from longseq.serve.protocol import ApiError, error_body

log = logging.getLogger("longseq.serve")


# A 429 says when to retry; a 401 which scheme to authenticate with (RFC 9110 section 11.6.1, RFC 6750).
_HEADERS = {429: {"Retry-After": "1"}, 401: {"WWW-Authenticate": "Bearer"}}


def error_response(status: int, message: str, type: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=_HEADERS.get(status))


def api_error_response(e: ApiError) -> JSONResponse:
    return error_response(e.status, e.message, e.type, e.param, e.code)


def as_api_error(e: Exception) -> ApiError:
    """Maps what the engine (or tokenizer) raised to the answer; anything unexpected is logged and becomes a 500."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFullError):  # first: it may well be a LongseqError too
        return ApiError(
            f"the server is busy: {e or 'the waiting queue is full'}; retry later", 429, "rate_limit_error",
            code="queue_full",
        )
    if isinstance(e, UnknownLoRAError):  # unloaded between the request's check and its start
        return ApiError(str(e), 404, param="model", code="model_not_found")
    if isinstance(e, LongseqError):
        return ApiError(str(e))
    log.error("unhandled error", exc_info=e)
    return ApiError(f"internal server error: {type(e).__name__}: {e}", 500, "server_error")


def refusal(e: InvalidRequestError, prompt_alone: bool = False) -> ApiError:
    """A request the engine's limits refused, in the OpenAI API's words. prompt_alone: a prompt that fills the
    context by itself is reported without the max_tokens asked for."""
    if not isinstance(e, ContextLengthError):
        return ApiError(str(e), param=e.param, code=e.code)
    want = f"{e.num_prompt_tokens} prompt tokens"
    if e.max_new_tokens is not None and not (prompt_alone and e.num_prompt_tokens >= e.max_model_len):
        want += f" + {e.max_new_tokens} max_tokens"
    return ApiError(f"this model's maximum context length is {e.max_model_len} tokens, but {want} were requested",
                    param=e.param, code=e.code)


def guarded(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Answers any exception of a route as OpenAI error JSON. Starlette's catch-all handler would also answer,
    but it re-raises afterwards and uvicorn then drops the connection, which clients see as a network error."""

    @functools.wraps(handler)
    async def route(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except Exception as e:
            return api_error_response(as_api_error(e))

    return route
