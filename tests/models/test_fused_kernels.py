"""The fused RMSNorm / RoPE / SwiGLU kernels (models/kernels/) against the eager reference path, forward and backward:
under Triton's CPU interpreter in CI (conftest sets TRITON_INTERPRET=1), compiled on a GPU with LONGSEQ_TEST_CUDA=1
(there in bfloat16 too; the interpreter mishandles bfloat16)."""

import os

import pytest
import torch
import torch.nn.functional as F

from longseq.models import fused
from longseq.models.rope import apply_rope

ON_GPU = os.environ.get("LONGSEQ_TEST_CUDA") == "1" and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _ref_rms_norm(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _grads(fn, inputs, seed=0):
    """Outputs of fn and the gradients of a random projection of them with respect to every input that needs one."""
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [t for t in inputs if t.requires_grad])
    return [o.detach() for o in outs], grads


def _close(a, b, dtype):
    tol = TOL[dtype]
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        if not x.numel():
            continue
        err = (x.float() - y.float()).abs().max().item()
        assert err <= tol * max(1.0, y.float().abs().max().item()), err


def _leaf(shape, dtype, grad=True, scale=1.0):
    return (torch.randn(shape) * scale).to(DEVICE, dtype).requires_grad_(grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 7, 64), (3, 96), (1, 1, 4096), (0, 32), (5000, 32)])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_rms_norm_matches_reference(dtype, shape, weight_grad):
    from longseq.models.kernels.rms_norm import rms_norm

    torch.manual_seed(0)
    x = _leaf(shape, dtype, scale=3.0)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(DEVICE, dtype).requires_grad_(weight_grad)
    fast = _grads(lambda a, b: rms_norm(a, b, 1e-6), [x, w])
    ref = _grads(lambda a, b: _ref_rms_norm(a, b, 1e-6), [x, w])
    _close(fast[0], ref[0], dtype)
    _close(fast[1], ref[1], dtype)


def test_rms_norm_weight_only_grad_and_fp32_weight_on_low_precision_input():
    """Layer 0 of LongLoRA: a frozen embedding's output needs no grad, the norm's weight does."""
    from longseq.models.kernels.rms_norm import rms_norm

    torch.manual_seed(1)
    x = _leaf((5, 48), torch.float32, grad=False)
    w = (1 + 0.1 * torch.randn(48)).to(DEVICE).requires_grad_(True)
    fast = _grads(lambda a, b: rms_norm(a, b, 1e-5), [x, w])
    ref = _grads(lambda a, b: _ref_rms_norm(a, b, 1e-5), [x, w])
    _close(fast[0] + list(fast[1]), ref[0] + list(ref[1]), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 7, 64), (1, 1, 4096), (0, 32), (300, 48)])
def test_add_rms_norm_matches_add_then_norm(dtype, shape):
    from longseq.models.kernels.rms_norm import add_rms_norm

    torch.manual_seed(4)
    x, delta = _leaf(shape, dtype, grad=False, scale=3.0), _leaf(shape, dtype, grad=False)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(DEVICE, dtype)
    h, y = add_rms_norm(x, delta, w, 1e-6)
    assert torch.equal(h, x + delta)  # the residual stream itself is bit-exact
    _close([y], [_ref_rms_norm(x + delta, w, 1e-6)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 96), (1, 3000), (0, 8)])
def test_swiglu_matches_reference(dtype, shape):
    from longseq.models.kernels.swiglu import swiglu

    torch.manual_seed(0)
    gate, up = _leaf(shape, dtype, scale=3.0), _leaf(shape, dtype)
    fast = _grads(swiglu, [gate, up])
    ref = _grads(lambda g, u: F.silu(g) * u, [gate, up])
    _close(fast[0], ref[0], dtype)
    _close(fast[1], ref[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 2 * 96), (1, 1, 2 * 3000), (4, 2 * 7)])
