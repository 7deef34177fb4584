"""The model an evaluation runs: anything the loaders take, plus an adapter, plus attention / RoPE overrides."""

from __future__ import annotations

from pathlib import Path

import torch

from longseq.config import ModelConfig, ModelOverrides
from longseq.errors import LongseqError
from longseq.models.loader import LoadedModel, load, read_model_config, resolve_dtype, resolve_model_path
from longseq.models.overrides import apply_overrides, overridden_context


def load_for_eval(model: str | None = None, adapter: str | None = None, device: str = "auto", dtype: str = "auto",
                  overrides: ModelOverrides | None = None) -> LoadedModel:
    """`adapter`: a PEFT adapter folder (put on `model`) or a longseq checkpoint folder (which names its own base
    model and the overrides it was trained with). `overrides` apply last, so flags win."""
    from longseq.train.peft_adapter import is_peft_adapter, load_peft_adapter

    if adapter is not None:
        path = Path(adapter).expanduser()
        if not path.is_dir():
            raise LongseqError(f"{path}: no such adapter folder")
        if (path / "trainer_state.json").is_file():
            from longseq.train.export import load_checkpoint_model

            lm, cfg = load_checkpoint_model(path, device=device)  # base in float32, as the trainer's master
            if model is not None and resolve_model_path(model) != resolve_model_path(cfg.model):
                raise LongseqError(f"{path} was trained on {cfg.model or 'the built-in model'}; drop --model")
            target = resolve_dtype(dtype, lm.device)
            if target != torch.float32:
                lm.model.to(target)
        elif is_peft_adapter(path):
            lm = load(model, dtype=dtype, device=device)
            load_peft_adapter(lm.model, path)
        else:
            raise LongseqError(f"{path}: neither a PEFT adapter (adapter_config.json) nor a longseq checkpoint "
                               "(trainer_state.json)")
    else:
        lm = load(model, dtype=dtype, device=device)
    if overrides is not None:
        apply_overrides(lm.model, overrides)
    lm.model.eval()
    return lm


def config_for_eval(model: str | None = None, adapter: str | None = None,
                    overrides: ModelOverrides | None = None) -> tuple[ModelConfig, int | None]:
    """The config of the model load_for_eval would load and its context after every override (None: streaming
    attention, no limit), read without its weights: for checks that should not wait for the model to load."""
    layers = [overrides] if overrides is not None else []
    path = Path(adapter).expanduser() if adapter is not None else None
    if path is not None and (path / "trainer_state.json").is_file():  # a checkpoint names its base and overrides
        from longseq.train.export import checkpoint_config

        trained = checkpoint_config(path)
        base = read_model_config(trained.model)
        layers.insert(0, trained.overrides)
    else:
        base = read_model_config(model)
    return base, overridden_context(base, *layers)
