"""Sampling parameters and the token sampler (temperature -> top-k -> top-p, the order HF applies them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longseq.errors import LongseqError


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Nucleus sampling (Holtzman et al. 2019): the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """Generation ends before the first occurrence of any of these strings."""
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated (OpenAI semantics), in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted once per previous occurrence of a token in the output, in [-2, 2]."""
    logprobs: int | None = None
    """Return the log-probability of each sampled token and of the top N alternatives (0 <= N <= 20)."""

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise LongseqError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # NaN compares false to everything
            raise LongseqError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LongseqError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LongseqError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2.0 <= value <= 2.0):
                raise LongseqError(f"{name} must be in [-2, 2], got {value}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise LongseqError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits (B, V) float32 -> logits with the excluded tokens at -inf, scaled by 1/temperature."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p; the most likely one always stays.
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    if params.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits.float(), params.temperature, params.top_k, params.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
