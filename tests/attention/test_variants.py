"""Every attention variant against its naive reference: masks against per-element loops, fast paths (chunked online
softmax, LongNet segments, block gather, FlexAttention) against the dense float64 reference."""

import math
import warnings

import pytest
import torch

from longseq.attention import attention, reference_attention
from longseq.attention.alibi import alibi_bias, alibi_slopes
from longseq.attention.block_sparse import block_sparse_attention
from longseq.attention.chunked import chunked_attention
from longseq.attention.dilated import dilated_attention
from longseq.attention.masks import block_layout, block_sparse_mask, dilated_counts, sink_window_mask
from longseq.config import AttentionConfig
from longseq.errors import LongseqError

D = 8
SPECS = {
    "causal": AttentionConfig(),
    "streaming": AttentionConfig(variant="streaming", sink_tokens=2),
    "dilated": AttentionConfig(variant="dilated", segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4)),
    "dilated1": AttentionConfig(variant="dilated", segment_lengths=(6,), dilation_rates=(3,)),
    "block_sparse": AttentionConfig(variant="block_sparse", block_size=3, local_blocks=2, global_blocks=1),
    "alibi": AttentionConfig(alibi=True),
    "alibi_dilated": AttentionConfig(variant="dilated", segment_lengths=(4, 8), dilation_rates=(1, 2), alibi=True),
}
WINDOWS = {"streaming": 5}  # streaming needs a window; the others run without one unless a test adds it


def _qkv(S, q_start=0, H=4, H_kv=2, B=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    T = q_start + S
    return (torch.randn(B, H, S, D, generator=g, dtype=dtype), torch.randn(B, H_kv, T, D, generator=g, dtype=dtype),
            torch.randn(B, H_kv, T, D, generator=g, dtype=dtype))


# ---- masks against loops -------------------------------------------------------------------------------------


def test_sink_window_mask_loop():
    S, window, sinks = 12, 3, 2
    m = sink_window_mask(torch.arange(S), torch.arange(S), window, sinks)
    for q in range(S):
        for k in range(S):
            assert bool(m[q, k]) == (k <= q and (k < sinks or q - k < window)), (q, k)


def test_dilated_counts_loop():
    segments, rates = (4, 8), (1, 2)
    counts = dilated_counts(torch.arange(5, 17), torch.arange(17), segments, rates)  # queries 5..16
    for i, q in enumerate(range(5, 17)):
        for k in range(17):
            patterns = zip(segments, rates, strict=True)
            expected = sum(k <= q and q // w == k // w and (q - k) % r == 0 for w, r in patterns)
            assert int(counts[i, k]) == expected, (q, k)


def test_block_sparse_mask_loop():
    b, local, glob = 2, 2, 1
    layout = block_layout(6, 6, local, glob)
    m = block_sparse_mask(torch.arange(12), torch.arange(12), layout, b)
    for q in range(12):
        for k in range(12):
            qb, kb = q // b, k // b
            assert bool(m[q, k]) == (k <= q and (qb - kb < local or kb < glob)), (q, k)


def test_alibi_slopes_of_the_paper():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))
    # Not a power of two: the 8-head slopes, then every other slope of the 16-head set (2^-0.5, 2^-1.5, ...).
    twelve = alibi_slopes(12)
    torch.testing.assert_close(twelve[:8], alibi_slopes(8))
    torch.testing.assert_close(twelve[8:], torch.tensor([2 ** -(0.5 + i) for i in range(4)]))
    bias = alibi_bias(2, torch.arange(3, 5), torch.arange(5))  # (H, 2, 5)
    assert bias[1, 0, 1] == pytest.approx(-alibi_slopes(2)[1] * 2)
    assert bias[0, 1, 4] == 0


def test_alibi_reference_matches_a_loop():
    # Guards the reference itself: softmax(q.k / sqrt(D) - slope * distance) over visible keys, per element.
    q, k, v = _qkv(5, q_start=2, H=2, H_kv=1, B=1)
    out = reference_attention(q, k, v, q_start=2, window=4, variant=SPECS["alibi"])
    slopes = alibi_slopes(2).double()
    for h in range(2):
        for i in range(5):
            p = 2 + i
            keys = range(max(0, p - 3), p + 1)
            w = torch.stack([q[0, h, i] @ k[0, 0, j] / math.sqrt(D) - slopes[h] * (p - j) for j in keys]).softmax(0)
            expected = sum(w[n] * v[0, 0, j] for n, j in enumerate(keys))
            torch.testing.assert_close(out[0, h, i], expected)


# ---- fast paths against the dense reference --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("q_start, S", [(0, 17), (9, 8), (16, 1)])
@pytest.mark.parametrize("chunk", [4, 5, 64])
def test_chunked_equals_reference(name, q_start, S, chunk):
    spec, window = SPECS[name], WINDOWS.get(name)
    q, k, v = _qkv(S, q_start)
    ref = reference_attention(q, k, v, q_start=q_start, window=window, variant=spec)
    out = chunked_attention(q, k, v, q_start=q_start, window=window, spec=spec, chunk=chunk)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("q_start, S", [(0, 17), (9, 8), (16, 1)])
