"""One attention interface for training, `generate` and (later) the paged engine."""

from longseq.attention.masks import causal_mask
from longseq.attention.sdpa import attention, reference_attention

__all__ = ["attention", "causal_mask", "reference_attention"]
