"""Sampling parameters and the per-row reference sampler (temperature -> top-k -> top-p -> min-p, the order HF
applies them). The serving engine samples a whole batch at once (engine/sampler.py); this path is its oracle."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from longseq.errors import LongseqError
from longseq.generation.counter_rng import gumbel


class SamplingParamsError(LongseqError):
    """A sampling parameter out of its range; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# Below this a temperature is greedy decoding (as vLLM's 1e-5): 1 / 1e-126 is no float32, and the scaled logits of
# a temperature that small are infinities and NaNs, on which top-p cannot cut.
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy decoding, as does any temperature below MIN_TEMPERATURE."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Nucleus sampling (Holtzman et al. 2019): the smallest set of tokens whose probability reaches top_p."""
    min_p: float = 0.0
    """Min-p sampling (Nguyen et al. 2024, arXiv 2407.01082): drop tokens less likely than min_p times the most
    likely one; 0 keeps all."""
    seed: int | None = None
    """A 64-bit signed integer (OpenAI's range): the same seed, prompt and parameters give the same tokens."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first occurrence of any of these strings."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation ends after any of these tokens, as after EOS (also with ignore_eos)."""
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated (OpenAI semantics), in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted once per previous occurrence of a token in the output, in [-2, 2]."""
    repetition_penalty: float = 1.0
    """Divides the positive logits and multiplies the negative ones of every token in the prompt or the output
    (Keskar et al. 2019, CTRL; as HF and vLLM); 1 means none."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Added to the logits of these token ids before sampling (OpenAI semantics), each in [-100, 100]."""
    logprobs: int | None = None
    """Return the log-probability of each sampled token and of the top N alternatives (0 <= N <= 20)."""

    def __post_init__(self):
        # NaN compares false to everything, so every range check below refuses it.
        _require(self.max_new_tokens > 0, "max_new_tokens", f"must be positive, got {self.max_new_tokens}")
        _require(math.isfinite(self.temperature) and self.temperature >= 0, "temperature",
                 f"must be a finite number >= 0, got {self.temperature}")
        _require(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        _require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _require(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(-2.0 <= value <= 2.0, name, f"must be in [-2, 2], got {value}")
        _require(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
                 f"must be a finite number > 0, got {self.repetition_penalty}")
        _require(self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**63), "seed",
                 f"must be an integer in [-2^63, 2^63), got {self.seed!r}")
        _require(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs",
                 f"must be in [0, 20], got {self.logprobs}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        self.stop_token_ids = tuple(self.stop_token_ids)
        bad = [t for t in self.stop_token_ids if not _is_token_id(t)]
        _require(not bad, "stop_token_ids", f"must be token ids (ints >= 0), got {bad[:1]}")
        self.logit_bias = dict(self.logit_bias or {})
        for token, bias in self.logit_bias.items():
            _require(_is_token_id(token), "logit_bias", f"keys must be token ids (ints >= 0), got {token!r}")
            number = isinstance(bias, int | float) and not isinstance(bias, bool)
            _require(number and -100 <= bias <= 100, "logit_bias",
                     f"values must be numbers in [-100, 100], got {bias!r} for token {token}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


def _require(ok: bool, field: str, problem: str) -> None:
    if not ok:
        raise SamplingParamsError(field, f"{field} {problem}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_token_id(t) -> bool:
    return _is_int(t) and t >= 0


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  min_p: float = 0.0) -> torch.Tensor:
    """logits (B, V) float32 -> logits scaled by 1/temperature, with the excluded tokens at -inf."""
    logits = logits * (1.0 / temperature)  # a product, not a quotient: what the batched sampler computes
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Stable: among equal logits the lower token id ranks first, so ties at the cut are settled one way.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p; the most likely one always stays.
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    if min_p > 0:
        # p_i < min_p * p_max  <=>  logit_i < max logit + log(min_p): the same cut without a softmax.
        floor = logits.max(-1, keepdim=True).values + math.log(min_p)  # (B, 1)
        logits = logits.masked_fill(logits < floor, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,), drawn by torch.multinomial from the filtered distribution."""
    if params.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits.float(), params.temperature, params.top_k, params.top_p, params.min_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_gumbel(logits: torch.Tensor, params: SamplingParams, states: torch.Tensor) -> torch.Tensor:
    """logits (B, V), states (B,) int64 (counter_rng.row_states) -> token ids (B,): the Gumbel-max trick,
    argmax(filtered logits + Gumbel noise) is a draw from softmax(filtered logits) (Gumbel 1954; Maddison et al.
    2014). The batched sampler draws the same token from the same logits and states."""
    if params.greedy:
        return logits.argmax(-1)
    filtered = filter_logits(logits.float(), params.temperature, params.top_k, params.top_p, params.min_p)
    return (filtered + gumbel(states, logits.shape[-1])).argmax(-1)
