"""Masks and score biases of every attention variant for one (S, T) block of queries and keys.

One function decides what a query sees, so the dense reference, the masked SDPA fallback and the chunked path
agree by construction; the fast paths (dilated, block-sparse, chunked, the rolling sink cache) are tested against
the dense reference.
"""

from __future__ import annotations

import torch

from longseq.attention.alibi import alibi_bias
from longseq.attention.masks import block_layout, block_sparse_mask, causal_mask, dilated_counts, sink_window_mask
from longseq.config import AttentionConfig


def variant_scores(
    spec: AttentionConfig | None,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    window: int | None,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """mask (S, T) bool (True = attend) and an additive score bias, (H, S, T) or (S, T) float64 (callers cast), or None.

    The bias is the ALiBi distance penalty, plus for dilated attention log(number of patterns that contain the
    key): LongNet mixes its patterns' outputs weighted by their softmax denominators (arXiv 2307.02486 eq. 10),
    which is one softmax over the patterns' keys with a key shared by n patterns counted n times.
    """
    if spec is None or spec.variant == "causal":
        mask, bias = causal_mask(q_positions, k_positions, window), None
    elif spec.variant == "streaming":
        if window is None:  # a layer without a window keeps everything
            mask = causal_mask(q_positions, k_positions)
        else:
            mask = sink_window_mask(q_positions, k_positions, window, spec.sink_tokens)
        bias = None
    elif spec.variant == "dilated":
        counts = dilated_counts(q_positions, k_positions, spec.segment_lengths, spec.dilation_rates)
        mask = (counts > 0) & causal_mask(q_positions, k_positions, window)
        bias = counts.double().clamp(min=1).log() if len(spec.dilation_rates) > 1 else None  # 0 with one pattern
    elif spec.variant == "block_sparse":
        layout = block_layout_for(spec, q_positions, k_positions)
        mask = block_sparse_mask(q_positions, k_positions, layout, spec.block_size)
        if window is not None:
            mask &= causal_mask(q_positions, k_positions, window)
        bias = None
    else:
        raise ValueError(f"unknown attention variant {spec.variant!r}")
    if spec is not None and spec.alibi:
        slopes_bias = alibi_bias(num_heads, q_positions, k_positions)  # (H, S, T)
        bias = slopes_bias if bias is None else bias + slopes_bias
    return mask, bias


def block_layout_for(spec: AttentionConfig, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
    """The block layout covering absolute blocks 0 .. the last block of either positions."""
    last = int(torch.maximum(q_positions.max(), k_positions.max())) if q_positions.numel() else 0
    num_blocks = last // spec.block_size + 1
    return block_layout(num_blocks, num_blocks, spec.local_blocks, spec.global_blocks)


def dense_scores_mask(
    spec: AttentionConfig | None,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    window: int | None,
    num_heads: int,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The (S, T) bool mask, or a float (H or 1, S, T) additive mask with -inf where masked (SDPA's attn_mask);
    with doc_ids (B, S) an extra batch dimension in front, (B, 1 or H, S, T)."""
    mask, bias = variant_scores(spec, q_positions, k_positions, window, num_heads)
    if doc_ids is not None:
        same_doc = (doc_ids[:, :, None] == doc_ids[:, None, :]).unsqueeze(1)  # (B, 1, S, S)
        mask = mask & same_doc
    if bias is None:
        return mask
    return torch.where(mask, bias, float("-inf"))
