"""Checkpoints stored quantized, read from config.json's `quantization_config` into Fp8Linear / Int4Linear layers.

- FP8 (`quant_method` "fp8", "fbgemm_fp8"; compressed-tensors "float-quantized"): `weight` in float8_e4m3fn with
  `weight_scale` (or DeepSeek-style `weight_scale_inv`, which multiplies too): one value (per tensor), one per
  output channel, or one per block (`weight_block_size`, e.g. 128 x 128). Per-tensor and per-channel scales load as
  they are (a tensor's one scale repeated per channel); block scales are dequantized in float32 and requantized per
  channel at load, since the matmul takes row-wise scales. Static `input_scale`s are dropped: activations are
  scaled per token at run time. `k_scale` / `v_scale` (compressed-tensors' KV cache scales) are kept for an FP8 KV
  pool.
- GPTQ (`quant_method` "gptq", 4 bits): `qweight` (K/8, N) int32, eight 4-bit rows a word from the low bits;
  `qzeros` (K/G, N/8) packed the same way along N, stored minus one (AutoGPTQ's format "gptq"; "gptq_v2" stores
  them as they are); `scales` (K/G, N); `g_idx` (K,) each input channel's group (act-order: not k // G).
- AWQ (`quant_method` "awq", version "gemm"): `qweight` (K, N/8) and `qzeros` (K/G, N/8) int32 packed along N in
  AutoAWQ's interleaved order (the word's nibble i holds column 8j + [0, 2, 4, 6, 1, 3, 5, 7][i]); `scales` (K/G, N).
- compressed-tensors "pack-quantized" (symmetric int4): `weight_packed` (N, K/8) int32 along K from the low bits,
  values stored plus 8; `weight_scale` (N, K/G).
Every format is W = (q - z) · s per group, or W = q · s for FP8, in the layouts of int4.py and fp8.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longseq.config.engine import check_quantization
from longseq.errors import LongseqError
from longseq.models.quant import LINEAR, QuantLoader, fp8, int4
from longseq.models.quant.fp8 import Fp8Linear
from longseq.models.quant.int4 import Int4Linear

KV_SCALE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(k|v)_scale$")
# Parts of a quantized layer in any supported format; a name ending in one of these outside the linears longseq
# quantizes (an expert, the LM head) is refused rather than loaded as a plain weight.
QUANT_PARTS = ("weight_scale", "weight_scale_inv", "input_scale", "qweight", "qzeros", "scales", "g_idx",
               "weight_packed", "weight_shape", "weight_zero_point", "weight_g_idx", "output_scale")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i] of its eight


def read_quant_config(path: Path) -> dict[str, Any] | None:
    """config.json's quantization_config (compressed-tensors' older `compression_config`), or None."""
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    qcfg = hf.get("quantization_config") or hf.get("compression_config")
    return qcfg if isinstance(qcfg, dict) else None


def quant_loader(path: Path, method: str | None, group_size: int, dtype: torch.dtype,
                 device: torch.device) -> QuantLoader | None:
    """build_from_tensors' hook for a model file or directory: None for 16-bit weights served as they are."""
    check_quantization(method, group_size)
    stored = stored_format(read_quant_config(path), str(path)) if path.is_dir() else None
    if method is None and stored is None:
        return None
    return QuantLoader(method, group_size, dtype, device, stored, source=str(path))


def stored_format(qcfg: dict[str, Any] | None, source: str) -> StoredFormat | None:
    """The format of a quantization_config; None where there is none. Unsupported ones fail in one line."""
    if not qcfg:
        return None
    method = str(qcfg.get("quant_method", "")).lower()
    if method in ("fp8", "fbgemm_fp8"):
        return StoredFormat("fp8", f"FP8 ({method})", source, block=qcfg.get("weight_block_size"))
    if method == "gptq":
        _check_bits(qcfg, source, "GPTQ")
        fmt = str(qcfg.get("checkpoint_format", "gptq")).lower()
        return StoredFormat("int4", "GPTQ int4", source, layout="gptq", zero_offset=1 if fmt == "gptq" else 0,
                            group_size=int(qcfg.get("group_size", 128)))
    if method == "awq":
        _check_bits(qcfg, source, "AWQ")
        if str(qcfg.get("version", "gemm")).lower() != "gemm":
            raise LongseqError(f"{source}: AWQ version {qcfg.get('version')!r}; longseq reads the GEMM layout")
        if not qcfg.get("zero_point", True):
            raise LongseqError(f"{source}: AWQ without zero points is not supported")
        return StoredFormat("int4", "AWQ int4", source, layout="awq", group_size=int(qcfg.get("group_size", 128)))
    if method == "compressed-tensors":
        return _compressed_tensors(qcfg, source)
    raise LongseqError(f"{source}: quantization {method or qcfg!r} is not supported; longseq reads FP8, GPTQ, AWQ "
                       "and compressed-tensors FP8 / int4 checkpoints")


