"""Batched sampling with per-request parameters: penalties, temperature, top-k, top-p, seeds, logprobs."""

from __future__ import annotations

import torch

from longseq.engine.sequence import Sequence
from longseq.generation.sampling import filter_logits


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """OpenAI semantics: logit -= presence * [count > 0] + frequency * count, over the tokens generated so far."""
    rows = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty]
    for i in rows:
        s = seqs[i]
        out = s.output_ids
        if not out:
            continue
        counts = torch.bincount(torch.tensor(out, device=logits.device), minlength=logits.shape[-1]).float()
        logits[i] -= s.params.frequency_penalty * counts + s.params.presence_penalty * (counts > 0).float()
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits (B, V) float32 -> one token id per sequence (B,), on the logits' device and not waited for, and the
    raw log-probabilities (B, V) when any sequence asked for logprobs (None otherwise: a log-softmax over a 128K
    vocabulary per row is not free)."""
    logprobs = None
    if any(s.logprobs is not None for s in seqs):
        logprobs = torch.log_softmax(logits, dim=-1)  # of the model's distribution, before any processing (as vLLM)
    if any(s.params.presence_penalty or s.params.frequency_penalty for s in seqs):
        logits = apply_penalties(logits.clone(), seqs)
    tokens = logits.argmax(-1)  # greedy rows keep this
    for i, s in enumerate(seqs):
        p = s.params
        if p.greedy:
            continue
        # Per row: each request has its own parameters and, with a seed, its own generator, so its samples do
        # not depend on which other requests share the batch.
        row = filter_logits(logits[i : i + 1], p.temperature, p.top_k, p.top_p).softmax(-1)
        if p.seed is not None and s.generator is None:
            s.generator = torch.Generator(device=logits.device).manual_seed(p.seed)
        tokens[i] = torch.multinomial(row, 1, generator=s.generator)[0, 0]
    return tokens, logprobs
