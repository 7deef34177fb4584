"""GPU specifications: a data table, never literals in code. Dense (no sparsity) peak TFLOP/s from vendor sheets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense tensor-core peak
    fp16_tflops: float
    bandwidth_tbs: float  # HBM/GDDR, TB/s


# NVIDIA datasheets (H100 SXM5, H200 SXM, A100 SXM4, L40S, RTX 4090 with fp32 accumulate, V100 SXM2).
GPUS = {
    "H100": GPU("H100 80GB SXM", 80, 989.4, 989.4, 3.35),
    "H200": GPU("H200 141GB SXM", 141, 989.4, 989.4, 4.8),
    "A100": GPU("A100 80GB SXM", 80, 312.0, 312.0, 2.04),
    "L40S": GPU("L40S 48GB", 48, 362.1, 362.1, 0.864),
    "RTX 4090": GPU("RTX 4090 24GB", 24, 165.2, 165.2, 1.008),
    "V100": GPU("V100 32GB SXM2", 32, 125.0, 125.0, 0.9),
}


def find_gpu(device_name: str) -> GPU | None:
    """The table entry for a device name as CUDA reports it (e.g. 'NVIDIA H100 80GB HBM3')."""
    for key, gpu in GPUS.items():
        if key.lower() in device_name.lower():
            return gpu
    return None
