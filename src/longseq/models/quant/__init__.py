"""Quantized serving: linear layers swapped for FP8, int4 or int8 ones at load (train/lora.py's layer-swap pattern).

fp8.py         Fp8Linear: e4m3 weights, a scale per output channel, activations quantized per token (torch._scaled_mm)
fp8_kernel.py  the per-token activation quantization in one Triton launch
int4.py        Int4Linear: 4-bit weights, a scale and zero per group of inputs (GPTQ act-order through a permutation)
int4_kernel.py the few-row (decode) int4 matmul in Triton, and the one-pass dequantize of either int4 layout
int4_tinygemm.py int4 weights in PyTorch's tinygemm layout (`_weight_int4pack_mm`), the bf16 decode path on GPUs
int8.py        Int8Linear: llama.cpp's Q8_0 layout, an int8 a weight and an fp16 scale per 32 inputs
int8_kernel.py the single-row (decode) int8 GEMV and the one-pass dequantize in Triton
checkpoint.py  checkpoints stored quantized: HF FP8 (per-tensor, per-channel, block), compressed-tensors, GPTQ, AWQ
gguf_int4.py   GGUF Q4_0 / Q4_1 / Q4_K blocks kept packed as int4 layers
gguf_q8.py     GGUF Q8_0 blocks kept packed as int8 layers

Which layers: every decoder layer's attention projections and dense MLP; the embeddings, the LM head and a mixture of
experts' stacked expert weights stay in 16 bits. `QuantLoader` is build_from_tensors' hook: each weight is quantized
as it streams in (a 16-bit model never exists whole on the device), or a quantized checkpoint's parts are gathered
and turned into the same layers. The inference path calls the swapped layers as modules (models/inference.py);
fused_linear.fuse asks their class to fuse q/k/v and gate/up (`fused`), giving a FusedQuantLinear.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from longseq.errors import LongseqError
from longseq.models.quant.fp8 import Fp8Linear
from longseq.models.quant.int4 import Int4Linear
from longseq.models.quant.int8 import Int8Linear

# The decoder linears that quantize: attention projections and dense MLPs (not experts, not the LM head).
LINEAR = re.compile(r"^(model\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:shared_expert\.)?(?:gate|up|down)_proj))"
                    r"\.(\w+)$")
QUANTIZED_TYPES = (Fp8Linear, Int4Linear, Int8Linear)


class FusedQuantLinear:
    """FusedLinear's interface over one quantized layer (the concatenation of those fused): not a Module, so the
    model's state_dict is unchanged; `weight` is the layer's (not 16-bit, so fused_linear.calibrate skips it)."""

    def __init__(self, layer: nn.Module, sizes: list[int]):
        self.layer, self.sizes = layer, sizes
        self.gemv = False
        self.weight = getattr(layer, "weight", None)
        if self.weight is None:
            self.weight = layer.qweight
        self.bias = layer.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        y = self.layer(x)
        return y if len(self.sizes) == 1 else y.split(self.sizes, dim=-1)


def fuse_rows(layers: list[nn.Module], names: tuple[str, ...], make) -> FusedQuantLinear:
    """fused_linear.fuse's hook for quantized layers of one kind that read the same input (the caller checks):
    their per-output-row buffers `names` concatenated, `make(parts, bias)` the layer over them, and each layer's
    buffers views of the concatenation, as FusedLinear does for 16-bit layers."""
    first = layers[0]
    if len(layers) == 1:
        return FusedQuantLinear(first, [first.out_features])
    parts = {name: torch.cat([getattr(m, name) for m in layers]) for name in names}
    bias = None if first.bias is None else torch.cat([m.bias.detach() for m in layers])
    fused = make(parts, bias)
    start = 0
    for m in layers:
        n = m.out_features
        for name, t in parts.items():
            setattr(m, name, t[start : start + n])
        if bias is not None:
            m.bias.data = fused.bias.data[start : start + n]
        start += n
    return FusedQuantLinear(fused, [m.out_features for m in layers])


def quantize_linear(linear: nn.Module, method: str, group_size: int = 128) -> nn.Module:
    """The quantized layer of an nn.Linear (its weight read once; the layer itself is left as it was)."""
    return quantize_weight(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(), method,
                           group_size)


def quantize_weight(weight: torch.Tensor, bias: torch.Tensor | None, method: str, group_size: int = 128):
    if method == "fp8":
        return Fp8Linear.quantize(weight, bias)
    if method == "int4":
        return Int4Linear.quantize(weight, group_size, bias)
    if method == "int8":
        return Int8Linear.quantize(weight, bias)
    raise LongseqError(f"unknown quantization {method!r}")


def quantize_model(model: nn.Module, method: str, group_size: int = 128) -> nn.Module:
    """Swap every decoder linear of a loaded CausalLM for its quantized layer, in place; returns the model. (Loading
    with `quantization=` does the same weight by weight as the checkpoint streams in.)"""
    check_method_device(method, model.lm_head.weight.device)
    model.fuse_projections(False)  # fused views would keep the 16-bit weights alive
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and LINEAR.match(name + ".weight"):
            replace(model, name, quantize_linear(module, method, group_size))
    model.quantization = method
    return model


def replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)


def check_method_device(method: str, device: torch.device) -> None:
    if method == "fp8":
        from longseq.models.quant.fp8 import check_device

        check_device(device)


def quantization_of(model: nn.Module) -> str | None:
    """fp8 / int4 / int8 where the model's decoder linears are quantized, else None."""
    return getattr(model, "quantization", None)


