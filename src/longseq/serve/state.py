"""One server's settings and the checks every /v1 request goes through: the API key, the body, the prompt."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Request
from pydantic import ValidationError

from longseq.engine.requests import InvalidRequestError
from longseq.generation.sampling import SamplingParams
from longseq.serve import protocol as p
from longseq.serve.body import DEFAULT_MAX_REQUEST_BYTES, parse_json, read_body
from longseq.serve.engine import ServingEngine
from longseq.serve.errors import refusal
from longseq.serve.metrics import ServerMetrics

M = TypeVar("M", bound=p.SamplingFields)
T = TypeVar("T")


@dataclass
class ServerState:
    engine: ServingEngine
    model_name: str  # the name the server answers with
    metrics: ServerMetrics
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    created: int = field(default_factory=p.now)
    accepted_models: set[str | None] = field(init=False)  # the served name, the engine's own, or none at all

    def __post_init__(self) -> None:
        self.accepted_models = {None, "", self.model_name, self.engine.model_name}

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "longseq",
            "max_model_len": self.engine.limits.max_model_len,
        }

    def model_cards(self) -> list[dict[str, Any]]:
        """The base model's card, then each LoRA adapter's (vLLM's shape: `root` its folder, `parent` the base)."""
        cards = [self.model_card()]
        for name, path in self.engine.lora_adapters().items():
            cards.append({**self.model_card(), "id": name, "root": path, "parent": self.model_name})
        return cards

    def lora_for(self, model: str | None) -> str | None:
        """The LoRA adapter a request's `model` names, or None for the base model (names are checked by parse)."""
        return None if model in self.accepted_models else model

    def reply_model(self, model: str | None) -> str:
        """The `model` of a response: the adapter's name, or the served model's."""
        return self.model_name if model in self.accepted_models else model

    async def prepare(self, request: Request, work: Callable[[bytes], T]) -> T:
        """work(body) on a worker thread: parsing, templating and tokenizing are O(request), and on the event loop
        a large prompt would stall every other request and /health for seconds."""
        raw = await read_body(request, self.max_request_bytes)
        return await anyio.to_thread.run_sync(work, raw)

    def parse(self, raw: bytes, schema: type[M]) -> M:
        """The request body as `schema`, for this server's model, asking only for what the server supports."""
        data = parse_json(raw)
        try:
            # Strict: "stream": "yes" or "max_tokens": "5" is refused, as OpenAI's API does, not coerced.
            body = schema.model_validate(data, strict=True)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise p.ApiError(f"{where}: {first['msg']}", param=where or None) from e
        if body.model not in self.accepted_models and body.model not in self.engine.lora_adapters():
            raise p.ApiError(
                f"the model '{body.model}' does not exist; this server serves '{self.model_name}'"
                + (" and its LoRA adapters (GET /v1/models)" if self.engine.lora_adapters() else ""),
                404, "invalid_request_error", "model", "model_not_found",
            )
        body.check_supported()
        return body

    def check_request(self, ids: list[int], max_tokens: int | None, param: str, prompt_alone: bool = False) -> int:
        """The engine's one check of a request (RequestLimits.check), in OpenAI's terms: max_tokens over the
        context is refused, not cut. Returns the output budget: max_tokens, or where None what the prompt leaves.
        prompt_alone: a prompt that fills the context by itself is reported without max_tokens (the chat wording)."""
        try:
            return self.engine.limits.check(ids, max_tokens, strict=True, param=param)
        except InvalidRequestError as e:
            raise refusal(e, prompt_alone) from e

    def check_sampling(self, params: SamplingParams) -> None:
        """The token ids the sampling parameters name are in the model's vocabulary (RequestLimits)."""
        try:
            self.engine.limits.check_sampling(params)
        except InvalidRequestError as e:
            raise refusal(e) from e


def server_state(request: Request) -> ServerState:
    return request.app.state.server


Server = Annotated[ServerState, Depends(server_state)]  # a route's parameter: its app's ServerState


async def check_key(request: Request) -> None:
    """The /v1 routes' dependency: with an API key set, the request must carry it as a Bearer token."""
    key = server_state(request).api_key
    if key is None:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise p.ApiError("invalid or missing API key", 401, "invalid_request_error", code="invalid_api_key")
