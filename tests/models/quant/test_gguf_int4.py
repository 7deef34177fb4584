"""GGUF Q4_0 / Q4_1 / Q4_K blocks kept packed as int4 layers (models/quant/gguf_int4.py): the weights they hold are
exactly those the gguf package dequantizes, and the built-in model (a Q4_1 file) loads with `quantization="int4"`
into layers that hold its file's weights."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from longseq.models.quant.gguf_int4 import GgufBlocks, unpack_blocks
from longseq.models.quant.int4 import Int4Linear

N, K = 12, 256


def weights(seed=0):
    w = np.random.default_rng(seed).standard_normal((N, K)).astype(np.float32) * 0.05
    w[3, :32] = 0.125  # a constant block: d = 0 in Q4_1
    return w


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_q4_0_and_q4_1_blocks_unpack_to_the_ggufs_weights(qtype):
    raw = quantize(weights(), GGMLQuantizationType[qtype])
    q, d, m = unpack_blocks(qtype, raw, N, K)
    expected = dequantize(raw, GGMLQuantizationType[qtype])
    np.testing.assert_array_equal(q.astype(np.float32) * np.repeat(d, 32, 1) + np.repeat(m, 32, 1), expected)
    layer = GgufBlocks(qtype, raw, (N, K)).to_int4(torch.device("cpu"))
    assert isinstance(layer, Int4Linear) and layer.group_size == 32 and layer.scales.dtype == torch.float32
    torch.testing.assert_close(layer.dequantized(), torch.from_numpy(expected), rtol=1e-5, atol=1e-6)


def q4_k_blocks(seed=1) -> np.ndarray:
    """Random Q4_K super-blocks (144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 of nibbles)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (N, K // 256, 144), dtype=np.uint8)
    raw[..., 0:2] = np.float16(0.002).reshape(1).view(np.uint8)
    raw[..., 2:4] = np.float16(0.001).reshape(1).view(np.uint8)
    return raw.reshape(N, -1)


def test_q4_k_blocks_unpack_to_the_ggufs_weights():
    raw = q4_k_blocks()
    q, d, m = unpack_blocks("Q4_K", raw, N, K)
    expected = dequantize(raw, GGMLQuantizationType.Q4_K)
    np.testing.assert_allclose(q.astype(np.float32) * np.repeat(d, 32, 1) + np.repeat(m, 32, 1), expected,
                               rtol=1e-6, atol=1e-7)
    order = np.random.default_rng(2).permutation(N)
    layer = GgufBlocks("Q4_K", raw, (N, K), order).to_int4(torch.device("cpu"))
    torch.testing.assert_close(layer.dequantized(), torch.from_numpy(expected[order]), rtol=1e-5, atol=1e-6)


def test_the_builtin_q4_1_model_loads_its_own_weights_as_int4():
    from longseq.models.loader import load_model

    plain = load_model(None, dtype="float32", device="cpu")
    packed = load_model(None, dtype="float32", device="cpu", quantization="int4")
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):  # q/k: llama.cpp's row order undone
        layer = packed.model.layers[1].get_submodule(name)
        assert isinstance(layer, Int4Linear) and layer.group_size == 32
        torch.testing.assert_close(layer.weight_in_input_order(), plain.model.layers[1].get_submodule(name).weight,
                                   rtol=1e-5, atol=1e-6)
