"""Who this process is in a torch.distributed run, and the few collectives the trainer needs.

torchrun (or `longseq train --nproc N`, which re-launches under it) sets RANK, LOCAL_RANK and WORLD_SIZE; the
process group uses NCCL on GPUs (gloo beside it for CPU tensors) and gloo on CPU. The processes form a
(pp, dp, cp, sp, tp) grid, tp varying fastest (tensor parallelism exchanges the most, so it stays on the nearest
GPUs): the cp × sp × tp ranks of one model replica share each sequence (ring attention over cp, Ulysses over sp,
tensor parallelism's sequence shards over tp), the dp replicas read different micro-batches, and the pp pipeline
stages each hold a run of the layers. Gradients are averaged over dp × cp × sp by DDP / FSDP2 (ZeRO over all of
them, as DeepSpeed-Ulysses does), so the trainer scales each rank's loss by that count to turn the mean into a
sum; tensor-parallel ranks hold different weights. Expert parallelism (--ep) splits the dp ranks into groups of ep
consecutive ones, each group holding one copy of every expert, ep / E of them per rank (`experts`: a mesh
("replica", "ep")).
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
from longseq.train.parallel.ring_attention import ring_token_index


@dataclass
class DistEnv:
    """This process's place in the run. The default is a plain single-process run (nothing distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: str = "none"  # none | ddp | fsdp
    dp: int = 1  # data-parallel replicas
    cp: int = 1  # ring attention degree
    sp: int = 1  # Ulysses degree
    tp: int = 1  # tensor-parallel degree
    pp: int = 1  # pipeline stages
    ep: int = 1  # expert-parallel degree, inside dp
    device: torch.device = torch.device("cpu")
    mesh: Any = None  # 1-D DeviceMesh over the world
    grid: Any = None  # DeviceMesh ("pp", "dp", "cp", "sp", "tp")
    experts: Any = None  # expert parallelism: DeviceMesh ("replica", "ep") over the dp ranks

    @property
    def distributed(self) -> bool:
        return self.parallel != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _coordinate(self, inner: int, size: int) -> int:
        return self.rank // inner % size

    @property
    def tp_rank(self) -> int:
        return self._coordinate(1, self.tp)

    @property
    def sp_rank(self) -> int:
        return self._coordinate(self.tp, self.sp)

    @property
    def cp_rank(self) -> int:
        return self._coordinate(self.tp * self.sp, self.cp)

    @property
    def dp_rank(self) -> int:
        return self._coordinate(self.tp * self.sp * self.cp, self.dp)

    @property
    def pp_rank(self) -> int:
        return self._coordinate(self.tp * self.sp * self.cp * self.dp, self.pp)

    @property
    def grad_ranks(self) -> int:
        """Ranks whose gradients of the same weights DDP / FSDP2 average: all but the tensor-parallel ones."""
        return self.dp * self.cp * self.sp

    def group(self, dim: str):
        """The process group of this rank's `dim` ("pp", "cp", "sp" or "tp") neighbours; "ep": the ranks that split
        the experts with it; "replica": the ranks that hold the same experts as it (one per EP group)."""
        return self.experts.get_group(dim) if dim in ("ep", "replica") else self.grid.get_group(dim)

    @property
    def fsdp_mesh(self):
        """What FSDP2 shards the decoder layers over: the whole world, or (tensor parallel) the dp × cp × sp ranks
        that hold the same tensor-parallel shard."""
        return self.grid["dp", "cp", "sp"]._flatten("fsdp") if self.tp > 1 else self.mesh

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
        """(B, S) -> this rank's tokens of each sequence, (B, S / (cp·sp·tp)); the whole tensor when it holds all.

        Ring attention deals the sequence out in 2·cp chunks, rank i taking chunks i and 2·cp-1-i (causal work
        balanced); Ulysses and then tensor parallelism split those tokens into contiguous pieces."""
        return self._shard(t, self.tp)

    def shard_positions(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """The RoPE positions of this rank's queries and keys: its tokens under ring attention and Ulysses; the
        whole sequence under tensor parallelism, whose attention runs on all tokens (gathered) of its heads."""
        return self._shard(t, 1)

    def _shard(self, t: torch.Tensor | None, tp: int) -> torch.Tensor | None:
        if t is None or self.cp * self.sp * tp == 1:
            return t
        if self.cp > 1:
            t = t[:, ring_token_index(t.shape[1], self.cp, self.cp_rank).to(t.device)]
        pieces = self.sp * tp
        piece = self.sp_rank * tp + (self.tp_rank if tp > 1 else 0)
        chunk = t.shape[1] // pieces
        return t[:, piece * chunk : (piece + 1) * chunk]


def resolve_parallel(cfg: TrainConfig, world_size: int) -> str:
    if cfg.parallel == "auto":
        if cfg.tp > 1:
            return "fsdp"
        return "ddp" if world_size > 1 or cfg.sequence_shards > 1 or cfg.ep > 1 else "none"
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
    dp = cfg.data_parallel(world)
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

    mesh = init_device_mesh(device.type, (world,))
    grid = init_device_mesh(device.type, (cfg.pp, dp, cfg.cp, cfg.sp, cfg.tp),
                            mesh_dim_names=("pp", "dp", "cp", "sp", "tp"))
    # --ep runs on dp alone (TrainConfig refuses the other degrees with it), so rank = dp rank: EP groups of ep
    # consecutive ranks, and the "replica" dimension across them.
    experts = (init_device_mesh(device.type, (dp // cfg.ep, cfg.ep), mesh_dim_names=("replica", "ep"))
               if cfg.ep > 1 else None)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, parallel=parallel, dp=dp, cp=cfg.cp,
                   sp=cfg.sp, tp=cfg.tp, pp=cfg.pp, ep=cfg.ep, device=device, mesh=mesh, grid=grid, experts=experts)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
