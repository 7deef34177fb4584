"""Each row's top-p cut without sorting the row: a multi-way search over the floats' order-preserving int32 keys.

With s = logits / T, the tokens at or above the row's top-k floor and e = exp(s - max), a token stays when the mass
ranked ahead of it (stable descending order: ties by lower id first) is < top_p * Z, Z = sum(e). Let g(x) be the
mass of the tokens whose key is > x. The last kept token's value v* is the smallest key K with g(K) < top_p * Z
(g drops there, so some token holds it); the ties at v* each add e(v*), so the first ceil((top_p * Z - g(v*)) /
e(v*)) of them (by id) stay. Passes over the row, each a launch whose programs cover (row, chunk of the row):

1. per chunk: its maximum, its sum of e (online softmax, Milakov and Gimelshein 2018) and its smallest key;
2. NUM_PASSES times: each program first narrows the row's key interval (lo, hi] with g(lo) >= top_p * Z > g(hi)
   by the last pass's masses, then sums e above each of NT thresholds splitting (lo, hi) in its chunk: 32 bits
   take ceil(32 / log2(NT)) passes, whatever the distribution;
3. per chunk: the ties at v* = hi;
4. per row: the chunk and then the token of the last kept tie.

A row may come with a candidate: the token the sampler would draw if top-p kept everything (engine/sampler.py).
Where the candidate is kept anyway (the mass ranked ahead of it, g(its key) plus its ties of lower id, is < top_p *
Z), it is the draw among the kept tokens too, and the row needs no search: pass 1 also sums that mass, and the
row's cut is returned as the candidate itself (value, id), which keeps a subset of the tokens holding it. Most rows
of a sampled batch end there (the candidate falls inside the top-p mass with probability about top_p), so the
search passes run for the few that do not.

The chunk size depends on the vocabulary alone, never on the batch, so a row's cut does not depend on the batch it
is in (seeded requests: engine/gumbel_max.py). Each mass is a sum in one fixed order (float32 per lane, float64
across lanes and chunks), so g is monotone as computed. It is not the sort path's float32 cumsum, so the two can
differ where the mass ahead of a token is within float32 rounding of top_p; over a long tie at 128K tokens the
cumsum's rounding is the larger.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from longseq.models.kernels import elements_per_program

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))
INT32_MAX: tl.constexpr = tl.constexpr(2**31 - 1)


@triton.jit
def _key(s):
    # float32 -> int32 in the same order; -0.0 becomes +0.0 first (equal values, one key)
    bits = tl.where(s == 0, 0.0, s).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _value(key):
    return tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)


@triton.jit
def _tile(L, stride_l, row, idx, V, inv_t, floor):
    """s (BLOCK,) float32 and whether each token takes part: at or above the top-k floor and not -inf."""
    mask = idx < V
    s = tl.load(L + row * stride_l + idx, mask=mask, other=NEG_INF) * inv_t
    return s, mask & (s >= floor) & (s > NEG_INF)


@triton.jit
def _row_stats(MAX, SUM, MIN_KEY, ABOVE, TIES_BEFORE, TOP_P, row, S, S_POW2: tl.constexpr):
    """From the per-chunk statistics: the row's max, top_p * Z (float64), smallest key, and for its candidate the
    mass of the keys above the candidate's (float64, e relative to the max) and its ties of lower id."""
    c = tl.arange(0, S_POW2)
    on = c < S
    maxes = tl.load(MAX + row * S + c, mask=on, other=NEG_INF)
    m = tl.max(maxes, 0)
    shift = tl.where(m == NEG_INF, 0.0, m)
    scale = tl.exp(maxes - shift).to(tl.float64)
    z = tl.sum(tl.load(SUM + row * S + c, mask=on, other=0.0) * scale, 0)
    above = tl.sum(tl.load(ABOVE + row * S + c, mask=on, other=0.0) * scale, 0)
    ties = tl.sum(tl.load(TIES_BEFORE + row * S + c, mask=on, other=0), 0)
    kmin = tl.min(tl.load(MIN_KEY + row * S + c, mask=on, other=INT32_MAX), 0)
    return m, z * tl.load(TOP_P + row), kmin, above, ties


