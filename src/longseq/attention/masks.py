"""Boolean attention masks (True = attend). Built only for the (S, T) block actually computed."""

from __future__ import annotations

import torch


def causal_mask(
    q_positions: torch.Tensor, k_positions: torch.Tensor, window: int | None = None
) -> torch.Tensor:
    """q_positions (S,), k_positions (T,) -> (S, T): key k is visible to query q iff k <= q (and q - k < window).

    The window convention matches Mistral / HF `sliding_window_overlay`: a window of W sees W keys including itself.
    """
    diff = q_positions[:, None] - k_positions[None, :]  # (S, T)
    mask = diff >= 0
    if window is not None:
        mask &= diff < window
    return mask
