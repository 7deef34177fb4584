"""GGUF Q8_0 blocks kept packed as int8 layers (models/quant/gguf_q8.py): the weights they hold are exactly those the
gguf package dequantizes, and a tiny mixed GGUF (Q8_0, Q4_K, F16 and F32 tensors) loaded with `quantization="int8"`
keeps its Q8_0 linears as they are and gives logits close to the dequantized model's."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from longseq.models.loader import load_model
from longseq.models.quant.gguf_int4 import GgufBlocks
from longseq.models.quant.gguf_q8 import unpack_q8_0
from longseq.models.quant.int4 import Int4Linear
from longseq.models.quant.int8 import Int8Linear

Q8_0, Q4_K = GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_K
HIDDEN, FFN, HEADS, KV_HEADS, VOCAB, LAYERS = 64, 256, 4, 2, 97, 2


def test_q8_0_blocks_unpack_to_the_ggufs_weights():
    w = np.random.default_rng(0).standard_normal((12, 128)).astype(np.float32) * 0.05
    w[5, :32] = 0.0  # d = 0
    raw = quantize(w, Q8_0)
    q, d = unpack_q8_0(raw, 12, 128)
    expected = dequantize(raw, Q8_0)
    np.testing.assert_array_equal(q.astype(np.float32) * np.repeat(d.astype(np.float32), 32, 1), expected)
    order = np.random.default_rng(1).permutation(12)
    layer = GgufBlocks("Q8_0", raw, (12, 128), order).to_layer(torch.device("cpu"))
    assert isinstance(layer, Int8Linear) and layer.scales.dtype == torch.float16
    torch.testing.assert_close(layer.dequantized(), torch.from_numpy(expected[order]), rtol=0, atol=0)


def _q4_k(rows: int, cols: int, rng) -> np.ndarray:
    """Random Q4_K super-blocks (144 bytes a 256 inputs: fp16 d, fp16 dmin, 6-bit scales and mins, nibbles)."""
    raw = rng.integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
    raw[..., 0:2] = np.float16(2e-4).reshape(1).view(np.uint8)
    raw[..., 2:4] = np.float16(1e-3).reshape(1).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    """A 2-layer llama.cpp-style Llama: Q8_0 embeddings and most linears, an F16 v_proj and up_proj, Q4_K down_proj
    (256 inputs: one super-block a row), F32 norms, an F16 LM head."""
    rng = np.random.default_rng(3)

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) * 0.06).astype(np.float32)

    path = tmp_path_factory.mktemp("gguf") / "mixed-q8_0.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tensor("token_embd.weight", quantize(mat(VOCAB, HIDDEN), Q8_0), raw_dtype=Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    writer.add_tensor("output.weight", mat(VOCAB, HIDDEN).astype(np.float16))
    head_dim = HIDDEN // HEADS
    for i in range(LAYERS):
        blk = f"blk.{i}."
        writer.add_tensor(blk + "attn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(blk + "ffn_norm.weight", np.ones(HIDDEN, np.float32))
        for name, (rows, cols) in {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * head_dim, HIDDEN),
                                   "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN)}.items():
            writer.add_tensor(f"{blk}{name}.weight", quantize(mat(rows, cols), Q8_0), raw_dtype=Q8_0)
        writer.add_tensor(blk + "attn_v.weight", mat(KV_HEADS * head_dim, HIDDEN).astype(np.float16))
        writer.add_tensor(blk + "ffn_up.weight", mat(FFN, HIDDEN).astype(np.float16))
        writer.add_tensor(blk + "ffn_down.weight", _q4_k(HIDDEN, FFN, rng), raw_dtype=Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_mixed_gguf_keeps_q8_0_packed_with_int8(mixed_gguf, monkeypatch):
    from longseq.models.quant import gguf_q8

    real, kept = gguf_q8.q8_0_layer, []

    def spy(data, shape, row_order, device):  # requantizing a Q8_0 weight gives it back too: count the skipped trips
        kept.append(shape)
        return real(data, shape, row_order, device)

    monkeypatch.setattr(gguf_q8, "q8_0_layer", spy)
    plain = load_model(mixed_gguf, dtype="float32", device="cpu")
    packed = load_model(mixed_gguf, dtype="float32", device="cpu", quantization="int8")
    assert packed.quantization == "int8" and len(kept) == 4 * LAYERS
    for i in range(LAYERS):
        ours, theirs = packed.model.layers[i], plain.model.layers[i]
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert type(ours.get_submodule(name)) is Int8Linear, name
        for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj"):  # Q8_0: the file's own weights
            torch.testing.assert_close(ours.get_submodule(name).dequantized(), theirs.get_submodule(name).weight,
                                       rtol=0, atol=0)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = plain(ids), packed(ids)
    assert (out - ref).norm() / ref.norm() < 1e-2  # only the F16 / Q4_K linears were rounded to int8


def test_mixed_gguf_loads_with_int4_and_fp8_too(mixed_gguf):
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    for method in ("int4", "fp8"):
        model = load_model(mixed_gguf, dtype="float32", device="cpu", quantization=method)
        assert model.quantization == method
        if method == "int4":  # Q4_K kept packed, Q8_0 requantized to 4 bits
            assert type(model.model.layers[0].mlp.down_proj) is Int4Linear
        with torch.no_grad():
            assert torch.isfinite(model(ids)).all()
