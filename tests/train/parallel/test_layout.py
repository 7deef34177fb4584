"""The parallel layout of `longseq train` (--dp --tp --cp --sp --pp): flags and YAML keys set the TrainConfig
fields one to one, the degrees multiply to the number of processes, and what is not supported is refused in one
line naming what is missing, before any process starts."""

import re

import pytest

from longseq.cli import main
from longseq.config import TrainConfig
from longseq.errors import LongseqError


def test_flags_and_yaml_keys_set_the_layout(tmp_path):
    import argparse

    from longseq.config.flags import add_dataclass_flags, config_from

    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, TrainConfig)
    parser.add_argument("--config")
    yaml = tmp_path / "run.yaml"
    yaml.write_text("tp: 2\ndp: 2\nparallel: fsdp\nseq_len: 64\n")
    args = parser.parse_args(["--config", str(yaml), "--cp", "1", "--sp", "1", "--pp", "1"])
    cfg = config_from(TrainConfig, args, args.config)
    assert (cfg.dp, cfg.tp, cfg.cp, cfg.sp, cfg.pp) == (2, 2, 1, 1, 1)
    assert cfg.data_parallel(4) == 2
    args = parser.parse_args(["--pp", "4", "--pp-schedule", "interleaved-1f1b", "--grad-accum", "8"])
    cfg = config_from(TrainConfig, args)
    assert (cfg.pp, cfg.pp_schedule) == (4, "interleaved-1f1b") and cfg.data_parallel(4) == 1
    args = parser.parse_args(["--cp", "2", "--sp", "2", "--seq-len", "64"])
    cfg = config_from(TrainConfig, args)
    assert cfg.dp is None and cfg.data_parallel(8) == 2 and cfg.sequence_shards == 4
    assert {"dp", "tp", "cp", "sp", "pp"} <= set(cfg.to_dict())  # what checkpoints and --nproc's YAML record


@pytest.mark.parametrize("kw,world,message", [
    (dict(dp=3, tp=2, parallel="fsdp"), 4, "dp 3 x tp 2 = 6 processes, but 4 were launched"),
    (dict(dp=2), 4, "dp 2 = 2 processes, but 4 were launched"),
    (dict(cp=3), 4, "cp 3 = 3 processes per model replica does not divide the 4 process(es) launched"),
])
def test_degrees_must_multiply_to_the_processes(kw, world, message):
    with pytest.raises(LongseqError) as e:
        TrainConfig(seq_len=48, **kw).data_parallel(world)
    assert str(e.value) == message


@pytest.mark.parametrize("kw,message", [
    (dict(tp=2, parallel="ddp"), "--tp needs --parallel fsdp"),
    (dict(tp=2, cp=2), "--tp with --cp or --sp is not supported yet"),
    (dict(tp=2, method="qlora"), "--tp with --method qlora is not supported"),
    (dict(tp=2, parallel="fsdp", fsdp_offload=True), "--tp with --fsdp-offload is not supported yet"),
    (dict(tp=2, tile_tokens=1024), "--tp with --tile-tokens is not supported"),
    (dict(pp=2, tp=2), "--pp with --tp is not supported yet"),
    (dict(pp=2, dp=2, cp=2), "--pp with --dp / --cp is not supported yet"),
    (dict(pp=4, grad_accum=2), "--pp 4 needs at least 4 micro-batches per step to fill the pipeline"),
    (dict(pp=2, grad_accum=3, pp_schedule="interleaved-1f1b"),
     "--pp-schedule interleaved-1f1b needs --grad-accum a multiple of --pp 2"),
    (dict(pp=2, grad_accum=2, precision="fp16"), "--pp with --precision fp16 is not supported"),
    (dict(pp_schedule="zero-bubble"), "pp_schedule must be one of gpipe, 1f1b, interleaved-1f1b"),
    (dict(cp=2, parallel="none"), "--cp 2 needs several processes"),
    (dict(dp=2, parallel="none"), "--dp needs several processes"),
    (dict(cp=4, seq_len=20), "seq_len 20 must be a multiple of 8 (cp 4 x 2 chunks per ring rank)"),
    (dict(tp=2, sp=0), "sp must be positive"),
    (dict(dp=0), "dp must be positive"),
])
def test_unsupported_layouts_are_refused(kw, message):
    with pytest.raises(LongseqError, match="^" + re.escape(message)):
        TrainConfig(**{"seq_len": 64, **kw})


def test_a_bad_layout_fails_before_launching(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    argv = ["train", "--data", str(data), "--device", "cpu", "--seq-len", "32", "--nproc", "2"]
    assert main(argv + ["--tp", "2", "--dp", "2"]) == 2
    assert main(argv + ["--tp", "2", "--parallel", "ddp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["longseq: error: dp 2 x tp 2 = 4 processes, but 2 were launched",
                   "longseq: error: --tp needs --parallel fsdp (or auto): DDP cannot replicate tensor-parallel weights"]


def test_pipeline_stages_split_the_layers_evenly():
    from longseq.train.parallel.pipeline import stage_ranges

    assert stage_ranges(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_ranges(32, 4) == [range(i, i + 8) for i in range(0, 32, 8)]
    with pytest.raises(LongseqError, match="4 pipeline stages need at least as many decoder layers; the model has 2"):
        stage_ranges(2, 4)
