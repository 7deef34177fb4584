"""Tensor parallelism for training, with sequence parallelism, through PyTorch's DTensor (`parallelize_module`).

Megatron-LM's layout (Shoeybi et al. 2019, arXiv 1909.08053): in each decoder layer q/k/v and gate/up are split by
output features (column parallel, each rank computing its heads and its slice of the MLP width) and o/down by input
features (row parallel), so a layer needs one reduction after attention and one after the MLP. Sequence parallelism
(Korthikanti et al. 2022, arXiv 2205.05198): between those, the residual stream, the RMSNorms and the loss run on
1/N of the tokens each, the reduction becomes a reduce-scatter over the sequence and each norm's output is
all-gathered for the next column-parallel matmuls, at the same communication volume as the all-reduce.

Embedding, final norm and LM head stay whole on every tensor-parallel rank (FSDP2 shards them over all processes,
train/parallel/data_parallel.py): each rank embeds and scores only its own tokens. LoRA layers split like the
layers they wrap: a column-parallel adapter keeps A whole and splits B by rows; a row-parallel one splits A by
columns and keeps B whole, whose partial products then join the base's in the same reduction.
"""

from __future__ import annotations

import logging
from functools import partial

from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

from longseq.errors import LongseqError
from longseq.train.lora import LoRALinear

# Where each parameter of a LoRALinear goes: (column parallel, row parallel).
_LORA_PLACEMENTS = {
    "weight": (Shard(0), Shard(1)),
    "bias": (Shard(0), Replicate()),
    "lora_A.weight": (Replicate(), Shard(1)),
    "lora_B.weight": (Shard(0), Replicate()),
}


def _distribute_lora(column: bool, name: str, module: nn.Module, mesh) -> None:
    if not isinstance(module, LoRALinear):
        return  # distribute_module visits the adapter's submodules too: LoRALinear placed them all
    for path, param in list(module.named_parameters()):
        owner_path, _, leaf = path.rpartition(".")
        placement = _LORA_PLACEMENTS[path][0 if column else 1]
        owner = module.get_submodule(owner_path) if owner_path else module
        owner.register_parameter(leaf, nn.Parameter(distribute_tensor(param, mesh, [placement]),
                                                    requires_grad=param.requires_grad))


class _Colwise(ColwiseParallel):
    """ColwiseParallel for nn.Linear and for LoRALinear."""

    def _apply(self, module: nn.Module, device_mesh):
        if not isinstance(module, LoRALinear):
            return super()._apply(module, device_mesh)
        return distribute_module(module, device_mesh, partial(_distribute_lora, True),
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class _Rowwise(RowwiseParallel):
    """RowwiseParallel for nn.Linear and for LoRALinear."""

    def _apply(self, module: nn.Module, device_mesh):
        if not isinstance(module, LoRALinear):
            return super()._apply(module, device_mesh)
        self.desired_input_layouts = (Shard(-1),)
        return distribute_module(module, device_mesh, partial(_distribute_lora, False),
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class _Norm(SequenceParallel):
    """SequenceParallel, keeping a frozen weight frozen (LoRA): PyTorch's makes every replicated weight trainable."""

    def _replicate_module_fn(self, name: str, module: nn.Module, device_mesh) -> None:
        for p_name, param in list(module.named_parameters()):
            replicated = DTensor.from_local(param, device_mesh, [Replicate()], run_check=False)
            module.register_parameter(p_name, nn.Parameter(replicated, requires_grad=param.requires_grad))


class _GatheringNorm(_Norm):
    """An RMSNorm over this rank's tokens whose output is all-gathered over the sequence: the input of the
    column-parallel matmuls after it (Megatron's `g`; backward reduce-scatters)."""

    @staticmethod
    def _prepare_output_fn(use_local_output, mod, outputs, device_mesh):
        return outputs.redistribute(placements=[Replicate()]).to_local()


def check_tensor_parallel(cfg, degree: int) -> None:
    """Refuse, in one line, a model that `degree` ranks cannot split."""
    sizes = {"attention heads": cfg.num_heads, "KV heads": cfg.num_kv_heads, "MLP width": cfg.intermediate_size}
    for what, size in sizes.items():
        if size % degree:
            raise LongseqError(f"tp {degree} must divide the model's {what} ({size})")
    if not cfg.attention.plain:
        raise LongseqError("--tp with an attention variant (--attention ...) is not supported yet")
    if cfg.is_moe:
        raise LongseqError("--tp with a mixture-of-experts model is not supported")


def parallelize(model: nn.Module, mesh, degree: int) -> None:
    """Split every decoder layer of `model` (a CausalLM, LoRA layers swapped in or not) over the 1-D `mesh` of
    `degree` tensor-parallel ranks, in place. Its parameters become DTensors (meta ones stay meta)."""
    check_tensor_parallel(model.config, degree)
    # DTensor logs a note each time it reduces over two mesh dimensions one after the other: the gradient norm's
    # scalar, once a step. Not worth a line on the terminal every step.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.num_heads //= degree  # the views into heads see this rank's heads
        attn.num_kv_heads //= degree
        plan = {
            "input_layernorm": _GatheringNorm(),
            "self_attn.q_proj": _Colwise(), "self_attn.k_proj": _Colwise(), "self_attn.v_proj": _Colwise(),
            "self_attn.o_proj": _Rowwise(output_layouts=Shard(1)),
            "post_attention_layernorm": _GatheringNorm(),
            "mlp.gate_proj": _Colwise(), "mlp.up_proj": _Colwise(),
            "mlp.down_proj": _Rowwise(output_layouts=Shard(1)),
        }
        if attn.q_norm is not None:  # Qwen3's per-head norms: whole weights over this rank's heads (B, S, H, D)
            plan["self_attn.q_norm"] = _Norm(sequence_dim=2, use_local_output=True)
            plan["self_attn.k_norm"] = _Norm(sequence_dim=2, use_local_output=True)
        parallelize_module(layer, mesh, plan)
