"""Checkpoints of multi-process runs: torch.distributed.checkpoint (DCP), resumable on any number of processes.

Layout of `out_dir/checkpoints/step-000100/` (next to single-process checkpoints, same `trainer_state.json`):
  dcp/                    the trained weights and optimizer state, each rank writing its own shards; DCP records
                          which slice of which tensor every file holds, so a run with another world size (or one
                          process without any process group) reads back exactly the slices it needs (resharding)
  trainer_state.pt        scheduler and loss scaler (the same on every rank)
  rng-rank{r}.pt          each rank's RNG streams (dropout)
  trainer_state.json      step, data position, world size and the run's TrainConfig

Atomic as the single-process ones: every rank writes into one temporary folder, and after a barrier rank 0
fsyncs and renames it. The folder must be on storage all nodes share (DCP's file system writer).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from longseq.config import TrainConfig
from longseq.errors import LongseqError, first_line
from longseq.train.checkpoint_files import (
    PREFIX,
    checkpoint_root,
    publish,
    read_meta,
    rng_state,
    set_rng_state,
    trainable_state,
)
from longseq.train.optim import trainable_groups
from longseq.train.parallel.env import DistEnv

DCP_DIR = "dcp"
# Only what trains is saved (LoRA: the adapters), as in single-process checkpoints; the base comes from the model.
_SAVE = StateDictOptions(ignore_frozen_params=True)
_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)


def is_distributed_checkpoint(path: Path) -> bool:
    return (path / DCP_DIR).is_dir()


def save_distributed(out_dir: str | Path, cfg: TrainConfig, step: int, model: nn.Module, optimizer, scheduler,
                     scaler, counters: dict[str, Any], env: DistEnv) -> Path:
    """Collective: every rank calls it. `model` is the CausalLM (sharded or replicated in place)."""
    root = checkpoint_root(out_dir)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}"  # one name all ranks agree on (not the pid)
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    env.barrier()
    msd, osd = get_state_dict(model, optimizer, options=_SAVE)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp / DCP_DIR)
    torch.save(rng_state(), tmp / f"rng-rank{env.rank}.pt")
    if env.is_main:
        torch.save({"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None},
                   tmp / "trainer_state.pt")
        meta = {"step": step, **counters, "world_size": env.world_size, "config": cfg.to_dict()}
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2))
    env.barrier()  # every rank's shards are written
    if env.is_main:
        publish(tmp, final, out_dir, cfg.keep_last)
    env.barrier()  # nobody goes on (or exits) before the checkpoint is in place
    return final


def load_distributed(path: Path, model: nn.Module, optimizer, scheduler, scaler, env: DistEnv,
                     seed: int) -> dict[str, Any]:
    """Restore a DCP checkpoint written by any number of processes into this run (any number, 1 included, with or
    without a process group): each rank reads its own shards of every tensor."""
    meta = read_meta(path)
    msd, osd = get_state_dict(model, optimizer, options=_SAVE)
    state = {"model": msd, "optim": osd}
    try:
        _dcp_load(state, path, no_dist=not env.distributed)
    except Exception as e:  # DCP wraps per-rank failures; one line is what the user needs
        raise LongseqError(f"{path}: cannot read the distributed checkpoint ({first_line(e)})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_LOAD)
    _load_trainer_state(path, scheduler, scaler)
    rng = path / f"rng-rank{env.rank}.pt"
    if meta.get("world_size") == env.world_size and rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    else:  # another process count: the saved streams do not map onto these ranks; restart them reproducibly
        _reseed(seed, meta["step"], env.rank)
    return meta


def load_single_process(path: Path, model: nn.Module, optimizer, scheduler, scaler, env: DistEnv,
                        seed: int) -> dict[str, Any]:
    """Continue a single-process checkpoint (safetensors + optimizer.pt) on several processes: both are full
    tensors, which every rank passes in and DCP's state-dict API shards (FSDP) or copies (DDP) into place."""
    meta = read_meta(path)
    device = torch.device("cpu")
    weights = load_file(str(path / "trainable.safetensors"), device=str(device))
    saved = torch.load(path / "optimizer.pt", map_location=device, weights_only=False)
    # optimizer.pt numbers parameters 0, 1, ... in build_optimizer's order; DCP's API wants their names.
    names = [n for group in trainable_groups(model) for n, _ in group]
    if len(names) != sum(len(g["params"]) for g in saved["param_groups"]):
        raise LongseqError(f"{path}: its optimizer state does not match this model and method")
    osd = {"state": {names[i]: s for i, s in saved["state"].items()},
           "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False))
    _load_trainer_state(path, scheduler, scaler)
    _reseed(seed, meta["step"], env.rank)
    return meta


def load_trainable_dcp(path: Path, model: nn.Module) -> None:
    """The trained weights of a DCP checkpoint into a plain (unsharded) model, without a process group: export."""
    state = {"model": trainable_state(model)}  # views of the parameters: DCP loads into them in place
    try:
        _dcp_load(state, path, no_dist=True)
    except Exception as e:
        raise LongseqError(f"{path}: its trained parameters do not match this model and method ({first_line(e)})"
                           ) from None


def _dcp_load(state: dict[str, Any], path: Path, no_dist: bool) -> None:
    with warnings.catch_warnings():  # one process reading without a process group is intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path / DCP_DIR, no_dist=no_dist)


def _load_trainer_state(path: Path, scheduler, scaler) -> None:
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])


def _reseed(seed: int, step: int, rank: int) -> None:
    torch.manual_seed(seed + 1_000_003 * step + rank)
