"""Exports load in PEFT / transformers with the trained model's logits; writes are atomic."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from longseq.config import TrainConfig
from longseq.errors import LongseqError
from longseq.models.loader import load_model
from longseq.train import export as ex
from longseq.train.checkpoint_files import trainable_state
from longseq.train.lora import apply_lora

peft = pytest.importorskip("peft")

VOCAB = 49152  # the default tokenizer's, so checkpoints can `load` it
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=None)
CASES = {
    "llama": (transformers.LlamaConfig, {}),
    "qwen2-bias": (transformers.Qwen2Config, {}),
    "llama-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
}
TOL = 1e-4


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    dirs = {}
    for name, (cls, extra) in CASES.items():
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(cls(**{**BASE, **extra}), dtype=torch.float32)
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path)
        shutil.copytree(tokenizer_dir, path, dirs_exist_ok=True)
        dirs[name] = path
    return dirs


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_ids()).logits


def _our_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_ids())


def _trained(base: Path, method: str = "lora", extra: tuple[str, ...] = ()) -> tuple[torch.nn.Module, TrainConfig]:
    """Our model with adapters whose factors (and extras) are random, as if trained."""
    cfg = TrainConfig(model=str(base), method=method, lora_rank=4, lora_alpha=8.0, lora_train_extra=extra,
                      device="cpu", precision="fp32")
    model = load_model(base, dtype=torch.float32, device="cpu")
    torch.manual_seed(cfg.seed)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        apply_lora(model, cfg)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                scale = 0.1 if ".lora_" in name else 0.05
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model, cfg


def _peft_model(base: Path, adapter: Path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(hf, adapter)


def _peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    return _hf_logits(_peft_model(base, adapter))


def _merged_logits(path: Path) -> torch.Tensor:
    return _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(path))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---- (a) PEFT adapters ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,extra", [
    ("llama", ()), ("qwen2-bias", ()), ("llama-tied", ()),
    ("llama", ("embed", "norm")), ("llama-tied", ("embed", "norm")), ("qwen2-bias", ("norm",)),
])
def test_peft_adapter_same_logits(base_dirs, tmp_path, case, extra):
    base = base_dirs[case]
    model, cfg = _trained(base, extra=extra)
    ours = _our_logits(model)
    base_logits = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    assert _max_diff(ours, base_logits) > 1e-2  # the adapter really changes the model

    out = ex.export_peft(model, cfg, tmp_path / "adapter", str(base))
    assert _max_diff(_peft_logits(base, out), ours) <= TOL

    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["r"] == 4
    assert conf["target_modules"] == sorted(cfg.lora_targets) and conf["lora_alpha"] == 8
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor(next(iter(keys))).is_contiguous()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    if extra:  # PEFT treats them as its own modules_to_save: merging keeps the trained copies
        assert _max_diff(_hf_logits(_peft_model(base, out).merge_and_unload()), ours) <= TOL
    if "embed" in extra:
        assert "embed_tokens" in conf["modules_to_save"]
        assert "base_model.model.model.embed_tokens.weight" in keys
    if "norm" in extra:
        assert {"input_layernorm", "post_attention_layernorm", "norm"} <= set(conf["modules_to_save"])
        assert "base_model.model.model.norm.weight" in keys
    if not extra:
        assert conf["modules_to_save"] is None and all(".lora_" in k for k in keys)


def test_peft_refuses_full_fine_tuning(base_dirs, tmp_path):
    model, cfg = _trained(base_dirs["llama"], method="full")
    with pytest.raises(LongseqError, match="merged"):
        ex.export_peft(model, cfg, tmp_path / "adapter", "x")
    assert not (tmp_path / "adapter").exists()


# ---- (b) merged HF folders --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,method", [
    ("llama", "lora"), ("qwen2-bias", "lora"), ("llama-tied", "lora"), ("llama", "qlora"), ("qwen2-bias", "qlora"),
    ("llama-tied", "full"),
])
def test_merged_same_logits(base_dirs, tmp_path, case, method):
    extra = ("embed", "norm") if case == "llama-tied" and method == "lora" else ()
    model, _ = _trained(base_dirs[case], method=method, extra=extra)
    ours = _our_logits(model)  # qlora: our model runs on the same dequantized NF4 weights the export holds
    out = ex.export_merged(model, tmp_path / "merged", dtype=torch.float32)
    assert _max_diff(_merged_logits(out), ours) <= TOL
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float32"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) != ("tied" in case)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_merged_bf16_sharded_with_tokenizer(base_dirs, tmp_path, tokenizer_dir):
    from longseq.models.tokenizer import load_tokenizer

    model, _ = _trained(base_dirs["llama"])
    ours = _our_logits(model)
    out = ex.export_merged(model, tmp_path / "merged", tokenizer=load_tokenizer(tokenizer_dir),
                           max_shard_bytes=2_000_000)  # default dtype: bfloat16
    index = json.loads((out / ex.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / ex.WEIGHTS_FILE).exists()
    assert (out / "tokenizer.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    assert _max_diff(_hf_logits(hf.float()), ours) <= 0.1  # bf16 rounding of the weights only
    assert _max_diff(_our_logits(load_model(out, dtype=torch.float32, device="cpu")), _hf_logits(hf)) <= TOL


# ---- (c) from a checkpoint --------------------------------------------------------------------------------------


def _checkpoint(model, cfg: TrainConfig, path: Path) -> Path:
    path.mkdir()
    save_file(trainable_state(model), str(path / "trainable.safetensors"))
    meta = {"step": 1, "batch_index": 1, "tokens_seen": 1, "config": cfg.to_dict()}
    (path / "trainer_state.json").write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("case,method,extra", [
    ("llama", "lora", ("embed", "norm")), ("llama-tied", "lora", ("embed",)), ("qwen2-bias", "qlora", ()),
    ("llama", "full", ()),
])
def test_export_from_checkpoint(base_dirs, tmp_path, case, method, extra):
    model, cfg = _trained(base_dirs[case], method=method, extra=extra)
    ours = _our_logits(model)
    ckpt = _checkpoint(model, cfg, tmp_path / "step-000001")

    lm, loaded_cfg = ex.load_checkpoint_model(ckpt)
    assert loaded_cfg == cfg
    assert _max_diff(_our_logits(lm.model), ours) <= 1e-6

    merged = ex.export(str(ckpt), tmp_path / "merged", "merged", dtype="float32")
    assert _max_diff(_merged_logits(merged), ours) <= TOL
    assert (merged / "tokenizer.json").is_file()
    if method == "full":
        with pytest.raises(LongseqError, match="merged"):
            ex.export(ckpt, tmp_path / "adapter", "peft")
        return
    with pytest.raises(LongseqError, match="refusing"):  # the folder that holds the checkpoint
        ex.export(ckpt, tmp_path, "peft", overwrite=True)
    adapter = ex.export(ckpt, tmp_path / "adapter", "peft")
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(base_dirs[case].resolve())
    peft_logits = _peft_logits(base_dirs[case], adapter)
    if method == "lora":
        assert _max_diff(peft_logits, ours) <= TOL
    else:  # a QLoRA adapter on the unquantized base: off by the NF4 error only, far less than the adapter's effect
        base_logits = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(base_dirs[case]))
        assert _max_diff(peft_logits, ours) < _max_diff(base_logits, ours) / 5


def test_qlora_base_dtype_follows_the_trainer():
    assert ex.qlora_base_dtype(TrainConfig(method="qlora", precision="bf16")) == torch.bfloat16
    assert ex.qlora_base_dtype(TrainConfig(method="qlora", precision="auto", device="cpu")) == torch.float32
    assert ex.qlora_base_dtype(TrainConfig(method="qlora", precision="auto"), "fp16") == torch.float16


def test_bad_checkpoint(tmp_path):
    with pytest.raises(LongseqError, match="trainer_state.json"):
        ex.export(tmp_path, tmp_path / "out", "peft")
    with pytest.raises(LongseqError, match="format"):
        ex.export(tmp_path, tmp_path / "out", "gguf")


# ---- (d) atomic writes ------------------------------------------------------------------------------------------


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_refuses_non_empty_destination_unless_overwrite(base_dirs, tmp_path, monkeypatch):
    model, cfg = _trained(base_dirs["llama"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LongseqError, match="not empty"):
        ex.export_merged(model, out, dtype=torch.float32)
    with pytest.raises(LongseqError, match="not empty"):
        ex.export_peft(model, cfg, out, "x")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    ex.export_peft(model, cfg, out, "x", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert _leftovers(tmp_path) == []

    monkeypatch.chdir(out)  # --overwrite never replaces the folder one works in (or the checkpoint, see below)
    with pytest.raises(LongseqError, match="refusing"):
        ex.export_peft(model, cfg, out, "x", overwrite=True)
    with pytest.raises(LongseqError, match="refusing"):
        ex.export_peft(model, cfg, Path("."), "x", overwrite=True)
    assert (out / "adapter_model.safetensors").is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    ex.export_peft(model, cfg, empty, "x")  # an empty folder is fine to fill
    assert (empty / "adapter_model.safetensors").is_file() and _leftovers(tmp_path) == []


def test_failure_midway_leaves_nothing(base_dirs, tmp_path, monkeypatch):
    model, cfg = _trained(base_dirs["llama"])
    real_save = ex.save_file

    def save_then_fail(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)  # a file is half of the export: then the disk "fills"
        raise OSError("No space left on device")

    monkeypatch.setattr(ex, "save_file", save_then_fail)
    with pytest.raises(OSError):
        ex.export_merged(model, tmp_path / "merged", dtype=torch.float32)
    with pytest.raises(OSError):
        ex.export_peft(model, cfg, tmp_path / "adapter", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    previous = tmp_path / "previous"  # a failed --overwrite keeps the old export whole
    previous.mkdir()
    (previous / "config.json").write_text("{}")
    with pytest.raises(OSError):
        ex.export_merged(model, previous, dtype=torch.float32, overwrite=True)
    assert [p.name for p in previous.iterdir()] == ["config.json"] and _leftovers(tmp_path) == []


# ---- (e) destinations that cannot be written (issue 22) -------------------------------------------------------


def _cli_export(capsys, ckpt: Path, out: Path, *extra: str) -> str:
    from longseq.cli import main

    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("longseq: error: "), err
    return err


def test_read_only_destination_is_one_line_before_the_model_loads(base_dirs, tmp_path, monkeypatch, capsys):
    model, cfg = _trained(base_dirs["llama"])
    ckpt = _checkpoint(model, cfg, tmp_path / "step-000001")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access, real_statvfs = os.access, os.statvfs

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(ex.os, "access", lambda p, mode: False if Path(p) == read_only else real_access(p, mode))
    monkeypatch.setattr(ex.os, "statvfs", lambda p: ReadOnly() if Path(p) == read_only else real_statvfs(p))
    monkeypatch.setattr(ex, "load_checkpoint_model", lambda *a, **k: pytest.fail("loaded the model first"))
    err = _cli_export(capsys, ckpt, read_only / "adapter")
    assert f"{read_only / 'adapter'}: cannot write there ({read_only} is on a read-only file system)" in err
    err = _cli_export(capsys, ckpt, read_only / "new" / "deeper")  # folders to make: the nearest existing one
    assert "read-only file system" in err
    assert list(read_only.iterdir()) == []


def test_write_failure_midway_is_one_line_and_leaves_nothing(base_dirs, tmp_path, monkeypatch, capsys):
    model, cfg = _trained(base_dirs["llama"])
    ckpt = _checkpoint(model, cfg, tmp_path / "step-000001")
    out = tmp_path / "exports" / "adapter"
    out.parent.mkdir()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")  # remounted read-only after the check

    monkeypatch.setattr(ex, "save_file", read_only)
    err = _cli_export(capsys, ckpt, out)
    assert f"{out}: cannot write the export (Read-only file system); nothing was changed there" in err
    assert list(out.parent.iterdir()) == []


def test_mount_point_destination_is_refused(base_dirs, tmp_path, monkeypatch, capsys):
    model, cfg = _trained(base_dirs["llama"])
    ckpt = _checkpoint(model, cfg, tmp_path / "step-000001")
    mount = tmp_path / "mnt"
    mount.mkdir()
    (mount / "data.bin").write_text("someone else's")
    real = os.path.ismount
    monkeypatch.setattr(ex.os.path, "ismount", lambda p: Path(p) == mount or real(p))
    for extra in ((), ("--overwrite",)):
        err = _cli_export(capsys, ckpt, mount, *extra)
        assert "is a mount point" in err and "export into a new folder inside it" in err
    assert [p.name for p in mount.iterdir()] == ["data.bin"]


def test_busy_destination_on_overwrite_is_one_line_and_keeps_the_old_export(base_dirs, tmp_path, monkeypatch,
                                                                               capsys):
    model, cfg = _trained(base_dirs["llama"])
    ckpt = _checkpoint(model, cfg, tmp_path / "step-000001")
    out = tmp_path / "busy"
    out.mkdir()
    (out / "config.json").write_text("{}")
    real_replace = os.replace

    def busy(src, dst):
        if Path(src) == out:  # moving the old export aside: EBUSY, as renaming a mount point or a busy NFS folder
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_replace(src, dst)

    monkeypatch.setattr(ex.os, "replace", busy)
    err = _cli_export(capsys, ckpt, out, "--overwrite")
    assert f"{out}: cannot write the export (the folder is busy: a mount point, or in use)" in err
    assert [p.name for p in out.iterdir()] == ["config.json"] and _leftovers(tmp_path) == []
