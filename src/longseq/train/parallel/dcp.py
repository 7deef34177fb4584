"""Checkpoints of multi-process runs: torch.distributed.checkpoint (DCP), resumable on any number of processes.

Layout of `out_dir/checkpoints/step-000100/` (next to single-process checkpoints, same `trainer_state.json`):
  dcp/                    the trained weights and optimizer state, each rank writing its own shards; DCP records
                          which slice of which tensor every file holds, so a run with another world size (or one
                          process without any process group) reads back exactly the slices it needs (resharding)
  trainer_state.pt        scheduler and loss scaler (the same on every rank)
  rng-rank{r}.pt          each rank's RNG streams (dropout)
  trainer_state.json      step, data position, world size, format and the run's TrainConfig

Atomic as the single-process ones: every rank writes into one temporary folder (named for rank 0's host and
process), and after a barrier rank 0 fsyncs and renames it. The folder must be on storage all nodes share (DCP's
file system writer).

Read without running code from the files: DCP's own reader unpickles its `.metadata` file with plain `pickle` and
its non-tensor entries with `torch.load(weights_only=False)`; `_SafeReader` and `_SafePlanner` replace both, the first
with an unpickler that builds only DCP's metadata classes, the second with weights_only=True.
"""

from __future__ import annotations

import io
import json
import logging
import pathlib
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from longseq.config import TrainConfig
from longseq.errors import LongseqError, first_line
from longseq.train.checkpoint_files import (
    FORMAT,
    PREFIX,
    checkpoint_root,
    load_schedule_state,
    load_state_file,
    publish,
    read_meta,
    rng_state,
    set_rng_state,
    temporary_folder,
    trainable_state,
    writer_tag,
)
from longseq.train.optim import trainable_groups
from longseq.train.parallel import experts
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
    tmp = temporary_folder(final, env.broadcast_object(writer_tag()))  # one name for all ranks: rank 0's
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    env.barrier()
    msd, osd = get_state_dict(model, optimizer, options=_SAVE)
    state = {"model": msd, "optim": osd}
    if env.ep > 1:  # the split experts as the full stacks they are parts of
        experts.global_views(state, model, env)
    dcp.save(state, checkpoint_id=tmp / DCP_DIR)
    torch.save(rng_state(), tmp / f"rng-rank{env.rank}.pt")
    if env.is_main:
        torch.save({"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None},
                   tmp / "trainer_state.pt")
        meta = {"step": step, **counters, "world_size": env.world_size, "format": FORMAT, "config": cfg.to_dict()}
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
    swapped = experts.global_views(state, model, env) if env.ep > 1 else {}  # this rank's rows of the stacks
    try:
        _dcp_load(state, path, no_dist=not env.distributed)
    except Exception as e:  # DCP wraps per-rank failures; one line is what the user needs
        raise LongseqError(f"{path}: cannot read the distributed checkpoint ({first_line(e)})") from None
    experts.restore_locals(state, swapped)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_LOAD)
    _load_trainer_state(path, meta, scheduler, scaler)
    rng = path / f"rng-rank{env.rank}.pt"
    if meta.get("world_size") == env.world_size and rng.is_file():
        set_rng_state(load_state_file(rng, meta), rng)
    else:  # another process count: the saved streams do not map onto these ranks; restart them reproducibly
        _reseed(seed, meta["step"], env.rank)
    return meta


def load_single_process(path: Path, model: nn.Module, optimizer, scheduler, scaler, env: DistEnv,
                        seed: int) -> dict[str, Any]:
    """Continue a single-process checkpoint (safetensors + optimizer.pt) on several processes: both are full
    tensors, which every rank passes in and DCP's state-dict API shards (FSDP) or copies (DDP) into place."""
    meta = read_meta(path)
    device = torch.device("cpu")
    try:
        weights = load_file(str(path / "trainable.safetensors"), device=str(device))
    except Exception as e:
        raise LongseqError(f"{path}: cannot read trainable.safetensors ({first_line(e, 200)})") from None
    saved = load_state_file(path / "optimizer.pt", meta, map_location=device)
    # optimizer.pt numbers parameters 0, 1, ... in build_optimizer's order; DCP's API wants their names.
    names = _optimizer_names(model, weights)
    here = {n for n, p in model.named_parameters() if p.requires_grad}  # a pipeline stage: some of them
    try:
        if len(names) != sum(len(g["params"]) for g in saved["param_groups"]) or not here <= set(names):
            raise ValueError("another number of parameters")
        groups = [{**g, "params": [names[i] for i in g["params"] if names[i] in here]}
                  for g in saved["param_groups"]]
        osd = {"state": {names[i]: s for i, s in saved["state"].items() if names[i] in here},
               "param_groups": [g for g in groups if g["params"]]}
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise LongseqError(f"{path}: its optimizer state does not match this model and method ({first_line(e)})"
                           ) from None
    for name, rows in experts.local_slices(model, env).items():  # expert parallel: this rank's experts
        if name in weights:
            weights[name] = weights[name][rows]
        entry = osd["state"].get(name, {})
        for key, t in entry.items():
            if torch.is_tensor(t) and t.dim() > 0:
                entry[key] = t[rows]
    set_state_dict(model, optimizer, model_state_dict={n: w for n, w in weights.items() if n in here},
                   optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False))
    _load_trainer_state(path, meta, scheduler, scaler)
    _reseed(seed, meta["step"], env.rank)
    return meta


