"""Quantized matmuls at Llama-3-8B's layer shapes, one GPU: bf16 cuBLAS against FP8 (per-token quantization +
torch._scaled_mm) and two int4 layers over the same weights, as CUDA-graph replays:
  int4 (layer)   Int4Linear as serving builds it on a GPU: bf16 weights keep tinygemm's layout
                 (`_weight_int4pack_mm` up to int4.DECODE_ROWS rows, then a dequantize of that layout + cuBLAS)
  int4 (Triton)  the same weights in int4.py's own layout (tinygemm=False): the Triton GEMV / tl.dot kernels up to
                 DECODE_ROWS rows, then the one-pass dequantize + cuBLAS (the fp16 path)
  tinygemm       `_weight_int4pack_mm` on the layer's weights at every row count, past DECODE_ROWS too (what that
                 threshold weighs: against "int4 (layer)"'s dequantize + cuBLAS there)
Each row reports the path each int4 layer took (Int4Linear.path).

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 256, 2048])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from longseq.models.quant import int4_tinygemm
    from longseq.models.quant.fp8 import Fp8Linear
    from longseq.models.quant.int4 import DECODE_ROWS, Int4Linear

    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows_out = []
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        fp8 = Fp8Linear.quantize(w)
        layer = Int4Linear.quantize(w, args.group)
        triton = Int4Linear.quantize(w, args.group, tinygemm=False)
        for M in args.rows:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            fns = {"bf16": lambda x, w=w: F.linear(x, w), "fp8": fp8, "int4": layer, "int4_triton": triton}
            if layer.layout == "tinygemm":
                fns["tinygemm"] = lambda x, m=layer: int4_tinygemm.linear(x, m.qweight, m.scales_and_zeros,
                                                                           m.group_size)
            t = {k: graph_us(lambda f=f, x=x: f(x)) for k, f in fns.items()}
            ref = F.linear(x, w).float()
            err = {k: float((fns[k](x).float() - ref).norm() / ref.norm()) for k in fns if k != "bf16"}
            row = {"layer": name, "N": N, "K": K, "M": M, "us": {k: round(v, 2) for k, v in t.items()},
                   "path": {"int4": layer.path(M, x.dtype), "int4_triton": triton.path(M, x.dtype)},
                   "rel_err": {k: round(v, 4) for k, v in err.items()},
                   "weight_tb_per_s": {k: round(b / (t[k] * 1e-6) / 1e12, 2) for k, b in
                                       (("bf16", 2 * N * K), ("fp8", N * K), ("int4", N * K / 2),
                                        ("int4_triton", N * K / 2)) if k in t}}
            print(json.dumps(row), flush=True)
            rows_out.append(row)
    out = Path(args.out)
    meta = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "group": args.group, "decode_rows": DECODE_ROWS, "rows": rows_out}
    write_text(out / "quant_kernels.json", json.dumps(meta, indent=1))
    lines = [f"# Quantized matmuls, {meta['gpu']}, {meta['date']} (us per matmul, CUDA-graph replays; int4 group "
             f"{args.group}, decode kernels up to {DECODE_ROWS} rows)", "",
             "| layer | N×K | rows | bf16 | fp8 | int4 (layer) | its path | tinygemm | int4 (Triton) | its path | "
             "int4 vs bf16 | int4 TB/s | fp8 err | int4 err | Triton err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows_out:
        u, e = r["us"], r["rel_err"]
        lines.append(f"| {r['layer']} | {r['N']}×{r['K']} | {r['M']} | {u['bf16']} | {u['fp8']} | {u['int4']} | "
                     f"{r['path']['int4']} | {u.get('tinygemm', '-')} | {u['int4_triton']} | "
                     f"{r['path']['int4_triton']} | "
                     f"{u['bf16'] / u['int4']:.2f}x | {r['weight_tb_per_s']['int4']} | {e['fp8']} | {e['int4']} | "
                     f"{e['int4_triton']} |")
    write_text(out / "quant_kernels.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
