"""Expert parallelism in training (--ep): each EP group of ep data-parallel ranks holds one copy of every expert,
E / ep per rank (models/expert_parallel.py moves the tokens), as DeepSpeed-MoE and Megatron place them.

Gradients: every rank's loss is scaled by dp (train/step.py), so DDP's mean of the non-expert gradients is their
sum over all ranks' tokens. An expert's owner receives, through the all-to-all's backward, the gradients of its EP
group's tokens only (times dp); summing that over the ranks that hold the same experts (one per EP group, the
"replica" group) and dividing by dp gives the same sum over all tokens. DDP must leave the experts alone: it would
overwrite them with rank 0's at start-up and average different experts together.

Checkpoints: the shards go to DCP as DTensors sharded over "ep" and replicated over "replica" (`global_views`), so
a checkpoint holds the full (E, ...) stacks, as a run without --ep writes them, and resumes or exports anywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from longseq.config.train import check_expert_split
from longseq.models.expert_parallel import ExpertShard, expert_parameters, shard_experts
from longseq.train.parallel.env import DistEnv


def split_experts(model: nn.Module, env: DistEnv) -> ExpertShard:
    """Keep this rank's experts (and their adapters: call after the LoRA swap) in every sparse block of `model`;
    the other experts' tensors are dropped."""
    check_expert_split(env.ep, model.config.num_experts if model.config.is_moe else 1)
    return shard_experts(model, env.group("ep"))


def expert_names(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name in `model`: parameter} of the split experts (and their adapters)."""
    held = {id(p) for p in expert_parameters(model)}
    return {n: p for n, p in model.named_parameters() if id(p) in held}


def ignore_in_ddp(step_model: nn.Module) -> None:
    """Before wrapping `step_model` in DDP: neither broadcast nor average the split experts."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step_model, list(expert_names(step_model)))


def sync_expert_grads(model: nn.Module, env: DistEnv) -> list[nn.Parameter]:
    """After a step's backward: the trainable experts' gradients summed over their replicas, over dp (see above).
    Returns those parameters (clipping adds their squared norms over the EP group)."""
    params = [p for p in expert_parameters(model) if p.requires_grad]
    for p in params:
        if p.grad is None:  # no token reached these experts anywhere in the group: still a collective for all
            p.grad = torch.zeros_like(p)
    if params:
        flat = torch.cat([p.grad.flatten() for p in params])  # one all-reduce, not one per tensor
        if env.dp > env.ep:
            dist.all_reduce(flat, group=env.group("replica"))
        flat /= env.grad_ranks
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    return params


def global_views(state: dict, model: nn.Module, env: DistEnv) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Replace, in place, the split experts' tensors of a DCP state {"model": {name: t}, "optim": {"state": {name:
    {key: t}}}} by DTensors of the full (E, ...) stacks whose local shard is this rank's. Returns {path: (view,
    local tensor)} for `restore_locals` after a load."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    names = expert_names(model)
    swapped: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def view(path: str, t: torch.Tensor) -> torch.Tensor:
        shape = (t.shape[0] * env.ep, *t.shape[1:])
        d = DTensor.from_local(t, env.experts, [Replicate(), Shard(0)], run_check=False, shape=torch.Size(shape),
                               stride=torch.empty(shape, device="meta").stride())
        swapped[path] = (d, t)
        return d

    weights = state["model"]
    for name in names:
        if name in weights:
            weights[name] = view(name, weights[name])
    optim = state["optim"].get("state", {})
    for name, entry in optim.items():
        if name in names:  # a new dict: get_state_dict hands out the optimizer's own per-parameter dicts
            optim[name] = {key: view(f"{name}.{key}", t) if torch.is_tensor(t) and t.shape == names[name].shape
                           else t for key, t in entry.items()}  # not AdamW's scalar step count
    return swapped


def restore_locals(state: dict, swapped: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """After dcp.load into `global_views`' DTensors: the loaded shards back into the plain local tensors."""
    with torch.no_grad():
        for d, t in swapped.values():
            if d.to_local().data_ptr() != t.data_ptr():  # DCP may have loaded into a copy
                t.copy_(d.to_local())
    for name in list(state["model"]):
        if name in swapped:
            state["model"][name] = swapped[name][1]
    for name, entry in state["optim"].get("state", {}).items():
        for key in entry:
            if f"{name}.{key}" in swapped:
                entry[key] = swapped[f"{name}.{key}"][1]


def local_slices(model: nn.Module, env: DistEnv) -> dict[str, slice]:
    """{expert parameter name: the rows of the full (E, ...) stack this rank holds}: for full-tensor loads."""
    names = expert_names(model)
    if not names:
        return {}
    shard = next(m.expert_shard for m in model.modules() if getattr(m, "expert_shard", None) is not None)
    return {n: slice(shard.first, shard.first + shard.num_local) for n in names}
