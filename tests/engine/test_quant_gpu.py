"""Quantized serving compiled on a GPU (LONGSEQ_TEST_CUDA=1; skipped elsewhere), CUDA graphs on: a small bf16 model
served with FP8 weights (torch._scaled_mm, the single-row GEMV), int4 weights (PyTorch's tinygemm in decode, its
layout dequantized then a matmul in prefill) or int8 weights (the single-row GEMV, dequantize-then-matmul beyond)
follows `generate` over the same layers; over an FP8 KV pool, the Triton decode and write kernels follow the gather
path."""

import os
from pathlib import Path

import pytest
import torch
from engine_helpers import (
    TINY_VOCAB,
    FakeTokenizer,
    assert_follows_generate,
    make_engine,
    random_prompts,
    run_engine,
)

from longseq.engine import SamplingParams
from longseq.models.loader import LoadedModel
from longseq.models.quant import quantize_model
from tiny_models import random_model

pytestmark = pytest.mark.skipif(os.environ.get("LONGSEQ_TEST_CUDA") != "1" or not torch.cuda.is_available(),
                                reason="compiled kernels: LONGSEQ_TEST_CUDA=1 on a GPU")
GREEDY = SamplingParams(max_new_tokens=16, ignore_eos=True)


def small_lm(method):
    # head_dim 64 (the decode kernel's power of two), sizes divisible by 16 (the FP8 matmul's)
    model = random_model(0, vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=512, num_heads=4,
                         num_kv_heads=2, max_seq_len=512)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.25) if p.dim() > 1 else None
    model = model.to("cuda", torch.bfloat16)
    if method:
        quantize_model(model, method, group_size=64)
    return LoadedModel(model, FakeTokenizer(), Path("small"))


@pytest.mark.parametrize("method", ["fp8", "int4", "int8"])
def test_quantized_weights_on_gpu_follow_generate(method):
    lm = small_lm(method)
    prompts = random_prompts(6, 1, 90, seed=3)
    outs = run_engine(make_engine(lm, kv_block_size=16, num_kv_blocks=128), prompts, GREEDY)
    assert lm.model.quantization == method
    # generate decodes one row at a time (FP8: the weight-only GEMV, the activation unrounded; int4: tinygemm; int8:
    # the GEMV) where the engine's batched decode rounds activations to e4m3 (FP8), runs tinygemm over more rows
    # (int4) or a 16-bit matmul (int8) (benchmarks/quant_accuracy.py measures a real model)
    assert_follows_generate(lm.model, prompts, outs, GREEDY, 0.5)


@pytest.mark.parametrize("method", [None, "fp8"])
def test_fp8_kv_kernels_follow_the_gather_path(monkeypatch, method):
    """The Triton decode and KV-write kernels over an FP8 pool (CUDA graphs on) against the same engine with
    LONGSEQ_PAGED_KERNEL=0: the gather path, which dequantizes the blocks it reads, and indexed writes."""
    lm = small_lm(method)
    prompts = random_prompts(6, 1, 90, seed=4)
    options = dict(kv_block_size=16, num_kv_blocks=128, kv_cache_dtype="fp8")
    engine = make_engine(lm, **options)
    assert engine.runner.cache.write_kernel and engine.runner.use_graphs
    outs = run_engine(engine, prompts, GREEDY)
    monkeypatch.setenv("LONGSEQ_PAGED_KERNEL", "0")
    gather = make_engine(lm, **options)
    assert not gather.runner.cache.write_kernel
    refs = run_engine(gather, prompts, GREEDY)
    same = sum(a == b for o, r in zip(outs, refs, strict=True) for a, b in zip(o.token_ids, r.token_ids, strict=True))
    assert [o.token_ids[:4] for o in outs] == [r.token_ids[:4] for r in refs]  # bf16 sums in another order only
    assert same >= 0.9 * len(prompts) * GREEDY.max_new_tokens
