"""Checkpoints are read without running code from them (safetensors, JSON, `torch.load(weights_only=True)`), old
ones still resume, damaged ones fail in one line, interrupted saves' temporary folders are cleaned, and a resumed
run's metrics.jsonl holds each step once."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from longseq.config import TrainConfig
from longseq.errors import LongseqError
from longseq.train import checkpoint_files as ckpt
from longseq.train.export import export, load_checkpoint_model
from longseq.train.loop import train
from longseq.train.metrics import drop_steps_after
from tiny_models import run_config


@pytest.fixture(scope="module")
def setup(tiny_training_run):
    return tiny_training_run  # tests/conftest.py


def config(setup, out, **kw) -> TrainConfig:
    return run_config(setup, out, **kw)


@pytest.fixture(scope="module")
def straight(setup):
    """A 6-step run with checkpoints at steps 3 and 6."""
    result = train(config(setup, "straight"), progress=False)
    return result, ckpt.checkpoint_root(setup[0] / "straight")


def resume_copy(setup, straight, out: str) -> Path:
    """A fresh out_dir holding the step-3 checkpoint, as a run killed after step 3 leaves it."""
    dst = ckpt.checkpoint_root(setup[0] / out) / "step-000003"
    shutil.rmtree(dst.parents[1], ignore_errors=True)
    shutil.copytree(straight[1] / "step-000003", dst)
    return dst


class Boom:
    """A pickle that, when unpickled without restriction, creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ---- format and safe loading ------------------------------------------------------------------------------------


def test_checkpoint_state_files_need_no_allowlist(straight):
    step = straight[1] / "step-000003"
    assert json.loads((step / "trainer_state.json").read_text())["format"] == ckpt.FORMAT
    for name in ("optimizer.pt", "trainer_state.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(step / name) == []
        torch.load(step / name, weights_only=True)
    rng = torch.load(step / "trainer_state.pt", weights_only=True)["rng"]
    assert isinstance(rng["numpy"]["key"], list) and isinstance(rng["python"][1], list)


def test_rng_state_round_trips(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), tmp_path)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.parametrize("name", ["optimizer.pt", "trainer_state.pt"])
def test_a_pickle_that_runs_code_is_refused(setup, straight, tmp_path, name):
    step = resume_copy(setup, straight, f"evil-{name}")
    marker = tmp_path / "pwned"
    torch.save({"state": Boom(marker)}, step / name)
    with pytest.raises(LongseqError) as e:
        train(config(setup, f"evil-{name}", resume="latest"), progress=False)
    assert not marker.exists()
    assert str(step / name) in str(e.value) and "\n" not in str(e.value)
    assert "refused" in str(e.value) and "Unsupported global" in str(e.value)


def legacy_checkpoint(step: Path) -> None:
    """Rewrite a checkpoint as the previous format wrote it: numpy's RNG state as an array, no format key."""
    state = torch.load(step / "trainer_state.pt", weights_only=True)
    version, internal, gauss = state["rng"]["python"]
    np_state = state["rng"]["numpy"]
    state["rng"]["python"] = (version, tuple(internal), gauss)
    state["rng"]["numpy"] = (np_state["kind"], np.asarray(np_state["key"], dtype=np.uint32), np_state["pos"],
                             np_state["has_gauss"], np_state["cached_gaussian"])
    torch.save(state, step / "trainer_state.pt")
    meta = json.loads((step / "trainer_state.json").read_text())
    del meta["format"]
    (step / "trainer_state.json").write_text(json.dumps(meta))


def test_previous_format_still_resumes_exactly(setup, straight):
    step = resume_copy(setup, straight, "legacy")
    legacy_checkpoint(step)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(step / "trainer_state.pt")  # numpy's, allowed
    resumed = train(config(setup, "legacy", resume="latest"), progress=False)
    assert resumed.steps == 6
    for a, b in zip(resumed.losses, straight[0].losses[3:], strict=True):
        assert abs(a - b) <= 1e-6


