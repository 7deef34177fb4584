"""Training checkpoints: everything needed to resume exactly, written atomically, the last K kept.

Two formats, one entry (`save`, `load`, `load_trainable`). A single-process run writes
`out_dir/checkpoints/step-000100/`:
  trainable.safetensors   the trained parameters (LoRA factors + extras, or every weight for full fine-tuning)
  optimizer.pt            optimizer state
  trainer_state.pt        scheduler, loss scaler, RNG states, step and data position
  trainer_state.json      the same counters and the run's TrainConfig, for people and for `longseq export`
A multi-process run writes DCP shards instead (train/parallel/dcp.py); either resumes on any number of processes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from longseq.config import TrainConfig
from longseq.errors import LongseqError
from longseq.train.checkpoint_files import (
    PREFIX,
    checkpoint_root,
    publish,
    read_meta,
    rng_state,
    set_rng_state,
    trainable_state,
)
from longseq.train.parallel.dcp import (
    is_distributed_checkpoint,
    load_distributed,
    load_single_process,
    load_trainable_dcp,
    save_distributed,
)
from longseq.train.parallel.env import DistEnv


def save(out_dir: str | Path, cfg: TrainConfig, step: int, model: nn.Module, optimizer, scheduler, scaler,
         counters: dict[str, Any], env: DistEnv) -> Path:
    """The run's checkpoint: DCP when the run is distributed, else the single-process format."""
    if env.distributed:
        return save_distributed(out_dir, cfg, step, model, optimizer, scheduler, scaler, counters, env)
    return save_checkpoint(out_dir, cfg, step, model, optimizer, scheduler, scaler, counters)


def load(path: Path, model: nn.Module, optimizer, scheduler, scaler, env: DistEnv, seed: int) -> dict[str, Any]:
    """Resume from either format on any number of processes; returns the saved counters."""
    if is_distributed_checkpoint(path):
        return load_distributed(path, model, optimizer, scheduler, scaler, env, seed)
    if env.distributed:
        return load_single_process(path, model, optimizer, scheduler, scaler, env, seed)
    return load_checkpoint(path, model, optimizer, scheduler, scaler)


def save_checkpoint(
    out_dir: str | Path,
    cfg: TrainConfig,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    counters: dict[str, Any],
) -> Path:
    """Write the checkpoint of `step` (completed optimizer steps) next to its final place, then rename it there:
    a crash mid-write leaves at most a `.tmp-*` folder, never a damaged checkpoint. Then prune to keep_last."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(
        {
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(),
        },
        tmp / "trainer_state.pt",
    )
    meta = {"step": step, **counters, "config": cfg.to_dict()}
    (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2))
    publish(tmp, final, out_dir, cfg.keep_last)
    return final


def load_trainable(path: Path, model: nn.Module) -> None:
    if is_distributed_checkpoint(path):  # written by a multi-process run
        return load_trainable_dcp(path, model)
    try:
        state = load_file(str(path / "trainable.safetensors"), device=str(next(model.parameters()).device))
    except Exception as e:
        raise LongseqError(f"{path}: cannot read trainable.safetensors ({e})") from None
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        raise LongseqError(f"{path}: its trained parameters do not match this model and method")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, scaler) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler, scaler and RNG; return the saved counters."""
    meta = read_meta(path)
    load_trainable(path, model)
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=False))
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return meta
