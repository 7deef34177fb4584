"""GGUF's Q8_0 blocks served as int8 layers without a round trip through 16 bits (`--quantization int8` on a .gguf).

A Q8_0 block is 34 bytes for 32 inputs of a row: an fp16 d, then 32 int8 q, with w = q · d (layout: the gguf
package's `quants.py`, which the tests compare with). That is Int8Linear's layout as it is (int8.py), so a row's
blocks are only split into its int8 values and its scales: 8.5 bits a weight on the device, as in the file.
"""

from __future__ import annotations

import numpy as np
import torch

from longseq.models.quant.int8 import GROUP, Int8Linear

BLOCK_BYTES = 2 + GROUP  # fp16 d, 32 int8 q


def unpack_q8_0(data: np.ndarray, N: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw Q8_0 blocks of an (N, K) weight -> q (N, K) int8 and d (N, K / 32) float16, w = q · d per 32 inputs."""
    blocks = np.asarray(data, dtype=np.uint8).reshape(N * K // GROUP, BLOCK_BYTES)
    d = blocks[:, :2].copy().view(np.float16)  # (B, 1)
    q = blocks[:, 2:].copy().view(np.int8)  # (B, 32)
    return q.reshape(N, K), d.reshape(N, K // GROUP)


def q8_0_layer(data: np.ndarray, shape: tuple[int, int], row_order: np.ndarray | None,
               device: torch.device) -> Int8Linear:
    """An Int8Linear holding a Q8_0 tensor's own weights; row_order: llama.cpp's Q/K permutation undone."""
    q, d = unpack_q8_0(data, *shape)
    if row_order is not None:
        q, d = q[row_order], d[row_order]
    q, d = (torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (q, d))
    return Int8Linear(q, d)