def test_attention_dispatch_equals_reference(name, q_start, S):
    # attention() with a variant: sparse fast paths at prefill, the masked SDPA for decode / continuation.
    spec, window = SPECS[name], WINDOWS.get(name)
    q, k, v = _qkv(S, q_start, seed=1)
    ref = reference_attention(q, k, v, q_start=q_start, window=window, variant=spec)
    torch.testing.assert_close(attention(q, k, v, q_start=q_start, window=window, variant=spec), ref,
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["dilated", "block_sparse", "alibi"])
def test_variant_with_window_and_documents(name):
    spec = SPECS[name]
    q, k, v = _qkv(14, seed=2)
    doc_ids = torch.tensor([[0] * 6 + [1] * 8, [0] * 14])
    ref = reference_attention(q, k, v, window=5, doc_ids=doc_ids, variant=spec)
    torch.testing.assert_close(attention(q, k, v, window=5, doc_ids=doc_ids, variant=spec), ref, atol=1e-12, rtol=0)
    out = chunked_attention(q, k, v, window=5, doc_ids=doc_ids, spec=spec, chunk=4)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("T", [3, 16, 21, 40])  # shorter than, equal to and not a multiple of the segments
def test_dilated_fast_path(T):
    segments, rates = (4, 8, 16), (1, 2, 4)
    spec = AttentionConfig(variant="dilated", segment_lengths=segments, dilation_rates=rates)
    q, k, v = _qkv(T, H=6, H_kv=3, seed=T)
    out = dilated_attention(q, k, v, segments, rates)
    torch.testing.assert_close(out, reference_attention(q, k, v, variant=spec), atol=1e-12, rtol=0)


def test_dilated_mixture_is_not_one_pattern():
    # The denominators' weighting matters: the mix differs from each single pattern.
    q, k, v = _qkv(16, seed=3)
    mixed = dilated_attention(q, k, v, (4, 16), (1, 4))
    assert not torch.allclose(mixed, dilated_attention(q, k, v, (4,), (1,)), atol=1e-3)
    assert not torch.allclose(mixed, dilated_attention(q, k, v, (16,), (4,)), atol=1e-3)


@pytest.mark.parametrize("T, b", [(12, 3), (13, 4), (5, 8)])
@pytest.mark.parametrize("backend", ["gather", "flex"])
def test_block_sparse_fast_paths(T, b, backend):
    layout = block_layout(-(-T // b), -(-T // b), local_blocks=2, global_blocks=1)
    if layout.shape[0] > 2:
        layout[-1, 0] = False  # any layout works, not only local + global
    q, k, v = _qkv(T, dtype=torch.float32, seed=T)
    pos = torch.arange(T)
    mask = block_sparse_mask(pos, pos, layout, b)  # the dense reference of this custom layout
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    ref = ((q @ kk.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, float("-inf")).softmax(-1)) @ vv
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FlexAttention without torch.compile warns (eager: same math, unfused)
        out = block_sparse_attention(q, k, v, layout, b, backend=backend)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_block_sparse_layout_needs_its_diagonal():
    q, k, v = _qkv(8, dtype=torch.float32)
    with pytest.raises(ValueError):
        block_sparse_attention(q, k, v, torch.zeros(2, 2, dtype=torch.bool), 4)


def test_variants_change_the_result():
    # Guards against a variant that is silently ignored.
    q, k, v = _qkv(24, seed=4)
    full = attention(q, k, v)
    for name, spec in SPECS.items():
        if name == "causal":
            continue
        out = attention(q, k, v, window=WINDOWS.get(name), variant=spec)
        assert not torch.allclose(out, full, atol=1e-3), name


@pytest.mark.parametrize("name", ["causal", "dilated", "alibi"])
def test_chunked_gradients_equal_reference(name):
    spec = SPECS[name]
    q, k, v = (t.requires_grad_() for t in _qkv(11, seed=5))
    grads = []
    for fn in (lambda: reference_attention(q, k, v, variant=spec),
               lambda: chunked_attention(q, k, v, spec=spec, chunk=4)):
        out = fn()
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_chunked_float32_and_bfloat16():
    q, k, v = _qkv(20, dtype=torch.float32, seed=6)
    ref = reference_attention(q, k, v)
    torch.testing.assert_close(chunked_attention(q, k, v, chunk=6), ref, atol=1e-5, rtol=0)
    out = chunked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), chunk=6)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=0)


def test_config_validation():
    with pytest.raises(LongseqError):
        AttentionConfig(variant="sparse")
    with pytest.raises(LongseqError):
        AttentionConfig(variant="dilated", segment_lengths=(6,), dilation_rates=(4,))  # 6 is no multiple of 4
    with pytest.raises(LongseqError):
        AttentionConfig(segment_lengths=(4, 8), dilation_rates=(1,))
    with pytest.raises(LongseqError):
        AttentionConfig(block_size=0)
