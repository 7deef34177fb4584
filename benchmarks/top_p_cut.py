"""The top-p cut on one GPU: the sort path (engine/top_p.py: scale, stable sort, softmax, cumsum) against the Triton
search (engine/kernels/top_p.py), at temperature 0.7 / top_p 0.9 on random logits (randn * 3), for each batch of
rows x vocabulary. Milliseconds as the median of CUDA-event-timed single calls; each kernel tiling is also checked
against the sort path (rows whose cut differs; only float rounding at top_p can make one). Then the search with each
row's draw as its candidate (what the sampler passes: rows whose draw top-p keeps skip the search), with the draw's
own time; and one whole sampler step (engine/sampler.py) of those rows, which takes both, beside a greedy step.

    PYTHONPATH=src python3 benchmarks/top_p_cut.py --out top_p_cut.json [--rows 1,64,256] [--vocab 128256]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from longseq.engine.gumbel_max import gumbel_max
from longseq.engine.kernels.top_p import top_p_cut
from longseq.engine.sampler import Sampler
from longseq.engine.sequence import Sequence
from longseq.engine.top_p import candidate_cuts, top_p_cut_reference
from longseq.eval.io import write_text
from longseq.generation.sampling import SamplingParams

# (thresholds, block, blocks_per_chunk, num_warps); the first is the kernel's default
TILINGS = [(16, 256, 16, 4), (8, 256, 16, 4), (32, 256, 16, 4), (4, 256, 16, 4), (16, 512, 8, 4), (16, 256, 8, 4),
           (16, 256, 32, 4), (16, 512, 16, 8), (8, 512, 8, 8)]


def median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(rows: int, vocab: int, reps: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(rows)
    logits = torch.randn(rows, vocab, device="cuda", generator=g) * 3
    inv_temp = torch.full((rows,), 1 / 0.7, device="cuda")
    floor = torch.full((rows,), float("-inf"), device="cuda")
    top_p = torch.full((rows,), 0.9, device="cuda")
    on = torch.ones(rows, dtype=torch.int64, device="cuda")
    args = (logits, inv_temp, floor, top_p, on)
    ref = top_p_cut_reference(*args)
    out = {"rows": rows, "vocab": vocab, "sort_ms": round(median_ms(lambda: top_p_cut_reference(*args), reps), 4)}
    kernels = []
    for nt, block, per_chunk, warps in TILINGS:
        tiling = dict(thresholds=nt, block=block, blocks_per_chunk=per_chunk, num_warps=warps)
        value, index = top_p_cut(*args, **tiling)
        differ = int(((value != ref[0]) | (index != ref[1])).sum())
        ms = median_ms(lambda tiling=tiling: top_p_cut(*args, **tiling), reps)
        kernels.append({**tiling, "ms": round(ms, 4), "rows_differing": differ})
    out["kernel"] = kernels
    out["speedup_default"] = round(out["sort_ms"] / kernels[0]["ms"], 2)
    keys = torch.arange(rows, device="cuda") * 7919
    positions = torch.zeros(rows, dtype=torch.int64, device="cuda")
    no_cut = (torch.full((rows,), float("-inf"), device="cuda"), torch.full((rows,), vocab, device="cuda"))
    draw = lambda: gumbel_max(logits, inv_temp, floor, *no_cut, keys, positions)  # noqa: E731
    candidate = draw()
    value, index = top_p_cut(*args, candidate=candidate)
    want = candidate_cuts(logits * inv_temp[:, None], floor, *ref, candidate, on)
    out["candidates"] = {"draw_ms": round(median_ms(draw, reps), 4),
                         "search_ms": round(median_ms(lambda: top_p_cut(*args, candidate=candidate), reps), 4),
                         "rows_taken": int((index == candidate).sum()),
                         "rows_differing": int(((value != want[0]) | (index != want[1])).sum())}
    seqs = [Sequence(str(i), [1, 2, 3], SamplingParams(temperature=0.7, top_p=0.9), None, 1 << 20, seed=i)
            for i in range(rows)]
    for s in seqs:
        s.num_computed_tokens = len(s)
    sampler = Sampler(vocab, "cuda")
    out["sampler_step_ms"] = round(median_ms(lambda: sampler(logits.clone(), seqs), reps), 4)
    greedy = [Sequence(str(i), [1, 2, 3], SamplingParams(temperature=0.0), None, 1 << 20) for i in range(rows)]
    for s in greedy:
        s.num_computed_tokens = len(s)
    greedy_sampler = Sampler(vocab, "cuda")
    out["greedy_step_ms"] = round(median_ms(lambda: greedy_sampler(logits.clone(), greedy), reps), 4)
    out["clone_ms"] = round(median_ms(lambda: logits.clone(), reps), 4)  # inside sampler_step_ms
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--rows", default="1,64,256")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("top_p_cut.py: needs a CUDA GPU")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    for rows in (int(r) for r in args.rows.split(",")):
        run = measure(rows, args.vocab, args.reps)
        print(json.dumps(run), flush=True)
        results["runs"].append(run)
    write_text(args.out, json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
