"""`longseq train` / `export` flags and YAML map onto TrainConfig; bad input is one line and exit 2."""

import argparse
import subprocess
import sys

import pytest

from longseq.config import TrainConfig
from longseq.config.flags import add_dataclass_flags, config_from
from longseq.errors import LongseqError


def parse(argv, yaml_path=None):
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, TrainConfig)
    return config_from(TrainConfig, parser.parse_args(argv), yaml_path)


def test_flags_override_yaml(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("data: [a.jsonl, b.txt]\nlora_rank: 8\nlr: 0.001\nlora_targets: q_proj,v_proj\n")
    cfg = parse(["--lr", "0.0005", "--method", "qlora"], str(yaml_file))
    assert cfg.data == ("a.jsonl", "b.txt") and cfg.lora_rank == 8
    assert cfg.lr == 0.0005 and cfg.method == "qlora" and cfg.lora_targets == ("q_proj", "v_proj")
    assert cfg.seq_len == TrainConfig().seq_len  # untouched fields keep their defaults


def test_every_field_has_a_flag():
    cfg = parse(["--data", "x.jsonl", "--lora-targets", "q_proj", "k_proj", "--seq-len", "64", "--resume", "latest"])
    assert cfg.lora_targets == ("q_proj", "k_proj") and cfg.seq_len == 64 and cfg.resume == "latest"


@pytest.mark.parametrize("content,match", [
    ("lora_rnk: 8\n", "unknown option"),
    ("- a\n- b\n", "mapping"),
    ("lr: [1\n", "not a readable YAML"),
    ("method: dora\n", "method must be one of"),
    ("seq_len: 0\n", "seq_len must be positive"),
])
def test_bad_yaml(tmp_path, content, match):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(LongseqError, match=match):
        parse([], str(path))


@pytest.mark.parametrize("argv,needle", [
    (["train"], "no training data"),
    (["train", "--data", "/nonexistent.jsonl", "--device", "cpu"], "/nonexistent.jsonl"),
    (["train", "--data", "x.jsonl", "--optimizer", "lion"], "optimizer must be one of"),
    (["train", "--config", "/nonexistent.yaml"], "/nonexistent.yaml"),
    (["train", "--data", "x.jsonl", "--resume", "latest", "--out-dir", "/nonexistent-run", "--device", "cpu"],
     "no checkpoint"),
    (["export", "--checkpoint", "/nonexistent", "--out", "/tmp/x"], "/nonexistent"),
    (["train", "--data", "x.jsonl", "--attention-kernel", "flash"], "attention_kernel must be one of"),
])
def test_cli_errors_are_one_line(argv, needle, tmp_path):
    out = subprocess.run([sys.executable, "-m", "longseq", *argv], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and "Traceback" not in out.stderr and needle in lines[0], out.stderr


def test_fa4_where_it_cannot_run_fails_before_training(tmp_path):
    (tmp_path / "d.txt").write_text("some text to train on. " * 50)
    out = subprocess.run([sys.executable, "-m", "longseq", "train", "--data", "d.txt", "--device", "cpu",
                          "--attention-kernel", "fa4", "--max-steps", "1", "--seq-len", "64"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert lines == ["longseq: error: --attention-kernel fa4: it runs on CUDA GPUs only"], out.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


def test_hostile_data_rows_are_counted_not_a_traceback(tiny_training_run, tmp_path):
    """Issue 22: a lone surrogate, deep nesting and an oversized line are bad rows with file:line."""
    _, model_dir, good = tiny_training_run
    data = tmp_path / "mixed.jsonl"
    hostile = ['{"text": "a \\ud800 b"}', '{"text": ' + "[" * 5000 + "]" * 5000 + "}",
               '{"text": "' + "x" * 20000 + '"}']
    data.write_text("\n".join(hostile) + "\n" + good.read_text())
    base = [sys.executable, "-m", "longseq", "train", "--model", str(model_dir), "--data", str(data),
            "--device", "cpu", "--seq-len", "32", "--max-steps", "1", "--save-every", "0", "--precision", "fp32",
            "--max-row-bytes", "12000"]
    out = subprocess.run([*base, "--out-dir", str(tmp_path / "skip")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "3 bad row(s) skipped: " in out.stderr
    for line, kind in ((1, "unpaired surrogate"), (2, "nested too deeply"), (3, "row over --max-row-bytes")):
        assert f"{data}:{line}: {kind}" in out.stderr
    out = subprocess.run([*base, "--out-dir", str(tmp_path / "fail"), "--on-bad-row", "fail"], capture_output=True,
                         text=True, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("longseq: error")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert errors == [f"longseq: error: {data}:1: unpaired surrogate (text holds \\ud800 at character 2)"]


def test_max_row_bytes_flag_and_yaml_key(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("max_row_bytes: 1024\n")
    assert parse([], str(yaml_file)).max_row_bytes == 1024
    assert parse(["--max-row-bytes", "2048"], str(yaml_file)).max_row_bytes == 2048
    yaml_file.write_text("max_row_bytes: 1.5\n")
    with pytest.raises(LongseqError, match="max_row_bytes must be an integer"):
        parse([], str(yaml_file))
