"""`longseq train --plan auto`: pick the memory techniques a run needs from the planner and the memory there is.

The candidates, fastest first: no recompute; keep_attention (recompute all but attention) with as many of the
last layers plain (recomputing only the SwiGLU product) as fit, all of them first; selective; keep_attention,
untiled then with tiled norms and MLPs; full with plain layers, full, untiled then tiled; layer inputs offloaded to
pinned host memory (keeping on the GPU as many of the last layers' inputs as fit). The first whose predicted peak
(longseq.plan, validated against measured H100 runs) fits the GPU's memory wins. A flag the user set
(`--recompute`, `--tile-tokens`, `--offload-keep`, `--plain-layers`) is kept as given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from longseq.config import ModelConfig, TrainConfig
from longseq.config.policy import DEFAULT_TILE_TOKENS, PLAIN_LAYER_POLICIES
from longseq.models import fused
from longseq.plan.memory import ALLOCATOR_SLACK, CUDA_CONTEXT_GIB, train_memory
from longseq.plan.models import ModelSpec
from longseq.plan.setup import Parallelism, parallelism_for, setup_for

GIB = 2**30
MARGIN = 0.95  # of the budget: the planner's error on measured runs is within 3%


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
        if self.recompute == "offloaded":
            offloaded = max(0, self.num_layers - self.offload_keep)
            parts[0] += (f" ({offloaded} of {self.num_layers} layer inputs in pinned host memory, "
                         f"{self.host_gib:.1f} GiB)")
        parts.append(f"norm/MLP tiles of {self.tile:,} tokens" if self.tile else "untiled norms/MLP")
        text = ", ".join(parts) + f"; predicted peak {self.predicted_gib:.1f} GiB"
        if self.budget_gib is not None:
            text += f" of {self.budget_gib:.1f} GiB"
        return ("planned: " if self.auto else "") + text


def predict(model_cfg: ModelConfig, cfg: TrainConfig, precision: str, packed: bool, recompute: str,
            tile: int | None, keep: int, parallel: Parallelism | None = None, plain: int = 0) -> tuple[float, float]:
    """(peak device bytes without the model's load peak, pinned host bytes) from the planner."""
    setup = setup_for(cfg, precision=precision, packed=packed, recompute=recompute, tile=tile, offload_keep=keep,
                      plain_layers=plain, fused=fused.available(), parallel=parallel)
    mem = train_memory(ModelSpec("run", model_cfg), setup)
    return mem.allocated * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB * GIB, mem.activation.host


def device_budget(device: torch.device) -> tuple[float, float]:
    """(bytes this process may use on the device, bytes of host memory available), measured now."""
    host = _meminfo("MemAvailable")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) + CUDA_CONTEXT_GIB * GIB, host
    return host + _meminfo("_rss"), host


Candidate = tuple[str, int | None, int, int]  # recompute, tile, offload_keep, plain_layers


def candidates(cfg: TrainConfig, num_layers: int, device: torch.device,
               distributed: bool = False) -> list[Candidate]:
    """(recompute, tile, offload_keep, plain_layers) to try, fastest first, restricted by what the user fixed.
    Host offload is single-process only for now (untested under DDP / FSDP hooks)."""
    tile_on = cfg.tile_tokens if cfg.tile_tokens else DEFAULT_TILE_TOKENS

    def plain(policy: str, most: int) -> list[Candidate]:  # each plain layer buys back one layer's recompute
        return [(policy, None, 0, n) for n in range(most, 0, -1)]

    out: list[Candidate] = [("none", None, 0, 0), *plain("keep_attention", num_layers), ("selective", None, 0, 0),
                            ("keep_attention", None, 0, 0), ("keep_attention", tile_on, 0, 0),
                            *plain("full", num_layers - 1), ("full", None, 0, 0), ("full", tile_on, 0, 0)]
    if device.type == "cuda" and not distributed:  # host offload saves device memory only off the host
        out += [("offloaded", tile_on, keep, 0) for keep in range(num_layers - 1, -1, -1)]
    if cfg.recompute != "auto":
        out = [c for c in out if c[0] == cfg.recompute] or [(cfg.recompute, tile_on, 0, 0)]
    if cfg.tile_tokens is not None:
        out = [(r, cfg.tile_tokens or None, k, n) for r, _, k, n in out]
    if cfg.offload_keep is not None:
        out = [(r, t, cfg.offload_keep, n) for r, t, _, n in out]
    if cfg.plain_layers is not None:
        out = [(r, t, k, min(cfg.plain_layers, num_layers) if r in PLAIN_LAYER_POLICIES else 0)
               for r, t, k, _ in out]
    return list(dict.fromkeys(out))


def choose(model_cfg: ModelConfig, cfg: TrainConfig, precision: str, device: torch.device,
           packed: bool, parallel: Parallelism | None = None) -> MemoryChoice:
    """The fastest candidate predicted to fit; the most frugal one (with a warning) when none does.
    `parallel`: the run's processes, for FSDP shards and Ulysses sequence shards."""
    layers = model_cfg.num_layers
    distributed = parallel is not None and parallel.num_gpus > 1
    if cfg.plan == "off":
        recompute = "none" if cfg.recompute == "auto" else cfg.recompute
        keep = cfg.offload_keep if cfg.offload_keep is not None else 0
        plain = min(cfg.plain_layers or 0, layers) if recompute in PLAIN_LAYER_POLICIES else 0
        peak, host = predict(model_cfg, cfg, precision, packed, recompute, cfg.tile_tokens or None, keep, parallel,
                             plain)
        return MemoryChoice(recompute, cfg.tile_tokens or None, keep, peak / GIB, None, host / GIB, layers, False,
                            plain_layers=plain)
    budget, host_free = device_budget(device)
    auto = (cfg.recompute == "auto" or cfg.tile_tokens is None or cfg.offload_keep is None
            or cfg.plain_layers is None)
    best = None
    for recompute, tile, keep, plain in candidates(cfg, layers, device, distributed):
        peak, host = predict(model_cfg, cfg, precision, packed, recompute, tile, keep, parallel, plain)
        choice = MemoryChoice(recompute, tile, keep, peak / GIB, budget / GIB, host / GIB, layers, auto,
                              host_free / GIB, plain)
        if choice.fits:
            return choice
        if best is None or choice.predicted_gib < best.predicted_gib:
            best = choice
    return best


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
    model.set_recompute(choice.recompute, keep_on_gpu=choice.offload_keep, plain_layers=choice.plain_layers)
    model.set_tiling(choice.tile)
    if world_size == 1:  # page-lock the offloaded layer inputs' host buffers now, not in the first step
        model.reserve_offload(cfg.batch_size, cfg.seq_len)
    return choice
