"""Per-step metrics: what a step measures (throughput, MFU, peak memory), written to JSONL (one object per line,
appended) and TensorBoard."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import torch

from longseq.config import ModelConfig
from longseq.plan.hardware import find_gpu
from longseq.plan.models import model_spec
from longseq.plan.params import count_params


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in matmuls (all linear layers and the LM head; not the embedding lookup); a
    mixture of experts' routed experts only (the planner's count, plan/params.py)."""
    if cfg.is_moe:
        return count_params(model_spec("run", cfg)).matmul
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


def drop_steps_after(path: Path, step: int) -> int:
    """Remove the lines of a metrics JSONL file logged after `step` (a run resumed from the checkpoint of `step`
    logs those steps again) and a last line cut short by a crash; the file is replaced whole (written beside it,
    then renamed). Returns the number of lines removed. Lines that are not metrics are kept as they are."""
    if not path.is_file():
        return 0
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    removed = 0
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            for line in src:
                if not line.endswith(b"\n") or _logged_step(line) > step:
                    removed += 1
                    continue
                dst.write(line)
            dst.flush()
            os.fsync(dst.fileno())
        if removed:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return removed


def _logged_step(line: bytes) -> float:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError, RecursionError):
        return float("-inf")
    return step if isinstance(step, int) and not isinstance(step, bool) else float("-inf")


class MetricsWriter:
    def __init__(self, out_dir: Path, tensorboard: bool = True, enabled: bool = True, resume_step: int | None = None):
        """`resume_step`: the run resumed from the checkpoint of that step; what was logged after it goes."""
        self.enabled = enabled  # multi-process runs: rank 0 writes, the others hold a disabled writer
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            drop_steps_after(out_dir / "metrics.jsonl", resume_step)
        self.file = open(out_dir / "metrics.jsonl", "a", buffering=1)  # line-buffered: a crash loses no line
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard hides the events of this step and later ones written before the resume
                purge = resume_step + 1 if resume_step is not None else None
                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)
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
