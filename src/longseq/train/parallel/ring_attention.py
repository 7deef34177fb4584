"""Ring attention: context parallelism for sequences split over more processes than the model has KV heads
(Liu et al. 2023, arXiv 2310.01889), with the load-balanced causal layout of Llama 3's context parallelism
(arXiv 2407.21783, section 3.3.2) and of Megatron-LM's.

The sequence is cut into 2·N chunks and rank i holds chunks i and 2N-1-i, so that under the causal mask every rank
has the same work (an early chunk sees few keys, its late partner many). Each rank keeps its queries; the K/V
blocks travel around the ring (rank i sends to i+1) in N steps, one send/receive per step overlapping the block's
attention. Each step's partial result carries its log-sum-exp, and the partial softmaxes merge exactly
(out = Σ_b exp(lse_b - lse)·out_b, lse = log Σ_b exp(lse_b); Milakov & Gimelshein 2018, arXiv 1805.02867).

Backward runs the same ring again: with the forward's final out and lse, each block's probabilities
P = exp(q·kᵀ·scale - lse) are exact, so dQ accumulates at home while each K/V block's dK/dV travel with it and
come home after one more hop (FlashAttention-2's backward per block, arXiv 2307.08691, as ring-flash-attn does).

Communication per rank and layer: N-1 K/V blocks forward, N-1 K/V blocks plus N dK/dV blocks backward, each
S/N tokens: O(S·d) whatever N (Ulysses: O(S·d/N), but at most one rank per KV head). Composes with Ulysses
(2D: `UlyssesAttention(inner=RingAttention(...))`: heads over sp inside each ring rank, the ring over cp).

Block attention here is the plain PyTorch maths in float32 (CPU and the reference); it materialises each
(chunk × chunk) score block, so it is for CPU tests and modest chunks.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from longseq.attention.masks import causal_mask


def ring_token_index(seq_len: int, degree: int, rank: int) -> torch.Tensor:
    """The positions in the sequence (of seq_len tokens) that ring rank `rank` of `degree` holds, in its order:
    chunk `rank`, then chunk 2·degree-1-rank, of 2·degree equal chunks."""
    chunk = seq_len // (2 * degree)
    first, second = rank * chunk, (2 * degree - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


class RingAttention:
    """What an Attention layer calls instead of `attention` when its sequence is dealt out over a ring.

    q (B, H, L, D), k/v (B, H_kv, L, D): this rank's L = S / degree tokens in ring order (`ring_token_index`),
    RoPE applied at their positions; doc_ids (B, S) cover the WHOLE sequence. Returns (B, H, L, D)."""

    def __init__(self, group, degree: int):
        self.group, self.degree = group, degree

    def __call__(self, q, k, v, *, window=None, doc_ids=None) -> torch.Tensor:
        return _RingAttention.apply(q, k, v, doc_ids, window, self.group, self.degree)


class _Ring:
    """This rank's neighbours and its tokens' positions in the ring layout."""

    def __init__(self, group, degree: int, seq_len: int, device: torch.device):
        self.group, self.degree = group, degree
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % degree)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % degree)
        self.seq_len, self.device = seq_len, device

    def positions(self, step: int) -> torch.Tensor:
        """The positions of the K/V block this rank holds at `step`: rank - step's tokens."""
        return ring_token_index(self.seq_len, self.degree, (self.rank - step) % self.degree).to(self.device)

    def shift(self, t: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Start sending `t` to the next rank and receiving the previous rank's into a new buffer."""
        buf = torch.empty_like(t)
        ops = [dist.P2POp(dist.isend, t, self.next, self.group), dist.P2POp(dist.irecv, buf, self.prev, self.group)]
        return buf, dist.batch_isend_irecv(ops)


def _wait(requests: list) -> None:
    for r in requests:
        r.wait()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_ids, window, group, degree):
        B, H, L, D = q.shape
        ring = _Ring(group, degree, L * degree, q.device)
        q_pos = ring.positions(0)
        dtype = torch.promote_types(q.dtype, torch.float32)
        out = torch.zeros(B, H, L, D, dtype=dtype, device=q.device)
        lse = torch.full((B, H, L), float("-inf"), dtype=dtype, device=q.device)
        kv = torch.stack([k, v])  # one message per step
        for step in range(degree):
            pending = ring.shift(kv) if step < degree - 1 else None  # the next block travels during this one
            k_pos = ring.positions(step)
            for qs, ks in _visible_pairs(q_pos, k_pos, window):
                o_b, lse_b = _block_forward(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks],
                                            _mask(q_pos[qs], k_pos[ks], window, doc_ids))
                _merge(out, lse, o_b, lse_b, qs)
            if pending is not None:
                kv, requests = pending
                _wait(requests)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)
        ctx.window, ctx.group, ctx.degree = window, group, degree
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        window, degree = ctx.window, ctx.degree
        B, H, L, D = q.shape
        ring = _Ring(ctx.group, degree, L * degree, q.device)
        q_pos = ring.positions(0)
        dtype = lse.dtype
        grad_out = grad_out.to(dtype)
        delta = (grad_out * out.to(dtype)).sum(-1)  # (B, H, L): rowsum(dO ∘ O), FlashAttention-2's D
        dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=dtype, device=q.device)  # the gradient of the block held, travelling
        for step in range(degree):
            pending = ring.shift(kv) if step < degree - 1 else None
            k_pos = ring.positions(step)
            for qs, ks in _visible_pairs(q_pos, k_pos, window):
                dq_b, dk_b, dv_b = _block_backward(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], grad_out[:, :, qs],
                                                   lse[:, :, qs], delta[:, :, qs],
                                                   _mask(q_pos[qs], k_pos[ks], window, doc_ids))
                dq[:, :, qs] += dq_b
                dkv[0][:, :, ks] += dk_b
                dkv[1][:, :, ks] += dv_b
            dkv, requests = ring.shift(dkv)  # on to the next rank; after the last step, home to the owner
            _wait(requests)
            if pending is not None:
                kv, requests = pending
                _wait(requests)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def _visible_pairs(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None):
    """(query slice, key slice) pairs of this rank's two query chunks and the held block's two key chunks that
    the causal (and window) mask does not hide entirely; chunks are ranges of consecutive positions."""
    half = q_pos.numel() // 2
    halves = (slice(0, half), slice(half, 2 * half))
    for qs in halves:
        q_first, q_last = int(q_pos[qs.start]), int(q_pos[qs.stop - 1])
        for ks in halves:
            k_first, k_last = int(k_pos[ks.start]), int(k_pos[ks.stop - 1])
            if k_first > q_last:  # every key after every query
                continue
            if window is not None and q_first - k_last >= window:  # every key out of every query's window
                continue
            yield qs, ks


