"""Contiguous attention through PyTorch SDPA, and the naive reference it is tested against."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from longseq.attention import flash
from longseq.attention.masks import causal_mask
from longseq.attention.variants import block_layout_for, dense_scores_mask
from longseq.config import AttentionConfig, policy
from longseq.errors import LongseqError

DENSE_MASK_LIMIT = 1 << 26  # packed rows with more mask elements (64 MiB of bools) attend document by document


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_start: int = 0,
    window: int | None = None,
    doc_ids: torch.Tensor | None = None,
    variant: AttentionConfig | None = None,
) -> torch.Tensor:
    """Causal attention of S queries over T keys held contiguously.

    q (B, H, S, D) at positions q_start .. q_start+S-1; k, v (B, H_kv, T, D) at positions 0 .. T-1 with
    T = q_start + S (the KV cache holds everything before the queries). H must be a multiple of H_kv (GQA/MQA).
    doc_ids (B, S), for packed training sequences: a token attends only within its own document.
    variant: streaming / dilated / block-sparse masks, ALiBi, chunked compute (None: plain causal); memory
    attention runs through its cache instead (attention/memory.py).
    Returns (B, H, S, D).
    """
    if variant is not None and not variant.plain:
        return _variant_attention(q, k, v, q_start, window, doc_ids, variant)
    kernel = variant.kernel if variant is not None else "auto"
    B, H, S, D = q.shape
    T, num_kv_heads = k.shape[2], k.shape[1]
    assert T == q_start + S, f"keys ({T}) must end where the queries end ({q_start}+{S})"
    assert H % num_kv_heads == 0 and k.shape == v.shape
    gqa = num_kv_heads != H
    if window is not None and window >= T:
        window = None  # the window covers every key: plain causal
    if doc_ids is not None:
        assert q_start == 0 and doc_ids.shape == (B, S)
        if flash.use_flash(q, kernel):  # one variable-length call over every document of every row
            return flash.documents(*_bshd(q, k, v), doc_ids, window).transpose(1, 2)
        if B * S * S > DENSE_MASK_LIMIT:  # long packed rows: one causal call per document, O(S) memory
            return _attention_by_document(q, k, v, doc_ids, window)
        pos = torch.arange(S, device=q.device)
        # (B, 1, S, S): O(S^2) bytes, built only for packed batches; FlexAttention block masks replace it on GPU.
        mask = (causal_mask(pos, pos, window) & (doc_ids[:, :, None] == doc_ids[:, None, :])).unsqueeze(1)
        return _sdpa_masked(q, k, v, mask)
    if S == 1:
        if window is not None:  # decode: the last `window` keys are exactly the visible ones
            k, v = k[:, :, T - window :], v[:, :, T - window :]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    fa4 = q_start == 0 and flash.use_flash(q, kernel)  # prefill and training, a window or none
    if fa4 or (q_start == 0 and window is None):  # FlashAttention-4, else SDPA's causal kernel: no mask
        core = functools.partial(flash.causal, window=window) if fa4 else _sdpa_causal
        return _by_kv_groups(core, *_bshd(q, k, v), _training_groups(q, k, v)).transpose(1, 2)
    if window is None:  # chunked prefill: causal aligned to the last key, FlashAttention without a mask on GPUs
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(S, T), enable_gqa=gqa)
    # A sliding window past the first chunk: an explicit (S, T) mask.
    pos = torch.arange(T, device=q.device)
    return _sdpa_masked(q, k, v, causal_mask(pos[q_start:], pos, window))


def _training_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Groups of KV heads that attention runs by (policy.attention_groups): long training sequences only."""
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return policy.attention_groups(k.shape[1], q.shape[2]) if training else 1


