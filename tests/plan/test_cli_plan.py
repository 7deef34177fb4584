"""`longseq plan`: --json for scripts, one-line errors with exit 2, and no torch import on the way."""

import json
import subprocess
import sys

import pytest

from longseq.cli import main


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_json(capsys):
    code, out, _ = run(["plan", "train", "--model", "llama-3-8b", "--gpu", "H100", "--num-gpus", "1", "--seq-len",
                        "32768", "--method", "lora", "--recompute", "full", "--tokens", "1e9", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["fits"] is True and data["model"] == "Llama-3-8B"
    mem = data["memory_gib"]
    parts = mem["weights"] + mem["gradients"] + mem["optimizer"] + mem["activations"] + mem["transient"]
    assert parts == pytest.approx(mem["allocated_peak"])
    assert data["cost_usd"] > 0 and data["tokens"] == 1e9


def test_train_fit_json(capsys):
    code, out, _ = run(["plan", "train", "--model", "llama-3-8b", "--seq-len", "65536", "--fit", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["fit"]["found"] and data["plan"]["fits"]
    code, out, _ = run(["plan", "train", "--model", "llama-3-70b", "--gpu", "RTX 4090", "--method", "full",
                        "--fit", "--json"], capsys)
    data = json.loads(out)
    assert code == 1 and not data["fit"]["found"] and data["fit"]["explanation"].startswith("needs")


def test_offloaded_keeps_what_fits_and_checks_host_memory(capsys):
    # As `longseq train --plan auto` does: as many of the last layers' inputs on the GPU as fit, the rest on the
    # host; with --host-memory a plan whose page-locked buffers exceed it does not fit (512K tokens, H100).
    base = ["plan", "train", "--model", "llama-3-8b", "--seq-len", "524288", "--recompute", "offloaded",
            "--mlp-tile", "8192", "--json"]
    code, out, _ = run(base, capsys)
    data = json.loads(out)
    keep = data["setup"]["offload_keep"]
    assert code == 0 and data["fits"] and 0 < keep < 32
    assert data["memory_gib"]["host"] == pytest.approx(4.0 * (32 - keep))  # 4 GiB a layer input at 512K
    code, out, _ = run(base + ["--offload-keep", str(keep + 1)], capsys)
    assert not json.loads(out)["fits"] and json.loads(out)["memory_gib"]["total"] > json.loads(out)["memory_gib"]["gpu"]
    code, out, _ = run(base + ["--host-memory", str(4.0 * (32 - keep) - 1)], capsys)
    data = json.loads(out)
    assert not data["fits"] and data["setup"]["offload_keep"] == keep  # the GPU holds no more: the host is short
    assert any("--host-memory" in n for n in data["notes"])
    code, out, _ = run(base + ["--method", "qlora", "--host-memory", str(4.0 * (32 - keep) - 1)], capsys)
    data = json.loads(out)
    assert data["fits"] and data["setup"]["offload_keep"] > keep  # 9.6 GiB less of weights: more layers kept
    code, out, _ = run(["plan", "train", "--model", "llama-3-8b", "--seq-len", "524288", "--fit", "--host-memory",
                        "90", "--json"], capsys)
    data = json.loads(out)
    assert code == 1 and "page-locked host memory" in data["fit"]["explanation"]


def test_serve_json_and_tables(capsys):
    code, out, _ = run(["plan", "serve", "--model", "llama-3-8b", "--gpu", "H100", "--context", "8192", "--batch",
                        "32", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["kv_bytes_per_token"] == 131072 and data["fits"]
    code, out, _ = run(["plan", "serve", "--model", "qwen2.5-7b", "--gpu", "L40S", "--quant", "int4"], capsys)
    assert code == 0 and "KV pool" in out
    code, out, _ = run(["plan", "train", "--model", "smollm2-135m", "--gpu", "rtx4090", "--tokens", "1e8"], capsys)
    assert code == 0 and "allocated peak" in out and "cost" in out
    code, out, _ = run(["plan", "list", "--json"], capsys)
    assert "Llama-3-8B" in json.loads(out)["models"]


@pytest.mark.parametrize("argv,needle", [
    (["plan", "train", "--model", "llama-9b"], "unknown model 'llama-9b'; known: Llama-3-8B"),
    (["plan", "train", "--model", "llama-3-8b", "--gpu", "B300"], "unknown GPU 'B300'; known: V100"),
    (["plan", "train", "--model", "llama-3-8b", "--num-gpus", "4", "--tp", "3"], "not a multiple of tp"),
    (["plan", "train", "--model", "llama-3-8b", "--num-gpus", "3", "--tp", "3"], "tensor parallel 3"),
    (["plan", "train", "--model", "llama-3-8b", "--method", "lora,full"], "need --fit"),
    (["plan", "serve", "--model", "llama-3-8b", "--quant", "int3"], "unknown weight format"),
    (["plan", "train", "--model", "llama-3-8b", "--seq-len", "0"], "--seq-len must be positive"),
    (["plan", "train", "--model", "llama-3-8b", "--offload-keep", "-1"], "--offload-keep must be 0 or more"),
    (["plan", "train", "--model", "llama-3-8b", "--host-memory", "0"], "--host-memory must be positive"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_plan_never_imports_torch():
    code = (
        "import sys\n"
        "import longseq.plan, longseq.plan.cli, longseq.plan.report\n"
        "from longseq.cli import main\n"
        "assert main(['plan', 'train', '--model', 'llama-3-8b', '--json']) == 0\n"
        "assert main(['plan', 'serve', '--model', 'llama-3-8b', '--json']) == 0\n"
        "assert main(['plan', 'train', '--model', 'llama-3-8b', '--seq-len', '16384', '--fit']) == 0\n"
        "assert 'torch' not in sys.modules, 'longseq.plan imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_train_without_recompute_shows_what_longseq_train_would_pick(capsys):
    # Issue 23: 64K LoRA on an H200 was "does not fit" (recompute none) while `longseq train` planned and ran it.
    from longseq.config import TrainConfig
    from longseq.plan.auto import Fixed, choose, with_candidate
    from longseq.plan.hardware import get_gpu
    from longseq.plan.models import get_model
    from longseq.plan.setup import TrainSetup

    argv = ["plan", "train", "--model", "llama-3-8b", "--gpu", "H200", "--seq-len", "65536", "--method", "lora"]
    code, out, _ = run(argv + ["--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["fits"] and data["auto"]["fits"]
    flags = data["auto"]["flags"].split()
    assert data["setup"]["recompute"] == flags[flags.index("--recompute") + 1] != "none"
    # the flags it prints reproduce the same plan, and that plan is the search's choice for the TrainConfig
    forced = dict(zip(flags[::2], flags[1::2], strict=True))
    code, out, _ = run(argv + ["--recompute", forced["--recompute"], "--mlp-tile", forced["--tile-tokens"],
                               "--plain-layers", forced.get("--plain-layers", "0"),
                               "--attention-layers", forced.get("--attention-layers", "0"), "--json"], capsys)
    assert json.loads(out)["memory_gib"] == data["memory_gib"]
    cfg = TrainConfig(data=("x",), seq_len=65536)
    spec, gpu = get_model("llama-3-8b"), get_gpu("H200")
    pick = choose(spec, TrainSetup(method="lora", seq_len=65536), Fixed(cfg.recompute), gpu.memory_bytes)
    assert with_candidate(TrainSetup(), (pick.recompute, pick.tile, 0, pick.plain_layers,
                                         pick.attention_layers)).recompute == \
        data["setup"]["recompute"]
    _, text, _ = run(argv, capsys)
    assert "as longseq train --plan auto would pick on the H200" in text and "does not fit" not in text


@pytest.mark.parametrize("argv", [["--recompute", "auto", "--fit"], ["--recompute", "auto,full", "--fit"],
                                  ["--plain-layers", "-1"]])
def test_train_auto_flag_errors(argv, capsys):
    code, _, err = run(["plan", "train", "--model", "llama-3-8b", *argv], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_train_gpu_memory_budget(capsys):
    base = ["plan", "train", "--model", "llama-3-8b", "--gpu", "H200", "--seq-len", "32768", "--json"]
    whole = json.loads(run(base, capsys)[1])
    shared = json.loads(run(base + ["--gpu-memory", "60"], capsys)[1])
    assert shared["auto"]["fits"] and shared["memory_gib"]["allocated_peak"] < 60 < whole["memory_gib"]["total"]
    assert run(base + ["--gpu-memory", "-3"], capsys)[0] == 2
