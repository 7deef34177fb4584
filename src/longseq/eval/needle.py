"""Needle in a haystack of real text: a random fact "The special magic number for <city> is <7 digits>." inserted
at a chosen depth of the Python documentation, then asked for; right when the answer's first number is exactly the
7 digits.

The fact's wording and the question follow RULER's single-needle task (Hsieh et al. 2024, arXiv 2404.06654) after
G. Kamradt's needle-in-a-haystack test (2023); the haystack is the documentation shipped with every Python
(`pydoc_data.topics`, as benchmarks/context_extension.py's perplexity), repeated end to end where a length needs
more of it, so nothing is downloaded. Unlike the passkey's repeated filler, the needle competes with real text
that holds numbers of its own. The grid, checks, answer loop and report are eval/retrieval.py's.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from longseq.errors import LongseqError
from longseq.eval.retrieval import RetrievalConfig, RetrievalPrompt, RetrievalReport, RetrievalSample, run_retrieval
from longseq.eval.retrieval import tokens as _tokens

INSTRUCTION = ("A special magic number is hidden within the following text. Make sure to memorize it. I will quiz "
               "you about the number afterwards.\n")
NEEDLE = " The special magic number for {subject} is {key}."
QUESTION = ("\nWhat is the special magic number for {subject} mentioned in the provided text? The special magic "
            "number for {subject} mentioned in the provided text is")
SUBJECTS = ("Amsterdam", "Athens", "Bangkok", "Barcelona", "Berlin", "Bogota", "Brisbane", "Budapest", "Cairo",
            "Chicago", "Copenhagen", "Dakar", "Dublin", "Edinburgh", "Florence", "Geneva", "Hanoi", "Havana",
            "Helsinki", "Istanbul", "Jakarta", "Kyoto", "Lagos", "Lima", "Lisbon", "Madrid", "Manila", "Marseille",
            "Melbourne", "Montreal", "Mumbai", "Nairobi", "Oslo", "Prague", "Quito", "Reykjavik", "Santiago",
            "Seoul", "Stockholm", "Sydney", "Tallinn", "Tokyo", "Toronto", "Valencia", "Vienna", "Warsaw",
            "Zagreb", "Zurich")
SENTENCE_ENDS = (".", "\n", ".\n", "\n\n")  # the needle goes after a token ending with one of these


@dataclass
class NeedleConfig(RetrievalConfig):
    task: ClassVar[str] = "needle"

    answer_tokens: int = 12
    """Tokens decoded at most: a space, 7 digits (one token each for SmolLM2) and room to end the number."""


def haystack_text() -> str:
    """The Python documentation's topics, in a fixed order (keys sorted)."""
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


@functools.lru_cache(maxsize=4)
def haystack_ids(tokenizer: Any) -> tuple[int, ...]:
    """The haystack's tokens (tokenized once per tokenizer: a few hundred thousand characters)."""
    return tuple(_tokens(tokenizer, haystack_text()))


@functools.lru_cache(maxsize=4)
def _sentence_ends(tokenizer: Any) -> frozenset[int]:
    ids = set(haystack_ids(tokenizer))
    pieces = tokenizer.convert_ids_to_tokens(sorted(ids))
    text = {i: tokenizer.convert_tokens_to_string([p]) for i, p in zip(sorted(ids), pieces, strict=True)}
    return frozenset(i for i, t in text.items() if t.endswith(SENTENCE_ENDS))


def build_needle_prompt(tokenizer: Any, length: int, depth: float, subject: str, key: str,
                        answer_tokens: int = 12) -> RetrievalPrompt:
    """Instruction, the first n haystack tokens (repeated end to end past its end) with the needle after the last
    sentence end at or before round(depth * n), question; exactly `length - answer_tokens` tokens."""
    instruction, needle = _tokens(tokenizer, INSTRUCTION), _tokens(tokenizer, NEEDLE.format(subject=subject, key=key))
    question = _tokens(tokenizer, QUESTION.format(subject=subject))
    hay = haystack_ids(tokenizer)
    n = length - answer_tokens - len(instruction) - len(needle) - len(question)
    if n < 1:
        raise LongseqError(f"needle length {length} is too short: the prompt needs at least "
                           f"{length - n + 1} tokens")
    body = list(hay) * (n // len(hay)) + list(hay[: n % len(hay)])
    at = round(n * depth)
    ends = _sentence_ends(tokenizer)
    cut = next((i + 1 for i in range(at - 1, -1, -1) if body[i] in ends), 0) if 0 < at < n else at
    ids = instruction + body[:cut]
    needle_at = len(ids)
    return RetrievalPrompt(ids + needle + body[cut:] + question, key, needle_at)


def run_needle(lm: Any, cfg: NeedleConfig, on_sample: Callable[[RetrievalSample], None] | None = None
               ) -> RetrievalReport:
    """Every (length, depth, trial) prompt through `generate_tokens`; `lm` is a LoadedModel."""

    def make_prompt(length: int, depth: float, rng: random.Random) -> RetrievalPrompt:
        subject, key = rng.choice(SUBJECTS), str(rng.randint(1_000_000, 9_999_999))
        return build_needle_prompt(lm.tokenizer, length, depth, subject, key, cfg.answer_tokens)

    return run_retrieval(lm, cfg, make_prompt, on_sample)
