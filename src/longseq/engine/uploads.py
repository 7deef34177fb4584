"""Small host lists to the device in one copy: from pinned memory and without waiting, so the host goes on
launching while it lands."""

from __future__ import annotations

import itertools

import torch


def upload(device: torch.device, ints: list[list[int]] = (),
           floats: list[list[float]] = ()) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The int lists as int64 tensors and the float lists as float32 tensors on `device`, in one host->device copy
    (the floats travel as float64 bit patterns beside the ints)."""
    host = torch.cat([torch.tensor(list(itertools.chain(*ints)), dtype=torch.int64),
                      torch.tensor(list(itertools.chain(*floats)), dtype=torch.float64).view(torch.int64)])
    if device.type == "cuda":
        host = host.pin_memory()  # freed for reuse only once the copy is done (the caching host allocator)
    packed = host.to(device, non_blocking=True)
    int_lens = [len(x) for x in ints]
    n = sum(int_lens)
    out_ints = list(packed[:n].split(int_lens)) if ints else []
    out_floats = list(packed[n:].view(torch.float64).float().split([len(x) for x in floats])) if floats else []
    return out_ints, out_floats
