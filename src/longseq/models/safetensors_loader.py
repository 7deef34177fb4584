"""Load an HF model directory: config.json plus one or sharded safetensors files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from longseq.config import ModelConfig
from longseq.config.hf import read_hf_config
from longseq.errors import LongseqError, first_line
from longseq.models.build import build_from_tensors

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a model directory, from the shard index when there is one."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LongseqError(f"{index}: not a valid shard index ({e})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise LongseqError(f"{path}: shard(s) listed in {INDEX_FILE} are missing: {', '.join(missing[:3])}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.gguf")]
        hint = f" (found {', '.join(other[:3])}; longseq reads safetensors or pass a .gguf file)" if other else ""
        raise LongseqError(f"{path}: no *.safetensors weights{hint}")
    return files


def read_config(path: Path) -> ModelConfig:
    """The model config of an HF directory; every error names the file."""
    file = path / "config.json"
    if not file.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"; to load the GGUF file, pass it itself: --model {ggufs[0]}" if ggufs else ""
        raise LongseqError(f"{path}: no config.json (not a Hugging Face model directory){hint}")
    try:
        cfg = read_hf_config(file)
    except LongseqError as e:  # from_hf's messages (unsupported architecture, missing field) do not name the file
        raise LongseqError(str(e) if str(e).startswith(str(file)) else f"{file}: {e}") from None
    _read_generation_config(path, cfg)
    return cfg


def load_safetensors_dir(path: Path, dtype: torch.dtype, device: torch.device, cfg: ModelConfig | None = None,
                         quant=None):
    """Build the model on `meta`, then read each tensor straight onto `device` in `dtype` (`cfg`: the directory's
    config when the caller has already read it; `quant`: models.quant.QuantLoader for quantized linears)."""
    cfg = cfg or read_config(path)
    files = safetensors_files(path)

    def tensors():
        for file in files:
            try:
                # Reading on the target device avoids a host copy of the whole model for cuda.
                with safe_open(str(file), framework="pt", device=str(device)) as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except LongseqError:
                raise
            except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
                raise LongseqError(f"{file}: not a valid safetensors file ({first_line(e)})") from None

    return build_from_tensors(cfg, tensors(), dtype, device, source=str(path), quant=quant)


def _read_generation_config(path: Path, cfg: ModelConfig) -> None:
    """Instruct models list their end-of-turn tokens in generation_config.json (Llama 3: 128001/128008/128009)."""
    file = path / "generation_config.json"
    if not file.is_file():
        return
    try:
        eos = json.loads(file.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return
    if eos is None:
        return
    eos = [eos] if isinstance(eos, int) else list(eos)
    cfg.eos_token_ids = tuple(dict.fromkeys([*cfg.eos_token_ids, *eos]))
