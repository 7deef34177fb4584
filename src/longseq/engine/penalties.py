"""Presence, frequency and repetition penalties from token counts kept on the device.

Each penalised sequence owns a row (slot) of a (slots, V) count table and of a (slots, V) prompt mask. The sampler
adds each step's sampled tokens to the counts on the device, so a penalised sequence's next step can be launched
before the host has read its last token (async scheduling), and no step uploads the output so far.
"""

from __future__ import annotations

import torch

from longseq.engine.sequence import Sequence
from longseq.engine.uploads import upload


class PenaltyState:
    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size, self.device = vocab_size, device
        self.counts = torch.zeros(0, vocab_size, device=device)  # (slots, V) float32: occurrences in the output
        self.in_prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)  # (slots, V)
        self.slot_of: dict[int, int] = {}  # seq_id -> slot
        self.free: list[int] = []

    def slots(self, seqs: list[Sequence]) -> list[int]:
        """Each sequence's slot, given at its first penalised step, with its counts so far (none: no token of it
        is in flight before that step) and its prompt."""
        return [self.slot_of[s.seq_id] if s.seq_id in self.slot_of else self._allocate(s) for s in seqs]

    def release(self, seq: Sequence) -> None:
        """The sequence has finished. Its slot may be reused at once: a new owner's reset is queued on the device
        after any step still in flight for the old one."""
        slot = self.slot_of.pop(seq.seq_id, None)
        if slot is not None:
            self.free.append(slot)

    def _allocate(self, seq: Sequence) -> int:
        if not self.free:
            n = len(self.counts)
            grow = max(n, 8)
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow, self.vocab_size)])
            self.in_prompt = torch.cat([self.in_prompt, self.in_prompt.new_zeros(grow, self.vocab_size)])
            self.free.extend(range(n + grow - 1, n - 1, -1))
        slot = self.free.pop()
        self.slot_of[seq.seq_id] = slot
        prompt = seq.prompt_ids if seq.params.repetition_penalty != 1 else []
        output, prompt = upload(self.device, [seq.output_ids, prompt])[0]
        self.counts[slot].zero_().index_add_(0, output, torch.ones(len(output), device=self.device))
        self.in_prompt[slot].zero_()[prompt] = True
        return slot

    def apply(self, logits: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, presence: torch.Tensor,
              frequency: torch.Tensor, repetition: torch.Tensor | None) -> None:
        """logits (B, V), in place at `rows` (P,), whose sequences hold `slots` (P,); per-row penalties (P,).

        Repetition (CTRL, Keskar et al. 2019, as HF and vLLM) over the prompt and the output: a seen token's logit
        is divided by the penalty where positive, multiplied where not. Then OpenAI's presence and frequency over
        the output: logit -= presence * [count > 0] + frequency * count."""
        counts = self.counts[slots]  # (P, V)
        x = logits[rows]  # (P, V)
        if repetition is not None:
            r = repetition[:, None]
            seen = self.in_prompt[slots] | (counts > 0)
            x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
        x -= frequency[:, None] * counts + presence[:, None] * (counts > 0)
        logits[rows] = x

    def add(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count the tokens (P,) just sampled for the sequences holding `slots` (P,)."""
        self.counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=self.counts.dtype), accumulate=True)