def _bshd(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, H, S, D) views back in the projections' (B, S, H, D) layout (no copy where they came from it)."""
    return tuple(t.transpose(1, 2) for t in tensors)


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA's causal attention in the (B, S, H, D) layout."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _by_kv_groups(core, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """core(q, k, v) by groups of KV heads (with their query heads), one after another, all in the (B, S, H, D)
    layout: the same kernel, but its backward's workspace exists for one group at a time. Autograd joins the
    groups' dQ/dK/dV pieces into gradients of the layout q, k, v came in, and the output projection reads the
    joined output without a copy."""
    if groups == 1:
        return core(q, k, v)
    return torch.cat([core(*g) for g in zip(*(t.chunk(groups, dim=2) for t in (q, k, v)), strict=True)], dim=2)


def _attention_by_document(q, k, v, doc_ids, window):
    """Causal attention inside each run of equal doc_ids, one SDPA call per document (a host sync per row)."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        change = torch.nonzero(doc_ids[b, 1:] != doc_ids[b, :-1]).flatten() + 1
        bounds = [0, *change.tolist(), q.shape[2]]
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            seg = slice(start, end)
            out[b : b + 1, :, seg] = attention(q[b : b + 1, :, seg], k[b : b + 1, :, seg], v[b : b + 1, :, seg],
                                               window=window)
    return out


def _variant_attention(q, k, v, q_start, window, doc_ids, spec: AttentionConfig) -> torch.Tensor:
    from longseq.attention.block_sparse import block_sparse_attention
    from longseq.attention.chunked import chunked_attention
    from longseq.attention.dilated import dilated_attention

    if spec.variant == "memory":  # its memory and positions live in generation's MemoryKVCache (attention/memory.py)
        raise LongseqError("memory attention runs while generating (longseq generate, eval passkey / throughput), "
                           "not in training or perplexity")
    if spec.chunk_size:
        return chunked_attention(q, k, v, q_start=q_start, window=window, doc_ids=doc_ids, spec=spec,
                                 chunk=spec.chunk_size)
    if q_start == 0 and window is None and doc_ids is None and not spec.alibi and q.shape[2] > 1:
        # Prefill of a pure pattern: the sparse fast paths (no (S, T) mask, no O(T^2) work).
        if spec.variant == "dilated":
            return dilated_attention(q, k, v, spec.segment_lengths, spec.dilation_rates)
        if spec.variant == "block_sparse":
            pos = torch.arange(k.shape[2], device=q.device)
            return block_sparse_attention(q, k, v, block_layout_for(spec, pos, pos), spec.block_size)
    # Decode, chunked prefill, ALiBi, windows and packed documents: the explicit mask of this (S, T) block.
    pos = torch.arange(k.shape[2], device=q.device)
    mask = dense_scores_mask(spec, pos[q_start:], pos, window, q.shape[1], doc_ids)
    if mask.dtype != torch.bool:  # a float bias: SDPA wants it in the query's dtype, batch dimension in front
        mask = mask.to(q.dtype)
        mask = mask.unsqueeze(0) if mask.dim() == 3 else mask
    return _sdpa_masked(q, k, v, mask)


def _sdpa_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Expand K/V heads so the memory-efficient backends (which take masks but not `enable_gqa`) stay eligible.
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_start: int = 0,
    window: int | None = None,
    doc_ids: torch.Tensor | None = None,
    variant: AttentionConfig | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + bias + mask) v in float32 (or wider), materialising the (S, T) scores: for tests.

    The variant's mask and bias come from `variants.variant_scores`, whose masks are tested against loops."""
    H, num_kv_heads = q.shape[1], k.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    k = k.to(dtype).repeat_interleave(H // num_kv_heads, dim=1)
    v = v.to(dtype).repeat_interleave(H // num_kv_heads, dim=1)
    scores = q.to(dtype) @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, S, T)
    pos = torch.arange(k.shape[2], device=q.device)
    mask = dense_scores_mask(variant, pos[q_start : q_start + q.shape[2]], pos, window, H, doc_ids)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.to(dtype)
    return (scores.softmax(-1) @ v).to(q.dtype)
