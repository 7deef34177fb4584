"""Joining a torch.distributed process group: what training (train/parallel/) and tensor-parallel serving
(engine/tp_engine.py) share. NCCL carries GPU tensors; gloo carries CPU ones (CPU-offloaded FSDP states, checkpoint
metadata, the serving engine's step inputs), and is the only backend on CPU."""

from __future__ import annotations

import socket

import torch

from longseq.errors import LongseqError


def backend(device: torch.device) -> str:
    return "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"


def local_device(device: torch.device, local_rank: int) -> torch.device:
    """This process's device: one GPU per local process (made the current one) when `device` is a GPU."""
    if device.type != "cuda":
        return device
    if torch.cuda.device_count() < 1:
        raise LongseqError("no CUDA GPU visible to this process")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def free_address() -> str:
    """A TCP rendezvous address on a free local port, for processes started on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"
