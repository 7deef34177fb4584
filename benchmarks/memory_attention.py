"""Memory attention (InfLLM, training-free) against RoPE scaling on the built-in SmolLM2-135M-Instruct (native context
8,192), issue 24 items 4 and 5: passkey and needle accuracy from 16K to 1M tokens, perplexity on long text, and decode
speed and memory against context length, full attention vs memory attention in the same run.

    # smoke test: a tiny random model, seconds on CPU (tests/benchmarks/test_memory_attention_bench.py runs it)
    PYTHONPATH=src python benchmarks/memory_attention.py --tiny --out OUT
    # 2 CPU cores, about 75 minutes when idle (not run in CI; the plan it prints says more)
    PYTHONPATH=src python benchmarks/memory_attention.py --preset cpu --out OUT
    # one H200, up to 1M tokens within a time budget (cells that no longer fit are skipped, with a note; the whole
    # plan is about 29 minutes there)
    PYTHONPATH=src python benchmarks/memory_attention.py --preset h200 --max-seconds 480 --out OUT

Configurations (each at every --lengths length, the same prompts for all: one seed):
- none: full attention, no RoPE scaling, --max-seq-len raised to the length (past 8K the model extrapolates);
- ntk: dynamic NTK with the factor that reaches the length (ceil(length / native), at least 2);
- yarn: YaRN x4 (native x4 = 32K), --max-seq-len raised to the length beyond that;
- memory: --attention memory (attention/memory.py) with --sink-tokens / --window / --block-size / --retrieved-blocks.
  Defaults scaled from InfLLM's Llama-3 setting (config/llama-3-inf-llm.yaml of thunlp/InfLLM, native 8K like
  SmolLM2: 128 initial tokens, a 4K local window, 16 retrieved blocks of 128 tokens): the same 128 sinks and 4K window,
  and the same 2K retrieved tokens as 32 blocks of 64, because our block's representative key is the mean of its keys
  (InfLLM keeps the 4 most-attended keys), which a short needle moves more in a smaller block; window + block (4,160)
  stays within the native context, as attention/memory.py requires. Every memory key sits at distance `window`, so
  the model only meets distances it was trained on at any length.
Full-attention configurations run up to --full-max tokens (an O(L^2) prefill and an O(L) KV cache per prompt) and are
reported as they score, failures included; beyond --full-max a cell is recorded as "not run: <reason>", and where the
device cannot hold its KV cache as "cannot run: <reason>". Memory attention runs at every length.

Measurements:
- retrieval (eval/passkey.py, eval/needle.py): --depths x --trials prompts per (length, configuration, task), greedy;
- perplexity: the first L tokens of the Python docs (eval/needle.py's haystack, repeated past its end), read once:
  full attention in one window of L tokens, memory attention in prefill chunks through its cache
  (eval/perplexity.py's cached_sequence_nll); every token after the first scored;
- speed: decode tok/s (--new-tokens greedy steps, after 2 warm-up steps) and peak GPU memory at each --speed-lengths
  context, full attention (--max-seq-len raised: for speed only) and memory attention. The context is synthetic:
  random keys and values written into the cache (LayerMemory.skip for memory attention), because a decode step's work
  does not depend on the values; a real prefill at 1M tokens would take most of the budget.
Before running it times the memory path's prefill and full attention at two short lengths on this device, prints a
plan with each cell's estimated seconds, and skips cells that no longer fit --max-seconds (recorded with a note).
Writes OUT/results.json (rewritten atomically after each cell), OUT/table.md and OUT/heatmaps/<config>-<task>.png.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch

CONFIGS = ("memory", "none", "ntk", "yarn")
YARN_FACTOR = 4.0
# Estimates only (the plan): bytes a decode step reads per second, to scale full attention's decode with its KV cache.
DECODE_READ_BYTES_PER_S = {"cpu": 10e9, "cuda": 2e12}

PRESETS = {
    # 2 CPU cores, fp32: memory attention at every length to 64K, full attention to 32K, one depth.
    "cpu": dict(lengths="16K,32K,64K", depths="50", trials=1, full_max="32K", ppl_lengths="16K",
                speed_lengths="8K,16K,32K,64K", new_tokens=8),
    # One H200, bf16: memory attention at every length to 1M (5 depths, one key each; --trials 2 doubles the
    # retrieval time), full attention to 64K (its prefill is O(L^2)). The plan calibrated on an H200 estimates about
    # 29 minutes in all (benchmarks/results/2026-12-03-memory-attention-h200): split it with --configs / --tasks /
    # --lengths across device calls, or let --max-seconds skip what does not fit.
    "h200": dict(lengths="16K,32K,64K,128K,256K,1M", depths="0,25,50,75,100", trials=1, full_max="64K",
                 ppl_lengths="32K,128K", speed_lengths="8K,32K,128K,512K,1M", new_tokens=32),
    # A tiny random model (native context 256): every path in seconds, for a smoke test.
    "tiny": dict(lengths="512,1K", depths="50", trials=1, full_max="512", ppl_lengths="512",
                 speed_lengths="256,1K", new_tokens=4, sink_tokens=4, window=64, block_size=16, retrieved_blocks=2),
}
MEMORY_DEFAULTS = dict(sink_tokens=128, window=4096, block_size=64, retrieved_blocks=32)


@dataclass
class Cell:
    kind: str  # retrieval | ppl | speed
    config: str  # a configuration, or for speed: full | memory
    length: int
    task: str = ""  # retrieval: passkey | needle
    estimate_s: float = 0.0
    not_run: str | None = None  # why it is not run (decided before running)

    @property
    def name(self) -> str:
        return " ".join(x for x in (self.kind, self.task, self.config, _label(self.length)) if x)


@dataclass
class Costs:
    """Seconds on this device, timed at start-up (calibrate): prefill per token of the memory path; full attention's
    prefill a*L + b*L^2; a decode step of each at the calibration length."""

    memory_per_token: float
    full_linear: float
    full_quadratic: float
    memory_decode: float
    full_decode: float
    kv_bytes_per_token: int
    read_bytes_per_s: float
    extra: dict = field(default_factory=dict)

    def full_prefill(self, n: int) -> float:
        return self.full_linear * n + self.full_quadratic * n * n

    def prefill(self, config: str, n: int) -> float:
        return self.memory_per_token * n if config == "memory" else self.full_prefill(n)

    def decode(self, config: str, n: int) -> float:
        if config == "memory":
            return self.memory_decode
        return self.full_decode + n * self.kv_bytes_per_token / self.read_bytes_per_s


def _label(n: int) -> str:
    if n % (1 << 20) == 0:
        return f"{n >> 20}M"
    return f"{n >> 10}K" if n % 1024 == 0 else str(n)


# ---- the model and its configurations ----------------------------------------------------------------------------


def load_model(args):
    """The built-in model, or with --tiny a random 2-layer one with the built-in tokenizer."""
    from longseq.models.loader import LoadedModel, default_model_path, load, resolve_device, resolve_dtype

    if not args.tiny:
        return load(None, device=args.device, dtype=args.dtype)
    from longseq.config import ModelConfig
    from longseq.models.llama import CausalLM
    from longseq.models.tokenizer import load_tokenizer

    device = resolve_device(args.device)
    tokenizer = load_tokenizer(default_model_path())
    cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_seq_len=256)
    torch.manual_seed(0)
    model = CausalLM(cfg).to(device, resolve_dtype(args.dtype, device)).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, path=Path("tiny-random"))


def overrides_for(config: str, length: int, native: int, args):
    """The ModelOverrides of a configuration at a context length (applied in full each time: they replace each
    other)."""
    from longseq.config import ModelOverrides

    if config == "memory":
        return ModelOverrides(attention="memory", rope_scaling="none", max_seq_len=native, window=args.window,
                              sink_tokens=args.sink_tokens, block_size=args.block_size,
                              retrieved_blocks=args.retrieved_blocks, memory_placement=args.memory_placement)
    if config == "none":
        return ModelOverrides(attention="causal", rope_scaling="none", max_seq_len=max(length, native))
    if config == "ntk":
        factor = max(2, math.ceil(length / native))
        return ModelOverrides(attention="causal", rope_scaling="ntk", rope_factor=float(factor))
    if config == "yarn":
        return ModelOverrides(attention="causal", rope_scaling="yarn", rope_factor=YARN_FACTOR,
                              max_seq_len=max(length, int(native * YARN_FACTOR)))
    raise SystemExit(f"unknown configuration {config!r}; use {', '.join(CONFIGS)}")


def configure(lm, config: str, length: int, native: int, args) -> None:
    from longseq.models.overrides import apply_overrides

    apply_overrides(lm.model, overrides_for(config, length, native, args))


def describe(config: str, length: int, native: int, args) -> str:
    if config == "memory":
        return f"memory {args.sink_tokens}+{args.window}+{args.retrieved_blocks}x{args.block_size}"
    if config == "ntk":
        return f"ntk (dynamic) x{max(2, math.ceil(length / native))}"
    return "yarn x4" if config == "yarn" else "none"


# ---- cost model and plan ---------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def calibrate(lm, native: int, args) -> Costs:
    """Time the memory path past its window and full attention's prefill at native/4 and native/2 on this device."""
    from longseq.generation import KVCache
    from longseq.generation.memory_cache import MemoryKVCache

    device, dtype, cfg = lm.device, lm.model.lm_head.weight.dtype, lm.config
    ids = torch.randint(0, cfg.vocab_size, (1, native), device=device)

    def forward(cache, x):
        out = lm.model(x, positions=cache.prepare(x.shape[1]), cache=cache, last_only=True)
        cache.advance(x.shape[1])
        return out

    def decode_seconds(cache, steps: int = 4) -> float:
        """Seconds a decoded token, over `steps` one-token forwards."""
        start = time.perf_counter()
        for _ in range(steps):
            forward(cache, ids[:, :1])
        _sync(device)
        return (time.perf_counter() - start) / steps

    configure(lm, "memory", native, native, args)
    cache = MemoryKVCache(lm.config, 1, device, dtype, lm.model.rotary.inv_freq)
    chunk = cache.prefill_chunk()
    past = torch.randn(1, cfg.num_kv_heads, args.window + args.retrieved_blocks * args.block_size + 2 * chunk,
                       cfg.head_dim, device=device, dtype=dtype)
    for layer in cache.layers:  # past the window, with more blocks than a query block retrieves: the steady state
        layer.skip(past, past)
    cache.length = past.shape[2]
    forward(cache, ids[:, :chunk])  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(2):
        forward(cache, ids[:, :chunk])
    _sync(device)
    memory_per_token = (time.perf_counter() - start) / (2 * chunk)
    memory_decode = decode_seconds(cache)
    del cache

    configure(lm, "none", native, native, args)
    times = {}
    for n in (native // 4, native // 2):
        cache = KVCache(lm.config, 1, n + 8, device, dtype)
        forward(cache, ids[:, : min(n, 256)])  # warm-up
        times[n] = math.inf
        for _ in range(2):  # the faster of two: other work on the machine only ever adds time
            cache.length = 0
            _sync(device)
            start = time.perf_counter()
            forward(cache, ids[:, :n])
            _sync(device)
            times[n] = min(times[n], time.perf_counter() - start)
        if n == native // 2:
            full_decode = decode_seconds(cache)
        del cache
    (n1, t1), (n2, t2) = times.items()
    # t = a n + b n^2 through both points (b >= 0: at short lengths the quadratic part may not show)
    b = max(0.0, (t2 / n2 - t1 / n1) / (n2 - n1))
    a = max(t1 / n1 - b * n1, 0.0)
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
    return Costs(memory_per_token, a, b, memory_decode, full_decode, kv, DECODE_READ_BYTES_PER_S[device.type],
                 {"full_prefill_s": {str(n): t for n, t in times.items()}})


def plan_cells(args, native: int, costs: Costs, kv_limit: int | None) -> list[Cell]:
    cells: list[Cell] = []
    answer = 12  # decode steps a retrieval prompt takes at most
    # memory-host: the blocks in host memory (the GPU holds sinks, window and what is retrieved); on a CPU it is
    # the same as memory.
    modes = ("full", "memory", "memory-host") if costs.read_bytes_per_s == DECODE_READ_BYTES_PER_S["cuda"] else \
        ("full", "memory")
    for n in args.speed_lengths:
        for mode in modes:
            c = Cell("speed", mode, n)
            memory = mode.startswith("memory")
            c.estimate_s = 1.0 + (args.new_tokens + 2) * costs.decode("memory" if memory else "none", n) \
                + (costs.memory_per_token * n / 20 if memory else 0.0)  # the synthetic fill: copies, no attention
            need = costs.kv_bytes_per_token * (n + args.new_tokens + 8)
            if mode == "full" and kv_limit is not None and need > kv_limit:
                c.not_run = (f"cannot run: full attention's KV cache at {n:,} tokens needs {need / 2**30:.1f} GiB, "
                             f"{kv_limit / 2**30:.1f} GiB free")
            cells.append(c)
    configs = [c for c in args.configs if c == "memory"] + [c for c in args.configs if c != "memory"]
    # Memory attention first (the method measured), then the baselines task by task: a budget cuts the rest.
    order = [(config, task) for config in configs if config == "memory" for task in args.tasks]
    order += [(config, task) for task in args.tasks for config in configs if config != "memory"]
    for config, task in order:
        for n in args.lengths:
            c = Cell("retrieval", config, n, task)
            per_prompt = costs.prefill(config, n) + answer * costs.decode(config, n)
            c.estimate_s = per_prompt * len(args.depths) * args.trials
            c.not_run = _full_limit(config, n, args, costs, kv_limit)
            cells.append(c)
    for config in configs:
        for n in args.ppl_lengths:
            c = Cell("ppl", config, n)
            c.estimate_s = costs.prefill(config, n) * (1.2 if config == "memory" else 1.0)  # all logits scored
            c.not_run = _full_limit(config, n, args, costs, kv_limit)
            cells.append(c)
    return cells


def _full_limit(config: str, n: int, args, costs: Costs, kv_limit: int | None) -> str | None:
    if config == "memory":
        return None
    need = costs.kv_bytes_per_token * n
    if kv_limit is not None and need > kv_limit:
        return f"cannot run: a {n:,}-token KV cache needs {need / 2**30:.1f} GiB, {kv_limit / 2**30:.1f} GiB free"
    if n > args.full_max:
        return (f"not run: past --full-max {args.full_max:,} (full attention's O(L^2) prefill, about "
                f"{costs.full_prefill(n):,.0f} s per prompt here; raise --full-max to run it)")
    return None


def print_plan(cells: list[Cell], args) -> None:
    total = sum(c.estimate_s for c in cells if c.not_run is None)
    print(f"plan ({len(cells)} cells, estimated {total:,.0f} s; budget "
          f"{'none' if args.max_seconds is None else f'{args.max_seconds:,.0f} s'}):", flush=True)
    for c in cells:
        print(f"  {c.name:<36} " + (c.not_run if c.not_run else f"~{c.estimate_s:,.1f} s"), flush=True)


# ---- measurements -------------------------------------------------------------------------------------------------


def measure_retrieval(lm, cell: Cell, args) -> dict:
    from longseq.eval.needle import NeedleConfig, run_needle
    from longseq.eval.passkey import PasskeyConfig, run_passkey

    config_class, run = (PasskeyConfig, run_passkey) if cell.task == "passkey" else (NeedleConfig, run_needle)
    cfg = config_class(lengths=(cell.length,), depths=args.depths, trials=args.trials, seed=args.seed + cell.length)
    report = run(lm, cfg, on_sample=lambda s: print(
        f"    depth {s.depth:.0%}: key {s.key} -> {s.answer} ({'ok' if s.correct else 'wrong'}, {s.seconds:.1f} s)",
        flush=True))
    out = report.to_json()
    return {"accuracy": out["accuracy"], "cells": out["cells"],
            "samples": [(s.depth, s.key, s.answer, round(s.seconds, 2), s.text) for s in report.samples]}


@torch.inference_mode()
def measure_ppl(lm, cell: Cell, args) -> dict:
    from longseq.eval.needle import haystack_ids
    from longseq.eval.perplexity import cached_sequence_nll, sequence_nll
    from longseq.generation.memory_cache import MemoryKVCache

    hay = haystack_ids(lm.tokenizer)
    ids = (list(hay) * (cell.length // len(hay) + 1))[: cell.length]
    if cell.config == "memory":
        cache = MemoryKVCache(lm.config, 1, lm.device, lm.model.lm_head.weight.dtype, lm.model.rotary.inv_freq)
        total, count = cached_sequence_nll(lm.model, ids, cache, cache.prefill_chunk())
    else:
        total, count, _ = sequence_nll(lm.model, ids, cell.length, cell.length)
    return {"nll": total / count, "ppl": math.exp(total / count), "tokens": count}


@torch.inference_mode()
def measure_speed(lm, cell: Cell, native: int, args) -> dict:
    """Decode tok/s after a synthetic context of cell.length tokens, and the peak GPU memory."""
    from longseq.generation import KVCache
    from longseq.generation.memory_cache import MemoryKVCache

    device, dtype, cfg = lm.device, lm.model.lm_head.weight.dtype, lm.config
    total = cell.length + args.new_tokens + 2
    if cell.config.startswith("memory"):
        placement = "host" if cell.config == "memory-host" else args.memory_placement
        settings = argparse.Namespace(**{**vars(args), "memory_placement": placement})
        configure(lm, "memory", cell.length, native, settings)
    else:
        configure(lm, "none", total, native, args)  # full attention, the context raised for speed only
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator(device=device).manual_seed(0)
    if cell.config.startswith("memory"):
        cache = MemoryKVCache(lm.config, 1, device, dtype, lm.model.rotary.inv_freq)
        piece = 1 << 16  # random K/V made a piece at a time: the synthetic context never exists twice
        for start in range(0, cell.length, piece):
            n = min(piece, cell.length - start)
            for layer in cache.layers:
                k = torch.randn(1, cfg.num_kv_heads, n, cfg.head_dim, device=device, dtype=dtype, generator=g)
                layer.skip(k, torch.randn_like(k))
        cache.length = cell.length
    else:
        cache = KVCache(lm.config, 1, total, device, dtype)
        for k, v in zip(cache.k, cache.v, strict=True):
            k.normal_(generator=g)
            v.normal_(generator=g)
        cache.length = cell.length
    token = torch.zeros((1, 1), dtype=torch.long, device=device)

    def step():
        logits = lm.model(token, positions=cache.prepare(1), cache=cache, last_only=True)
        cache.advance(1)
        return logits[:, -1].argmax(-1, keepdim=True)

    for _ in range(2):
        token = step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.new_tokens):
        token = step()
    _sync(device)
    seconds = time.perf_counter() - start
    out = {"decode_tok_s": args.new_tokens / seconds, "ms_per_token": 1e3 * seconds / args.new_tokens,
           "cache_gib": cache.nbytes() / 2**30}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


# ---- results --------------------------------------------------------------------------------------------------


def record(results: dict, cell: Cell, value: dict) -> None:
    key = {"retrieval": f"{cell.task}", "ppl": "ppl", "speed": "speed"}[cell.kind]
    section = results.setdefault(cell.kind, {}).setdefault(cell.config, {})
    section = section.setdefault(key, {}) if cell.kind == "retrieval" else section
    section[str(cell.length)] = value


def _cell_text(value: dict | None, field_name: str, fmt: str) -> str:
    if value is None:
        return ""
    if field_name in value:
        return format(value[field_name], fmt)
    return value.get("not_run", value.get("skipped", value.get("failed", "n/a"))).split(":")[0]


def table(results: dict, args) -> str:
    lines = []
    retrieval = results.get("retrieval", {})
    if retrieval:
        head = ["configuration", "task"] + [_label(n) for n in args.lengths]
        lines += ["## Retrieval accuracy", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for config, tasks in retrieval.items():
            for task, by_length in tasks.items():
                row = [config, task] + [_cell_text(by_length.get(str(n)), "accuracy", ".0%") for n in args.lengths]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    ppl = results.get("ppl", {})
    if ppl:
        head = ["configuration"] + [f"ppl @{_label(n)}" for n in args.ppl_lengths]
        lines += ["## Perplexity (Python docs, one pass)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for config, by_length in ppl.items():
            lines.append("| " + " | ".join([config] + [_cell_text(by_length.get(str(n)), "ppl", ".2f")
                                                      for n in args.ppl_lengths]) + " |")
        lines.append("")
    speed = results.get("speed", {})
    if speed:
        head = ["context", "attention", "decode tok/s", "vs full", "peak GPU GiB", "cache GiB (all devices)"]
        lines += ["## Decode speed and memory (synthetic context)", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        for n in args.speed_lengths:
            full = speed.get("full", {}).get(str(n))
            for mode in speed:
                value = speed[mode].get(str(n))
                ratio = (f"{value['decode_tok_s'] / full['decode_tok_s']:.2f}x" if mode != "full" and full and value
                         and "decode_tok_s" in full and "decode_tok_s" in value else "")
                lines.append("| " + " | ".join([
                    _label(n), mode, _cell_text(value, "decode_tok_s", ".1f"), ratio,
                    _cell_text(value, "peak_gib", ".2f"), _cell_text(value, "cache_gib", ".2f")]) + " |")
        lines.append("")
    notes = [f"- {c}: {v}" for c, v in results.get("notes", {}).items()]
    if notes:
        lines += ["## Cells not run", "", *notes, ""]
    return "\n".join(lines)


def heatmaps(results: dict, args, out: Path, only: tuple[str, str] | None = None) -> None:
    """One heatmap per (configuration, task), or only the one `only` names; none without matplotlib."""
    from longseq.eval.plots import passkey_heatmap

    for config, tasks in results.get("retrieval", {}).items():
        for task, by_length in tasks.items():
            if only is not None and (config, task) != only:
                continue
            grid = []
            for d in args.depths:
                row = []
                for n in args.lengths:
                    cells = by_length.get(str(n), {}).get("cells", [])
                    row.append(next((c["accuracy"] for c in cells if c["depth"] == d), float("nan")))
                grid.append(row)
            try:
                passkey_heatmap(grid, args.lengths, args.depths, out / "heatmaps" / f"{config}-{task}.png",
                                f"{task} · {results['describe'].get(config, config)}", task)
            except ImportError:  # a GPU box without matplotlib still gets every number
                return


# ---- main ----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    from longseq.eval.cli import _percent_list, _token_list

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=("cpu", "h200"), default=None, help="defaults for the flags below (cpu unless "
                   "the device is cuda)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model: every path in seconds (smoke test)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--tasks", default="passkey,needle")
    p.add_argument("--lengths", type=_token_list, default=None)
    p.add_argument("--depths", type=_percent_list, default=None)
    p.add_argument("--trials", type=int, default=None, help="prompts (keys) per (length, depth) cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full-max", type=_token_list, default=None, help="longest context full attention runs at")
    p.add_argument("--ppl-lengths", type=_token_list, default=None)
    p.add_argument("--speed-lengths", type=_token_list, default=None)
    p.add_argument("--new-tokens", type=int, default=None, help="decode steps timed per speed cell")
    p.add_argument("--sink-tokens", type=int, default=None)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--retrieved-blocks", type=int, default=None)
    p.add_argument("--memory-placement", default="gpu", choices=("gpu", "host"))
    p.add_argument("--max-seconds", type=float, default=None, help="time budget: cells whose estimate no longer "
                   "fits are skipped, with a note")
    p.add_argument("--plan-only", action="store_true", help="calibrate, print the plan and stop")
    p.add_argument("--no-calibrate", action="store_true", help="skip the start-up timings (no estimates, no budget)")
    args = p.parse_args(argv)
    from longseq.models.loader import resolve_device

    device = resolve_device(args.device)
    preset = PRESETS["tiny" if args.tiny else args.preset or ("h200" if device.type == "cuda" else "cpu")]
    defaults = {**MEMORY_DEFAULTS, **preset}
    parsers = {"lengths": _token_list, "depths": _percent_list, "ppl_lengths": _token_list,
               "speed_lengths": _token_list, "full_max": _token_list}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, parsers[key](value) if key in parsers else value)
    args.full_max = args.full_max[0] if isinstance(args.full_max, tuple) else args.full_max
    args.configs = [c for c in args.configs.split(",") if c]
    args.tasks = [t for t in args.tasks.split(",") if t]
    for c in args.configs:
        if c not in CONFIGS:
            p.error(f"unknown configuration {c!r}; use {', '.join(CONFIGS)}")
    for t in args.tasks:
        if t not in ("passkey", "needle"):
            p.error(f"unknown task {t!r}; use passkey, needle")
    return args


def main(argv=None) -> int:
    from longseq.errors import LongseqError
    from longseq.eval.io import write_json, write_text

    args = parse_args(argv)
    out = Path(args.out)
    began = time.perf_counter()
    lm = load_model(args)
    device = lm.device
    native = lm.config.rope.original_max_position_embeddings or lm.config.max_seq_len
    results = {
        "date": date.today().isoformat(), "command": " ".join(sys.argv) if argv is None else " ".join(argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": sys.version.split()[0], "model": str(lm.path),
        "model_name": "tiny random" if args.tiny else "SmolLM2-135M", "native_context": native,
        "dtype": str(lm.model.lm_head.weight.dtype).removeprefix("torch."),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "describe": {c: describe(c, max(args.lengths), native, args) for c in args.configs},
    }
    if args.no_calibrate:  # no timings: every estimate is 0 and --max-seconds skips nothing
        costs = Costs(0.0, 0.0, 0.0, 0.0, 0.0, 0, DECODE_READ_BYTES_PER_S[device.type])
    else:
        print(f"calibrating on {results['device']} ...", flush=True)
        costs = calibrate(lm, native, args)
    results["calibration"] = {k: v for k, v in vars(costs).items()}
    kv_limit = None
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        kv_limit = int(free * 0.9)
    cells = plan_cells(args, native, costs, kv_limit)
    print_plan(cells, args)
    results["plan"] = [{"cell": c.name, "estimate_s": round(c.estimate_s, 2), "not_run": c.not_run} for c in cells]
    notes = results.setdefault("notes", {})

    def save():
        results["seconds"] = time.perf_counter() - began
        write_json(out / "results.json", results)
        write_text(out / "table.md", table(results, args))

    save()
    if args.plan_only:
        return 0
    for cell in cells:
        if cell.not_run is not None:
            record(results, cell, {"not_run": cell.not_run})
            notes[cell.name] = cell.not_run
            save()
            continue
        left = None if args.max_seconds is None else args.max_seconds - (time.perf_counter() - began)
        if left is not None and cell.estimate_s > left:
            reason = f"skipped: budget (estimated {cell.estimate_s:,.0f} s, {max(left, 0):,.0f} s left)"
            record(results, cell, {"skipped": reason})
            notes[cell.name] = reason
            save()
            print(f"{cell.name}: {reason}", flush=True)
            continue
        print(f"{cell.name} (estimated {cell.estimate_s:,.1f} s):", flush=True)
        start = time.perf_counter()
        try:
            if cell.kind == "speed":
                value = measure_speed(lm, cell, native, args)
            else:
                configure(lm, cell.config, cell.length, native, args)
                value = measure_retrieval(lm, cell, args) if cell.kind == "retrieval" else measure_ppl(lm, cell, args)
        except (LongseqError, torch.OutOfMemoryError) as e:
            value = {"failed": f"failed: {str(e).splitlines()[0]}"}
            notes[cell.name] = value["failed"]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        value["seconds"] = time.perf_counter() - start
        value["estimate_s"] = cell.estimate_s
        print(f"  -> {', '.join(f'{k} {v:.4g}' for k, v in value.items() if isinstance(v, float))}", flush=True)
        record(results, cell, value)
        if cell.kind == "retrieval":  # redrawn after each cell: a run cut short keeps its heatmaps
            heatmaps(results, args, out, only=(cell.config, cell.task))
        save()
    heatmaps(results, args, out)
    save()
    print(table(results, args))
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'heatmaps'} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
