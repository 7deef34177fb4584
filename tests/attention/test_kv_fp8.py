"""An FP8 KV pool (attention/kv_fp8.py): paged attention over e4m3 K/V with per-layer scales stays within e4m3's
rounding of attention over float32 K/V, on every path (decode gather, prompt chunks, mixed steps); the Triton decode
kernel and KV write kernel read and write FP8 pools as the reference paths do (under Triton's CPU interpreter in
CI, compiled with LONGSEQ_TEST_CUDA=1)."""

import pytest
import torch

from fp8_helpers import DEVICE, ON_GPU, assert_same_e4m3
from longseq.attention.kv_fp8 import FP8, dequantize_kv, quantize_kv
from longseq.attention.paged import PagedBatch, PagedKVCache, gather_decode, reference_paged_attention

BS, D = 4, 16


def tables_for(ctx_lens, seed, num_blocks=64):
    free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    return [[free.pop() for _ in range(-(-c // BS))] for c in ctx_lens]


def test_quantize_saturates_and_round_trips():
    scale = torch.tensor(0.01)
    x = torch.tensor([0.0, 1.0, -2.5, 4.47, 100.0])  # 100 / 0.01 is past e4m3's 448
    q = quantize_kv(x, scale)
    assert q.dtype == FP8 and q.float()[-1] == 448.0 and not q.float().isnan().any()
    back = dequantize_kv(q, scale, torch.float32)
    assert ((back[:4] - x[:4]).abs() <= x[:4].abs() * 2**-4).all()


@pytest.mark.parametrize("q_lens,ctx_lens", [([1, 1, 1], [5, 17, 9]), ([6, 3], [6, 3]), ([1, 5, 1], [12, 5, 2])],
                         ids=["decode", "prefill", "mixed"])
def test_fp8_pool_attention_within_e4m3_of_float(q_lens, ctx_lens):
    H, H_kv, L = 4, 2, 2
    g = torch.Generator().manual_seed(sum(ctx_lens))
    tables = tables_for(ctx_lens, seed=len(q_lens))
    slots = 64 * BS
    exact = PagedKVCache(L, slots, H_kv, D, torch.float32, torch.device("cpu"))
    fp8 = PagedKVCache(L, slots, H_kv, D, FP8, torch.device("cpu"))
    assert fp8.k[0].dtype == FP8 and fp8.scales.shape == (L, 2)
    fp8.scales[1] = torch.tensor([0.02, 0.01])  # layer 1 scaled (N(0, 1) values up to 400), layer 0 at 1.0
    # Earlier context first (as prompts, every token new), then this step's tokens.
    before = [c - n for n, c in zip(q_lens, ctx_lens, strict=True)]
    steps = [(before, [b for b in before]), (q_lens, ctx_lens)] if any(before) else [(q_lens, ctx_lens)]
    for step_q, step_ctx in steps:
        keep = [i for i, n in enumerate(step_q) if n]
        step_q, step_ctx = [step_q[i] for i in keep], [step_ctx[i] for i in keep]
        batch = PagedBatch.build([tables[i] for i in keep], step_q, step_ctx, BS, torch.device("cpu"))
        N = sum(step_q)
        q = torch.randn(1, H, N, D, generator=g)
        k, v = torch.randn(1, H_kv, N, D, generator=g), torch.randn(1, H_kv, N, D, generator=g)
        for layer in range(L):
            exact.batch = fp8.batch = batch
            ref = exact.attention(layer, q, k, v, None)
            out = fp8.attention(layer, q, k, v, None)
            assert not out.isnan().any()
            assert (out - ref).norm() / ref.norm() < 0.05  # e4m3: ~2% a value
            # and exactly the reference path over the dequantized pools
            scales = fp8.scales[layer]
            kd, vd = dequantize_kv(fp8.k[layer], scales[0], torch.float32), dequantize_kv(fp8.v[layer], scales[1],
                                                                                         torch.float32)
            torch.testing.assert_close(out, reference_paged_attention(q, kd, vd, batch, None), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out, reference_paged_attention(q, fp8.k[layer], fp8.v[layer], batch, None,
                                                                      scales), atol=1e-5, rtol=1e-5)


def fp8_pools(ctx_lens, H_kv, seed, scales):
    g = torch.Generator().manual_seed(seed)
    tables = tables_for(ctx_lens, seed, num_blocks=96)
    k = torch.randn(96 * BS, H_kv, D, generator=g) * 3
    v = torch.randn(96 * BS, H_kv, D, generator=g)
    return quantize_kv(k, scales[0]).to(DEVICE), quantize_kv(v, scales[1]).to(DEVICE), tables


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("window", [None, 7])
def test_decode_kernel_reads_fp8_pools(splits, window):
    pytest.importorskip("triton")
    from longseq.attention.kernels.paged_decode import paged_decode

    ctx_lens, H, H_kv = [1, 70, 33, 129], 8, 2
    scales = torch.tensor([0.05, 0.01])
    k, v, tables = fp8_pools(ctx_lens, H_kv, seed=splits, scales=scales)
    batch = PagedBatch.build(tables, [1] * len(ctx_lens), ctx_lens, BS, DEVICE)
    q = torch.randn(1, H, len(ctx_lens), D, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ref = gather_decode(q, k, v, batch, window, scales.to(DEVICE))[0].transpose(0, 1)
    out = paged_decode(q[0].transpose(0, 1), k, v, batch.decode_tables, batch.decode_lens, BS, window, splits,
                       scales.to(DEVICE))
    torch.testing.assert_close(out, ref, atol=5e-3 if ON_GPU else 1e-5, rtol=1e-2 if ON_GPU else 1e-5)  # tf32 dots


def test_write_kernel_quantizes_as_the_reference():
    pytest.importorskip("triton")
    from longseq.attention.kernels.kv_write import write_kv

    N, H_kv = 5, 2
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(N, H_kv, D, generator=g).to(DEVICE), torch.randn(N, H_kv, D, generator=g).to(DEVICE)
    k[0, 0, 0] = 1e4  # saturates
    scales = torch.tensor([0.02, 0.004], device=DEVICE)
    k_pool = torch.zeros(32, H_kv, D, dtype=FP8, device=DEVICE)
    v_pool = torch.zeros_like(k_pool)
    slots = torch.tensor([3, 9, 0, 31, 17], device=DEVICE)
    write_kv(k_pool, v_pool, k, v, slots, scales)
    assert_same_e4m3(k_pool[slots].cpu(), quantize_kv(k, scales[0]).cpu())
    assert_same_e4m3(v_pool[slots].cpu(), quantize_kv(v, scales[1]).cpu())
    assert k_pool[slots][0, 0, 0].float() == 448.0
