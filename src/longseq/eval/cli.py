"""`longseq eval passkey | needle | perplexity | bleu | rouge | throughput`: flags, and the command that runs a task
and prints a table (or, with --json, the JSON) and writes OUT/<task>.json (and the passkey / needle heatmap)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from longseq.errors import LongseqError

TASKS = ("passkey", "needle", "perplexity", "bleu", "rouge", "throughput")
RETRIEVAL_TASKS = ("passkey", "needle")  # eval/retrieval.py's grid of lengths x depths


def parse_tokens(text: str) -> int:
    """1024, 8K or 8k, 1M or 1m -> tokens (K = 1024, M = 1024 K)."""
    t = text.strip().lower()
    scale = {"k": 1 << 10, "m": 1 << 20}.get(t[-1:], 1)
    try:
        return int(float(t[:-1]) * scale) if scale > 1 else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r}") from None


def _token_list(text: str) -> tuple[int, ...]:
    return tuple(parse_tokens(x) for x in text.split(",") if x.strip())


def _percent_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x.strip().rstrip("%")) / 100 for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of percentages: {text!r}") from None


def add_eval_args(p: argparse.ArgumentParser, parser_class: type = argparse.ArgumentParser) -> None:
    from longseq.config import ModelOverrides
    from longseq.config.flags import add_dataclass_flags

    sub = p.add_subparsers(dest="eval_task", required=True, parser_class=parser_class)
    helps = {
        "passkey": "find a passkey hidden at depths 0-100%% in filler text of growing length; heatmap PNG",
        "needle": "find a fact (a city's 7-digit magic number) hidden at depths 0-100%% of real text (the Python "
                  "docs); heatmap PNG",
        "perplexity": "sliding-window perplexity over text files at a context length",
        "bleu": "generate for JSONL prompts and score against references with sacrebleu",
        "rouge": "generate for JSONL prompts and score ROUGE-1/2/L with rouge-score",
        "throughput": "time to first token, per-token latency and tokens/s of generation",
    }
    parsers = {}
    for task in TASKS:
        t = sub.add_parser(task, help=helps[task])
        t.add_argument("--model", default=None, metavar="PATH",
                       help="HF model directory or .gguf file (default: the built-in SmolLM2-135M-Instruct)")
        t.add_argument("--adapter", default=None, metavar="DIR",
                       help="a PEFT adapter folder (longseq export --format peft) or a longseq checkpoint folder")
        t.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda if available)")
        t.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (default: bf16 GPU, fp32 CPU)")
        t.add_argument("--out", default="runs/eval", metavar="DIR", help="where <task>.json goes (default: runs/eval)")
        t.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
        add_dataclass_flags(t, ModelOverrides)
        t.set_defaults(eval_task=task)
        parsers[task] = t
    for task in RETRIEVAL_TASKS:
        pk = parsers[task]
        pk.add_argument("--lengths", type=_token_list, default=(1024, 2048, 4096, 8192),
                        help="context lengths, comma list, 1K = 1024 (default: 1K,2K,4K,8K)")
        pk.add_argument("--depths", type=_percent_list, default=(0.0, 0.25, 0.5, 0.75, 1.0),
                        help=f"{task} depths in percent, comma list (default: 0,25,50,75,100)")
        pk.add_argument("--trials", type=int, default=1, help="prompts per (length, depth) cell (default: 1)")
        pk.add_argument("--seed", type=int, default=0, help=f"{task} digits (default: 0)")
        pk.add_argument("--heatmap", default=None, metavar="PNG", help=f"heatmap path (default: OUT/{task}.png)")
    pp = parsers["perplexity"]
    pp.add_argument("--data", nargs="+", required=True, metavar="PATH", help=".txt / .md / .jsonl files or folders")
    pp.add_argument("--context", type=parse_tokens, default=None, help="window length (default: the model's context)")
    pp.add_argument("--stride", type=parse_tokens, default=None, help="window step (default: context / 2)")
    for task in ("bleu", "rouge"):
        g = parsers[task]
        g.add_argument("--data", required=True, metavar="JSONL",
                       help='rows {"prompt": ..., "reference": ...} or "references": [...]; rows with "prediction" '
                            "are scored without generating")
        g.add_argument("--max-new-tokens", type=int, default=128)
        g.add_argument("--no-chat", action="store_true", help="plain completion, without the chat template")
        g.add_argument("--system", default=None, help="a system message (chat mode)")
    tp = parsers["throughput"]
    tp.add_argument("--prompt-tokens", type=parse_tokens, default=512)
    tp.add_argument("--new-tokens", type=int, default=128)
    tp.add_argument("--runs", type=int, default=3)
    tp.add_argument("--warmup", type=int, default=1)


def run_eval(args: argparse.Namespace) -> int:
    from rich.console import Console

    from longseq.config import ModelOverrides
    from longseq.config.flags import config_from
    from longseq.eval.io import write_json
    from longseq.eval.model import load_for_eval

    overrides = config_from(ModelOverrides, args)
    task = args.eval_task
    err = Console(stderr=True, highlight=False)
    if task in RETRIEVAL_TASKS:
        from longseq.eval.needle import NeedleConfig
        from longseq.eval.passkey import PasskeyConfig

        config_class = PasskeyConfig if task == "passkey" else NeedleConfig
        cfg = config_class(lengths=args.lengths, depths=args.depths, trials=args.trials, seed=args.seed)
        _check_lengths_before_loading(cfg, args, overrides)
    if task in ("bleu", "rouge"):
        from longseq.eval.textgen import read_rows

        rows = read_rows(args.data)  # bad input fails before the model loads
        lm = None
        if any(r.prediction is None for r in rows):
            lm = _load(err, load_for_eval, args, overrides)
    elif task == "perplexity":
        from longseq.eval.perplexity import read_documents

        docs = read_documents(args.data)
        lm = _load(err, load_for_eval, args, overrides)
    else:
        lm = _load(err, load_for_eval, args, overrides)

    out_dir = Path(args.out)
    extra: dict[str, Any] = {}
    if task in RETRIEVAL_TASKS:
        from longseq.eval.needle import run_needle
        from longseq.eval.passkey import run_passkey
        from longseq.eval.plots import passkey_heatmap

        run = run_passkey if task == "passkey" else run_needle
        report = run(lm, cfg, on_sample=lambda s: err.print(
            f"[dim]{s.length:>6} tokens · depth {s.depth:4.0%} · key {s.key} · answer {s.answer} · "
            f"{'ok' if s.correct else 'wrong'} · {s.seconds:.1f} s[/]"))
        heatmap = Path(args.heatmap) if args.heatmap else out_dir / f"{task}.png"
        title = f"{task} retrieval · {lm.path.stem}" + _rope_note(lm)
        passkey_heatmap(report.grid(), cfg.lengths, cfg.depths, heatmap, title, task)
        result = report.to_json()
        extra["heatmap"] = str(heatmap)
    elif task == "perplexity":
        from longseq.eval.perplexity import run_perplexity

        result = run_perplexity(lm, docs, args.context, args.stride).to_json()
    elif task in ("bleu", "rouge"):
        from longseq.eval.textgen import run_textgen
        from longseq.generation import SamplingParams

        params = SamplingParams(max_new_tokens=args.max_new_tokens)
        chat = not args.no_chat
        if lm is not None and chat and getattr(lm.tokenizer, "chat_template", None) is None:
            err.print("[yellow]this model has no chat template: generating as plain text (--no-chat)[/]")
            chat = False
        result = run_textgen(lm, rows, task, params, chat=chat, system=args.system).to_json()
    else:
        from longseq.eval.throughput import run_throughput

        result = run_throughput(lm, args.prompt_tokens, args.new_tokens, args.runs, args.warmup).to_json()

    result["model"] = str(lm.path) if lm is not None else None
    result["adapter"] = args.adapter
    result["overrides"] = {k: v for k, v in vars(overrides).items() if v not in (None, (), False)}
    if lm is not None:
        result["device"], result["dtype"] = str(lm.device), str(lm.model.lm_head.weight.dtype).removeprefix("torch.")
    path = write_json(out_dir / f"{task}.json", {**result, **extra})
    if args.json:
        sys.stdout.write(json.dumps({**result, **extra}, indent=2) + "\n")
    else:
        Console(highlight=False).print(_table(task, result))
    err.print(f"wrote {path}" + (f" and {extra['heatmap']}" if "heatmap" in extra else ""))
    return 0


def _check_lengths_before_loading(cfg, args: argparse.Namespace, overrides) -> None:
    # Lengths against the context and the device's memory, from the model's config alone: a model takes seconds to
    # minutes to load.
    from longseq.eval.model import config_for_eval
    from longseq.eval.retrieval import check_lengths
    from longseq.models.loader import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    model, context = config_for_eval(args.model, args.adapter, overrides)
    check_lengths(cfg, model, context, resolve_dtype(args.dtype, device), device)


def _load(err, load_for_eval, args, overrides):
    name = args.adapter or args.model or "the built-in model"
    with err.status(f"loading {name}"):
        return load_for_eval(args.model, args.adapter, args.device, args.dtype, overrides)


def _rope_note(lm) -> str:
    rope = lm.config.rope
    return "" if rope.type == "default" else f" · RoPE {rope.type} ×{rope.factor:g}"


def _table(task: str, r: dict[str, Any]):
    from rich.table import Table

    from longseq.eval.plots import tokens_label

    if task in RETRIEVAL_TASKS:
        lengths = r["config"]["lengths"]
        table = Table("depth", *[tokens_label(n) for n in lengths], title=f"{task} accuracy")
        for depth in r["config"]["depths"]:
            cells = {c["length"]: c["accuracy"] for c in r["cells"] if c["depth"] == depth}
            table.add_row(f"{depth:.0%}", *[f"{cells[n]:.0%}" for n in lengths])
        table.add_row("[b]all[/]", *[f"[b]{r['by_length'][str(n)]:.0%}[/]" for n in lengths])
        table.caption = f"overall {r['accuracy']:.1%}"
    elif task == "perplexity":
        table = Table("tokens scored", "windows", "context", "stride", "NLL (nats/token)", "perplexity",
                      title="perplexity")
        table.add_row(f"{r['tokens']:,}", f"{r['windows']:,}", f"{r['context']:,}", f"{r['stride']:,}",
                      f"{r['nll']:.4f}", f"{r['ppl']:.3f}")
    elif task == "bleu":
        table = Table("BLEU", "1-gram", "2-gram", "3-gram", "4-gram", "brevity penalty", "hyp / ref length",
                      title=f"BLEU over {r['examples']} examples (sacrebleu)")
        table.add_row(f"{r['bleu']:.2f}", *[f"{p:.1f}" for p in r["precisions"]], f"{r['brevity_penalty']:.3f}",
                      f"{r['hyp_len']} / {r['ref_len']}")
    elif task == "rouge":
        table = Table("metric", "precision", "recall", "F1", title=f"ROUGE over {r['examples']} examples")
        for name in ("rouge1", "rouge2", "rougeL"):
            s = r[name]
            table.add_row(name.replace("rouge", "ROUGE-"), f"{s['precision']:.2f}", f"{s['recall']:.2f}",
                          f"{s['f1']:.2f}")
    elif task == "throughput":
        table = Table("prompt", "new", "time to first token", "per token (mean / p50 / p90)", "decode tok/s",
                      "total tok/s", title=f"generation speed over {r['runs']} runs")
        table.add_row(f"{r['prompt_tokens']:,}", str(r["new_tokens"]), f"{r['time_to_first_token_s'] * 1e3:.0f} ms",
                      f"{r['per_token_ms']:.1f} / {r['per_token_p50_ms']:.1f} / {r['per_token_p90_ms']:.1f} ms",
                      f"{r['decode_tokens_per_s']:.1f}", f"{r['total_tokens_per_s']:.1f}")
    else:
        raise LongseqError(f"unknown eval task {task!r}")
    return table
