"""Accuracy of quantized serving on the built-in model (SmolLM2-135M-Instruct): perplexity and passkey retrieval
with 16-bit weights, FP8, int4 and int8 weights and an FP8 KV pool.

    python benchmarks/quant_accuracy.py --device cuda --out benchmarks/results/DATE-quant-accuracy-h200
    python benchmarks/quant_accuracy.py --device cpu --quick --out /tmp/qa      # minutes on a laptop

Perplexity: the shipped text (--text, default this repository's README.md) scored teacher-forced through the
engine's paged KV pool in chunks of --chunk tokens up to --context, so every chunk reads the earlier ones' K/V from
the pool as serving does (an FP8 pool rounds them); one number per configuration, the same tokens each time.
Passkey: longseq eval passkey's prompts (a key hidden at each depth of filler text) answered greedily by the engine
(LLM), --trials keys per length and depth. Writes quant_accuracy.json and quant_accuracy.md (dated) under --out.

The built-in model is a GGUF file, so "16-bit" means its blocks dequantized, and int4 / int8 keep the decoder linears'
blocks packed where their type allows (models/quant/gguf_int4.py, gguf_q8.py): the table's `weights` column says,
from the file's tensor types, what each configuration serves. The `-requant` configurations load the weights
dequantized and let the engine round them afresh (the path of a 16-bit checkpoint).
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

from longseq.eval.io import write_text

CONFIGS = {  # name: LLM options
    "16-bit": {},
    "fp8": {"quantization": "fp8"},
    "int4": {"quantization": "int4"},
    "int4-requant": {"quantization": "int4", "requantize": True},
    "int8": {"quantization": "int8"},
    "fp8-kv": {"kv_cache_dtype": "fp8"},
    "fp8+fp8-kv": {"quantization": "fp8", "kv_cache_dtype": "fp8"},
}
ROUNDING = {"fp8": "fp8 e4m3 per channel", "int4": "int4 g{group}", "int8": "Q8_0 (int8, scale per 32)"}
GGUF_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
HERE = Path(__file__).resolve().parent


def linear_types(path: Path) -> list[str]:
    """The GGUF block types of the file's decoder linears (those quantization swaps)."""
    from gguf import GGUFReader

    return sorted({t.tensor_type.name for t in GGUFReader(path).tensors
                   if t.name.startswith("blk.") and t.name.split(".")[-2] in GGUF_LINEARS})


def weights_note(options: dict, types: list[str], model) -> str:
    """What a configuration serves, given the file's linear types: dequantized, kept packed, or rounded afresh."""
    from longseq.models.quant.gguf_int4 import PACKED_BY_METHOD

    # int4's group: quant_group_size or, where that does not divide a layer's inputs, a smaller one (int4.py)
    group = "/".join(map(str, sorted({m.group_size for m in model.modules() if hasattr(m, "group_size")})))
    method, source = options.get("quantization"), "/".join(types)
    if method is None:
        note = f"{source} dequantized"
    elif not options.get("requantize") and set(types) <= set(PACKED_BY_METHOD.get(method, ())):
        note = f"GGUF {source} blocks kept packed"
    else:
        note = f"{ROUNDING[method].format(group=group)} of {source} dequantized"
    return note + (", fp8 KV pool" if options.get("kv_cache_dtype") == "fp8" else "")


def build_llm(options: dict, device: str, **engine):
    """The engine over the built-in model; `requantize`: load it dequantized and let the engine quantize it
    (model_runner's quantize_model), so blocks LLM(None, quantization=...) would keep packed are rounded afresh."""
    from longseq.engine import LLM
    from longseq.models.loader import load

    options = dict(options)
    # LLM(None, quantization=...) loads the file's blocks packed where it can; a model loaded dequantized is
    # quantized by the engine
    model = load(None, device=device) if options.pop("requantize", False) else None
    return LLM(model, device=device, **options, **engine)


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
    from longseq.models.loader import default_model_path

    text = Path(args.text).read_text()
    if args.quick:
        text, args.lengths, args.depths, args.trials = text[:16000], [1024, 2048], [0.0, 0.5, 1.0], 1
    report = {"date": datetime.date.today().isoformat(), "model": "SmolLM2-135M-Instruct (built-in)",
              "text": Path(args.text).name, "args": vars(args), "results": {}}
    types = linear_types(default_model_path())
    for name in args.configs:
        start = time.perf_counter()
        llm = build_llm(CONFIGS[name], args.device, num_kv_blocks=2 + max(args.lengths) * 4 // 16, max_num_seqs=64)
        dev = llm.engine.lm.device
        report["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        report["dtype"] = str(llm.engine.lm.model.lm_head.weight.dtype).removeprefix("torch.")
        row = {"weights": weights_note(CONFIGS[name], types, llm.engine.lm.model),
               "perplexity": perplexity(llm, text, args.context, args.chunk),
               "passkey": passkey(llm, args.lengths, args.depths, args.trials, args.seed)}
        row["seconds"] = round(time.perf_counter() - start, 1)
        report["results"][name] = row
        print(name, json.dumps(row), flush=True)
        del llm
        out = Path(args.out)  # written after each configuration, so a run stopped early keeps what it measured
        write_text(out / "quant_accuracy.json", json.dumps(report, indent=1))
        write_text(out / "quant_accuracy.md", markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    a = r["args"]
    base = r["results"].get("16-bit", {}).get("perplexity", {}).get("perplexity")
    lines = [f"# Quantized serving accuracy, {r['model']}, {r['device']} ({r['dtype']}), {r['date']}", "",
             f"Perplexity of {r['text']} in windows of {a['context']} tokens scored {a['chunk']} at a time through "
             f"the paged KV pool; passkey at {', '.join(map(str, a['lengths']))} tokens, depths "
             f"{', '.join(map(str, a['depths']))}, {a['trials']} keys each.", "",
             "| configuration | weights | perplexity | vs 16-bit | passkey | "
             + " | ".join(f"{n} tok" for n in a["lengths"]) + " |",
             "|---|---|---|---|---|" + "---|" * len(a["lengths"])]
    for name, row in r["results"].items():
        ppl = row["perplexity"]["perplexity"]
        rel = f"{100 * (ppl / base - 1):+.2f}%" if base else "-"
        pk = row["passkey"]
        lines.append(f"| {name} | {row.get('weights', '-')} | {ppl:.3f} | {rel} | {pk['accuracy']:.2f} | "
                     + " | ".join(f"{pk['by_length'][str(n)]:.2f}" for n in a["lengths"]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
