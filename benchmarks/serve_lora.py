"""Multi-LoRA serving throughput (issue 26, item 5): one engine, the base model and 1 / 8 / 64 / 512 LoRA adapters.

    PYTHONUNBUFFERED=1 PYTHONPATH=src python benchmarks/serve_lora.py --out DIR            # the issue's run, one H200
    PYTHONPATH=src python benchmarks/serve_lora.py --tiny --out /tmp/smoke                 # CPU smoke run (a minute)

Model: the Llama-3-8B shape with random bf16 weights (as benchmarks/serve_workloads.py; `--tiny`: a 2-layer random
model in float32 on the CPU). One LLMEngine (max_num_seqs 256, max_num_batched_tokens 8192, KV pool from measured
memory, CUDA graphs, async scheduling) with LoRA on: --max-loras GPU slots (default 128) of rank 16, LRU eviction to
page-locked host memory. Adapters: rank 16 (alpha 32) on all seven linear layers of every decoder layer, random
factors. --disk-adapters of them (default 4) are written as PEFT folders (adapter_config.json +
adapter_model.safetensors, float32 as PEFT saves them) and registered through the real loader, which is timed ("load
time": read, check, pack into the slot layout, page-lock); the others (up to the largest adapter count) are made in
memory directly in the pool's slot layout (the same bytes a folder packs to, made without the disk). A slot load
(host -> GPU, one copy of the packed adapter) is timed separately with CUDA events.

Workloads (`--requests N`, default 1000): N requests of 256 prompt tokens (random ids, each workload its own) and 256
output tokens (ignore_eos), temperature 0.7, all submitted at once:
  base         every request on the base model (first, and again last: `base-again`, to see drift);
  lora-K       the requests spread uniformly over K registered adapters (request i takes adapter perm[i mod K]),
               for K in --adapters (default 1 8 64 512). With K > --max-loras the pool evicts.
Per workload: tok/s = (input + output tokens) / wall time, output tok/s, TTFT / TPOT p50 / p99 (as
serve_workloads.summarize), engine counters, and the pool's loads and evictions; each LoRA row's throughput as a
share of the base's (the mean of base and base-again where both ran). Issue 26's targets: >= 85% at 64 adapters,
>= 75% at 512.

Time on an H200: start-up (model, engine with twice the graphs: with and without adapters, 64 adapters, warm-up)
took 38 s in a trial run, where 256 requests took 4.5 s on the base and 5.6 s over 64 adapters; making 512 adapters
adds about 40 GiB of page-locked host memory (estimated half a minute); at 1000 requests each workload takes about
20-40 s, about 4-5 minutes in all. Each workload is cut off after --cap-s seconds (default 75: its unfinished requests
are aborted and its row is marked truncated) and --max-seconds (default 560) bounds the whole run. DIR/lora.json and
DIR/lora.md are rewritten after each workload (temp file + rename), so a run killed by a time limit keeps what
finished. --commit records the commit where the tree has no .git (a copied working tree).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve_workloads import (  # noqa: E402  (benchmarks/ is not a package)
    TINY_SHAPE,
    Probe,
    build_model,
    engine_env,
    log,
    ms,
    num,
    summarize,
    sync,
)

from longseq.eval.io import write_text  # noqa: E402

TARGETS = {64: 0.85, 512: 0.75}  # issue 26: LoRA throughput / base throughput, at these adapter counts
RANK, ALPHA = 16, 32.0
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEMPERATURE = 0.7


# ---- adapters ------------------------------------------------------------------------------------------------


def write_peft_adapter(folder: Path, model, seed: int, std: float) -> None:
    """A rank-16 PEFT adapter of every linear layer, float32 factors, PEFT's names and config."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device="cpu").manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in TARGET_MODULES and ".layers." in name:
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, module.in_features, generator=g) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(module.out_features, RANK, generator=g) * std
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "random-llama-3-8b",
              "r": RANK, "lora_alpha": ALPHA, "target_modules": TARGET_MODULES, "bias": "none",
              "lora_dropout": 0.0, "modules_to_save": None, "use_rslora": False, "use_dora": False}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))


