"""`longseq train --plan auto`: pick the memory techniques a run needs (plan/auto.py) from the memory there is,
measured on this machine, and set them on the model."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from longseq.config import ModelConfig, TrainConfig
from longseq.config.policy import PLAIN_LAYER_POLICIES
from longseq.models import fused
from longseq.plan import auto
from longseq.plan.auto import MARGIN
from longseq.plan.memory import CUDA_CONTEXT_GIB
from longseq.plan.models import model_spec
from longseq.plan.setup import Parallelism, parallelism_for, setup_for

GIB = 2**30


@dataclass
class MemoryChoice:
    recompute: str
    tile: int | None  # tokens per RMSNorm / MLP tile; None: whole sequences
    offload_keep: int  # layers whose inputs stay on the GPU under "offloaded"
    predicted_gib: float  # predicted peak on the device
    budget_gib: float | None  # what the device has for this run; None when not measured (plan off)
    host_gib: float  # pinned host memory for offloaded layer inputs
    num_layers: int
    auto: bool  # chosen by the planner (else: as the flags say)
    host_budget_gib: float | None = None  # available host memory
    plain_layers: int = 0  # keep_attention / full: the last layers that recompute only the SwiGLU product
    attention_layers: int = 0  # full: the layers below the plain ones that recompute as keep_attention

    @property
    def fits(self) -> bool:
        device = self.budget_gib is None or self.predicted_gib <= self.budget_gib * MARGIN
        return device and (self.host_budget_gib is None or self.host_gib <= self.host_budget_gib * MARGIN)

    def describe(self) -> str:
        parts = [f"recompute {self.recompute}"]
        if self.plain_layers >= self.num_layers:
            parts = ["recompute only the SwiGLU product"]
        elif self.plain_layers:
            parts[0] += f" (the last {self.plain_layers} of {self.num_layers} layers: the SwiGLU product only)"
        if self.attention_layers:
            parts[0] += f" (the last {self.attention_layers} of {self.num_layers} layers: keep_attention)"
        if self.recompute == "offloaded":
            offloaded = max(0, self.num_layers - self.offload_keep)
            parts[0] += (f" ({offloaded} of {self.num_layers} layer inputs in pinned host memory, "
                         f"{self.host_gib:.1f} GiB)")
        parts.append(f"norm/MLP tiles of {self.tile:,} tokens" if self.tile else "untiled norms/MLP")
        text = ", ".join(parts) + f"; predicted peak {self.predicted_gib:.1f} GiB"
        if self.budget_gib is not None:
            text += f" of {self.budget_gib:.1f} GiB"
        return ("planned: " if self.auto else "") + text


def fixed(cfg: TrainConfig) -> auto.Fixed:
    # Tensor parallelism's norms and MLPs run on DTensors, which the tiles do not split: never tiled.
    return auto.Fixed(cfg.recompute, cfg.tile_tokens if cfg.tp == 1 else 0, cfg.offload_keep, cfg.plain_layers,
                      cfg.attention_layers)


def predict(model_cfg: ModelConfig, cfg: TrainConfig, precision: str, packed: bool, recompute: str,
            tile: int | None, keep: int, parallel: Parallelism | None = None, plain: int = 0,
            kept: int = 0) -> tuple[float, float]:
    """(peak device bytes without the model's load peak, pinned host bytes) from the planner."""
    setup = setup_for(cfg, precision=precision, packed=packed, recompute=recompute, tile=tile, offload_keep=keep,
                      plain_layers=plain, attention_layers=kept, fused=fused.available(), parallel=parallel)
    return auto.predict(model_spec("run", model_cfg), setup)


def device_budget(device: torch.device) -> tuple[float, float]:
    """(bytes this process may use on the device, bytes of host memory available), measured now."""
    host = _meminfo("MemAvailable")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) + CUDA_CONTEXT_GIB * GIB, host
    return host + _meminfo("_rss"), host


def candidates(cfg: TrainConfig, num_layers: int, device: torch.device,
               distributed: bool = False) -> list[auto.Candidate]:
    """(recompute, tile, offload_keep, plain_layers) to try, fastest first, restricted by what the user fixed.
    Host offload is single-process only for now (untested under DDP / FSDP hooks)."""
    return auto.candidates(fixed(cfg), num_layers, offload=device.type == "cuda" and not distributed)


def choose(model_cfg: ModelConfig, cfg: TrainConfig, precision: str, device: torch.device,
           packed: bool, parallel: Parallelism | None = None) -> MemoryChoice:
    """The fastest candidate predicted to fit; the most frugal one (with a warning) when none does.
    `parallel`: the run's processes, for FSDP shards and Ulysses sequence shards."""
    layers = model_cfg.num_layers
    if cfg.plan == "off":
        recompute = "none" if cfg.recompute == "auto" else cfg.recompute
        keep = cfg.offload_keep if cfg.offload_keep is not None else 0
        plain = min(cfg.plain_layers or 0, layers) if recompute in PLAIN_LAYER_POLICIES else 0
        kept = min(cfg.attention_layers or 0, layers - plain) if recompute == "full" else 0
        peak, host = predict(model_cfg, cfg, precision, packed, recompute, cfg.tile_tokens or None, keep, parallel,
                             plain, kept)
        return MemoryChoice(recompute, cfg.tile_tokens or None, keep, peak / GIB, None, host / GIB, layers, False,
                            plain_layers=plain, attention_layers=kept)
    budget, host_free = device_budget(device)
    if cfg.gpu_memory is not None:
        budget = min(budget, cfg.gpu_memory * GIB)
    distributed = parallel is not None and parallel.num_gpus > 1
    base = setup_for(cfg, precision=precision, packed=packed, recompute="none", fused=fused.available(),
                     parallel=parallel)
    c = auto.choose(model_spec("run", model_cfg), base, fixed(cfg), budget, host_free,
                    offload=device.type == "cuda" and not distributed)
    return MemoryChoice(c.recompute, c.tile, c.offload_keep, c.device_bytes / GIB, budget / GIB, c.host_bytes / GIB,
                        layers, fixed(cfg).auto, host_free / GIB, c.plain_layers, c.attention_layers)


def _meminfo(key: str) -> float:
    """Bytes from /proc (Linux): a /proc/meminfo field, or `_rss` for this process's resident set."""
    try:
        if key == "_rss":
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")  # not Linux: no limit known


def plan_memory(model, cfg: TrainConfig, precision: str, device: torch.device, packed: bool,
                world_size: int = 1) -> MemoryChoice:
    """Choose recompute / tiling / offload for a run and set them on the model (a CausalLM)."""
    choice = choose(model.config, cfg, precision, device, packed, parallelism_for(cfg, world_size))
    model.set_recompute(choice.recompute, keep_on_gpu=choice.offload_keep, plain_layers=choice.plain_layers,
                        attention_layers=choice.attention_layers)
    model.set_tiling(choice.tile)
    if world_size == 1:  # page-lock the offloaded layer inputs' host buffers now, not in the first step
        model.reserve_offload(cfg.batch_size, cfg.seq_len)
    return choice
