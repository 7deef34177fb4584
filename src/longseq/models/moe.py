"""Mixture-of-experts compute: top-k routing, then every expert's SwiGLU MLP over the tokens routed to it.

The technique is "sort by expert, then one grouped GEMM" (as in MegaBlocks, Gale et al. 2022, arXiv 2211.15841,
without its block-sparse padding): the T·k (token, expert) pairs are sorted by expert so that each expert's rows
are contiguous, and each projection is a single grouped matrix multiply whose groups are the experts' row ranges
(`torch._grouped_mm`, offsets = the cumulative row counts). No per-expert Python loop and no host sync (so a CUDA
graph can hold it); backward is autograd's (torch defines the grouped GEMM's derivatives). Where the grouped GEMM
cannot run (CPU, fp16/fp32, GPUs before Ampere), CUDA tensors take the same sorted layout padded to the largest
group and one batched `bmm` (a host sync for the padding), and CPU tensors the per-expert loop, which is the
reference the others are tested against.

Expert weights are stacked as transformers >= 5 holds them: gate_up (E, 2I, d), gate rows first, and down
(E, d, I), each expert's matrix laid out as nn.Linear's (out, in).

Training: frozen stacks (LoRA, QLoRA's NF4 in PackedExperts) go through _FrozenExperts, which saves no activation
and dequantizes again in backward; per-expert LoRA adapters (ExpertAdapter, train/expert_lora.py) run on the same
sorted rows as two more grouped GEMMs per projection, added in place to the base output (the loop adds them with
addmm_ expert by expert).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longseq.models import fused

IMPLEMENTATIONS = ("auto", "grouped_mm", "padded", "loop")
# auto: grouped_mm where it runs, else padded on CUDA and loop on CPU; the others force one (tests, benchmarks).
MODE = os.environ.get("LONGSEQ_MOE", "auto")
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (T, E) -> routing weights (T, k) in float32 and expert ids (T, k).

    Softmax over all E logits in float32, then the top k probabilities, renormalised to sum to 1 when `normalize`
    (transformers' MixtralTopKRouter, which always renormalises, and Qwen2/3-MoE's with norm_topk_prob). Mixtral's
    reference code takes the top k logits and a softmax over those: the same weights."""
    probs = logits.float().softmax(dim=-1)  # (T, E)
    weights, ids = probs.topk(top_k, dim=-1)  # (T, k)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


@dataclass(frozen=True)
class ExpertAdapter:
    """Per-expert LoRA of a stacked projection W (E, out, in): expert e computes x W_eᵀ + scaling · dropout(x) A_e B_e
    (Hu et al. 2021, arXiv 2106.09685, one adapter per expert as PEFT's target_parameters holds them)."""

    A: torch.Tensor  # (E, in, r)
    B: torch.Tensor  # (E, r, out)
    scaling: float
    dropout: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class PackedExperts:
    """A frozen stacked weight stored in another layout: QLoRA's NF4 codes of the (E·out, in) matrix, dequantized
    with `.to(dtype)` (torchao's NF4 tensors are at most 2-D)."""

    data: torch.Tensor  # (E·out, in)
    shape: tuple[int, int, int]  # (E, out, in)
    requires_grad = False


def dense(weight: torch.Tensor | PackedExperts, dtype: torch.dtype) -> torch.Tensor:
    """A stacked weight (E, out, in) in `dtype` (a PackedExperts dequantized: a transient full-size copy)."""
    if isinstance(weight, PackedExperts):
        return weight.data.to(dtype).view(weight.shape)
    return weight.to(dtype)


Adapters = tuple[ExpertAdapter | None, ExpertAdapter | None]  # (gate_up, down)


def experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up, down, mode: str | None = None,
            adapters: Adapters = (None, None)) -> torch.Tensor:
    """sum_j weights[t, j] · expert_{ids[t, j]}(x[t]) for tokens x (T, d), ids and weights (T, k); expert e is
    down[e] · (silu(g) ⊙ u) with [g; u] = gate_up[e] · x, each projection with its LoRA adapter where `adapters`
    has one. gate_up and down: tensors (E, 2I, d), (E, d, I) or PackedExperts. `mode`: one of IMPLEMENTATIONS
    (None: MODE)."""
    mode = mode or MODE
    if mode == "auto":
        mode = "grouped_mm" if grouped_mm_runs(x, gate_up, down, adapters) else "padded" if x.is_cuda else "loop"
    if mode == "loop":
        return experts_loop(x, ids, weights, gate_up, down, adapters)
    if mode not in ("grouped_mm", "padded"):
        raise ValueError(f"MoE implementation must be one of {IMPLEMENTATIONS}, got {mode!r}")
    return experts_sorted(x, ids, weights, gate_up, down, grouped=mode == "grouped_mm", adapters=adapters)


def experts_loop(x, ids, weights, gate_up, down, adapters: Adapters = (None, None)) -> torch.Tensor:
    """The reference: one expert at a time over the rows routed to it (x (T, d) -> (T, d))."""
    dtype = _compute_dtype(x)
    gate_up, down = (w if isinstance(w, torch.Tensor) else dense(w, dtype) for w in (gate_up, down))
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        token, slot = torch.where(ids == e)  # a host sync per expert
        if token.numel() == 0:
            continue
        gate, up = _expert_linear(x[token], gate_up, e, adapters[0]).chunk(2, dim=-1)  # (n, I) each
        y = _expert_linear(swiglu(gate, up), down, e, adapters[1])  # (n, d)
        out.index_add_(0, token, (y * weights[token, slot, None].to(y.dtype)).to(x.dtype))
    return out


def _expert_linear(rows: torch.Tensor, weight: torch.Tensor, e: int, adapter: ExpertAdapter | None) -> torch.Tensor:
    """rows (n, in) through expert e's projection weight[e] (out, in) and its adapter: (n, out)."""
    y = F.linear(rows, weight[e])
    if adapter is None:
        return y
    a = adapter.A[e] if torch.is_autocast_enabled(rows.device.type) else adapter.A[e].to(rows.dtype)
    xa = (adapter.dropout(rows) if adapter.dropout else rows) @ a * adapter.scaling  # (n, r)
    return y.addmm_(xa, adapter.B[e].to(y.dtype))  # in place on the base output, as train/lora.py's LoRALinear


