"""Perplexity of a fixed-context model over long text: a sliding window with a stride, every token scored once.

The method of Hugging Face's "Perplexity of fixed-length models" guide: windows of `context` tokens start every
`stride` tokens; in each window only the tokens not scored by an earlier window count, each predicted from all the
window's tokens before it. stride = context gives disjoint windows (fast, less context per token, and each window's
first token goes unscored, as in the guide); a smaller stride scores every token after the first, each with at least
context - stride tokens of context. ppl = exp(total NLL / scored tokens).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longseq.errors import LongseqError, first_line
from longseq.train.loss import chunked_cross_entropy

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


@dataclass
class PerplexityResult:
    nll: float  # mean negative log-likelihood per scored token (nats)
    ppl: float
    tokens: int  # scored tokens
    windows: int
    context: int
    stride: int
    documents: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"task": "perplexity", "nll": self.nll, "ppl": self.ppl, "tokens": self.tokens,
                "windows": self.windows, "context": self.context, "stride": self.stride, "documents": self.documents}


def read_documents(paths: list[str | Path]) -> list[tuple[str, str]]:
    """(source, text) pairs: each .txt / .md file is one document, each .jsonl row's "text" another; folders are
    searched for those files."""
    from longseq.train.data import resolve_files

    files = resolve_files(paths, TEXT_SUFFIXES, kind="text", none_given="no text given: pass --data FILE_OR_FOLDER")
    docs: list[tuple[str, str]] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LongseqError(f"{f}: cannot read as UTF-8 text ({first_line(e)})") from None
        if f.suffix.lower() != ".jsonl":
            docs.append((str(f), text))
            continue
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LongseqError(f"{f}:{number}: not JSON ({first_line(e)})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise LongseqError(f"{f}:{number}: expected an object with a \"text\" string")
            docs.append((f"{f}:{number}", row["text"]))
    return docs


def window_plan(num_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored target) of each window: targets first..end-1 are scored from ids[begin:end]."""
    plan, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context, num_tokens)
        first = max(prev_end, begin + 1)  # a window's first token has no context inside it
        if first < end:
            plan.append((begin, end, first))
        prev_end = end
        if end == num_tokens:
            break
    return plan


@torch.inference_mode()
def sequence_nll(model: Any, ids: list[int], context: int, stride: int, loss_chunk: int = 1024
                 ) -> tuple[float, int, int]:
    """(summed NLL, scored tokens, windows) of one token sequence."""
    device = model.lm_head.weight.device
    total, count = 0.0, 0
    plan = window_plan(len(ids), context, stride)
    for begin, end, first in plan:
        x = torch.tensor([ids[begin:end]], device=device)  # (1, L)
        skip = first - begin  # targets before `first` were scored by an earlier window
        hidden = model.hidden(x)[0, skip - 1 : -1]  # (end - first, d): position i predicts token i+1
        targets = x[0, skip:]
        total += float(chunked_cross_entropy(hidden, model.lm_head.weight, targets, loss_chunk))
        count += targets.numel()
    return total, count, len(plan)


def run_perplexity(lm: Any, docs: list[tuple[str, str]], context: int | None = None, stride: int | None = None
                   ) -> PerplexityResult:
    """Token-weighted perplexity over documents (each scored on its own; no window spans two documents)."""
    context = context or lm.config.max_seq_len
    stride = stride or context // 2 or 1
    if context < 2 or stride <= 0 or stride > context:
        raise LongseqError(f"perplexity needs context >= 2 and 0 < stride <= context; got {context}, {stride}")
    if context > lm.config.max_seq_len:
        raise LongseqError(f"context {context} exceeds the model's ({lm.config.max_seq_len}); pass --rope-scaling "
                           "with --rope-factor, or --max-seq-len to try anyway")
    total, count, windows, per_doc = 0.0, 0, 0, []
    for source, text in docs:
        ids = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) < 2:
            continue
        nll, n, w = sequence_nll(lm.model, ids, context, stride)
        total, count, windows = total + nll, count + n, windows + w
        per_doc.append({"source": source, "tokens": n, "nll": nll / n, "ppl": math.exp(nll / n)})
    if not count:
        raise LongseqError("the text holds fewer than 2 tokens: nothing to score")
    return PerplexityResult(total / count, math.exp(total / count), count, windows, context, stride, per_doc)


@torch.inference_mode()
def cached_sequence_nll(model: Any, ids: list[int], cache: Any, chunk: int, loss_chunk: int = 1024
                        ) -> tuple[float, int]:
    """(summed NLL, scored tokens) of one token sequence read once through `cache` in forwards of `chunk` tokens:
    every token after the first is scored, from whatever the cache lets it see (memory attention: sinks, window
    and retrieved blocks, at the cache's positions). With a plain KV cache this is one window over the sequence."""
    device = model.lm_head.weight.device
    total, count = 0.0, 0
    for start in range(0, len(ids), chunk):
        x = torch.tensor([ids[start : start + chunk]], device=device)  # (1, L)
        hidden = model.hidden(x, positions=cache.prepare(x.shape[1]), cache=cache)[0]  # (L, d)
        cache.advance(x.shape[1])
        targets = torch.tensor(ids[start + 1 : start + chunk + 1], device=device)  # the last one opens the next chunk
        if targets.numel():
            total += float(chunked_cross_entropy(hidden[: targets.numel()], model.lm_head.weight, targets, loss_chunk))
            count += targets.numel()
    return total, count
