"""Context extension of the default model, SmolLM2-135M-Instruct (native context 8,192): RoPE scaling none / linear
(position interpolation) / NTK (dynamic) / YaRN at 2x and 4x, passkey accuracy and perplexity before and after;
optionally a short long-context LoRA fine-tune with the trainer and the same measurements after it.

    # CPU (2 cores, about 20 minutes): passkey at 4K and 12K, perplexity over 12K tokens at 4K and 12K windows
    PYTHONPATH=src python benchmarks/context_extension.py --device cpu --out OUT_DIR
    # H100: the full grid up to 32K, then a YaRN x4 LoRA fine-tune at 32K (see --preset h100)
    PYTHONPATH=src python benchmarks/context_extension.py --device cuda --preset h100 --finetune --out OUT_DIR

Passkey: the classic prompt (longseq.eval.passkey), the same keys for every configuration (same seed). Perplexity:
the first --ppl-tokens tokens of the Python documentation shipped with every Python (`pydoc_data.topics`), in
disjoint windows of each --ppl-contexts length (HF's fixed-length method with stride = window). The fine-tune trains on
Python standard-library source files concatenated into long documents: generic long text, disjoint from both
evaluations. Writes OUT/results.json (every number, rewritten after each configuration), OUT/table.md and one
passkey heatmap per configuration in OUT/heatmaps/.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import sysconfig
import time
from datetime import date
from pathlib import Path

import torch

PRESETS = {
    # Sized for 2 CPU cores in fp32: one 12K prefill of the 135M model takes about a minute there.
    "cpu": dict(lengths="4K,12K", depths="50", trials=1, ppl_contexts="4K,12K", ppl_tokens="12K"),
    "h100": dict(lengths="4K,8K,16K,32K", depths="0,25,50,75,100", trials=2, ppl_contexts="4K,8K,16K,32K",
                 ppl_tokens="32K"),
}


def write_finetune_data(folder: Path, min_chars: int = 400_000) -> Path:
    """Standard-library sources concatenated into files of >= min_chars characters (long documents, so the packed
    training sequences hold one contiguous text each)."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    chunk, size, index = [], 0, 0
    for src in sources:
        try:
            chunk.append(src.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        size += len(chunk[-1])
        if size >= min_chars:
            (folder / f"stdlib-{index:02d}.txt").write_text("\n\n".join(chunk))
            chunk, size, index = [], 0, index + 1
    return folder


def configurations(scalings: list[str], factors: list[float]) -> list[tuple[str, str, float]]:
    out = [("none", "none", 1.0)] if "none" in scalings else []
    for factor in factors:
        for s in scalings:
            if s != "none":
                out.append((f"{s} x{factor:g}", s, factor))
    return out


def measure(lm, name: str, args, ids: list[int], out: Path) -> dict:
    from longseq.eval.passkey import PasskeyConfig, run_passkey
    from longseq.eval.perplexity import sequence_nll
    from longseq.eval.plots import passkey_heatmap

    row: dict = {"config": name, "rope": lm.config.rope.type, "factor": lm.config.rope.factor}
    start = time.perf_counter()
    cfg = PasskeyConfig(lengths=args.lengths, depths=args.depths, trials=args.trials, seed=args.seed)
    report = run_passkey(lm, cfg, on_sample=lambda s: print(
        f"  {name}: passkey {s.length} depth {s.depth:.0%} -> {s.answer} ({'ok' if s.correct else 'wrong'}, "
        f"{s.seconds:.1f} s)", flush=True))
    row["passkey"] = {str(n): report.accuracy(length=n) for n in cfg.lengths}
    row["passkey_all"] = report.accuracy()
    row["passkey_cells"] = report.to_json()["cells"]
    row["passkey_answers"] = [(s.length, s.depth, s.key, s.answer) for s in report.samples]
    slug = re.sub(r"[^A-Za-z0-9_.-]", "", name.replace(" ", "_").replace("@", "at").replace("+", "plus"))
    try:
        passkey_heatmap(report.grid(), cfg.lengths, cfg.depths, out / "heatmaps" / f"{slug}.png",
                        f"SmolLM2-135M passkey · {name}")
    except ImportError:  # a GPU box without matplotlib still gets every number
        print("  (matplotlib is not installed: no heatmap)", flush=True)
    row["ppl"] = {}
    for context in args.ppl_contexts:
        total, count, _ = sequence_nll(lm.model, ids, context, context)
        row["ppl"][str(context)] = {"nll": total / count, "ppl": math.exp(total / count), "tokens": count}
        print(f"  {name}: perplexity at {context} = {row['ppl'][str(context)]['ppl']:.3f}", flush=True)
    row["seconds"] = time.perf_counter() - start
    return row


def table(rows: list[dict], args) -> str:
    from longseq.eval.plots import tokens_label

    head = ["configuration"] + [f"passkey {tokens_label(n)}" for n in args.lengths] + ["passkey all"] + \
        [f"ppl @{tokens_label(c)}" for c in args.ppl_contexts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"]] + [f"{r['passkey'][str(n)]:.0%}" for n in args.lengths] + [f"{r['passkey_all']:.0%}"]
        cells += [f"{r['ppl'][str(c)]['ppl']:.2f}" for c in args.ppl_contexts]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    from longseq.eval.cli import _percent_list, _token_list

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--preset", choices=list(PRESETS), default=None, help="defaults for the flags below "
                   "(cpu unless --device is cuda)")
    p.add_argument("--scalings", default="none,linear,ntk,yarn")
    p.add_argument("--factors", default="2,4")
    p.add_argument("--lengths", type=_token_list, default=None)
    p.add_argument("--depths", type=_percent_list, default=None)
    p.add_argument("--trials", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl-contexts", type=_token_list, default=None)
    p.add_argument("--ppl-tokens", type=_token_list, default=None)
    p.add_argument("--finetune", action="store_true", help="also LoRA-fine-tune at long context, then re-measure")
    p.add_argument("--no-baselines", action="store_true", help="skip the RoPE-scaling rows (with --finetune: only "
                   "the fine-tune and its row; results.json then holds that row alone)")
    p.add_argument("--ft-scaling", default="yarn")
    p.add_argument("--ft-factor", type=float, default=4.0)
    p.add_argument("--ft-seq-len", type=_token_list, default=(32768,))
    p.add_argument("--ft-steps", type=int, default=200)
    p.add_argument("--ft-lr", type=float, default=2e-4)
    args = p.parse_args()

    from longseq.config import ModelOverrides, TrainConfig
    from longseq.eval.io import write_json, write_text
    from longseq.eval.model import load_for_eval
    from longseq.eval.needle import haystack_text
    from longseq.models.loader import load, resolve_device
    from longseq.models.overrides import apply_overrides

    device = resolve_device(args.device)
    preset = PRESETS[args.preset or ("h100" if device.type == "cuda" else "cpu")]
    for key, value in preset.items():
        if getattr(args, key) is None:
            parse = {"lengths": _token_list, "depths": _percent_list, "ppl_contexts": _token_list,
                     "ppl_tokens": _token_list}.get(key, lambda v: v)
            setattr(args, key, parse(value) if isinstance(value, str) else value)
    args.ppl_tokens = args.ppl_tokens[0]
    out = Path(args.out)
    longest = max(max(args.lengths), max(args.ppl_contexts))
    results = {
        "date": date.today().isoformat(), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(), "torch": torch.__version__, "python": sys.version.split()[0],
        "threads": torch.get_num_threads(), "command": " ".join(sys.argv),
        "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": [],
    }

    lm = load(None, device=device, dtype=args.dtype)
    ids = list(lm.tokenizer(haystack_text(), add_special_tokens=False)["input_ids"])[: args.ppl_tokens]
    results["dtype"] = str(lm.model.lm_head.weight.dtype).removeprefix("torch.")
    configs = [] if args.no_baselines else configurations(args.scalings.split(","),
                                                         [float(f) for f in args.factors.split(",")])
    for name, scaling, factor in configs:
        print(f"{name}:", flush=True)
        # max_seq_len: measure every length, also beyond native x factor (there the scaling has to extrapolate).
        apply_overrides(lm.model, ModelOverrides(rope_scaling=scaling, rope_factor=factor if factor > 1 else None,
                                                 max_seq_len=longest + 64))
        results["rows"].append(measure(lm, name, args, ids, out))
        write_json(out / "results.json", results)
        write_text(out / "table.md", table(results["rows"], args))

    if args.finetune:
        from longseq.train.loop import train

        del lm
        data = write_finetune_data(out / "finetune-data")
        seq_len = args.ft_seq_len[0]
        cfg = TrainConfig(data=(str(data),), out_dir=str(out / "finetune"), method="lora", seq_len=seq_len,
                          max_steps=args.ft_steps, lr=args.ft_lr, warmup_steps=max(1, args.ft_steps // 20),
                          lora_train_extra=("embed", "norm"), recompute="full", save_every=0, device=str(device),
                          overrides=ModelOverrides(rope_scaling=args.ft_scaling, rope_factor=args.ft_factor,
                                                   max_seq_len=longest + 64))
        start = time.perf_counter()
        result = train(cfg, progress=False)
        results["finetune"] = {"config": cfg.to_dict(), "losses": result.losses,
                               "seconds": time.perf_counter() - start, "checkpoint": str(result.checkpoint)}
        name = f"{args.ft_scaling} x{args.ft_factor:g} + LoRA {args.ft_steps} steps @ {seq_len}"
        lm = load_for_eval(adapter=str(result.checkpoint), device=str(device), dtype=args.dtype,
                           overrides=ModelOverrides(max_seq_len=longest + 64))
        results["rows"].append(measure(lm, name, args, ids, out))
        write_json(out / "results.json", results)
        write_text(out / "table.md", table(results["rows"], args))
    print(table(results["rows"], args))
    print(json.dumps({"wrote": [str(out / "results.json"), str(out / "table.md"), str(out / "heatmaps")]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
