"""One request as the engine tracks it."""

from __future__ import annotations

import itertools
import time
from enum import Enum, auto
from typing import TYPE_CHECKING, Any

from longseq.generation.counter_rng import seed_key
from longseq.generation.detokenize import IncrementalDetokenizer, StopStringMatcher
from longseq.generation.sampling import SamplingParams

if TYPE_CHECKING:
    from longseq.engine.lora import LoRAAdapter

_ids = itertools.count()


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Prompt + output tokens, how many of them have KV in the cache, and the blocks holding that KV."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, tokenizer: Any,
                 max_output_tokens: int, seed: int = 0, lora: LoRAAdapter | None = None):
        """`seed`: the sampling seed where params has none (the engine draws one per request); `lora`: the adapter
        it runs with (None: the base model)."""
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.token_ids = list(prompt_ids)
        self.params = params
        self.max_output_tokens = max_output_tokens  # params.max_new_tokens capped by the context
        self.status = Status.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V is in the cache (prefix-cache hits included)
        self.num_cached_tokens = 0  # of those, taken from the prefix cache at admission
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hash of each full block, chained from the first
        self.finish_reason: str | None = None
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
        self.stops = StopStringMatcher(params.stop)
        self.logprobs: list | None = [] if params.logprobs is not None else None
        # The key of this request's sampling noise (generation/counter_rng.py): its draws depend on it alone.
        self.rng_key = seed_key(params.seed if params.seed is not None else seed)
        self.metrics = {"arrival": time.monotonic()}
        self.lora = lora
        self.lora_slot = -1  # its adapter's slot in the LoRA pool while it runs (the scheduler pins it)
        self.cache_salt = lora.cache_salt if lora is not None else 0  # its prefix-cache hash chain starts here

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED
