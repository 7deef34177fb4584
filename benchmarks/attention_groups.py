"""Causal GQA attention at long lengths on one GPU: one SDPA call against one call per group of KV heads (what
training runs from config.ATTENTION_GROUP_TOKENS on, attention/sdpa.py `_by_kv_groups`): seconds, TFLOP/s and the
memory each allocates beyond what exists before it, forward and backward. Then, how much host memory this machine
lets one process page-lock the way models/offload.py does (cudaHostRegister, 4 GiB buffers).

    python benchmarks/attention_groups.py --out attention_groups.jsonl

Llama-3-8B's attention shape: 32 query heads, 8 KV heads, head dim 128, bf16, batch 1. Causal forward FLOPs:
4·S²·H·D / 2; the backward's TFLOP/s are given for 2x and 2.5x the forward's FLOPs (FlashAttention-style backward
recomputes the scores: 5 matmuls to the forward's 2). "groups" runs each group's forward and backward in turn
(training runs all forwards, then all backwards: the same kernels on the same shapes). A single call per row, the
first one at each length: the very first row also pays cuDNN's plan building.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

GIB = 2**30


def _meminfo() -> dict:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":")
            if key in ("MemTotal", "MemAvailable"):
                out[key] = round(int(value.split()[0]) / 2**20, 1)
    return out


def _timed(fn, *args, **kwargs):
    """(seconds, peak bytes allocated beyond what existed before, result) of fn(*args, **kwargs)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base, start = torch.cuda.memory_allocated(), time.perf_counter()
    out = fn(*args, **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() - base, out


def run(seq_len: int, mode: str, groups: int = 8) -> dict:
    shape = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, seq_len, 32, 128, **shape).transpose(1, 2).requires_grad_()  # (B, H, S, D) over (B, S, H, D)
    k = torch.randn(1, seq_len, 8, 128, **shape).transpose(1, 2).requires_grad_()
    v = torch.randn(1, seq_len, 8, 128, **shape).transpose(1, 2).requires_grad_()
    parts = [(q, k, v)] if mode == "whole" else [
        (q[:, 4 * g:4 * g + 4], k[:, g:g + 1], v[:, g:g + 1]) for g in range(groups)]
    fwd = bwd = 0.0
    fwd_mem = bwd_mem = 0
    for qg, kg, vg in parts:
        t, m, out = _timed(F.scaled_dot_product_attention, qg, kg, vg, is_causal=True, enable_gqa=True)
        fwd, fwd_mem = fwd + t, max(fwd_mem, m)
        dout = torch.randn_like(out)
        t, m, _ = _timed(out.backward, dout)
        bwd, bwd_mem = bwd + t, max(bwd_mem, m)
        del out, dout
    flops = 4 * seq_len * seq_len * 32 * 128 / 2
    return dict(S=seq_len, mode=mode, fwd_s=round(fwd, 3), bwd_s=round(bwd, 3),
                fwd_tflops=round(flops / fwd / 1e12, 1), bwd_tflops_2x=round(2 * flops / bwd / 1e12, 1),
                bwd_tflops_2_5x=round(2.5 * flops / bwd / 1e12, 1), fwd_extra_gib=round(fwd_mem / GIB, 2),
                bwd_extra_gib=round(bwd_mem / GIB, 2), q_gib=round(q.numel() * 2 / GIB, 2))


def pin_probe() -> dict:
    """Page-lock 4 GiB host buffers (as the offloader does) until MemAvailable runs out."""
    cudart, bufs, start = torch.cuda.cudart(), [], time.perf_counter()
    for _ in range(int(_meminfo()["MemAvailable"] // 4) - 1):
        buf = torch.zeros(2 * GIB, dtype=torch.bfloat16)
        if int(cudart.cudaHostRegister(buf.data_ptr(), 4 * GIB, 0)) != 0:
            break
        bufs.append(buf)
    return dict(pinned_gib=4 * len(bufs), seconds=round(time.perf_counter() - start, 1), after=_meminfo())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144, 524288])
    ap.add_argument("--out", default="attention_groups.jsonl")
    ap.add_argument("--no-pin-probe", action="store_true")
    args = ap.parse_args()
    rows = [dict(meminfo=_meminfo(), device=torch.cuda.get_device_name(), torch=torch.__version__)]
    for n in args.lengths:
        for mode in ("whole", "groups"):
            rows.append(run(n, mode))
            print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    if not args.no_pin_probe:
        rows.append(pin_probe())
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
