"""One batch composition's sampling parameters as small device tensors, built when the batch's sequences change and
reused while they stay (a steady decode batch then uploads only its positions each step)."""

from __future__ import annotations

import math

import torch

from longseq.engine.penalties import PenaltyState
from longseq.engine.sequence import Sequence
from longseq.engine.uploads import upload


def _rows(flags) -> list[int]:
    return [i for i, f in enumerate(flags) if f]


class SamplingBatch:
    """Row i is seqs[i]. Host-side flags and row lists say which stages the batch needs; the tensors hold the
    per-row values, all uploaded in one copy."""

    def __init__(self, seqs: list[Sequence], vocab_size: int, device: torch.device, penalties: PenaltyState):
        self.key = tuple(s.seq_id for s in seqs)
        ps = [s.params for s in seqs]
        sampled = [not p.greedy for p in ps]
        self.all_greedy = not any(sampled)
        # Top-k / top-p rows need their logits ranked; min-p needs only each row's maximum.
        top_k = [p.top_k if on and p.top_k < vocab_size else 0 for p, on in zip(ps, sampled, strict=True)]
        top_p_on = [int(on and p.top_p < 1) for p, on in zip(ps, sampled, strict=True)]
        self.cut_rows = _rows(k > 0 or tp for k, tp in zip(top_k, top_p_on, strict=True))
        self.any_top_p, self.max_top_k = any(top_p_on), max(top_k, default=0)
        min_p = [p.min_p if on else 0.0 for p, on in zip(ps, sampled, strict=True)]
        self.any_min_p = any(min_p)
        self.penalty_rows = _rows(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1 for p in ps)
        pen = [ps[i] for i in self.penalty_rows]
        self.any_repetition = any(p.repetition_penalty != 1 for p in pen)
        self.logprob_rows = _rows(s.logprobs is not None for s in seqs)
        self.max_logprobs = max((ps[i].logprobs for i in self.logprob_rows), default=0)
        bias = [(i * vocab_size + t, b) for i, p in enumerate(ps) for t, b in p.logit_bias.items()]  # flat (B * V)
        self.any_bias = bool(bias)
        # An all-greedy batch with nothing else to do is one argmax: it uploads nothing.
        self.plain_greedy = self.all_greedy and not (self.penalty_rows or self.logprob_rows or bias)
        if self.plain_greedy:
            return
        slots = penalties.slots([seqs[i] for i in self.penalty_rows])
        ints, floats = upload(device, [
            [s.rng_key for s in seqs], top_k, top_p_on, self.cut_rows, self.penalty_rows, slots, self.logprob_rows,
            [i for i, _ in bias],
        ], [
            [1.0 / p.temperature if on else 0.0 for p, on in zip(ps, sampled, strict=True)],
            [p.top_p for p in ps], [math.log(m) if m else -math.inf for m in min_p],
            [p.presence_penalty for p in pen], [p.frequency_penalty for p in pen],
            [p.repetition_penalty for p in pen], [b for _, b in bias],
        ])
        self.rng_keys, self.top_k, self.top_p_on = ints[:3]  # (B,): 0 where no top-k / no top-p
        self.cut_rows_t, self.penalty_rows_t, self.slots, self.logprob_rows_t, self.bias_index = ints[3:]
        self.inv_temp, self.top_p, self.log_min_p = floats[:3]  # (B,); inv_temp 0: a greedy row
        self.presence, self.frequency, self.repetition, self.bias_values = floats[3:]  # (P,) x 3, (N_bias,)
