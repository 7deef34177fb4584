"""Accuracy of quantized serving on the built-in model (SmolLM2-135M-Instruct): perplexity and passkey retrieval
with 16-bit weights, FP8 weights, int4 weights and an FP8 KV pool.

    python benchmarks/quant_accuracy.py --device cuda --out benchmarks/results/DATE-quant-accuracy-h200
    python benchmarks/quant_accuracy.py --device cpu --quick --out /tmp/qa      # minutes on a laptop

Perplexity: the shipped text (--text, default this repository's README.md) scored teacher-forced through the
engine's paged KV pool in chunks of --chunk tokens up to --context, so every chunk reads the earlier ones' K/V from
the pool as serving does (an FP8 pool rounds them); one number per configuration, the same tokens each time.
Passkey: longseq eval passkey's prompts (a key hidden at each depth of filler text) answered greedily by the engine
(LLM), --trials keys per length and depth. Writes quant_accuracy.json and quant_accuracy.md (dated) under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import time
from pathlib import Path

import torch

CONFIGS = {  # name: LLM options
    "16-bit": {},
    "fp8": {"quantization": "fp8"},
    "int4": {"quantization": "int4"},
    "fp8-kv": {"kv_cache_dtype": "fp8"},
    "fp8+fp8-kv": {"quantization": "fp8", "kv_cache_dtype": "fp8"},
}
HERE = Path(__file__).resolve().parent


@torch.inference_mode()
def paged_nll(model, ids: list[int], kv_dtype: torch.dtype, chunk: int, block_size: int = 16) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given their prefixes, computed chunk by chunk over a paged pool."""
    from longseq.attention.paged import PagedBatch, PagedKVCache

    cfg, device = model.config, model.lm_head.weight.device
    blocks = -(-len(ids) // block_size)
    cache = PagedKVCache(cfg.num_layers, blocks * block_size, cfg.num_kv_heads, cfg.head_dim, kv_dtype, device)
    table = list(range(blocks))
    total, count = 0.0, 0
    tokens = torch.tensor(ids, device=device)
    for start in range(0, len(ids) - 1, chunk):
        end = min(start + chunk, len(ids))
        n = end - start
        cache.batch = PagedBatch.build([table[: -(-end // block_size)]], [n], [end], block_size, device,
                                       cfg.num_kv_heads)
        hidden = model.hidden(tokens[start:end][None], torch.arange(start, end, device=device)[None], cache=cache)
        logits = model.logits(hidden[0]).float()  # (n, V)
        targets = tokens[start + 1 : end + 1]
        logp = torch.log_softmax(logits[: len(targets)], dim=-1)
        total -= float(logp.gather(1, targets[:, None]).sum())
        count += len(targets)
    return total, count


def perplexity(llm, text: str, context: int, chunk: int) -> dict:
    from longseq.engine.model_runner import kv_pool_dtype

    model = llm.engine.lm.model
    ids = list(llm.tokenizer(text, add_special_tokens=False)["input_ids"])
    kv_dtype = kv_pool_dtype(model, llm.engine.cfg)
    nll = count = 0.0
    for start in range(0, len(ids) - 1, context):  # disjoint windows of `context` tokens
        window = ids[start : start + context + 1]
        if len(window) < 2:
            break
        s, c = paged_nll(model, window, kv_dtype, chunk)
        nll, count = nll + s, count + c
    return {"tokens": int(count), "nll": nll / count, "perplexity": math.exp(nll / count)}


def passkey(llm, lengths: list[int], depths: list[float], trials: int, seed: int) -> dict:
    from longseq.engine import SamplingParams
    from longseq.eval.passkey import build_prompt, parse_answer

    rng = random.Random(seed)
    prompts, keys, cells = [], [], []
    for n in lengths:
        for d in depths:
            for _ in range(trials):
                key = str(rng.randint(10000, 99999))
                prompts.append(build_prompt(llm.tokenizer, n, d, key).ids)
                keys.append(key)
                cells.append((n, d))
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=8))
    correct = [parse_answer(o.text) == k for o, k in zip(outs, keys, strict=True)]
    by_length = {str(n): sum(c for c, (m, _) in zip(correct, cells, strict=True) if m == n) / (len(depths) * trials)
                 for n in lengths}
    return {"accuracy": sum(correct) / len(correct), "by_length": by_length, "trials": len(correct)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--text", default=str(HERE.parent / "README.md"), help="the text to score (default: README.md)")
    ap.add_argument("--context", type=int, default=2048, help="tokens per perplexity window")
    ap.add_argument("--chunk", type=int, default=256, help="tokens a step: later chunks read earlier K/V from the pool")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8000])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="the first 4K tokens of text, passkey at 1K and 2K, 1 trial")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from longseq.engine import LLM

    text = Path(args.text).read_text()
    if args.quick:
        text, args.lengths, args.depths, args.trials = text[:16000], [1024, 2048], [0.0, 0.5, 1.0], 1
    report = {"date": datetime.date.today().isoformat(), "model": "SmolLM2-135M-Instruct (built-in)",
              "text": Path(args.text).name, "args": vars(args), "results": {}}
    for name in args.configs:
        start = time.perf_counter()
        llm = LLM(None, device=args.device, num_kv_blocks=2 + max(args.lengths) * 4 // 16, max_num_seqs=64,
                  **CONFIGS[name])
        dev = llm.engine.lm.device
        report["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        report["dtype"] = str(llm.engine.lm.model.lm_head.weight.dtype).removeprefix("torch.")
        row = {"perplexity": perplexity(llm, text, args.context, args.chunk),
               "passkey": passkey(llm, args.lengths, args.depths, args.trials, args.seed)}
        row["seconds"] = round(time.perf_counter() - start, 1)
        report["results"][name] = row
        print(name, json.dumps(row), flush=True)
        del llm
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_accuracy.json").write_text(json.dumps(report, indent=1))
    (out / "quant_accuracy.md").write_text(markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    a = r["args"]
    base = r["results"].get("16-bit", {}).get("perplexity", {}).get("perplexity")
    lines = [f"# Quantized serving accuracy, {r['model']}, {r['device']} ({r['dtype']}), {r['date']}", "",
             f"Perplexity of {r['text']} in windows of {a['context']} tokens scored {a['chunk']} at a time through "
             f"the paged KV pool; passkey at {', '.join(map(str, a['lengths']))} tokens, depths "
             f"{', '.join(map(str, a['depths']))}, {a['trials']} keys each.", "",
             "| configuration | perplexity | vs 16-bit | passkey | "
             + " | ".join(f"{n} tok" for n in a["lengths"]) + " |",
             "|---|---|---|---|" + "---|" * len(a["lengths"])]
    for name, row in r["results"].items():
        ppl = row["perplexity"]["perplexity"]
        rel = f"{100 * (ppl / base - 1):+.2f}%" if base else "-"
        pk = row["passkey"]
        lines.append(f"| {name} | {ppl:.3f} | {rel} | {pk['accuracy']:.2f} | "
                     + " | ".join(f"{pk['by_length'][str(n)]:.2f}" for n in a["lengths"]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
