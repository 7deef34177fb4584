"""The Triton paged decode kernel against the gather reference: under Triton's CPU interpreter in CI (tests/conftest.py
sets TRITON_INTERPRET=1), compiled on a GPU with LONGSEQ_TEST_CUDA=1.
"""

import os

import pytest
import torch

from longseq.attention.paged import PagedBatch, gather_decode

pytest.importorskip("triton")

ON_GPU = os.environ.get("LONGSEQ_TEST_CUDA") == "1" and torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
BS = 16


@pytest.fixture(scope="module")
def kernel():
    from longseq.attention.kernels import paged_decode

    return paged_decode


def pools(ctx_lens, num_kv_heads, D, dtype, seed, num_blocks=48):
    """K/V pools full of NaN except where the sequences' contexts were written, through random block tables."""
    g = torch.Generator().manual_seed(seed)
    k = torch.full((num_blocks * BS, num_kv_heads, D), float("nan"), dtype=dtype)
    v = k.clone()
    free, tables = torch.randperm(num_blocks, generator=g).tolist(), []
    for ctx in ctx_lens:
        tables.append([free.pop() for _ in range(-(-ctx // BS))])
        for i in range(ctx):
            slot = tables[-1][i // BS] * BS + i % BS
            k[slot] = torch.randn(num_kv_heads, D, generator=g).to(dtype)
            v[slot] = torch.randn(num_kv_heads, D, generator=g).to(dtype)
    return k.to(DEVICE), v.to(DEVICE), tables


CASES = {
    "gqa": ([1, 70, 33, 129, 16], 8, 2, 32),
    "mha": ([5, 64], 4, 4, 16),
    "mqa": ([200, 3], 6, 1, 64),
    "llama-group": ([300], 32, 8, 128),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("window", [None, 1, 40])
@pytest.mark.parametrize("splits", [1, 3, 8])  # 8: some splits get no keys
def test_kernel_equals_gather(kernel, case, window, splits):
    ctx_lens, H, H_kv, D = CASES[case]
    k, v, tables = pools(ctx_lens, H_kv, D, torch.float32, seed=len(ctx_lens) * 31 + H)
    batch = PagedBatch.build(tables, [1] * len(ctx_lens), ctx_lens, BS, DEVICE)
    q = torch.randn(1, H, len(ctx_lens), D, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ref = gather_decode(q, k, v, batch, window)[0].transpose(0, 1)  # (B, H, D)
    out = kernel.paged_decode(q[0].transpose(0, 1), k, v, batch.decode_tables, batch.decode_lens, BS, window, splits)
    assert out.shape == ref.shape and not out.isnan().any()
    # tl.dot may use TF32 on a GPU; the interpreter computes in float32
    torch.testing.assert_close(out, ref, atol=2e-2 if ON_GPU else 1e-5, rtol=0)


# The interpreter computes through numpy, which has no bfloat16 (it returns garbage for it): bf16 runs on a GPU only.
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []))
def test_kernel_half_precision(kernel, dtype):
    k, v, tables = pools([77, 150, 2], 2, 64, dtype, seed=9)
    batch = PagedBatch.build(tables, [1, 1, 1], [77, 150, 2], BS, DEVICE)
    q = torch.randn(1, 8, 3, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    ref = gather_decode(q.float(), k.float(), v.float(), batch, None)[0].transpose(0, 1)
    out = kernel.paged_decode(q[0].transpose(0, 1), k, v, batch.decode_tables, batch.decode_lens, BS, None, 2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=0)


@pytest.mark.parametrize("programs, keys, expect", [(2048, 512, 1), (8, 64, 1), (8, 8192, 32), (8, 1024, 4)])
def test_splits_fill_the_gpu_only_when_needed(kernel, programs, keys, expect):
    assert kernel.num_splits(programs, 1, keys, num_sms=132) == expect


@pytest.mark.parametrize("lens, expect", [
    ([131072] + [2500] * 40, 16),  # a 128K context decoding beside 40 chats: split, or its programs set the time
    ([4096] * 200, 1),  # balanced: 200 x 8 programs fill the GPU
    ([8192] + [100] * 40, 16),
    ([3000] + [10] * 40, 1),  # too short to be worth splitting whatever the others
    ([131072] * 40, 1),  # long, but all alike
])
def test_a_dominating_context_is_split(kernel, lens, expect):
    assert kernel.num_splits(len(lens), 8, 131072, num_sms=132, lens=lens) == expect


@pytest.mark.parametrize("N,H,D", [(1, 8, 128), (7, 2, 16), (40, 3, 64)])
def test_kv_write_kernel_equals_indexed_assignment(N, H, D):
    """Strided K/V (the model's transposed (1, H, N, D) views) into scattered slots of NaN-filled pools."""
    from longseq.attention.kernels.kv_write import write_kv

    g = torch.Generator().manual_seed(N)
    k = torch.randn(1, H, N, D, generator=g).to(DEVICE)[0].transpose(0, 1)
    v = torch.randn(1, H, N, D, generator=g).to(DEVICE)[0].transpose(0, 1)
    slots = torch.randperm(3 * N + 5, generator=g)[:N].to(DEVICE)
    pools = [torch.full((3 * N + 5, H, D), float("nan"), device=DEVICE) for _ in range(4)]
    write_kv(pools[0], pools[1], k, v, slots)
    pools[2][slots], pools[3][slots] = k, v
    assert torch.equal(pools[0].nan_to_num(7.0), pools[2].nan_to_num(7.0))
    assert torch.equal(pools[1].nan_to_num(7.0), pools[3].nan_to_num(7.0))
