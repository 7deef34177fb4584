"""Int4 layers in PyTorch's tinygemm layout: the packed layout against int4mm.cu's conversion loop, the scales and
zeros conversion through tinygemm's CPU twin against reference_linear (from-bf16, GPTQ act-order and AWQ layers),
the prefill dequantize from that layout, fusion, and (LONGSEQ_TEST_CUDA=1) the CUDA kernel itself."""

import os

import pytest
import torch

from fp8_helpers import DEVICE
from longseq.models.quant import FusedQuantLinear, int4, int4_tinygemm
from longseq.models.quant.checkpoint import AWQ_ORDER, awq_to_int4, gptq_to_int4
from longseq.models.quant.int4 import Int4Linear, reference_linear

ON_CUDA = os.environ.get("LONGSEQ_TEST_CUDA") == "1" and torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="tinygemm's CUDA kernel: LONGSEQ_TEST_CUDA=1 on a GPU")


def conversion_loop(qweight: torch.Tensor, tiles: int) -> torch.Tensor:
    """int4mm.cu's matrix_to_m16n8k16_Bint4_layout restated lane by lane (NVIDIA's n-tile of 8)."""
    N, half = qweight.shape
    K = 2 * half
    out = torch.zeros(N // 8, K // (16 * tiles), 32, tiles // 2, dtype=torch.int64)
    for n_tile in range(N // 8):
        for k_outer in range(K // (16 * tiles)):
            for t in range(32):
                for inner in range(0, tiles, 2):
                    n0 = n_tile * 8 + t // 4
                    base = (k_outer * tiles + inner) * 8
                    ks = [base + t % 4, base + t % 4 + 4, base + 8 + t % 4, base + 12 + t % 4]
                    v = [int(qweight[n0, k]) for k in ks]
                    word = sum(((v[i] & 0xF) << (16 + 4 * i)) | ((v[i] >> 4) << (4 * i)) for i in range(4))
                    out[n_tile, k_outer, t, inner // 2] = word
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.mark.parametrize("tiles,K", [(2, 64), (4, 128), (8, 256)])
def test_packed_layout_is_the_conversion_kernels(tiles, K):
    qweight = torch.randint(0, 256, (16, K // 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(tiles))
    packed = int4_tinygemm.pack_layout(qweight, tiles)
    assert packed.dtype == torch.int32 and packed.shape == (2, K // (16 * tiles), 32, tiles // 2)
    assert torch.equal(packed, conversion_loop(qweight, tiles))
    assert torch.equal(int4_tinygemm.unpack_layout(packed), qweight)


def test_what_tinygemm_takes():
    assert int4_tinygemm.inner_k_tiles(4096) == 8 and int4_tinygemm.inner_k_tiles(96) == 2
    assert int4_tinygemm.inner_k_tiles(80) is None
    assert int4_tinygemm.fits(6144, 4096, 128, torch.bfloat16)
    assert not int4_tinygemm.fits(6144, 4096, 128, torch.float16)  # fp16: the Triton kernels
    assert not int4_tinygemm.fits(6144, 4096, 128, torch.float32)  # GGUF's float32 scales
    assert not int4_tinygemm.fits(6140, 4096, 128, torch.bfloat16)  # N not a multiple of 8
    assert not int4_tinygemm.fits(6144, 4096, 512, torch.bfloat16)  # group sizes 32..256
    assert Int4Linear.quantize(torch.randn(16, 64), 32).layout == "plain"  # on CPU: only when asked


def test_path_by_rows_dtype_and_layout():
    w = torch.randn(16, 64)
    tg = Int4Linear.quantize(w, 32, dtype=torch.bfloat16, tinygemm=True)
    plain = Int4Linear.quantize(w, 32, dtype=torch.bfloat16)
    rows = int4.DECODE_ROWS
    assert [tg.path(r, torch.bfloat16) for r in (1, rows, rows + 1)] == ["tinygemm", "tinygemm", "dequantize"]
    assert tg.path(1, torch.float16) == "dequantize"  # tinygemm takes bf16 only; its layout, dequantized
    assert [plain.path(r, torch.float16) for r in (1, rows, rows + 1)] == ["gemv", "tl.dot", "dequantize"]
    assert tg.path(1, torch.bfloat16, cuda=False) == "reference"


def twin_close(x: torch.Tensor, layer: Int4Linear, sz: torch.Tensor, qweight: torch.Tensor) -> None:
    """tinygemm's CPU twin over `sz` and the layer's nibbles against reference_linear, both from bf16 inputs."""
    xs = x[..., layer.perm] if layer.perm is not None else x
    out = int4_tinygemm.cpu_linear(xs, qweight, sz, layer.group_size).float()
    ref = reference_linear(x, layer).float()
    assert (out - ref).norm() / ref.norm() < 1e-2  # bf16 rounding of z_tg and of the products


@pytest.mark.parametrize("group", [32, 64, 128])
def test_scales_and_zeros_match_the_reference_through_the_cpu_twin(group):
    g = torch.Generator().manual_seed(group)
    layer = Int4Linear.quantize(torch.randn(48, 256, generator=g) * 0.05, group, dtype=torch.bfloat16)
    sz = int4_tinygemm.scales_and_zeros(layer.scales, layer.zeros)
    assert sz.shape == (256 // group, 48, 2) and sz.dtype == torch.bfloat16
    twin_close(torch.randn(5, 256, generator=g).bfloat16(), layer, sz, layer.qweight)


def gptq_tensors(N, K, G, g, act_order):
    """GPTQ's (qweight, qzeros, scales, g_idx): eight inputs a word along K, zeros stored minus one along N."""
    q = torch.randint(0, 16, (K, N), generator=g)
    z = torch.randint(1, 16, (K // G, N), generator=g)
    s = (torch.rand(K // G, N, generator=g) * 0.02 + 0.005).half()
    order = torch.randperm(K, generator=g) if act_order else torch.arange(K)
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[order] = (torch.arange(K) // G).to(torch.int32)
    return words(q.reshape(K // 8, 8, N).permute(0, 2, 1)), words((z - 1).reshape(K // G, N // 8, 8)), s, g_idx


def words(nibbles: torch.Tensor) -> torch.Tensor:
    total = sum(nibbles[..., i].long() << (4 * i) for i in range(8))
    return torch.where(total >= 2**31, total - 2**32, total).to(torch.int32)


@pytest.mark.parametrize("group,act_order", [(32, True), (64, False), (128, True)])
def test_gptq_layers_through_the_cpu_twin(group, act_order):
    g = torch.Generator().manual_seed(group)
    qweight, qzeros, scales, g_idx = gptq_tensors(32, 256, group, g, act_order)
    layer = Int4Linear(*gptq_to_int4(qweight, qzeros, scales, g_idx, 1, torch.bfloat16))
    assert (layer.perm is not None) == act_order
    sz = int4_tinygemm.scales_and_zeros(layer.scales, layer.zeros)
    twin_close(torch.randn(3, 256, generator=g).bfloat16(), layer, sz, layer.qweight)


@pytest.mark.parametrize("group", [32, 128])
def test_awq_layers_through_the_cpu_twin(group):
    g = torch.Generator().manual_seed(group + 1)
    N, K = 32, 256
    q = torch.randint(0, 16, (K, N), generator=g)
    z = torch.randint(0, 16, (K // group, N), generator=g)
    s = torch.rand(K // group, N, generator=g) * 0.02 + 0.005

    def cols(t):  # AutoAWQ's interleaved words along N
        return words(t.reshape(t.shape[0], N // 8, 8)[:, :, list(AWQ_ORDER)])

    layer = Int4Linear(*awq_to_int4(cols(q), cols(z), s, torch.bfloat16))
    sz = int4_tinygemm.scales_and_zeros(layer.scales, layer.zeros)
    twin_close(torch.randn(2, K, generator=g).bfloat16(), layer, sz, layer.qweight)


def test_a_layer_kept_in_tinygemm_layout_dequantizes_as_its_plain_twin():
    g = torch.Generator().manual_seed(7)
    w, bias = torch.randn(24, 128, generator=g) * 0.05, torch.randn(24, generator=g)
    perm = torch.randperm(128, generator=g)
    qweight, scale, zero = int4.quantize_weight(w[:, perm], 32)
    plain = Int4Linear(qweight, scale.bfloat16(), zero.bfloat16(), bias, perm, tinygemm=False)
    tg = Int4Linear(qweight, scale.bfloat16(), zero.bfloat16(), bias, perm, tinygemm=True)
    assert tg.layout == "tinygemm" and tg.scales is None and tg.qweight.dtype == torch.int32
    step = scale.repeat_interleave(32, 1)
    assert ((tg.dequantized() - plain.dequantized()).abs() <= step / 32).all()  # z_tg rounded to bf16
    x = torch.randn(3, 128, generator=g).bfloat16()
    torch.testing.assert_close(tg(x).float(), plain(x).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("group", [32, 64, 256])
def test_prefill_dequantize_reads_the_tinygemm_layout(group):
    pytest.importorskip("triton")
    from longseq.models.quant.int4_kernel import int4_dequantize_tinygemm

    g = torch.Generator().manual_seed(group)
    layer = Int4Linear.quantize(torch.randn(40, 512, generator=g), group, dtype=torch.bfloat16, tinygemm=True)
    out = int4_dequantize_tinygemm(layer.qweight.to(DEVICE), layer.scales_and_zeros.to(DEVICE), group,
                                   torch.float32)
    torch.testing.assert_close(out.cpu(), layer.dequantized(), rtol=0, atol=0)


def test_fused_tinygemm_layers_equal_separate_ones():
    g = torch.Generator().manual_seed(5)
    layers = [Int4Linear.quantize(torch.randn(n, 64, generator=g), 32, torch.randn(n, generator=g),
                                  dtype=torch.bfloat16, tinygemm=True) for n in (32, 16, 8)]
    before = [m.dequantized() for m in layers]
    x = torch.randn(4, 64, generator=g).bfloat16()
    separate = [m(x) for m in layers]
    fused = Int4Linear.fused(layers)
    assert isinstance(fused, FusedQuantLinear) and fused.layer.layout == "tinygemm"
    for a, b in zip(fused(x), separate, strict=True):
        torch.testing.assert_close(a, b)
    for m, w in zip(layers, before, strict=True):  # each layer now views the concatenation
        torch.testing.assert_close(m.dequantized(), w, rtol=0, atol=0)
        assert m.qweight.untyped_storage().data_ptr() == fused.layer.qweight.untyped_storage().data_ptr()
        assert not m.scales_and_zeros.is_contiguous()
    plain = Int4Linear.quantize(torch.randn(16, 64, generator=g), 32, dtype=torch.bfloat16)
    assert Int4Linear.fused([layers[0], plain]) is None  # layouts differ


@cuda_only
@pytest.mark.parametrize("tiles", [2, 4, 8])
def test_pack_layout_equals_pytorchs_conversion_on_a_gpu(tiles):
    qweight = torch.randint(0, 256, (48, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(tiles))
    ours = int4_tinygemm.pack_layout(qweight, tiles)
    theirs = torch.ops.aten._convert_weight_to_int4pack(qweight.cuda(), tiles).cpu()
    assert torch.equal(ours, theirs)


@cuda_only
@pytest.mark.parametrize("rows", [1, 8, 16, 40])  # up to DECODE_ROWS: tinygemm; beyond: dequantize + cuBLAS
@pytest.mark.parametrize("group,act_order", [(32, False), (64, True), (128, False)])
def test_tinygemm_layer_on_a_gpu_equals_the_reference(rows, group, act_order):
    g = torch.Generator().manual_seed(rows + group)
    K = 512
    perm = torch.randperm(K, generator=g) if act_order else None
    qweight, scale, zero = int4.quantize_weight(torch.randn(96, K, generator=g) * 0.05, group)
    bias = torch.randn(96, generator=g)
    cpu = Int4Linear(qweight, scale.bfloat16(), zero.bfloat16(), bias, perm, tinygemm=False)
    gpu = Int4Linear(qweight.cuda(), scale.bfloat16().cuda(), zero.bfloat16().cuda(), bias.cuda(),
                     None if perm is None else perm.cuda())
    assert gpu.layout == "tinygemm"
    x = torch.randn(rows, K, generator=g).bfloat16()
    assert gpu.path(rows, x.dtype) == ("tinygemm" if rows <= int4.DECODE_ROWS else "dequantize")
    out = gpu(x.cuda()).float().cpu()
    ref = reference_linear(x, cpu).float()
    assert out.shape == ref.shape and (out - ref).norm() / ref.norm() < 1e-2


@cuda_only
def test_layers_tinygemm_cannot_take_keep_the_triton_path_on_a_gpu():
    w = torch.randn(96, 256, device="cuda")
    assert Int4Linear.quantize(w.half(), 64).layout == "plain"  # fp16
    assert Int4Linear.quantize(w[:92].bfloat16(), 64).layout == "plain"  # 92 outputs
    assert Int4Linear.quantize(w.bfloat16(), 64).layout == "tinygemm"


@cuda_only
def test_fused_tinygemm_layers_on_a_gpu_equal_separate_ones():
    g = torch.Generator().manual_seed(9)
    layers = [Int4Linear.quantize(torch.randn(n, 256, generator=g).bfloat16().cuda(), 64) for n in (64, 32, 32)]
    assert all(m.layout == "tinygemm" for m in layers)
    for rows in (1, 4, 3 * int4.DECODE_ROWS):
        x = torch.randn(rows, 256, generator=g).bfloat16().cuda()
        separate = [m(x) for m in layers]
        fused = Int4Linear.fused(layers)
        for a, b in zip(fused(x), separate, strict=True):
            torch.testing.assert_close(a, b)
        for m, b in zip(layers, separate, strict=True):  # alone again, over strided views of the fused buffers
            torch.testing.assert_close(m(x), b)