@triton.jit
def _thresholds(lo, hi, NT: tl.constexpr):
    # (NT,) int64 splitting (lo, hi] into NT parts of at most ceil((hi - lo) / NT) keys; the last is hi
    step = (hi - lo + NT - 1) // NT
    return tl.minimum(lo + (tl.arange(0, NT) + 1).to(tl.int64) * step, hi)


@triton.jit
def _interval(LO, HI, GHI, PART, row, p, S, t, NUM_PASSES: tl.constexpr, NT: tl.constexpr, S_POW2: tl.constexpr):
    """(lo, hi, g(hi)) for pass p: pass p - 1's interval narrowed by the masses it summed at its thresholds."""
    at = row * (NUM_PASSES + 1) + p - 1
    lo, hi, ghi = tl.load(LO + at), tl.load(HI + at), tl.load(GHI + at)
    thr = _thresholds(lo, hi, NT)
    c = tl.arange(0, S_POW2)
    j = tl.arange(0, NT)
    part = tl.load(PART + ((row * NUM_PASSES + p - 1) * S + c[:, None]) * NT + j[None, :],
                   mask=(c < S)[:, None], other=0.0)  # (S_POW2, NT)
    g = tl.sum(part, 0)  # (NT,) the mass above each threshold, non-increasing
    reached = g >= t
    new_lo = tl.maximum(lo, tl.max(tl.where(reached, thr, lo), 0))
    new_hi = tl.min(tl.where(reached, hi, thr), 0)
    new_ghi = tl.maximum(tl.max(tl.where(reached, 0.0, g), 0), tl.where(new_hi == hi, ghi, 0.0))
    return new_lo, new_hi, new_ghi


@triton.jit
def _candidate(L, stride_l, INV_T, FLOOR, CAND, row):
    """The row's candidate token (-1: none), its s and whether it takes part."""
    c = tl.load(CAND + row)
    s = tl.load(L + row * stride_l + tl.maximum(c, 0)) * tl.load(INV_T + row)
    return c, s, (c >= 0) & (s >= tl.load(FLOOR + row)) & (s > NEG_INF)


@triton.jit
def _stats(L, stride_l, INV_T, FLOOR, ON, CAND, MAX, SUM, MIN_KEY, ABOVE, TIES_BEFORE, V, CHUNK: tl.constexpr,
           BLOCK: tl.constexpr):
    row, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)
    if tl.load(ON + row) != 0:
        inv_t, floor = tl.load(INV_T + row), tl.load(FLOOR + row)
        c, s_c, _ = _candidate(L, stride_l, INV_T, FLOOR, CAND, row)
        key_c = _key(s_c)
        m = tl.full([BLOCK], NEG_INF, tl.float32)
        z = tl.zeros([BLOCK], tl.float32)
        za = tl.zeros([BLOCK], tl.float32)  # the same sum over the tokens whose key is above the candidate's
        before = tl.zeros([BLOCK], tl.int32)  # the candidate's ties of lower id
        kmin = tl.full([BLOCK], INT32_MAX, tl.int32)
        for off in range(0, CHUNK, BLOCK):
            idx = chunk * CHUNK + off + tl.arange(0, BLOCK)
            s, inside = _tile(L, stride_l, row, idx, V, inv_t, floor)
            s = tl.where(inside, s, NEG_INF)
            new_m = tl.maximum(m, s)
            shift = tl.where(new_m == NEG_INF, 0.0, new_m)
            rescale, e = tl.exp(m - shift), tl.exp(s - shift)
            z = z * rescale + e
            key = _key(s)
            za = za * rescale + tl.where(inside & (key > key_c), e, 0.0)
            before += (inside & (key == key_c) & (idx < c)).to(tl.int32)
            m = new_m
            kmin = tl.minimum(kmin, tl.where(inside, key, INT32_MAX))
        top = tl.max(m, 0)
        shift = tl.where(top == NEG_INF, 0.0, top)
        at = row * tl.num_programs(1) + chunk
        tl.store(MAX + at, top)
        tl.store(SUM + at, tl.sum((z * tl.exp(m - shift)).to(tl.float64), 0))
        tl.store(ABOVE + at, tl.sum((za * tl.exp(m - shift)).to(tl.float64), 0))
        tl.store(TIES_BEFORE + at, tl.sum(before, 0))
        tl.store(MIN_KEY + at, tl.min(kmin, 0))
    else:  # a row without top-p: neutral statistics, which the later passes read (and then ignore)
        at = row * tl.num_programs(1) + chunk
        tl.store(MAX + at, NEG_INF)
        tl.store(SUM + at, tl.zeros([], tl.float64))
        tl.store(ABOVE + at, tl.zeros([], tl.float64))
        tl.store(TIES_BEFORE + at, tl.zeros([], tl.int32))
        tl.store(MIN_KEY + at, INT32_MAX)


