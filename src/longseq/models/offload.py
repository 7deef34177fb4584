"""Activation checkpoints in pinned host memory: the layer inputs that full recompute keeps, moved off the GPU.

Full recompute keeps one S x d tensor per layer (4 GiB a layer for Llama-3-8B at 512K tokens: 128 GiB for 32
layers), which no GPU holds. Here each offloaded layer runs under non-reentrant checkpointing, which saves the layer's
inputs through `ctx.save_for_backward` before its own hooks take over: saved-tensor hooks around it see the inputs
and nothing else. The pack hook copies the layer input to a pinned host buffer on a side stream while the next
layers compute; the unpack hook (the recompute's first step in backward) brings it back and starts copying the
previous layer's input at once, so the transfer overlaps the recompute (after ALST, arXiv 2506.13996, and
torch.autograd.graph.save_on_cpu, which copies synchronously). Non-reentrant, an offloaded layer's backward holds
what a layer under plain full recompute holds: not the reentrant checkpoint's recomputed output and output gradient
(8 GiB at 512K), and the first layer's input needs no grad-requiring copy. Tensors shared by every layer (RoPE
tables, document ids) stay where they are. On CPU the "host copy" is a plain copy: the same code path, tested in CI.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from longseq.models import recompute


class _Handle:
    """One offloaded tensor: its host copy and, in backward, the prefetched tensor and its copy's event. (The copy
    to the host needs no event: the copy back is queued after it on the same side stream.)"""

    __slots__ = ("host", "device", "prefetched", "ready", "prev", "key")

    def __init__(self, host: torch.Tensor, device: torch.device, prev: _Handle | None, key):
        self.host, self.device, self.prev, self.key = host, device, prev, key
        self.prefetched: torch.Tensor | None = None
        self.ready = None


class LayerInputOffloader:
    """Offloads the inputs of checkpointed layers to (pinned) host memory and prefetches them in backward."""

    def __init__(self, min_bytes: int = 0):
        self.min_bytes = min_bytes  # smaller tensors are not worth a transfer
        self._pool: dict[tuple, list[torch.Tensor]] = {}  # reusable host buffers by (shape, dtype)
        self._stream: torch.cuda.Stream | None = None
        self._last: _Handle | None = None
        self._keep: set[int] = set()
        self.host_bytes = 0  # bytes of host buffers allocated (they are kept for the next steps)

    def run(self, layer: Callable, x: torch.Tensor, *args: Any, keep: tuple = ()) -> torch.Tensor:
        """layer(x, *args) with full recompute, its input x kept on the host until backward needs it."""
        self._keep = {t.data_ptr() for t in keep if isinstance(t, torch.Tensor)}
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return recompute.checkpoint(layer, x, *args)

    def layer(self, layer: Callable, x: torch.Tensor, cos, sin, doc_ids) -> torch.Tensor:
        """A decoder layer (B, S, d) -> (B, S, d) as recompute "offloaded" runs it (CausalLM.set_recompute): its
        input offloaded; RoPE tables and document ids, shared by every layer, stay where they are."""
        return self.run(layer, x, cos, sin, None, doc_ids, keep=(cos, sin, doc_ids))

    def reserve(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, count: int) -> None:
        """Hold `count` host buffers for inputs of this shape before the first step: that step then pays no
        page-locking (registering 112 GiB took some 30 s on an H100 host), and a host short of memory fails here,
        not halfway through a forward."""
        free = self._pool.setdefault((tuple(shape), dtype), [])
        while len(free) < count:
            free.append(self._new_buffer(tuple(shape), dtype, device))

    def reset(self) -> None:
        """Start a new forward pass: prefetching follows layers in the order this pass offloads them."""
        self._last = None

    # -- hooks ---------------------------------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor):
        if t.data_ptr() in self._keep or t.numel() * t.element_size() < self.min_bytes:
            return t
        key = (tuple(t.shape), t.dtype)
        free = self._pool.get(key)
        host = free.pop() if free else self._new_buffer(t.shape, t.dtype, t.device)
        if t.device.type == "cuda":
            stream = self._side_stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))  # t is complete before it is copied
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(stream)  # the allocator must not reuse t's memory before the copy has read it
        else:
            host.copy_(t)
        handle = _Handle(host, t.device, self._last, key)
        self._last = handle
        return handle

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        h: _Handle = packed
        t = self._fetch(h)
        if h.prev is not None and h.prev.prefetched is None:  # backward goes layer by layer towards the input
            self._prefetch(h.prev)
        return t

    # -- transfers -----------------------------------------------------------------------------------------------
    def _prefetch(self, h: _Handle) -> None:
        if h.device.type != "cuda":
            h.prefetched = h.host.clone()
            self._release(h)
            return
        current = torch.cuda.current_stream(h.device)
        stream = self._side_stream(h.device)
        # Allocated on the compute stream, which then owns the memory; the copy waits for everything queued on it
        # (the memory may have been in use there a moment ago).
        h.prefetched = torch.empty(h.host.shape, dtype=h.host.dtype, device=h.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            h.prefetched.copy_(h.host, non_blocking=True)
            h.ready = torch.cuda.Event()
            h.ready.record(stream)
        self._release(h)

    def _fetch(self, h: _Handle) -> torch.Tensor:
        if h.prefetched is None:
            self._prefetch(h)
        if h.ready is not None:
            torch.cuda.current_stream(h.device).wait_event(h.ready)
        t, h.prefetched = h.prefetched, None
        return t

    def _release(self, h: _Handle) -> None:
        # The host buffer is free for a later pack once its copy back is queued: later copies go on the same
        # side stream, so they run after it.
        self._pool.setdefault(h.key, []).append(h.host)

    def _new_buffer(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device="cpu")
        nbytes = buf.numel() * buf.element_size()
        if device.type == "cuda":
            # Page-locked by registering this allocation, not through pin_memory=True: PyTorch's caching host
            # allocator rounds every block up to a power of two (a 3 GiB layer input took 4 GiB: 121 GiB of host
            # memory for 90 GiB of inputs at 384K tokens).
            cudart = torch.cuda.cudart()
            if int(cudart.cudaHostRegister(buf.data_ptr(), nbytes, 0)) != 0:
                raise RuntimeError(f"could not page-lock {nbytes / 2**30:.1f} GiB of host memory for offloading")
            weakref.finalize(buf, cudart.cudaHostUnregister, buf.data_ptr())
        self.host_bytes += nbytes
        return buf

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream
