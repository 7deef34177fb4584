"""Small host lists to the device in one copy that does not wait for the GPU (attention/host_copy.py), so the host
goes on launching while it lands."""

from __future__ import annotations

import itertools

import torch

from longseq.attention.host_copy import upload_ints


def upload(device: torch.device, ints: list[list[int]] = (),
           floats: list[list[float]] = ()) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The int lists as int64 tensors and the float lists as float32 tensors on `device`, in one host->device copy
    (the floats travel as float64 bit patterns beside the ints)."""
    (packed,) = upload_ints(device, torch.cat([
        torch.tensor(list(itertools.chain(*ints)), dtype=torch.int64),
        torch.tensor(list(itertools.chain(*floats)), dtype=torch.float64).view(torch.int64)]))
    int_lens = [len(x) for x in ints]
    n = sum(int_lens)
    out_ints = list(packed[:n].split(int_lens)) if ints else []
    out_floats = list(packed[n:].view(torch.float64).float().split([len(x) for x in floats])) if floats else []
    return out_ints, out_floats
