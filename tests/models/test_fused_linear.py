"""CausalLM.fuse_projections: q/k/v and gate/up as one matmul each in inference gives the same logits as the
separate layers, keeps the parameters (now views of the fused weights) and their names, never takes the fused
path under autograd, and leaves layers that are not plain nn.Linear alone; single rows take the Triton GEMV where
calibration chose it."""

import os

import pytest
import torch
from torch import nn

from longseq.models import fused
from tiny_models import random_model

ON_GPU = os.environ.get("LONGSEQ_TEST_CUDA") == "1" and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"  # the Triton kernels need CUDA tensors unless interpreted (CI)
TOL = 1e-4 if ON_GPU else 1e-5  # cuBLAS may pick another fp32 algorithm for the wider matmul


def _storage_within(param: torch.Tensor, buffer: torch.Tensor) -> bool:
    start = buffer.data_ptr()
    return start <= param.data_ptr() < start + buffer.numel() * buffer.element_size()


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("kernels", ["0", "1"])  # eager SwiGLU / RoPE, and the Triton kernels on strided halves
def test_fused_projections_equal_separate_ones(monkeypatch, qkv_bias, kernels):
    monkeypatch.setattr(fused, "MODE", kernels)
    model = random_model(4, qkv_bias=qkv_bias).to(DEVICE)
    if qkv_bias:
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.bias.data.normal_(0, 0.2)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(ids)
        model.fuse_projections()
        got = model(ids)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.qkv is not None and mlp.gate_up is not None
    assert (attn.qkv.bias is not None) == qkv_bias
    assert torch.allclose(got, expected, atol=TOL, rtol=TOL)
    # Same names and values; the separate weights now live inside the fused buffers.
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(_storage_within(p.weight, attn.qkv.weight) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert all(_storage_within(p.weight, mlp.gate_up.weight) for p in (mlp.gate_proj, mlp.up_proj))
    # Writing a parameter (a checkpoint load) writes through to the fused weight.
    with torch.no_grad():
        attn.k_proj.weight.mul_(0)
        assert not torch.allclose(model(ids), expected, atol=1e-3)
    model.fuse_projections(False)
    assert attn.qkv is None and mlp.gate_up is None


def test_autograd_sees_the_separate_layers():
    model = random_model(5).double()
    model.fuse_projections()
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    model(ids).sum().backward()
    for layer in model.model.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
            assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_wrapped_layers_stay_separate():
    class Wrapped(nn.Linear):  # what a LoRA or quantized layer looks like to the fuser: not a plain nn.Linear
        pass

    model = random_model(6)
    attn = model.model.layers[0].self_attn
    old = attn.k_proj
    attn.k_proj = Wrapped(old.in_features, old.out_features, bias=False)
    attn.k_proj.weight.data.copy_(old.weight)
    model.model.layers[1].mlp.up_proj.register_forward_hook(lambda *a: None)
    model.fuse_projections()
    assert attn.qkv is None and model.model.layers[0].mlp.gate_up is not None
    assert model.model.layers[1].self_attn.qkv is not None and model.model.layers[1].mlp.gate_up is None


@pytest.mark.parametrize("N,K,bias", [(37, 48, False), (64, 100, True), (1, 16, False)])
def test_gemv_kernel_equals_linear(N, K, bias):
    """The Triton GEMV (interpreted in CI): output rows and K not multiples of its blocks, with and without bias."""
    from longseq.models.kernels.gemv import gemv

    g = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=g).to(DEVICE)
    b = torch.randn(N, generator=g).to(DEVICE) if bias else None
    x = torch.randn(1, 1, K, generator=g).to(DEVICE)
    got = gemv(x, w, b)
    assert got.shape == (1, 1, N)
    assert torch.allclose(got, torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4)


def test_single_rows_take_the_gemv_when_told(monkeypatch):
    from longseq.models.kernels import gemv as gemv_module

    model = random_model(7).to(DEVICE)
    layers = model.fuse_projections()
    assert len(layers) == 4 * len(model.model.layers) + 1  # qkv, o, gate_up, down per layer; the LM head
    calls = []
    real = gemv_module.gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda *a: calls.append(a[0].shape) or real(*a))
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        expected_prefill, expected_step = model(ids[:, :5]), model(ids[:, 5:])
        for layer in layers:
            layer.gemv = True
        prefill, step = model(ids[:, :5]), model(ids[:, 5:])
    assert len(calls) == len(layers)  # the one-token pass only, once per layer
    assert torch.equal(prefill, expected_prefill)  # five rows: cuBLAS as before
    assert torch.allclose(step, expected_step, atol=TOL, rtol=TOL)


@pytest.mark.skipif(not ON_GPU, reason="times kernels on a GPU")
def test_calibration_times_each_shape_once():
    from longseq.models.fused_linear import calibrate

    model = random_model(8, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2).to(
        DEVICE, torch.bfloat16)
    layers = model.fuse_projections()
    report = calibrate(layers)
    assert set(report) == {"512x256", "256x256", "1024x256", "256x512", "97x256"}
    assert all(v["cublas_us"] > 0 and v["triton_us"] > 0 for v in report.values())
    assert all(m.gemv == report[f"{m.weight.shape[0]}x{m.weight.shape[1]}"]["triton"] for m in layers)
