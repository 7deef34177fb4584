"""Int4 weight-only layers: packing, group quantization, the Triton kernel against dequantize-then-matmul, act-order
permutations and fused projections."""

import pytest
import torch

from fp8_helpers import DEVICE, ON_GPU, tame_model
from longseq.errors import LongseqError
from longseq.models.quant import FusedQuantLinear, int4, quantize_model
from longseq.models.quant.int4 import Int4Linear


def test_pack_puts_even_inputs_in_the_high_nibble():
    q = torch.tensor([[1, 2, 15, 0], [7, 8, 9, 10]])
    packed = int4.pack(q)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0x12, 0xF0], [0x78, 0x9A]]
    assert torch.equal(int4.unpack(packed), q.to(torch.uint8))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_group_quantization_error_is_at_most_half_a_step(group):
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(group))
    w[3, :group] = 0.25  # a constant group
    qweight, scale, zero = int4.quantize_weight(w, group)
    assert qweight.shape == (24, 128) and scale.shape == zero.shape == (24, 256 // group)
    back = int4.dequantize(qweight, scale, zero)
    step = scale.repeat_interleave(group, 1)
    assert ((back - w).abs() <= step / 2 + 1e-6).all()
    assert ((zero >= 0) & (zero <= 15) & (zero == zero.round())).all()


def test_group_size_falls_back_for_inputs_it_does_not_divide():
    assert int4.fitting_group(576, 128) == 64 and int4.fitting_group(4096, 128) == 128
    assert Int4Linear.quantize(torch.randn(8, 96), 128).group_size == 32
    with pytest.raises(LongseqError, match="divisible by a group size"):
        int4.fitting_group(100, 128)


@pytest.mark.parametrize("rows", [1, 5, 17])
@pytest.mark.parametrize("group,splits", [(32, 1), (32, 3), (64, 2), (128, 1)])
def test_triton_kernel_equals_dequantize_then_matmul(rows, group, splits):
    pytest.importorskip("triton")
    from longseq.models.quant.int4_kernel import int4_matmul

    g = torch.Generator().manual_seed(rows)
    dtype = torch.bfloat16 if ON_GPU else torch.float32  # the interpreter's dots in float32; a GPU's in bf16
    layer = Int4Linear.quantize(torch.randn(80, 256, generator=g), group, dtype=dtype)  # 80: a partial tile
    x = torch.randn(rows, 256, generator=g).to(dtype)
    ref = x.float() @ layer.dequantized().t()
    out = int4_matmul(x.to(DEVICE), layer.qweight.to(DEVICE), layer.scales.to(DEVICE), layer.zeros.to(DEVICE),
                      group, splits)
    assert out.dtype == dtype
    if ON_GPU:  # the weights enter tl.dot in bf16: ~2^-9 of each, summed
        assert (out.float().cpu() - ref).norm() / ref.norm() < 1e-2
    else:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group", [32, 128])
def test_single_row_gemv_equals_dequantize_then_matmul(group):
    pytest.importorskip("triton")
    from longseq.models.quant.int4_kernel import int4_gemv

    g = torch.Generator().manual_seed(group)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    layer = Int4Linear.quantize(torch.randn(72, 512, generator=g), group, dtype=dtype)
    x = torch.randn(1, 512, generator=g).to(dtype)
    ref = x.float() @ layer.dequantized().t()
    out = int4_gemv(x.to(DEVICE), layer.qweight.to(DEVICE), layer.scales.to(DEVICE), layer.zeros.to(DEVICE), group)
    assert out.dtype == dtype and out.shape == (72,)
    assert (out.float().cpu() - ref[0]).norm() / ref.norm() < (1e-2 if ON_GPU else 1e-5)


@pytest.mark.parametrize("group", [32, 128])
def test_one_pass_dequantize_equals_the_reference(group):
    pytest.importorskip("triton")
    from longseq.models.quant.int4_kernel import int4_dequantize

    g = torch.Generator().manual_seed(group + 1)
    layer = Int4Linear.quantize(torch.randn(40, 256, generator=g), group)  # 40: a partial tile of rows
    out = int4_dequantize(layer.qweight.to(DEVICE), layer.scales.to(DEVICE), layer.zeros.to(DEVICE), group,
                          torch.float32)
    torch.testing.assert_close(out.cpu(), layer.dequantized(), rtol=0, atol=0)


def test_act_order_permutation_reads_inputs_in_stored_order():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 64, generator=g)
    perm = torch.randperm(64, generator=g)
    layer = Int4Linear(*int4.quantize_weight(w[:, perm], 32), bias=None, perm=perm)
    x = torch.randn(3, 64, generator=g)
    torch.testing.assert_close(layer(x), x @ layer.weight_in_input_order().t(), rtol=1e-5, atol=1e-5)
    assert (layer.weight_in_input_order() - w).abs().max() < 0.3


def test_fused_int4_equals_separate_layers():
    g = torch.Generator().manual_seed(5)
    layers = [Int4Linear.quantize(torch.randn(n, 64, generator=g), 32, torch.randn(n, generator=g))
              for n in (32, 16)]
    x = torch.randn(4, 64, generator=g)
    separate = [layer(x) for layer in layers]
    fused = Int4Linear.fused(layers)
    assert isinstance(fused, FusedQuantLinear)
    for a, b in zip(fused(x), separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    other = Int4Linear.quantize(torch.randn(16, 64, generator=g), 64)
    assert Int4Linear.fused([layers[0], other]) is None  # group sizes differ


def test_quantized_model_logits_stay_close():
    model, ids = tame_model(1)
    with torch.no_grad():
        ref = model(ids)
        quantize_model(model, "int4", group_size=32)
        out = model(ids)
    assert type(model.model.layers[1].mlp.down_proj) is Int4Linear
    assert (out - ref).norm() / ref.norm() < 0.3  # random data: a 4-bit step is a third of a weight's std
