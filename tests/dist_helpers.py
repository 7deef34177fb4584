"""Run a function in N CPU processes joined in a gloo group, the way torchrun starts them (RANK, WORLD_SIZE, ...)."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from longseq.config import ModelConfig
from longseq.train.data import Batch
from longseq.train.loss import IGNORE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(fn, world: int, *args, timeout: float = 300) -> list:
    """fn(rank, world, *args) on `world` spawned processes; returns every rank's result, in rank order.

    A worker's exception fails the test; ranks stuck in a collective are killed after `timeout` seconds."""
    with tempfile.TemporaryDirectory(prefix="longseq-test-") as tmp:
        ctx = mp.start_processes(_entry, args=(fn, world, free_port(), tmp, args), nprocs=world,
                                 start_method="spawn", join=False)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{fn.__name__} on {world} processes did not finish in {timeout:.0f} s")
        return [pickle.loads((Path(tmp) / f"{r}.pkl").read_bytes()) for r in range(world)]


def _entry(rank: int, fn, world: int, port: int, tmp: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 CI cores shared by every process
    result = fn(rank, world, *args)
    (Path(tmp) / f"{rank}.pkl").write_bytes(pickle.dumps(result))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


TINY = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_seq_len=64)


def synthetic_batches(num: int, batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> list[Batch]:
    """Packed-looking batches: each row holds two documents (positions restart, doc ids change) and some targets
    carry no loss, so uneven token counts per rank are exercised."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num):
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
        targets = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
        targets[torch.rand(batch_size, seq_len, generator=g) < 0.3] = IGNORE
        cut = torch.randint(2, seq_len - 2, (batch_size,), generator=g)
        pos = torch.arange(seq_len).expand(batch_size, seq_len)
        doc = (pos >= cut[:, None]).long()
        positions = torch.where(doc == 0, pos, pos - cut[:, None])
        out.append(Batch(ids, targets, positions, doc, epoch=0, index=i))
    return out
