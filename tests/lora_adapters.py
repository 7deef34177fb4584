"""PEFT LoRA adapter folders with random factors for the multi-LoRA serving tests, and the same adapters merged into
a model (the reference each served request is compared with). Importable from every test folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(folder: Path, model: nn.Module, rank: int, targets=ALL_TARGETS, seed: int = 0, alpha: float = 8.0,
                  std: float = 0.3, **config) -> dict[str, torch.Tensor]:
    """A PEFT adapter folder for `model` (adapter_config.json + adapter_model.safetensors, PEFT's key names) whose
    factors of the `targets` layers are N(0, std); `config` adds to or overrides the adapter config. Returns the
    tensors it wrote."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in targets and isinstance(module, nn.Linear) and ".layers." in name:
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * std
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
            "target_modules": sorted(targets), "bias": "none", "modules_to_save": None, **config}
    (folder / "adapter_config.json").write_text(json.dumps(conf))
    return tensors


def merge_adapter(model: nn.Module, folder: Path) -> nn.Module:
    """W += (alpha / r) B A for every factor pair in the adapter folder (PEFT's merge), in the model's dtype."""
    from safetensors.torch import load_file

    folder = Path(folder)
    conf = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            weight = modules[key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")].weight
            scale = conf["lora_alpha"] / a.shape[0]
            weight += (scale * (b.double() @ a.double())).to(weight.dtype)
    return model
