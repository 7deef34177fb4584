"""Mixed precision: bf16 autocast, fp16 autocast with dynamic loss scaling, or plain fp32."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from longseq.errors import LongseqError


@dataclass
class Precision:
    name: str  # bf16 | fp16 | fp32
    frozen_dtype: torch.dtype  # dtype of weights that are not trained (the LoRA/QLoRA base)
    autocast_dtype: torch.dtype | None
    device_type: str

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        # fp16's 5-bit exponent underflows small gradients: scale the loss up, unscale before the step
        # (Micikevicius et al. 2018, arXiv 1710.03740). bf16 has fp32's range and needs none.
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


def resolve_precision(name: str, device: torch.device) -> Precision:
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LongseqError("this GPU has no bf16: use --precision fp16")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if name not in dtypes:
        raise LongseqError(f"unknown precision {name!r}; use auto, bf16, fp16 or fp32")
    half = dtypes[name]
    return Precision(name=name, frozen_dtype=half or torch.float32, autocast_dtype=half, device_type=device.type)
