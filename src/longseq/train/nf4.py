"""QLoRA's frozen-weight format: NF4 with double-quantized scales (Dettmers et al. 2023, arXiv 2305.14314), through
torchao. Shared by LoRALinear (train/lora.py) and the stacked experts' LoRAExperts (train/expert_lora.py)."""

from __future__ import annotations

import torch

from longseq.errors import LongseqError

NF4_BLOCK = 64  # QLoRA: one absmax scale per 64 weights


def quiet_torchao() -> None:
    # torchao warns at import about optional CUDA extensions (mxfp8, cutlass) that NF4 and 8-bit Adam do not use.
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # a deprecation notice torchao triggers


def to_nf4_weight(weight: torch.Tensor) -> torch.Tensor:
    """Quantize a frozen weight to NF4 with double quantization (the scales themselves in 8 bits, blocks of 256)."""
    # torchao, PyTorch's own quantization library: NF4 with double-quantized scales, pure PyTorch (CPU and GPU).
    quiet_torchao()
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    if weight.numel() % NF4_BLOCK:
        raise LongseqError(f"QLoRA needs weight sizes divisible by {NF4_BLOCK}; got shape {tuple(weight.shape)}")
    num_scales = weight.numel() // NF4_BLOCK
    scaler_block = next(b for b in (256, 128, 64, 32, 16, 8, 4, 2, 1) if num_scales % b == 0)  # 256 at real sizes
    return to_nf4(weight, block_size=NF4_BLOCK, scaler_block_size=scaler_block)


def is_nf4(weight: torch.Tensor) -> bool:
    return type(weight).__name__ == "NF4Tensor"  # by name: plain LoRA must not need torchao at all
