"""Who this process is in a torch.distributed run, and the few collectives the trainer needs.

torchrun (or `longseq train --nproc N`, which re-launches under it) sets RANK, LOCAL_RANK and WORLD_SIZE; the
process group uses NCCL on GPUs (gloo beside it for CPU tensors) and gloo on CPU. The processes form a
(dp, sp) grid: `sp` consecutive ranks share one sequence (Ulysses), and the dp = world / sp groups of them read
different micro-batches. Gradients are averaged over the whole world by DDP / FSDP2 (ZeRO over dp × sp, as
DeepSpeed-Ulysses does), so the trainer scales each rank's loss by the world size to turn that mean into a sum.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from longseq import process_group
from longseq.config import TrainConfig
from longseq.errors import LongseqError


@dataclass
class DistEnv:
    """This process's place in the run. The default is a plain single-process run (nothing distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: str = "none"  # none | ddp | fsdp
    sp: int = 1  # Ulysses degree
    device: torch.device = torch.device("cpu")
    mesh: Any = None  # 1-D DeviceMesh over the world (FSDP2 shards over it)
    sp_group: Any = None  # this rank's Ulysses process group

    @property
    def distributed(self) -> bool:
        return self.parallel != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp(self) -> int:
        return self.world_size // self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    def all_reduce_sum(self, value: float) -> float:
        if not self.distributed or self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if not self.distributed or self.world_size == 1:
            return
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed or self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def step_batches(self, batches: Iterator, grad_accum: int) -> Iterator[list]:
        """Per optimizer step, this rank's `grad_accum` micro-batches out of the step's grad_accum × dp.

        Every rank reads the same deterministic stream and keeps its own slice, so a step trains on exactly the
        batches a single process with grad_accum × dp micro-batches would (what makes DP equal single-process).
        """
        while True:
            step = [next(batches) for _ in range(grad_accum * self.dp)]
            yield step[self.dp_rank * grad_accum : (self.dp_rank + 1) * grad_accum]

    def shard_sequence(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """(B, S) -> this rank's (B, S / sp) slice of the sequence (Ulysses); the whole tensor when sp is 1."""
        if t is None or self.sp == 1:
            return t
        chunk = t.shape[1] // self.sp
        return t[:, self.sp_rank * chunk : (self.sp_rank + 1) * chunk]


def resolve_parallel(cfg: TrainConfig, world_size: int) -> str:
    if cfg.parallel == "auto":
        return "ddp" if world_size > 1 or cfg.sequence_parallel > 1 else "none"
    if cfg.parallel == "none" and world_size > 1:
        raise LongseqError(f"parallel none trains in one process, but {world_size} were launched: use --parallel "
                           "ddp or fsdp")
    return cfg.parallel


def init_distributed(cfg: TrainConfig) -> DistEnv:
    """Join (or, for a single-process ddp / fsdp run, create) the process group described by the environment."""
    from longseq.models.loader import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    parallel = resolve_parallel(cfg, world)
    device = resolve_device(cfg.device)
    if parallel == "none":
        return DistEnv(device=device)
    if world % cfg.sequence_parallel:
        raise LongseqError(f"sequence_parallel {cfg.sequence_parallel} must divide the number of processes {world}")
    device = process_group.local_device(device, local_rank)
    if not dist.is_initialized():
        backend = process_group.backend(device)
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        else:  # `--parallel fsdp` without torchrun: a group of one (FSDP2 and DCP need a process group)
            store = os.path.join(tempfile.mkdtemp(prefix="longseq-pg-"), "store")
            dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
            world, rank, local_rank = 1, 0, 0
        atexit.register(_destroy)
    from torch.distributed.device_mesh import init_device_mesh

    sp = cfg.sequence_parallel
    mesh = init_device_mesh(device.type, (world,))
    grid = init_device_mesh(device.type, (world // sp, sp), mesh_dim_names=("dp", "sp"))
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, parallel=parallel, sp=sp, device=device,
                   mesh=mesh, sp_group=grid.get_group("sp"))


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
