"""Next-token cross-entropy without materialising the full logits (the LM head and the loss run chunk by chunk)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)  # (chunk, V)
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()  # the softmax over a large vocabulary needs float32
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """Sum of token losses. hidden (N, d), weight (V, d), targets (N,) with -100 = no loss.

    Each chunk's logits are recomputed in backward instead of stored: O(chunk * V) memory rather than O(N * V)
    (at 128K vocabulary and 32K tokens the fp32 logits alone would be 16 GiB). Same value and gradients as
    `reference_cross_entropy`, at the cost of one more LM-head matmul per chunk.
    """
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h, weight, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, weight, t)
    return total


def reference_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain path: full (N, V) logits, then the summed loss. For tests."""
    return _chunk_loss(hidden, weight, targets)
