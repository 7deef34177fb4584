"""Paged attention over K/V scattered into random non-contiguous blocks equals contiguous attention."""

import os
import zlib

import pytest
import torch

from longseq.attention import attention, reference_attention
from longseq.attention.paged import (
    DECODE_BUCKET,
    PagedBatch,
    PagedKVCache,
    decode_slots,
    paged_attention,
    reference_paged_attention,
)

D = 16
BS = 4
TOL = dict(atol=1e-10, rtol=0)  # float64: only summation order differs


def scatter(ctx_lens, num_kv_heads, seed, num_blocks=64, poison=True):
    """Random contexts K/V (each (1, H_kv, ctx, D)) written through random block tables into a pool whose other
    slots hold NaN (anything read from outside a sequence's context would show)."""
    g = torch.Generator().manual_seed(seed)
    fill = float("nan") if poison else 0.0
    k_pool = torch.full((num_blocks * BS, num_kv_heads, D), fill, dtype=torch.float64)
    v_pool = k_pool.clone()
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables, ks, vs = [], [], []
    for ctx in ctx_lens:
        n = -(-ctx // BS) + int(torch.randint(0, 2, (1,), generator=g))  # sometimes a spare block at the end
        tables.append([free.pop() for _ in range(n)])
        k = torch.randn(1, num_kv_heads, ctx, D, generator=g, dtype=torch.float64)
        v = torch.randn(1, num_kv_heads, ctx, D, generator=g, dtype=torch.float64)
        for i in range(ctx):
            slot = tables[-1][i // BS] * BS + i % BS
            k_pool[slot], v_pool[slot] = k[0, :, i], v[0, :, i]
        ks.append(k)
        vs.append(v)
    return k_pool, v_pool, tables, ks, vs


def contiguous(q, ks, vs, q_lens, ctx_lens, window, fn=attention):
    outs, start = [], 0
    for k, v, q_len, ctx in zip(ks, vs, q_lens, ctx_lens, strict=True):
        outs.append(fn(q[:, :, start : start + q_len], k, v, q_start=ctx - q_len, window=window))
        start += q_len
    return torch.cat(outs, dim=2)


CASES = {
    "decode": ([1, 1, 1, 1, 1], [1, 7, 4, 13, 9]),
    "decode-one": ([1], [6]),
    "prefill": ([5, 12], [5, 12]),
    "chunked": ([4, 3], [10, 3]),
    "mixed": ([1, 6, 1, 3, 1], [17, 6, 2, 11, 8]),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("window", [None, 1, 3, 8, 100])
def test_paged_equals_contiguous(case, heads, window):
    q_lens, ctx_lens = CASES[case]
    H, H_kv = heads
    k_pool, v_pool, tables, ks, vs = scatter(ctx_lens, H_kv, seed=zlib.crc32(f"{case}-{H}-{window}".encode()) % 1000)
    batch = PagedBatch.build(tables, q_lens, ctx_lens, BS, torch.device("cpu"))
    # the decode path is what is tested wherever a sequence has one new token; mixed steps also run the loop
    assert (batch.decode_tables is not None) == any(q == 1 for q in q_lens)
    assert (batch.decode_rows is not None) == (1 in q_lens and not all(q == 1 for q in q_lens))
    q = torch.randn(1, H, sum(q_lens), D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    out = paged_attention(q, k_pool, v_pool, batch, window)
    assert out.shape == q.shape and not out.isnan().any()
    torch.testing.assert_close(out, reference_paged_attention(q, k_pool, v_pool, batch, window), **TOL)
    torch.testing.assert_close(out, contiguous(q, ks, vs, q_lens, ctx_lens, window), **TOL)
    naive = contiguous(q, ks, vs, q_lens, ctx_lens, window, reference_attention)  # computes in float32
    torch.testing.assert_close(out, naive.to(out.dtype), atol=1e-5, rtol=0)


def test_batch_slots_follow_the_block_tables():
    batch = PagedBatch.build([[5, 2], [7], [0, 3, 1]], [3, 1, 2], [6, 2, 9], BS, torch.device("cpu"))
    assert batch.context_slots[0].tolist() == [20, 21, 22, 23, 8, 9]
    assert batch.context_slots[1].tolist() == [28, 29]
    assert batch.context_slots[2].tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4]
    assert batch.slot_mapping.tolist() == [23, 8, 9, 29, 15, 4]  # the new tokens are each context's last
    assert batch.decode_lens.tolist() == [2] and batch.decode_rows.tolist() == [3]  # the one single-token sequence
    assert PagedBatch.build([[5, 2]], [6], [6], BS, torch.device("cpu")).decode_tables is None
    dec = PagedBatch.build([[5, 2], [7]], [1, 1], [6, 2], BS, torch.device("cpu"))
    width = DECODE_BUCKET  # the key length is rounded up so that shapes repeat across steps
    assert dec.decode_tables.tolist() == [[5, 2] + [0] * (width // BS - 2), [7] + [0] * (width // BS - 1)]
    assert dec.decode_lens.tolist() == [6, 2]
    slots, mask = decode_slots(dec.decode_tables, dec.decode_lens, BS)
    assert mask.tolist() == [[True] * 6 + [False] * (width - 6), [True, True] + [False] * (width - 2)]
    # padding repeats each sequence's own last slot
    assert slots[0].tolist() == [20, 21, 22, 23, 8, 9] + [9] * (width - 6)
    assert slots[1].tolist() == [28, 29] + [29] * (width - 2)
    assert dec.slot_mapping.tolist() == [9, 29]


ON_GPU = os.environ.get("LONGSEQ_TEST_CUDA") == "1" and torch.cuda.is_available()


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if ON_GPU else []))
def test_a_mixed_steps_indices_reach_the_device_without_a_sync(device):
    """A mixed step's index tensors (new-token slots, prompt chunks, decode tables) arrive on the device with the
    values and dtypes the kernels take, and on a GPU without synchronizing the stream (a plain .to(cuda) from
    pageable memory would: the host could not prepare a step while the last one runs)."""
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        batch = PagedBatch.build([[5, 2], [7], [0, 3, 1]], [3, 1, 2], [6, 2, 9], BS, torch.device(device))
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert batch.slot_mapping.tolist() == [23, 8, 9, 29, 15, 4]
    c = batch.chunks
    assert c.rows.tolist() == [0, 1, 2, 4, 5] and c.q_lens == [3, 2] and c.ctx_lens == [6, 9]
    assert c.slots.tolist() == [20, 21, 22, 23, 8, 9, 0, 1, 2, 3, 12, 13, 14, 15, 4]
    assert c.cu_q.tolist() == [0, 3, 5] and c.cu_k.tolist() == [0, 6, 15]
    assert c.cu_q.dtype == c.cu_k.dtype == batch.decode_tables.dtype == batch.decode_lens.dtype == torch.int32
    assert batch.decode_lens.tolist() == [2] and batch.decode_rows.tolist() == [3]
    assert batch.decode_tables[0, :1].tolist() == [7] and batch.slot_mapping.device.type == device


@pytest.mark.parametrize("q_lens, ctx_lens", [([1, 1, 1], [3, 9, 5]), ([2, 1, 4], [7, 1, 4])])
def test_cache_writes_new_kv_then_attends(q_lens, ctx_lens):
    # Earlier tokens are already in the pool; this step's K/V go in through PagedKVCache.attention.
    H, H_kv = 4, 2
    k_pool, v_pool, tables, ks, vs = scatter(ctx_lens, H_kv, seed=3)
    cache = PagedKVCache(1, k_pool.shape[0], H_kv, D, torch.float64, torch.device("cpu"))
    cache.batch = PagedBatch.build(tables, q_lens, ctx_lens, BS, torch.device("cpu"))
    new_k = torch.cat([k[:, :, ctx - n :] for k, n, ctx in zip(ks, q_lens, ctx_lens, strict=True)], dim=2)
    new_v = torch.cat([v[:, :, ctx - n :] for v, n, ctx in zip(vs, q_lens, ctx_lens, strict=True)], dim=2)
    cache.k[0].copy_(k_pool)
    cache.v[0].copy_(v_pool)
    cache.k[0][cache.batch.slot_mapping] = 0.0  # this step's slots hold stale data until the write
    cache.v[0][cache.batch.slot_mapping] = 0.0
    q = torch.randn(1, H, sum(q_lens), D, dtype=torch.float64)
    out = cache.attention(0, q, new_k, new_v, None)
    torch.testing.assert_close(out, contiguous(q, ks, vs, q_lens, ctx_lens, None), **TOL)
    torch.testing.assert_close(cache.k[0], k_pool, equal_nan=True, **TOL)
    torch.testing.assert_close(cache.v[0], v_pool, equal_nan=True, **TOL)


def test_float32_decode_path():
    H, H_kv = 8, 2
    k_pool, v_pool, tables, ks, vs = scatter([3, 30, 17], H_kv, seed=11, poison=False)
    k_pool, v_pool = k_pool.float(), v_pool.float()
    batch = PagedBatch.build(tables, [1, 1, 1], [3, 30, 17], BS, torch.device("cpu"))
    q = torch.randn(1, H, 3, D)
    out = paged_attention(q, k_pool, v_pool, batch, None)
    ref = contiguous(q, [k.float() for k in ks], [v.float() for v in vs], [1, 1, 1], [3, 30, 17], None)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
