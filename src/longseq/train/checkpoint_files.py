"""What every checkpoint format shares: where checkpoints live, how one is published atomically, its metadata, how
its state files are read safely, and the cleaning of temporary folders that interrupted saves left behind.

Layout: `out_dir/checkpoints/step-000100/`, each holding `trainer_state.json` (step, data position, format and the
run's TrainConfig, for people and for `longseq export`) beside the format's own files (train/checkpoint.py,
train/parallel/dcp.py).

Safety: nothing in a checkpoint can run code when it is read. Weights are safetensors; the other state files are
`torch.save`d tensors and plain values (dicts, lists, numbers, strings), read back with `torch.load(weights_only=True)`;
RNG states are stored as such plain values (format 2). Format 1 checkpoints (before format 2) stored numpy's RNG state
as a numpy array: they are read with weights_only=True too, with numpy's array reconstruction allowed for them alone
(`torch.serialization.safe_globals`), which rebuilds arrays of plain dtypes and calls nothing else.

A save writes into `.tmp-step-N-HOST-PID` and renames it into place; the writer's host and process id in the name let
a later run on the same host remove the folder once that process is gone (`clean_stale_temporaries`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from longseq.errors import LongseqError, first_line

PREFIX = "step-"
FORMAT = 2  # 1: RNG states held numpy arrays (loaded with numpy's array reconstruction allowed); 2: plain values
_STEP_RE = re.compile(r"step-(\d+)")
# .tmp-step-000100-HOST-PID (a save in progress) and .old-step-000100-HOST-PID (a step being re-saved)
_TEMPORARY_RE = re.compile(r"\.(tmp|old)-(step-\d+)-(.+)-(\d+)")
_LEGACY_TEMPORARY_RE = re.compile(r"\.(tmp|old)-step-\d+(-\d+)?")  # before format 2: no host in the name
# What restoring state of the wrong shape or type raises (a damaged file that still unpickles)
_DAMAGED = (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError, OverflowError)


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if _STEP_RE.fullmatch(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


# ---- RNG state as plain values ---------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG stream as tensors and plain values (weights_only-loadable): Python's and numpy's Mersenne
    Twisters as lists of ints, torch's generators as their byte tensors."""
    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "key": [int(k) for k in key], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], source: Path) -> None:
    """Restore rng_state()'s streams (format 2), or format 1's (tuples, numpy's key as an array)."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        np_state = state["numpy"]
        if isinstance(np_state, dict):
            np_state = (np_state["kind"], np.asarray(np_state["key"], dtype=np.uint32), np_state["pos"],
                        np_state["has_gauss"], np_state["cached_gaussian"])
        np.random.set_state(np_state)
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except _DAMAGED as e:
        raise LongseqError(f"{source}: damaged RNG state ({first_line(e, 150)})") from None


# ---- reading state files ---------------------------------------------------------------------------------------


def load_state_file(path: Path, meta: dict[str, Any], map_location: str | torch.device = "cpu") -> Any:
    """A checkpoint's `torch.save`d state, read with weights_only=True; any failure is one line naming the file."""
    legacy = meta.get("format", 1) < 2
    try:
        with torch.serialization.safe_globals(_numpy_array_globals() if legacy else []):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise LongseqError(f"{path.parent}: damaged checkpoint, {path.name} is missing") from None
    except Exception as e:  # truncated, not a torch file, or holding something other than tensors and plain values
        refused = re.search(r"Unsupported (global: GLOBAL \S+|operand \d+)", str(e))
        if "Weights only load failed" in str(e):
            what = f" ({refused.group(0).replace('GLOBAL ', '')})" if refused else ""
            raise LongseqError(f"{path}: refused, it holds more than tensors and plain values{what}, which "
                               "could run code when loaded; resume only from checkpoints longseq wrote") from None
        raise LongseqError(f"{path}: unreadable checkpoint file, damaged or truncated ({first_line(e, 200)})"
                           ) from None


def state_entry(state: Any, key: str, path: Path) -> Any:
    if not isinstance(state, dict) or key not in state:
        raise LongseqError(f"{path}: damaged checkpoint file (no {key!r} entry)")
    return state[key]


def load_optimizer_state(optimizer, state: Any, file: Path) -> None:
    try:
        optimizer.load_state_dict(state)
    except _DAMAGED as e:
        raise LongseqError(f"{file}: the optimizer state does not match this model, method and optimizer "
                           f"({first_line(e, 150)})") from None


