"""Memory attention in the engine on a GPU (LONGSEQ_TEST_CUDA=1; skipped elsewhere): a small model served past its
context follows `generate`'s memory cache, in float32 and bfloat16, and a prompt of 100K positions (RoPE angles
in float64) decodes reading the same number of keys as a short one."""

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

from longseq.attention.paged_memory import keys_read
from longseq.config import ModelOverrides
from longseq.engine import SamplingParams
from longseq.generation import generate_tokens
from longseq.models.loader import LoadedModel
from longseq.models.overrides import apply_overrides
from tiny_models import random_model

pytestmark = pytest.mark.skipif(os.environ.get("LONGSEQ_TEST_CUDA") != "1" or not torch.cuda.is_available(),
                                reason="memory attention on a GPU: LONGSEQ_TEST_CUDA=1")
GREEDY = SamplingParams(max_new_tokens=16, ignore_eos=True)
MEMORY = ModelOverrides(attention="memory", sink_tokens=4, window=128, block_size=32, retrieved_blocks=4)


def small_lm(dtype, scale=1.0):
    model = random_model(0, vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=512, num_heads=4,
                         num_kv_heads=2, max_seq_len=256)  # head_dim 64
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale) if p.dim() > 1 else None
    apply_overrides(model, MEMORY)
    return LoadedModel(model.to("cuda", dtype), FakeTokenizer(), Path("small"))


# bfloat16: weights scaled down, so that a random model's greedy paths part less often at near-ties
@pytest.mark.parametrize("dtype, scale, agree", [(torch.float32, 1.0, 0.9), (torch.bfloat16, 0.5, 0.5)])
def test_memory_engine_follows_generate(dtype, scale, agree):
    lm = small_lm(dtype, scale)
    prompts = random_prompts(5, 300, 1500, seed=1)  # up to six times the context
    engine = make_engine(lm, kv_block_size=16, num_kv_blocks=2048, max_num_batched_tokens=512)
    assert not engine.runner.use_graphs and lm.model.rotary.exact_angles
    # bfloat16: the pool keeps keys rotated at their true positions and moves them, generate keeps them un-rotated:
    # two roundings apart
    assert_follows_generate(lm.model, prompts, run_engine(engine, prompts, GREEDY), GREEDY, agree)


def test_a_long_context_reads_as_many_keys_as_a_short_one():
    lm = small_lm(torch.float32)
    spec = lm.config.attention
    engine = make_engine(lm, kv_block_size=16, num_kv_blocks=7000, max_num_batched_tokens=4096)
    widths = {}
    for length in (1000, 100_000):
        prompt = random_prompts(1, length, length, seed=2)[0]
        engine.add_request(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
            (blocks,) = engine.runner.cache.plan.groups
            if blocks.local_mask.shape[1] == 1:
                widths.setdefault(length, set()).add(keys_read(blocks, spec))
    bound = spec.sink_tokens + spec.retrieved_blocks * spec.block_size + spec.block_size - 1 + spec.local_window
    assert max(widths[100_000]) <= bound and max(widths[1000]) <= bound  # the remainder's length varies
    ref = list(generate_tokens(lm.model, prompt, SamplingParams(max_new_tokens=4, ignore_eos=True)))
    out = run_engine(engine, [prompt], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    assert out.token_ids[0] == ref[0]  # positions near 100K: float64 angles, keys moved exactly