@triton.jit
def _accepted(L, stride_l, INV_T, FLOOR, CAND, row, m, t, above, ties):
    """Whether the row's candidate is kept by its top-p: the mass ranked ahead of it (`above` and `ties` of
    _row_stats) is < top_p * Z (`t`)."""
    c, s_c, inside = _candidate(L, stride_l, INV_T, FLOOR, CAND, row)
    shift = tl.where(m == NEG_INF, 0.0, m)
    ahead = above + ties.to(tl.float64) * tl.exp(s_c - shift).to(tl.float64)
    return inside & (ahead < t)


@triton.jit(do_not_specialize=["p"])  # the pass index: one compiled kernel for passes 1, 2, ...
def _search(L, stride_l, INV_T, FLOOR, TOP_P, ON, CAND, MAX, SUM, MIN_KEY, ABOVE, TIES_BEFORE, LO, HI, GHI, PART, p,
            V, FIRST: tl.constexpr, NUM_PASSES: tl.constexpr, NT: tl.constexpr, CHUNK: tl.constexpr,
            BLOCK: tl.constexpr, S_POW2: tl.constexpr):
    row, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)
    S = tl.num_programs(1)
    m, t, kmin, above, ties = _row_stats(MAX, SUM, MIN_KEY, ABOVE, TIES_BEFORE, TOP_P, row, S, S_POW2)
    kept = _accepted(L, stride_l, INV_T, FLOOR, CAND, row, m, t, above, ties)
    if (tl.load(ON + row) != 0) & (kept == 0):  # a row whose candidate is kept needs no search
        if m > NEG_INF:  # else no token takes part: _cut's answer needs no search
            if FIRST:
                lo, hi, ghi = kmin.to(tl.int64) - 1, _key(m).to(tl.int64), 0.0
            else:
                lo, hi, ghi = _interval(LO, HI, GHI, PART, row, p, S, t, NUM_PASSES, NT, S_POW2)
            if chunk == 0:
                at = row * (NUM_PASSES + 1) + p
                tl.store(LO + at, lo)
                tl.store(HI + at, hi)
                tl.store(GHI + at, ghi)
            part = tl.zeros([NT], tl.float64)
            if hi - lo > 1:
                thr = _thresholds(lo, hi, NT).to(tl.int32)  # inside the keys' range
                inv_t, floor = tl.load(INV_T + row), tl.load(FLOOR + row)
                acc = tl.zeros([BLOCK, NT], tl.float32)  # per lane, reduced once at the end
                for off in range(0, CHUNK, BLOCK):
                    s, inside = _tile(L, stride_l, row, chunk * CHUNK + off + tl.arange(0, BLOCK), V, inv_t, floor)
                    e = tl.where(inside, tl.exp(s - m), 0.0)
                    acc += tl.where(_key(s)[:, None] > thr[None, :], e[:, None], 0.0)
                part = tl.sum(acc.to(tl.float64), 0)
            elif chunk == 0:  # settled: every threshold is hi, whose mass is known
                part += ghi
            tl.store(PART + ((row * NUM_PASSES + p) * S + chunk) * NT + tl.arange(0, NT), part)


