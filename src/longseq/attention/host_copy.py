"""A step's host-built index tensors to the device in one copy that does not wait for the GPU.

`t.to(cuda)` from ordinary (pageable) host memory synchronizes the stream: the host stops until every kernel queued
so far has run. In the engine's eager steps (prompt chunks, mixed steps) that would undo async scheduling, as the
host could not prepare a step while the previous one runs. Here the tensors travel together through one page-locked
buffer (PyTorch's caching host allocator keeps it until the copy has landed) with non_blocking=True.
"""

from __future__ import annotations

import torch


def upload_ints(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Host integer tensors -> the same values on `device` as int64, each in its own shape, in one copy."""
    if device.type != "cuda":
        return [t.to(device, torch.int64) for t in tensors]
    flat = [t.reshape(-1).to(torch.int64) for t in tensors]
    flat = (torch.cat(flat) if len(flat) > 1 else flat[0]).pin_memory()  # one tensor: pinned as it is
    packed = flat.to(device, non_blocking=True)
    return [part.view(t.shape) for part, t in zip(packed.split([t.numel() for t in tensors]), tensors, strict=True)]
