"""Bad input to `longseq generate` -> one clear line on stderr, exit code 2, no traceback.

Every case runs the real CLI in a subprocess on files built here: a tiny random Llama (HF directory with the
default model's tokenizer) and byte copies of the default GGUF, which itself is never written to.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from longseq.config.model import SUPPORTED_ARCHITECTURES
from longseq.errors import LongseqError
from longseq.models.loader import default_model_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def default_gguf() -> Path:
    try:
        return default_model_path()
    except LongseqError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Path:
    """A valid HF model directory: a 2-layer, 64-wide Llama with the default model's tokenizer (vocab 49152)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from longseq.models.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("tiny")
    tokenizer = load_tokenizer(default_gguf)  # also silences transformers' progress bars
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    return path


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LONGSEQ_CACHE": str(cwd / "cache"), "NO_COLOR": "1"}
    cmd = [sys.executable, "-m", "longseq", "generate", "hi", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def copy_model_dir(src: Path, dst: Path, *, weights: bool = True, tokenizer: bool = True, config: bool = True) -> Path:
    dst.mkdir()
    names = [*(TOKENIZER_FILES if tokenizer else ()), *(("config.json",) if config else ())]
    names += ["model.safetensors"] if weights else []
    for name in names:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return dst


def head_bytes(src: Path, dst: Path, n: int) -> Path:
    with src.open("rb") as f:  # read only: the source is the installed default model
        dst.write_bytes(f.read(n))
    return dst


# ---- the cases: each builds its input under tmp_path and returns (CLI args, what the line must mention) -------

Case = Callable[[Path, Path, Path], tuple[list[str], list[str]]]


def missing_path(tmp: Path, tiny: Path, gguf: Path):
    path = tmp / "no-such-model"
    return ["--model", str(path)], [str(path), "no such file"]


def dir_without_config(tmp: Path, tiny: Path, gguf: Path):
    path = copy_model_dir(tiny, tmp / "m", config=False)
    return ["--model", str(path)], [str(path), "config.json"]


def empty_dir(tmp: Path, tiny: Path, gguf: Path):
    path = tmp / "empty"
    path.mkdir()
    return ["--model", str(path)], [str(path), "config.json"]


def dir_holding_a_gguf(tmp: Path, tiny: Path, gguf: Path):
    path = tmp / "gguf-dir"
    path.mkdir()
    head_bytes(gguf, path / "model.gguf", 4096)
    return ["--model", str(path)], [str(path), "config.json", str(path / "model.gguf")]


def truncated_safetensors(tmp: Path, tiny: Path, gguf: Path):
    path = copy_model_dir(tiny, tmp / "m", weights=False)
    size = (tiny / "model.safetensors").stat().st_size
    head_bytes(tiny / "model.safetensors", path / "model.safetensors", size // 2)
    return ["--model", str(path)], [str(path / "model.safetensors"), "safetensors"]


def garbage_safetensors(tmp: Path, tiny: Path, gguf: Path):
    path = copy_model_dir(tiny, tmp / "m", weights=False)
    (path / "model.safetensors").write_bytes(os.urandom(64 * 1024))
    return ["--model", str(path)], [str(path / "model.safetensors"), "safetensors"]


def missing_shard(tmp: Path, tiny: Path, gguf: Path):
    path = copy_model_dir(tiny, tmp / "m", weights=False)
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    shutil.copy(tiny / "model.safetensors", path / shards[0])
    weight_map = {"model.embed_tokens.weight": shards[0], "lm_head.weight": shards[1]}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ["--model", str(path)], [str(path), shards[1], "missing"]


def no_tokenizer_files(tmp: Path, tiny: Path, gguf: Path):
    path = copy_model_dir(tiny, tmp / "m", tokenizer=False)
    return ["--model", str(path)], [str(path), "tokenizer"]


def truncated_gguf_header(tmp: Path, tiny: Path, gguf: Path):
    path = head_bytes(gguf, tmp / "cut.gguf", 1 << 20)  # ends inside the metadata (the vocabulary)
    return ["--model", str(path)], [str(path), "GGUF"]


def truncated_gguf_tensors(tmp: Path, tiny: Path, gguf: Path):
    path = head_bytes(gguf, tmp / "cut.gguf", gguf.stat().st_size // 2)  # whole header, half the tensor data
    return ["--model", str(path)], [str(path), "GGUF"]


def random_bytes_gguf(tmp: Path, tiny: Path, gguf: Path):
    path = tmp / "random.gguf"
    path.write_bytes(os.urandom(1 << 20))
    return ["--model", str(path)], [str(path), "GGUF"]


def empty_gguf(tmp: Path, tiny: Path, gguf: Path):
    path = tmp / "empty.gguf"
    path.touch()
    return ["--model", str(path)], [str(path), "GGUF"]


def unsupported_suffix(tmp: Path, tiny: Path, gguf: Path):
    path = tmp / "model.txt"
    path.write_text("not a model\n")
    return ["--model", str(path)], [str(path), ".gguf"]


def unknown_dtype(tmp: Path, tiny: Path, gguf: Path):
    return ["--model", str(tiny), "--dtype", "float64"], ["'float64'", "dtype"]


def unknown_device(tmp: Path, tiny: Path, gguf: Path):
    return ["--model", str(tiny), "--device", "tpu"], ["'tpu'", "device"]


def cuda_without_gpu(tmp: Path, tiny: Path, gguf: Path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    return ["--model", str(tiny), "--device", "cuda"], ["cuda", "no CUDA GPU"]


def unsupported_model_type(tmp: Path, tiny: Path, gguf: Path):
    path = copy_model_dir(tiny, tmp / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    return ["--model", str(path)], [str(path / "config.json"), "'gpt2'", *SUPPORTED_ARCHITECTURES]


def invalid_json_config(tmp: Path, tiny: Path, gguf: Path):
    path = copy_model_dir(tiny, tmp / "m")
    (path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    return ["--model", str(path)], [str(path / "config.json"), "JSON"]


def zero_max_new_tokens(tmp: Path, tiny: Path, gguf: Path):
    return ["--model", str(tiny), "--max-new-tokens", "0"], ["max_new_tokens", "got 0"]


def top_p_above_one(tmp: Path, tiny: Path, gguf: Path):
    return ["--model", str(tiny), "--top-p", "1.5"], ["top_p", "got 1.5"]


def negative_temperature(tmp: Path, tiny: Path, gguf: Path):
    return ["--model", str(tiny), "--temperature", "-1"], ["temperature", "got -1"]


CASES: list[Case] = [
    missing_path, dir_without_config, empty_dir, dir_holding_a_gguf, truncated_safetensors, garbage_safetensors,
    missing_shard, no_tokenizer_files, truncated_gguf_header, truncated_gguf_tensors, random_bytes_gguf, empty_gguf,
    unsupported_suffix, unknown_dtype, unknown_device, cuda_without_gpu, unsupported_model_type, invalid_json_config,
    zero_max_new_tokens, top_p_above_one, negative_temperature,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_one_line_exit_2(case: Case, tmp_path: Path, tiny_dir: Path, default_gguf: Path):
    args, mentions = case(tmp_path, tiny_dir, default_gguf)
    # The defaults come first: a case's own --device or --max-new-tokens comes later and wins.
    result = run_cli(tmp_path, "--no-chat", "--max-new-tokens", "3", "--device", "cpu", *args)
    report = f"exit {result.returncode}\nstdout: {result.stdout!r}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, report
    assert result.returncode == 2, report
    assert result.stdout == "", report
    lines = result.stderr.splitlines()
    assert len(lines) == 1, report
    line = lines[0]
    assert line.startswith("longseq: error: ") and len(line) > len("longseq: error: "), report
    for text in mentions:
        assert text in line, f"{text!r} not in {line!r}"


def test_tiny_model_generates(tmp_path: Path, tiny_dir: Path):
    """The positive control: the directory every case above starts from loads and generates."""
    result = run_cli(tmp_path, "--model", str(tiny_dir), "--no-chat", "--max-new-tokens", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.strip(), result.stderr
    assert "3 new tokens" in result.stderr


def test_gguf_config_error_names_the_file(tmp_path: Path):
    """In-process: through the CLI a GGUF without a tokenizer fails on the tokenizer before its config is read."""
    import numpy as np
    from gguf import GGUFWriter

    from longseq.models.loader import load_model

    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LongseqError) as e:
        load_model(path, dtype="float32", device="cpu")
    assert str(path) in str(e.value) and "'gpt2'" in str(e.value)
