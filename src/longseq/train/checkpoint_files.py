"""What every checkpoint format shares: where checkpoints live, how one is published atomically, its metadata.

Layout: `out_dir/checkpoints/step-000100/`, each holding `trainer_state.json` (step, data position and the run's
TrainConfig, for people and for `longseq export`) beside the format's own files (train/checkpoint.py,
train/parallel/dcp.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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
