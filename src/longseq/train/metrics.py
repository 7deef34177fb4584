"""Per-step metrics: what a step measures (throughput, MFU, peak memory), written to JSONL (one object per line,
appended) and TensorBoard."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch

from longseq.config import ModelConfig
from longseq.plan.hardware import find_gpu


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in matmuls (all linear layers and the LM head; not the embedding lookup)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = cfg.hidden_size * (2 * q + 2 * kv) + 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_layers * per_layer + cfg.vocab_size * cfg.hidden_size


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The GPU's dense peak FLOP/s at the run's precision (hardware table), or None where unknown."""
    if device.type != "cuda":
        return None
    gpu = find_gpu(torch.cuda.get_device_name(device))
    if gpu is None:
        return None
    return (gpu.fp16_tflops if precision == "fp16" else gpu.bf16_tflops) * 1e12


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


class MetricsWriter:
    def __init__(self, out_dir: Path, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled  # multi-process runs: rank 0 writes, the others hold a disabled writer
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(out_dir / "metrics.jsonl", "a", buffering=1)  # line-buffered: a crash loses no line
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: JSONL only
                self.tb = None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