def memory_adapter(engine, name: str, seed: int, std: float):
    """An adapter made directly in the pool's slot layout on the host (what `pack` makes of a folder), random
    N(0, std) factors over the whole slot: rank 16 on every linear layer."""
    import torch

    from longseq.engine.lora import LoRAAdapter

    pool = engine.runner.lora
    g = torch.Generator(device=pool.device).manual_seed(seed)
    values = torch.randn(pool.slot_numel, generator=g, device=pool.device, dtype=torch.float32).mul_(std)
    host = torch.empty(pool.slot_numel, dtype=pool.dtype, pin_memory=pool.device.type == "cuda")
    host.copy_(values.to(pool.dtype))
    return LoRAAdapter(name, f"memory:{seed}", RANK, TARGET_MODULES, host)


def time_slot_load(engine, adapter, repeats: int = 5) -> float | None:
    """Milliseconds of one host -> GPU slot load (the pool's copy of a packed adapter into a slot-sized buffer), by
    CUDA events, the mean of `repeats` after one warm-up."""
    import torch

    pool = engine.runner.lora
    if pool.device.type != "cuda":
        return None
    dst = torch.empty_like(pool.storage[0])  # not a slot of the pool: its bookkeeping stays as it is
    dst.copy_(adapter.host, non_blocking=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(adapter.host, non_blocking=True)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


# ---- workloads ------------------------------------------------------------------------------------------------


def run(engine, prompts: list[list[int]], params, loras: list[str | None], cap_s: float) -> dict:
    """Submit every request at once and step until all finish (or cap_s passes: the rest are aborted)."""
    probe, pool = Probe(engine), engine.runner.lora
    loads0, evictions0 = pool.num_loads, pool.num_evictions
    recs: dict[str, dict] = {}
    t0 = time.monotonic()
    for prompt, lora in zip(prompts, loras, strict=True):
        rid = engine.add_request(prompt, params, lora=lora)
        recs[rid] = dict(prompt_len=len(prompt), asked=params.max_new_tokens, out=0, arrival=time.monotonic(),
                         first=None, end=None, finished=False)
    truncated = False
    peak_adapters = 0
    while engine.has_unfinished():
        outs = engine.step()
        now = time.monotonic()
        probe.after_step()
        peak_adapters = max(peak_adapters, len({s.lora_slot for s in engine.scheduler.running if s.lora_slot >= 0}))
        for o in outs:
            r = recs[o.request_id]
            r["out"] = len(o.token_ids)
            if r["first"] is None:
                r["first"] = o.metrics.get("first_token", now)
            r["end"] = o.metrics.get("finished", now)
            if o.finished:
                r["finished"] = o.finish_reason != "abort"
        if now - t0 > cap_s:
            truncated = True
            for rid in list(engine.seqs):
                engine.abort(rid)
            while engine.has_unfinished():
                engine.step()
            break
    sync(engine)
    res = summarize(list(recs.values()), time.monotonic() - t0, truncated)
    res.pop("per_request", None)
    res["engine"] = probe.result()
    res["lora"] = {"slot_loads": pool.num_loads - loads0, "evictions": pool.num_evictions - evictions0,
                   "peak_adapters_in_batch": peak_adapters}
    return res


def warm_up(engine, names: list[str], vocab: int, prompt_len: int) -> None:
    """Prefill and decode steps with and without adapters, of several batch sizes: Triton compiles and lazy
    initialisation happen here."""
    from longseq.generation.sampling import SamplingParams

    rng = np.random.default_rng(99)
    params = SamplingParams(max_new_tokens=8, temperature=TEMPERATURE, ignore_eos=True)
    for n in (1, 3, 40):
        loras = [None if i % 3 == 0 else names[i % len(names)] for i in range(n)]
        prompts = [rng.integers(0, vocab, int(rng.integers(8, prompt_len + 1))).tolist() for _ in range(n)]
        run(engine, prompts, params, loras, float("inf"))


# ---- report ---------------------------------------------------------------------------------------------------


def base_rate(res: dict) -> float | None:
    rates = [res[n]["tokens_per_s"] for n in ("base", "base-again") if res.get(n, {}).get("tokens_per_s")]
    return statistics.mean(rates) if rates else None


def markdown(report: dict) -> str:
    env, res = report.get("env", {}), report["workloads"]
    base = base_rate(res)
    lines = [f"# Multi-LoRA serving — {report['date']}", "",
             f"Device: {env.get('device')} · torch {env.get('torch')} · triton {env.get('triton')} · commit "
             f"{env.get('commit')}", "",
             f"Model: {'tiny random (CPU smoke run)' if report['tiny'] else 'Llama-3-8B shape, random bf16 weights'}"
             f"; {report['requests']} requests × {report['prompt_len']} in / {report['output_len']} out, temperature "
             f"{TEMPERATURE}, ignore_eos, all at once. Adapters: rank {RANK} on {', '.join(TARGET_MODULES)}; LoRA "
             f"pool {report.get('max_loras')} slots × {report.get('slot_mib', 0):,.0f} MiB; max_num_seqs "
             f"{report['max_num_seqs']}.", "",
             "| workload | adapters | requests (finished) | s | tok/s | output tok/s | share of base | target "
             "| TTFT p50 ms | TPOT p50 ms | TPOT p99 ms | slot loads | evictions | peak adapters in a batch | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        if "tokens_per_s" not in r:
            lines.append(f"| {name} | | | | | | | | | | | | | | {r.get('skipped') or r.get('error')} |")
            continue
        k = r.get("adapters", 0)
        share = r["tokens_per_s"] / base if base and k else None
        target = TARGETS.get(k)
        lo = r.get("lora", {})
        note = "**truncated**" if r.get("truncated") else ""
        lines.append(
            f"| {name} | {k or '—'} | {r['requests']:,} ({r['finished']:,}) | {r['seconds']:,.1f} | "
            f"{num(r['tokens_per_s'])} | {num(r['output_tokens_per_s'])} | "
            f"{'—' if share is None else f'{share:.1%}'} | {'—' if target is None else f'≥ {target:.0%}'} | "
            f"{ms(r['ttft_ms'], 'p50')} | {ms(r['tpot_ms'], 'p50')} | {ms(r['tpot_ms'], 'p99')} | "
            f"{lo.get('slot_loads', '—')} | {lo.get('evictions', '—')} | {lo.get('peak_adapters_in_batch', '—')} | "
            f"{note} |")
    load = report.get("load_time")
    if load:
        lines += ["", f"Adapter load time: registering a PEFT folder (read {load['adapter_mib']:,.0f} MiB of float32 "
                  f"safetensors, check, pack into the slot layout, page-lock) {load['register_ms_median']:,.0f} ms "
                  f"median over {load['count']} (min {load['register_ms_min']:,.0f}, max "
                  f"{load['register_ms_max']:,.0f}); a slot load (host -> GPU copy of {report.get('slot_mib', 0):,.0f} "
                  f"MiB) {num(load.get('slot_load_ms'), ',.2f')} ms."]
    if report.get("startup_s") is not None:
        lines += ["", f"Start-up (model, engine with graph capture, adapters, warm-up): {report['startup_s']} s; "
                  f"{report.get('num_adapters', 0)} adapters registered."]
    if report.get("status") != "done":
        lines += ["", f"Status: {report.get('status')} (partial: written after each workload)."]
    return "\n".join(lines) + "\n"


def save(report: dict, out: Path) -> None:
    write_text(out / "lora.json", json.dumps(report, indent=1, default=str))
    write_text(out / "lora.md", markdown(report))


# ---- main -----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, nargs="+", default=None, help="adapter counts (default 1 8 64 512; "
                    "--tiny 1 3 6)")
    ap.add_argument("--requests", type=int, default=None, help="requests per workload (default 1000; --tiny 24)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 256 (--tiny 32)")
    ap.add_argument("--output-len", type=int, default=None, help="default 256 (--tiny 16)")
    ap.add_argument("--max-loras", type=int, default=None, help="GPU adapter slots (default 128; --tiny 4)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="default 8192 (--tiny 512)")
    ap.add_argument("--disk-adapters", type=int, default=None, help="adapters written as PEFT folders and loaded "
                    "(timed) through the loader (default 4; --tiny 2)")
    ap.add_argument("--no-base-again", dest="base_again", action="store_false", help="skip the second base run")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU: a smoke run of every path")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", help="results folder (default benchmarks/results/<date>-serve-lora-<device>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cap-s", type=float, default=75.0, help="cut a workload off after this many seconds")
    ap.add_argument("--max-seconds", type=float, default=None, help="the whole run's limit (default 560; --tiny none)")
    ap.add_argument("--commit", help="the commit to record where git cannot tell (a copy of the tree without .git)")
    args = ap.parse_args(argv)
    t = args.tiny
    args.adapters = args.adapters or ([1, 3, 6] if t else [1, 8, 64, 512])
    args.requests = args.requests or (24 if t else 1000)
    args.prompt_len = args.prompt_len or (32 if t else 256)
    args.output_len = args.output_len or (16 if t else 256)
    args.max_loras = args.max_loras or (4 if t else 128)
    args.max_num_batched_tokens = args.max_num_batched_tokens or (512 if t else 8192)
    args.disk_adapters = args.disk_adapters if args.disk_adapters is not None else (2 if t else 4)
    if args.max_seconds is None:
        args.max_seconds = 0 if t else 560
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.monotonic()
    import torch
    from serve_throughput import LLAMA3_8B, NullTokenizer

    from longseq.config import EngineConfig
    from longseq.engine.llm_engine import LLMEngine
    from longseq.generation.sampling import SamplingParams
    from longseq.models.loader import LoadedModel

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" and not args.tiny else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)
    today = datetime.date.today().isoformat()
    tag = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace("NVIDIA ", "").split()[0]
    out = Path(args.out or HERE / "results" / f"{today}-serve-lora-{tag.lower()}")
    out.mkdir(parents=True, exist_ok=True)
    shape = dict(TINY_SHAPE if args.tiny else LLAMA3_8B)
    max_model_len = args.prompt_len + args.output_len + 16
    report = {"date": today, "command": " ".join([Path(sys.executable).name, *sys.argv]), "tiny": args.tiny,
              "requests": args.requests, "prompt_len": args.prompt_len, "output_len": args.output_len,
              "adapter_counts": args.adapters, "max_loras": args.max_loras, "max_num_seqs": args.max_num_seqs,
              "seed": args.seed, "status": "starting", "workloads": {}}

    model = build_model(shape, device, dtype)
    cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       max_model_len=max_model_len, max_queue=max(1024, 2 * args.requests + 64), kv_cache_gib=0.5,
                       enable_lora=True, max_loras=args.max_loras, max_lora_rank=RANK)
    engine = LLMEngine(LoadedModel(model, NullTokenizer(), Path("random")), cfg)
    pool = engine.runner.lora
    report["env"] = engine_env(engine, cfg, device, dtype, shape, args.commit)
    report["slot_mib"] = pool.slot_numel * pool.storage.element_size() / 2**20
    log(f"engine: {report['env']['device']}, {engine.blocks.num_blocks} KV blocks, LoRA pool {pool.num_slots} slots "
        f"x {report['slot_mib']:,.0f} MiB, built in {time.monotonic() - t_start:.1f} s")

    # Adapters: a few through PEFT folders on disk (timed), the rest made in memory.
    std = 0.02
    names = [f"adapter-{i}" for i in range(max(args.adapters))]
    register_ms = []
    with tempfile.TemporaryDirectory(prefix="serve-lora-") as tmp:
        for i, name in enumerate(names[: args.disk_adapters]):
            folder = Path(tmp) / name
            write_peft_adapter(folder, model, seed=i, std=std)
            t0 = time.monotonic()
            engine.add_lora(name, folder)
            register_ms.append((time.monotonic() - t0) * 1e3)
        disk_mib = sum(f.stat().st_size for f in (Path(tmp) / names[0]).iterdir()) / 2**20 if register_ms else 0
    t0 = time.monotonic()
    for i, name in enumerate(names[args.disk_adapters :], args.disk_adapters):
        engine.add_lora(name, memory_adapter(engine, name, seed=i, std=std))
    report["num_adapters"] = len(names)
    log(f"{len(names)} adapters registered ({len(register_ms)} from disk) in "
        f"{time.monotonic() - t0 + sum(register_ms) / 1e3:.1f} s")
    if register_ms:
        report["load_time"] = {"count": len(register_ms), "adapter_mib": disk_mib,
                               "register_ms_median": statistics.median(register_ms),
                               "register_ms_min": min(register_ms), "register_ms_max": max(register_ms),
                               "register_ms": [round(x, 1) for x in register_ms],
                               "slot_load_ms": time_slot_load(engine, engine.lora(names[0]))}
    warm_up(engine, names[: min(len(names), 8)], shape["vocab_size"], args.prompt_len)
    report["startup_s"] = round(time.monotonic() - t_start, 1)
    report["status"] = "running"
    log(f"start-up: {report['startup_s']} s; load time {json.dumps(report.get('load_time'))}")
    save(report, out)

    params = SamplingParams(max_new_tokens=args.output_len, temperature=TEMPERATURE, ignore_eos=True)
    workloads = [("base", 0)] + [(f"lora-{k}", k) for k in args.adapters]
    if args.base_again:
        workloads.append(("base-again", 0))
    for salt, (name, k) in enumerate(workloads, 1):
        left = args.max_seconds - (time.monotonic() - t_start) if args.max_seconds else float("inf")
        if left < 15:
            report["workloads"][name] = {"skipped": f"--max-seconds {args.max_seconds} reached"}
            log(f"== {name}: skipped")
            save(report, out)
            continue
        rng = np.random.default_rng([args.seed, salt])
        prompts = [rng.integers(0, shape["vocab_size"], args.prompt_len).tolist() for _ in range(args.requests)]
        perm = rng.permutation(k).tolist() if k else []
        loras = [names[perm[i % k]] for i in range(args.requests)] if k else [None] * args.requests
        log(f"-- {name}")
        try:
            r = run(engine, prompts, params, loras, min(args.cap_s, left))
        except Exception as e:  # keep the other workloads' results
            import traceback

            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {e}"[:500]}
            for rid in list(engine.seqs):
                engine.abort(rid)
        r["adapters"] = k
        report["workloads"][name] = r
        if device.type == "cuda":
            report["env"]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if "tokens_per_s" in r:
            base = base_rate(report["workloads"])
            share = f" = {r['tokens_per_s'] / base:.1%} of base" if base and k else ""
            log(f"== {name}: {num(r['tokens_per_s'])} tok/s{share} ({r['seconds']:.1f} s, "
                f"{'TRUNCATED, ' if r['truncated'] else ''}TPOT p50 {ms(r['tpot_ms'], 'p50')} ms); "
                f"lora {json.dumps(r['lora'])}; engine {json.dumps(r['engine'])}")
        else:
            log(f"== {name}: {r.get('error')}")
        save(report, out)
    report["status"] = "done"
    report["total_s"] = round(time.monotonic() - t_start, 1)
    save(report, out)
    log(f"done in {report['total_s']} s: {out / 'lora.json'}, {out / 'lora.md'}")
    log(markdown(report))


if __name__ == "__main__":
    main()
