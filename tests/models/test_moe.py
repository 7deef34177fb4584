"""The expert compute (models/moe.py): sorted by expert, as a padded bmm or torch's grouped GEMM, equals the
per-expert loop forward and backward; routing as transformers routes."""

import pytest
import torch

from longseq.models import moe

E, D, W, T, K = 6, 16, 24, 20, 2  # d and the expert width W multiples of 8: the grouped GEMM's 16-byte bf16 strides


def _inputs(dtype, seed=0, skip_expert=True):
    """Tokens (T, d), their top-k experts and weights, stacked expert weights; expert 5 gets no token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=dtype)
    logits = torch.randn(T, E, generator=g, dtype=dtype)
    if skip_expert:
        logits[:, -1] = -1e4
    weights, ids = moe.route(logits, K, normalize=True)
    gate_up = torch.randn(E, 2 * W, D, generator=g, dtype=dtype) / D**0.5
    down = torch.randn(E, D, W, generator=g, dtype=dtype) / W**0.5
    return x, ids, weights.to(dtype), gate_up, down


def _run(mode, x, ids, weights, gate_up, down, device="cpu", dtype=None):
    """Output and the gradients of x, weights, gate_up, down for a fixed upstream gradient."""
    leaves = [t.detach().to(device, dtype or t.dtype).requires_grad_() for t in (x, weights, gate_up, down)]
    out = moe.experts(leaves[0], ids.to(device), leaves[1], leaves[2], leaves[3], mode=mode)
    grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=device).view_as(out)
    out.backward(grad)
    return [out.detach().cpu().double()] + [t.grad.cpu().double() for t in leaves]


def test_padded_matches_loop_forward_and_backward():
    inputs = _inputs(torch.float64)
    assert not (inputs[1] == E - 1).any()  # an expert without tokens: an empty group
    for ours, ref in zip(_run("padded", *inputs), _run("loop", *inputs), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_one_expert_takes_every_token():
    x, _, _, gate_up, down = _inputs(torch.float64)
    ids = torch.tensor([[2, 4]]).expand(T, K).contiguous()
    weights = torch.full((T, K), 0.5, dtype=torch.float64)
    for ours, ref in zip(_run("padded", x, ids, weights, gate_up, down),
                         _run("loop", x, ids, weights, gate_up, down), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def _grouped_mm_devices():
    devices = ["cuda"] if torch.cuda.is_available() else []
    try:  # recent torch also runs the grouped GEMM on CPU tensors in bf16
        x, ids, weights, gate_up, down = _inputs(torch.bfloat16)
        moe.experts(x, ids, weights, gate_up, down, mode="grouped_mm")
        devices.append("cpu")
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    return devices


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_grouped_mm_matches_loop_forward_and_backward(device):
    if device not in _grouped_mm_devices():
        pytest.skip(f"torch's grouped GEMM does not run on {device} here")
    inputs = _inputs(torch.float32)
    ours = _run("grouped_mm", *inputs, device=device, dtype=torch.bfloat16)
    ref = _run("loop", *inputs, device=device)  # float32
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * b.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_takes_grouped_mm_for_bf16_on_gpu():
    x, _, _, gate_up, down = (t.cuda() for t in _inputs(torch.bfloat16))
    capable = torch.cuda.get_device_capability()[0] >= 8
    assert moe.grouped_mm_runs(x, gate_up, down) == (capable and moe._GROUPED_MM is not None)
    assert not moe.grouped_mm_runs(x.float(), gate_up.float(), down.float())


def test_auto_runs_the_loop_on_cpu():
    x, _, _, gate_up, down = _inputs(torch.bfloat16)
    assert not moe.grouped_mm_runs(x, gate_up, down)


def test_route_renormalised_top_k_is_a_softmax_over_the_top_k_logits():
    # Mixtral's reference implementation: top k of the logits, then a softmax over those k.
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    weights, ids = moe.route(logits, K, normalize=True)
    top, top_ids = logits.topk(K, dim=-1)
    assert torch.equal(ids, top_ids)
    torch.testing.assert_close(weights, top.softmax(-1).float())
    raw, _ = moe.route(logits, K, normalize=False)  # Qwen without norm_topk_prob: the plain probabilities
    torch.testing.assert_close(raw, logits.softmax(-1).gather(1, ids).float())
    assert weights.dtype == raw.dtype == torch.float32


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="MoE implementation"):
        moe.experts(*_inputs(torch.float32), mode="megablocks")


def _run_lora(mode, x, ids, weights, gate_up, down, adapters, device="cpu", dtype=None):
    """Output and the gradients of x, weights and the adapters' A, B with frozen expert weights (LoRA)."""
    to = lambda t: t.detach().to(device, dtype or t.dtype)  # noqa: E731
    leaves = [to(t).requires_grad_() for t in (x, weights, *adapters)]
    gate_up_adapter = moe.ExpertAdapter(leaves[2], leaves[3], 0.5)
    down_adapter = moe.ExpertAdapter(leaves[4], leaves[5], 0.5)
    out = moe.experts(leaves[0], ids.to(device), leaves[1], to(gate_up), to(down), mode=mode,
                      adapters=(gate_up_adapter, down_adapter))
    grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=device).view_as(out)
    out.backward(grad)
    return [out.detach().cpu().double()] + [t.grad.cpu().double() for t in leaves]


def _adapters(dtype, r=8):
    g = torch.Generator().manual_seed(7)
    shapes = [(E, D, r), (E, r, 2 * W), (E, W, r), (E, r, D)]  # A (E, in, r), B (E, r, out) per projection
    return [torch.randn(*s, generator=g, dtype=dtype) / s[1] ** 0.5 for s in shapes]


def test_lora_adapters_padded_match_loop_forward_and_backward():
    inputs, adapters = _inputs(torch.float64), _adapters(torch.float64)
    for ours, ref in zip(_run_lora("padded", *inputs, adapters), _run_lora("loop", *inputs, adapters), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_lora_adapters_grouped_mm_match_loop(device):
    if device not in _grouped_mm_devices():
        pytest.skip(f"torch's grouped GEMM does not run on {device} here")
    inputs, adapters = _inputs(torch.float32), _adapters(torch.float32)
    ours = _run_lora("grouped_mm", *inputs, adapters, device=device, dtype=torch.bfloat16)
    ref = _run_lora("loop", *inputs, adapters, device=device)  # float32
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * b.abs().max().item())


def test_packed_nf4_experts_equal_their_dequantized_weights():
    from longseq.train.nf4 import to_nf4_weight

    x, ids, weights, gate_up, down = _inputs(torch.float32)
    packed = [moe.PackedExperts(to_nf4_weight(w.reshape(-1, w.shape[-1])), tuple(w.shape)) for w in (gate_up, down)]
    dense = [moe.dense(p, torch.float32) for p in packed]
    for mode in ("loop", "padded"):
        ours = moe.experts(x, ids, weights, *packed, mode=mode)
        torch.testing.assert_close(ours, moe.experts(x, ids, weights, *dense, mode="loop"), rtol=1e-6, atol=1e-6)