def _optimizer_names(model: nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """The names of the parameters that a single-process optimizer.pt numbers 0, 1, ...: build_optimizer's order
    over the whole model. A pipeline stage holds some of them; the others come from the checkpoint's trained
    weights, put in the model's order (embedding, layers by index, final norm, head; within a layer as the stage's
    own layers are) and grouped as trainable_groups groups them (matrices, then vectors)."""
    here = [n for group in trainable_groups(model) for n, _ in group]
    if set(weights) <= set(here):
        return here
    within: dict[str, int] = {}  # a layer's parameter name -> its place in the layer
    for n, _ in model.named_parameters():
        if n.startswith("model.layers."):
            within.setdefault(n.split(".", 3)[3], len(within))

    def order(name: str) -> tuple[int, int, int]:
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            return 1, int(index), within.get(rest, len(within))
        return {"model.embed_tokens.weight": 0, "model.norm.weight": 2}.get(name, 3), 0, 0

    ordered = sorted(weights, key=order)
    return [n for n in ordered if weights[n].dim() >= 2] + [n for n in ordered if weights[n].dim() < 2]


def load_trainable_dcp(path: Path, model: nn.Module) -> None:
    """The trained weights of a DCP checkpoint into a plain (unsharded) model, without a process group: export."""
    state = {"model": trainable_state(model)}  # views of the parameters: DCP loads into them in place
    try:
        _dcp_load(state, path, no_dist=True)
    except Exception as e:
        raise LongseqError(f"{path}: its trained parameters do not match this model and method ({first_line(e)})"
                           ) from None


def _dcp_load(state: dict[str, Any], path: Path, no_dist: bool) -> None:
    """dcp.load through the safe reader and planner; a failure is a RuntimeError of one line. (DCP raises a
    CheckpointException, a BaseException holding each rank's traceback, and logs the tracebacks of its fallbacks
    to the root logger: both would put a traceback on the user's terminal.)"""
    root = logging.getLogger()
    root.addFilter(_quiet_dcp)
    try:
        with warnings.catch_warnings():  # one process reading without a process group is intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path / DCP_DIR, storage_reader=_SafeReader(path / DCP_DIR),
                     planner=_SafePlanner(), no_dist=no_dist)
    except CheckpointException as e:
        failures = [exc for exc, _ in e.failures.values()]
        raise RuntimeError(first_line(failures[0]) if failures else "DCP load failed") from None
    finally:
        root.removeFilter(_quiet_dcp)


def _quiet_dcp(record: logging.LogRecord) -> bool:
    return "distributed/checkpoint" not in record.pathname.replace("\\", "/")


def _load_trainer_state(path: Path, meta: dict[str, Any], scheduler, scaler) -> None:
    file = path / "trainer_state.pt"
    load_schedule_state(load_state_file(file, meta), file, scheduler, scaler)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` building nothing but what it is made of: DCP's metadata dataclasses and enums,
    torch.Size, dtypes, layouts and paths (Python's "restricting globals", docs.python.org/3/library/pickle.html)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _METADATA_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"the checkpoint metadata refers to {module}.{name}, which is not allowed")


_METADATA_GLOBALS: dict[tuple[str, str], Any] = {
    **{(dcp_metadata.__name__, n): getattr(dcp_metadata, n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING") if hasattr(dcp_metadata, n)},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,  # a path only read, never used to open anything
    ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
}


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise pickle.UnpicklingError(f"the checkpoint metadata is a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)  # what DCP saves as bytes: optimizer hyperparameters
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _reseed(seed: int, step: int, rank: int) -> None:
    torch.manual_seed(seed + 1_000_003 * step + rank)
