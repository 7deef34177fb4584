"""The Triton paged decode kernel against the gather + SDPA path it replaces: time and accuracy, on a GPU.

    PYTHONPATH=src python benchmarks/paged_decode_kernel.py --out paged_decode_kernel.json

Llama-3-8B heads (32 query, 8 KV, head size 128), bf16, 16-token blocks scattered through the pool. Time: mean of
20 calls after 3 warm-ups, host launch included (the engine replays decode as CUDA graphs, where launch cost
vanishes: batch-1 rows here are mostly launch). Accuracy: both paths against a float64 computation on the same
bf16 inputs.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

from longseq.attention.kernels.paged_decode import paged_decode
from longseq.attention.paged import PagedBatch, gather_decode

H, H_KV, D, BS = 32, 8, 128, 16


def setup(B: int, ctx: int, shuffle: bool):
    per = -(-ctx // BS)
    blocks = B * per + 1
    k = torch.randn(blocks * BS, H_KV, D, device="cuda")
    v = torch.randn_like(k)
    order = torch.randperm(blocks - 1).tolist() if shuffle else list(range(blocks - 1))
    tables = [order[i * per : (i + 1) * per] for i in range(B)]
    batch = PagedBatch.build(tables, [1] * B, [ctx] * B, BS, torch.device("cuda"), H_KV)
    q = torch.randn(1, H, B, D, device="cuda") * 2
    return q.bfloat16(), k.bfloat16(), v.bfloat16(), batch


def kernel_path(q, k, v, batch):
    return paged_decode(q[0].transpose(0, 1), k, v, batch.decode_tables, batch.decode_lens, BS, None, batch.splits)


def gather_path(q, k, v, batch):
    return gather_decode(q, k, v, batch, None)[0].transpose(0, 1)


def timed_us(fn) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / 20 * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for B, ctx in [(256, 512), (256, 384), (64, 2048), (1, 512), (1, 8192), (1, 32768), (8, 32768)]:
        q, k, v, batch = setup(B, ctx, shuffle=True)

        fns = {"kernel": partial(kernel_path, q, k, v, batch), "gather": partial(gather_path, q, k, v, batch)}
        kv_bytes = B * ctx * H_KV * D * 2 * 2
        t_kernel, t_gather = timed_us(fns["kernel"]), timed_us(fns["gather"])
        row = dict(B=B, ctx=ctx, splits=batch.splits, kernel_us=round(t_kernel, 1), gather_us=round(t_gather, 1),
                   kernel_kv_tb_per_s=round(kv_bytes / t_kernel / 1e6, 2))
        if B * ctx <= 64 * 2048:  # the float64 reference is a (B, H, ctx) gather: keep it small
            with torch.no_grad():
                ref = gather_decode(q.double(), k.double(), v.double(), batch, None)[0].transpose(0, 1)
            for name, fn in fns.items():
                err = (fn().double() - ref).abs()
                row[f"{name}_max_err"], row[f"{name}_mean_err"] = err.max().item(), err.mean().item()
            row["mean_abs_out"] = ref.abs().mean().item()
        print(json.dumps(row), flush=True)
        rows.append(row)
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
