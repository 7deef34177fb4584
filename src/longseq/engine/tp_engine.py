"""The serving engine on N tensor-parallel processes: `longseq serve --tensor-parallel N`, `LLM(tensor_parallel=N)`.

Rank 0 is the ordinary engine (scheduler, block manager, sampler, HTTP server); its model runner first broadcasts
each step's inputs (`StepInputs`: token ids, positions, block tables; no Sequence objects) to ranks 1..N-1, which
run the same `execute` in lock-step: every rank holds the same block tables over its own slice of the KV heads,
and the collectives inside the sharded model line the ranks up. Only rank 0 samples. The step inputs travel as a
pickled object over a gloo group (CPU), beside NCCL for the model's own collectives on GPUs.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from longseq import process_group
from longseq.config import EngineConfig
from longseq.engine.llm_engine import LLMEngine
from longseq.engine.model_runner import ModelRunner, StepInputs
from longseq.engine.tensor_parallel import TensorParallel, check_tensor_parallel, shard_model

_STOP = None  # broadcast to end the workers' loop


class TensorParallelRunner(ModelRunner):
    """A ModelRunner over one rank's shard; rank 0's `execute` also sends the step to the other ranks."""

    takes_device_ids = False  # the workers get the step as host lists, so the engine never runs ahead of a sample

    def __init__(self, model, cfg: EngineConfig, tp: TensorParallel, control_group=None):
        self.tp, self.control = tp, control_group
        super().__init__(model, cfg)

    def _blocks_from_memory(self) -> int:
        # Every rank must use the same block ids: the smallest pool any rank can afford.
        n = torch.tensor([super()._blocks_from_memory()], device=self._collective_device())
        dist.all_reduce(n, op=dist.ReduceOp.MIN, group=self.tp.group)
        return int(n.item())

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def execute(self, step: StepInputs, ids: torch.Tensor | None = None) -> torch.Tensor:
        assert ids is None, "tensor-parallel steps carry their token ids on the host"
        if self.tp.rank == 0:
            dist.broadcast_object_list([step], src=0, group=self.control)
        return super().execute(step)

    def serve_forever(self) -> None:
        """Ranks 1..N-1: run every step rank 0 sends until it says stop."""
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0, group=self.control)
            if box[0] is _STOP:
                return
            ModelRunner.execute(self, box[0])

    def close(self) -> None:
        if self.tp.rank == 0:
            dist.broadcast_object_list([_STOP], src=0, group=self.control)


def join(rank: int, size: int, addr: str, device: torch.device) -> tuple[TensorParallel, Any]:
    """Join the N-process group; returns this rank's TensorParallel and the gloo group for step inputs."""
    dist.init_process_group(process_group.backend(device), init_method=addr, rank=rank, world_size=size,
                            timeout=timedelta(minutes=10))
    control = dist.new_group(backend="gloo") if device.type == "cuda" else None
    return TensorParallel(size=size, rank=rank), control


def load_shard(path, dtype, device: torch.device, tp: TensorParallel):
    """The model loaded on the CPU (safetensors: memory-mapped, not copied), sharded, then moved to `device`."""
    from longseq.models.loader import load, resolve_dtype

    lm = load(path, dtype=resolve_dtype(dtype, device), device="cpu")  # "auto" means the GPU's dtype, not the CPU's
    check_tensor_parallel(lm.config, tp.size)
    shard_model(lm.model, tp).to(device)
    lm.model.rotary.reset(device)
    return lm


def build_engine(lm, cfg: EngineConfig, tp: TensorParallel, control=None) -> LLMEngine:
    """Rank 0's engine over an already-sharded model; ranks 1..N-1 call `run_worker` at the same time."""
    return LLMEngine(lm, cfg, runner=TensorParallelRunner(lm.model, cfg, tp, control))


def run_worker(lm, cfg: EngineConfig, tp: TensorParallel, control=None) -> None:
    TensorParallelRunner(lm.model, cfg, tp, control).serve_forever()


def _device(device: str, rank: int) -> torch.device:
    from longseq.models.loader import resolve_device

    return process_group.local_device(resolve_device(device), rank)


def _worker_main(rank: int, size: int, addr: str, path: str, dtype: str, device: str, cfg: EngineConfig) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dev = _device(device, rank)
    tp, control = join(rank, size, addr, dev)
    try:
        run_worker(load_shard(path, dtype, dev, tp), cfg, tp, control)
    finally:
        dist.destroy_process_group()


class _Engine(LLMEngine):
    """Rank 0's engine; `close` also stops and joins the worker processes."""

    processes: tuple = ()  # the spawned ranks 1..N-1, set by start_engine

    def close(self) -> None:
        super().close()
        for p in self.processes:
            p.join(timeout=60)
        if dist.is_initialized():
            dist.destroy_process_group()


def start_engine(path: str | Path | None, dtype: str, device: str, cfg: EngineConfig) -> LLMEngine:
    """Spawn ranks 1..N-1 on this machine, join them as rank 0 and return rank 0's engine (call `close()`)."""
    import torch.multiprocessing as mp

    from longseq.models.loader import resolve_model_path

    path = resolve_model_path(path)  # bad paths fail here, before any process starts
    size = cfg.tensor_parallel
    dev = _device(device, 0)
    if dev.type == "cuda" and torch.cuda.device_count() < size:
        from longseq.errors import LongseqError

        raise LongseqError(f"tensor parallel {size} needs {size} GPUs; {torch.cuda.device_count()} visible")
    addr = process_group.free_address()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(r, size, addr, str(path), dtype, device, cfg), daemon=True)
             for r in range(1, size)]
    for p in procs:
        p.start()
    tp, control = join(0, size, addr, dev)
    lm = load_shard(path, dtype, dev, tp)
    engine = _Engine(lm, cfg, runner=TensorParallelRunner(lm.model, cfg, tp, control))
    engine.processes = tuple(procs)
    return engine
