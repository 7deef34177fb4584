"""The packed prompt chunks of a step: the right rows, slots and offsets; FlashAttention's varlen kernel (GPU) equals
contiguous attention sequence by sequence."""

import pytest
import torch

from longseq.attention.paged import PagedBatch
from longseq.attention.varlen import Chunks, flash_varlen, loop_varlen

BS = 4


def test_chunks_pack_the_multi_token_sequences():
    # a decode, a fresh 3-token prompt, a decode, a 2-token chunk of a longer prompt
    tables, q_lens, ctx = [[5, 2], [7], [0, 3, 1], [4, 6, 8]], [1, 3, 1, 2], [6, 3, 9, 10]
    batch = PagedBatch.build(tables, q_lens, ctx, BS, torch.device("cpu"))
    c = batch.chunks
    assert c.rows.tolist() == [1, 2, 3, 5, 6]
    assert c.q_lens == [3, 2] and c.ctx_lens == [3, 10]
    assert c.cu_q.tolist() == [0, 3, 5] and c.cu_k.tolist() == [0, 3, 13]
    assert c.cu_q.dtype == torch.int32
    assert c.slots.tolist() == batch.context_slots[1].tolist() + batch.context_slots[3].tolist()
    assert PagedBatch.build([[1], [2]], [1, 1], [3, 2], BS, torch.device("cpu")).chunks is None


def packed(q_lens, ctx, H, H_kv, D=128):
    """Chunks over contexts packed back to back, and random bf16 q (N_c, H, D), k, v (sum ctx, H_kv, D) on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(0)
    cu = [torch.tensor([0, *torch.tensor(n).cumsum(0)], dtype=torch.int32, device="cuda") for n in (q_lens, ctx)]
    c = Chunks(torch.arange(sum(q_lens)), torch.arange(sum(ctx)), *cu, q_lens, ctx)
    q = torch.randn(sum(q_lens), H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(sum(ctx), H_kv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    return c, q, k, torch.randn_like(k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention's varlen kernel runs on CUDA GPUs")
@pytest.mark.parametrize("window", [None, 5, 200])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=["mha", "gqa"])
def test_flash_varlen_equals_loop(window, heads):
    c, q, k, v = packed([37, 1, 300, 64], [37, 900, 1000, 64], *heads)  # fresh prompts, chunks of long ones
    ref = loop_varlen(q.double(), k.double(), v.double(), c, window)
    torch.testing.assert_close(flash_varlen(q, k, v, c, window).double(), ref, atol=2e-2, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="cuDNN attention on a Hopper GPU")
def test_long_chunks_through_cudnn_equal_the_loop():
    from longseq.attention.varlen import LONG_PREFIX, split_varlen

    # long prefixes and a fresh prompt
    c, q, k, v = packed([512, 100, 1024], [LONG_PREFIX + 512, 100, 3 * LONG_PREFIX], 32, 8)
    ref = loop_varlen(q.float(), k.float(), v.float(), c, None)
    torch.testing.assert_close(split_varlen(q, k, v, c, None).float(), ref, atol=2e-2, rtol=0)