@triton.jit
def _ties(L, stride_l, INV_T, FLOOR, TOP_P, ON, CAND, MAX, SUM, MIN_KEY, ABOVE, TIES_BEFORE, LO, HI, GHI, PART, TIES,
          V, NUM_PASSES: tl.constexpr, NT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
          S_POW2: tl.constexpr):
    row, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)
    S = tl.num_programs(1)
    m, t, kmin, above, ties = _row_stats(MAX, SUM, MIN_KEY, ABOVE, TIES_BEFORE, TOP_P, row, S, S_POW2)
    kept = _accepted(L, stride_l, INV_T, FLOOR, CAND, row, m, t, above, ties)
    if (tl.load(ON + row) != 0) & (kept == 0):  # a row whose candidate is kept needs no search
        if m > NEG_INF:
            lo, hi, ghi = _interval(LO, HI, GHI, PART, row, NUM_PASSES, S, t, NUM_PASSES, NT, S_POW2)
            if chunk == 0:
                at = row * (NUM_PASSES + 1) + NUM_PASSES
                tl.store(HI + at, hi)
                tl.store(GHI + at, ghi)
            inv_t, floor = tl.load(INV_T + row), tl.load(FLOOR + row)
            count = tl.zeros([BLOCK], tl.int32)
            for off in range(0, CHUNK, BLOCK):
                s, inside = _tile(L, stride_l, row, chunk * CHUNK + off + tl.arange(0, BLOCK), V, inv_t, floor)
                count += (inside & (_key(s) == hi.to(tl.int32))).to(tl.int32)
            tl.store(TIES + row * S + chunk, tl.sum(count, 0))


