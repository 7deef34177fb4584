"""FlashAttention-4 for causal attention on Hopper and Blackwell GPUs, where the `flash-attn-4` package is installed.

FA4 (`flash_attn.cute`: CuTe-DSL kernels, compiled on first use) is the fastest exact attention PyTorch can call on
an H100: at 512K tokens (Llama-3-8B heads, GQA 32/8) its causal forward ran at 674 TFLOP/s against cuDNN's 505 and
its backward at 614 against 533 (benchmarks/results/2026-11-25-fa4-h100). It takes the projections' (B, S, H, D)
layout and grouped K/V heads as they are. Optional: without the package, or on other GPUs, attention goes through
SDPA (`attention/sdpa.py`), which is also the reference the GPU tests compare it with.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from longseq.errors import LongseqError

INSTALL_HINT = 'pip install --pre flash-attn-4 ("flash-attn-4[cu13]" for a CUDA 13 build of PyTorch)'


@functools.cache
def _kernel() -> tuple[Callable, Callable] | None:
    """flash_attn.cute's dense and variable-length functions, or None where the package (or its CUTLASS DSL
    libraries) is missing."""
    try:
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
    except Exception:  # ImportError, or a partial install whose native libraries fail to load
        return None
    return flash_attn_func, flash_attn_varlen_func


def supported(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why FA4 cannot run here, or None when it can (the package aside)."""
    if device.type != "cuda":
        return "it runs on CUDA GPUs only"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"it takes float16 or bfloat16, not {dtype}"
    if head_dim % 8 or head_dim > 256:
        return f"head_dim {head_dim} is not a multiple of 8 up to 256"
    major = torch.cuda.get_device_capability(device)[0]
    if major not in (9, 10):
        return f"it needs a Hopper or Blackwell GPU (compute capability 9.x or 10.x), not {major}.x"
    return None


def why_not(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int, plain: bool = True) -> str | None:
    """Why causal attention will not run through FA4 under the kernel choice auto | sdpa | fa4, or None when it
    will; kernel fa4 where it cannot run is an error. plain: the attention variant is plain causal
    (AttentionConfig.plain; the others have kernels of their own)."""
    if kernel == "sdpa":
        return "--attention-kernel sdpa"
    reason = "it runs plain causal attention, not attention variants" if not plain else supported(
        device, dtype, head_dim) or (
        None if _kernel() is not None else f"flash-attn-4 is not installed: {INSTALL_HINT}")
    if reason is not None and kernel == "fa4":
        raise LongseqError(f"--attention-kernel fa4: {reason}")
    return reason


def use_flash(q: torch.Tensor, kernel: str) -> bool:
    """Whether causal attention on q (B, H, S, D) runs through FA4."""
    return why_not(kernel, q.device, q.dtype, q.shape[-1]) is None


def describe(kernel: str, plain: bool, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The kernel causal attention will run through, for a run's report (before any work: kernel fa4 where it
    cannot run is an error here)."""
    return "FlashAttention-4" if why_not(kernel, device, dtype, head_dim, plain) is None else "PyTorch SDPA"


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """q (B, S, H, D), k and v (B, S, H_kv, D) in the projections' layout -> (B, S, H, D). A query at position i
    sees keys i - window + 1 .. i (window None: all up to i)."""
    return _kernel()[0](q, k, v, causal=True, window_size=_window_size(window))[0]


def documents(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor,
              window: int | None = None) -> torch.Tensor:
    """Causal attention inside each run of equal doc_ids (B, S) of packed rows, in one variable-length call:
    q (B, S, H, D), k and v (B, S, H_kv, D) -> (B, S, H, D)."""
    B, S, H, D = q.shape
    cu, longest = _document_bounds(doc_ids)
    out = _kernel()[1](q.reshape(B * S, H, D), k.reshape(B * S, -1, D), v.reshape(B * S, -1, D),
                       cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest, causal=True,
                       window_size=_window_size(window))[0]
    return out.view(B, S, H, D)


def _window_size(window: int | None) -> tuple[int | None, None]:
    """FA's (left, right) window: it counts the keys before the query, not the query itself (right: causal)."""
    return (None if window is None else window - 1, None)


def _document_bounds(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens (documents + 1,) int32, longest document) of packed rows, kept on the doc_ids tensor: every
    layer's forward and recompute in a step gets the same one, so the host sync for the longest is one a step.
    (The trainer makes a new doc_ids tensor for every batch; one changed in place would keep stale bounds.)"""
    bounds = getattr(doc_ids, "_document_bounds", None)
    if bounds is None:
        starts = torch.ones_like(doc_ids, dtype=torch.bool)  # every row starts a document
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        at = torch.nonzero(starts.flatten()).flatten()
        cu = torch.cat([at, at.new_tensor([doc_ids.numel()])]).to(torch.int32)
        bounds = doc_ids._document_bounds = (cu, int((cu[1:] - cu[:-1]).max()))
    return bounds