def test_previous_format_allows_numpy_arrays_only(setup, straight, tmp_path):
    step = resume_copy(setup, straight, "legacy-evil")
    legacy_checkpoint(step)
    marker = tmp_path / "pwned"
    state = torch.load(step / "trainer_state.pt", weights_only=False)
    state["rng"]["numpy"] = Boom(marker)
    torch.save(state, step / "trainer_state.pt")
    with pytest.raises(LongseqError, match="refused.*Unsupported global"):
        train(config(setup, "legacy-evil", resume="latest"), progress=False)
    assert not marker.exists()


def test_newer_format_is_refused_in_one_line(setup, straight):
    step = resume_copy(setup, straight, "newer")
    meta = json.loads((step / "trainer_state.json").read_text())
    (step / "trainer_state.json").write_text(json.dumps({**meta, "format": ckpt.FORMAT + 1}))
    with pytest.raises(LongseqError, match="newer longseq"):
        train(config(setup, "newer", resume="latest"), progress=False)


def test_distributed_checkpoint_metadata_is_unpickled_restricted(tmp_path):
    import torch.distributed.checkpoint as dcp

    from longseq.train.parallel.dcp import DCP_DIR, _dcp_load

    model = torch.nn.Linear(4, 3)
    dcp.save({"model": model.state_dict(), "lr": 0.5}, checkpoint_id=tmp_path / DCP_DIR, no_dist=True)
    loaded = {"model": torch.nn.Linear(4, 3).state_dict(), "lr": 0.0}
    _dcp_load(loaded, tmp_path, no_dist=True)
    assert torch.equal(loaded["model"]["weight"], model.weight) and loaded["lr"] == 0.5

    marker = tmp_path / "pwned"
    (tmp_path / DCP_DIR / ".metadata").write_bytes(pickle.dumps(Boom(marker)))
    with pytest.raises(RuntimeError, match=r"pathlib.Path.touch, which is not allowed"):
        _dcp_load(loaded, tmp_path, no_dist=True)
    assert not marker.exists()


def test_damaged_distributed_checkpoint_export_is_one_line(setup, straight):
    import torch.distributed.checkpoint as dcp

    root = setup[0]
    lm, _ = load_checkpoint_model(straight[1] / "step-000003")
    step = root / "dcp-cut" / "step-000003"
    shutil.rmtree(step.parent, ignore_errors=True)
    step.mkdir(parents=True)
    shutil.copy(straight[1] / "step-000003" / "trainer_state.json", step)
    dcp.save({"model": ckpt.trainable_state(lm.model)}, checkpoint_id=step / "dcp", no_dist=True)
    assert export(step, root / "dcp-cut" / "ok").is_dir()  # the positive control
    metadata = step / "dcp" / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:40])
    out = run_cli("export", "--checkpoint", str(step), "--out", str(root / "dcp-cut" / "x"), cwd=root)
    assert_one_line_exit_2(out, str(step))


# ---- damaged checkpoints ----------------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longseq", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def assert_one_line_exit_2(out: subprocess.CompletedProcess, *mentions: str) -> None:
    """Exit 2 and the error in one line (after the progress lines a run prints before it)."""
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(errors) == 1 and errors[0].startswith("longseq: error: "), out.stderr
    assert out.stderr.rstrip().splitlines()[-1] == errors[0], out.stderr
    assert all(m in errors[0] for m in mentions), out.stderr