def _mask(q_pos, k_pos, window, doc_ids) -> torch.Tensor:
    """(B or 1, 1, Lq, Lk) True where a query sees a key: causal, in the window, in its document."""
    mask = causal_mask(q_pos, k_pos, window)[None, None]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, q_pos, None] == doc_ids[:, None, k_pos])[:, None]
    return mask


def _scores(q, k, mask):
    """q (B, H, Lq, D), k (B, H_kv, Lk, D) -> masked scaled scores (B, H_kv, group, Lq, Lk) in float32."""
    B, H, Lq, D = q.shape
    group = H // k.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(dtype).view(B, k.shape[1], group, Lq, D)
    s = qg @ k.to(dtype).unsqueeze(2).transpose(-1, -2) * (1.0 / math.sqrt(D))
    return s.masked_fill(~mask.unsqueeze(2), float("-inf")), qg


def _block_forward(q, k, v, mask):
    """Attention of q over one key block: output (B, H, Lq, D) normalised within the block, and its log-sum-exp
    (B, H, Lq) (-inf for a query that sees none of the block: its output is 0)."""
    B, H, Lq, D = q.shape
    s, _ = _scores(q, k, mask)
    lse = torch.logsumexp(s, dim=-1)  # (B, H_kv, group, Lq)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1))
    o = p @ v.to(p.dtype).unsqueeze(2)
    return o.reshape(B, H, Lq, D), lse.reshape(B, H, Lq)


def _merge(out, lse, o_b, lse_b, qs: slice) -> None:
    """Fold a block's (output, lse) into the running ones of queries `qs`, in place."""
    old = lse[:, :, qs]
    new = torch.logaddexp(old, lse_b)
    safe = new.masked_fill(new == float("-inf"), 0.0)  # queries that have seen nothing yet stay at 0
    out[:, :, qs] = out[:, :, qs] * torch.exp(old - safe).unsqueeze(-1) + o_b * torch.exp(lse_b - safe).unsqueeze(-1)
    lse[:, :, qs] = new


def _block_backward(q, k, v, grad_out, lse, delta, mask):
    """Gradients of one (query chunk, key block) pair given the final lse and delta = rowsum(dO ∘ O): dq
    (B, H, Lq, D), and dk, dv (B, H_kv, Lk, D) summed over the query heads sharing each KV head."""
    B, H, Lq, D = q.shape
    num_kv, group = k.shape[1], H // k.shape[1]
    s, qg = _scores(q, k, mask)
    p = torch.exp(s - lse.view(B, num_kv, group, Lq, 1))  # exact probabilities (masked: exp(-inf) = 0)
    do = grad_out.view(B, num_kv, group, Lq, D)
    vf, kf = v.to(p.dtype).unsqueeze(2), k.to(p.dtype).unsqueeze(2)
    dv = (p.transpose(-1, -2) @ do).sum(2)
    dp = do @ vf.transpose(-1, -2)
    ds = p * (dp - delta.view(B, num_kv, group, Lq, 1)) * (1.0 / math.sqrt(D))
    dq = (ds @ kf).reshape(B, H, Lq, D)
    dk = (ds.transpose(-1, -2) @ qg).sum(2)
    return dq, dk, dv
