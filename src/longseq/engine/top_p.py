"""Each row's top-p cut (Holtzman et al. 2019) as (cut_value, cut_index): the value and token id of the last token
kept, in the order of a stable descending sort of logits / T (engine/gumbel_max.py `kept`). After the top-k
floor (its ties stay) the row is renormalised and a token stays while the mass ranked ahead of it is < top_p.

The sort below is the reference and the CPU path; on a GPU the Triton kernel (kernels/top_p.py) finds the same cut
by a search over the values, without sorting the (rows, V) logits.
"""

from __future__ import annotations

import torch

from longseq.models import fused

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


def top_p_cut(logits: torch.Tensor, inv_temp: torch.Tensor, floor: torch.Tensor, top_p: torch.Tensor,
              on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """top_p_cut_reference, by the kernel where the model's kernels run (models/fused.py: CUDA tensors)."""
    if fused.active(logits):
        from longseq.engine.kernels.top_p import top_p_cut as kernel

        return kernel(logits, inv_temp, floor, top_p, on)
    return top_p_cut_reference(logits, inv_temp, floor, top_p, on)
