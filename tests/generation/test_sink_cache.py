"""StreamingLLM's rolling cache: bounded memory, generation past the context, and the same logits as a naive
reference that keeps every token and recomputes attention over sinks + window at each step."""

import pytest
import torch

from longseq.config import AttentionConfig
from longseq.generation import KVCache, SamplingParams, generate_tokens
from longseq.generation.sink_cache import ReferenceSinkCache, SinkKVCache
from longseq.models.overrides import set_attention
from tiny_models import random_model

SINK, WINDOW = 3, 6


def tiny_model(sink=SINK, window=WINDOW, alibi=False, rope=None, seed=0):
    return random_model(seed, max_seq_len=32, sliding_window=window,
                        attention=AttentionConfig("streaming", sink_tokens=sink, alibi=alibi),
                        **({"rope": rope} if rope else {}))


def run(model, cache, tokens, chunks):
    """Feed `tokens` (1, N) in chunks of the given sizes; return the logits of every position (1, N, V)."""
    out, start = [], 0
    for size in chunks:
        ids = tokens[:, start : start + size]
        positions = cache.prepare(size)
        out.append(model(ids, positions=positions, cache=cache))
        cache.advance(size)
        start += size
    return torch.cat(out, dim=1)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("chunks", [[1] * 40, [9] + [1] * 31, [5, 3, 6, 6, 2, 6, 4, 1, 1, 6]])
@pytest.mark.parametrize("alibi", [False, True])
@torch.no_grad()
def test_equals_naive_reference(tokens, chunks, alibi):
    # 40 tokens through a cache of 3 + 6: most of them evicted, positions re-numbered at every step.
    model = tiny_model(alibi=alibi).double()
    fast = run(model, SinkKVCache(model.config, 1, "cpu", torch.float64, model.rotary.inv_freq), tokens, chunks)
    ref = run(model, ReferenceSinkCache(model.config, model.rotary.inv_freq), tokens, chunks)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=0)


@torch.no_grad()
def test_yarn_scaled_keys(tokens):
    # YaRN multiplies cos/sin by its attention factor: re-rotating cached keys must keep that factor once.
    from longseq.config import RopeConfig

    model = tiny_model(rope=RopeConfig(type="yarn", factor=4.0, original_max_position_embeddings=8)).double()
    fast = run(model, SinkKVCache(model.config, 1, "cpu", torch.float64, model.rotary.inv_freq), tokens, [1] * 40)
    ref = run(model, ReferenceSinkCache(model.config, model.rotary.inv_freq), tokens, [1] * 40)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=0)


@torch.no_grad()
def test_without_eviction_equals_the_plain_cache(tokens):
    # While everything fits, the rolling cache is an ordinary KV cache.
    model = tiny_model(sink=4, window=20).double()
    n = 24
    fast = run(model, SinkKVCache(model.config, 1, "cpu", torch.float64, model.rotary.inv_freq), tokens[:, :n],
               [7] + [1] * 17)
    plain = KVCache(model.config, 1, n, "cpu", torch.float64)
    set_attention(model, AttentionConfig(), None)  # the plain cache with no variant: full causal attention
    expected = run(model, plain, tokens[:, :n], [7] + [1] * 17)
    torch.testing.assert_close(fast, expected, atol=1e-10, rtol=0)


@torch.no_grad()
def test_eviction_changes_the_result(tokens):
    model = tiny_model().double()
    fast = run(model, SinkKVCache(model.config, 1, "cpu", torch.float64, model.rotary.inv_freq), tokens, [1] * 40)
    set_attention(model, AttentionConfig(), None)
    full = run(model, KVCache(model.config, 1, 40, "cpu", torch.float64), tokens, [1] * 40)
    torch.testing.assert_close(fast[:, :SINK + WINDOW], full[:, :SINK + WINDOW], atol=1e-10, rtol=0)
    assert not torch.allclose(fast[:, -5:], full[:, -5:], atol=1e-3)


@torch.no_grad()
def test_generation_runs_past_the_context_in_fixed_memory():
    model = tiny_model()
    seen = []
    original = SinkKVCache.advance

    def spy(self, n):
        seen.append((self.length, self.nbytes()))
        original(self, n)

    SinkKVCache.advance = spy
    try:
        out = list(generate_tokens(model, [5, 17, 42], SamplingParams(max_new_tokens=100, ignore_eos=True)))
    finally:
        SinkKVCache.advance = original
    assert len(out) == 100 > model.config.max_seq_len  # 32: a plain cache would have stopped there
    assert max(length for length, _ in seen) == SINK + WINDOW
    assert len({nbytes for _, nbytes in seen}) == 1  # memory never grows


def test_long_prompt_is_prefilled_in_chunks():
    model = tiny_model()
    prompt = list(range(1, 60))  # longer than the model's context (32)
    out = list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=3)))
    assert len(out) == 3


def test_too_many_tokens_per_forward():
    model = tiny_model()
    cache = SinkKVCache(model.config, 1, "cpu", torch.float32, model.rotary.inv_freq)
    cache.prepare(SINK + WINDOW)  # filling an empty cache at once is fine
    cache.advance(SINK + WINDOW)
    with pytest.raises(ValueError):
        cache.prepare(WINDOW + 1)
