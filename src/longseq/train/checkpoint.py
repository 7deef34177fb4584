"""Training checkpoints: everything needed to resume exactly, written atomically, the last K kept.

Layout of `out_dir/checkpoints/step-000100/`:
  trainable.safetensors   the trained parameters (LoRA factors + extras, or every weight for full fine-tuning)
  optimizer.pt            optimizer state
  trainer_state.pt        scheduler, loss scaler, RNG states, step and data position
  trainer_state.json      the same counters and the run's TrainConfig, for people and for `longseq export`
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from longseq.config import TrainConfig
from longseq.errors import LongseqError

PREFIX = "step-"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    meta = {"step": step, **counters, "config": asdict(cfg)}
    (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2))
    publish(tmp, final, out_dir, cfg.keep_last)
    return final


def publish(tmp: Path, final: Path, out_dir: str | Path, keep_last: int) -> None:
    """fsync everything under `tmp`, rename it to `final` (replacing a previous save of that step whole), prune."""
    for f in tmp.rglob("*"):  # make the bytes durable before the rename publishes them
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():  # re-saving a step (e.g. Ctrl-C right after a periodic save): replace it whole
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for stale in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)


def resolve_checkpoint(resume: str, out_dir: str | Path) -> Path:
    if resume == "latest":
        found = list_checkpoints(out_dir)
        if not found:
            raise LongseqError(f"--resume latest: no checkpoint in {checkpoint_root(out_dir)}")
        return found[-1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise LongseqError(f"{path}: not a longseq checkpoint (no trainer_state.json)")
    return path


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise LongseqError(f"{path}: unreadable trainer_state.json ({e})") from None


def load_trainable(path: Path, model: nn.Module) -> None:
    if (path / "dcp").is_dir():  # written by a multi-process run
        from longseq.distributed.checkpoint import load_trainable_dcp

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
