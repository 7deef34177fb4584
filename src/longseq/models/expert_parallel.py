"""Expert parallelism: a mixture of experts' experts split over processes, tokens sent to their experts' process
and back with all-to-all (GShard, Lepikhin et al. 2020, arXiv 2006.16668; as in DeepSpeed-MoE and Megatron).

Each of the W processes of `group` holds E / W consecutive experts (rank r: experts r·E/W ..) and its own tokens.
A sparse block routes its tokens as usual, sorts the (token, choice) rows by expert, which orders them by owning
process too, and exchanges them with one all_to_all (row counts first: a host sync for the split sizes). The owner
runs its experts over every row it received, as a top-1 choice of weight 1 through the same expert compute
(models/moe.py, adapters included), and a second all_to_all returns the outputs, which the sender weights and sums
over the token's k choices. Both exchanges are differentiable (torch.distributed.nn), so backward sends the gradients
the same ways. Expert weights (and their adapters) get gradients from every process's tokens on their owner alone:
they must not be averaged over the group as data-parallel weights are (`expert_parameters`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_to_all_single

from longseq.errors import LongseqError


@dataclass(frozen=True)
class ExpertShard:
    """Which experts this process holds: experts first .. first + num_local of num_experts, over `world` ranks."""

    group: dist.ProcessGroup | None
    world: int
    rank: int
    num_experts: int

    @property
    def num_local(self) -> int:
        return self.num_experts // self.world

    @property
    def first(self) -> int:
        return self.rank * self.num_local


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> ExpertShard:
    """Keep this rank's experts in every sparse block of `model` (after any LoRA swap: adapters are split with their
    experts) and route its blocks through the exchange. Returns the shard."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    shard = ExpertShard(group, world, rank, model.config.num_experts)
    if shard.num_experts % world:
        raise LongseqError(f"expert parallelism over {world} processes needs the experts ({shard.num_experts}) to "
                           "divide evenly among them")
    keep = slice(shard.first, shard.first + shard.num_local)
    for block in _sparse_blocks(model):
        for name, p in list(block.experts.named_parameters()):
            if p.dim() != 3:  # NF4 codes are (E·out, in): QLoRA is not split yet
                raise LongseqError("expert parallelism takes stacked (E, out, in) expert weights; not QLoRA's NF4")
            module_name, _, leaf = name.rpartition(".")
            owner = block.experts.get_submodule(module_name) if module_name else block.experts
            setattr(owner, leaf, nn.Parameter(p.detach()[keep].clone(), requires_grad=p.requires_grad))
        if hasattr(block.experts, "shapes"):  # LoRAExperts records its stacks' shapes
            block.experts.shapes = {k: (shard.num_local, *s[1:]) for k, s in block.experts.shapes.items()}
        block.expert_shard = shard
    return shard


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that live on one rank only (split experts): leave them out of data-parallel averaging."""
    return [p for m in _sparse_blocks(model) if m.expert_shard is not None for p in m.experts.parameters()]


def _sparse_blocks(model: nn.Module) -> list[nn.Module]:
    """The SparseMoeBlocks (models/sparse_moe.py, which imports this file): the modules with an expert_shard."""
    return [m for m in model.modules() if hasattr(m, "expert_shard")]


def dispatch(experts: nn.Module, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, shard: ExpertShard,
             mode: str | None = None) -> torch.Tensor:
    """sum_j weights[t, j] · expert_{ids[t, j]}(x[t]) for this rank's tokens x (T, d), the experts anywhere in the
    group: experts(x, ids, weights, mode) is this rank's local expert compute."""
    T, k = ids.shape
    flat = ids.flatten()  # (T·k,)
    order = flat.argsort(stable=True)  # by expert, hence by owning rank
    expert = flat[order]
    send = torch.bincount(expert // shard.num_local, minlength=shard.world)  # (W,) rows to each rank
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=shard.group)
    send_sizes, recv_sizes = send.tolist(), recv.tolist()  # the host sync: split sizes
    rows = all_to_all_single(x.new_empty(sum(recv_sizes), x.shape[-1]), x[order // k], recv_sizes, send_sizes,
                             group=shard.group)  # (R, d) rows for this rank's experts, by source rank
    local = torch.empty(sum(recv_sizes), dtype=expert.dtype, device=expert.device)
    dist.all_to_all_single(local, expert, recv_sizes, send_sizes, group=shard.group)
    local = (local - shard.first).unsqueeze(1)  # (R, 1) local expert of each received row
    ones = torch.ones(local.shape, dtype=torch.float32, device=x.device)
    y = experts(rows, local, ones, mode)  # (R, d)
    back = all_to_all_single(y.new_empty(T * k, y.shape[-1]), y, send_sizes, recv_sizes, group=shard.group)
    unsorted = torch.empty_like(order)
    unsorted[order] = torch.arange(order.numel(), device=order.device)
    out = back[unsorted].view(T, k, -1)  # (T, k, d) in token order
    return (out * weights.unsqueeze(-1).to(out.dtype)).sum(dim=1).to(x.dtype)
