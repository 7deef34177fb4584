"""FlashAttention-4 path (attention/flash.py): when it is chosen, how its arguments are built, and (on a Hopper or
Blackwell GPU with flash-attn-4 installed) that it equals SDPA."""

import math

import pytest
import torch

from longseq.attention import attention, flash, reference_attention
from longseq.config import AttentionConfig, ModelOverrides
from longseq.errors import LongseqError


def _fa_semantics(q, k, v, left):
    """What FlashAttention documents for causal=True, window_size=(left, 0) on one sequence: query i sees keys
    i - left .. i (left None: 0 .. i). q (S, H, D), k/v (S, H_kv, D) -> (S, H, D), float32 loops."""
    S, H, D = q.shape
    group = H // k.shape[1]
    out = torch.empty(S, H, D)
    for h in range(H):
        for i in range(S):
            lo = 0 if left is None else max(0, i - left)
            keys, vals = k[lo : i + 1, h // group].float(), v[lo : i + 1, h // group].float()
            out[i, h] = (keys @ q[i, h].float() / math.sqrt(D)).softmax(-1) @ vals
    return out.to(q.dtype)


class FakeFA4:
    """flash_attn.cute's two entry points, as their docstrings specify them, for the CPU tests of the glue."""

    def __init__(self):
        self.calls = []

    def func(self, q, k, v, *, causal, window_size):
        assert causal and window_size[1] is None and q.dim() == 4
        self.calls.append(("dense", q.shape))
        out = torch.stack([_fa_semantics(q[b], k[b], v[b], window_size[0]) for b in range(q.shape[0])])
        return out, None

    def varlen(self, q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_size):
        assert causal and q.dim() == 3 and cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q is cu_seqlens_k
        cu = cu_seqlens_q.tolist()
        docs = list(zip(cu[:-1], cu[1:], strict=True))
        assert cu[0] == 0 and cu[-1] == q.shape[0] and max_seqlen_q == max_seqlen_k == max(b - a for a, b in docs)
        self.calls.append(("varlen", tuple(cu)))
        out = torch.cat([_fa_semantics(q[a:b], k[a:b], v[a:b], window_size[0]) for a, b in docs])
        return out, None


@pytest.fixture
def fake(monkeypatch):
    f = FakeFA4()
    monkeypatch.setattr(flash, "supported", lambda device, dtype, head_dim: None)
    monkeypatch.setattr(flash, "_kernel", lambda: (f.func, f.varlen))
    return f


def _qkv(B=2, S=13, H=4, H_kv=2, D=8, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    # (B, H, S, D) views of (B, S, H, D) tensors, as the projections make them
    q, k, v = (torch.randn(B, S, h, D, generator=g).transpose(1, 2) for h in (H, H_kv, H_kv))
    return tuple(t.requires_grad_() for t in (q, k, v)) if grad else (q, k, v)


@pytest.mark.parametrize("window", [None, 1, 4])
def test_causal_arguments(fake, window):
    q, k, v = _qkv()
    out = attention(q, k, v, window=window)
    assert fake.calls == [("dense", (2, 13, 4, 8))]  # the projections' layout, K/V heads not expanded
    torch.testing.assert_close(out, reference_attention(q, k, v, window=window), atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [None, 3])
def test_packed_documents_in_one_varlen_call(fake, window):
    q, k, v = _qkv(S=19)
    doc_ids = torch.tensor([[0] * 5 + [1] * 9 + [2] * 5, [7] * 19])
    out = attention(q, k, v, window=window, doc_ids=doc_ids)
    # every document of every row, the second row starting one of its own although its id continues nothing
    assert fake.calls == [("varlen", (0, 5, 14, 19, 38))]
    torch.testing.assert_close(out, reference_attention(q, k, v, window=window, doc_ids=doc_ids), atol=1e-5, rtol=0)
    # the bounds are worked out once per doc_ids tensor (one host sync a step, not one a layer)
    assert flash._document_bounds(doc_ids) is flash._document_bounds(doc_ids)
    other = doc_ids.clone()
    other[1, 10:] = 8
    attention(q, k, v, window=window, doc_ids=other)
    assert fake.calls[-1] == ("varlen", (0, 5, 14, 19, 29, 38))


def test_long_training_attention_groups_call_fa4_per_group(fake, monkeypatch):
    from longseq.config import policy

    monkeypatch.setattr(policy, "ATTENTION_GROUP_TOKENS", 8)
    q, k, v = _qkv(grad=True)
    attention(q, k, v)
    assert fake.calls == [("dense", (2, 13, 2, 8))] * 2  # 2 KV heads: 2 groups of 2 query heads and 1 KV head


def test_decode_and_chunked_prefill_stay_on_sdpa(fake):
    q, k, v = _qkv(S=13)
    attention(q[:, :, -1:], k, v, q_start=12)  # decode
    attention(q[:, :, -4:], k, v, q_start=9)  # a chunk after a cached prefix
    assert fake.calls == []


def test_sdpa_kernel_choice_skips_fa4(fake):
    q, k, v = _qkv()
    out = attention(q, k, v, variant=AttentionConfig(kernel="sdpa"))
    assert fake.calls == []
    torch.testing.assert_close(out, reference_attention(q, k, v), atol=1e-5, rtol=0)


def test_cpu_uses_sdpa_and_fa4_insists_with_a_reason():
    q, k, v = _qkv()
    assert not flash.use_flash(q, "auto") and not flash.use_flash(q, "sdpa")
    with pytest.raises(LongseqError, match="fa4: it runs on CUDA GPUs only"):
        attention(q, k, v, variant=AttentionConfig(kernel="fa4"))
    torch.testing.assert_close(attention(q, k, v, variant=AttentionConfig()), reference_attention(q, k, v),
                               atol=1e-5, rtol=0)


def test_unsupported_inputs_have_reasons():
    cuda = torch.device("cuda")
    assert flash.supported(torch.device("cpu"), torch.bfloat16, 128) == "it runs on CUDA GPUs only"
    assert flash.supported(cuda, torch.float32, 128) == "it takes float16 or bfloat16, not torch.float32"
    assert flash.supported(cuda, torch.bfloat16, 100) == "head_dim 100 is not a multiple of 8 up to 256"
    assert flash.supported(cuda, torch.float16, 512) == "head_dim 512 is not a multiple of 8 up to 256"


def test_describe_names_the_kernel_and_fa4_insists(fake):
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert flash.describe("auto", True, cuda, bf16, 128) == "FlashAttention-4"
    assert flash.describe("sdpa", True, cuda, bf16, 128) == "PyTorch SDPA"
    assert flash.describe("auto", False, cuda, bf16, 128) == "PyTorch SDPA"  # dilated, ALiBi, ...: their own paths
    with pytest.raises(LongseqError, match="fa4: it runs plain causal attention, not attention variants"):
        flash.describe("fa4", False, cuda, bf16, 128)


def test_kernel_is_validated_and_set_by_overrides():
    from longseq.models.overrides import apply_overrides
    from tiny_models import random_model

    with pytest.raises(LongseqError, match="unknown attention kernel 'fa3'"):
        AttentionConfig(kernel="fa3")
    with pytest.raises(LongseqError, match="attention_kernel must be one of auto, sdpa, fa4"):
        ModelOverrides(attention_kernel="flash")
    model = random_model(0)
    apply_overrides(model, ModelOverrides(attention_kernel="sdpa"))
    assert model.config.attention.kernel == "sdpa"
    assert all(layer.self_attn.variant.kernel == "sdpa" for layer in model.model.layers)


# -- on the GPU ---------------------------------------------------------------------------------------------------
def _fa4_here() -> bool:
    return torch.cuda.is_available() and flash.why_not("auto", torch.device("cuda"), torch.bfloat16, 128) is None


@pytest.mark.skipif(not _fa4_here(), reason="needs flash-attn-4 on a Hopper or Blackwell GPU")
@pytest.mark.parametrize("case", ["causal", "window", "documents", "groups"])
def test_fa4_equals_sdpa_on_gpu(case, monkeypatch):
    from longseq.config import policy

    if case == "groups":
        monkeypatch.setattr(policy, "ATTENTION_GROUP_TOKENS", 512)
    g = torch.Generator(device="cuda").manual_seed(0)
    B, S, H, H_kv, D = 2, 1000, 8, 2, 128
    qkv = [torch.randn(B, S, h, D, generator=g, device="cuda", dtype=torch.bfloat16) for h in (H, H_kv, H_kv)]
    dout = torch.randn(B, H, S, D, generator=g, device="cuda", dtype=torch.bfloat16)
    window = 300 if case == "window" else None
    doc_ids = torch.tensor([[0] * 300 + [1] * 500 + [2] * 200, [0] * 1000], device="cuda") \
        if case == "documents" else None
    results = []
    for kernel in ("fa4", "sdpa"):
        q, k, v = (t.clone().transpose(1, 2).requires_grad_() for t in qkv)
        out = attention(q, k, v, window=window, doc_ids=doc_ids, variant=AttentionConfig(kernel=kernel))
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    ref = reference_attention(*(t.transpose(1, 2).float() for t in qkv), window=window, doc_ids=doc_ids)
    for got, want in zip(results[0], results[1], strict=True):  # bf16 kernels: within bf16 rounding of each other
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(results[0][0].float(), ref, atol=1e-2, rtol=1e-2)
