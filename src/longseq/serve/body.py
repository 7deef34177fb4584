"""A request's body as the server takes it: JSON only, at most max_request_bytes, and parsed with bounds.

Reading happens on the event loop (it is I/O); parsing is O(body) work and runs where the caller runs it (a worker
thread: see state.ServerState.prepare). Every refusal is an ApiError, so the client gets OpenAI error JSON.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from fastapi import Request

from longseq.serve.protocol import ApiError

DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20  # a 1M-token prompt as text (about 4 bytes a token) fits
MAX_DEPTH = 32  # OpenAI's requests nest 4 deep (messages[i].content[j].text); json_schema formats a few more
MAX_INT_DIGITS = 64  # a seed or a token id has at most 20
_SURROGATE = re.compile("[\ud800-\udfff]")  # "\ud800" in JSON is legal escaping but no character: no UTF-8 for it


def _json_media_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body: refused with 415 unless it is declared JSON (a missing Content-Type is taken as JSON), with 413
    once it passes max_bytes, whether Content-Length announces it or the bytes do."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not _json_media_type(content_type):
        raise ApiError(f"unsupported content type {content_type!r}: this endpoint only accepts application/json",
                       415, code="unsupported_content_type")
    too_large = ApiError(f"the request body is larger than this server's limit of {max_bytes:,} bytes", 413,
                         code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):  # 1e999: JSON allows the digits, but the number is no float
        raise ValueError(f"the number {text} is out of range")
    return x


def _int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:  # no field takes one; int() of a long one is quadratic (and stops at 4,300)
        raise ValueError(f"an integer of {len(text):,} digits is out of range")
    return int(text)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN and Infinity; the standard does not


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object: standard JSON (no NaN or Infinity, finite numbers, no lone surrogates), nested at
    most MAX_DEPTH deep."""
    try:
        data = json.loads(raw, parse_float=_finite, parse_int=_int, parse_constant=_no_constant)
    except RecursionError:  # deeper than the interpreter's recursion limit (about 1,000)
        raise ApiError(f"the request body is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors, as are our hooks' and huge ints
        raise ApiError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError("the request body must be a JSON object")
    _check_values(data)
    return data


def _check_values(data: Any) -> None:
    # Iterative, so a deep body cannot overflow the stack here; the depth limit protects every recursive walk after
    # it (pydantic, the chat template, error messages).
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ApiError(f"the request body is nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key)
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            _check_text(value)


def _check_text(s: str) -> None:
    if _SURROGATE.search(s):
        raise ApiError("the request body holds a lone UTF-16 surrogate (such as \\ud800), which is not text")
