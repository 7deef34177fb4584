"""Sharded loading: a model built on the `meta` device (shapes, no storage), split by tensor parallelism and FSDP2,
then given storage for this rank's shards only, each filled with just its slice of the safetensors file(s).

Per rank the weights take model / (FSDP ranks × tensor-parallel ranks) bytes of memory at every moment, instead of
a whole model loaded and then sharded (16 GiB per process for an 8B model in bf16, 140 GiB for 70B), and each rank
reads only its slices from disk (`safe_open(...).get_slice`: the bytes of those rows / columns, not the tensor).
With `--fsdp-offload` the shards are created in CPU memory, where CPUOffloadPolicy keeps them.

The trained parameters that no checkpoint holds (LoRA adapters) are initialised whole, in the order and on the
device a single-process run initialises them, and each rank keeps its slice: the same values at any layout.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from longseq.config import TrainConfig
from longseq.errors import LongseqError, first_line
from longseq.models.llama import CausalLM
from longseq.models.loader import LoadedModel, resolve_model_path
from longseq.models.safetensors_loader import INDEX_FILE, read_config, safetensors_files
from longseq.models.tokenizer import load_tokenizer
from longseq.train.lora import LoRALinear, new_adapter
from longseq.train.parallel.env import DistEnv

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # older HF checkpoints store the RoPE table; we compute it


@dataclass
class LoadStats:
    """What this rank read: bytes of tensor data, and how many tensors it read a slice of."""

    bytes_read: int = 0
    tensors: int = 0


def sharded_loading(cfg: TrainConfig, env: DistEnv) -> bool:
    """Whether this run builds on meta and loads per shard: FSDP or pipeline stages over an HF safetensors
    directory. (A GGUF file is dequantized whole; QLoRA quantizes whole weights before FSDP shards them: both load
    whole, as one process does.)"""
    if not (env.parallel == "fsdp" or env.pp > 1) or cfg.method == "qlora":
        return False
    return resolve_model_path(cfg.model).is_dir()


def load_meta(path: str | None, dtype: torch.dtype) -> LoadedModel:
    """The model of the HF directory `path` built on meta in `dtype`, with its tokenizer; only the files' headers
    are read, to check that they hold this model's weights."""
    p = resolve_model_path(path)
    config = read_config(p)
    tokenizer = load_tokenizer(p)
    with torch.device("meta"):
        model = CausalLM(config).to(dtype)
    names = _tensor_files(p)
    expected = dict(model.named_parameters())  # in the model's order: the first missing one named is the first
    unexpected = [n for n in names if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
                  and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if unexpected:
        raise LongseqError(f"{p}: unexpected weight {unexpected[0]!r}; is this a {config.arch} model?")
    missing = [n for n in expected if n not in names]
    if missing:
        raise LongseqError(f"{p}: {len(missing)} weight(s) missing, e.g. {missing[0]!r}")
    return LoadedModel(model=model, tokenizer=tokenizer, path=p)


def materialize(root: nn.Module, model: CausalLM, path: Path, device: torch.device, seed: int,
                adapter_device: torch.device) -> LoadStats:
    """Give every parameter of `model` (built on meta, then made trainable and split; `root` is the outermost
    FSDP module holding it) storage on `device` for this rank's shard, and fill it: weights from the safetensors
    files of `path`, LoRA adapters initialised as make_trainable would (seeded with `seed`, drawn on
    `adapter_device`). A pipeline stage holds (and reads) only its layers. Returns what was read."""
    root.to_empty(device=device)  # FSDP2 re-registers its shards (FSDPModule._apply)
    model.rotary.reset(device)
    where = _tensor_files(path)  # load_meta checked that it holds every weight
    adapters = {f"{name}.{part}.weight" for name, m in model.named_modules()
                if isinstance(m, LoRALinear) and m.rank for part in ("lora_A", "lora_B")}
    stats = LoadStats()
    files: dict[Path, object] = {}
    with ExitStack() as opened, torch.no_grad():
        for name, param in model.named_parameters():
            if name in adapters:
                continue
            # A pipeline's last stage holds a tied LM head without the embedding: the file has it as that.
            source = name if name in where else "model.embed_tokens.weight"
            file = where[source]
            if file not in files:
                files[file] = _open(opened, file)
            _read_shard(files[file], source, param, file, stats)
        _init_adapters(model, seed, adapter_device)
    return stats


def _tensor_files(path: Path) -> dict[str, Path]:
    """Which file holds each tensor: the shard index, or the headers of the files (read without their data)."""
    index = path / INDEX_FILE
    if index.is_file():
        safetensors_files(path)  # checks that the index parses and every listed file exists
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    out: dict[str, Path] = {}
    for file in safetensors_files(path):
        with ExitStack() as opened:
            out.update(dict.fromkeys(_open(opened, file).keys(), file))
    return out


def _open(opened: ExitStack, file: Path):
    """`file` opened for reading (tensor data only as it is sliced), closed with `opened`."""
    try:
        return opened.enter_context(safe_open(str(file), framework="pt", device="cpu"))
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise LongseqError(f"{file}: not a valid safetensors file ({first_line(e)})") from None


def local_region(param: torch.Tensor) -> tuple[slice, ...]:
    """The slice of the whole tensor that this rank's shard of `param` (a DTensor, or a plain tensor: all of it)
    holds. FSDP2 and tensor parallelism shard each dimension into contiguous ranges (what DCP records as a shard's
    offsets and sizes too)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return tuple(slice(0, n) for n in param.shape)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def _read_shard(f, name: str, param: torch.Tensor, file: Path, stats: LoadStats) -> None:
    region = local_region(param)
    local = _local(param)
    try:
        part = f.get_slice(name)
        shape = tuple(part.get_shape())
        if shape != tuple(param.shape):
            raise LongseqError(f"{file}: weight {name} has shape {shape}, config expects {tuple(param.shape)}")
        values = part[region] if local.numel() else None
    except LongseqError:
        raise
    except Exception as e:
        raise LongseqError(f"{file}: cannot read {name} ({first_line(e)})") from None
    if values is None:  # an empty shard (more ranks than rows)
        return
    if tuple(values.shape) != tuple(local.shape):
        raise LongseqError(f"{name}: the slice read {tuple(values.shape)} is not this rank's shard "
                           f"{tuple(local.shape)}")
    local.copy_(values)  # into the dtype and device of the shard
    stats.bytes_read += values.numel() * values.element_size()
    stats.tensors += 1


def _init_adapters(model: nn.Module, seed: int, device: torch.device) -> None:
    """LoRA factors as make_trainable draws them on one process (same seed, order and device), whole, one at a
    time; each rank keeps its slice. A pipeline stage draws (and drops) those of the layers it does not hold too,
    so that its own come out of the random stream where they would on one process."""
    torch.manual_seed(seed)
    layers = model.model.layers
    held = dict(layers.items()) if isinstance(layers, nn.ModuleDict) else {str(i): m for i, m in enumerate(layers)}
    like = next(iter(held.values()))  # every decoder layer has the same adapters (apply_lora)
    for i in range(model.config.num_layers):
        for module in held.get(str(i), like).modules():
            if not isinstance(module, LoRALinear) or not module.rank:
                continue
            whole = new_adapter(module.in_features, module.out_features, module.rank, device)
            if str(i) in held:
                for param, init in zip((module.lora_A.weight, module.lora_B.weight), whole, strict=True):
                    _local(param).copy_(init.weight[local_region(param)])
