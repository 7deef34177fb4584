"""Passkey retrieval: a random 5-digit key hidden at a chosen depth inside filler text of a chosen length.

The prompt is the classic one of Mohtashami & Jaggi 2023 (Landmark Attention, arXiv 2305.16300), also used by
LongLoRA and YaRN; sweeping depth x length gives a needle-in-a-haystack heatmap (G. Kamradt 2023). The grid, the
checks, the answer loop and the report are eval/retrieval.py's, shared with the needle task.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from longseq.errors import LongseqError
from longseq.eval.retrieval import (
    PROMPT_BYTES_PER_TOKEN,
    RetrievalConfig,
    RetrievalPrompt,
    RetrievalReport,
    RetrievalSample,
    available_memory,
    parse_answer,
    run_retrieval,
    tokens,
)

__all__ = ["FILLER", "INSTRUCTION", "NEEDLE", "PROMPT_BYTES_PER_TOKEN", "QUESTION", "PasskeyConfig", "PasskeyPrompt",
           "PasskeyReport", "PasskeySample", "available_memory", "build_prompt", "parse_answer",
           "run_passkey"]

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
               "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"

PasskeyPrompt = RetrievalPrompt
PasskeySample = RetrievalSample
PasskeyReport = RetrievalReport


@dataclass
class PasskeyConfig(RetrievalConfig):
    task: ClassVar[str] = "passkey"


def build_prompt(tokenizer: Any, length: int, depth: float, key: str, answer_tokens: int = 8) -> PasskeyPrompt:
    """Instruction, filler with the needle after round(depth * n) of its n sentences groups, question; at most
    `length - answer_tokens` tokens (whole filler groups only, so it may be up to one group shorter)."""
    instruction, filler = tokens(tokenizer, INSTRUCTION), tokens(tokenizer, FILLER)
    needle, question = tokens(tokenizer, NEEDLE.format(key=key)), tokens(tokenizer, QUESTION)
    fixed = len(instruction) + len(needle) + len(question)
    repeats = (length - answer_tokens - fixed) // len(filler)
    if repeats < 1:
        raise LongseqError(f"passkey length {length} is too short: the prompt needs at least "
                           f"{fixed + len(filler) + answer_tokens} tokens")
    before = round(repeats * depth)
    ids = instruction + filler * before
    needle_at = len(ids)
    ids += needle + filler * (repeats - before) + question
    return PasskeyPrompt(ids, key, needle_at)


def run_passkey(lm: Any, cfg: PasskeyConfig, on_sample: Callable[[PasskeySample], None] | None = None
                ) -> PasskeyReport:
    """Every (length, depth, trial) prompt through `generate_tokens`; `lm` is a LoadedModel."""

    def make_prompt(length: int, depth: float, rng: random.Random) -> PasskeyPrompt:
        # build_prompt is looked up at call time, so a test may replace it on this module
        return build_prompt(lm.tokenizer, length, depth, str(rng.randint(10000, 99999)), cfg.answer_tokens)

    return run_retrieval(lm, cfg, make_prompt, on_sample)
