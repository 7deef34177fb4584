"""Int8 weight-only layers in the Q8_0 layout: llama.cpp's rounding, the Triton GEMV and one-pass dequantize against
the reference, fused projections and a quantized model's logits."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from fp8_helpers import DEVICE, ON_GPU, tame_model
from longseq.errors import LongseqError
from longseq.models.quant import FusedQuantLinear, int8, quantize_model
from longseq.models.quant.gguf_q8 import unpack_q8_0
from longseq.models.quant.int8 import Int8Linear


def test_rounding_is_llama_cpps_q8_0():
    w = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    w[2, :32] = 0.0  # an all-zero block: d = 0
    w[4, 32:64] = 0.0
    w[4, 32:38] = [127, 0.5, 1.5, 2.5, -0.5, -2.5]  # d = 1: ties, which ggml rounds away from zero
    q, d = int8.quantize_weight(torch.from_numpy(w))
    q_ref, d_ref = unpack_q8_0(quantize(w, GGMLQuantizationType.Q8_0), 6, 128)
    assert q.dtype == torch.int8 and d.dtype == torch.float16 and d.shape == (6, 4)
    np.testing.assert_array_equal(q.numpy(), q_ref)
    np.testing.assert_array_equal(d.numpy(), d_ref)


def test_input_sizes_must_be_whole_blocks():
    with pytest.raises(LongseqError, match="divisible by 32"):
        Int8Linear.quantize(torch.randn(4, 48))


@pytest.mark.parametrize("K", [512, 96])  # 96: blocks past the last whole tile are masked
def test_single_row_gemv_equals_dequantize_then_matmul(K):
    pytest.importorskip("triton")
    from longseq.models.quant.int8_kernel import int8_gemv

    g = torch.Generator().manual_seed(K)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    layer = Int8Linear.quantize(torch.randn(72, K, generator=g))  # 72: a partial tile of rows
    x = torch.randn(1, K, generator=g).to(dtype)
    ref = x.float() @ layer.dequantized().t()
    out = int8_gemv(x.to(DEVICE), layer.qweight.to(DEVICE), layer.scales.to(DEVICE))
    assert out.dtype == dtype and out.shape == (72,)
    assert (out.float().cpu() - ref[0]).norm() / ref.norm() < (1e-2 if ON_GPU else 1e-5)


@pytest.mark.parametrize("K", [256, 96])
def test_one_pass_dequantize_equals_the_reference(K):
    pytest.importorskip("triton")
    from longseq.models.quant.int8_kernel import int8_dequantize

    layer = Int8Linear.quantize(torch.randn(40, K, generator=torch.Generator().manual_seed(K + 1)))
    out = int8_dequantize(layer.qweight.to(DEVICE), layer.scales.to(DEVICE), torch.float32)
    torch.testing.assert_close(out.cpu(), layer.dequantized(), rtol=0, atol=0)


def test_fused_int8_equals_separate_layers():
    g = torch.Generator().manual_seed(5)
    layers = [Int8Linear.quantize(torch.randn(n, 64, generator=g), torch.randn(n, generator=g)) for n in (32, 16)]
    x = torch.randn(4, 64, generator=g)
    separate = [layer(x) for layer in layers]
    fused = Int8Linear.fused(layers)
    assert isinstance(fused, FusedQuantLinear) and fused.weight.dtype == torch.int8
    for a, b in zip(fused(x), separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_quantized_model_logits_stay_close():
    model, ids = tame_model(1)
    with torch.no_grad():
        ref = model(ids)
        quantize_model(model, "int8")
        out = model(ids)
    assert type(model.model.layers[1].mlp.down_proj) is Int8Linear
    assert model.quantization == "int8"
    assert (out - ref).norm() / ref.norm() < 0.02  # an 8-bit step is 1/127 of a block's largest weight
