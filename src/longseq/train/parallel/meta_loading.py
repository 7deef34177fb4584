"""Sharded loading: a model built on the `meta` device (shapes, no storage), split by tensor parallelism and FSDP2,
by pipeline stages, or by expert parallelism (each rank's E / ep experts of every sparse block), then given storage
for this rank's shards only, each filled with just its slice of the safetensors file(s).

Per rank the weights take model / (FSDP ranks × tensor-parallel ranks) bytes of memory at every moment, instead of
a whole model loaded and then sharded (16 GiB per process for an 8B model in bf16, 140 GiB for 70B), and each rank
reads only its slices from disk (`safe_open(...).get_slice`: the bytes of those rows / columns, not the tensor).
Checkpoints that store one matrix per expert (Hub Mixtral / Qwen-MoE, models/expert_weights.py) are read matrix by
matrix, only those of the experts this rank holds.
With `--fsdp-offload` the shards are created in CPU memory, where CPUOffloadPolicy keeps them.

The trained parameters that no checkpoint holds (LoRA adapters, the experts' ones included) are initialised whole,
in the order and on the device a single-process run initialises them, and each rank keeps its slice: the same values
at any layout. (Only these small factors are ever drawn whole.)
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from longseq.config import ModelConfig, TrainConfig
from longseq.errors import LongseqError, first_line
from longseq.models.expert_parallel import ExpertShard
from longseq.models.expert_weights import expert_slot
from longseq.models.llama import CausalLM
from longseq.models.loader import LoadedModel, resolve_model_path
from longseq.models.safetensors_loader import INDEX_FILE, read_config, safetensors_files
from longseq.models.tokenizer import load_tokenizer
from longseq.train.expert_lora import new_expert_adapter
from longseq.train.lora import LoRALinear, adapted_layers, new_adapter
from longseq.train.parallel.env import DistEnv

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # older HF checkpoints store the RoPE table; we compute it


@dataclass
class LoadStats:
    """What this rank read: bytes of tensor data, and how many tensors it read a slice of."""

    bytes_read: int = 0
    tensors: int = 0


# A parameter's sources: (checkpoint name, file, index of that tensor in the whole parameter: () for all of it,
# (e,) or (e, rows) for one expert's matrix of a stacked weight)
Sources = dict[str, list[tuple[str, Path, tuple]]]


def sharded_loading(cfg: TrainConfig, env: DistEnv) -> bool:
    """Whether this run builds on meta and loads per shard: FSDP, pipeline stages or expert parallelism over an HF
    safetensors directory. (A GGUF file is dequantized whole; QLoRA quantizes whole weights before FSDP shards them:
    both load whole, as one process does.)"""
    if not (env.parallel == "fsdp" or env.pp > 1 or env.ep > 1) or cfg.method == "qlora":
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
    expected = dict(model.named_parameters())  # in the model's order: the first missing one named is the first
    sources = _sources(p, config)
    unexpected = [source for n, parts in sources.items() if n not in expected for source, *_ in parts]
    if unexpected:
        raise LongseqError(f"{p}: unexpected weight {unexpected[0]!r}; is this a {config.arch} model?")
    missing = [n for n, param in expected.items()
               if sum(_part(param.shape, index).numel() for *_, index in sources.get(n, ())) < param.numel()]
    if missing:
        raise LongseqError(f"{p}: {len(missing)} weight(s) missing, e.g. {missing[0]!r}")
    return LoadedModel(model=model, tokenizer=tokenizer, path=p)


def materialize(root: nn.Module, model: CausalLM, path: Path, device: torch.device, seed: int,
                adapter_device: torch.device) -> LoadStats:
    """Give every parameter of `model` (built on meta, then made trainable and split; `root` is the outermost
    FSDP module holding it) storage on `device` for this rank's shard, and fill it: weights from the safetensors
    files of `path`, LoRA adapters initialised as make_trainable would (seeded with `seed`, drawn on
    `adapter_device`). A pipeline stage holds (and reads) only its layers, an expert-parallel rank only its experts
    (call after split_experts and before DDP wraps `root`). Returns what was read."""
    root.to_empty(device=device)  # FSDP2 re-registers its shards (FSDPModule._apply)
    model.rotary.reset(device)
    sources = _sources(path, model.config)  # load_meta checked that they hold every weight
    split = _split_experts(model)
    stats = LoadStats()
    files: dict[Path, object] = {}
    with ExitStack() as opened, torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:  # adapters: no checkpoint holds them
                continue
            shape, region = _whole_shape_and_region(param, split.get(name))
            # A pipeline's last stage holds a tied LM head without the embedding: the file has it as that.
            for source, file, index in sources.get(name) or sources["model.embed_tokens.weight"]:
                if file not in files:
                    files[file] = _open(opened, file)
                _read_shard(files[file], source, index, shape, region, _local(param), file, stats)
        _init_adapters(model, seed, adapter_device, split)
    return stats


def _sources(path: Path, config: ModelConfig) -> Sources:
    """Where each parameter of a model of `config` is in the safetensors files of `path`."""
    out: Sources = {}
    for name, file in _tensor_files(path).items():
        if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        target, index = expert_slot(name, config.moe_intermediate_size) or (name, ())
        out.setdefault(target, []).append((name, file, index))
    return out


def _part(shape: tuple[int, ...], index: tuple) -> torch.Size:
    """The shape of whole[index] for a tensor `whole` of `shape`."""
    return torch.empty(shape, device="meta")[index].shape


def _split_experts(model: nn.Module) -> dict[str, ExpertShard]:
    """{parameter name: which experts this rank holds} for the expert stacks (and their adapters) of the sparse
    blocks that expert parallelism split (models/expert_parallel.py)."""
    return {f"{block_name}.experts.{name}": block.expert_shard for block_name, block in model.named_modules()
            if getattr(block, "expert_shard", None) is not None for name, _ in block.experts.named_parameters()}


def _whole_shape_and_region(param: torch.Tensor,
                            shard: ExpertShard | None) -> tuple[tuple[int, ...], tuple[slice, ...]]:
    """The whole parameter's shape and the region of it this rank holds: an expert-parallel rank's experts (its
    rows of the (E, ...) stack), else local_region."""
    if shard is None:
        return tuple(param.shape), local_region(param)
    rest = tuple(param.shape[1:])
    return (shard.num_experts, *rest), (slice(shard.first, shard.first + shard.num_local), *(slice(0, n) for n in rest))


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


def _read_shard(f, name: str, index: tuple, shape: tuple[int, ...], region: tuple[slice, ...], local: torch.Tensor,
                file: Path, stats: LoadStats) -> None:
    """Fill `local` (this rank's `region` of a whole parameter of `shape`) with what it holds of the file's tensor
    `name`, which is whole[index]: all of it (index ()), read as a slice; or one expert's matrix (index (e,) or
    (e, rows)), read whole by the rank that holds expert e and by no other."""
    expected = tuple(_part(shape, index))
    try:
        part = f.get_slice(name)
        got = tuple(part.get_shape())
        if got != expected:
            raise LongseqError(f"{file}: weight {name} has shape {got}, config expects {expected}")
        if not index:
            values, dest = (part[region] if local.numel() else None), local
        else:  # one expert's matrix: whole, into its rows (the stacks are split by expert only, never within one)
            rows = region[0]
            if any(r != slice(0, n) for r, n in zip(region[1:], shape[1:], strict=True)):
                raise LongseqError(f"{file}: {name} is one expert's matrix; this layout splits within an expert")
            held = rows.start <= index[0] < rows.stop
            values = part[:] if held else None
            dest = local[(index[0] - rows.start, *index[1:])] if held else None
    except LongseqError:
        raise
    except Exception as e:
        raise LongseqError(f"{file}: cannot read {name} ({first_line(e)})") from None
    if values is None:  # an empty shard (more ranks than rows), or an expert another rank holds
        return
    if tuple(values.shape) != tuple(dest.shape):
        raise LongseqError(f"{name}: the slice read {tuple(values.shape)} is not this rank's shard "
                           f"{tuple(dest.shape)}")
    dest.copy_(values)  # into the dtype and device of the shard
    stats.bytes_read += values.numel() * values.element_size()
    stats.tensors += 1


def _init_adapters(model: CausalLM, seed: int, device: torch.device, split: dict[str, ExpertShard]) -> None:
    """LoRA factors as make_trainable draws them on one process (same seed, order and device), whole, one at a
    time; each rank keeps its slice (its experts' rows under expert parallelism). A pipeline stage draws (and drops)
    those of the layers it does not hold too, so that its own come out of the random stream where they would on one
    process."""
    torch.manual_seed(seed)
    layers = model.model.layers
    held = dict(layers.items()) if isinstance(layers, nn.ModuleDict) else {str(i): m for i, m in enumerate(layers)}
    names = {id(p): n for n, p in model.named_parameters()}
    like = next(iter(held.values()))  # every decoder layer has the same adapters (apply_lora)
    for i in range(model.config.num_layers):
        for module in adapted_layers(held.get(str(i), like)):
            if isinstance(module, LoRALinear):
                if not module.rank:
                    continue
                whole = new_adapter(module.in_features, module.out_features, module.rank, device)
                pairs = zip((module.lora_A.weight, module.lora_B.weight), (w.weight for w in whole), strict=True)
            else:  # LoRAExperts: A (E, in, r) and B (E, r, out) per adapted stack, drawn for all E experts
                pairs = []
                for stack in module.lora_A:
                    _, out, inp = module.shapes[stack]
                    whole = new_expert_adapter((model.config.num_experts, out, inp), module.rank, device)
                    pairs += zip((module.lora_A[stack], module.lora_B[stack]), whole, strict=True)
            if str(i) in held:
                for param, init in pairs:
                    _local(param).copy_(init[_whole_shape_and_region(param, split.get(names[id(param)]))[1]])
