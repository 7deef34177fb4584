"""Prefill + decode through the KV cache gives the logits of one full forward pass."""

import pytest
import torch

from longseq.generation import KVCache
from tiny_models import cached_logits, random_model

N = 20
# float32 logits reach ~6 here; different summation orders (cached vs. full) differ by a few ulp of that.
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_model(sliding_window=None, seed=0):
    return random_model(seed, sliding_window=sliding_window)


@pytest.fixture(scope="module", params=[None, 4], ids=["full", "window4"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (2, N), generator=torch.Generator().manual_seed(1))


def _cache(model, B=2, max_seq_len=N):
    return KVCache(model.config, B, max_seq_len, "cpu", torch.float32)


@torch.no_grad()
def test_logits_are_not_flat(model, tokens):
    logits = model(tokens)
    assert logits.shape == (2, N, 97)
    assert logits.std(-1).min() > 0.5  # otherwise the comparisons below would prove little


@pytest.mark.parametrize("k", [1, 3, 7])
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(model, tokens, k):
    full = model(tokens)
    cache = _cache(model)
    out = [model(tokens[:, :k], cache=cache)]
    cache.advance(k)
    for t in range(k, N):
        out.append(model(tokens[:, t : t + 1], cache=cache))
        cache.advance(1)
    assert cache.length == N
    torch.testing.assert_close(torch.cat(out, dim=1), full, **TOL)


@pytest.mark.parametrize("window", [None, 4])
@torch.no_grad()
def test_decode_equals_full_forward_float64(tokens, window):
    # In float64 the rounding noise vanishes: cached decode must agree to ~1e-12.
    model = tiny_model(window).double()
    full = model(tokens)
    torch.testing.assert_close(cached_logits(model, tokens, 5), full, atol=1e-10, rtol=0)


@pytest.mark.parametrize("chunks", [(5, 6, 9), (3, 1, 8, 8), (2, 18)])
@torch.no_grad()
def test_prefill_then_chunks_equals_full_forward(model, tokens, chunks):
    assert sum(chunks) == N
    full = model(tokens)
    cache = _cache(model)
    out, start = [], 0
    for size in chunks:
        out.append(model(tokens[:, start : start + size], cache=cache))
        cache.advance(size)
        start += size
    torch.testing.assert_close(torch.cat(out, dim=1), full, **TOL)


@torch.no_grad()
def test_window_matters(tokens):
    # The sliding-window model must differ from the full one once positions pass the window.
    full, windowed = tiny_model(None)(tokens), tiny_model(4)(tokens)
    torch.testing.assert_close(windowed[:, :4], full[:, :4], **TOL)
    assert not torch.allclose(windowed[:, 8:], full[:, 8:], atol=1e-3)


@torch.no_grad()
def test_windowed_decode_only_sees_the_window():
    # With a window of 4 and 2 layers a token depends on at most the 2 * 3 positions before it, so changing
    # the first tokens of a long sequence leaves the last logits unchanged.
    model = tiny_model(4)
    a = torch.randint(0, 97, (1, N), generator=torch.Generator().manual_seed(2))
    b = a.clone()
    b[0, :5] = (b[0, :5] + 1) % 97
    last = []
    for ids in (a, b):
        cache = _cache(model, B=1)
        model(ids[:, :10], cache=cache)
        cache.advance(10)
        for t in range(10, N):
            logits = model(ids[:, t : t + 1], cache=cache)
            cache.advance(1)
        last.append(logits)
    torch.testing.assert_close(last[0], last[1], **TOL)


@torch.no_grad()
def test_last_only(model, tokens):
    full = model(tokens)
    last = model(tokens, last_only=True)
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last, full[:, -1:], **TOL)
    cache = _cache(model)
    prefill = model(tokens[:, :12], cache=cache, last_only=True)
    cache.advance(12)
    torch.testing.assert_close(prefill, full[:, 11:12], **TOL)
    rest = model(tokens[:, 12:], cache=cache, last_only=True)
    torch.testing.assert_close(rest, full[:, -1:], **TOL)


@torch.no_grad()
def test_over_capacity_raises(model, tokens):
    cache = _cache(model, max_seq_len=8)
    with pytest.raises(ValueError):
        model(tokens[:, :9], cache=cache)
    cache = _cache(model, max_seq_len=8)
    model(tokens[:, :8], cache=cache)  # exactly full is fine
    cache.advance(8)
    with pytest.raises(ValueError):
        model(tokens[:, 8:9], cache=cache)


def test_update_returns_everything_so_far():
    cfg = tiny_model().config
    cache = KVCache(cfg, 1, 6, "cpu", torch.float32)
    k1, v1 = torch.randn(1, 2, 4, cfg.head_dim), torch.randn(1, 2, 4, cfg.head_dim)
    k, v = cache.update(0, k1, v1)
    assert torch.equal(k, k1) and torch.equal(v, v1)
    cache.advance(4)
    k2, v2 = torch.randn(1, 2, 2, cfg.head_dim), torch.randn(1, 2, 2, cfg.head_dim)
    k, v = cache.update(0, k2, v2)
    assert torch.equal(k, torch.cat([k1, k2], dim=2)) and torch.equal(v, torch.cat([v1, v2], dim=2))
    with pytest.raises(ValueError):
        cache.update(1, torch.randn(1, 2, 7, cfg.head_dim), torch.randn(1, 2, 7, cfg.head_dim))


@pytest.mark.parametrize("dtype, size", [(torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)])
def test_nbytes(dtype, size):
    cfg = tiny_model().config  # 2 layers, 2 KV heads, head_dim 16
    cache = KVCache(cfg, 3, 40, "cpu", dtype)
    assert cache.nbytes() == 2 * cfg.num_layers * 3 * cfg.num_kv_heads * 40 * cfg.head_dim * size
    assert cache.nbytes() == 2 * 2 * 3 * 2 * 40 * 16 * size