def experts_sorted(x, ids, weights, gate_up, down, grouped: bool, adapters: Adapters = (None, None)) -> torch.Tensor:
    """Tokens sorted by expert, each projection one grouped GEMM (`grouped`) or one padded bmm: (T, d) -> (T, d)."""
    T, k = ids.shape
    flat = ids.flatten()  # (T·k,): pair p is token p // k's (p % k)-th choice
    order = flat.argsort(stable=True)  # (T·k,) pairs grouped by expert
    expert = flat[order]  # (T·k,) non-decreasing
    # (E,) one past each expert's last row: found in the sorted ids on the device, no atomics and no host sync
    ends = torch.searchsorted(expert, torch.arange(gate_up.shape[0], device=x.device), right=True)
    rows = x[order // k]  # (T·k, d)
    gate, up = _project(rows, gate_up, adapters[0], expert, ends, grouped).chunk(2, dim=-1)  # (T·k, I) each
    y = _project(swiglu(gate, up), down, adapters[1], expert, ends, grouped)  # (T·k, d)
    unsorted = torch.empty_like(order)
    unsorted[order] = torch.arange(order.numel(), device=order.device)
    y = y[unsorted].view(T, k, -1)  # (T, k, d) back in token order
    # A weighted sum over the k choices in one reduction: deterministic, unlike an index_add's atomics on CUDA.
    return (y * weights.unsqueeze(-1).to(y.dtype)).sum(dim=1).to(x.dtype)


def _project(rows, weight, adapter: ExpertAdapter | None, expert, ends, grouped: bool) -> torch.Tensor:
    """Rows (N, in) sorted by expert through their experts' projection (E, out, in) and adapters: (N, out)."""
    mm = _grouped_mm if grouped else _padded_mm
    if weight.requires_grad:  # full fine-tuning: autograd's own derivatives of the grouped GEMM
        y = mm(rows, dense(weight, _compute_dtype(rows)).transpose(-2, -1), expert, ends)
    else:
        y = _FrozenExperts.apply(rows, weight, expert, ends, grouped)
    if adapter is None:
        return y
    dropped = adapter.dropout(rows) if adapter.dropout else rows
    xa = mm(dropped, adapter.A, expert, ends) * adapter.scaling  # (N, r)
    return y.add_(mm(xa, adapter.B, expert, ends))  # in place: no backward reads the base output


class _FrozenExperts(torch.autograd.Function):
    """A frozen stacked projection, rows (N, in) -> (N, out): saves no activation, the weight (or NF4 codes) by
    reference; backward's input gradient is group e's dY · W_e, the weight dequantized again (QLoRA keeps no
    dequantized copy between forward and backward)."""

    @staticmethod
    def forward(ctx, rows, weight, expert, ends, grouped: bool):
        ctx.weight, ctx.grouped = weight, grouped
        ctx.save_for_backward(expert, ends)
        mm = _grouped_mm if grouped else _padded_mm
        return mm(rows, dense(weight, _compute_dtype(rows)).transpose(-2, -1), expert, ends)

    @staticmethod
    def backward(ctx, grad):
        expert, ends = ctx.saved_tensors
        mm = _grouped_mm if ctx.grouped else _padded_mm
        # contiguous: torch's grouped GEMM on CPU refuses the stride-0 gradient of a sum
        return mm(grad.contiguous(), dense(ctx.weight, grad.dtype), expert, ends), None, None, None, None


def _grouped_mm(rows: torch.Tensor, weight: torch.Tensor, expert: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """rows (N, in) sorted by expert, weight (E, in, out) -> (N, out): group e's rows times weight[e]."""
    dtype = _compute_dtype(rows)  # the grouped GEMM takes one dtype; autocast does not reach it
    return _GROUPED_MM(rows.to(dtype), weight.to(dtype), offs=ends.to(torch.int32))


def _padded_mm(rows: torch.Tensor, weight: torch.Tensor, expert: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """What _grouped_mm computes, through one bmm over every expert's rows padded to the largest group (E, C, in)."""
    counts = torch.diff(ends, prepend=ends.new_zeros(1))  # (E,)
    slot = torch.arange(rows.shape[0], device=rows.device) - (ends - counts)[expert]  # (N,) row within its group
    capacity = int(counts.max())  # the host sync that grouped_mm avoids
    padded = rows.new_zeros(weight.shape[0], capacity, rows.shape[1]).index_put((expert, slot), rows)  # (E, C, in)
    out = torch.bmm(padded, weight.to(padded.dtype) if not torch.is_autocast_enabled(rows.device.type) else weight)
    return out[expert, slot]  # (N, out)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Shazeer 2020, arXiv 2002.05202), through the fused kernel where the model's MLP takes it."""
    if fused.active(gate) and gate.shape == up.shape:
        return fused.swiglu(gate, up)  # takes chunk()'s strided rows as they are
    return F.silu(gate) * up


def grouped_mm_runs(x: torch.Tensor, gate_up, down, adapters: Adapters = (None, None)) -> bool:
    """Whether torch's grouped GEMM takes these: bf16 CUDA tensors on an Ampere or later GPU (Hopper only before
    torch 2.9), rows and columns 16-byte aligned (LoRA ranks included)."""
    if _GROUPED_MM is None or not x.is_cuda or _compute_dtype(x) != torch.bfloat16:
        return False
    ranks = [a.A.shape[-1] for a in adapters if a is not None]
    if any(n % 8 for n in (gate_up.shape[-1], down.shape[-1], *ranks)):  # d, I and r in bf16: 16-byte strides
        return False
    return _capable(x.device.index if x.device.index is not None else torch.cuda.current_device())


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


@functools.cache
def _capable(device_index: int) -> bool:
    major = torch.cuda.get_device_capability(device_index)[0]
    return major >= 8 if hasattr(F, "grouped_mm") else major == 9
