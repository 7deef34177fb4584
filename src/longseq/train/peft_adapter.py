"""Load a PEFT LoRA adapter folder (`longseq export --format peft`, or PEFT's own `save_pretrained`) onto our
model: the inverse of `export.export_peft`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from longseq.config import TrainConfig
from longseq.config.policy import LORA_TARGETS_ALL
from longseq.errors import LongseqError, first_line
from longseq.train.export import PEFT_PREFIX
from longseq.train.lora import apply_lora

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def is_peft_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def load_peft_adapter(model: nn.Module, folder: str | Path) -> None:
    """Swap in LoRA layers as the adapter's config says and load its factors (and trained extras); all frozen."""
    folder = Path(folder)
    if not is_peft_adapter(folder) or not (folder / ADAPTER_WEIGHTS).is_file():
        raise LongseqError(f"{folder}: not a PEFT adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    try:
        conf = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LongseqError(f"{folder / ADAPTER_CONFIG}: unreadable ({first_line(e)})") from None
    if conf.get("peft_type") != "LORA":
        raise LongseqError(f"{folder}: only LoRA adapters are supported, not {conf.get('peft_type')!r}")
    for flag in ("use_dora", "use_rslora"):
        if conf.get(flag):
            raise LongseqError(f"{folder}: {flag} adapters are not supported")
    if conf.get("rank_pattern") or conf.get("alpha_pattern"):
        raise LongseqError(f"{folder}: per-layer rank_pattern / alpha_pattern are not supported")
    targets = conf.get("target_modules") or []
    if isinstance(targets, str) or not set(targets) <= set(LORA_TARGETS_ALL):
        raise LongseqError(f"{folder}: target_modules must be among {', '.join(LORA_TARGETS_ALL)}; got {targets!r}")
    saved = conf.get("modules_to_save") or []
    extra = tuple(name for name, hit in (("embed", any("embed" in m for m in saved)),
                                         ("norm", any("norm" in m for m in saved))) if hit)
    cfg = TrainConfig(method="lora", lora_rank=int(conf["r"]), lora_alpha=float(conf["lora_alpha"]),
                      lora_targets=tuple(targets), lora_train_extra=extra)
    apply_lora(model, cfg)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    state = load_file(str(folder / ADAPTER_WEIGHTS))
    loaded = set()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    with torch.no_grad():
        for name, tensor in state.items():
            key = name.removeprefix(PEFT_PREFIX).replace(".default.", ".")
            if key == "lm_head.weight" and tied:
                continue  # PEFT's copy of a tied, trained embedding
            if key not in params:
                raise LongseqError(f"{folder}: adapter weight {name!r} does not fit this model")
            if tuple(tensor.shape) != tuple(params[key].shape):
                raise LongseqError(f"{folder}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                   f"{tuple(params[key].shape)}: is this the adapter's base model?")
            params[key].copy_(tensor)
            loaded.add(key)
    missing = sorted(expected - loaded)
    if missing:
        raise LongseqError(f"{folder}: {len(missing)} adapter weight(s) missing, e.g. {missing[0]!r}")
    for p in model.parameters():
        p.requires_grad_(False)
