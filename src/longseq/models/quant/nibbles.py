"""Int4 values two to a byte: the (N, K/2) uint8 layout of Int4Linear's weights (int4.py), which tinygemm's layout
(int4_tinygemm.py) and the checkpoint loaders start from."""

from __future__ import annotations

import torch


def pack(q: torch.Tensor) -> torch.Tensor:
    """(N, K) integers 0..15 -> (N, K/2) uint8, k = 2j in the high nibble of byte j."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 integers 0..15."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(packed.shape[0], -1)
