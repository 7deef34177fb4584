"""Training FLOPs per token."""

from __future__ import annotations


def train_flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Model FLOPs per trained token: 6N for the matmuls (Kaplan et al. 2020) plus 12 * L * d * S for attention
    scores and values (PaLM, Chowdhery et al. 2022, appendix B, which counts the full, not causally halved,
    score matrix). Recompute is not counted (model, not hardware, FLOPs), so MFU is comparable across policies."""
    return 6.0 * num_params + 12.0 * num_layers * hidden_size * seq_len
