"""Exact attention in O(chunk * T) memory: "Self-attention does not need O(n^2) memory" (Rabe & Staab 2021,
arXiv 2112.05682), in plain PyTorch for CPUs and for any mask or bias the variants define.

Queries are processed chunk by chunk; for each, key chunks are folded into a running (max, sum, weighted values)
triple, the online softmax of Milakov & Gimelshein 2018 (arXiv 1805.02867). Tiles that the mask hides entirely
are skipped, so causal and windowed attention also save compute. In training each query chunk is recomputed in
backward (checkpointed), which keeps the backward memory at O(chunk * T) as well.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from longseq.attention.variants import variant_scores
from longseq.config import AttentionConfig


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_start: int = 0,
    window: int | None = None,
    doc_ids: torch.Tensor | None = None,
    spec: AttentionConfig | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Same contract as `attention`: q (B, H, S, D) at positions q_start.., k/v (B, H_kv, T, D) -> (B, H, S, D)."""
    B, H, S, D = q.shape
    T, num_kv_heads = k.shape[2], k.shape[1]
    assert T == q_start + S and H % num_kv_heads == 0 and k.shape == v.shape
    assert doc_ids is None or (q_start == 0 and doc_ids.shape == (B, S))
    group = H // num_kv_heads
    qg = q.view(B, num_kv_heads, group, S, D)  # query heads sharing a KV head, without copying K/V
    train = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for qs in range(0, S, chunk):
        qe = min(qs + chunk, S)
        docs = doc_ids[:, qs:qe] if doc_ids is not None else None
        args = (qg[:, :, :, qs:qe], k, v, q_start + qs, doc_ids, docs, window, spec, chunk)
        outs.append(checkpoint(_query_chunk, *args, use_reentrant=False) if train else _query_chunk(*args))
    return torch.cat(outs, dim=3).view(B, H, S, D)


def _query_chunk(qc, k, v, first_pos, doc_ids, q_docs, window, spec, chunk) -> torch.Tensor:
    """qc (B, H_kv, group, C, D) at positions first_pos.. over all keys -> (B, H_kv, group, C, D)."""
    B, num_kv_heads, group, C, D = qc.shape
    T = k.shape[2]
    dtype = torch.promote_types(qc.dtype, torch.float32)  # accumulate bf16/fp16 inputs in float32
    scale = D**-0.5
    q_pos = torch.arange(first_pos, first_pos + C, device=qc.device)
    m = torch.full((B, num_kv_heads, group, C, 1), float("-inf"), dtype=dtype, device=qc.device)  # running max
    denom = torch.zeros_like(m)  # running sum of exp(score - m)
    acc = torch.zeros((B, num_kv_heads, group, C, D), dtype=dtype, device=qc.device)
    qf = qc.to(dtype) * scale
    for ks in range(0, first_pos + C, chunk):  # keys after the last query are never visible (causal)
        ke = min(ks + chunk, T)
        k_pos = torch.arange(ks, ke, device=qc.device)
        mask, bias = variant_scores(spec, q_pos, k_pos, window, num_kv_heads * group)  # (C, Ck), (H, C, Ck)
        if doc_ids is not None:
            mask = mask & (q_docs[:, :, None] == doc_ids[:, None, ks:ke])[:, None, None]  # (B, 1, 1, C, Ck)
        if not bool(mask.any()):  # host sync, once per tile: skipping the tile is worth it
            continue
        kc, vc = k[:, :, ks:ke].to(dtype), v[:, :, ks:ke].to(dtype)
        s = qf @ kc.unsqueeze(2).transpose(-1, -2)  # (B, H_kv, group, C, Ck)
        if bias is not None:
            s = s + (bias.view(num_kv_heads, group, C, -1) if bias.dim() == 3 else bias).to(dtype)
        s = s.masked_fill(~mask, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with nothing visible yet: exp(-inf) = 0
        p = torch.exp(s - m_safe)
        correction = torch.exp(m - m_safe)
        denom = denom * correction + p.sum(-1, keepdim=True)
        acc = acc * correction + p @ vc.unsqueeze(2)
        m = m_new
    return (acc / denom).to(qc.dtype)
