"""GPU specifications: a data table, never literals in code. Dense (no sparsity) peak TFLOP/s from vendor sheets.

Memory is what CUDA reports as the device's total (torch `total_memory`), a little under the marketing figure.
Prices are approximate on-demand USD per GPU-hour at public GPU clouds (Lambda, RunPod, CoreWeave list prices,
2025); they vary by provider, region and commitment: pass your own with `longseq plan --price`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from longseq.errors import LongseqError


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # as CUDA reports it
    bf16_tflops: float  # dense tensor-core peak; 0: no bf16 tensor cores (V100)
    fp16_tflops: float
    bandwidth_tbs: float  # HBM/GDDR, TB/s
    fp8_tflops: float = 0.0  # 0: no fp8 tensor cores
    interconnect: str = "PCIe 4.0 x16"
    interconnect_gbs: float = 64.0  # GPU-to-GPU in a node, GB/s both directions together (vendor figure)
    price_per_hour: float = 0.0  # approximate on-demand USD per GPU-hour
    match: tuple[str, ...] = ()  # lower-case substrings of the CUDA device name

    def peak_tflops(self, precision: str) -> float:
        """Dense peak for a compute precision; bf16 falls back to fp16 on GPUs without bf16 tensor cores."""
        if precision == "fp8":
            return self.fp8_tflops
        if precision == "fp32":
            return self.fp16_tflops / 2  # TF32 tensor cores: half the fp16 rate on every GPU in this table
        if precision == "bf16" and self.bf16_tflops:
            return self.bf16_tflops
        return self.fp16_tflops

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30


# Datasheets: V100 SXM2, A100 SXM4 (40/80 GB), A800 SXM4, H100 SXM5, H800 SXM5, H200 SXM, L40S, GeForce RTX 4090
# (fp32 accumulate, the rate PyTorch matmuls run at). NVLink: V100 300, A100 600, A800 400, H100/H200 900, H800 400.
# Order matters for find_gpu: specific names (A100 40GB) before the generic ones (A100).
GPUS: dict[str, GPU] = {
    "V100": GPU("V100 32GB SXM2", 31.75, 0.0, 125.0, 0.9, 0.0, "NVLink 2", 300.0, 0.55, ("v100",)),
    "A100-40GB": GPU("A100 40GB SXM4", 39.59, 312.0, 312.0, 1.555, 0.0, "NVLink 3", 600.0, 1.29,
                     ("a100-sxm4-40gb", "a100-pcie-40gb", "a100 40", "a100-40")),
    "A100": GPU("A100 80GB SXM4", 80.0, 312.0, 312.0, 2.039, 0.0, "NVLink 3", 600.0, 1.79, ("a100",)),
    "A800": GPU("A800 80GB SXM4", 80.0, 312.0, 312.0, 2.039, 0.0, "NVLink 3 (400 GB/s)", 400.0, 1.79, ("a800",)),
    "H100": GPU("H100 80GB SXM5", 79.19, 989.4, 989.4, 3.35, 1978.9, "NVLink 4", 900.0, 2.99, ("h100",)),
    "H800": GPU("H800 80GB SXM5", 79.19, 989.4, 989.4, 3.35, 1978.9, "NVLink 4 (400 GB/s)", 400.0, 2.99, ("h800",)),
    "H200": GPU("H200 141GB SXM", 139.8, 989.4, 989.4, 4.8, 1978.9, "NVLink 4", 900.0, 3.79, ("h200",)),
    "L40S": GPU("L40S 48GB", 44.52, 362.05, 362.05, 0.864, 733.0, "PCIe 4.0 x16", 64.0, 0.99, ("l40s",)),
    "RTX 4090": GPU("RTX 4090 24GB", 23.99, 165.2, 165.2, 1.008, 330.3, "PCIe 4.0 x16", 64.0, 0.69,
                    ("rtx 4090", "rtx4090")),
}

# Between nodes: one 400 Gb/s InfiniBand NDR / RoCE port per GPU (typical of H100/H200 clusters), in GB/s.
INTER_NODE_GBS = 50.0


def find_gpu(device_name: str) -> GPU | None:
    """The table entry for a device name as CUDA reports it (e.g. 'NVIDIA H100 80GB HBM3')."""
    name = device_name.lower()
    for gpu in GPUS.values():
        if any(m in name for m in gpu.match):
            return gpu
    return None


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().removeprefix("nvidia").removeprefix("geforce"))


def get_gpu(name: str) -> GPU:
    """A GPU by table key ('H100', 'a100-40gb', 'rtx4090') or CUDA device name; LongseqError lists the known ones."""
    wanted = _key(name)
    for key, gpu in GPUS.items():
        if wanted in (_key(key), _key(gpu.name)):
            return gpu
    found = find_gpu(name)
    if found is not None and wanted:
        return found
    raise LongseqError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
