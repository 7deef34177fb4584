"""Fuzzing checkpoint folders (hypothesis, derandomized and bounded): a checkpoint with files truncated, deleted,
overwritten or bit-flipped, or a trainer_state.json with fields changed, either resumes / loads for export or fails
with a one-line LongseqError; never another exception, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longseq.config import TrainConfig
from longseq.errors import LongseqError
from longseq.train import checkpoint_files as ckpt
from longseq.train.export import load_checkpoint_model
from longseq.train.loop import build, resume, train
from longseq.train.parallel.env import DistEnv
from tiny_models import run_config

SETTINGS = settings(max_examples=60, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FILES = ("trainable.safetensors", "optimizer.pt", "trainer_state.pt", "trainer_state.json")
# Keys of trainer_state.json and of its config; not `model`, whose change would load another model (the default
# one takes seconds), a case the loaders' own tests cover.
META_KEYS = ("step", "batch_index", "tokens_seen", "format", "config", "sequences_per_step", "precision")
CONFIG_KEYS = ("method", "lora_rank", "lora_alpha", "lora_targets", "lora_train_extra", "seq_len", "batch_size",
               "grad_accum", "precision", "device", "rope_scaling", "rope_factor", "max_seq_len", "attention",
               "window", "seed", "optimizer", "max_row_bytes")

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
file_damage = st.tuples(st.sampled_from(FILES), st.sampled_from(["truncate", "delete", "flip", "garbage", "empty"]),
                        st.floats(0, 1), st.binary(min_size=1, max_size=64))
meta_damage = st.tuples(st.just("trainer_state.json"), st.sampled_from(["meta", "config"]),
                        st.sampled_from(META_KEYS + CONFIG_KEYS), st.one_of(st.just("<delete>"), json_values))
damages = st.lists(st.one_of(file_damage, meta_damage), min_size=1, max_size=3)


def damage(folder: Path, how: tuple) -> None:
    file = folder / how[0]
    if how[1] in ("meta", "config"):
        try:
            meta = json.loads(file.read_text())
        except (OSError, ValueError):
            return
        target = meta if how[1] == "meta" else meta.get("config")
        if isinstance(target, dict):
            if how[3] == "<delete>":
                target.pop(how[2], None)
            else:
                target[how[2]] = how[3]
        file.write_text(json.dumps(meta))
        return
    _, op, where, data = how
    if not file.exists():
        return
    size = file.stat().st_size
    if op == "delete":
        file.unlink()
    elif op == "empty":
        file.write_bytes(b"")
    elif op == "garbage":
        file.write_bytes(data * 8)
    elif op == "truncate":
        with open(file, "r+b") as f:
            f.truncate(int(size * where))
    else:  # flip: overwrite bytes at one place
        at = min(int(size * where), max(size - 1, 0))
        with open(file, "r+b") as f:
            f.seek(at)
            f.write(bytes(b ^ 0xFF for b in data[: max(size - at, 0)]))


def config(setup, out: str, **kw) -> TrainConfig:
    return run_config(setup, out, **{**dict(grad_accum=1, max_steps=2, warmup_steps=0, lora_dropout=0.0,
                                            save_every=2, keep_last=2), **kw})


@pytest.fixture(scope="module")
def good(tiny_training_run):
    """(the config, a built run to resume into, a complete checkpoint, a scratch folder)."""
    cfg = config(tiny_training_run, "fuzz-good")
    train(cfg, progress=False)
    run = build(cfg, DistEnv(device=torch.device("cpu")))
    return cfg, run, ckpt.list_checkpoints(cfg.out_dir)[-1], tiny_training_run[0] / "fuzz-scratch" / "step-000002"


def one_line(e: LongseqError) -> None:
    assert "\n" not in str(e) and str(e).strip(), str(e)


def test_the_undamaged_checkpoint_resumes_and_loads(good):
    cfg, run, source, _ = good
    resume(run, source)
    assert run.step == 2
    assert load_checkpoint_model(source)[1].lora_rank == cfg.lora_rank


@SETTINGS
@given(damages)
def test_damaged_checkpoint_resumes_or_fails_in_one_line(good, hows):
    cfg, run, source, scratch = good
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(source, scratch)
    for how in hows:
        damage(scratch, how)
    try:
        resume(run, scratch)
    except LongseqError as e:
        one_line(e)
    try:
        load_checkpoint_model(scratch)
    except LongseqError as e:
        one_line(e)
