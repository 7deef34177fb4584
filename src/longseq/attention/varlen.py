"""Every prompt chunk of a serving step in one variable-length attention call.

A step of the engine holds prompt chunks of many sequences (new prompts, the next chunk of a long one). Attended one
sequence at a time, with a gather and a few launches per sequence per layer, steps of many short prompts left the
GPU mostly idle (benchmarks/results/2026-12-03-serve-workloads-h200). Here their queries are packed back to back,
each one's whole context is gathered from the paged pool into one packed K/V, and FlashAttention's variable-length
kernel runs them all at once: causal aligned to each context's last key, so a chunk sees its sequence's earlier
tokens (FlashAttention-2 varlen semantics, Dao 2023). On Hopper a chunk after a long prefix goes through cuDNN
instead, which runs it faster (split_varlen). Where the kernel is not available (CPU, float32, odd head sizes) the
same packed tensors go through contiguous attention sequence by sequence: the reference the GPU tests compare with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longseq.attention.kv_fp8 import dequantize_kv
from longseq.attention.sdpa import attention

# A chunk continuing a prompt with at least this many tokens before it attends in two cuDNN calls (split_varlen).
LONG_PREFIX = 8192


@dataclass
class Chunks:
    """The multi-token sequences of a step (prompt chunks), packed."""

    rows: torch.Tensor  # (N_c,) their query rows in the step's flat batch, on the device
    slots: torch.Tensor  # (sum of contexts,) pool slots of every chunk's whole context, sequence after sequence
    cu_q: torch.Tensor  # (C + 1,) int32 query offsets into the packed queries, on the device
    cu_k: torch.Tensor  # (C + 1,) int32 key offsets into the packed context
    q_lens: list[int]
    ctx_lens: list[int]

    @staticmethod
    def host(tables: torch.Tensor, q_lens: torch.Tensor, ctx: torch.Tensor, block_size: int) -> tuple | None:
        """From the step's host tensors (every sequence: block tables (B, W), new tokens (B,), context after the
        step (B,)): (rows, slots, cu_q, cu_k) still on the host, then q_lens and ctx_lens as lists; None where no
        sequence has more than one new token. The caller copies the four tensors over with the step's other
        indices (paged.PagedBatch.build) and hands them to `from_device`."""
        multi = (q_lens > 1).nonzero().flatten()  # (C,)
        if not len(multi):
            return None
        ends = torch.cumsum(q_lens, 0)
        cq, cc = q_lens[multi], ctx[multi]
        rows = torch.repeat_interleave(ends[multi] - cq, cq) + _ranges(cq)
        owner = torch.repeat_interleave(multi, cc)  # (sum cc,) sequence of each context token
        pos = _ranges(cc)
        slots = tables[owner, pos // block_size] * block_size + pos % block_size
        cu_q, cu_k = (torch.nn.functional.pad(torch.cumsum(n, 0), (1, 0)) for n in (cq, cc))
        return rows, slots, cu_q, cu_k, cq.tolist(), cc.tolist()

    @classmethod
    def from_device(cls, tensors: list[torch.Tensor], q_lens: list[int], ctx_lens: list[int]) -> Chunks:
        """`host`'s four tensors, now on the device (int64), and its two lists."""
        rows, slots, cu_q, cu_k = tensors
        return cls(rows, slots, cu_q.to(torch.int32), cu_k.to(torch.int32), q_lens, ctx_lens)


def _ranges(lens: torch.Tensor) -> torch.Tensor:
    """0..n-1 for each n of lens, back to back."""
    starts = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    return torch.arange(int(lens.sum())) - starts


def chunk_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, chunks: Chunks,
                    window: int | None, scales: torch.Tensor | None = None) -> torch.Tensor:
    """q (1, H, N_c, D), the chunks' queries in packed order -> (1, H, N_c, D). New K/V must be in the pools;
    `scales`: FP8 pools' K and V scales (their gathered blocks are dequantized to q's dtype)."""
    qp = q[0].transpose(0, 1)  # (N_c, H, D)
    k, v = k_pool[chunks.slots], v_pool[chunks.slots]  # (sum of contexts, H_kv, D)
    if scales is not None:
        k, v = dequantize_kv(k, scales[0], q.dtype), dequantize_kv(v, scales[1], q.dtype)
    fast = use_flash_varlen(qp)
    if fast and window is None and use_cudnn_split(qp) and any(
            c - n >= LONG_PREFIX for n, c in zip(chunks.q_lens, chunks.ctx_lens, strict=True)):
        run = split_varlen
    else:
        run = flash_varlen if fast else loop_varlen
    return run(qp, k, v, chunks, window).transpose(0, 1).unsqueeze(0)


