"""A PEFT LoRA adapter folder read for serving: adapter_config.json + adapter_model.safetensors, as `longseq export
--format peft` and PEFT's `save_pretrained` write them, checked so that a bad adapter is refused in one clear line.

Batched serving adapts the decoder's linear layers only (q/k/v/o, gate/up/down): an adapter that also trains the
embeddings or the LM head (modules_to_save, trainable tokens, tied embeddings), biases, or uses DoRA is refused with
what to do instead (merge it: `longseq export --format merged`). Shapes and layer indices are checked against the
model when the pool packs the adapter (engine/lora/pool.py).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longseq.errors import LongseqError, first_line

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> the HF model
LORA_MODULES = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
_KEY = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight")
_MERGE = "merge it into the base model instead (longseq export --format merged) and serve that"


class LoRAError(LongseqError):
    """An adapter that cannot be served: unreadable, of an unsupported kind, or not made for this model."""


class UnknownLoRAError(LongseqError):
    """A request names an adapter that is not registered (the server answers 404)."""

    def __init__(self, name: str):
        super().__init__(f"the LoRA adapter '{name}' does not exist")
        self.name = name

    def __reduce__(self):  # rebuilt from its name, not its message: it crosses the engine process's pipe
        return type(self), (self.name,)


@dataclass
class AdapterWeights:
    """An adapter's factors on the host in float32: (layer, module) -> (A (r, in), B (out, r), scale)."""

    path: str
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    base_model: str | None = None

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _, _ in self.modules.values())

    @property
    def targets(self) -> list[str]:
        return sorted({m for _, m in self.modules})


def read_peft_adapter(folder: str | Path) -> AdapterWeights:
    """The LoRA factors of a PEFT adapter folder; LoRAError with the reason where it cannot be served."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise LoRAError(f"{folder}: no such adapter folder")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise LoRAError(f"{folder}: not a PEFT adapter folder ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        pickled = " (it holds adapter_model.bin, a pickle: re-save it with safe_serialization=True)" \
            if (folder / "adapter_model.bin").is_file() else ""
        raise LoRAError(f"{folder}: no {ADAPTER_WEIGHTS}{pickled}")
    conf = _read_config(folder)
    weights = _read_weights(folder)
    out = AdapterWeights(str(folder), base_model=conf.get("base_model_name_or_path"))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in weights.items():
        key = name.removeprefix(PEFT_PREFIX)
        match = _KEY.fullmatch(key)
        if match is None:
            raise LoRAError(f"{folder}: {_unservable(key)}")
        layer, parent, module, ab = int(match[1]), match[2], match[3], match[4]
        if module not in LORA_MODULES[parent]:
            raise LoRAError(f"{folder}: {key}: LoRA on {parent}.{module} is not supported (targets: "
                            f"{', '.join(m for ms in LORA_MODULES.values() for m in ms)})")
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise LoRAError(f"{folder}: {key} is not a floating-point matrix (shape {tuple(tensor.shape)})")
        pairs.setdefault((layer, module), {})[ab] = tensor
    if not pairs:
        raise LoRAError(f"{folder}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    alphas = conf.get("alpha_pattern") or {}
    for (layer, module), ab in sorted(pairs.items()):
        where = f"layers.{layer}.{module}"
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{folder}: {where} has lora_{next(iter(ab))} without its other factor")
        a, b = ab["A"].float(), ab["B"].float()
        if a.shape[0] != b.shape[1]:
            raise LoRAError(f"{folder}: {where}: lora_A is {tuple(a.shape)} and lora_B {tuple(b.shape)}; their "
                            "ranks differ")
        rank = a.shape[0]
        if rank == 0:
            continue
        alpha = float(_pattern_value(alphas, f"model.layers.{layer}.{_parent(module)}.{module}",
                                     conf["lora_alpha"]))
        scale = alpha / math.sqrt(rank) if conf.get("use_rslora") else alpha / rank
        out.modules[(layer, module)] = (a, b, scale)
    if not out.modules:
        raise LoRAError(f"{folder}: every LoRA factor has rank 0")
    return out


def _read_config(folder: Path) -> dict:
    try:
        conf = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoRAError(f"{folder / ADAPTER_CONFIG}: unreadable ({first_line(e)})") from None
    if not isinstance(conf, dict):
        raise LoRAError(f"{folder / ADAPTER_CONFIG}: not a JSON object")
    if conf.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{folder}: a {conf.get('peft_type')} adapter; only LoRA adapters are served")
    if conf.get("use_dora"):
        raise LoRAError(f"{folder}: a DoRA adapter (use_dora), which batched serving does not run; {_MERGE}")
    if conf.get("bias", "none") not in ("none", None):
        raise LoRAError(f"{folder}: trains biases (bias={conf['bias']!r}), which batched serving does not apply; "
                        f"{_MERGE}")
    if conf.get("fan_in_fan_out"):
        raise LoRAError(f"{folder}: fan_in_fan_out adapters (GPT-2 style Conv1D layers) do not fit a Llama model")
    saved = conf.get("modules_to_save") or []
    if saved:
        raise LoRAError(f"{folder}: trains whole modules beside its LoRA factors (modules_to_save: "
                        f"{', '.join(map(str, saved))}): batched serving shares those modules with the base and "
                        f"every other adapter; {_MERGE}")
    if conf.get("ensure_weight_tying") or conf.get("trainable_token_indices"):
        raise LoRAError(f"{folder}: trains the (tied) embeddings, which batched serving shares with the base; "
                        f"{_MERGE}")
    alpha = conf.get("lora_alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise LoRAError(f"{folder / ADAPTER_CONFIG}: 'lora_alpha' must be a number, got {alpha!r}")
    return conf


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(folder / ADAPTER_WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise LoRAError(f"{folder / ADAPTER_WEIGHTS}: corrupt or unreadable ({first_line(e)})") from None


def _parent(module: str) -> str:
    return "self_attn" if module in LORA_MODULES["self_attn"] else "mlp"


def _pattern_value(patterns: dict, module_name: str, default):
    # PEFT's rule (peft.utils.other.get_pattern_key): the first key the module's full name ends with, as a regex.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _unservable(key: str) -> str:
    """Why a weight that is not a decoder LoRA factor makes the adapter unservable."""
    if "embed" in key or "lm_head" in key:
        return (f"{key}: the adapter trains the embeddings or the LM head (modules_to_save or tied embeddings), "
                f"which batched serving shares with the base; {_MERGE}")
    if "lora_magnitude_vector" in key:
        return f"{key}: a DoRA adapter, which batched serving does not run; {_MERGE}"
    if key.endswith(".bias"):
        return f"{key}: the adapter trains biases, which batched serving does not apply; {_MERGE}"
    if "norm" in key:
        return (f"{key}: the adapter trains norms (modules_to_save), which batched serving shares with the base; "
                f"{_MERGE}")
    return f"{key}: not a LoRA weight of a decoder linear layer"
