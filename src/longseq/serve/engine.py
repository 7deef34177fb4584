"""What the server needs of an engine: AsyncLLMEngine (engine thread), EngineCoreClient (engine process), or a
stand-in with the same surface in tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from longseq.engine.outputs import RequestOutput
from longseq.engine.requests import RequestLimits
from longseq.generation.sampling import SamplingParams


class ServingEngine(Protocol):
    model_name: str
    limits: RequestLimits

    def encode(self, prompt: str) -> list[int]: ...

    def encode_chat(self, messages: list[dict]) -> list[int]: ...

    def stats(self) -> dict[str, Any]: ...

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                 max_output_tokens: int | None = None, lora: str | None = None) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def lora_adapters(self) -> dict[str, str]: ...  # name -> path of each LoRA adapter registered

    async def load_lora(self, name: str, path: str) -> None: ...

    async def unload_lora(self, name: str) -> None: ...
