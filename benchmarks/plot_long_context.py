"""Table and plot of benchmarks/long_context.py results: tokens/s and peak GPU memory against sequence length.

    python benchmarks/plot_long_context.py benchmarks/results/2026-11-24-long-context-h100/*.json \
        --png long_context.png --md table.md
"""

from __future__ import annotations

import argparse
import json
import re

from longseq.eval.io import write_atomic, write_text

LABELS = {"longseq": "longseq LoRA", "qlora": "longseq QLoRA", "hf": "transformers + PEFT LoRA",
          "liger": "transformers + PEFT + Liger LoRA"}
PEERS = ("hf", "liger")
GPU_GIB = {"H100": 79.1, "H200": 139.7}  # what one process can allocate


def _fa4(row: dict) -> bool:
    """The run's attention went through FlashAttention-4 (rows before it name no kernel: SDPA)."""
    return row.get("attention") == "FlashAttention-4"


def _label(row: dict) -> str:
    held = f", held to {row['gpu_memory']:g} GiB" if row.get("gpu_memory") else ""
    return LABELS[row["side"]] + (" + FA4" if _fa4(row) else "") + held


def _plain(row: dict) -> int:
    """Layers that recompute only the SwiGLU product (from the planner's description in older rows)."""
    if "plain_layers" in row:
        return row["plain_layers"]
    m = re.search(r"the last (\d+) of", row.get("planned", ""))
    return int(m.group(1)) if m else 0


def _kept_attention(row: dict) -> int:
    """Layers under keep_attention in a full-recompute plan (from the planner's description)."""
    m = re.search(r"the last (\d+) of \d+ layers: keep_attention", row.get("planned", ""))
    return int(m.group(1)) if m else 0


def _forced(row: dict) -> bool:
    # `SIDE:LEN:RECOMPUTE` runs; the first files predate the flag: their one forced run kept 31 layers on the GPU
    return row.get("forced", False) or row.get("offload_keep", 0) == 31


def load(paths: list[str]) -> tuple[list[dict], str | None]:
    """Rows of every file (a later file's run of the same side, length, forcing and memory budget replaces an
    earlier one's) and the GPU the files name, if any."""
    rows: dict[tuple, dict] = {}
    device = None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        device = data.get("env", {}).get("device", device)
        for r in data["rows"]:
            key = (r["side"], r["seq_len"], _forced(r), r.get("recompute") if _forced(r) else None, _fa4(r),
                   r.get("gpu_memory"))
            rows[key] = r
    # A forced-policy row is kept in the table but not in the plot's lines.
    return sorted(rows.values(), key=lambda r: (r["seq_len"], r["side"], _forced(r), r.get("gpu_memory") or 0)), device


def table(rows: list[dict]) -> str:
    out = ["| side | seq len | tokens/s | MFU (causal) | MFU (PaLM) | peak GPU GiB | planner GiB | host peak GiB | "
           "pinned GiB | techniques (planned) | step s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {_label(r)} | {r['seq_len']:,} | {r['error']} | | | | | | | | |")
            continue
        tech = "gradient checkpointing" if r["side"] in PEERS else (
            f"{r['recompute']}" + (" (forced)" if _forced(r) else "")
            + (f", tiles {r['tile']:,}" if r.get("tile") else "")
            + (f", keep {r['offload_keep']}" if r["recompute"] == "offloaded" else "")
            + (f", {_plain(r)} plain" if _plain(r) else "")
            + (f", last {_kept_attention(r)} layers keep_attention" if _kept_attention(r) else ""))
        out.append(f"| {_label(r)} | {r['seq_len']:,} | {r['tokens_per_s']:,.0f} | {r['mfu_causal']:.1%} | "
                   f"{r['mfu_palm']:.1%} | {r['peak_gib']:.2f} | {r.get('predicted_gib', '—')} | "
                   f"{r.get('host_peak_gib', 0):.1f} | {r.get('pinned_gib', 0):.1f} | {tech} | {r['step_s']:.2f} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: str, device: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    # FA4 rows are markers only: they were measured at a few lengths, and a line would interpolate between them
    gpu = next((name for name in GPU_GIB if device and name in device), "H100")
    for side, fa4, held, style in (("longseq", False, False, "o-"), ("longseq", False, True, "o:"),
                                   ("longseq", True, False, "D"), ("qlora", False, False, "s--"),
                                   ("qlora", True, False, "P"), ("hf", False, False, "^-"),
                                   ("liger", False, False, "v-")):
        ok = [r for r in rows if r["side"] == side and _fa4(r) == fa4 and "error" not in r and not _forced(r)
              and bool(r.get("gpu_memory")) == held]
        if not ok:
            continue
        xs = [r["seq_len"] / 1024 for r in ok]
        label = LABELS[side] + (" + FA4" if fa4 else "") + (", held to the peer's memory" if held else "")
        ax1.plot(xs, [r["tokens_per_s"] for r in ok], style, label=label)
        ax2.plot(xs, [r["peak_gib"] for r in ok], style, label=label)
        for r in rows:
            if r["side"] == side and _fa4(r) == fa4 and "error" in r:
                ax2.plot([r["seq_len"] / 1024], [GPU_GIB[gpu]], "x", color="red", markersize=10)
                ax2.annotate(f"{LABELS[side]}: OOM at {r['seq_len'] // 1024}K", (r["seq_len"] / 1024, GPU_GIB[gpu]),
                             textcoords="offset points", xytext=(5, -12), fontsize=8, color="red")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (K tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("tokens/s")
    ax1.set_title(f"Llama-3-8B shape, LoRA r=16, one {device or 'H100 80GB'}")
    ax2.axhline(GPU_GIB[gpu], color="gray", linestyle=":")
    ax2.set_ylabel("peak GPU memory (GiB, max_memory_allocated)")
    longest = max(r["seq_len"] for r in rows if "error" not in r and r["side"] not in PEERS)
    ax2.set_title(f"longest longseq run here: {longest // 1024}K tokens")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--png", default="long_context.png")
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    rows, device = load(args.files)
    text = table(rows)
    if args.md:
        write_text(args.md, text)
    print(text)
    plot(rows, args.png, device)


if __name__ == "__main__":
    main()
