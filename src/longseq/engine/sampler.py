"""The batched sampler: one token per row of a step's logits, every row with its own parameters, in batched tensor
ops with no per-row loop and no host sync.

Order per row, as vLLM: raw log-probabilities (when asked) -> logit_bias -> repetition, frequency and presence
penalties -> greedy argmax, or temperature -> top-k -> top-p -> min-p (HF's order) -> a Gumbel-max draw with
counter-based noise (engine/gumbel_max.py). generation/sampling.py's per-row sampler is the reference it is tested
against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from longseq.engine.gumbel_max import gumbel_max
from longseq.engine.penalties import PenaltyState
from longseq.engine.sampling_batch import SamplingBatch
from longseq.engine.sequence import Sequence
from longseq.engine.top_p import sorted_cut, top_p_cut
from longseq.engine.uploads import upload
from longseq.models import fused

NEG_INF = float("-inf")


@dataclass
class BatchLogprobs:
    rows: list[int]  # the rows (indices into the step's sequences) that asked for logprobs
    chosen: torch.Tensor  # (R,) float32: each row's sampled token's
    top_values: torch.Tensor  # (R, N) float32, best first; N: the largest number asked for
    top_ids: torch.Tensor  # (R, N) int64


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # (B,) int64, on the device and not waited for
    logprobs: BatchLogprobs | None = None


def _take(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return x if len(rows) == len(x) else x[rows]


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size, self.device = vocab_size, torch.device(device)
        self.penalties = PenaltyState(vocab_size, self.device)
        self._batch: SamplingBatch | None = None

    def batch(self, seqs: list[Sequence]) -> SamplingBatch:
        """The rows' parameters: the last step's while the batch has the same sequences in the same order."""
        if self._batch is None or self._batch.key != tuple(s.seq_id for s in seqs):
            self._batch = SamplingBatch(seqs, self.vocab_size, self.device, self.penalties)
        return self._batch

    def release(self, seq: Sequence) -> None:
        """The sequence has finished or was reset: free what it holds (its penalty counts)."""
        self.penalties.release(seq)

    def reset(self) -> None:
        """Forget the cached batch: its rows may name penalty slots that were released."""
        self._batch = None

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits (B, V) float32, row i of seqs[i], which have counted this step's tokens (num_computed_tokens).
        The logits are modified in place."""
        b = self.batch(seqs)
        if b.plain_greedy:
            return SamplerOutput(logits.argmax(-1))
        # Log-probabilities of the model's own distribution, before any processing (as vLLM and OpenAI report).
        raw = torch.log_softmax(_take(logits, b.logprob_rows_t), -1) if b.logprob_rows else None  # (R, V)
        self.adjust(logits, b)
        if b.all_greedy:
            tokens = logits.argmax(-1)
        else:
            # The output index of the token each row samples: its noise's counter (generation/counter_rng.py).
            positions = upload(self.device, [[s.num_computed_tokens - s.num_prompt_tokens for s in seqs]])[0][0]

            def draw(floor: torch.Tensor) -> torch.Tensor:  # each row's token were top-p to keep everything
                no_cut = (torch.full_like(floor, NEG_INF), torch.full_like(positions, logits.shape[1]))
                return gumbel_max(logits, b.inv_temp, floor, *no_cut, b.rng_keys, positions)

            tokens = gumbel_max(logits, b.inv_temp, *self.cuts(logits, b, draw), b.rng_keys, positions)
        if b.penalty_rows:
            self.penalties.add(b.slots, tokens[b.penalty_rows_t])
        return SamplerOutput(tokens, None if raw is None else self._logprobs(raw, tokens, b))

    def adjust(self, logits: torch.Tensor, b: SamplingBatch) -> None:
        """logit_bias, then the penalties, in place on logits (B, V)."""
        if b.any_bias:
            logits.view(-1).index_add_(0, b.bias_index, b.bias_values)
        if b.penalty_rows:
            self.penalties.apply(logits, b.penalty_rows_t, b.slots, b.presence, b.frequency,
                                 b.repetition if b.any_repetition else None)

    def cuts(self, logits: torch.Tensor, b: SamplingBatch, draw: Callable[[torch.Tensor], torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's kept tokens as (floor, cut_value, cut_index) (B,) in units of logit / T (gumbel_max.kept):
        the same tokens as filter_logits keeps. The top-k floor is a top-k as deep as the largest k; the top-p cut
        is engine/top_p.py's search on a GPU, else one sort that also gives the floor; min-p needs each row's
        maximum alone. `draw` (floor -> (B,) tokens): the rows' draws were top-p to keep every token above the
        floor; where the search runs, a row whose draw top-p keeps anyway gets its draw as its cut, which keeps
        fewer tokens but the same draw, and skips the search (kernels/top_p.py)."""
        B, V = logits.shape
        floor = logits.new_full((B,), NEG_INF)
        cut_value = logits.new_full((B,), NEG_INF)
        cut_index = torch.full((B,), V, dtype=torch.int64, device=logits.device)
        search = b.any_top_p and fused.active(logits)
        if b.cut_rows and (b.max_top_k or (b.any_top_p and not search)):
            rows = b.cut_rows_t
            scaled = _take(logits, rows) * b.inv_temp[rows, None]  # (F, V)
            if b.any_top_p and not search:
                ranked, order = torch.sort(scaled, dim=-1, descending=True, stable=True)  # (F, V)
            else:
                ranked = torch.topk(scaled, b.max_top_k, dim=-1).values  # (F, max k), descending
            k = b.top_k[rows]  # (F,), 0: no top-k
            kth = ranked.gather(1, (k.clamp(min=1) - 1)[:, None])  # (F, 1)
            kth = torch.where(k[:, None] > 0, kth, NEG_INF)
            floor[rows] = kth[:, 0]
            if b.any_top_p and not search:
                cut_value[rows], cut_index[rows] = sorted_cut(ranked, order, kth, b.top_p[rows], b.top_p_on[rows])
        top_k_floor = floor  # what the top-p cut renormalises over
        if b.any_min_p:
            # Min-p: p_i >= min_p * p_max, i.e. logit_i / T >= max logit / T + log(min_p) (arXiv 2407.01082).
            floor = torch.maximum(floor, logits.max(-1).values * b.inv_temp + b.log_min_p)
        if search:
            candidate = draw(floor) if draw is not None else None
            cut_value, cut_index = top_p_cut(logits, b.inv_temp, top_k_floor, b.top_p, b.top_p_on, candidate)
        return floor, cut_value, cut_index

    def _logprobs(self, raw: torch.Tensor, tokens: torch.Tensor, b: SamplingBatch) -> BatchLogprobs:
        chosen = raw.gather(1, _take(tokens, b.logprob_rows_t)[:, None])[:, 0]  # (R,)
        top_values, top_ids = raw.topk(b.max_logprobs, dim=-1)  # (R, N), N may be 0
        return BatchLogprobs(b.logprob_rows, chosen, top_values, top_ids)
