"""Int4Linear's weights in the layout of PyTorch's tinygemm kernel (`torch.ops.aten._weight_int4pack_mm`, the
kernel behind gpt-fast's and torchao's int4 weight-only decode), converted once when a layer is built on a GPU.

tinygemm dequantizes W = (q - 8) · s + z_tg with bf16 s and z_tg stored as `scales_and_zeros` (K/G, N, 2)
(aten/src/ATen/native/cuda/int4mm.cu, BLayout_TC_int4; torchao's pack_tinygemm_scales_and_zeros), so our
W = (q - z) · s takes z_tg = (8 - z) · s. The packed weight is int32 (N/8, K / (16 · inner_k_tiles), 32,
inner_k_tiles / 2): word [t][i] of an (8-row, 16 · inner_k_tiles-input) tile holds the eight nibbles one lane of an
m16n8k16 mma reads (int4mm.cu, matrix_to_m16n8k16_Bint4_layout), from int4.py's (N, K/2) bytes as they are.
Limits (int4mm.cu's checks): bf16 activations, N a multiple of 8, group sizes 32 / 64 / 128 / 256, K a multiple of
16 · inner_k_tiles (2, 4 or 8). `pack_layout` / `unpack_layout` restate the conversion in torch ops (the GPU test
compares them with the op), so a layer that keeps only this layout can be dequantized anywhere (int4_kernel.py's
`int4_dequantize_tinygemm` for prefill, `dequantize` for the reference).
"""

from __future__ import annotations

import torch

from longseq.models.quant.nibbles import pack, unpack

GROUPS = (32, 64, 128, 256)
K_TILE = 16  # inputs of one mma k-tile
N_TILE = 8  # outputs of one mma n-tile


def inner_k_tiles(K: int) -> int | None:
    """The widest k-tiling (8: one 16-byte load a lane) that divides K, or None where none does."""
    for tiles in (8, 4, 2):
        if K % (K_TILE * tiles) == 0:
            return tiles
    return None


def fits(N: int, K: int, group_size: int, dtype: torch.dtype) -> bool:
    """Whether a layer of these sizes with scales in `dtype` can take tinygemm (its activations share the dtype)."""
    return (dtype == torch.bfloat16 and N % N_TILE == 0 and group_size in GROUPS and K % group_size == 0
            and inner_k_tiles(K) is not None)


def scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(N, K/G) scales and zero points of W = (q - z) · s -> tinygemm's (K/G, N, 2) [s, (8 - z) · s] in bf16
    (computed in float32, rounded once)."""
    s = scales.float()
    return torch.stack([s, (8 - zeros.float()) * s], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()


def _tile_dims(N: int, K: int, tiles: int) -> tuple[int, ...]:
    # An (N, K) nibble index split as (n-tile, row in tile, k super-tile, word in lane, k-tile half, which, t4, lo):
    # byte b = k // 2 of a row sits in lane t = 4 · row + t4 at nibble lo · 4 + half · 2 + which (int4mm.cu).
    return (N // N_TILE, N_TILE, K // (K_TILE * tiles), tiles // 2, 2, 2, 4, 2)


def pack_layout(qweight: torch.Tensor, tiles: int) -> torch.Tensor:
    """(N, K/2) uint8 (int4.pack) -> tinygemm's int32 (N/8, K / (16 tiles), 32, tiles/2), as
    `torch.ops.aten._convert_weight_to_int4pack(qweight, tiles)` builds it on a GPU."""
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    q = unpack(qweight).reshape(_tile_dims(N, K, tiles))
    # -> (n-tile, k super-tile, row, t4, word, lo, half, which): a lane's word, then its eight nibbles low first
    q = q.permute(0, 2, 1, 6, 3, 7, 4, 5).reshape(N // N_TILE, K // (K_TILE * tiles), 32, tiles // 2, 8)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (q.long() << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_layout(packed: torch.Tensor) -> torch.Tensor:
    """tinygemm's int32 (N/8, K / (16 tiles), 32, tiles/2) -> (N, K/2) uint8 in int4.pack's layout."""
    n_tiles, supers, _, words = packed.shape
    tiles = 2 * words
    N, K = n_tiles * N_TILE, supers * K_TILE * tiles
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int64)
    q = (packed.long()[..., None] >> shifts) & 0xF  # (N/8, supers, 32, words, 8)
    q = q.reshape(n_tiles, supers, N_TILE, 4, words, 2, 2, 2)  # (n-tile, super, row, t4, word, lo, half, which)
    return pack(q.permute(0, 2, 1, 4, 6, 7, 3, 5).reshape(N, K))


def convert(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Int4Linear's (qweight, scales, zeros) -> tinygemm's (packed weight, scales_and_zeros), by PyTorch's op on a
    GPU (the layout it reads), by `pack_layout` elsewhere."""
    tiles = inner_k_tiles(2 * qweight.shape[1])
    if qweight.is_cuda:
        packed = torch.ops.aten._convert_weight_to_int4pack(qweight.contiguous(), tiles)
    else:
        packed = pack_layout(qweight, tiles)
    return packed, scales_and_zeros(scales, zeros)


def dequantize(packed: torch.Tensor, sz: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K) weight in `dtype` from tinygemm's layout: (q - 8) · s + z_tg group by group, in float32."""
    q = unpack(unpack_layout(packed)).float()  # (N, K)
    N, K = q.shape
    groups = sz.shape[0]
    s, z = sz[..., 0].t().float(), sz[..., 1].t().float()  # (N, K/G) each
    w = (q.reshape(N, groups, -1) - 8) * s[..., None] + z[..., None]
    return w.reshape(N, K).to(dtype)


def linear(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (..., K) bf16 on a GPU -> (..., N) bf16 through `_weight_int4pack_mm` (which takes a contiguous 2-D bf16 x)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.aten._weight_int4pack_mm(x2, packed, group_size, sz)  # (rows, N)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def cpu_linear(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """The same product through tinygemm's CPU twin (`_weight_int4pack_mm_for_cpu`, the same (q - 8) · s + z_tg
    over the same scales_and_zeros; its packed weight comes from int32 (N, K) values): the tests' check of
    `scales_and_zeros` against the reference."""
    tiles = inner_k_tiles(2 * qweight.shape[1])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack(qweight).to(torch.int32), tiles)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, sz.to(x.dtype))
    return y.reshape(*x.shape[:-1], y.shape[-1])
