"""Each row's top-p cut (Holtzman et al. 2019) as (cut_value, cut_index): the value and token id of the last token
kept, in the order of a stable descending sort of logits / T (engine/gumbel_max.py `kept`). After the top-k
floor (its ties stay) the row is renormalised and a token stays while the mass ranked ahead of it is < top_p.

The sort below is the reference and the CPU path; on a GPU the Triton kernel (kernels/top_p.py) finds the same cut
by a search over the values, without sorting the (rows, V) logits. Before a device's first kernel cut, the kernel
is checked once against the sort on random rows of the same width; where they disagree the sort serves that device
(with a warning), so a kernel that compiles wrongly for a GPU costs speed, never samples.
"""

from __future__ import annotations

import logging

import torch

from longseq.engine.gumbel_max import kept
from longseq.models import fused

log = logging.getLogger("longseq.engine")
_checked: dict[tuple[torch.device, int], bool] = {}  # (device, vocabulary) -> the kernel agrees with the sort

NEG_INF = float("-inf")


def sorted_cut(ranked: torch.Tensor, order: torch.Tensor, kth: torch.Tensor, top_p: torch.Tensor,
               on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From a stable descending sort of the rows (ranked, order (F, V)), their top-k floors kth (F, 1) (-inf: none),
    top_p and on (F,) (0: no top-p) -> (cut_value, cut_index) (F,); (-inf, V) where off."""
    V = ranked.shape[1]
    # As filter_logits: renormalise over the top-k, drop a token once those before it reach top_p.
    probs = ranked.masked_fill(ranked < kth, NEG_INF).softmax(-1)
    before = probs.cumsum(-1).sub_(probs)  # the mass ranked ahead of each token
    # >= 1, the first has none ahead; the clamp keeps a row of NaN logits from indexing out of bounds.
    num_kept = (before < top_p[:, None]).sum(-1, keepdim=True).clamp_(min=1)
    on = on > 0
    cut_value = torch.where(on, ranked.gather(1, num_kept - 1)[:, 0], NEG_INF)
    return cut_value, torch.where(on, order.gather(1, num_kept - 1)[:, 0], V)


def top_p_cut_reference(logits: torch.Tensor, inv_temp: torch.Tensor, floor: torch.Tensor, top_p: torch.Tensor,
                        on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) float32; per row: inv_temp, floor (the top-k floor in units of logit / T, -inf: none), top_p
    (float32) and on (int64, 0: no top-p) -> (cut_value (B,) float32, cut_index (B,) int64)."""
    ranked, order = torch.sort(logits * inv_temp[:, None], dim=-1, descending=True, stable=True)  # (B, V)
    return sorted_cut(ranked, order, floor[:, None], top_p, on)


def candidate_cuts(scaled: torch.Tensor, floor: torch.Tensor, cut_value: torch.Tensor, cut_index: torch.Tensor,
                   candidate: torch.Tensor, on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel returns with candidates, from the true cuts: (scaled[c], c) for a row with top-p whose
    candidate c the cut keeps, the cut itself for the others (and for c = -1)."""
    c = candidate.clamp(min=0)[:, None]
    keep = (candidate >= 0) & (on > 0) & kept(scaled, floor, cut_value, cut_index).gather(1, c)[:, 0]
    return (torch.where(keep, scaled.gather(1, c)[:, 0], cut_value), torch.where(keep, candidate, cut_index))


def top_p_cut(logits: torch.Tensor, inv_temp: torch.Tensor, floor: torch.Tensor, top_p: torch.Tensor,
              on: torch.Tensor, candidate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """top_p_cut_reference, by the kernel where the model's kernels run (models/fused.py: CUDA tensors) and it has
    passed its check on this device. `candidate` (B,) int64: the kernel may return a row's candidate as its cut
    where top-p keeps it (kernels/top_p.py); the sort path ignores it (its cut keeps the candidate too)."""
    if fused.active(logits) and _kernel_agrees(logits.device, logits.shape[1]):
        from longseq.engine.kernels.top_p import top_p_cut as kernel

        return kernel(logits, inv_temp, floor, top_p, on, candidate)
    return top_p_cut_reference(logits, inv_temp, floor, top_p, on)


def _kernel_agrees(device: torch.device, vocab: int) -> bool:
    """The kernel's cuts equal the sort's on 16 rows of random float32 logits (no ties, so no rounding of a tie's
    mass can tell them apart), half of them under a top-k floor. One host sync, once per (device, vocabulary)."""
    key = (device, vocab)
    if key not in _checked:
        from longseq.engine.kernels.top_p import top_p_cut as kernel

        gen = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(16, vocab, generator=gen, device=device) * 3  # (16, V)
        inv_temp = torch.linspace(0.5, 2.0, 16, device=device)
        top_p = torch.linspace(0.05, 0.99, 16, device=device)
        on = torch.ones(16, dtype=torch.int64, device=device)
        k = max(1, min(vocab, 50))
        floor = (logits * inv_temp[:, None]).topk(k, dim=-1).values[:, -1]
        floor[::2] = float("-inf")
        got = kernel(logits, inv_temp, floor, top_p, on)
        want = top_p_cut_reference(logits, inv_temp, floor, top_p, on)
        _checked[key] = all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        # With candidates: each row's cut is its candidate where the true cut keeps it, else the true cut.
        candidate = torch.randint(-1, vocab, (16,), generator=gen, device=device)
        candidate[::3] = (logits * inv_temp[:, None]).argmax(-1)[::3]  # some surely kept
        got = kernel(logits, inv_temp, floor, top_p, on, candidate)
        _checked[key] &= all(torch.equal(a, b) for a, b in zip(got, candidate_cuts(
            logits * inv_temp[:, None], floor, *want, candidate, on), strict=True))
        if not _checked[key]:
            log.warning("the top-p kernel disagrees with the sort on this GPU (%s); sampling keeps the sort", device)
    return _checked[key]