def use_flash_varlen(q: torch.Tensor) -> bool:
    D = q.shape[-1]
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 256


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: Chunks,
                 window: int | None) -> torch.Tensor:
    """Every chunk in one call of FlashAttention-2's variable-length kernel. q (N_c, H, D) -> (N_c, H, D)."""
    return _flash(q, k, v, chunks.cu_q, chunks.cu_k, max(chunks.q_lens), max(chunks.ctx_lens), window)


def _flash(q, k, v, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
           window: int | None) -> torch.Tensor:
    """PyTorch's FlashAttention-2 variable-length kernel (the op behind torch.nn.attention.varlen, whose public
    signature has changed between releases); grouped K/V heads as they are."""
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False,
        window_size_left=-1 if window is None else window - 1, window_size_right=0)
    return out[0]


def loop_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: Chunks,
                window: int | None) -> torch.Tensor:
    """The reference: contiguous causal attention per sequence over the same packed tensors."""
    out, qs, ks = torch.empty_like(q), 0, 0
    for n, ctx in zip(chunks.q_lens, chunks.ctx_lens, strict=True):
        view = [t.transpose(0, 1).unsqueeze(0) for t in (q[qs : qs + n], k[ks : ks + ctx], v[ks : ks + ctx])]
        out[qs : qs + n] = attention(*view, q_start=ctx - n, window=window)[0].transpose(0, 1)
        qs, ks = qs + n, ks + ctx
    return out


def use_cudnn_split(q: torch.Tensor) -> bool:
    """cuDNN's fused attention on Hopper or newer (where it was measured against FlashAttention-2)."""
    return torch.backends.cudnn.is_available() and torch.cuda.get_device_capability(q.device)[0] >= 9


def split_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: Chunks,
                 window: int | None) -> torch.Tensor:
    """Sequence by sequence; a chunk after a long prefix as two cuDNN attentions merged by their log-sum-exp:
    the chunk's queries over the prefix (no mask) and over the chunk itself (causal, square). PyTorch's cuDNN
    backend has no causal mask aligned to the last key, and FlashAttention-2's varlen kernel, which has, runs long
    chunks at a little over half cuDNN's rate on Hopper (benchmarks/results/2026-12-03-serve-workloads-h200)."""
    assert window is None
    out, qs, ks = torch.empty_like(q), 0, 0
    for j, (n, ctx) in enumerate(zip(chunks.q_lens, chunks.ctx_lens, strict=True)):
        qi, ki, vi = q[qs : qs + n], k[ks : ks + ctx], v[ks : ks + ctx]
        if ctx - n >= LONG_PREFIX:
            out[qs : qs + n] = prefix_then_chunk(qi, ki, vi)
        else:  # this sequence's offsets, from the packed ones already on the device
            cu_q, cu_k = chunks.cu_q[j : j + 2] - qs, chunks.cu_k[j : j + 2] - ks
            out[qs : qs + n] = _flash(qi, ki, vi, cu_q, cu_k, n, ctx, None)
        qs, ks = qs + n, ks + ctx
    return out


def prefix_then_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (n, H, D) at the last n of the ctx positions of k, v (ctx, H_kv, D) -> (n, H, D), causal."""
    P = k.shape[0] - q.shape[0]
    # (1, heads, tokens, D), contiguous: the layout cuDNN's attention was measured in (a copy, small beside it)
    qb, kb, vb = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v))
    prefix, lse_p = _cudnn(qb, kb[:, :, :P], vb[:, :, :P], causal=False)
    own, lse_o = _cudnn(qb, kb[:, :, P:], vb[:, :, P:], causal=True)
    # softmax over both key sets = each part's softmax weighted by its share of the total exp-sum (natural log)
    lse_p, lse_o = lse_p.float().reshape(prefix.shape[:3]), lse_o.float().reshape(own.shape[:3])  # (1, H, n)
    top = torch.maximum(lse_p, lse_o)
    w_p, w_o = (lse_p - top).exp(), (lse_o - top).exp()
    merged = (prefix.float() * w_p[..., None] + own.float() * w_o[..., None]) / (w_p + w_o)[..., None]
    return merged[0].transpose(0, 1).to(q.dtype)


def _cudnn(q, k, v, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (1, H, n, D), log-sum-exp) of cuDNN's attention; grouped K/V heads as they are."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)
    return out[0], out[1]
