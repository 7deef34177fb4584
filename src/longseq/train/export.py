"""`longseq export`: a training checkpoint as a PEFT LoRA adapter or as a merged Hugging Face model directory.

Both formats load with the same logits as the trained model: the adapter with
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)`, the merged folder with
`AutoModelForCausalLM.from_pretrained(merged_dir)`. Every export is built in a temporary folder next to its
destination and renamed into place, so an interrupted export never leaves a partial folder under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from longseq.config import TrainConfig
from longseq.config.flags import flat_fields
from longseq.config.hf import to_hf
from longseq.errors import LongseqError, first_line
from longseq.models.loader import DEFAULT_MODEL_NAME, LoadedModel, load, resolve_dtype
from longseq.models.overrides import apply_overrides
from longseq.train.checkpoint import load_trainable
from longseq.train.checkpoint_files import read_meta
from longseq.train.expert_lora import STACKED, expert_layers, peft_target_parameters, peft_tensors
from longseq.train.lora import lora_layers, make_trainable, merged_state_dict

FORMATS = ("peft", "merged")
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> the HF model
MAX_SHARD_BYTES = 5_000_000_000  # transformers' default max_shard_size ("5GB")
WEIGHTS_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# The built-in model ships as a Q4_1 GGUF; its Hub original is the closest base PEFT can load.
DEFAULT_BASE_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---- atomic output folders ------------------------------------------------------------------------------------


def _check_destination(out_dir: Path, overwrite: bool, keep: tuple[Path, ...] = ()) -> None:
    """Refuse a non-empty out_dir unless overwrite; never replace a folder holding cwd or one of `keep`, nor a mount
    point; refuse a destination whose parent cannot be written."""
    try:
        if out_dir.is_file() or out_dir.is_symlink():
            raise LongseqError(f"{out_dir}: exists and is not a folder")
        _check_writable(out_dir)
        if out_dir.is_dir() and os.path.ismount(out_dir):
            raise LongseqError(f"{out_dir}: is a mount point, which an export cannot replace (it is written beside "
                               "its destination and renamed into place); export into a new folder inside it")
        if not out_dir.is_dir() or not any(out_dir.iterdir()):
            return
    except OSError as e:  # e.g. a folder that cannot be listed
        raise LongseqError(f"{out_dir}: cannot check the destination ({_reason(e)})") from None
    if not overwrite:
        raise LongseqError(f"{out_dir}: already exists and is not empty (pass --overwrite to replace it)")
    out = out_dir.resolve()
    for path in (Path.cwd(), *keep):
        path = path.resolve()
        if path == out or out in path.parents:
            raise LongseqError(f"{out_dir}: refusing to replace a folder that holds {path}")


def _check_writable(out_dir: Path) -> None:
    # The export is built beside out_dir, in its parent (or the nearest existing ancestor, where folders get made).
    parent = Path(os.path.abspath(out_dir)).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise LongseqError(f"{out_dir}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        read_only = _read_only_file_system(parent)
        raise LongseqError(f"{out_dir}: cannot write there ({parent} is "
                           f"{'on a read-only file system' if read_only else 'not writable'})")


def _read_only_file_system(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _reason(e: OSError) -> str:
    if e.errno == errno.EBUSY:
        return "the folder is busy: a mount point, or in use"
    return e.strerror or first_line(e)


def _write_error(out_dir: str | Path, e: OSError) -> LongseqError:
    return LongseqError(f"{out_dir}: cannot write the export ({_reason(e)}); nothing was changed there")


@contextlib.contextmanager
def _staged(out_dir: str | Path, overwrite: bool, keep: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder in out_dir's parent; on success it replaces out_dir, on failure it goes."""
    out = Path(os.path.abspath(Path(out_dir).expanduser()))  # "." or "x/.." need a real name and parent
    _check_destination(out, overwrite, keep)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _check_destination(out, overwrite, keep)  # someone may have filled it meanwhile
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the previous export back whole
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:  # Ctrl-C included: no temporary folder survives
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    # The bytes must be durable before the rename publishes them.
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---- PEFT adapter ---------------------------------------------------------------------------------------------


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's names: LoRA factors in float32, trained extras (embeddings, norms) as
    PEFT saves `modules_to_save`: the module's own key, without PEFT's `modules_to_save.default` infix."""
    out: dict[str, torch.Tensor] = {}
    experts = expert_layers(model)
    for name, p in model.named_parameters():
        if not p.requires_grad or name.rpartition(".lora_")[0] in experts:
            continue
        tensor = p.detach().float() if ".lora_" in name else p.detach()
        out[PEFT_PREFIX + name] = tensor.contiguous()
    for module_name, layer in experts.items():
        out.update({PEFT_PREFIX + k: v for k, v in peft_tensors(module_name, layer).items()})
    if _ties_trained_embedding(model):
        # PEFT with ensure_weight_tying saves the tied head too (the same tensor); loading expects it.
        out[PEFT_PREFIX + "lm_head.weight"] = out[PEFT_PREFIX + "model.embed_tokens.weight"].clone()
    return out


def _ties_trained_embedding(model: nn.Module) -> bool:
    return bool(model.config.tie_word_embeddings) and model.model.embed_tokens.weight.requires_grad


def _modules_to_save(model: nn.Module) -> list[str]:
    # PEFT wraps every module whose full name ends with one of these strings (plain suffix match, see
    # peft.utils.other._set_trainable), so the leaf names cover every layer's norm; "norm" also matches them all.
    names = {n.rpartition(".")[0].rpartition(".")[2] for n, p in model.named_parameters()
             if p.requires_grad and ".lora_" not in n}
    # The router: PEFT matches by suffix, and a bare "gate" would take Qwen2-MoE's shared_expert_gate too.
    return sorted("mlp.gate" if name == "gate" else name for name in names)


def adapter_config(model: nn.Module, cfg: TrainConfig, base_model_name_or_path: str) -> dict[str, Any]:
    targets = sorted({name.rpartition(".")[2] for name, layer in lora_layers(model).items() if layer.rank})
    parameters = peft_target_parameters(model)
    alpha = int(cfg.lora_alpha) if float(cfg.lora_alpha).is_integer() else cfg.lora_alpha
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.lora_rank, "lora_alpha": alpha, "lora_dropout": cfg.lora_dropout, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": _modules_to_save(model) or None,
    }
    if parameters:
        # PEFT's ParamWrapper refuses dropout (it only matters in training; the adapter's logits are the same).
        config.update(target_parameters=parameters, lora_dropout=0.0)
    if _ties_trained_embedding(model):
        # Without it PEFT copies the embedding into modules_to_save but leaves lm_head on the old tied weight.
        config["ensure_weight_tying"] = True
    return config


def export_peft(
    model: nn.Module,
    cfg: TrainConfig,
    out_dir: str | Path,
    base_model_name_or_path: str,
    overwrite: bool = False,
    keep: tuple[Path, ...] = (),
) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` (PEFT LoRA) for a lora or qlora model.

    A QLoRA adapter applies to the unquantized base, as PEFT loads it; its logits then differ from training's by
    the NF4 quantization error of the base.
    """
    if cfg.method == "full":
        raise LongseqError("full fine-tuning has no adapter to export: use --format merged")
    if not any(layer.rank for layer in lora_layers(model).values()) and \
            not any(layer.lora_A for layer in expert_layers(model).values()):
        raise LongseqError("the model has no LoRA layers: apply_lora first (or use --format merged)")
    with _staged(out_dir, overwrite, keep) as tmp:
        _write_json(tmp / "adapter_config.json", adapter_config(model, cfg, base_model_name_or_path))
        save_file(peft_state_dict(model), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return Path(out_dir)


# ---- merged HF model ------------------------------------------------------------------------------------------


def hf_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """W0 + (alpha / r) B A for adapted layers (NF4 dequantized), every other weight as is, under HF names."""
    state = merged_state_dict(model, dtype)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # HF re-ties it from the embedding; safetensors refuses shared storage
    return state


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """`model.safetensors`, or HF-style shards `model-0000i-of-0000n.safetensors` with their index."""
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def hf_config(model: nn.Module, dtype: torch.dtype) -> dict[str, Any]:
    name = str(dtype).removeprefix("torch.")
    return {**to_hf(model.config), "torch_dtype": name, "dtype": name}  # transformers < 5 and >= 5


def generation_config(model: nn.Module) -> dict[str, Any] | None:
    eos = list(model.config.eos_token_ids)
    if not eos:
        return None
    return {"bos_token_id": model.config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}


def export_merged(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    keep: tuple[Path, ...] = (),
) -> Path:
    """Write an HF model directory (config, weights, generation config, tokenizer) with adapters merged in.

    `keep`: folders that overwrite must never replace (the checkpoint, the base model), like the working directory.
    """
    with _staged(out_dir, overwrite, keep) as tmp:
        _write_json(tmp / "config.json", hf_config(model, dtype))
        gen = generation_config(model)
        if gen is not None:
            _write_json(tmp / "generation_config.json", gen)
        save_weights(hf_state_dict(model, dtype), tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


# ---- from a checkpoint ----------------------------------------------------------------------------------------


def _train_config(checkpoint: Path, meta: dict[str, Any]) -> TrainConfig:
    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise LongseqError(f"{checkpoint}: trainer_state.json has no training config")
    known = {f.name for f in flat_fields(TrainConfig)}
    try:
        return TrainConfig.from_dict({k: v for k, v in saved.items() if k in known})  # lists become tuples
    except (TypeError, ValueError, AttributeError) as e:
        raise LongseqError(f"{checkpoint}: trainer_state.json has an invalid training config ({first_line(e)})"
                           ) from None


def _checkpoint_meta(path: Path) -> dict[str, Any]:
    if not (path / "trainer_state.json").is_file():
        raise LongseqError(f"{path}: not a longseq checkpoint (no trainer_state.json)")
    return read_meta(path)


def checkpoint_config(checkpoint_dir: str | Path) -> TrainConfig:
    """The TrainConfig a checkpoint was trained with (its trainer_state.json), checked."""
    path = Path(checkpoint_dir)
    return _train_config(path, _checkpoint_meta(path))


def qlora_base_dtype(cfg: TrainConfig, recorded_precision: str | None = None) -> torch.dtype:
    """The dtype the trainer loaded the QLoRA base in (its precision's frozen dtype): the NF4 codes and scales are
    computed from those values, so rebuilding from any other dtype gives a slightly different quantized base.

    The checkpoint does not record the resolved precision; with `auto` this mirrors resolve_precision on the
    training device: fp32 for device cpu, else bf16 (a GPU visible here without bf16 gives fp32, as the trainer).
    """
    name = recorded_precision or cfg.precision
    if name == "auto":
        if cfg.device == "cpu":
            name = "fp32"
        elif torch.cuda.is_available():
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        else:
            name = "bf16" if cfg.device.startswith("cuda") else "fp32"  # "auto" on a CPU-only machine: cpu
    if name not in _PRECISION_DTYPES:
        raise LongseqError(f"unknown precision {name!r} in the checkpoint's config")
    return _PRECISION_DTYPES[name]


def load_checkpoint_model(checkpoint_dir: str | Path, device: str = "cpu") -> tuple[LoadedModel, TrainConfig]:
    """Rebuild the trained model of a checkpoint: base model, adapters, then the trained parameters.

    lora and full load the base in float32 (exact for bf16/fp16 sources; the merged W0 is the checkpoint's own);
    qlora loads it in the trainer's dtype (see qlora_base_dtype) so the NF4 base is the one that was trained on.
    """
    path = Path(checkpoint_dir)
    meta = _checkpoint_meta(path)
    cfg = _train_config(path, meta)
    _check_lora_rank(path, cfg)  # before building adapters of a rank that only a damaged trainer_state.json names
    dtype = qlora_base_dtype(cfg, meta.get("precision")) if cfg.method == "qlora" else torch.float32
    lm = load(cfg.model, dtype=dtype, device=device)
    apply_overrides(lm.model, cfg.overrides)  # the attention variant / RoPE scaling it was trained with
    torch.manual_seed(cfg.seed)  # as the trainer; the LoRA init is overwritten by the checkpoint anyway
    make_trainable(lm.model, cfg)
    load_trainable(path, lm.model)
    lm.model.eval()
    return lm, cfg


def _check_lora_rank(path: Path, cfg: TrainConfig) -> None:
    file = path / "trainable.safetensors"
    if cfg.method == "full" or not file.is_file():  # full fine-tuning, or a multi-process (DCP) checkpoint
        return
    try:
        with safe_open(str(file), "pt") as f:
            ranks = {f.get_slice(n).get_shape()[0] for n in f.keys() if n.endswith(".lora_A.weight")}
            # stacked experts' A (E, in, r): train/expert_lora.py
            ranks |= {f.get_slice(n).get_shape()[-1] for n in f.keys()
                      if n.rpartition(".")[0].endswith(".lora_A") and n.rpartition(".")[2] in STACKED}
    except Exception as e:
        raise LongseqError(f"{path}: cannot read trainable.safetensors ({first_line(e, 200)})") from None
    if ranks != {cfg.lora_rank}:
        raise LongseqError(f"{path}: trainable.safetensors holds LoRA rank {sorted(ranks) or 'none'}, its "
                           f"trainer_state.json names rank {cfg.lora_rank}: the checkpoint is damaged")


def _base_name(lm: LoadedModel, cfg: TrainConfig) -> str:
    if cfg.model is None or str(cfg.model) in ("", "default", DEFAULT_MODEL_NAME):
        return DEFAULT_BASE_HUB_ID
    return str(lm.path.resolve())


def export(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    fmt: str = "peft",
    dtype: str | torch.dtype = "bfloat16",
    overwrite: bool = False,
) -> Path:
    """`longseq export`: a checkpoint as a PEFT adapter (`peft`, float32 factors) or a merged HF folder (`merged`,
    weights in `dtype`)."""
    if fmt not in FORMATS:
        raise LongseqError(f"unknown export format {fmt!r}; use {' or '.join(FORMATS)}")
    dt = resolve_dtype(dtype)
    _check_destination(Path(out_dir), overwrite, keep=(Path(checkpoint_dir),))  # before the slow model load
    lm, cfg = load_checkpoint_model(checkpoint_dir)
    keep = (Path(checkpoint_dir), lm.path)
    try:
        with torch.no_grad():
            if fmt == "peft":
                return export_peft(lm.model, cfg, out_dir, _base_name(lm, cfg), overwrite=overwrite, keep=keep)
            return export_merged(lm.model, out_dir, tokenizer=lm.tokenizer, dtype=dt, overwrite=overwrite, keep=keep)
    except OSError as e:  # read-only, full or busy destination: the staged folder is gone, the old export intact
        raise _write_error(out_dir, e) from None
