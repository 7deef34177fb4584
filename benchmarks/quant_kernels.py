"""Quantized matmuls at Llama-3-8B's layer shapes, one GPU: bf16 cuBLAS against FP8 (per-token quantization +
torch._scaled_mm), longseq's int4 (Triton kernel up to 64 rows, dequantize + cuBLAS beyond) and PyTorch's tinygemm
int4 kernel (`_weight_int4pack_mm`, what torchao's int4 weight-only layout runs), as CUDA-graph replays.

    python benchmarks/quant_kernels.py --out results/quant-kernels

Writes quant_kernels.json and quant_kernels.md (microseconds per matmul, and the weight-read bandwidth of each).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from longseq.eval.io import write_text

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)


def graph_us(fn, replays: int = 20) -> float:
    from longseq.models.fused_linear import _graph_us

    return _graph_us(fn, replays)


def tinygemm(w: torch.Tensor, group: int):
    """PyTorch's int4 tinygemm over w quantized as torchao's int4 weight-only does (asymmetric, float zero)."""
    from longseq.models.quant import int4

    N, K = w.shape
    qweight, scale, zero = int4.quantize_weight(w, group)
    packed = torch.ops.aten._convert_weight_to_int4pack(qweight, 8)
    # tinygemm dequantizes (q - 8) * s + z_float: z_float = (8 - zero) * s
    sz = torch.stack([scale.t(), ((8 - zero) * scale).t()], dim=-1).to(torch.bfloat16).contiguous()
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 256, 2048])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from longseq.models.quant.fp8 import Fp8Linear
    from longseq.models.quant.int4 import Int4Linear

    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows_out = []
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        fp8 = Fp8Linear.quantize(w)
        i4 = Int4Linear.quantize(w, args.group)
        try:
            tg = tinygemm(w, args.group)
        except Exception as e:  # not built for this GPU / version
            tg, tg_err = None, str(e).splitlines()[0][:120]
        for M in args.rows:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            fns = {"bf16": lambda x, w=w: F.linear(x, w), "fp8": fp8, "int4": i4}
            if tg is not None:
                fns["tinygemm"] = tg
            t = {k: graph_us(lambda f=f, x=x: f(x)) for k, f in fns.items()}
            ref = F.linear(x, w).float()
            err = {k: float((f(x).float() - ref).norm() / ref.norm()) for k, f in
                   (("fp8", fns["fp8"]), ("int4", fns["int4"]))}
            row = {"layer": name, "N": N, "K": K, "M": M, "us": {k: round(v, 2) for k, v in t.items()},
                   "rel_err": {k: round(v, 4) for k, v in err.items()},
                   "weight_tb_per_s": {k: round(b / (t[k] * 1e-6) / 1e12, 2) for k, b in
                                       (("bf16", 2 * N * K), ("fp8", N * K), ("int4", N * K / 2))}}
            print(json.dumps(row), flush=True)
            rows_out.append(row)
    out = Path(args.out)
    meta = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "group": args.group, "rows": rows_out}
    if "tg_err" in locals():
        meta["tinygemm_error"] = tg_err
    write_text(out / "quant_kernels.json", json.dumps(meta, indent=1))
    lines = [f"# Quantized matmuls, {meta['gpu']}, {meta['date']} (us per matmul, CUDA-graph replays)", "",
             "| layer | N×K | rows | bf16 | fp8 | int4 (longseq) | tinygemm int4 | fp8 err | int4 err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows_out:
        u = r["us"]
        lines.append(f"| {r['layer']} | {r['N']}×{r['K']} | {r['M']} | {u['bf16']} | {u['fp8']} | {u['int4']} | "
                     f"{u.get('tinygemm', '-')} | {r['rel_err']['fp8']} | "
                     f"{r['rel_err']['int4']} |")
    write_text(out / "quant_kernels.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
