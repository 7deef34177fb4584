"""Contiguous attention through PyTorch SDPA, and the naive reference it is tested against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longseq.attention.masks import causal_mask


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int = 0, window: int | None = None
) -> torch.Tensor:
    """Causal attention of S queries over T keys held contiguously.

    q (B, H, S, D) at positions q_start .. q_start+S-1; k, v (B, H_kv, T, D) at positions 0 .. T-1 with
    T = q_start + S (the KV cache holds everything before the queries). H must be a multiple of H_kv (GQA/MQA).
    Returns (B, H, S, D).
    """
    B, H, S, D = q.shape
    T, num_kv_heads = k.shape[2], k.shape[1]
    assert T == q_start + S, f"keys ({T}) must end where the queries end ({q_start}+{S})"
    assert H % num_kv_heads == 0 and k.shape == v.shape
    gqa = num_kv_heads != H
    if window is not None and window >= T:
        window = None  # the window covers every key: plain causal
    if S == 1:
        if window is not None:  # decode: the last `window` keys are exactly the visible ones
            k, v = k[:, :, T - window :], v[:, :, T - window :]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if q_start == 0 and window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # Chunked prefill or a sliding window: an explicit (S, T) mask. Expand K/V heads so the memory-efficient
    # backends (which take masks but not `enable_gqa`) stay eligible on GPU.
    pos = torch.arange(T, device=q.device)
    mask = causal_mask(pos[q_start:], pos, window)
    if gqa:
        k = k.repeat_interleave(H // num_kv_heads, dim=1)
        v = v.repeat_interleave(H // num_kv_heads, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int = 0, window: int | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v in float32, materialising the (S, T) scores: for tests only."""
    H, num_kv_heads = q.shape[1], k.shape[1]
    k = k.float().repeat_interleave(H // num_kv_heads, dim=1)
    v = v.float().repeat_interleave(H // num_kv_heads, dim=1)
    scores = q.float() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, S, T)
    pos = torch.arange(k.shape[2], device=q.device)
    mask = causal_mask(pos[q_start : q_start + q.shape[2]], pos, window)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)
