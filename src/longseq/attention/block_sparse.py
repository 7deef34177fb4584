"""Block-sparse attention from a block layout: each query block attends only to the key blocks its layout row
names (Child et al. 2019, arXiv 1904.10509; local + global layouts as Longformer / BigBird).

Two fast paths, both exact for the layout: a gather of the visible key blocks per query block (any device, memory
O(T * max visible blocks * block size)), and FlexAttention with a BlockMask (PyTorch >= 2.5) compiled on CUDA, which
skips hidden blocks inside the kernel. The dense reference is `reference_attention` with the same mask.
"""

from __future__ import annotations

import functools

import torch


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor, block_size: int, backend: str = "auto"
) -> torch.Tensor:
    """Prefill: q (B, H, T, D), k/v (B, H_kv, T, D) at positions 0..T-1; layout (nb, nb) bool over blocks of
    `block_size` tokens, nb >= ceil(T / block_size). Causal inside the visible blocks. -> (B, H, T, D).

    backend: gather | flex | auto (flex on CUDA, gather elsewhere; FlexAttention without torch.compile
    materialises the whole score matrix, so it is no fast path on CPU).
    """
    nb = -(-q.shape[2] // block_size)
    if layout.shape[0] < nb or layout.shape[1] < nb or not bool(layout[:nb, :nb].diagonal().all()):
        raise ValueError(f"the layout must cover {nb} blocks and let every block see itself")
    if backend == "auto":
        backend = "flex" if q.is_cuda else "gather"
    if backend == "flex":
        return _flex(q, k, v, layout, block_size, compiled=q.is_cuda)
    return _gather(q, k, v, layout, block_size)


def _gather(q, k, v, layout, block_size):
    B, H, T, D = q.shape
    b = block_size
    nb = -(-T // b)
    layout = layout[:nb, :nb].to(q.device)
    group = H // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    pad = nb * b - T
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    # idx (nb, m): the visible key blocks of each query block, padded with block 0 (masked out by `valid`).
    counts = layout.sum(1)
    m = int(counts.max())
    order = torch.sort(layout.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :m]  # True first
    valid = torch.arange(m, device=q.device)[None, :] < counts[:, None]  # (nb, m)
    idx = torch.where(valid, order, 0)
    dtype = torch.promote_types(q.dtype, torch.float32)
    kb = k.to(dtype).view(B, H, nb, b, D)[:, :, idx].reshape(B, H, nb, m * b, D)  # (B, H, nb, m*b, D)
    vb = v.to(dtype).view(B, H, nb, b, D)[:, :, idx].reshape(B, H, nb, m * b, D)
    qb = q.to(dtype).view(B, H, nb, b, D)
    scores = qb @ kb.transpose(-1, -2) * D**-0.5  # (B, H, nb, b, m*b)
    k_pos = (idx[:, :, None] * b + torch.arange(b, device=q.device)).reshape(nb, m * b)
    q_pos = torch.arange(nb * b, device=q.device).view(nb, b)
    visible = valid.repeat_interleave(b, dim=1)[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
    scores = scores.masked_fill(~visible, float("-inf"))  # (nb, b, m*b) broadcast over B, H
    out = scores.softmax(-1) @ vb  # (B, H, nb, b, D)
    return out.reshape(B, H, nb * b, D)[:, :, :T].to(q.dtype)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, layout, block_size, compiled: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T = q.shape[2]
    layout = layout.to(q.device)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & layout[q_idx // block_size, kv_idx // block_size]

    block_mask = create_block_mask(mask_mod, None, None, T, T, device=q.device)
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])
