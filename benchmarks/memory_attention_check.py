"""Memory attention's batched query blocks (what GPUs run) against block by block (the reference) on the built-in
SmolLM2-135M-Instruct, float32 logits of every position of random tokens read in 1K-token forwards. CI checks the
two paths on CPU at tiny shapes (tests/attention/test_memory.py); this is the same check on a GPU at the model's size.

    PYTHONPATH=src python benchmarks/memory_attention_check.py --device cuda --tokens 16K
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> int:
    from longseq.attention.memory import LayerMemory
    from longseq.config import ModelOverrides
    from longseq.eval.cli import parse_tokens
    from longseq.eval.model import load_for_eval
    from longseq.generation.memory_cache import MemoryKVCache

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=parse_tokens, default=16384)
    p.add_argument("--window", type=int, default=4096)
    args = p.parse_args()
    overrides = ModelOverrides(attention="memory", window=args.window, sink_tokens=128, block_size=64,
                               retrieved_blocks=32)
    lm = load_for_eval(device=args.device, dtype="float32", overrides=overrides)
    ids = torch.randint(0, lm.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(lm.device)
    logits = {}
    for batch in (True, False):
        LayerMemory.batch_blocks = batch
        cache = MemoryKVCache(lm.config, 1, lm.device, torch.float32, lm.model.rotary.inv_freq)
        out = []
        with torch.inference_mode():
            for start in range(0, args.tokens, 1024):
                x = ids[:, start : start + 1024]
                out.append(lm.model(x, positions=cache.prepare(x.shape[1]), cache=cache))
                cache.advance(x.shape[1])
        logits[batch] = torch.cat(out, dim=1)  # (1, tokens, V)
    diff = (logits[True] - logits[False]).abs().max().item()
    agree = (logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean().item()
    print(f"{args.tokens:,} tokens on {lm.device}: max |batched - block by block| logit {diff:.3g}, "
          f"greedy tokens equal at {agree:.2%} of positions")
    return 0 if diff < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
