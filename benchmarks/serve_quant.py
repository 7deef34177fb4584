"""Quantized serving speed on one GPU: FP8 weights, int4 weights and an FP8 KV pool against bf16, same run.

    python benchmarks/serve_quant.py --out benchmarks/results/DATE-serve-quant-h200
    python benchmarks/serve_quant.py --quick --out /tmp/sq          # minutes: a smoke run of every part

Model: the Llama-3-8B shape with random bf16 weights (serve_workloads.build_model), quantized in place
(models.quant.quantize_model) for the fp8 / int4 rows; random token-id prompts, EOS ignored. Three parts:
  throughput  --requests (1000) x --input-len (256) / --output-len (256), temperature 0.7, all submitted at once:
              --throughput-weights (bf16 fp8); tokens/s = (input + output) / wall time (vLLM's
              benchmark_throughput).
  batch1      one request alone (CUDA-graph decode at batch 1), 128-token prompt, 256 new tokens:
              --batch1-weights (bf16 fp8 int4, group --group-size) decode tok/s, its ratio to bf16's, and its share
              of the bound copy bandwidth / bytes read a token: every decoder linear once as stored (int4: packed
              weights, scales and zeros), what stays 16-bit (norms, the LM head) and one embedding row (the table is
              not read whole).
  long        one --long-context (131072) token prompt prefilled, then it decodes beside --long-chats (32) chat
              requests (256-token prompts): decode tok/s of the whole batch while the long context is read every
              step, and the KV pool's size in tokens: bf16 KV vs fp8 KV (bf16 weights).
Writes serve_quant.json and serve_quant.md (dated) under --out.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time
from pathlib import Path

import torch

from longseq.eval.io import write_text

WEIGHTS = ("bf16", "fp8", "int8", "int4")


def build(shape: dict, quant: str | None, group: int):
    from serve_workloads import build_model

    from longseq.models.quant import quantize_model

    model = build_model(shape, torch.device("cuda"), torch.bfloat16)
    if quant:
        quantize_model(model, quant, group_size=group)
        torch.cuda.empty_cache()
    return model


def engine_for(model, **options):
    from serve_throughput import NullTokenizer

    from longseq.config import EngineConfig
    from longseq.engine.llm_engine import LLMEngine
    from longseq.models.loader import LoadedModel

    cfg = EngineConfig(**options)
    return LLMEngine(LoadedModel(model, NullTokenizer(), Path("random")), cfg), cfg


def read_bytes(model) -> dict[str, int]:
    """Bytes a decode step reads of the model, a token: "quantized" (the quantized layers' buffers: packed weights,
    scales, zeros) and "sixteen_bit" (every other parameter, the LM head and norms among them, and one row of an
    untied embedding, whose table is not read whole)."""
    from longseq.models.quant import QUANTIZED_TYPES

    embed = model.model.embed_tokens.weight
    quantized = {id(t): t for m in model.modules() if isinstance(m, QUANTIZED_TYPES) for t in m.buffers()}
    others = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in quantized and t is not embed}
    sixteen = sum(t.numel() * t.element_size() for t in others.values())
    if embed is not model.lm_head.weight:
        sixteen += embed.shape[1] * embed.element_size()
    return {"quantized": sum(t.numel() * t.element_size() for t in quantized.values()), "sixteen_bit": sixteen}


def int4_layouts(model) -> list[str]:
    """The layouts the int4 layers keep (int4.py: "tinygemm" or "plain"), which decide their decode kernels."""
    from longseq.models.quant.int4 import Int4Linear

    return sorted({m.layout for m in model.modules() if isinstance(m, Int4Linear)})


def run_all(engine, prompts, params) -> tuple[float, int]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    torch.cuda.synchronize()
    return time.perf_counter() - start, steps


def throughput(args, shape, quant) -> dict:
    from longseq.generation.sampling import SamplingParams

    model = build(shape, quant, args.group_size)
    engine, cfg = engine_for(model, max_num_seqs=256, max_num_batched_tokens=8192,
                             max_model_len=args.input_len + args.output_len + 16)
    rng = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, shape["vocab_size"], (args.requests, args.input_len), generator=rng).tolist()
    run_all(engine, prompts[:8], SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
    params = SamplingParams(max_new_tokens=args.output_len, temperature=0.7, seed=0, ignore_eos=True)
    seconds, steps = run_all(engine, prompts, params)
    total = args.requests * (args.input_len + args.output_len)
    out = {"weights": quant or "bf16", "seconds": round(seconds, 2), "tokens_per_s": round(total / seconds, 1),
           "output_tokens_per_s": round(args.requests * args.output_len / seconds, 1), "steps": steps,
           "kv_blocks": engine.blocks.num_blocks, "preempted": engine.scheduler.num_preempted,
           "weight_gib": round(sum(read_bytes(model).values()) / 2**30, 2)}
    engine.close()
    return out


def batch1(args, shape, quant, bandwidth) -> dict:
    from longseq.generation.sampling import SamplingParams

    model = build(shape, quant, args.group_size)
    engine, _ = engine_for(model, max_num_seqs=8, max_model_len=1024)
    prompt = torch.randint(0, shape["vocab_size"], (128,), generator=torch.Generator().manual_seed(2)).tolist()
    rates = []
    for _ in range(args.repeats + 1):  # the first is a warm-up
        engine.add_request(prompt, SamplingParams(max_new_tokens=args.batch1_tokens, ignore_eos=True))
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
        m = outs[-1].metrics
        rates.append((len(outs[-1].token_ids) - 1) / (m["finished"] - m["first_token"]))
    decode = sorted(rates[1:])[len(rates[1:]) // 2]
    parts = read_bytes(model)
    nbytes = sum(parts.values())
    bound = bandwidth / nbytes
    out = {"weights": quant or "bf16", "decode_tokens_per_s": round(decode, 1),
           "runs": [round(r, 1) for r in rates[1:]],
           "read_gb_per_token": round(nbytes / 1e9, 3), "quantized_gb": round(parts["quantized"] / 1e9, 3),
           "sixteen_bit_gb": round(parts["sixteen_bit"] / 1e9, 3), "bound_tokens_per_s": round(bound, 1),
           "share_of_bound": round(decode / bound, 3)}
    if quant == "int4":
        out["int4_layout"] = "/".join(int4_layouts(model))
    engine.close()
    return out


def long_context(args, shape, kv_dtype) -> dict:
    from longseq.generation.sampling import SamplingParams

    model = build(shape, None, args.group_size)
    engine, cfg = engine_for(model, max_num_seqs=64, max_num_batched_tokens=8192,
                             max_model_len=args.long_context + 2 * args.long_new, kv_cache_dtype=kv_dtype)
    g = torch.Generator().manual_seed(3)
    long_prompt = torch.randint(0, shape["vocab_size"], (args.long_context,), generator=g).tolist()
    chats = torch.randint(0, shape["vocab_size"], (args.long_chats, 256), generator=g).tolist()
    params = SamplingParams(max_new_tokens=args.long_new, ignore_eos=True)
    run_all(engine, chats[:4], SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
    engine.add_request(long_prompt, params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    while engine.scheduler.waiting or any(s.num_computed_tokens < len(s.prompt_ids) for s in engine.scheduler.running):
        engine.step()  # the long prompt's prefill, chunk by chunk
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - start
    for c in chats:
        engine.add_request(c, params)
    while any(s.num_computed_tokens < len(s.prompt_ids) for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # the chats' prefill
    torch.cuda.synchronize()
    start, steps, tokens = time.perf_counter(), 0, 0
    while engine.has_unfinished() and len(engine.scheduler.running) == args.long_chats + 1:
        tokens += len(engine.step())
        steps += 1
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    return {"kv": kv_dtype if kv_dtype != "auto" else "bf16", "long_context": args.long_context,
            "chats": args.long_chats, "prefill_s": round(prefill_s, 2), "decode_steps": steps,
            "decode_tokens_per_s": round(tokens / seconds, 1), "step_ms": round(1e3 * seconds / max(1, steps), 2),
            "kv_blocks": engine.blocks.num_blocks, "kv_tokens": engine.blocks.num_blocks * cfg.kv_block_size}


def free():
    gc.collect()
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", nargs="+", default=["throughput", "batch1", "long"],
                    choices=["throughput", "batch1", "long"])
    ap.add_argument("--throughput-weights", nargs="+", default=["bf16", "fp8"], choices=WEIGHTS,
                    help="weights of the throughput part, each a run")
    ap.add_argument("--batch1-weights", nargs="+", default=["bf16", "fp8", "int4"], choices=WEIGHTS,
                    help="weights of the batch-1 decode part, each a run (ratios to bf16's, if among them)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--batch1-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--long-context", type=int, default=131072)
    ap.add_argument("--long-chats", type=int, default=32)
    ap.add_argument("--long-new", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every part")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.quick:
        args.requests, args.output_len, args.batch1_tokens, args.repeats = 64, 32, 32, 1
        args.long_context, args.long_chats, args.long_new = 8192, 4, 16
    from serve_throughput import LLAMA3_8B, copy_bandwidth

    shape = dict(LLAMA3_8B)
    shape["max_position_embeddings"] = max(shape["max_position_embeddings"], args.long_context + 2 * args.long_new)
    report = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "args": vars(args)}
    bandwidth = copy_bandwidth()
    report["copy_tb_per_s"] = round(bandwidth / 1e12, 3)
    if "throughput" in args.parts:
        report["throughput"] = []
        for weights in args.throughput_weights:
            report["throughput"].append(throughput(args, shape, None if weights == "bf16" else weights))
            print(json.dumps(report["throughput"][-1]), flush=True)
            free()
    if "batch1" in args.parts:
        report["batch1"] = []
        for weights in args.batch1_weights:
            report["batch1"].append(batch1(args, shape, None if weights == "bf16" else weights, bandwidth))
            print(json.dumps(report["batch1"][-1]), flush=True)
            free()
        base = next((b["decode_tokens_per_s"] for b in report["batch1"] if b["weights"] == "bf16"), None)
        for b in report["batch1"]:
            b["vs_bf16"] = round(b["decode_tokens_per_s"] / base, 2) if base else None
    if "long" in args.parts:
        report["long"] = []
        for kv in ("auto", "fp8"):
            report["long"].append(long_context(args, shape, kv))
            print(json.dumps(report["long"][-1]), flush=True)
            free()
    out = Path(args.out)
    write_text(out / "serve_quant.json", json.dumps(report, indent=1))
    write_text(out / "serve_quant.md", markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    a = r["args"]
    lines = [f"# Quantized serving, {r['gpu']}, {r['date']}", "",
             f"Llama-3-8B shape, random weights; torch {r['torch']}; copy bandwidth {r['copy_tb_per_s']} TB/s.", ""]
    if "throughput" in r:
        lines += [f"## Throughput: {a['requests']} x {a['input_len']}/{a['output_len']}, temperature 0.7", "",
                  "| weights | tok/s | output tok/s | s | KV blocks | preempted | weights GiB |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {t['weights']} | {t['tokens_per_s']} | {t['output_tokens_per_s']} | {t['seconds']} | "
                  f"{t['kv_blocks']} | {t['preempted']} | {t['weight_gib']} |" for t in r["throughput"]]
        lines.append("")
    if "batch1" in r:
        lines += [f"## Batch-1 decode: 128-token prompt, {a['batch1_tokens']} new tokens (int4 group "
                  f"{a['group_size']})", "",
                  "| weights | decode tok/s | vs bf16 | GB read a token (quantized + 16-bit) | bound tok/s | "
                  "share of bound | int4 layout |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {b['weights']} | {b['decode_tokens_per_s']} | {b.get('vs_bf16') or '-'} | "
                  f"{b['read_gb_per_token']} ({b['quantized_gb']} + {b['sixteen_bit_gb']}) | "
                  f"{b['bound_tokens_per_s']} | {b['share_of_bound']} | {b.get('int4_layout', '-')} |"
                  for b in r["batch1"]]
        lines.append("")
    if "long" in r:
        lines += [f"## Decode beside a {a['long_context']:,}-token context ({a['long_chats']} chats of 256 tokens, "
                  "bf16 weights)", "", "| KV | decode tok/s | ms a step | long prefill s | KV pool tokens |",
                  "|---|---|---|---|---|"]
        lines += [f"| {x['kv']} | {x['decode_tokens_per_s']} | {x['step_ms']} | {x['prefill_s']} | {x['kv_tokens']:,} |"
                  for x in r["long"]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