class QuantLoader:
    """build_from_tensors' hook: `claim` takes the tensors of the linears it quantizes (quantizing a 16-bit weight
    at once, on the device, or gathering a stored quantized layer's parts), `covers` tells which of the model's
    weights it provides, and `install` swaps the layers in once the model is built."""

    def __init__(self, method: str | None, group_size: int, dtype: torch.dtype, device: torch.device,
                 stored=None, source: str = "model"):
        """`method`: what the caller asked for (None: as stored); `stored`: the checkpoint's quantized format
        (checkpoint.StoredFormat) or None for 16-bit weights."""
        if stored is not None and method is not None and method != stored.method:
            raise LongseqError(f"{source} is stored {stored.name} ({stored.method}); it cannot be served as "
                               f"{method}: drop --quantization or pass {stored.method}")
        self.method = method or (stored.method if stored is not None else None)
        check_method_device(self.method, device)
        self.group_size, self.dtype, self.device, self.stored, self.source = group_size, dtype, device, stored, source
        self.layers: dict[str, nn.Module] = {}

    def claim(self, name: str, tensor: torch.Tensor) -> bool:
        if self.stored is not None:
            return self.stored.claim(name, tensor)
        match = LINEAR.match(name)
        if match is None or match.group(2) != "weight":
            return False
        if not isinstance(tensor, torch.Tensor):  # a GGUF tensor's blocks, kept packed (gguf_int4.py, gguf_q8.py)
            self.layers[match.group(1)] = tensor.to_layer(self.device)
            return True
        weight = tensor.to(self.device, self.dtype)
        self.layers[match.group(1)] = quantize_weight(weight, None, self.method, self.group_size)
        return True

    def covers(self, name: str) -> bool:
        match = LINEAR.match(name)
        if match is None or match.group(2) != "weight":
            return False
        if self.stored is not None:
            return self.stored.provides(match.group(1))
        return match.group(1) in self.layers

    def install(self, model: nn.Module) -> None:
        layers = self.stored.build(self.dtype, self.device) if self.stored is not None else self.layers
        for prefix, layer in layers.items():
            old = model.get_submodule(prefix)
            if (layer.out_features, layer.in_features) != (old.out_features, old.in_features):
                raise LongseqError(f"{self.source}: weight {prefix}.weight has shape "
                                   f"{(layer.out_features, layer.in_features)}, config expects "
                                   f"{(old.out_features, old.in_features)}")
            if old.bias is not None:
                layer.bias = nn.Parameter(old.bias.detach(), requires_grad=False)
            replace(model, prefix, layer)
        self.layers = {}
        if self.stored is not None and self.stored.kv_scales:
            model.kv_cache_scales = dict(self.stored.kv_scales)
        model.quantization = self.method
