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


def sink_window_mask(
    q_positions: torch.Tensor, k_positions: torch.Tensor, window: int, sink_tokens: int
) -> torch.Tensor:
    """(S, T): causal, and key k visible iff it is one of the first `sink_tokens` or within the window.

    StreamingLLM's pattern (Xiao et al. 2023, arXiv 2309.17453, fig. 1d) over absolute positions; the rolling
    `SinkKVCache` keeps the same keys but re-numbers their positions inside the cache.
    """
    window_mask = causal_mask(q_positions, k_positions, window)
    return window_mask | (causal_mask(q_positions, k_positions) & (k_positions < sink_tokens)[None, :])


def dilated_counts(
    q_positions: torch.Tensor, k_positions: torch.Tensor, segments: tuple[int, ...], rates: tuple[int, ...]
) -> torch.Tensor:
    """(S, T) int: in how many LongNet patterns (segment w, dilation r) key k is visible to query q.

    LongNet (Ding et al. 2023, arXiv 2307.02486, sec. 2.2): the sequence is cut into segments of w tokens and each
    segment keeps every r-th token; a query attends causally within its segment to the tokens of its own residue
    class (q - k divisible by r). The paper gives heads different offsets so that heads cover all classes; here
    every head covers every class, so no query is left without keys. 0 = not visible.
    """
    diff = q_positions[:, None] - k_positions[None, :]  # (S, T)
    counts = torch.zeros(diff.shape, dtype=torch.int64, device=diff.device)
    for w, r in zip(segments, rates, strict=True):
        same_segment = (q_positions[:, None] // w) == (k_positions[None, :] // w)
        counts += ((diff >= 0) & same_segment & (diff % r == 0)).long()
    return counts


def block_layout(
    num_q_blocks: int, num_k_blocks: int, local_blocks: int, global_blocks: int, q_block_start: int = 0
) -> torch.Tensor:
    """(num_q_blocks, num_k_blocks) bool: which key blocks a query block sees (local band + global first blocks,
    causal at block level), as the local + global patterns of Longformer / BigBird (arXiv 2004.05150, 2007.14062).

    Query block i is block q_block_start + i of the sequence.
    """
    qb = torch.arange(q_block_start, q_block_start + num_q_blocks)[:, None]
    kb = torch.arange(num_k_blocks)[None, :]
    return (kb <= qb) & ((qb - kb < local_blocks) | (kb < global_blocks))


def block_sparse_mask(
    q_positions: torch.Tensor, k_positions: torch.Tensor, layout: torch.Tensor, block_size: int
) -> torch.Tensor:
    """(S, T): causal, and key k visible iff layout[block of q, block of k] (layout indexed by absolute block)."""
    layout = layout.to(q_positions.device)
    visible = layout[(q_positions // block_size)[:, None], (k_positions // block_size)[None, :]]
    return causal_mask(q_positions, k_positions) & visible
