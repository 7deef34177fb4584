"""FP8 linear layers: weight and per-token quantization, torch._scaled_mm and the Triton quantizer against the
dequantize-then-matmul reference, fused projections, a whole model, and the one-line refusal on GPUs without FP8."""

import pytest
import torch
from torch import nn

from fp8_helpers import DEVICE, ON_GPU, assert_same_e4m3, tame_model
from longseq.errors import LongseqError
from longseq.models.quant import FusedQuantLinear, fp8, quantize_model
from longseq.models.quant.fp8 import FP8, Fp8Linear


def test_weight_quantization_is_per_channel_and_within_half_an_e4m3_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * torch.logspace(-3, 2, 48).unsqueeze(1)  # channels of very unequal range
    w[5] = 0.0  # an all-zero channel stays zero
    wq, scale = fp8.quantize_weight(w)
    assert wq.dtype == FP8 and scale.shape == (48,)
    assert torch.equal(wq.float().abs().amax(1)[torch.arange(48) != 5], torch.full((47,), 448.0))
    back = fp8.dequantize(wq, scale)
    assert torch.equal(back[5], torch.zeros(64))
    # e4m3 keeps 3 mantissa bits: a normal value is within 2^-4 of itself, a subnormal within 2^-10 of the scale
    assert ((back - w).abs() <= w.abs() * 2**-4 + scale[:, None] * 2**-10).all()


def test_row_quantization_scales_each_token():
    x = torch.randn(7, 40, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 8).unsqueeze(1).float()
    xq, s = fp8.quantize_rows(x)
    assert xq.shape == (7, 40) and s.shape == (7, 1)
    torch.testing.assert_close(s[:, 0], x.abs().amax(1) / 448)
    assert ((xq.float() * s - x).abs() <= x.abs() * 2**-4 + s * 2**-10).all()


def test_triton_row_quantization_equals_torch():
    pytest.importorskip("triton")
    from longseq.models.quant.fp8_kernel import quantize_rows_triton

    x = torch.randn(5, 1500, generator=torch.Generator().manual_seed(0)) * 3  # two 1024-wide tiles, one masked
    x[2] = 0.0
    q, s = quantize_rows_triton(x.to(DEVICE))
    ref_q, ref_s = fp8.quantize_rows(x)
    torch.testing.assert_close(s.cpu(), ref_s)
    assert_same_e4m3(q.cpu(), ref_q)


@pytest.mark.parametrize("bias", [False, True])
def test_scaled_mm_equals_reference(bias):
    """torch._scaled_mm with row-wise scales (the GPU path; PyTorch 2.13 runs it on CPU too, exactly, in float32)
    against dequantize-then-matmul: the same product of the same rounded values."""
    g = torch.Generator().manual_seed(1)
    layer = Fp8Linear.quantize(torch.randn(32, 48, generator=g), torch.randn(32, generator=g) if bias else None)
    x = torch.randn(3, 5, 48, generator=g)
    ref = fp8.reference_linear(x, layer.weight, layer.weight_scale, layer.bias)
    if ON_GPU:  # bf16 activations and output
        layer, x = layer.to(DEVICE), x.to(DEVICE, torch.bfloat16)
        ref = fp8.reference_linear(x.float(), layer.weight, layer.weight_scale, layer.bias)
    out = fp8.scaled_mm_linear(x, layer.weight, layer.weight_scale, layer.bias)
    assert out.shape == (3, 5, 32)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2 if ON_GPU else 1e-5, atol=2e-2 if ON_GPU else 1e-5)
    assert fp8.scaled_mm_linear(x[:, :0], layer.weight, layer.weight_scale).shape == (3, 0, 32)


def test_single_row_gemv_equals_weight_only_reference():
    """Batch-1 decode: the e4m3 weights times the unrounded activation, per-channel scales after the sum."""
    pytest.importorskip("triton")
    from longseq.models.quant.fp8_kernel import fp8_gemv

    g = torch.Generator().manual_seed(6)
    layer = Fp8Linear.quantize(torch.randn(80, 1100, generator=g))  # a partial tile of rows and of inputs
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x = torch.randn(1, 1100, generator=g).to(dtype)
    ref = x.float() @ layer.dequantized().t()
    out = fp8_gemv(x.to(DEVICE), layer.weight.to(DEVICE), layer.weight_scale.to(DEVICE))
    assert out.dtype == dtype and out.shape == (80,)
    assert (out.float().cpu() - ref[0]).norm() / ref.norm() < (1e-2 if ON_GPU else 1e-5)


def test_fp8_linear_is_close_to_the_float_layer():
    g = torch.Generator().manual_seed(2)
    linear = nn.Linear(128, 64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 128, generator=g) * 0.05)
    x = torch.randn(4, 128, generator=g)
    ref = linear(x)
    out = Fp8Linear.quantize(linear.weight.detach(), linear.bias.detach())(x)
    assert (out - ref).norm() / ref.norm() < 0.05


def test_fused_fp8_equals_separate_layers():
    g = torch.Generator().manual_seed(3)
    layers = [Fp8Linear.quantize(torch.randn(n, 64, generator=g), torch.randn(n, generator=g)) for n in (32, 16, 16)]
    x = torch.randn(2, 3, 64, generator=g)
    separate = [layer(x) for layer in layers]
    fused = Fp8Linear.fused(layers)
    assert isinstance(fused, FusedQuantLinear)
    for a, b in zip(fused(x), separate, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert layers[1].weight.data_ptr() == fused.layer.weight[32:].data_ptr()  # views: no second copy


def test_quantized_model_logits_stay_close():
    model, ids = tame_model(0)
    with torch.no_grad():
        ref = model(ids)
        quantize_model(model, "fp8")
        assert model.quantization == "fp8"
        assert type(model.model.layers[0].self_attn.q_proj) is Fp8Linear and type(model.lm_head) is nn.Linear
        out = model(ids)
        fused = model.fuse_projections()
        assert any(isinstance(f, FusedQuantLinear) for f in fused)
        torch.testing.assert_close(model(ids), out, rtol=1e-5, atol=1e-5)
    assert (out - ref).norm() / ref.norm() < 0.1  # random data: each e4m3 rounding is ~2% of a value


def test_gpu_without_fp8_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(LongseqError, match=r"fp8 needs FP8 tensor cores .* A100-SXM4-80GB is 8\.0") as e:
        fp8.check_device(torch.device("cuda", 0))
    assert "\n" not in str(e.value)
    fp8.check_device(torch.device("cpu"))  # CPU runs the reference path
