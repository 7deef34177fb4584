"""Training checkpoints: everything needed to resume exactly, written atomically, the last K kept.

Two formats, one entry (`save`, `load`, `load_trainable`). A single-process run writes
`out_dir/checkpoints/step-000100/`:
  trainable.safetensors   the trained parameters (LoRA factors + extras, or every weight for full fine-tuning)
  optimizer.pt            optimizer state: tensors and plain values
  trainer_state.pt        scheduler, loss scaler and RNG states: tensors and plain values
  trainer_state.json      step, data position, format and the run's TrainConfig, for people and `longseq export`
A multi-process run writes DCP shards instead (train/parallel/dcp.py); either resumes on any number of processes.
Every file is read without running code from it: safetensors, JSON, and `.pt` files through
`torch.load(weights_only=True)` (checkpoint_files.load_state_file).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from longseq.config import TrainConfig
from longseq.errors import LongseqError, first_line
from longseq.train.checkpoint_files import (
    FORMAT,
    PREFIX,
    checkpoint_root,
    load_optimizer_state,
    load_schedule_state,
    load_state_file,
    publish,
    read_meta,
    rng_state,
    set_rng_state,
    state_entry,
    temporary_folder,
    trainable_state,
    writer_tag,
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
    tmp = temporary_folder(final, writer_tag())
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
    meta = {"step": step, **counters, "format": FORMAT, "config": cfg.to_dict()}
    (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2))
    publish(tmp, final, out_dir, cfg.keep_last)
    return final


def load_trainable(path: Path, model: nn.Module) -> None:
    if is_distributed_checkpoint(path):  # written by a multi-process run
        return load_trainable_dcp(path, model)
    try:
        state = load_file(str(path / "trainable.safetensors"), device=str(next(model.parameters()).device))
    except Exception as e:
        raise LongseqError(f"{path}: cannot read trainable.safetensors ({first_line(e, 200)})") from None
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected or any(t.shape != params[n].shape for n, t in state.items()):
        raise LongseqError(f"{path}: its trained parameters do not match this model and method")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, scaler) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler, scaler and RNG; return the saved counters."""
    meta = read_meta(path)
    device = next(model.parameters()).device
    optim_state = load_state_file(path / "optimizer.pt", meta, map_location=device)
    state = load_state_file(path / "trainer_state.pt", meta)
    load_trainable(path, model)
    load_optimizer_state(optimizer, optim_state, path / "optimizer.pt")
    load_schedule_state(state, path / "trainer_state.pt", scheduler, scaler)
    set_rng_state(state_entry(state, "rng", path / "trainer_state.pt"), path / "trainer_state.pt")
    return meta
