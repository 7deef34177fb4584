"""The sampler's draw for a whole batch: token = argmax over the kept tokens of (logit / T + Gumbel noise), the
Gumbel-max trick (Gumbel 1954; Maddison, Tarlow and Minka 2014): a draw from softmax(logit / T) over those tokens.

The noise of row r at token t is a pure function of (r's key, r's output position, t) (generation/counter_rng.py),
so a row's token depends on its own logits, parameters and seed alone. Greedy rows (inverse temperature 0) take
the plain argmax. The Triton kernel (kernels/gumbel_max.py) on a GPU; this eager reference elsewhere.
"""

from __future__ import annotations

import torch

from longseq.generation.counter_rng import gumbel, row_states
from longseq.models import fused

CPU_CHUNK = 1 << 16  # elements of (rows, V) per chunk on CPU: its int64 and float64 temporaries fit in L2


def kept(scaled: torch.Tensor, floor: torch.Tensor, cut_value: torch.Tensor, cut_index: torch.Tensor) -> torch.Tensor:
    """scaled (B, V) -> (B, V) bool: a token stays if it is >= the row's floor (top-k, min-p: ties stay) and ranks
    at or before the row's top-p cut (cut_value, cut_index) in the order of a stable descending sort."""
    ids = torch.arange(scaled.shape[1], device=scaled.device)
    at_cut = (scaled == cut_value[:, None]) & (ids <= cut_index[:, None])
    return (scaled >= floor[:, None]) & ((scaled > cut_value[:, None]) | at_cut)


def gumbel_max_reference(logits: torch.Tensor, inv_temp: torch.Tensor, floor: torch.Tensor, cut_value: torch.Tensor,
                         cut_index: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """logits (B, V) float32; per row: inv_temp (0: greedy), floor, cut_value (float32, in units of logit / T),
    cut_index, keys, positions (int64) -> tokens (B,) int64."""
    B, V = logits.shape
    # On CPU a few rows at a time, so that the (rows, V) int64 and float64 temporaries stay in cache.
    rows = B if logits.is_cuda else max(1, CPU_CHUNK // V)
    args = (logits, inv_temp, floor, cut_value, cut_index, row_states(keys, positions))
    return torch.cat([_draw(*(a[r : r + rows] for a in args)) for r in range(0, B, rows)]) if B else keys.new_empty(0)


def _draw(logits, inv_temp, floor, cut_value, cut_index, states) -> torch.Tensor:
    scaled = logits * inv_temp[:, None]  # (b, V)
    noisy = gumbel(states, logits.shape[1]).add_(scaled)
    noisy.masked_fill_(~kept(scaled, floor, cut_value, cut_index), float("-inf"))
    return torch.where(inv_temp == 0, logits.argmax(1), noisy.argmax(1))


def gumbel_max(logits: torch.Tensor, inv_temp: torch.Tensor, floor: torch.Tensor, cut_value: torch.Tensor,
               cut_index: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """gumbel_max_reference, by the kernel where the model's kernels run (models/fused.py: CUDA tensors)."""
    if fused.active(logits):
        from longseq.engine.kernels.gumbel_max import gumbel_max as kernel

        return kernel(logits, inv_temp, floor, cut_value, cut_index, keys, positions)
    return gumbel_max_reference(logits, inv_temp, floor, cut_value, cut_index, keys, positions)