def load_schedule_state(state: Any, file: Path, scheduler, scaler) -> None:
    """The learning-rate scheduler's and the fp16 loss scaler's state, from a trainer_state.pt of either format."""
    schedule, scaling = state_entry(state, "scheduler", file), state_entry(state, "scaler", file)
    try:
        scheduler.load_state_dict(schedule)
        if scaler is not None and scaling is not None:
            scaler.load_state_dict(scaling)
    except _DAMAGED as e:
        raise LongseqError(f"{file}: damaged scheduler or loss-scaler state ({first_line(e, 150)})") from None


def _numpy_array_globals() -> list[Any]:
    """What unpickling a plain numpy array needs (format 1's numpy RNG key): ndarray, dtype and the reconstruction
    function, under its numpy 2 and numpy 1 module names."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    reconstruct = core.multiarray._reconstruct
    names = [(reconstruct, "numpy._core.multiarray._reconstruct"), (reconstruct, "numpy.core.multiarray._reconstruct"),
             np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles a dtype through its class
    if dtypes is not None:
        names += [dtypes.UInt32DType]
    return names


# ---- metadata --------------------------------------------------------------------------------------------------


def read_meta(path: Path) -> dict[str, Any]:
    """trainer_state.json, checked: a mapping with a non-negative integer step and the run's config."""
    file = path / "trainer_state.json"
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LongseqError(f"{path}: unreadable trainer_state.json ({first_line(e, 200)})") from None
    if not isinstance(meta, dict):
        raise LongseqError(f"{file}: expected a JSON object")
    if not _count(meta.get("step")):
        raise LongseqError(f"{file}: no valid step (a non-negative integer)")
    if not isinstance(meta.get("config"), dict):
        raise LongseqError(f"{file}: no training config")
    if not isinstance(meta.get("format", 1), int) or isinstance(meta.get("format", 1), bool):
        raise LongseqError(f"{file}: invalid format {meta.get('format')!r}")
    if meta.get("format", 1) > FORMAT:
        raise LongseqError(f"{path}: written by a newer longseq (checkpoint format {meta['format']}, this version "
                           f"reads up to {FORMAT}); upgrade longseq to resume or export it")
    return meta


def check_counters(meta: dict[str, Any], path: Path, *names: str) -> None:
    for name in names:
        if not _count(meta.get(name)):
            raise LongseqError(f"{path / 'trainer_state.json'}: no valid {name} (a non-negative integer)")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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


# ---- publishing and temporary folders --------------------------------------------------------------------------


def writer_tag() -> str:
    """HOST-PID of this process, as temporary folder names carry it (the host without characters odd in a name)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def temporary_folder(final: Path, tag: str) -> Path:
    return final.parent / f".tmp-{final.name}-{tag}"


def publish(tmp: Path, final: Path, out_dir: str | Path, keep_last: int) -> None:
    """fsync everything under `tmp`, rename it to `final` (replacing a previous save of that step whole), prune."""
    for f in tmp.rglob("*"):  # make the bytes durable before the rename publishes them
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():  # re-saving a step (e.g. Ctrl-C right after a periodic save): replace it whole
        old = final.parent / f".old-{final.name}-{writer_tag()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for stale in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)


def clean_stale_temporaries(out_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """Remove the temporary folders of saves whose writer is gone: named for this host and a process id that no
    longer runs here. A step folder left moved aside (`.old-`, killed between the two renames of a re-save) is
    put back when its step is missing. Returns (removed or restored, left alone because their writer is unknown:
    folders from before format 2, which carry no host)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return [], []
    host = writer_tag().rsplit("-", 1)[0]
    cleaned, unknown = [], []
    for folder in sorted(root.iterdir()):
        m = _TEMPORARY_RE.fullmatch(folder.name)
        if m is None:
            if _LEGACY_TEMPORARY_RE.fullmatch(folder.name):
                unknown.append(folder)
            continue
        kind, step, writer_host, pid = m.group(1), m.group(2), m.group(3), int(m.group(4))
        if writer_host != host or _running(pid):
            continue  # another machine's (shared storage), or its writer may still be saving
        if kind == "old" and not (root / step).exists():
            os.replace(folder, root / step)
        else:
            shutil.rmtree(folder, ignore_errors=True)
        cleaned.append(folder)
    return cleaned, unknown


def _running(pid: int) -> bool:
    if pid == os.getpid():
        # This process saves synchronously and is not saving now: the folder is an earlier run's in this process
        # (it raised mid-save), or a previous process's that had the same id (a restarted container).
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OverflowError:  # no such process id on this system
        return False
    return True
