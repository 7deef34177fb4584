"""The batched sampler (engine/sampler.py) against the per-row loop it replaced (generation/sampling.py's
filter_logits + torch.multinomial, one row at a time, a torch.Generator per seeded row): milliseconds per step for
a (B, V) batch of logits, greedy, temperature 1.0, temperature 0.7 / top_p 0.9, and a mixed batch (greedy,
top-k, min-p, penalties, logprobs). On a GPU the batched draw runs the Triton kernel, and once more the eager ops
(fused.MODE = "0").

    PYTHONPATH=src python3 benchmarks/sampler.py [--device cuda] [--batch 256] [--vocab 128256] [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from longseq.engine.sampler import Sampler
from longseq.engine.sequence import Sequence
from longseq.generation.sampling import SamplingParams, filter_logits
from longseq.models import fused

WORKLOADS = {
    "greedy": [SamplingParams()],
    "temperature_1": [SamplingParams(temperature=1.0)],
    "top_p_0.9": [SamplingParams(temperature=0.7, top_p=0.9)],
    "mixed": [SamplingParams(), SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, seed=3),
              SamplingParams(temperature=0.8, top_k=50), SamplingParams(temperature=1.0, min_p=0.05),
              SamplingParams(temperature=0.7, top_p=0.9, presence_penalty=0.5),
              SamplingParams(temperature=0.7, logprobs=5), SamplingParams(temperature=0.9, repetition_penalty=1.1)],
}


def per_row(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> torch.Tensor:
    """The loop the batched sampler replaced (without its penalties and logprobs)."""
    tokens = logits.argmax(-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = filter_logits(logits[i : i + 1], p.temperature, p.top_k, p.top_p, p.min_p).softmax(-1)
        tokens[i] = torch.multinomial(row, 1, generator=generators[i])[0, 0]
    return tokens


def timed_ms(fn, device: torch.device, reps: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps * 1e3


def measure(name: str, logits: torch.Tensor, reps: int) -> dict:
    device, (B, V) = logits.device, logits.shape
    params = [WORKLOADS[name][i % len(WORKLOADS[name])] for i in range(B)]
    seqs = [Sequence(str(i), [1, 2, 3], p, None, 1 << 20, seed=i) for i, p in enumerate(params)]
    for s in seqs:
        s.num_computed_tokens = len(s)
    generators = [torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None for p in params]
    sampler = Sampler(V, device)
    row = {"workload": name, "device": str(device), "batch": B, "vocab": V}
    row["per_row_ms"] = timed_ms(lambda: per_row(logits.clone(), params, generators), device, reps)
    row["batched_ms"] = timed_ms(lambda: sampler(logits.clone(), seqs), device, reps)
    if device.type == "cuda":
        mode, fused.MODE = fused.MODE, "0"
        row["batched_eager_ms"] = timed_ms(lambda: sampler(logits.clone(), seqs), device, reps)
        fused.MODE = mode
    row["clone_ms"] = timed_ms(lambda: logits.clone(), device, reps)  # included in both
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    args = ap.parse_args()
    torch.manual_seed(0)
    logits = torch.randn(args.batch, args.vocab, device=args.device) * 3
    for name in args.workloads.split(","):
        row = measure(name, logits, args.reps)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
