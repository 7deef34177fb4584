"""Checkpoints stored quantized (models/quant/checkpoint.py): tiny FP8, compressed-tensors, GPTQ (act-order) and AWQ
model folders written here with safetensors, their packed tensors built by packing known integers, then loaded and
compared with the model whose weights are those integers dequantized by each format's definition."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from longseq.config.hf import to_hf
from longseq.errors import LongseqError
from longseq.models.loader import load_model
from longseq.models.quant import LINEAR
from longseq.models.quant.checkpoint import AWQ_ORDER, awq_to_int4, gptq_to_int4, unpack_int32
from longseq.models.quant.fp8 import FP8, Fp8Linear
from longseq.models.quant.int4 import Int4Linear
from tiny_models import random_model

G = 32  # group size of the int4 checkpoints (TINY: 64 hidden, 96 MLP inputs)


def words(nibbles: torch.Tensor) -> torch.Tensor:
    """(..., 8) integers 0..15 -> (...) int32 words, nibble i at bits 4i (as the packers write them)."""
    total = sum(nibbles[..., i].long() << (4 * i) for i in range(8))
    return torch.where(total >= 2**31, total - 2**32, total).to(torch.int32)


def gptq_pack(q_kn: torch.Tensor) -> torch.Tensor:
    """(K, N) -> (K/8, N): eight consecutive input rows a word."""
    K, N = q_kn.shape
    return words(q_kn.reshape(K // 8, 8, N).permute(0, 2, 1))


def cols_pack(q: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """(R, C) -> (R, C/8): nibble i of word j holds column 8j + order[i]."""
    R, C = q.shape
    return words(q.reshape(R, C // 8, 8)[:, :, list(order)])


def test_unpack_int32_reads_nibbles_low_first():
    word = words(torch.tensor([[[1, 2, 3, 4, 5, 6, 7, 15]]]))  # (1, 1), bit 31 set: a negative int32
    assert word.item() < 0
    assert unpack_int32(word, 1).tolist() == [[1, 2, 3, 4, 5, 6, 7, 15]]
    assert unpack_int32(word, 0).flatten().tolist() == [1, 2, 3, 4, 5, 6, 7, 15]


def gptq_layer(N, K, g, act_order):
    """Random GPTQ tensors and the (N, K) weight they stand for: W[n, k] = s[g_idx[k], n] · (q[k, n] - z[g_idx[k], n])
    with z stored minus one."""
    q = torch.randint(0, 16, (K, N), generator=g)
    z = torch.randint(1, 16, (K // G, N), generator=g)
    s = (torch.rand(K // G, N, generator=g) * 0.02 + 0.005).half().float()  # stored in fp16
    order = torch.randperm(K, generator=g) if act_order else torch.arange(K)
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[order] = (torch.arange(K) // G).to(torch.int32)  # act-order: groups by a permutation of the inputs
    weight = (s[g_idx.long()] * (q - z[g_idx.long()])).t()
    tensors = {"qweight": gptq_pack(q), "qzeros": cols_pack(z - 1), "scales": s.half(), "g_idx": g_idx}
    return tensors, weight


def test_gptq_act_order_unpacks_to_its_weight():
    tensors, weight = gptq_layer(16, 96, torch.Generator().manual_seed(0), act_order=True)
    layer = Int4Linear(*gptq_to_int4(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], 1,
                                     torch.float32))
    assert layer.perm is not None and layer.group_size == G
    torch.testing.assert_close(layer.weight_in_input_order(), weight)


def awq_layer(N, K, g):
    q = torch.randint(0, 16, (K, N), generator=g)
    z = torch.randint(0, 16, (K // G, N), generator=g)
    s = torch.rand(K // G, N, generator=g) * 0.02 + 0.005
    weight = ((q - z.repeat_interleave(G, 0)) * s.repeat_interleave(G, 0)).t()
    return {"qweight": cols_pack(q, AWQ_ORDER), "qzeros": cols_pack(z, AWQ_ORDER), "scales": s}, weight


def test_awq_interleaved_columns_unpack_to_its_weight():
    tensors, weight = awq_layer(24, 64, torch.Generator().manual_seed(1))
    layer = Int4Linear(*awq_to_int4(tensors["qweight"], tensors["qzeros"], tensors["scales"], torch.float32))
    torch.testing.assert_close(layer.weight_in_input_order(), weight)


def compressed_int4_layer(N, K, g):
    q = torch.randint(-8, 8, (N, K), generator=g)
    s = torch.rand(N, K // G, generator=g) * 0.02 + 0.005
    weight = q * s.repeat_interleave(G, 1)
    return {"weight_packed": cols_pack(q + 8), "weight_scale": s, "weight_shape": torch.tensor([N, K])}, weight


def fp8_layer(N, K, g, scheme):
    """Random e4m3 weights and their scale: one (tensor), one per channel, or per 32 x 32 block (inverse)."""
    wq = (torch.randn(N, K, generator=g) * 100).clamp(-448, 448).to(FP8)
    if scheme == "tensor":
        scale = torch.tensor(0.003)
        return {"weight": wq, "weight_scale": scale, "input_scale": torch.tensor(0.1)}, Fp8Linear(wq, scale.expand(N))
    if scheme == "channel":
        scale = torch.rand(N, 1, generator=g) * 0.004 + 0.001
        return {"weight": wq, "weight_scale": scale}, Fp8Linear(wq, scale[:, 0])
    scale = torch.rand(-(-N // 32), -(-K // 32), generator=g) * 0.004 + 0.001
    full = scale.repeat_interleave(32, 0)[:N].repeat_interleave(32, 1)[:, :K]
    return {"weight": wq, "weight_scale_inv": scale}, Fp8Linear.quantize(wq.float() * full)


FORMATS = {
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": True, "sym": False},
             lambda N, K, g: gptq_layer(N, K, g, act_order=True)),
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True, "version": "gemm"}, awq_layer),
    "compressed-int4": ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                       "strategy": "group", "group_size": G}}}, "ignore": ["lm_head"]},
        compressed_int4_layer),
    "fp8-tensor": ({"quant_method": "fp8", "activation_scheme": "static"},
                   lambda N, K, g: fp8_layer(N, K, g, "tensor")),
    "fp8-channel": ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}},
        lambda N, K, g: fp8_layer(N, K, g, "channel")),
    "fp8-block": ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32]},
                  lambda N, K, g: fp8_layer(N, K, g, "block")),
}


def write_checkpoint(path, fmt: str, seed: int = 0):
    """A tiny quantized model folder; returns the float model that computes what it should (16-bit layers with the
    dequantized weights for int4, the same Fp8Linear layers for FP8)."""
    qcfg, make = FORMATS[fmt]
    model = random_model(seed)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not LINEAR.match(name + ".weight"):
            continue
        parts, expected = make(module.out_features, module.in_features, g)
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in parts.items()})
        if isinstance(expected, nn.Module):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, expected)
        else:
            module.weight.data = expected.float().contiguous()
    for name, t in model.state_dict().items():
        if not LINEAR.match(name):
            tensors[name] = t.contiguous()
    if fmt.startswith("fp8"):
        tensors["model.layers.1.self_attn.k_scale"] = torch.tensor(0.5)
        tensors["model.layers.1.self_attn.v_scale"] = torch.tensor(0.25)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**to_hf(model.config), "quantization_config": qcfg}))
    return model


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_checkpoint_loads_to_the_model_it_encodes(tmp_path, fmt):
    expected = write_checkpoint(tmp_path / fmt, fmt)
    model = load_model(tmp_path / fmt, dtype="float32", device="cpu")
    kind = Fp8Linear if fmt.startswith("fp8") else Int4Linear
    assert model.quantization == ("fp8" if kind is Fp8Linear else "int4")
    assert all(type(getattr(layer.self_attn, p)) is kind for layer in model.model.layers for p in ("q_proj", "o_proj"))
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected(ids), rtol=1e-4, atol=1e-4)
    if fmt.startswith("fp8"):
        assert model.kv_cache_scales == {1: [0.5, 0.25]}


def test_quantization_other_than_the_checkpoints_is_refused(tmp_path):
    write_checkpoint(tmp_path / "m", "gptq")
    with pytest.raises(LongseqError, match="stored GPTQ int4 .* cannot be served as fp8"):
        load_model(tmp_path / "m", dtype="float32", device="cpu", quantization="fp8")
    load_model(tmp_path / "m", dtype="float32", device="cpu", quantization="int4")  # what it is: fine


def test_unsupported_quantization_config_is_one_line(tmp_path):
    write_checkpoint(tmp_path / "m", "gptq")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LongseqError, match="quantization 'bitsandbytes' is not supported") as e:
        load_model(tmp_path / "m", dtype="float32", device="cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["fp8", "int4"])
def test_sixteen_bit_checkpoint_quantizes_at_load(tmp_path, method):
    model = random_model(0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(to_hf(model.config)))
    loaded = load_model(tmp_path, dtype="float32", device="cpu", quantization=method, group_size=32)
    from longseq.models.quant import quantize_model

    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), quantize_model(model, method, group_size=32)(ids))
