"""Batched LoRA for serving: one step's tokens each carry an adapter slot (-1: the base model), and every fused
projection adds its rows' adapter deltas to its output in place (S-LoRA, Sheng et al. 2023, arXiv 2311.03285;
Punica's SGMV, Chen et al. 2023, arXiv 2310.18547).

The adapters of all slots live in one pool per projection (engine/lora/pool.py fills it):
- `a` (S, n·R, in): the stacked lora_A of the n projections a FusedLinear fuses (q/k/v: n = 3, gate/up: 2, o and
  down: 1), each zero-padded to the pool's max rank R; a module the adapter does not target is all zeros;
- `b` (S, R, out): scale·lora_Bᵀ, projection i in columns [off_i, off_i + out_i), reading rank rows [0, R) of its
  own n·R-wide slice of x·aᵀ.
So y[t] += concat_i( (x[t] · a[s, iR:(i+1)R]ᵀ) · b[s, :, off_i:off_i+out_i] ) for the slot s = slots[t].

Two paths behind `lora_add`: the Triton shrink / expand kernels (models/kernels/lora.py) where the fused kernels run,
and `lora_add_reference` (plain torch, one slot at a time) on the CPU and as the tests' oracle. A step without any
adapter leaves the hooks' state at None and pays nothing but an attribute check per projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longseq.models import fused

BLOCK_M = 16  # token rows of one kernel program (tl.dot's smallest tile)


@dataclass
class LoRABatch:
    """A step's tokens grouped by slot for the kernels, built on the device from `slots` with static shapes (a CUDA
    graph captures the build too and replays it over its persistent slot tensor). The kernels walk `MB` row blocks,
    MB = ceil(N / BLOCK_M) + min(N, S): each holds up to BLOCK_M tokens of one slot; blocks past the last hold 0."""

    slots: torch.Tensor  # (N,) int64: each token's slot, -1 for the base
    order: torch.Tensor  # (N,) token rows sorted by slot, the base's first
    block_slot: torch.Tensor  # (MB,) the slot of each row block
    block_start: torch.Tensor  # (MB,) its first position in `order`
    block_rows: torch.Tensor  # (MB,) how many rows it holds (0: nothing to do)
    block_m: int = BLOCK_M

    @classmethod
    def build(cls, slots: torch.Tensor, num_slots: int) -> LoRABatch:
        n, dev = slots.numel(), slots.device
        slots = slots.long()
        order = torch.sort(slots, stable=True).indices
        counts = torch.zeros(num_slots + 1, dtype=torch.long, device=dev)
        counts.scatter_add_(0, slots + 1, torch.ones_like(slots))  # counts[0]: the base's tokens
        seg_len = counts[1:]  # (S,)
        seg_start = (torch.cumsum(counts, 0) - counts)[1:]
        num_blocks = (seg_len + BLOCK_M - 1) // BLOCK_M
        ends = torch.cumsum(num_blocks, 0)  # (S,) one past each slot's last block
        blocks = torch.arange(-(-n // BLOCK_M) + min(n, num_slots), device=dev)
        slot = torch.searchsorted(ends, blocks, right=True)  # == S past the last block
        real = slot < num_slots
        slot = slot.clamp(max=num_slots - 1)
        j = blocks - (ends[slot] - num_blocks[slot])  # the block's index within its slot
        rows = ((seg_len[slot] - j * BLOCK_M).clamp(0, BLOCK_M) * real).to(torch.int32)
        return cls(slots, order, slot, seg_start[slot] + j * BLOCK_M, rows)


class LoRAState:
    """What the hooks of one model read: the current step's LoRABatch, or None (no adapter in the step)."""

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None


class BatchedLoRA:
    """One FusedLinear's adapters over every slot (FusedLinear.lora): y += each row's adapter delta, in place."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, sizes: list[int], rank: int, state: LoRAState):
        assert a.shape[1] == len(sizes) * rank and b.shape[1:] == (rank, sum(sizes))
        self.a, self.b, self.sizes, self.rank, self.state = a, b, list(sizes), rank, state

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        batch = self.state.batch
        if batch is None:
            return
        lora_add(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), self.a, self.b, batch, self.sizes, self.rank)


def lora_add(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch,
             sizes: list[int], rank: int) -> None:
    """y (N, out) += the LoRA delta of each row of x (N, in) by its slot in `batch`; a (S, n·R, in), b (S, R, out)."""
    if kernel_takes(x, sizes):
        from longseq.models.kernels.lora import lora_shrink_expand

        lora_shrink_expand(y, x.contiguous(), a, b, batch, sizes, rank)
    else:
        lora_add_reference(y, x, a, b, batch.slots, sizes, rank)


def kernel_takes(x: torch.Tensor, sizes: list[int]) -> bool:
    """The Triton kernels run where the fused kernels do (models/fused.py), for outputs whose every projection is a
    multiple of 16 wide (a column block then never straddles two of them)."""
    return fused.active(x) and math.gcd(*sizes) % 16 == 0


def lora_add_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
                       sizes: list[int], rank: int) -> None:
    """The same sum as the kernels, one slot at a time, with their roundings: x·aᵀ in float32 (or wider), cast to the
    pool's dtype, times b in float32, added to y in float32 and stored in y's dtype."""
    ct = torch.promote_types(x.dtype, torch.float32)
    for s in torch.unique(slots).tolist():  # a host sync: the CPU path and the tests only
        if s < 0:
            continue
        rows = (slots == s).nonzero().flatten()
        xa = (x[rows].to(ct) @ a[s].to(ct).T).to(b.dtype).to(ct)  # (n, n·R)
        start = 0
        for i, size in enumerate(sizes):
            delta = xa[:, i * rank : (i + 1) * rank] @ b[s, :, start : start + size].to(ct)
            y[rows, start : start + size] = (y[rows, start : start + size].to(ct) + delta).to(y.dtype)
            start += size
