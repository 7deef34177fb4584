"""What the retrieval tasks (passkey, needle) share: a grid of (length, depth) cells with several prompts each, the
checks made before any prompt is built, the greedy answer loop and the report (accuracy grid, JSON).

A task supplies its config class (its name and answer budget) and a prompt builder; the model reads each prompt in
one prefill and greedily decodes a few tokens; the answer is right when its first number is the key.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from longseq.config import ModelConfig
from longseq.config.model import UNBOUNDED_VARIANTS
from longseq.errors import LongseqError
from longseq.generation import SamplingParams, generate_tokens

# The prompt's ids at their peak: Python list entries while a prompt is concatenated (two lists at once) and the
# int64 tensor generation makes of them.
PROMPT_BYTES_PER_TOKEN = 24


@dataclass
class RetrievalConfig:
    task: ClassVar[str] = "retrieval"

    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    """Context lengths in tokens: prompt plus answer fit in each."""
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Where the key sits in the haystack: 0 = right after the instruction, 1 = right before the question."""
    trials: int = 1
    """Prompts (different keys) per (length, depth) cell."""
    seed: int = 0
    answer_tokens: int = 8
    """Tokens decoded at most (SmolLM2's tokenizer spends one per digit)."""

    def __post_init__(self):
        self.lengths, self.depths = tuple(int(n) for n in self.lengths), tuple(float(d) for d in self.depths)
        if not self.lengths or min(self.lengths) <= 0:
            raise LongseqError(f"{self.task} lengths must be positive token counts")
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths):
            raise LongseqError(f"{self.task} depths must be within 0..100%")
        if self.trials <= 0 or self.answer_tokens <= 0:
            raise LongseqError(f"{self.task} trials and answer tokens must be positive")


@dataclass
class RetrievalPrompt:
    ids: list[int]
    key: str
    needle_at: int  # token index where the needle sentence starts


@dataclass
class RetrievalSample:
    length: int
    depth: float
    key: str
    answer: str | None
    correct: bool
    prompt_tokens: int
    seconds: float
    text: str


@dataclass
class RetrievalReport:
    config: RetrievalConfig
    samples: list[RetrievalSample] = field(default_factory=list)

    def accuracy(self, length: int | None = None, depth: float | None = None) -> float:
        picked = [s for s in self.samples if (length is None or s.length == length) and (depth is None or
                                                                                        s.depth == depth)]
        return sum(s.correct for s in picked) / len(picked) if picked else float("nan")

    def grid(self) -> list[list[float]]:
        """Accuracy per [depth][length], in the config's order."""
        return [[self.accuracy(n, d) for n in self.config.lengths] for d in self.config.depths]

    def to_json(self) -> dict[str, Any]:
        cells = [{"length": n, "depth": d, "accuracy": self.accuracy(n, d),
                  "trials": sum(1 for s in self.samples if s.length == n and s.depth == d)}
                 for n in self.config.lengths for d in self.config.depths]
        return {"task": self.config.task, "config": asdict(self.config), "accuracy": self.accuracy(),
                "by_length": {str(n): self.accuracy(length=n) for n in self.config.lengths},
                "cells": cells, "samples": [asdict(s) for s in self.samples]}


def tokens(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def parse_answer(text: str) -> str | None:
    """The first number in the generated text."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def check_lengths(cfg: RetrievalConfig, model: ModelConfig, context: int | None, dtype: torch.dtype,
                  device: torch.device) -> None:
    """What must hold before any prompt is built (and, from the CLI, before the model loads): every length within
    the context (None: streaming or memory attention, no limit), and the longest prompt's ids and KV cache within
    the memory available on the device. The memory needed is a lower bound (a forward's activations come on top)."""
    too_long = [n for n in cfg.lengths if context is not None and n > context]
    if too_long:
        raise LongseqError(f"{cfg.task} length {max(too_long)} exceeds the model's context ({context}); pass "
                           "--rope-scaling with --rope-factor, or --max-seq-len to try anyway")
    longest = max(cfg.lengths)
    per_token = PROMPT_BYTES_PER_TOKEN
    if context is not None:  # a full KV cache (streaming keeps a window; memory's, maybe on the host, is not counted)
        per_token += 2 * model.num_layers * model.num_kv_heads * model.head_dim * dtype.itemsize  # K and V
    need, have = longest * per_token, available_memory(device)
    if have is not None and need > have:
        raise LongseqError(f"{cfg.task} length {longest:,} needs at least {_gib(need)} for its prompt"
                           f"{' and KV cache' if context is not None else ''}; {device} has {_gib(have)} available: "
                           "use shorter --lengths")


def available_memory(device: torch.device) -> int | None:
    """Bytes free on a GPU, or the memory Linux reports available (MemAvailable) for cpu; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def run_retrieval(lm: Any, cfg: RetrievalConfig, make_prompt: Callable[[int, float, random.Random], RetrievalPrompt],
                  on_sample: Callable[[RetrievalSample], None] | None = None) -> RetrievalReport:
    """Every (length, depth, trial) prompt through `generate_tokens`; `lm` is a LoadedModel. make_prompt(length,
    depth, rng) draws its key from rng (seeded once per run, so every configuration sees the same prompts)."""
    unbounded = lm.config.attention.variant in UNBOUNDED_VARIANTS  # streaming or memory: past the context
    check_lengths(cfg, lm.config, None if unbounded else lm.config.max_seq_len, lm.model.lm_head.weight.dtype,
                  lm.device)
    rng = random.Random(cfg.seed)
    report = RetrievalReport(cfg)
    params = SamplingParams(max_new_tokens=cfg.answer_tokens)
    for length in cfg.lengths:
        for depth in cfg.depths:
            for _ in range(cfg.trials):
                prompt = make_prompt(length, depth, rng)
                start = time.perf_counter()
                out: list[int] = []
                text = ""
                for token in generate_tokens(lm.model, prompt.ids, params, lm.eos_token_ids):
                    out.append(token)
                    text = lm.tokenizer.decode(out, skip_special_tokens=True)
                    if re.search(r"\d\D", text):  # the number is complete: no need to decode further
                        break
                answer = parse_answer(text)
                sample = RetrievalSample(length, depth, prompt.key, answer, answer == prompt.key, len(prompt.ids),
                                         time.perf_counter() - start, text)
                report.samples.append(sample)
                if on_sample is not None:
                    on_sample(sample)
    return report