@triton.jit
def _cut(L, stride_l, INV_T, FLOOR, TOP_P, ON, CAND, MAX, SUM, MIN_KEY, ABOVE, TIES_BEFORE, HI, GHI, TIES, CUT_V,
         CUT_I, V, S, NUM_PASSES: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, S_POW2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    value = tl.full([], NEG_INF, tl.float32)
    index = tl.zeros([], tl.int64) + V  # a row without top-p: (-inf, V) keeps every token
    on = tl.load(ON + row) != 0
    m, t, kmin, above, ties = _row_stats(MAX, SUM, MIN_KEY, ABOVE, TIES_BEFORE, TOP_P, row, S, S_POW2)
    if on & _accepted(L, stride_l, INV_T, FLOOR, CAND, row, m, t, above, ties):
        c, value, _ = _candidate(L, stride_l, INV_T, FLOOR, CAND, row)
        index = c.to(tl.int64)
    elif on:
        index = tl.zeros_like(index)  # no token takes part: the sort path's first token, as it cuts there
        if m > NEG_INF:
            at = row * (NUM_PASSES + 1) + NUM_PASSES
            key = tl.load(HI + at).to(tl.int32)
            value = _value(key)
            # tie j (from 0) has g(v*) + j * e(v*) ahead of it: those with that < top_p * Z stay, at least one
            wanted = tl.ceil((t - tl.load(GHI + at)) / tl.exp(value - m).to(tl.float64))
            c = tl.arange(0, S_POW2)
            # a name of its own: Triton refuses a scalar (`ties` above) redefined as a block in a branch
            chunk_ties = tl.load(TIES + row * S + c, mask=c < S, other=0)
            seen = tl.cumsum(chunk_ties, 0)  # (S_POW2,) the ties up to each chunk's end
            last = tl.minimum(tl.maximum(wanted, 1.0), tl.max(seen, 0).to(tl.float64)).to(tl.int32)
            chunk = tl.sum((seen < last).to(tl.int32), 0)  # the chunk of the last kept tie
            need = last - tl.sum(tl.where(c < chunk, chunk_ties, 0), 0)
            inv_t, floor = tl.load(INV_T + row), tl.load(FLOOR + row)
            index = tl.zeros([], tl.int64) + V
            counted = tl.zeros([], tl.int32)
            for off in range(0, CHUNK, BLOCK):
                idx = chunk * CHUNK + off + tl.arange(0, BLOCK)
                s, inside = _tile(L, stride_l, row, idx, V, inv_t, floor)
                tie = (inside & (_key(s) == key)).to(tl.int32)
                hit = (tie != 0) & (tl.cumsum(tie, 0) + counted == need)
                index = tl.minimum(index, tl.min(tl.where(hit, idx, V), 0).to(tl.int64))
                counted += tl.sum(tie, 0)
    tl.store(CUT_V + row, value)
    tl.store(CUT_I + row, index)


def top_p_cut(logits: torch.Tensor, inv_temp: torch.Tensor, floor: torch.Tensor, top_p: torch.Tensor,
              on: torch.Tensor, candidate: torch.Tensor | None = None, thresholds: int | None = None,
              block: int | None = None, blocks_per_chunk: int | None = None,
              num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """engine/top_p.py's top_p_cut_reference in NUM_PASSES + 3 launches; with `candidate` (B,) int64 (-1: none),
    a row whose candidate is kept gets the candidate as its cut instead (see above). `thresholds` (a power of 2)
    per search pass, `block`, `blocks_per_chunk` (the tiling) and `num_warps`: tests and benchmarks set them."""
    B, V = logits.shape
    # Each token costs work per threshold in every pass: a few rows leave the GPU idle enough that fewer, wider
    # passes win; many rows fill it, and fewer thresholds (more, cheaper passes) win. The cut is the same either
    # way: the mass above a key is summed in one order whatever the other thresholds are (benchmarks/top_p_cut.py).
    thresholds = thresholds or (8 if B >= 32 else 16)
    assert logits.dtype == torch.float32 and logits.stride(1) == 1
    assert inv_temp.dtype == floor.dtype == top_p.dtype == torch.float32 and on.dtype == torch.int64
    assert thresholds >= 2 and thresholds & (thresholds - 1) == 0
    # the kernels index the per-row tensors by row: a strided view (a column of a top-k, say) must be copied
    inv_temp, floor, top_p, on = (t.contiguous() for t in (inv_temp, floor, top_p, on))
    if candidate is None:
        candidate = torch.full((B,), -1, dtype=torch.int64, device=logits.device)
    assert candidate.dtype == torch.int64 and candidate.shape == (B,)
    candidate = candidate.contiguous()
    device = logits.device
    block = block or min(triton.next_power_of_2(V), elements_per_program(device, 256))
    chunk = block * (blocks_per_chunk or (16 if logits.is_cuda else 1))
    S = triton.cdiv(V, chunk)
    num_passes = math.ceil(32 / int(math.log2(thresholds)))  # (lo, hi] holds at most 2^32 keys
    f32 = dict(device=device, dtype=torch.float32)
    cut_value, cut_index = torch.empty(B, **f32), torch.empty(B, device=device, dtype=torch.int64)
    if not B:
        return cut_value, cut_index
    maxes, sums = torch.empty(B, S, **f32), torch.empty(B, S, device=device, dtype=torch.float64)
    min_keys, ties, ties_before = (torch.empty(B, S, device=device, dtype=torch.int32) for _ in range(3))
    above = torch.empty(B, S, device=device, dtype=torch.float64)
    lo, hi = (torch.empty(B, num_passes + 1, device=device, dtype=torch.int64) for _ in range(2))
    f64 = dict(device=device, dtype=torch.float64)  # masses: float32 per lane, summed across lanes in float64
    ghi = torch.empty(B, num_passes + 1, **f64)
    part = torch.empty(B, num_passes, S, thresholds, **f64)
    row = (logits, logits.stride(0), inv_temp, floor)
    stats = (candidate, maxes, sums, min_keys, above, ties_before)
    sizes = dict(CHUNK=chunk, BLOCK=block, num_warps=num_warps)
    search = dict(NUM_PASSES=num_passes, NT=thresholds, S_POW2=triton.next_power_of_2(S), **sizes)
    _stats[(B, S)](*row, on, *stats, V, **sizes)
    for p in range(num_passes):
        _search[(B, S)](*row, top_p, on, *stats, lo, hi, ghi, part, p, V, FIRST=p == 0, **search)
    _ties[(B, S)](*row, top_p, on, *stats, lo, hi, ghi, part, ties, V, **search)
    search.pop("NT")
    _cut[(B,)](*row, top_p, on, *stats, hi, ghi, ties, cut_value, cut_index, V, S, **search)
    return cut_value, cut_index