def _check_bits(qcfg: dict[str, Any], source: str, name: str) -> None:
    if int(qcfg.get("bits", 4)) != 4:
        raise LongseqError(f"{source}: {name} with {qcfg.get('bits')} bits; longseq reads 4-bit checkpoints")


def _compressed_tensors(qcfg: dict[str, Any], source: str) -> StoredFormat:
    fmt = str(qcfg.get("format", "")).lower()
    groups = [g for g in (qcfg.get("config_groups") or {}).values() if isinstance(g, dict)]
    weights = [g.get("weights") or {} for g in groups]
    if fmt in ("float-quantized", "naive-quantized") and all(
            w.get("type") == "float" and int(w.get("num_bits", 8)) == 8 for w in weights):
        return StoredFormat("fp8", "compressed-tensors FP8", source)
    if fmt == "pack-quantized" and all(w.get("type", "int") == "int" and int(w.get("num_bits", 4)) == 4
                                       for w in weights):
        if not all(w.get("symmetric", True) for w in weights):
            raise LongseqError(f"{source}: asymmetric compressed-tensors int4 is not supported (symmetric is)")
        return StoredFormat("int4", "compressed-tensors int4", source, layout="pack-quantized")
    raise LongseqError(f"{source}: compressed-tensors format {fmt!r} with weights {weights[:1]} is not supported; "
                       "longseq reads FP8 (float-quantized) and symmetric int4 (pack-quantized)")


