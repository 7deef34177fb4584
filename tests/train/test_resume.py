"""A run resumed from a checkpoint reproduces the uninterrupted run; checkpoints are atomic; Ctrl-C saves."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from longseq.train import checkpoint
from longseq.train import checkpoint_files as ckpt
from longseq.train.loop import train
from tiny_models import run_config


@pytest.fixture(scope="module")
def setup(tiny_training_run):
    return tiny_training_run  # tests/conftest.py


def config(setup, out, **kw):
    return run_config(setup, out, **kw)


@pytest.mark.parametrize("method,optimizer", [("lora", "adamw"), ("full", "adamw"), ("qlora", "adamw8bit")])
def test_resumed_run_equals_straight_run(setup, method, optimizer):
    straight = train(config(setup, f"straight-{method}", method=method, optimizer=optimizer), progress=False)
    assert len(straight.losses) == 6 and straight.losses[0] != straight.losses[-1]
    step3 = ckpt.checkpoint_root(setup[0] / f"straight-{method}") / "step-000003"
    assert step3.is_dir()
    # What a run killed after step 3 leaves behind is exactly this folder: resume a copy of it elsewhere.
    out = setup[0] / f"resumed-{method}"
    shutil.copytree(step3, ckpt.checkpoint_root(out) / "step-000003")
    resumed = train(config(setup, f"resumed-{method}", method=method, optimizer=optimizer, resume="latest"),
                    progress=False)
    assert resumed.steps == 6 and len(resumed.losses) == 3
    for a, b in zip(resumed.losses, straight.losses[3:], strict=True):
        assert abs(a - b) <= 1e-6


def test_resume_refuses_a_changed_run(setup):
    from longseq.errors import LongseqError

    train(config(setup, "changed", max_steps=3), progress=False)
    with pytest.raises(LongseqError, match="lora_rank"):
        train(config(setup, "changed", max_steps=6, lora_rank=8, resume="latest"), progress=False)


def test_keep_last_and_crash_during_save(setup, monkeypatch):
    out = setup[0] / "keep"
    train(config(setup, "keep", max_steps=4, save_every=1, keep_last=2), progress=False)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000003", "step-000004"]
    good = (ckpt.checkpoint_root(out) / "step-000004" / "trainable.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)  # the single-process format's writer
    with pytest.raises(OSError):
        train(config(setup, "keep", max_steps=5, save_every=1, keep_last=2, resume="latest"), progress=False)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000003", "step-000004"]
    assert (ckpt.checkpoint_root(out) / "step-000004" / "trainable.safetensors").read_bytes() == good


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(setup):
    root, model_dir, data = setup
    out = root / "sigint"
    cmd = [sys.executable, "-m", "longseq", "train", "--model", str(model_dir), "--data", str(data),
           "--out-dir", str(out), "--seq-len", "32", "--max-steps", "100000", "--save-every", "0",
           "--device", "cpu", "--precision", "fp32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted: saved" in stderr
    saved = ckpt.list_checkpoints(out)
    assert len(saved) == 1
    meta = ckpt.read_meta(saved[0])
    assert meta["step"] >= 2 and meta["batch_index"] == meta["step"]


@pytest.mark.parametrize("optimizer,precision,recompute", [
    ("sgd", "fp32", "selective"), ("adafactor", "fp32", "full"), ("adamw", "bf16", "full"),
    ("adamw", "fp16", "none"),
])
def test_optimizers_and_precisions_train(setup, optimizer, precision, recompute):
    out = train(config(setup, f"opt-{optimizer}-{precision}", optimizer=optimizer, precision=precision,
                       recompute=recompute, max_steps=4, save_every=0, lora_dropout=0.0, lr=5e-2),
                progress=False)
    assert len(out.losses) == 4 and all(loss == loss for loss in out.losses)  # finite, no NaN
    assert out.losses[-1] < out.losses[0]
