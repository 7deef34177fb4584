"""Single-sequence generation with a contiguous KV cache: prefill the prompt once, then decode token by token."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from longseq.errors import LongseqError
from longseq.generation.counter_rng import row_states, seed_key
from longseq.generation.detokenize import IncrementalDetokenizer, StopStringMatcher
from longseq.generation.kv_cache import KVCache
from longseq.generation.memory_cache import MemoryKVCache
from longseq.generation.sampling import SamplingParams, sample_gumbel
from longseq.generation.sink_cache import SinkKVCache
from longseq.models.llama import CausalLM


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop": EOS or a stop string; "length": max_new_tokens or the context is full
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.token_ids) - 1  # the first token comes from prefill
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


@torch.inference_mode()
def generate_tokens(
    model: CausalLM,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_token_ids: tuple[int, ...] = (),
) -> Iterator[int]:
    """Yield new token ids until EOS or a stop token (yielded, then stop), `max_new_tokens` or the model's context
    is full. Sampled with the serving engine's counter-based noise, so a seeded request draws the same tokens
    here as there."""
    cfg = model.config
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    if not prompt_ids:
        raise LongseqError("the prompt is empty")
    if cfg.attention.variant == "streaming":
        # Attention sinks + a rolling window: memory stays fixed and generation may run past the context.
        cache = SinkKVCache(cfg, 1, device, dtype, model.rotary.inv_freq)
        max_new = params.max_new_tokens
    elif cfg.attention.variant == "memory":
        # Sinks + window + blocks retrieved from a memory of the rest (InfLLM): positions stay within the context.
        cache = MemoryKVCache(cfg, 1, device, dtype, model.rotary.inv_freq)
        max_new = params.max_new_tokens
    else:
        if len(prompt_ids) >= cfg.max_seq_len:
            raise LongseqError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {cfg.max_seq_len}")
        max_new = min(params.max_new_tokens, cfg.max_seq_len - len(prompt_ids))
        cache = KVCache(cfg, 1, len(prompt_ids) + max_new, device, dtype)
    key = torch.tensor([seed_key(params.seed if params.seed is not None else random.getrandbits(64))], device=device)
    stop_ids = (set() if params.ignore_eos else set(eos_token_ids)) | set(params.stop_token_ids)

    start = 0
    while start < len(prompt_ids):  # one forward, or the chunks the rolling and memory caches take
        size = cache.prefill_chunk() if isinstance(cache, SinkKVCache | MemoryKVCache) else len(prompt_ids)
        logits = _forward(model, torch.tensor([prompt_ids[start : start + size]], device=device), cache)
        start += size
    for step in range(max_new):
        if params.greedy:
            token = logits[:, -1].argmax(-1)  # (1,)
        else:
            token = sample_gumbel(logits[:, -1], params, row_states(key, torch.tensor([step], device=device)))
        token_id = int(token)  # host sync: the caller streams it
        yield token_id
        if token_id in stop_ids:
            return
        if step + 1 == max_new:
            return
        logits = _forward(model, token.view(1, 1), cache)


def _forward(model: CausalLM, ids: torch.Tensor, cache: KVCache | SinkKVCache | MemoryKVCache) -> torch.Tensor:
    """ids (1, S) -> last logits (1, 1, V); the cache decides the positions and holds the new K/V afterwards."""
    positions = cache.prepare(ids.shape[1])
    logits = model(ids, positions=positions, cache=cache, last_only=True)
    cache.advance(ids.shape[1])
    return logits


def render_prompt(tokenizer: Any, prompt: str | list[dict], chat: bool, system: str | None = None) -> list[int]:
    """Token ids of a prompt: through the model's chat template in chat mode, plain text otherwise."""
    if not chat:
        if not isinstance(prompt, str):
            raise LongseqError("a list of messages needs chat mode")
        return list(tokenizer(prompt)["input_ids"])
    if getattr(tokenizer, "chat_template", None) is None:
        raise LongseqError("this model has no chat template; use --no-chat for plain completion")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def generate(
    lm,
    prompt: str | list[dict] | list[int],
    params: SamplingParams | None = None,
    *,
    chat: bool = True,
    system: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate text for one prompt with a `LoadedModel`; `on_text` receives the text as it streams."""
    params = params or SamplingParams()
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        prompt_ids = list(prompt)
    else:
        prompt_ids = render_prompt(lm.tokenizer, prompt, chat, system)
    detok = IncrementalDetokenizer(lm.tokenizer, prompt_ids)
    stops = StopStringMatcher(params.stop)
    eos = lm.eos_token_ids
    out_ids: list[int] = []
    finish = "length"
    start = time.perf_counter()
    first = None
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    for token_id in generate_tokens(lm.model, prompt_ids, params, eos):
        if first is None:
            first = time.perf_counter()
        out_ids.append(token_id)
        if (token_id in eos and not params.ignore_eos) or token_id in params.stop_token_ids:
            finish = "stop"
            break
        piece = stops.push(detok.add(token_id))
        if piece and on_text:
            on_text(piece)
        if stops.stopped:
            finish = "stop"
            break
    sync()
    end = time.perf_counter()
    rest = stops.flush()
    if rest and on_text:
        on_text(rest)
    first = first or end
    return GenerationResult(
        text=stops.text,
        token_ids=out_ids,
        prompt_tokens=len(prompt_ids),
        finish_reason=finish,
        time_to_first_token_s=first - start,
        decode_s=end - first,
    )
