"""The training forward as one module: token ids -> summed next-token loss.

DDP and FSDP2 act in hooks around a module's forward (FSDP2 gathers the root's embedding, final norm and LM head
there), so the trainer's forward, `hidden` plus the chunked LM head + loss, must be one module call to be wrapped.
"""

from __future__ import annotations

import torch
from torch import nn

from longseq.train.loss import chunked_cross_entropy


class TokenLoss(nn.Module):
    def __init__(self, lm: nn.Module, loss_chunk: int):
        super().__init__()
        self.lm, self.loss_chunk = lm, loss_chunk

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        """Sum of the token losses of (B, S) ids / positions / targets. Under Ulysses these are this rank's
        (B, S/N) shard while doc_ids, when given, cover the whole (B, S) sequence (attention sees all of it)."""
        hidden = self.lm.hidden(input_ids, positions, doc_ids=doc_ids)
        return chunked_cross_entropy(hidden.flatten(0, 1), self.lm.lm_head.weight, targets.flatten(),
                                     self.loss_chunk)
