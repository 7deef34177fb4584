"""LongNet dilated attention (Ding et al. 2023, arXiv 2307.02486, sec. 2.2): sparsify each segment, attend densely.

For a pattern (segment w, dilation r) the sequence is cut into segments of w tokens; inside a segment the tokens of
one residue class (every r-th token) form a dense causal attention of w/r tokens. Cost and memory per pattern are
O(T * w / r) instead of O(T^2). Several patterns are mixed by their softmax denominators (eq. 10), computed here
from each pattern's log-sum-exp. The dense reference is `reference_attention` with the same AttentionConfig.
"""

from __future__ import annotations

import torch


def dilated_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: tuple[int, ...], rates: tuple[int, ...]
) -> torch.Tensor:
    """Prefill only (queries and keys both at 0..T-1): q (B, H, T, D), k/v (B, H_kv, T, D) -> (B, H, T, D)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    outs, lses = [], []
    for w, r in zip(segments, rates, strict=True):
        out, lse = _pattern(q, k, v, w, r)
        outs.append(out)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0].to(q.dtype)
    weights = torch.stack(lses).softmax(dim=0).unsqueeze(-1)  # (P, B, H, T, 1): s_i / sum_j s_j of eq. 10
    return (weights * torch.stack(outs)).sum(0).to(q.dtype)


def _pattern(q, k, v, w: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One (w, r) pattern -> output (B, H, T, D) and log-sum-exp of the scores (B, H, T), in float32 or wider."""
    B, H, T, D = q.shape
    if T <= w:  # one segment; round it up to a whole number of residue classes only
        w = -(-T // r) * r
    padded = -(-T // w) * w
    dtype = torch.promote_types(q.dtype, torch.float32)

    def split(x: torch.Tensor) -> torch.Tensor:
        # Position s*w + a*r + c -> [s, c, a]: segment s, residue class c, index a inside the class.
        x = torch.nn.functional.pad(x.to(dtype), (0, 0, 0, padded - T))  # zeros after T: later than every query
        return x.view(B, H, padded // w, w // r, r, D).transpose(3, 4)  # (B, H, segments, r, w/r, D)

    qs, ks, vs = split(q), split(k), split(v)
    scores = qs @ ks.transpose(-1, -2) * D**-0.5  # (B, H, segments, r, w/r, w/r)
    n = w // r
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    lse = scores.logsumexp(-1)  # (B, H, segments, r, w/r)
    out = (scores - lse.unsqueeze(-1)).exp() @ vs  # (B, H, segments, r, w/r, D)
    out = out.transpose(3, 4).reshape(B, H, padded, D)[:, :, :T]
    lse = lse.transpose(3, 4).reshape(B, H, padded)[:, :, :T]
    return out, lse
