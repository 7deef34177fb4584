"""`longseq train` on several processes: `--nproc 2` (torchrun) trains the single-process losses; its DCP
checkpoints resume on another number of processes or layout (1; 2 with FSDP + Ulysses; 2 with ring attention) and
single-process checkpoints resume on 2 processes (FSDP; FSDP x tensor parallel; 2 pipeline stages), all continuing
the single-process run; export reads DCP checkpoints, tensor-parallel and pipeline ones included."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dist_helpers import run_workers
from longseq.config import TrainConfig
from longseq.errors import LongseqError
from longseq.train import checkpoint_files as ckpt
from longseq.train.export import export
from longseq.train.loop import train
from tiny_models import run_config

STEPS = 4


@pytest.fixture(scope="module")
def setup(tiny_training_run):
    return tiny_training_run  # tests/conftest.py


def config(setup, out, **kw) -> TrainConfig:
    return run_config(setup, out, **{**dict(max_steps=STEPS, lora_dropout=0.0, save_every=2), **kw})


def resume_copy(setup, source: str, out: str, step: int = 2) -> None:
    """What a run stopped after `step` leaves behind, copied to a fresh out_dir."""
    src = ckpt.checkpoint_root(setup[0] / source) / f"step-{step:06d}"
    shutil.copytree(src, ckpt.checkpoint_root(setup[0] / out) / src.name)


@pytest.fixture(scope="module")
def single(setup):
    result = train(config(setup, "single"), progress=False)
    assert len(result.losses) == STEPS and result.losses[0] != result.losses[-1]
    return result.losses


@pytest.fixture(scope="module")
def ddp_cli(setup):
    """2 processes through `longseq train --nproc 2`, 1 micro-batch each: the same 4 sequences per step."""
    root, model_dir, data = setup
    cmd = [sys.executable, "-m", "longseq", "train", "--nproc", "2", "--model", str(model_dir), "--data", str(data),
           "--out-dir", str(root / "ddp"), "--seq-len", "32", "--batch-size", "2", "--grad-accum", "1",
           "--max-steps", str(STEPS), "--lr", "1e-2", "--warmup-steps", "1", "--lora-rank", "4", "--precision", "fp32",
           "--device", "cpu", "--save-every", "2", "--keep-last", "10"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("ddp over 2 process(es)") == 1  # only rank 0 reports
    lines = (root / "ddp" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_ddp_cli_trains_the_single_process_losses(single, ddp_cli, setup):
    assert ddp_cli == pytest.approx(single, rel=1e-6)
    saved = ckpt.list_checkpoints(setup[0] / "ddp")
    assert [p.name for p in saved] == ["step-000002", "step-000004"]
    assert all((p / "dcp").is_dir() and (p / "rng-rank1.pt").is_file() for p in saved)
    assert not list(ckpt.checkpoint_root(setup[0] / "ddp").glob(".tmp-*"))  # published by rename


def _resume_worker(rank, world, setup):
    # FSDP2 continues the single-process checkpoint, and so do tensor parallelism (FSDP2 x TP over one
    # data-parallel rank) and two pipeline stages (1F1B over 2 micro-batches); FSDP2 + Ulysses and ring attention
    # (DDP) continue DDP's.
    runs = [("fsdp-from-single", dict(parallel="fsdp", grad_accum=1)),
            ("ulysses-from-ddp", dict(parallel="fsdp", sp=2)), ("tp-from-single", dict(tp=2)),
            ("ring-from-ddp", dict(cp=2)), ("pp-from-single", dict(pp=2))]
    return {out: train(config(setup, out, resume="latest", **kw), progress=False).losses for out, kw in runs}


@pytest.fixture(scope="module")
def resumed(single, ddp_cli, setup):
    for source, out in (("single", "fsdp-from-single"), ("ddp", "ulysses-from-ddp"), ("single", "tp-from-single"),
                        ("ddp", "ring-from-ddp"), ("single", "pp-from-single"), ("ddp", "one-from-ddp")):
        resume_copy(setup, source, out)
    return run_workers(_resume_worker, 2, setup)


def test_resume_on_another_number_of_processes(single, resumed, setup):
    for losses in resumed:
        assert losses.keys() == {"fsdp-from-single", "ulysses-from-ddp", "tp-from-single", "ring-from-ddp",
                                 "pp-from-single"}
        for run, run_losses in losses.items():
            assert run_losses == pytest.approx(single[2:], rel=1e-6), run
    one = train(config(setup, "one-from-ddp", resume="latest"), progress=False)  # 2 processes -> 1
    assert one.losses == pytest.approx(single[2:], rel=1e-6)


def test_resume_refuses_another_batch_per_step(ddp_cli, setup):
    resume_copy(setup, "ddp", "wrong-batch")
    with pytest.raises(LongseqError, match="4 sequences per step, this run 2"):
        train(config(setup, "wrong-batch", grad_accum=1, resume="latest"), progress=False)


def test_export_reads_a_distributed_checkpoint(single, ddp_cli, resumed, setup):
    root = setup[0]
    adapters = []
    # tensor-parallel shards are whole again; each pipeline stage wrote its own layers
    for run in ("single", "ddp", "tp-from-single", "ring-from-ddp", "pp-from-single"):
        out = export(ckpt.checkpoint_root(root / run) / "step-000004", root / f"adapter-{run}", "peft")
        adapters.append(load_file(str(out / "adapter_model.safetensors")))
    assert len(adapters[0]) > 0
    for other in adapters[1:]:
        assert other.keys() == adapters[0].keys()
        for name in adapters[0]:
            torch.testing.assert_close(other[name], adapters[0][name], rtol=1e-4, atol=1e-6)


def test_bad_launch_is_one_line_before_any_process_starts(setup, capsys):
    from longseq.cli import main

    root, model_dir, data = setup
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--device", "cpu", "--seq-len", "32"]
    assert main(argv + ["--nproc", "2", "--sp", "4"]) == 2
    assert main(argv + ["--nproc", "2", "--data", str(root / "missing.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "longseq: error: sp 4 = 4 processes per model replica does not divide the 2 process(es) launched"
    assert len(err) == 2 and "missing.jsonl" in err[1]
