"""Data parallelism with PyTorch's own wrappers: DDP (replicated weights, all-reduced gradients) or FSDP2
(`fully_shard`: weights, gradients and optimizer state sharded over the ranks, ZeRO-3; Rajbhandari et al. 2020,
arXiv 1910.02054), optionally with everything sharded kept in CPU memory (`CPUOffloadPolicy`)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from longseq.train.parallel.env import DistEnv
from longseq.train.precision import Precision


def wrap(step_model: nn.Module, env: DistEnv, precision: Precision, offload: bool = False) -> nn.Module:
    """`step_model` (a train.step.TokenLoss around the CausalLM) made data parallel over every process.

    FSDP2 shards each decoder layer as one unit (gathered just before its forward and backward, freed after) and the
    rest (embedding, final norm, LM head) as the root. Frozen LoRA / QLoRA base weights are sharded too. Call
    before building the optimizer: FSDP2 replaces the parameters by sharded DTensors.
    """
    if env.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        # LoRA: frozen weights get no gradient buckets; every trainable one is used in each step. Gradients are
        # views into the all-reduce buckets: one copy of them, not two (full fine-tuning: 4 bytes/param saved).
        return DistributedDataParallel(step_model, device_ids=ids, gradient_as_bucket_view=True)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    _uniform_trainable_dtype(step_model)
    _check_nf4_shardable(step_model, env.world_size)
    # Gather weights in the autocast dtype (half the traffic of fp32 master weights), reduce gradients in fp32.
    mp = MixedPrecisionPolicy(param_dtype=precision.autocast_dtype, reduce_dtype=torch.float32)
    off = CPUOffloadPolicy(pin_memory=env.device.type == "cuda") if offload else OffloadPolicy()
    layer_mesh = env.fsdp_mesh  # tensor parallel: the ranks that hold the same layer shards
    for layer in step_model.lm.model.layers:
        fully_shard(layer, mesh=layer_mesh, mp_policy=mp, offload_policy=off)
    # The root (embedding, final norm, LM head: whole on every tensor-parallel rank) over all ranks.
    fully_shard(step_model, mesh=env.mesh, mp_policy=mp, offload_policy=off)
    if env.tp > 1:  # its gradient reduction sums every rank's tokens: average over the others' count, as theirs
        step_model.set_gradient_divide_factor(float(env.grad_ranks))
        step_model.set_force_sum_reduction_for_comms(True)  # a sum, then the division (gloo has no PREMUL_SUM)
    return step_model


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, stages=None, split=None) -> None:
    """torch.nn.utils.clip_grad_norm_ over parameters whose gradients may be DTensors on different meshes (tensor
    parallel: the layers' on the 2-D mesh, the root's on all ranks), each mesh's norm reduced on its own, and held
    by different pipeline stages (`stages`: their process group, over which the squared norms add up). `split`:
    (parameters, group), ones every rank of the group holds a different part of (expert parallelism's experts):
    their squared norms add up over that group."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    split_params, split_group = split or ((), None)
    split_ids = {id(p) for p in split_params}
    groups: dict = {}
    for p in params:
        groups.setdefault("split" if id(p) in split_ids else getattr(p.grad, "device_mesh", None), []).append(p)
    if len(groups) <= 1 and stages is None and split_group is None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    device = params[0].grad.device if params else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for key, group in groups.items():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        square = (norm.full_tensor() if isinstance(norm, DTensor) else norm).double().to(device) ** 2
        if key == "split":  # added up over split_group below
            split_square = square
        else:
            squares = squares + square
    if split_group is not None:  # every rank of the group joins, whether it holds split gradients or not
        part = split_square if "split" in groups else torch.zeros_like(squares)
        dist.all_reduce(part, group=split_group)
        squares = squares + part
    if stages is not None:
        dist.all_reduce(squares, group=stages)
    total = squares.sqrt().float()
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)


def _uniform_trainable_dtype(module: nn.Module) -> None:
    # FSDP2 reduce-scatters one flat buffer per layer, so a layer's trainable weights need one dtype. LoRA adapters
    # are fp32 while LongLoRA's trained norms / embedding are in the frozen dtype: keep those in fp32 too.
    trainable = [p for p in module.parameters() if p.requires_grad]
    if len({p.dtype for p in trainable}) > 1:
        for p in trainable:
            p.data = p.data.float()


def _check_nf4_shardable(module: nn.Module, world: int) -> None:
    # torchao's NF4 tensor shards by splitting its packed data and both levels of scales into equal pieces along
    # rows; real model shapes split evenly, toy ones may not.
    from longseq.errors import LongseqError
    from longseq.train.lora import is_nf4

    for name, p in module.named_parameters():
        if not is_nf4(p):
            continue
        inner = (p.quantized_data, p.quantized_scalers, p.quantization_factor)
        if p.size(0) % world or any(t.numel() % world for t in inner):
            raise LongseqError(f"QLoRA with fsdp: the NF4 weight {name} {tuple(p.shape)} cannot be split evenly over "
                               f"{world} processes; use --parallel ddp")


def gradient_sync(model: nn.Module, env: DistEnv, sync: bool):
    """Context for one micro-batch's forward and backward. DDP all-reduces only on the last of a step's micro-batches
    (the others accumulate into the replicated gradients). FSDP reduce-scatters after every one: skipping it would
    keep every layer's unsharded gradient until the last micro-batch, the whole model's gradients per GPU."""
    if env.parallel == "ddp" and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def grad_scaler(env: DistEnv, precision: Precision):
    """fp16 loss scaling; under FSDP the overflow check must agree across ranks (ShardedGradScaler all-reduces it)."""
    if precision.name != "fp16" or env.parallel != "fsdp":
        return precision.grad_scaler()
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler(precision.device_type)