def test_swiglu_reads_the_halves_of_one_gate_up_matmul(dtype, shape):
    """gate and up as column halves of one fused projection's output: the kernel reads them in place (strided
    rows), forward and backward, and gives what it gives on contiguous copies."""
    from longseq.models.kernels.swiglu import _row_stride, swiglu

    torch.manual_seed(3)
    gate_up = _leaf(shape, dtype, scale=3.0)
    gate, up = gate_up.chunk(2, dim=-1)
    assert _row_stride(gate) == _row_stride(up)
    if gate.numel() > gate.shape[-1]:  # several rows: really read in place, row stride = the fused width
        assert not gate.is_contiguous() and _row_stride(gate) == shape[-1]
    fast = _grads(lambda t: swiglu(*t.chunk(2, dim=-1)), [gate_up])
    ref = _grads(lambda t: F.silu(t.chunk(2, dim=-1)[0]) * t.chunk(2, dim=-1)[1], [gate_up])
    _close(fast[0], ref[0], dtype)
    _close(fast[1], ref[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,H,H_kv,D", [(2, 9, 4, 2, 16), (1, 3, 3, 1, 80), (1, 1, 32, 8, 128)])
def test_rope_matches_reference(dtype, B, S, H, H_kv, D):
    from longseq.models.kernels.rope import rope

    torch.manual_seed(0)
    q, k = _leaf((B, S, H, D), dtype), _leaf((B, S, H_kv, D), dtype)
    angles = torch.rand(B, S, D // 2) * 6.3
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(DEVICE, dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(DEVICE, dtype)

    def reference(a, b):  # apply_rope takes (B, H, S, D)
        ra, rb = apply_rope(a.transpose(1, 2), cos, sin), apply_rope(b.transpose(1, 2), cos, sin)
        return ra.transpose(1, 2), rb.transpose(1, 2)

    fast = _grads(lambda a, b: rope(a, b, cos, sin), [q, k])
    ref = _grads(reference, [q, k])
    _close(fast[0], [t.contiguous() for t in ref[0]], dtype)
    _close(fast[1], ref[1], dtype)


def test_rope_reads_strided_projections_and_broadcast_tables():
    """q and k as views of one fused projection output, cos/sin shared by the batch (stride 0)."""
    from longseq.models.kernels.rope import rope

    torch.manual_seed(2)
    B, S, H, H_kv, D = 2, 6, 4, 2, 32
    qkv = torch.randn(B, S, (H + 2 * H_kv) * D, device=DEVICE)
    q = qkv[..., : H * D].view(B, S, H, D)
    k = qkv[..., H * D : (H + H_kv) * D].view(B, S, H_kv, D)
    angles = torch.rand(1, S, D // 2) * 6.3
    cos, sin = (torch.cat([f(angles), f(angles)], -1).to(DEVICE).expand(B, S, D) for f in (torch.cos, torch.sin))
    got_q, got_k = rope(q, k, cos, sin)
    assert torch.allclose(got_q, apply_rope(q.transpose(1, 2), cos, sin).transpose(1, 2), atol=1e-5)
    assert torch.allclose(got_k, apply_rope(k.transpose(1, 2), cos, sin).transpose(1, 2), atol=1e-5)


def test_model_takes_the_kernels_only_where_active(monkeypatch):
    x = torch.randn(3, 8)
    monkeypatch.setattr(fused, "MODE", "auto")
    assert fused.active(x) == x.is_cuda
    monkeypatch.setattr(fused, "MODE", "1")
    assert fused.active(x) and not fused.active(x.double())
    monkeypatch.setattr(fused, "MODE", "0")
    assert not fused.active(x.to(DEVICE))


@pytest.mark.parametrize("policy", ["none", "selective", "keep_attention", "full"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_model_with_kernels_equals_reference_model(monkeypatch, policy, qk_norm):
    """The whole model (every norm, RoPE and SwiGLU fused) against its eager self: logits, loss and every gradient,
    under each recompute policy (recompute reruns the kernels inside checkpoints), tiled norms and MLP included."""
    from tiny_models import loss_and_grads, random_model

    model = random_model(3, qk_norm=qk_norm).to(DEVICE)
    model.set_recompute(policy)
    model.set_tiling(16)
    for p in model.parameters():  # randomise the norm weights too, so their gradients are not trivially equal
        if p.dim() == 1:
            p.data.normal_(1.0, 0.1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (2, 40), generator=g).to(DEVICE)
    targets = torch.randint(0, 97, (2, 40), generator=g).to(DEVICE)
    results = {}
    for mode in ("0", "1"):
        monkeypatch.setattr(fused, "MODE", mode)
        with torch.no_grad():
            logits = model(ids[:, :9])
        results[mode] = (logits, *loss_and_grads(model, ids, targets))
    (l0, loss0, g0), (l1, loss1, g1) = results["0"], results["1"]
    assert torch.allclose(l0, l1, atol=1e-5)
    assert torch.allclose(loss0, loss1, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) == len(list(model.parameters()))
    for name in g0:  # float32 round-off: the kernels sum in another order than eager ops
        assert (g0[name] - g1[name]).abs().max() <= 2e-5 * g0[name].abs().max(), name
