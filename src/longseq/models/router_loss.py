"""The router's auxiliary losses, gathered over a training forward's sparse layers.

Load balancing (Switch Transformer, Fedus et al. 2021, arXiv 2101.03961, eqs. 4-6), exactly as transformers'
`load_balancing_loss_func` computes it for Mixtral, Qwen2-MoE and Qwen3-MoE (5.x, identical in the three): over all
sparse layers' tokens together, f_e = the share of top-k choices that went to expert e (counted over T·L rows, so
the f_e sum to k) and P_e = the mean router probability of e; the loss is E · Σ_e f_e P_e. Only P carries a
gradient (the top-k choice has none). Every token counts: our packed rows have no attention mask, and trailing
padding is counted as transformers counts it without one.

Router z-loss (ST-MoE, Zoph et al. 2022, arXiv 2202.08906, eq. 5): the mean over tokens and sparse layers of
logsumexp(router logits)². None of Mixtral, Qwen2-MoE or Qwen3-MoE trains with it (transformers' modeling code has
no z-loss for them); it is an option, off by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from longseq.models import recompute


@dataclass
class RouterLoss:
    """Accumulates each sparse layer's router statistics during a forward (SparseMoeBlock.record) and turns them
    into the weighted auxiliary loss. `begin()` before each forward."""

    num_experts: int
    aux_coef: float = 0.0
    z_coef: float = 0.0
    _counts: torch.Tensor | None = field(default=None, repr=False)  # (E,) top-k choices, all layers
    _probs: torch.Tensor | None = field(default=None, repr=False)  # (E,) summed router probabilities, all layers
    _z: torch.Tensor | None = field(default=None, repr=False)  # summed logsumexp², all layers
    _rows: int = 0

    @property
    def active(self) -> bool:
        return self.aux_coef > 0 or self.z_coef > 0

    def begin(self) -> None:
        self._counts = self._probs = self._z = None
        self._rows = 0

    def record(self, logits: torch.Tensor, ids: torch.Tensor) -> None:
        """One sparse layer's router logits (T, E) and its top-k choices (T, k)."""
        probs = logits.float().softmax(dim=-1)  # (T, E)
        counts = torch.zeros(self.num_experts, dtype=torch.float32, device=logits.device)
        counts.index_add_(0, ids.flatten(), torch.ones(ids.numel(), dtype=torch.float32, device=logits.device))
        z = torch.logsumexp(logits.float(), dim=-1).square().sum() if self.z_coef else None
        # A checkpoint's recompute must save what the forward saved (the ops above run), but adds nothing twice.
        if recompute.active():
            return
        add = lambda total, x: x if total is None else total + x  # noqa: E731
        self._counts, self._probs = add(self._counts, counts), add(self._probs, probs.sum(dim=0))
        if z is not None:
            self._z = add(self._z, z)
        self._rows += logits.shape[0]

    def balance_loss(self) -> torch.Tensor | None:
        """E · Σ_e f_e P_e over the layers recorded since begin() (None: none recorded)."""
        if self._probs is None:
            return None
        return self.num_experts * torch.sum((self._counts / self._rows) * (self._probs / self._rows))

    def value(self) -> torch.Tensor | None:
        """aux_coef · balance loss + z_coef · z-loss (None: no sparse layer ran)."""
        if self._probs is None:
            return None
        total = self.aux_coef * self.balance_loss()
        if self._z is not None:
            total = total + self.z_coef * self._z / self._rows
        return total
