"""The model's linear layers as inference runs them: those that read the same input (q/k/v, gate/up) as one matmul,
and single-row inputs (batch-1 decode) through a Triton GEMV where timing says it beats cuBLAS.

A batch-1 decode step is a series of GEMVs, each bound by reading its weight: one launch over the three q/k/v
weights (and one over gate/up) reads the same bytes in fewer, larger kernels, with fewer split-K reductions, than
five separate ones (vLLM's QKVParallelLinear and MergedColumnParallelLinear do the same). The separate layers' weights
become views into the fused one, so memory is unchanged and checkpoints keep HF's names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FusedLinear:
    """Not a Module on purpose: it owns no parameters of its own (the originals are views of its weight), so
    state_dict, parameters() and exports see the model as before. The model must not be moved after fusing."""

    def __init__(self, linears: list[nn.Linear]):
        self.sizes = [lin.weight.shape[0] for lin in linears]
        self.gemv = False  # single-row inputs through the Triton GEMV (set by `calibrate`)
        self.lora = None  # serving's batched LoRA (models/lora_batched.BatchedLoRA): adds the rows' adapter deltas
        if len(linears) == 1:  # nothing to concatenate: the layer's own weight
            self.weight, self.bias = linears[0].weight.detach(), _detach(linears[0].bias)
            return
        self.weight = torch.cat([lin.weight.detach() for lin in linears])  # (sum of out_features, in_features)
        self.bias = None
        if linears[0].bias is not None:
            self.bias = torch.cat([lin.bias.detach() for lin in linears])
        start = 0
        for lin, n in zip(linears, self.sizes, strict=True):
            lin.weight.data = self.weight[start : start + n]
            if self.bias is not None:
                lin.bias.data = self.bias[start : start + n]
            start += n

    def __call__(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """x (..., in) -> (..., out) for one layer, or one (..., out_i) view per fused layer."""
        if self.gemv and x.numel() == x.shape[-1]:
            from longseq.models.kernels.gemv import gemv

            y = gemv(x, self.weight, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.lora is not None:
            self.lora(x, y)  # in place, before the split: y is this call's own tensor
        return y if len(self.sizes) == 1 else y.split(self.sizes, dim=-1)


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def fusable(linears: list[nn.Module]) -> bool:
    """Plain nn.Linear layers (not LoRA-wrapped or quantized), no hooks, one input size, dtype, device and bias
    presence."""
    first = linears[0]
    return all(
        type(lin) is nn.Linear and not lin._forward_hooks and not lin._forward_pre_hooks
        and lin.in_features == first.in_features and lin.weight.dtype == first.weight.dtype
        and lin.weight.device == first.weight.device and lin.weight.device.type != "meta"
        and (lin.bias is None) == (first.bias is None)
        for lin in linears
    )


def fuse(linears: list[nn.Module]) -> FusedLinear | None:
    if fusable(linears):
        return FusedLinear(linears)
    fused = getattr(type(linears[0]), "fused", None)  # quantized layers fuse their own way (models/quant)
    return fused(linears) if fused is not None else None


def calibrate(layers: list[FusedLinear]) -> dict[str, dict[str, float]]:
    """For each weight shape among `layers` (CUDA, 16-bit), time one single-row matmul through every layer of that
    shape (distinct weights, so nothing is served from L2, as in a decode step), by cuBLAS and by the Triton GEMV,
    each captured in a CUDA graph; layers take the GEMV where it is at least 3% faster. Returns the timings (us)."""
    groups: dict[tuple, list[FusedLinear]] = {}
    for layer in layers:
        w = layer.weight
        if w.is_cuda and w.dtype in (torch.float16, torch.bfloat16) and w.stride(1) == 1:
            groups.setdefault((*w.shape, w.dtype), []).append(layer)
    from longseq.models.kernels.gemv import gemv

    report = {}
    for (n, k, dtype), group in groups.items():
        x = torch.randn(1, k, dtype=dtype, device=group[0].weight.device)
        cublas = _graph_us(lambda g=group, x=x: [F.linear(x, m.weight, m.bias) for m in g])
        triton_ = _graph_us(lambda g=group, x=x: [gemv(x, m.weight, m.bias) for m in g])
        for m in group:
            m.gemv = triton_ < 0.97 * cublas
        report[f"{n}x{k}"] = {"layers": len(group), "cublas_us": round(cublas / len(group), 2),
                              "triton_us": round(triton_ / len(group), 2), "triton": triton_ < 0.97 * cublas}
    return report


def _graph_us(fn, replays: int = 10) -> float:
    """GPU microseconds of one call of fn, as a replayed CUDA graph (no launch overhead in the figure)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(), fn()  # warm-up outside the capture: autotuning, lazy initialisation
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / replays