class StoredFormat:
    """A quantized checkpoint's layers, gathered part by part as the tensors stream in (a layer's parts may be in
    different shards), then built at the end."""

    def __init__(self, method: str, name: str, source: str, layout: str = "fp8", block=None, zero_offset: int = 0,
                 group_size: int | None = None):
        self.method, self.name, self.source, self.layout = method, name, source, layout
        self.block, self.zero_offset, self.group_size = block, zero_offset, group_size
        self.parts: dict[str, dict[str, torch.Tensor]] = {}
        self.kv_scales: dict[int, list[float]] = {}

    def claim(self, name: str, tensor: torch.Tensor) -> bool:
        if (kv := KV_SCALE.match(name)) is not None:
            self.kv_scales.setdefault(int(kv.group(1)), [1.0, 1.0])[kv.group(2) == "v"] = float(tensor.float().max())
            return True
        match = LINEAR.match(name)
        if match is None:
            if name.rpartition(".")[2] in QUANT_PARTS or tensor.dtype == fp8.FP8:
                raise LongseqError(f"{self.source}: quantized weight {name!r}: longseq serves quantized attention and "
                                   "dense MLP linears only (not experts or the LM head)")
            return False
        prefix, part = match.groups()
        if part == "bias":
            return False
        if part == "weight" and tensor.dtype != fp8.FP8:
            return False  # a layer the checkpoint left unquantized (ignored_layers / modules_to_not_convert)
        if part in ("input_scale", "output_scale", "weight_shape"):
            return True  # activations are scaled per token; shapes come from the config
        self.parts.setdefault(prefix, {})[part] = tensor
        return True

    def provides(self, prefix: str) -> bool:
        return prefix in self.parts

    def build(self, dtype: torch.dtype, device: torch.device) -> dict[str, nn.Module]:
        layers = {}
        for prefix in list(self.parts):
            parts = {k: v.to(device) for k, v in self.parts.pop(prefix).items()}
            try:
                layers[prefix] = self._layer(parts, dtype)
            except KeyError as e:
                raise LongseqError(f"{self.source}: {prefix} lacks its {e.args[0]!r} ({self.name})") from None
        return layers

    def _layer(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
        if self.layout == "fp8":
            return fp8_layer(parts, self.block)
        if self.layout == "gptq":
            return Int4Linear(*gptq_to_int4(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"),
                                            self.zero_offset, dtype))
        if self.layout == "awq":
            return Int4Linear(*awq_to_int4(parts["qweight"], parts["qzeros"], parts["scales"], dtype))
        return Int4Linear(*compressed_int4(parts["weight_packed"], parts["weight_scale"], parts.get("weight_g_idx"),
                                           dtype))


def fp8_layer(parts: dict[str, torch.Tensor], block=None) -> Fp8Linear:
    weight = parts["weight"]
    scale = parts["weight_scale"] if "weight_scale" in parts else parts["weight_scale_inv"]
    N, K = weight.shape
    scale = scale.float()
    if scale.numel() == 1:  # per tensor: the same scale for every channel, the weights as they are
        return Fp8Linear(weight, scale.reshape(1).expand(N).contiguous())
    if scale.numel() == N and (scale.dim() == 1 or scale.shape[-1] == 1):  # per output channel
        return Fp8Linear(weight, scale.reshape(N))
    if scale.dim() == 2:  # per block: dequantize, requantize per channel
        bn, bk = block or (-(-N // scale.shape[0]), -(-K // scale.shape[1]))
        full = scale.repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]
        return Fp8Linear.quantize(weight.float() * full)
    raise LongseqError(f"FP8 weight of shape {(N, K)} with a scale of shape {tuple(scale.shape)} is not supported")


def unpack_int32(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words of eight 4-bit values, low bits first, unpacked along `dim` (value i of a word at index 8j + i)."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    vals = (packed.unsqueeze(-1) >> shifts) & 0xF  # (..., 8) along a new last dim
    if dim == 0:
        return vals.permute(0, 2, 1).reshape(-1, packed.shape[1])
    return vals.reshape(packed.shape[0], -1)


def _group_order(g_idx: torch.Tensor | None, K: int, group_size: int) -> torch.Tensor | None:
    """The permutation that makes groups contiguous (None where g_idx is already k // G), checked to give every
    group exactly group_size channels."""
    if g_idx is None:
        return None
    g_idx = g_idx.long()
    if torch.equal(g_idx, torch.arange(K, device=g_idx.device) // group_size):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], torch.arange(K, device=g_idx.device) // group_size):
        raise LongseqError(f"g_idx does not give each group {group_size} channels; not a GPTQ act-order layout")
    return perm


def gptq_to_int4(qweight, qzeros, scales, g_idx, zero_offset: int, dtype: torch.dtype):
    """GPTQ's tensors -> Int4Linear's (qweight, scales, zeros, bias, perm)."""
    q = unpack_int32(qweight, 0).t()  # (N, K)
    N, K = q.shape
    groups = scales.shape[0]
    group_size = K // groups
    zeros = unpack_int32(qzeros, 1)[:, :N].t() + zero_offset  # (N, K/G)
    perm = _group_order(g_idx, K, group_size)
    if perm is not None:
        q = q[:, perm]
    return int4.pack(q), scales.t().to(dtype).contiguous(), zeros.to(dtype).contiguous(), None, perm


def awq_to_int4(qweight, qzeros, scales, dtype: torch.dtype):
    """AWQ's (GEMM layout) tensors -> Int4Linear's (qweight, scales, zeros, bias, perm)."""
    reverse = torch.tensor([AWQ_ORDER.index(c) for c in range(8)], device=qweight.device)

    def columns(packed):  # (rows, N/8) -> (rows, N) in column order
        vals = unpack_int32(packed, 1).reshape(packed.shape[0], -1, 8)
        return vals[:, :, reverse].reshape(packed.shape[0], -1)

    q = columns(qweight).t()  # (N, K)
    zeros = columns(qzeros).t()  # (N, K/G)
    return int4.pack(q), scales.t().to(dtype).contiguous(), zeros.to(dtype).contiguous(), None, None


def compressed_int4(weight_packed, weight_scale, g_idx, dtype: torch.dtype):
    """compressed-tensors' symmetric pack-quantized tensors -> Int4Linear's (qweight, scales, zeros, bias, perm)."""
    q = unpack_int32(weight_packed, 1)  # (N, K) values + 8
    N, K = q.shape
    scales = weight_scale.reshape(N, -1)
    perm = _group_order(g_idx, K, K // scales.shape[1])
    if perm is not None:
        q = q[:, perm]
    zeros = torch.full_like(scales, 8, dtype=dtype)
    return int4.pack(q), scales.to(dtype).contiguous(), zeros, None, perm
