"""The SDPA fast path equals the naive float32 reference on every shape `generate` and training use."""

import math

import pytest
import torch

from longseq.attention import attention, causal_mask, reference_attention

HEADS = {"mha": (4, 4), "gqa": (8, 2), "mqa": (4, 1)}  # name -> (H, H_kv)
D = 16


def _qkv(heads, q_start, S, seed=0, B=2):
    H, H_kv = HEADS[heads]
    g = torch.Generator().manual_seed(seed)
    T = q_start + S
    q = torch.randn(B, H, S, D, generator=g)
    k = torch.randn(B, H_kv, T, D, generator=g)
    v = torch.randn(B, H_kv, T, D, generator=g)
    return q, k, v


def _check(q, k, v, q_start, window):
    out = attention(q, k, v, q_start=q_start, window=window)
    ref = reference_attention(q, k, v, q_start=q_start, window=window)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    return out


def _loop_reference(q, k, v, q_start, window):
    """Independent of `causal_mask`: a per-(head, query) loop over the visible keys only."""
    B, H, S, _ = q.shape
    group = H // k.shape[1]
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(S):
                p = q_start + i
                lo = 0 if window is None else max(0, p - window + 1)
                keys, vals = k[b, h // group, lo : p + 1], v[b, h // group, lo : p + 1]
                w = (keys @ q[b, h, i] / math.sqrt(q.shape[-1])).softmax(-1)
                out[b, h, i] = w @ vals
    return out


@pytest.mark.parametrize("heads", list(HEADS))
def test_causal_prefill(heads):
    q, k, v = _qkv(heads, 0, 12)
    out = _check(q, k, v, 0, None)
    torch.testing.assert_close(out, _loop_reference(q, k, v, 0, None), atol=1e-5, rtol=0)


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("window", [None, 1, 4, 11, 12, 30])  # T = 12: smaller, equal and larger windows
def test_decode(heads, window):
    q, k, v = _qkv(heads, 11, 1)
    out = _check(q, k, v, 11, window)
    torch.testing.assert_close(out, _loop_reference(q, k, v, 11, window), atol=1e-5, rtol=0)


@pytest.mark.parametrize("heads", list(HEADS))
def test_decode_first_token(heads):
    q, k, v = _qkv(heads, 0, 1)  # T = 1: the query sees only itself, so the output is v
    out = _check(q, k, v, 0, 4)
    H, H_kv = HEADS[heads]
    torch.testing.assert_close(out, v.repeat_interleave(H // H_kv, dim=1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("window", [None, 3, 8, 13, 40])  # T = 13
def test_chunked_continuation(heads, window):
    q, k, v = _qkv(heads, 8, 5)
    out = _check(q, k, v, 8, window)
    torch.testing.assert_close(out, _loop_reference(q, k, v, 8, window), atol=1e-5, rtol=0)


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("window", [2, 5])
def test_windowed_prefill(heads, window):
    q, k, v = _qkv(heads, 0, 10)
    out = _check(q, k, v, 0, window)
    torch.testing.assert_close(out, _loop_reference(q, k, v, 0, window), atol=1e-5, rtol=0)


def test_chunked_equals_slice_of_full_prefill():
    # Queries 6..9 of a full causal pass are the chunk (q_start=6, S=4) over the same keys.
    q, k, v = _qkv("gqa", 0, 10, seed=3)
    for window in (None, 3):
        full = attention(q, k, v, window=window)
        chunk = attention(q[:, :, 6:], k, v, q_start=6, window=window)
        torch.testing.assert_close(chunk, full[:, :, 6:], atol=1e-5, rtol=0)


def test_window_changes_the_result():
    # Guards against a window that is silently ignored.
    q, k, v = _qkv("gqa", 9, 1, seed=1)
    assert not torch.allclose(attention(q, k, v, q_start=9, window=3), attention(q, k, v, q_start=9), atol=1e-3)
    q, k, v = _qkv("gqa", 4, 6, seed=2)
    assert not torch.allclose(attention(q, k, v, q_start=4, window=3), attention(q, k, v, q_start=4), atol=1e-3)


def test_gqa_head_grouping():
    # Query heads 0..3 share KV head 0 and 4..7 share KV head 1 (repeat_interleave, as HF's repeat_kv).
    q, k, v = _qkv("gqa", 0, 6, seed=4)
    q = q[:, :4]  # H = 4 over H_kv = 2: heads 0, 1 -> kv 0; heads 2, 3 -> kv 1
    out = attention(q, k, v)
    for h in range(4):
        single = attention(q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], v[:, h // 2 : h // 2 + 1])
        torch.testing.assert_close(out[:, h : h + 1], single, atol=1e-5, rtol=0)


def test_causal_mask_without_window():
    m = causal_mask(torch.arange(4), torch.arange(4))
    expected = torch.tensor(
        [
            [1, 0, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 0],
            [1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert m.dtype == torch.bool
    assert torch.equal(m, expected)


def test_causal_mask_with_window():
    # Queries at 3..5 over keys 0..5, window 2: key k visible iff 0 <= q - k < 2.
    m = causal_mask(torch.arange(3, 6), torch.arange(6), window=2)
    expected = torch.tensor(
        [
            [0, 0, 1, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)


def test_causal_mask_window_one_is_diagonal():
    assert torch.equal(causal_mask(torch.arange(5), torch.arange(5), window=1), torch.eye(5, dtype=torch.bool))


def test_causal_mask_large_window_is_plain_causal():
    pos = torch.arange(6)
    assert torch.equal(causal_mask(pos, pos, window=6), causal_mask(pos, pos))
    assert not torch.equal(causal_mask(pos, pos, window=5), causal_mask(pos, pos))


@pytest.mark.parametrize("window", [None, 3])
def test_long_packed_rows_attend_document_by_document(monkeypatch, window):
    # Past DENSE_MASK_LIMIT no (S, S) mask is built: one causal call per document, same result as the reference.
    import longseq.attention.sdpa as sdpa

    monkeypatch.setattr(sdpa, "DENSE_MASK_LIMIT", 0)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 19, 8, generator=g)
    k, v = torch.randn(2, 2, 19, 8, generator=g), torch.randn(2, 2, 19, 8, generator=g)
    doc_ids = torch.tensor([[0] * 5 + [1] * 9 + [2] * 5, [0] * 19])
    torch.testing.assert_close(sdpa.attention(q, k, v, window=window, doc_ids=doc_ids),
                               reference_attention(q, k, v, window=window, doc_ids=doc_ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,groups", [("gqa", 2), ("mha", 4), ("mqa", 1)])
def test_long_training_attention_runs_by_kv_head_groups(monkeypatch, heads, groups):
    # Past ATTENTION_GROUP_TOKENS training attention runs one group of KV heads at a time (its backward's workspace
    # for one group): the same output and gradients as one call, in the layout the projections produce.
    from longseq.config import policy

    H, H_kv = HEADS[heads]
    assert policy.attention_groups(H_kv, 1 << 20) == groups
    g = torch.Generator().manual_seed(0)
    B, S = 2, 37
    # as Attention.position makes them: (B, H, S, D) views of (B, S, H, D) projections
    q = torch.randn(B, S, H, D, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, H_kv, D, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(B, S, H_kv, D, generator=g).transpose(1, 2).requires_grad_()
    dout = torch.randn(B, H, S, D, generator=g)
    whole = attention(q, k, v)
    whole_grads = torch.autograd.grad(whole, (q, k, v), dout)
    monkeypatch.setattr(policy, "ATTENTION_GROUP_TOKENS", S)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q_, k_, *a, **kw: calls.append((q_.shape[1], k_.shape[1])) or real(q_, k_, *a, **kw))
    out = attention(q, k, v)
    assert calls == [(H // groups, H_kv // groups)] * groups
    assert out.transpose(1, 2).is_contiguous()  # the output projection reads it without a copy
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.testing.assert_close(out, whole, atol=1e-6, rtol=0)
    for got, want in zip(grads, whole_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, reference_attention(q, k, v), atol=1e-5, rtol=0)
    with torch.no_grad():  # inference (prefill) is one call whatever its length
        calls.clear()
        attention(q, k, v)
        assert len(calls) == 1
