"""The sampler's draw in one pass over the logits: scale by 1/temperature, drop the tokens outside each row's
top-k / top-p / min-p cut, add counter-based Gumbel noise, take the argmax.

The eager path (engine/gumbel_max.py) hashes the noise in a dozen elementwise passes over (B, V) int64 and float64
temporaries; here each program reads its slice of a row once and keeps the hash in registers. Programs cover
(row, chunk of the vocabulary) so that small batches still fill the GPU; a second reduction picks each row's chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longseq.generation.counter_rng import UNIFORM_BITS
from longseq.models.kernels import elements_per_program


@triton.jit
def _mix64(x):
    # SplitMix64's mixing function on uint64 (wrapping products, logical shifts): generation/counter_rng.py mix64
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    return x ^ (x >> 31)


@triton.jit
def _gumbel_max_chunks(L, stride_l, INV_T, FLOOR, CUT_V, CUT_I, KEYS, POS, BEST, BEST_I, V,
                       CHUNK: tl.constexpr, BLOCK: tl.constexpr, SHIFT: tl.constexpr, SCALE: tl.constexpr):
    row, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)
    num_chunks = tl.num_programs(1)
    inv_t = tl.load(INV_T + row)
    floor, cut_v, cut_i = tl.load(FLOOR + row), tl.load(CUT_V + row), tl.load(CUT_I + row)
    key = tl.load(KEYS + row).to(tl.uint64, bitcast=True)
    pos = tl.load(POS + row).to(tl.uint64, bitcast=True)
    state = _mix64(key ^ _mix64(pos * 0x9E3779B97F4A7C15))  # counter_rng.row_states
    first = chunk * CHUNK + tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = first
    for off in range(0, CHUNK, BLOCK):
        idx = first + off  # (BLOCK,) token ids
        mask = idx < V
        logit = tl.load(L + row * stride_l + idx, mask=mask, other=float("-inf"))
        if inv_t == 0:  # a greedy row: the argmax of the logits
            score = logit
        else:
            s = logit * inv_t
            keep = mask & (s >= floor) & ((s > cut_v) | ((s == cut_v) & (idx <= cut_i)))
            h = _mix64(state + idx.to(tl.uint64) * 0x9E3779B97F4A7C15)  # counter_rng.uniforms
            u = ((h >> SHIFT).to(tl.float64) + 0.5) * SCALE  # (m + 1/2) * 2^-52: in (0, 1), exact in float64
            score = tl.where(keep, s - tl.log((-tl.log(u)).to(tl.float32)), float("-inf"))
        better = score > best  # strict: on a tie the lower token id, which this lane saw first, stays
        best = tl.where(better, score, best)
        best_i = tl.where(better, idx, best_i)
    top = tl.max(best, 0)
    tl.store(BEST + row * num_chunks + chunk, top)
    tl.store(BEST_I + row * num_chunks + chunk, tl.min(tl.where(best == top, best_i, V), 0))


def gumbel_max(logits: torch.Tensor, inv_temp: torch.Tensor, floor: torch.Tensor, cut_value: torch.Tensor,
               cut_index: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, block: int | None = None,
               blocks_per_chunk: int | None = None) -> torch.Tensor:
    """engine/gumbel_max.py's gumbel_max_reference in one kernel (plus a (B, chunks) reduction). `block`,
    `blocks_per_chunk`: the tiling (tests set small ones)."""
    B, V = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1
    assert inv_temp.dtype == floor.dtype == cut_value.dtype == torch.float32
    assert cut_index.dtype == keys.dtype == positions.dtype == torch.int64
    block = block or min(triton.next_power_of_2(V), elements_per_program(logits.device, 1024))
    chunk = block * (blocks_per_chunk or (4 if logits.is_cuda else 1))
    num_chunks = triton.cdiv(V, chunk)
    best = torch.empty(B, num_chunks, device=logits.device, dtype=torch.float32)
    best_i = torch.empty(B, num_chunks, device=logits.device, dtype=torch.int64)
    if B:
        _gumbel_max_chunks[(B, num_chunks)](logits, logits.stride(0), inv_temp, floor, cut_value, cut_index, keys,
                                            positions, best, best_i, V, CHUNK=chunk, BLOCK=block,
                                            SHIFT=64 - UNIFORM_BITS, SCALE=2.0**-UNIFORM_BITS)
    return best_i.gather(1, best.argmax(1, keepdim=True)).squeeze(1)  # argmax: the first chunk on a tie
