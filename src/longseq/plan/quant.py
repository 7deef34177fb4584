"""Bytes per weight of each storage format (a data table), for training (QLoRA's NF4) and serving."""

from __future__ import annotations

from dataclasses import dataclass

from longseq.errors import LongseqError


def nf4_bytes_per_param(block: int = 64, scaler_block: int = 256, second_level_bytes: int = 4) -> float:
    """NF4 with double quantization: 4 bits a weight, one 8-bit absmax per `block` weights, one second-level scale
    per `scaler_block` first-level ones (Dettmers et al. 2023, arXiv 2305.14314, §3: 0.127 bits/param overhead
    at 64 / 256 with fp32 second-level scales; torchao keeps them in the weight dtype, 2 bytes)."""
    return 0.5 + 1 / block + second_level_bytes / (block * scaler_block)


@dataclass(frozen=True)
class WeightFormat:
    name: str
    linear_bytes: float  # bytes per decoder linear weight
    other_bytes: float  # embeddings, LM head, norms (kept in 16 bits by quantized formats)
    note: str


def int4_bytes_per_param(group: int) -> float:
    """longseq's int4 (models/quant/int4.py): 4 bits a weight, a 16-bit scale and a 16-bit zero per `group` inputs
    (GPTQ / AWQ checkpoints load into the same layout)."""
    return 0.5 + 4 / group


def int8_bytes_per_param(group: int = 32) -> float:
    """longseq's int8 (models/quant/int8.py, GGUF Q8_0): a byte a weight and a 16-bit scale per `group` inputs."""
    return 1 + 2 / group


# int8: an fp16 scale per 32 inputs (longseq's --quantization int8 and GGUF's Q8_0: 8.5 bits a weight, ggml's
# block_q8_0 in ggml-common.h); int4: a 16-bit scale + zero per group of inputs
# (longseq's --quantization int4, AWQ, GPTQ); fp8: e4m3 with a float32 scale per output channel (longseq's
# --quantization fp8: 4 bytes per row of K weights, 0.1% at K = 4096, left out); nf4: QLoRA double quantization.
FORMATS: dict[str, WeightFormat] = {
    "fp32": WeightFormat("fp32", 4.0, 4.0, "float32"),
    "bf16": WeightFormat("bf16", 2.0, 2.0, "bfloat16"),
    "fp16": WeightFormat("fp16", 2.0, 2.0, "float16"),
    "fp8": WeightFormat("fp8", 1.0, 2.0, "e4m3 weights, a scale per output channel; embeddings and LM head in 16 "
                        "bits"),
    "int8": WeightFormat("int8", int8_bytes_per_param(), 2.0, "Q8_0: an fp16 scale per 32 inputs; embeddings and LM "
                         "head in 16 bits"),
    "int4": WeightFormat("int4", int4_bytes_per_param(128), 2.0, "group 128, 16-bit scale + zero (AWQ / GPTQ)"),
    **{f"int4-g{g}": WeightFormat(f"int4-g{g}", int4_bytes_per_param(g), 2.0, f"group {g}, 16-bit scale + zero")
       for g in (32, 64, 128)},
    "nf4": WeightFormat("nf4", nf4_bytes_per_param(), 2.0, "QLoRA NF4, double-quantized scales"),
}
# KV cache bytes per value: fp8 is longseq's --kv-cache-dtype fp8 (e4m3, one scale per layer for K and for V).
KV_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}


def dequant_transient_bytes(quant: str, largest_linear: int) -> float:
    """Bytes a serving step holds beside its activations to run a quantized layer: int4 prefill dequantizes the
    largest (fused) weight to 16 bits before its matmul (models/quant/int4.py: 2 bytes a weight, plus 1 byte of
    unpacked nibbles while it converts), int8 prefill likewise (2 bytes a weight, written by one Triton pass:
    models/quant/int8_kernel.py); fp8 and 16-bit formats hold nothing of the kind."""
    if quant.startswith("int4"):
        return 3.0 * largest_linear
    return 2.0 * largest_linear if quant == "int8" else 0.0


def get_format(name: str) -> WeightFormat:
    if name not in FORMATS:
        raise LongseqError(f"unknown weight format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]
