"""OpenAI request schemas, their mapping to SamplingParams, and the response/chunk/error bodies."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt

from longseq.engine.outputs import RequestOutput, TokenLogprob
from longseq.generation.sampling import SamplingParams, SamplingParamsError


class ApiError(Exception):
    """An error the client caused (or a full queue), answered as OpenAI error JSON with this status."""

    def __init__(
        self, message: str, status: int = 400, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


MAX_STOP = 4  # stop strings per request, as OpenAI's API
ROLES = ("system", "developer", "user", "assistant", "tool", "function")  # OpenAI's message roles


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class SamplingFields(BaseModel):
    # Unknown OpenAI fields (user, metadata, store, ...) are accepted and ignored.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM spells it the same); -1 or 0 keep all tokens
    min_p: float | None = None  # extension (vLLM)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None  # extension (vLLM)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # extension (vLLM)
    ignore_eos: bool | None = False  # extension
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, Any] | None = None  # token id (a string, as JSON keys are) -> bias; checked below

    def check_supported(self) -> None:
        """The ranges OpenAI's API enforces beyond SamplingParams' own, and what this server does not do."""
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise ApiError(f"temperature must be in [0, 2], got {self.temperature}", param="temperature")
        if self.n is not None and self.n < 1:
            raise ApiError(f"n must be at least 1, got {self.n}", param="n")
        if self.n not in (None, 1):
            raise ApiError("n > 1 is not supported; send one request per completion", param="n")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stop) > MAX_STOP:
            raise ApiError(f"stop takes at most {MAX_STOP} strings, got {len(stop)}", param="stop")
        if any(not s for s in stop):
            raise ApiError("stop strings must not be empty", param="stop")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling(self, max_new_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        try:
            return SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=0 if self.top_k in (None, -1) else self.top_k,
                seed=self.seed,
                stop=stop,
                ignore_eos=bool(self.ignore_eos),
                min_p=self.min_p or 0.0,
                stop_token_ids=tuple(self.stop_token_ids or ()),
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                logit_bias=self._logit_bias(),
                logprobs=logprobs,
            )
        except SamplingParamsError as e:
            param = "max_tokens" if e.field == "max_new_tokens" else e.field
            raise ApiError(str(e).replace("max_new_tokens", "max_tokens"), param=param) from e

    def _logit_bias(self) -> dict[int, Any]:
        # SamplingParams checks the biases' range; the keys must be token ids written in decimal digits.
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ApiError(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
            bias[int(key)] = value
        return bias


class CompletionRequest(SamplingFields):
    # StrictInt: a list of digit strings must not be coerced into token ids.
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise ApiError("echo is not supported", param="echo")
        if self.best_of not in (None, 1):
            raise ApiError("best_of > 1 is not supported", param="best_of")
        if self.suffix:
            raise ApiError("suffix is not supported", param="suffix")

    def single_prompt(self) -> str | list[int]:
        """The one prompt: a string or token ids. A batch of one is unwrapped; larger batches are refused."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                raise ApiError("only one prompt per request is supported", param="prompt")
            return p[0]
        return p

    def sampling_params(self) -> SamplingParams:
        return self._sampling(16 if self.max_tokens is None else self.max_tokens, self.logprobs)


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise ApiError("tools are not supported", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ApiError("only response_format type 'text' is supported", param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError("top_logprobs requires logprobs to be true", param="top_logprobs")

    def chat_messages(self) -> list[dict[str, Any]]:
        """The messages with list-of-parts content flattened to text, which is all a text model's template takes."""
        if not self.messages:
            raise ApiError("messages must not be empty", param="messages")
        out = []
        for i, m in enumerate(self.messages):
            if not isinstance(m.get("role"), str):
                raise ApiError(f"messages[{i}] needs a string 'role'", param="messages")
            if m["role"] not in ROLES:
                raise ApiError(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {m['role']!r}",
                               param="messages")
            content = m.get("content")
            if isinstance(content, list):
                texts = []
                for part in content:
                    is_text = isinstance(part, dict) and part.get("type") == "text"
                    if not (is_text and isinstance(part.get("text"), str)):
                        raise ApiError(f"messages[{i}]: only text content parts are supported", param="messages")
                    texts.append(part["text"])
                content = "".join(texts)
            elif content is not None and not isinstance(content, str):
                raise ApiError(f"messages[{i}].content must be a string or a list of parts", param="messages")
            out.append({**m, "content": content})
        return out

    @property
    def max_output_tokens(self) -> int | None:
        """The output budget asked for: max_completion_tokens, or the older max_tokens; None if neither."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        """max_new_tokens: the budget the engine's check gave (max_output_tokens, or the context left)."""
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(max_new_tokens, logprobs)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _finite(x: float) -> float:
    # JSON has no -inf; OpenAI reports impossible tokens as -9999.
    return x if math.isfinite(x) else -9999.0


def completion_logprobs(lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions format; offset: characters of text before these tokens."""
    tokens, offsets = [], []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.token)
        tokens.append(lp.token)
    return {
        "tokens": tokens,
        "token_logprobs": [_finite(lp.logprob) for lp in lps],
        "top_logprobs": [{t: _finite(v) for _, t, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def chat_logprobs(lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}

    return {
        "content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for _, t, v in lp.top]} for lp in lps],
        "refusal": None,
    }


def chunk(
    rid: str, object: str, created: int, model: str, choices: list[dict[str, Any]], usage_field: bool,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A streamed event; with stream_options.include_usage every chunk has a usage field, null but in the last."""
    c: dict[str, Any] = {"id": rid, "object": object, "created": created, "model": model, "choices": choices}
    if usage_field:
        c["usage"] = usage
    return c


def completion_response(
    rid: str, created: int, model: str, out: RequestOutput, with_logprobs: bool
) -> dict[str, Any]:
    lps = completion_logprobs(out.logprobs or [], 0) if with_logprobs else None
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": out.text, "finish_reason": out.finish_reason, "logprobs": lps}],
        "usage": usage(len(out.prompt_token_ids), len(out.token_ids)),
    }


def chat_response(rid: str, created: int, model: str, out: RequestOutput, with_logprobs: bool) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": out.text},
                "finish_reason": out.finish_reason,
                "logprobs": chat_logprobs(out.logprobs or []) if with_logprobs else None,
            }
        ],
        "usage": usage(len(out.prompt_token_ids), len(out.token_ids)),
    }
