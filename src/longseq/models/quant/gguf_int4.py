"""GGUF's 4-bit blocks served as int4 layers without a round trip through 16 bits (`--quantization int4` on a .gguf).

llama.cpp's Q4_0, Q4_1 and Q4_K all store, for each run of 32 inputs of a row, 4-bit values q with w = q · d + m:
Q4_0 one fp16 d with m = -8 d; Q4_1 an fp16 d and m; Q4_K super-blocks of 256 whose eight sub-blocks take d = D · sc
and m = -Dmin · mn from 6-bit sc, mn and fp16 D, Dmin (layouts: the gguf package's `quants.py`, which the tests
compare with). That is Int4Linear's (q - z) · s with group 32, s = d and z = -m / d, so the packed nibbles are kept
as they are and only re-ordered into int4.py's layout; s and z are kept in float32 (a Q4_K d is an fp16 times a
6-bit integer, and z = -m / d is no integer), which makes 6 bits a weight where the file has 4.5-5. A block whose d
is 0 (every weight equal to m) takes a tiny s and the matching z. Q8_0 blocks are kept the same way as int8 layers
(gguf_q8.py, `--quantization int8`); other GGUF types (Q6_K, ...) are dequantized and requantized as any 16-bit
weight is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from longseq.models.quant import int4
from longseq.models.quant.int4 import Int4Linear

GROUP = 32
PACKED_TYPES = ("Q4_0", "Q4_1", "Q4_K")
# The block types each --quantization keeps packed; any other type of a decoder linear is dequantized and requantized.
PACKED_BY_METHOD = {"int4": PACKED_TYPES, "int8": ("Q8_0",)}
_FLAT = 2.0**-14  # s of a block with d = 0, relative to |m|: q · s stays below 0.1% of the block's value


@dataclass
class GgufBlocks:
    """A GGUF tensor's raw blocks, handed to QuantLoader.claim in place of a dequantized tensor."""

    qtype: str  # one of PACKED_BY_METHOD's
    data: np.ndarray  # (N, bytes a row) uint8, as gguf's reader maps it
    shape: tuple[int, int]  # (N, K)
    row_order: np.ndarray | None = None  # new row i is stored row row_order[i] (llama.cpp's Q/K permutation undone)

    def to_layer(self, device: torch.device) -> torch.nn.Module:
        """The quantized layer these blocks are: Int8Linear for Q8_0, Int4Linear for the 4-bit types."""
        if self.qtype == "Q8_0":
            from longseq.models.quant.gguf_q8 import q8_0_layer

            return q8_0_layer(self.data, self.shape, self.row_order, device)
        return self.to_int4(device)

    def to_int4(self, device: torch.device) -> Int4Linear:
        q, d, m = unpack_blocks(self.qtype, self.data, *self.shape)
        if self.row_order is not None:
            q, d, m = q[self.row_order], d[self.row_order], m[self.row_order]
        q, d, m = (torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (q, d, m))
        flat = d == 0
        scale = torch.where(flat, m.abs().clamp(min=1e-30) * _FLAT, d)
        zero = -m / scale
        return Int4Linear(int4.pack(q), scale, zero)


def unpack_blocks(qtype: str, data: np.ndarray, N: int, K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw blocks of an (N, K) weight -> q (N, K) uint8, d and m (N, K / 32) float32, w = q · d + m per 32 inputs."""
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1, data.size // (N * K // (256 if qtype == "Q4_K" else 32)))
    if qtype in ("Q4_0", "Q4_1"):
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (B, 1)
        if qtype == "Q4_0":
            m, qs = -8 * d, blocks[:, 2:]
        else:
            m, qs = blocks[:, 2:4].copy().view(np.float16).astype(np.float32), blocks[:, 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # byte i: input i (low nibble) and i + 16 (high)
        return q.reshape(N, K), d.reshape(N, K // GROUP), m.reshape(N, K // GROUP)
    if qtype != "Q4_K":
        raise ValueError(f"not a 4-bit GGUF block type: {qtype}")
    from gguf.quants import Q4_K

    B = blocks.shape[0]
    dd = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (B, 1)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = Q4_K.get_scale_min(blocks[:, 4:16])  # (B, 8) each
    qs = blocks[:, 16:].reshape(B, 4, 32)  # 64 inputs a row of 32 bytes: low nibbles first, then high
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(B, 256)
    d = dd * sc.astype(np.float32)
    m = -dmin * mn.astype(np.float32)
    return q.reshape(N, K), d.reshape(N, K // GROUP), m.reshape(N, K // GROUP)
