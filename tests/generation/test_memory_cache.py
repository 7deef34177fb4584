"""Memory attention's cache in a model: the same logits as a naive cache that keeps every token and runs the dense
reference, plain causal attention while nothing has left the window, generation past the context, and the flags."""

from dataclasses import replace

import pytest
import torch

from longseq.config import AttentionConfig, ModelOverrides
from longseq.errors import LongseqError
from longseq.generation import KVCache, SamplingParams, generate_tokens
from longseq.generation.memory_cache import MemoryKVCache, ReferenceMemoryCache
from longseq.models.overrides import apply_overrides, set_attention
from tiny_models import random_model

MEMORY = AttentionConfig("memory", sink_tokens=2, local_window=12, block_size=4, retrieved_blocks=2)


def tiny_model(attention=MEMORY, seed=0):
    return random_model(seed, max_seq_len=32, attention=attention)


def run(model, cache, tokens, chunks):
    """Feed `tokens` (1, N) in chunks of the given sizes; return the logits of every position (1, N, V)."""
    out, start = [], 0
    for size in chunks:
        positions = cache.prepare(size)
        out.append(model(tokens[:, start : start + size], positions=positions, cache=cache))
        cache.advance(size)
        start += size
    return torch.cat(out, dim=1)


def fast_cache(model, dtype=torch.float64):
    return MemoryKVCache(model.config, 1, "cpu", dtype, model.rotary.inv_freq)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("chunks", [[1] * 60, [23] + [1] * 37, [8, 8, 5, 3, 16, 1, 1, 18]])
@torch.no_grad()
def test_equals_naive_reference(tokens, chunks):
    # 60 tokens, twice the model's context: 11 blocks in the memory at the end, 2 retrieved per query block.
    model = tiny_model().double()
    cache = fast_cache(model)
    fast = run(model, cache, tokens, chunks)
    ref = run(model, ReferenceMemoryCache(model.config, model.rotary.inv_freq), tokens, chunks)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=0)
    assert all(layer.memory.num_blocks >= 10 for layer in cache.layers)


@torch.no_grad()
def test_host_placement_gives_the_same_logits(tokens):
    model = tiny_model(replace(MEMORY, memory_placement="host")).double()
    cache = fast_cache(model)
    host = run(model, cache, tokens, [23] + [1] * 37)
    assert all(layer.memory.storage.type == "cpu" and layer.memory.num_blocks for layer in cache.layers)
    set_attention(model, MEMORY, None)
    torch.testing.assert_close(host, run(model, fast_cache(model), tokens, [23] + [1] * 37), atol=0, rtol=0)


@torch.no_grad()
def test_within_the_window_equals_the_plain_cache(tokens):
    # While every key is within the window the memory is empty and each key keeps its true distance.
    model = tiny_model(replace(MEMORY, local_window=28)).double()
    n, chunks = 28, [9, 4, 1, 1, 13]
    fast = run(model, fast_cache(model), tokens[:, :n], chunks)
    set_attention(model, AttentionConfig(), None)
    plain = run(model, KVCache(model.config, 1, n, "cpu", torch.float64), tokens[:, :n], chunks)
    torch.testing.assert_close(fast, plain, atol=1e-10, rtol=0)


@torch.no_grad()
def test_generates_past_the_context_as_the_reference_does(tokens):
    model = tiny_model().double()
    prompt = tokens[0, :40].tolist()  # beyond max_seq_len (32): the plain cache would refuse it
    out = list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=12)))
    cache = ReferenceMemoryCache(model.config, model.rotary.inv_freq)
    logits = run(model, cache, torch.tensor([prompt]), [40])
    expected = []
    for _ in range(12):
        expected.append(int(logits[0, -1].argmax()))
        logits = run(model, cache, torch.tensor([[expected[-1]]]), [1])
    assert out == expected


def test_overrides_set_the_memory_fields():
    model = tiny_model(AttentionConfig())
    apply_overrides(model, ModelOverrides(attention="memory", window=16, sink_tokens=1, block_size=8,
                                          retrieved_blocks=3, memory_placement="host"))
    spec = model.config.attention
    assert (spec.variant, spec.local_window, spec.sink_tokens, spec.block_size, spec.retrieved_blocks,
            spec.memory_placement) == ("memory", 16, 1, 8, 3, "host")
    assert model.config.sliding_window is None and all(layer.self_attn.window is None for layer in model.model.layers)
    with pytest.raises(LongseqError, match="must fit the model's context"):
        apply_overrides(model, ModelOverrides(window=30))  # 30 + 8 > 32
    for kw in (dict(memory_placement="disk"), dict(retrieved_blocks=-2)):
        with pytest.raises(LongseqError):
            ModelOverrides(attention="memory", **kw)


def test_without_its_cache_is_an_error(tokens):
    # Training and cache-less forwards (perplexity) have no memory to attend over: one clear line.
    model = tiny_model()
    with pytest.raises(LongseqError, match="memory attention runs while generating"):
        model(tokens[:, :8])
    from longseq.config import TrainConfig

    with pytest.raises(LongseqError, match="not training"):
        TrainConfig(data=("x.jsonl",), overrides=ModelOverrides(attention="memory"))
