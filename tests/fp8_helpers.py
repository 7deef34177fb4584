"""Triton kernel tests' device, e4m3 values computed by a kernel against PyTorch's, and the tame model the
quantization tests round (importable from every test folder)."""

import os

import torch

ON_GPU = os.environ.get("LONGSEQ_TEST_CUDA") == "1" and torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")  # Triton kernels need CUDA tensors unless interpreted (CI)


def assert_same_e4m3(q: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal e4m3 values on a GPU (cvt.rn.satfinite). Triton's CPU interpreter (triton 3.x) emulates the cast with
    slips of its own: a value rounding up into the next power of two keeps its old exponent (124.9 -> 64, not 128),
    ties round away from even (-68 -> -72) and subnormals round down; there, one e4m3 step or that half is allowed."""
    q, ref = q.float(), ref.float()
    same = q == ref
    if os.environ.get("TRITON_INTERPRET") == "1":
        step = torch.exp2(ref.abs().clamp(min=2**-6).log2().floor() - 3)
        power_of_two = ref.abs().log2() == ref.abs().log2().round()
        same |= ((q - ref).abs() <= step) | (power_of_two & (q * 2 == ref))
    assert same.all(), f"{(~same).sum()} values differ"


def tame_model(seed: int):
    """tiny_models.random_model(seed) with its matrices scaled to N(0, 0.06): a tame network, where a quantizer's own
    rounding error shows; and (2, 12) token ids for it."""
    from tiny_models import random_model

    model = random_model(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(0.3)
    return model, torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(seed))