def test_truncated_checkpoint_fails_in_one_line_on_resume_and_export(setup, straight):
    root, model_dir, data = setup
    step = resume_copy(setup, straight, "cut")
    for name in ("optimizer.pt", "trainable.safetensors"):
        with open(step / name, "r+b") as f:
            f.truncate(os.path.getsize(step / name) // 2)
    out = run_cli("train", "--model", str(model_dir), "--data", str(data), "--out-dir", str(root / "cut"),
                  "--seq-len", "32", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "6", "--lr", "1e-2",
                  "--warmup-steps", "1", "--lora-rank", "4", "--lora-dropout", "0.1", "--precision", "fp32",
                  "--device", "cpu", "--save-every", "3", "--resume", "latest", cwd=root)
    assert_one_line_exit_2(out, str(step / "optimizer.pt"), "damaged or truncated")
    out = run_cli("export", "--checkpoint", str(step), "--out", str(root / "cut-export"), cwd=root)
    assert_one_line_exit_2(out, str(step), "trainable.safetensors")
    assert not (root / "cut-export").exists()


def test_stale_temporary_folders_are_cleaned_at_start(setup, straight):
    root = setup[0]
    out = root / "stale"
    step = resume_copy(setup, straight, "stale")
    ckpt_root = step.parent
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = ckpt.writer_tag().rsplit("-", 1)[0]
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": f".tmp-step-000006-{host}-{dead.pid}",
            "alive": f".tmp-step-000006-{host}-{alive.pid}",
            "other-host": f".tmp-step-000006-{host}x-{dead.pid}",
            "legacy": ".tmp-step-000006-12345",
            "moved-aside": f".old-step-000004-{host}-{dead.pid}",  # killed between the renames of a re-save
        }
        for name in names.values():
            (ckpt_root / name).mkdir()
            (ckpt_root / name / "trainer_state.json").write_text(json.dumps({"step": 4, "config": {}}))
        cleaned, unknown = ckpt.clean_stale_temporaries(out)
        assert sorted(p.name for p in cleaned) == sorted([names["dead"], names["moved-aside"]])
        assert [p.name for p in unknown] == [names["legacy"]]
        left = sorted(p.name for p in ckpt_root.iterdir())
        assert left == sorted([names["alive"], names["other-host"], names["legacy"], "step-000003", "step-000004"])
    finally:
        alive.kill()
        alive.wait()
    shutil.rmtree(ckpt_root / "step-000004")
    # A run starting in this out_dir cleans up the same way: the writer of `alive` is gone now.
    train(config(setup, "stale", resume="latest"), progress=False)
    left = sorted(p.name for p in ckpt_root.iterdir())
    assert left == sorted([names["other-host"], names["legacy"], "step-000003", "step-000006"])


def test_save_names_its_temporary_folder_after_host_and_process(setup, straight, monkeypatch):
    from longseq.train import checkpoint

    resume_copy(setup, straight, "crash")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError):
        train(config(setup, "crash", resume="latest", max_steps=4, save_every=1), progress=False)
    root = ckpt.checkpoint_root(setup[0] / "crash")
    assert [p.name for p in root.glob(".tmp-*")] == [f".tmp-step-000004-{ckpt.writer_tag()}"]
    monkeypatch.undo()
    train(config(setup, "crash", resume="latest", max_steps=4, save_every=1), progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000004"]


# ---- metrics after a resume -------------------------------------------------------------------------------------


def test_resumed_run_logs_each_step_once(setup, straight):
    root = setup[0]
    out = root / "metrics"
    shutil.rmtree(out, ignore_errors=True)
    train(config(setup, "metrics"), progress=False)
    shutil.rmtree(ckpt.checkpoint_root(out) / "step-000006")  # as if killed after logging step 6, before its save
    before = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in before] == [1, 2, 3, 4, 5, 6]
    train(config(setup, "metrics", resume="latest"), progress=False)
    after = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in after] == [1, 2, 3, 4, 5, 6]
    assert after[:3] == before[:3]
    assert not [p for p in out.iterdir() if p.name.startswith(".metrics")]


def test_drop_steps_after(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\nnot json\n{"note": "x"}\n{"step": 3}\n{"step": 2, "again": 1}\n'
                    '{"step": 4, "lo')  # the last line cut short by a crash
    assert drop_steps_after(path, 2) == 2
    assert path.read_text() == '{"step": 1}\n{"step": 2}\nnot json\n{"note": "x"}\n{"step": 2, "again": 1}\n'
    assert drop_steps_after(path, 2) == 0 and drop_steps_after(tmp_path / "none.jsonl", 2) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_export_of_a_checkpoint_reads_safely(straight, tmp_path):
    lm, cfg = load_checkpoint_model(straight[1] / "step-000006")
    assert cfg.lora_rank == 4
    assert (export(straight[1] / "step-000006", tmp_path / "adapter") / "adapter_model.safetensors").is_file()
