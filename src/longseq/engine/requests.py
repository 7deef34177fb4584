"""What one request may ask of the engine, checked in one place for the offline API and the HTTP server alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from longseq.config import EngineConfig
from longseq.errors import LongseqError

if TYPE_CHECKING:
    from longseq.generation.sampling import SamplingParams


def max_model_len(cfg: EngineConfig, max_seq_len: int) -> int:
    """The longest prompt + output the engine serves: the model's context, or cfg.max_model_len where shorter."""
    return min(cfg.max_model_len or max_seq_len, max_seq_len)


class InvalidRequestError(LongseqError):
    """A request the engine cannot serve. `param`: the request field at fault, where the caller named it;
    `code`: the OpenAI API's error code, where it has one."""

    code: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """The prompt, or the prompt and the output asked for, do not fit in the context."""

    code = "context_length_exceeded"

    def __init__(self, num_prompt_tokens: int, max_new_tokens: int | None, max_model_len: int,
                 param: str | None = None):
        self.num_prompt_tokens, self.max_new_tokens = num_prompt_tokens, max_new_tokens
        self.max_model_len = max_model_len
        asked = "" if num_prompt_tokens >= max_model_len else f" and asks for {max_new_tokens} more"
        super().__init__(f"the prompt has {num_prompt_tokens} tokens{asked}; this model's context is "
                         f"{max_model_len} tokens", param)


@dataclass(frozen=True)
class RequestLimits:
    """The engine's limits on one request: its context and vocabulary, and the KV pool it must fit in."""

    max_model_len: int
    vocab_size: int
    kv_block_size: int
    num_kv_blocks: int

    def check(self, prompt_ids: list[int], max_new_tokens: int | None, *, strict: bool = False,
              param: str | None = None) -> int:
        """How many tokens the request may generate: max_new_tokens, or all the context the prompt leaves where it
        is None. An output that overruns the context is cut to fit, or with `strict` (OpenAI's API) refused.
        Raises InvalidRequestError; `param` names the prompt's field in the errors about the prompt."""
        n = len(prompt_ids)
        if not n:
            raise InvalidRequestError("the prompt is empty", param)
        room = self.max_model_len - n
        if room <= 0 or (strict and max_new_tokens is not None and max_new_tokens > room):
            raise ContextLengthError(n, max_new_tokens, self.max_model_len, param)
        vocab = self.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        max_output = room if max_new_tokens is None else min(max_new_tokens, room)
        need = -(-(n + max_output) // self.kv_block_size)
        if need > self.num_kv_blocks:
            raise InvalidRequestError(f"the request needs {need} KV blocks; the pool has {self.num_kv_blocks}")
        return max_output

    def check_sampling(self, params: SamplingParams) -> None:
        """The token ids the sampling parameters name (logit_bias, stop_token_ids) are in the vocabulary."""
        vocab = self.vocab_size
        for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise InvalidRequestError(f"{name} token ids must be in [0, {vocab}), got {bad[0]}", name)
