"""Serving past the context with memory attention: batch-1 prefill time and decode tok/s against context length,
the engine under memory attention (InfLLM) and under full attention, same model, same run.

    python benchmarks/serve_memory.py --lengths 8K,32K,128K,512K,1M --out runs/serve_memory.json

A random prompt of each length, --new-tokens greedy tokens (EOS ignored). Full attention is run with the model's
context raised to the prompt's (positions past its training: its tokens mean nothing, its speed is what is
measured) for the lengths --full-lengths lists, where its pool holds them. Decode tok/s = (new - 1) / (finish -
first token), from the engine's request metrics. Memory attention also reports the keys a decode step gathers.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform

import torch

from longseq.attention.paged_memory import keys_read
from longseq.engine import LLM, SamplingParams


def parse_lengths(text: str) -> list[int]:
    scale = {"K": 1024, "M": 1024 * 1024}
    return [int(float(x[:-1]) * scale[x[-1].upper()]) if x[-1].upper() in scale else int(x)
            for x in text.split(",") if x]


def run(llm: LLM, length: int, new_tokens: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(100, llm.engine.lm.config.vocab_size - 100, (length,), generator=g).tolist()
    engine, widths = llm.engine, set()
    engine.add_request(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            out = o
        plan = getattr(engine.runner.cache, "plan", None)
        if plan is not None and len(plan.groups) == 1 and plan.groups[0].local_mask.shape[1] == 1:
            widths.add(keys_read(plan.groups[0], engine.lm.config.attention))
    m = out.metrics
    decode_s = m["finished"] - m["first_token"]
    return {"length": length, "prefill_s": m["first_token"] - m["arrival"],
            "decode_tok_s": (len(out.token_ids) - 1) / decode_s if decode_s > 0 else None,
            "keys_per_decode_step": max(widths) if widths else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: the built-in model)")
    p.add_argument("--lengths", default="8K,32K,128K", help="prompt lengths, e.g. 8K,32K,1M")
    p.add_argument("--full-lengths", default=None, help="lengths full attention also runs (default: --lengths)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--retrieved-blocks", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    args = p.parse_args()
    lengths = parse_lengths(args.lengths)
    full_lengths = parse_lengths(args.full_lengths) if args.full_lengths is not None else lengths
    longest = max(lengths) + args.new_tokens
    common = dict(device=args.device, dtype="bfloat16" if args.device != "cpu" else "float32", max_num_seqs=1,
                  max_num_batched_tokens=args.max_num_batched_tokens)
    gpu = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    results = {"gpu": gpu, "host": platform.node(), "args": vars(args), "memory": [], "full": []}
    llm = LLM(args.model, attention="memory", window=args.window, sink_tokens=args.sink_tokens,
              block_size=args.block_size, retrieved_blocks=args.retrieved_blocks, **common)
    run(llm, 2 * args.window, 8, seed=0)  # warm-up
    for length in lengths:
        results["memory"].append(run(llm, length, args.new_tokens, seed=1))
        print("memory", results["memory"][-1], flush=True)
    del llm
    gc.collect()
    if args.device != "cpu":
        torch.cuda.empty_cache()
    if full_lengths:
        llm = LLM(args.model, max_seq_len=max(longest, max(full_lengths) + args.new_tokens), **common)
        run(llm, 2 * args.window, 8, seed=0)
        for length in full_lengths:
            blocks = llm.engine.blocks
            if -(-(length + args.new_tokens) // blocks.block_size) > blocks.num_blocks:
                results["full"].append({"length": length, "error": "does not fit the KV pool"})
            else:
                results["full"].append(run(llm, length, args.new_tokens, seed=1))
            print("full", results["full"][-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
