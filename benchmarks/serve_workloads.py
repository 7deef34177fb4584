"""Serving workloads (issue 21): one engine, named workloads, each measured with throughput, TTFT and TPOT.

    PYTHONUNBUFFERED=1 PYTHONPATH=src python benchmarks/serve_workloads.py --out DIR            # all, H200 scale
    PYTHONUNBUFFERED=1 PYTHONPATH=src python benchmarks/serve_workloads.py --quick --out DIR    # 200 requests
    PYTHONPATH=src python benchmarks/serve_workloads.py --tiny --out /tmp/smoke                 # CPU smoke run

Model: the Llama-3-8B shape with random bf16 weights (on CUDA; `--tiny`: a 2-layer random model in float32, CPU),
max_position_embeddings raised to what the selected workloads need (RoPE unchanged: this is a speed benchmark).
One LLMEngine (max_num_seqs 256, max_num_batched_tokens 8192, KV pool from measured memory) is built once and
serves every workload; max_model_len = the longest request of the selected workloads. Prompts are random token ids
(NullTokenizer: no text), EOS ignored everywhere, and every workload draws its own prompt tokens (so no workload
hits the prefix cache with another's prompts).

Workloads (`--requests N`, default 1000; `--quick` 200):
  greedy           (a) N x 256 in / 256 out, greedy: the headline.
  sampled-t1       (b) the same, temperature 1.0.
  sampled-t07-p09  (b) the same, temperature 0.7, top_p 0.9.
  chat-mix         (c) N chat-like requests: input lengths lognormal(median 300, sigma 1.0) clipped to [16, 4096]
                   (mean 455 at N = 1000), output lengths lognormal(median 150, sigma 0.8) clipped to [8, 1024]
                   (mean 205),
                   the rough shape of ShareGPT conversations; temperature 0.7; 10% of the requests seeded, 5% with
                   presence 0.5 / frequency 0.3 penalties, 5% asking for logprobs (top 5), disjoint; seed fixed
                   (--seed), so every run gets the same lengths and parameters.
  long-context     (d) N/5 chat-mix requests (at most max_num_seqs - 2), all submitted at once; once every one of
                   them has its first token (they are decoding), a 32K-token prompt arrives, and once that one has
                   its first token a 128K-token prompt (128 output tokens each). Reported: each long prompt's TTFT
                   (and prefill tok/s, model TFLOP/s counting causal attention), and the short requests' TPOT
                   while it was being prefilled (their token intervals inside [long arrival, long first token]).
  chat-mix-http    (e) chat-mix's lengths and parameters (its own prompt tokens) through the HTTP server as
                   `longseq serve` runs it: over this process's engine on a thread (AsyncLLMEngine; --engine-process:
                   the engine in a process of its own, EngineCoreClient, the same engine built and warmed up there,
                   run first so that the GPU is its alone), create_app and uvicorn in this process on a free port;
                   the official `openai`
                   client (AsyncOpenAI) in --http-clients separate processes (clients parsing SSE in the server's
                   process would take the GIL from the server), every request in flight at once (or
                   --http-concurrency per process), streaming /v1/completions with token-id prompts, max_tokens as
                   drawn, `ignore_eos` as extra_body (longseq's server accepts it, as vLLM), stream_options
                   include_usage for the exact output token count. TTFT and TPOT from the client side.
  batch1           (not in the default set) one request alone, batch-1 decode against the copy-bandwidth bound
                   (serve_throughput.batch1_decode).
Aliases: a, b, c, d, e (b: both sampled workloads), all.

Per workload: tok/s = (input + output tokens) / wall time, output tok/s, per request TTFT = first token - arrival,
TPOT = (finish - first token) / (output tokens - 1) (requests with >= 2 output tokens), p50 / p99 by nearest rank;
engine stats (steps, steps launched ahead, preemptions, KV blocks, peak KV usage). Offline workloads submit every
request at once to LLMEngine and step it on this thread; this process builds that engine when the first of them
runs.

Time (--plan-only prints the plan and runs nothing): on an H200 at issue 21's targets (20K tok/s greedy, sampled
>= 95% of it, chat-mix 18K, HTTP >= 90% of chat-mix, 128K TTFT <= 12 s) the default run takes about 5 minutes,
a minute of start-up included (two with --engine-process: that engine, then this process's; --quick: about 3). At
the speeds issue 21 measured (sampling 4.2K tok/s) it would take 13.5, so each workload is cut off after
--cap-factor (2) x its time at target (at least 30 s; 75 s for long-context): its unfinished requests are aborted
and its row is marked truncated (throughput over the tokens done, latency over the requests that got that far).
That makes about 8 minutes, at most 8.7; --max-seconds (default 540) bounds the whole run. Output is flushed after
each workload, and DIR/workloads.json and DIR/workloads.md are rewritten (temp file + rename) after each, so a run
killed by a time limit keeps what finished. --tiny: a 2-layer model on the CPU, 16 requests, long prompts of 1024
and 4096 tokens, max_num_batched_tokens 1024, no cut-offs (a minute or two).

chat-mix-http needs fastapi, uvicorn, pydantic and openai importable (in this process and the clients'); where one
is missing the run says so at start and records the workload as skipped. --commit records the commit where the
tree has no .git (a copied working tree).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from longseq.eval.io import write_text

HERE = Path(__file__).resolve().parent

DEFAULT_WORKLOADS = ["greedy", "sampled-t1", "sampled-t07-p09", "chat-mix", "long-context", "chat-mix-http"]
ALL_WORKLOADS = DEFAULT_WORKLOADS + ["batch1"]
ALIASES = {"a": ["greedy"], "b": ["sampled-t1", "sampled-t07-p09"], "c": ["chat-mix"], "d": ["long-context"],
           "e": ["chat-mix-http"], "all": DEFAULT_WORKLOADS}
FIXED = {"greedy": (0.0, 1.0), "sampled-t1": (1.0, 1.0), "sampled-t07-p09": (0.7, 0.9)}  # temperature, top_p
SALT = {name: i + 1 for i, name in enumerate(ALL_WORKLOADS)}  # each workload's own prompt tokens

# Chat-mix: lognormal lengths (median, sigma, clip) and the shares of special requests.
CHAT_INPUT = (300, 1.0, 16, 4096)
CHAT_OUTPUT = (150, 0.8, 8, 1024)
CHAT_TEMPERATURE = 0.7
CHAT_SEEDED, CHAT_PENALTY, CHAT_LOGPROBS = 0.10, 0.05, 0.05
PENALTIES = dict(presence_penalty=0.5, frequency_penalty=0.3)
TOP_LOGPROBS = 5

# tok/s (input + output) for the time estimate: issue 21's targets on one H200, and what it measured there (the
# chat-mix figures are guesses from its sampled and mixed-length rows; HTTP at 90% of offline).
TARGET_RATE = {"greedy": 20000, "sampled-t1": 19000, "sampled-t07-p09": 19000, "chat-mix": 18000,
               "long-context": 18000, "chat-mix-http": 16200}
ISSUE_RATE = {"greedy": 20614, "sampled-t1": 4208, "sampled-t07-p09": 4208, "chat-mix": 4000, "long-context": 4000,
              "chat-mix-http": 3600}
LONG_TTFT_TARGET = {32768: 1.5, 131072: 12.0}  # seconds
LONG_TTFT_ISSUE = {32768: 2.15, 131072: 22.4}
STARTUP_ESTIMATE_S = 60  # imports, model fill, GEMV timing, KV pool, graph capture, Triton compiles, warm-up
HTTP_OVERHEAD_S = 20  # chat-mix-http: the server's start, the client processes' start and warm-up (--http-warmup)

TINY_SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
                  rope_parameters=dict(rope_type="default", rope_theta=500000.0))


def log(msg: str) -> None:
    print(msg, flush=True)


# ---- requests (pure Python + numpy: the HTTP client processes build the same ones) ----------------------------


def fixed_specs(n: int, in_len: int, out_len: int, temperature: float, top_p: float) -> list[dict]:
    return [dict(prompt_len=in_len, max_tokens=out_len, temperature=temperature, top_p=top_p) for _ in range(n)]


def lognormal_lengths(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int) -> list[int]:
    return np.clip(np.rint(rng.lognormal(math.log(median), sigma, n)), lo, hi).astype(int).tolist()


def chat_mix_specs(n: int, seed: int, inp=CHAT_INPUT, outp=CHAT_OUTPUT) -> list[dict]:
    """The chat-mix requests: lengths and sampling parameters, in arrival order (see the module docstring).
    inp, outp: (median, sigma, min, max) of the input and output lengths."""
    rng = np.random.default_rng(seed)
    ins = lognormal_lengths(rng, n, *inp)
    outs = lognormal_lengths(rng, n, *outp)
    order = rng.permutation(n).tolist()
    n_seed, n_pen, n_lp = (round(n * share) for share in (CHAT_SEEDED, CHAT_PENALTY, CHAT_LOGPROBS))
    seeded, penalised = set(order[:n_seed]), set(order[n_seed : n_seed + n_pen])
    logprobs = set(order[n_seed + n_pen : n_seed + n_pen + n_lp])
    seeds = rng.integers(0, 2**31 - 1, n).tolist()
    specs = []
    for i in range(n):
        s = dict(prompt_len=ins[i], max_tokens=outs[i], temperature=CHAT_TEMPERATURE, top_p=1.0)
        if i in seeded:
            s["seed"] = seeds[i]
        if i in penalised:
            s.update(PENALTIES)
        if i in logprobs:
            s["logprobs"] = TOP_LOGPROBS
        specs.append(s)
    return specs


def prompt_tokens(specs: list[dict], vocab: int, seed: int, salt: int) -> list[list[int]]:
    rng = np.random.default_rng([seed, salt])
    return [rng.integers(0, vocab, s["prompt_len"]).tolist() for s in specs]


def spec_tokens(specs: list[dict]) -> int:
    return sum(s["prompt_len"] + s["max_tokens"] for s in specs)


def describe_chat_mix(inp=CHAT_INPUT, outp=CHAT_OUTPUT) -> str:
    (im, isg, ilo, ihi), (om, osg, olo, ohi) = inp, outp
    return (f"input lognormal(median {im}, sigma {isg}) clipped to [{ilo}, {ihi}], output lognormal(median {om}, "
            f"sigma {osg}) clipped to [{olo}, {ohi}]; temperature {CHAT_TEMPERATURE}; {CHAT_SEEDED:.0%} seeded, "
            f"{CHAT_PENALTY:.0%} with presence {PENALTIES['presence_penalty']} / frequency "
            f"{PENALTIES['frequency_penalty']} penalties, {CHAT_LOGPROBS:.0%} with logprobs (top {TOP_LOGPROBS}); "
            "ignore_eos")


# ---- statistics ----------------------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float] | None:
    """Milliseconds: p50 and p99 by nearest rank, the mean and the max; None without values."""
    if not values:
        return None
    xs = sorted(values)
    p50, p99 = (xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] for q in (0.5, 0.99))
    return {"p50": round(p50 * 1e3, 2), "p99": round(p99 * 1e3, 2), "mean": round(sum(xs) / len(xs) * 1e3, 2),
            "max": round(xs[-1] * 1e3, 2)}


def summarize(recs: list[dict], wall: float, truncated: bool) -> dict:
    """recs: per request prompt_len, asked, out, arrival, first, end (finish or last token time), finished."""
    started = [r for r in recs if r["first"] is not None]
    done = [r for r in recs if r["finished"]]
    # A truncated run counts the prompts that were fully prefilled (they have a first token) and every output
    # token: prefill chunks of requests cut off before their first token are left out (an underestimate).
    in_tokens = sum(r["prompt_len"] for r in started)
    out_tokens = sum(r["out"] for r in recs)
    ttft = [r["first"] - r["arrival"] for r in started]
    tpot = [(r["end"] - r["first"]) / (r["out"] - 1) for r in started if r["out"] >= 2]
    return {
        "requests": len(recs), "finished": len(done), "truncated": truncated, "seconds": round(wall, 2),
        "input_tokens": in_tokens, "output_tokens": out_tokens,
        "tokens_per_s": round((in_tokens + out_tokens) / wall, 1) if wall > 0 else None,
        "output_tokens_per_s": round(out_tokens / wall, 1) if wall > 0 else None,
        "ttft_ms": percentiles(ttft), "tpot_ms": percentiles(tpot),
        "short_outputs": sum(r["out"] != r["asked"] for r in done),  # finished before max_tokens (EOS, stop)
        # Per request, in submission order (None: no first token, or fewer than 2 tokens).
        "per_request": {
            "prompt_len": [r["prompt_len"] for r in recs], "output_tokens": [r["out"] for r in recs],
            "ttft_ms": [None if r["first"] is None else round((r["first"] - r["arrival"]) * 1e3, 2) for r in recs],
            "tpot_ms": [round((r["end"] - r["first"]) / (r["out"] - 1) * 1e3, 3)
                        if r["first"] is not None and r["out"] >= 2 else None for r in recs],
        },
    }


# ---- the engine ----------------------------------------------------------------------------------------------


class Probe:
    """Engine counters over one workload: steps (as the caller counts them), steps launched ahead, preemptions,
    peak KV usage and running sequences."""

    def __init__(self, engine):
        self.engine = engine
        self.ahead0, self.preempted0 = engine.num_steps_ahead, engine.scheduler.num_preempted
        self.steps, self.peak_usage, self.peak_running = 0, 0.0, 0

    def after_step(self) -> None:
        self.steps += 1
        self.peak_usage = max(self.peak_usage, self.engine.blocks.usage)
        self.peak_running = max(self.peak_running, len(self.engine.scheduler.running))

    def result(self) -> dict:
        e = self.engine
        return {"steps": self.steps, "steps_launched_ahead": e.num_steps_ahead - self.ahead0,
                "preempted": e.scheduler.num_preempted - self.preempted0, "kv_blocks": e.blocks.num_blocks,
                "peak_kv_usage": round(self.peak_usage, 4), "peak_running": self.peak_running}


def model_shape(args, max_model_len: int) -> dict:
    from serve_throughput import LLAMA3_8B

    shape = dict(TINY_SHAPE if args.tiny else LLAMA3_8B)
    # Room for the longest request; RoPE unchanged (random weights: positions past 8K are as good as any).
    shape["max_position_embeddings"] = max(shape["max_position_embeddings"], max_model_len)
    return shape


def build_model(shape: dict, device, dtype):
    """Our CausalLM with random weights, built on `meta` and filled in place (as train_speed.random_llama3_8b)."""
    import torch

    from longseq.config.hf import from_hf
    from longseq.models.llama import CausalLM

    torch.manual_seed(0)
    with torch.device("meta"):
        model = CausalLM(from_hf({"model_type": "llama", **shape})).to(dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    model.rotary.reset(device)
    return model.eval()


def matmul_params(shape: dict) -> int:
    """Parameters a token's forward multiplies by (all but the input embedding), for model FLOPs."""
    d, inter, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    hd = d // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    return L * (2 * d * q + 2 * d * kv + 3 * d * inter) + d * shape["vocab_size"]


def prefill_flops(shape: dict, n: int) -> float:
    """2 N S for the matmuls + causal attention (QK^T and PV over half the S x S scores): 2 L d S^2."""
    return 2 * matmul_params(shape) * n + 2 * shape["num_hidden_layers"] * shape["hidden_size"] * n * n


def engine_env(engine, cfg, device, dtype, shape, commit: str | None = None) -> dict:
    import torch

    from longseq.attention.paged import use_decode_kernel
    from longseq.models import fused

    cpu = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
           "python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "transformers", "fastapi", "uvicorn", "openai"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    try:
        import importlib.util

        env["flash_attn_4_installed"] = importlib.util.find_spec("flash_attn") is not None
    except Exception:
        env["flash_attn_4_installed"] = None
    env["commit"] = commit or git_commit()
    env["fused_kernels"] = fused.available()
    env["paged_decode_kernel"] = use_decode_kernel(device, shape["hidden_size"] // shape["num_attention_heads"])
    env["dtype"] = str(dtype).replace("torch.", "")
    env["model_shape"] = shape
    env["engine_config"] = dataclasses.asdict(cfg)
    env["max_model_len"] = engine.max_model_len
    env["kv_blocks"] = engine.blocks.num_blocks
    env["kv_block_size"] = cfg.kv_block_size
    env["gemv"] = getattr(engine.runner, "gemv_report", None)
    env["cuda_graphs"] = getattr(engine.runner, "use_graphs", None)
    return env


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")
    except Exception:
        pass
    return None


def sampling_params(spec: dict, ignore_eos: bool = True):
    from longseq.generation.sampling import SamplingParams

    return SamplingParams(max_new_tokens=spec["max_tokens"], temperature=spec["temperature"], top_p=spec["top_p"],
                          seed=spec.get("seed"), presence_penalty=spec.get("presence_penalty", 0.0),
                          frequency_penalty=spec.get("frequency_penalty", 0.0), logprobs=spec.get("logprobs"),
                          ignore_eos=ignore_eos)


def drive(engine, requests: list[tuple[list[int], object]], cap_s: float, hook=None, token_times: bool = False,
          tags: list[str] | None = None) -> tuple[list[dict], float, bool, Probe]:
    """Submit every request at once and step the engine until all finish (or `cap_s` passes: then the rest are
    aborted). hook(add, recs), after each step, may add requests (add(prompt, params, tag) -> request id) and says
    by `hook.pending` whether it still will. Returns per-request records, wall seconds, truncated, the probe."""
    probe = Probe(engine)
    recs: dict[str, dict] = {}

    def add(prompt: list[int], params, tag: str | None = None) -> str:
        rid = engine.add_request(prompt, params)
        recs[rid] = dict(prompt_len=len(prompt), asked=params.max_new_tokens, out=0, arrival=time.monotonic(),
                         first=None, end=None, finished=False, reason=None, tag=tag,
                         times=[] if token_times else None)
        return rid

    t0 = time.monotonic()
    for i, (prompt, params) in enumerate(requests):
        add(prompt, params, tags[i] if tags else None)
    truncated = False
    while True:
        if hook is not None:
            hook(add, recs)
        if not engine.has_unfinished():
            if hook is None or not hook.pending:
                break
            continue
        outs = engine.step()
        now = time.monotonic()
        probe.after_step()
        for o in outs:
            r = recs[o.request_id]
            r["out"] = len(o.token_ids)
            m = o.metrics
            r["arrival"] = m.get("arrival", r["arrival"])
            if r["first"] is None:
                r["first"] = m.get("first_token", now)
            r["end"] = m.get("finished", now)
            if r["times"] is not None:
                r["times"].append(now)
            if o.finished:
                r["finished"], r["reason"] = o.finish_reason != "abort", o.finish_reason
        if now - t0 > cap_s:
            truncated = True
            for rid in list(engine.seqs):
                engine.abort(rid)
            while engine.has_unfinished():  # nothing should be left; never spin on it
                engine.step()
            break
    sync(engine)
    wall = time.monotonic() - t0
    return list(recs.values()), wall, truncated, probe


def sync(engine) -> None:
    import torch

    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize(engine.runner.device)


# ---- workloads -----------------------------------------------------------------------------------------------


class Context:
    """What every workload needs: the engine, the model's shape, the run's options."""

    def __init__(self, args, engine, model, shape):
        self.args, self.engine, self.model, self.shape = args, engine, model, shape
        self.vocab = shape["vocab_size"]

    def tokens(self, specs: list[dict], name: str) -> list[list[int]]:
        return prompt_tokens(specs, self.vocab, self.args.seed, SALT[name])


def workload_specs(name: str, args) -> list[dict]:
    if name in FIXED:
        return fixed_specs(args.requests, args.fixed_len, args.fixed_len, *FIXED[name])
    if name in ("chat-mix", "chat-mix-http"):
        return chat_mix_specs(args.requests, args.seed, *args.chat)
    if name == "long-context":
        return chat_mix_specs(num_short(args), args.seed + 1, *args.chat)
    return []


def num_short(args) -> int:
    return max(2, min(args.requests // 5, args.max_num_seqs - 2))


def run_offline(ctx: Context, name: str, cap_s: float) -> dict:
    specs = workload_specs(name, ctx.args)
    reqs = list(zip(ctx.tokens(specs, name), [sampling_params(s) for s in specs], strict=True))
    recs, wall, truncated, probe = drive(ctx.engine, reqs, cap_s)
    res = summarize(recs, wall, truncated)
    res["engine"] = probe.result()
    if name in FIXED:
        n = ctx.args.fixed_len
        res["workload"] = f"{n} in / {n} out, temperature {FIXED[name][0]}, top_p {FIXED[name][1]}, ignore_eos"
    else:
        res["workload"] = describe_chat_mix(*ctx.args.chat)
        res["mix"] = mix_counts(specs)
    return res


def mix_counts(specs: list[dict]) -> dict:
    return {"seeded": sum("seed" in s for s in specs), "penalties": sum("presence_penalty" in s for s in specs),
            "logprobs": sum("logprobs" in s for s in specs),
            "mean_input": round(sum(s["prompt_len"] for s in specs) / len(specs), 1),
            "mean_output": round(sum(s["max_tokens"] for s in specs) / len(specs), 1),
            "max_input": max(s["prompt_len"] for s in specs), "max_output": max(s["max_tokens"] for s in specs)}


class LongArrivals:
    """long-context's arrivals: the first long prompt once every short request has its first token, each next one
    once the previous long prompt has its first token."""

    def __init__(self, prompts: list[list[int]], params):
        self.queue = list(prompts)
        self.params = params
        self.long_ids: list[str] = []

    @property
    def pending(self) -> bool:
        return bool(self.queue)

    def __call__(self, add, recs: dict) -> None:
        if not self.queue:
            return
        if self.long_ids:
            ready = recs[self.long_ids[-1]]["first"] is not None
        else:
            ready = all(r["first"] is not None for r in recs.values() if r["tag"] == "short")
        if ready:
            self.long_ids.append(add(self.queue.pop(0), self.params, f"long-{len(self.long_ids)}"))


def window_stats(shorts: list[dict], lo: float, hi: float) -> dict:
    """The short requests' tokens that came out in [lo, hi]: per request (last - first) / (n - 1) over them, and
    every interval between two of them."""
    per_request, intervals, active = [], [], 0
    for r in shorts:
        ts = [t for t in r["times"] if lo <= t <= hi]
        if ts:
            active += 1
        if len(ts) >= 2:
            per_request.append((ts[-1] - ts[0]) / (len(ts) - 1))
            intervals += [b - a for a, b in zip(ts, ts[1:], strict=False)]
    return {"short_requests_decoding": active, "short_tpot_ms": percentiles(per_request),
            "short_intertoken_ms": percentiles(intervals)}


def run_long_context(ctx: Context, cap_s: float) -> dict:
    args, name = ctx.args, "long-context"
    specs = workload_specs(name, args)
    reqs = list(zip(ctx.tokens(specs, name), [sampling_params(s) for s in specs], strict=True))
    rng = np.random.default_rng([args.seed, SALT[name], 7])
    longs = [rng.integers(0, ctx.vocab, n).tolist() for n in args.long_lens]
    from longseq.generation.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=args.long_output, temperature=CHAT_TEMPERATURE, ignore_eos=True)
    hook = LongArrivals(longs, params)
    recs, wall, truncated, probe = drive(ctx.engine, reqs, cap_s, hook=hook, token_times=True,
                                         tags=["short"] * len(reqs))
    shorts = [r for r in recs if r["tag"] == "short"]
    res = summarize(recs, wall, truncated)
    res["short_requests"] = summarize(shorts, wall, truncated)
    res["engine"] = probe.result()
    res["workload"] = (f"{len(shorts)} chat-mix requests ({describe_chat_mix(*args.chat)}) at once; then "
                       f"prompts of {', '.join(map(str, args.long_lens))} tokens ({args.long_output} out each), "
                       "each arriving once the shorts (then the previous long prompt) have their first token")
    res["long_prompts"] = []
    for r in sorted((r for r in recs if r["tag"] and r["tag"].startswith("long")), key=lambda r: r["tag"]):
        n = r["prompt_len"]
        row = {"prompt_len": n, "output_tokens": r["out"], "finished": r["finished"]}
        if r["first"] is not None:
            ttft = r["first"] - r["arrival"]
            row.update(ttft_s=round(ttft, 3), prefill_tokens_per_s=round(n / ttft, 1),
                       model_tflops=round(prefill_flops(ctx.shape, n) / ttft / 1e12, 3))
            row.update(window_stats(shorts, r["arrival"], r["first"]))
            if r["out"] >= 2:
                row["decode_tokens_per_s"] = round((r["out"] - 1) / (r["end"] - r["first"]), 1)
        else:
            row["ttft_s"] = None  # cut off (truncated) before its first token
        res["long_prompts"].append(row)
    res["long_prompts_submitted"] = len(hook.long_ids)
    return res


def run_batch1(ctx: Context, cap_s: float) -> dict:
    from serve_throughput import batch1_decode

    if ctx.engine.runner.device.type != "cuda" or ctx.args.bandwidth is None:
        return {"skipped": "batch1 needs a CUDA device (copy bandwidth bound)"}
    prompt = prompt_tokens([dict(prompt_len=128)], ctx.vocab, ctx.args.seed, SALT["batch1"])[0]
    return batch1_decode(ctx.engine, ctx.model, prompt, 256, ctx.args.bandwidth)


# ---- HTTP ----------------------------------------------------------------------------------------------------


def http_missing() -> str | None:
    """The packages the HTTP workload needs that this Python lacks (None: all there)."""
    missing = []
    for mod in ("fastapi", "uvicorn", "openai", "pydantic"):
        try:
            __import__(mod)
        except Exception:
            missing.append(mod)
    return ", ".join(missing) or None


def run_http(ctx: Context, cap_s: float) -> dict:
    """chat-mix-http over this process's engine, on a thread of the server, as `longseq serve` runs it."""
    missing = http_missing()
    if missing:
        return {"skipped": f"missing Python packages: {missing}"}
    from longseq.engine.async_engine import AsyncLLMEngine

    engine = ctx.engine
    probes: list[Probe] = []
    step = engine.step

    def counted_step():  # on the engine thread
        outs = step()
        if probes:
            probes[-1].after_step()
        return outs

    engine.step = counted_step  # an instance attribute over the method, removed below
    aengine = AsyncLLMEngine(engine, "random")
    try:
        result = http_workload(ctx.args, ctx.vocab, aengine, lambda: probes.append(Probe(engine)) or probes[-1],
                               cap_s)
    finally:
        aengine.shutdown()
        del engine.step
    result["server"] = "the engine on a thread of the server's process (AsyncLLMEngine, as `longseq serve` runs it)"
    return result


def run_http_process(args, vocab: int, make_engine, cap_s: float) -> dict:
    """chat-mix-http as `longseq serve --engine-process` runs it: the engine (built and warmed up by `make_engine`)
    in a process of its own, the server over an EngineCoreClient."""
    missing = http_missing()
    if missing:
        return {"skipped": f"missing Python packages: {missing}"}
    from longseq.engine.core_client import EngineCoreClient

    t0 = time.monotonic()
    client = EngineCoreClient(make_engine, "random")
    startup = round(time.monotonic() - t0, 1)
    log(f"engine process: {client.info['num_kv_blocks']} KV blocks, start-up (model, engine, warm-up) {startup} s")
    try:
        result = http_workload(args, vocab, client, lambda: StatsProbe(client), cap_s)
    finally:
        client.shutdown()
    result["server"] = ("the engine in a process of its own (EngineCoreClient, as `longseq serve --engine-process`); "
                        f"its start-up {startup} s, before any other workload")
    return result


class StatsProbe:
    """Probe's counters for an engine in its own process, from its stats: steps and preemptions as it counts
    them, peak KV usage and running sequences sampled every 50 ms."""

    def __init__(self, client):
        import threading

        self.client, self.start = client, client.stats()
        self.peak_usage, self.peak_running = 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            s = self.client.stats()
            self.peak_usage = max(self.peak_usage, s["kv_cache_usage"])
            self.peak_running = max(self.peak_running, s["num_running"])

    def result(self) -> dict:
        self._stop.set()
        self._thread.join()
        s, s0 = self.client.stats(), self.start
        return {"steps": s["num_steps"] - s0["num_steps"],
                "steps_launched_ahead": s["num_steps_ahead"] - s0["num_steps_ahead"],
                "preempted": s["num_preempted"] - s0["num_preempted"], "kv_blocks": self.client.info["num_kv_blocks"],
                "peak_kv_usage": round(self.peak_usage, 4), "peak_running": self.peak_running,
                "peaks": "sampled every 50 ms"}


def http_workload(args, vocab: int, frontend, new_probe, cap_s: float) -> dict:
    """chat-mix-http through create_app over `frontend` (AsyncLLMEngine or EngineCoreClient); new_probe() starts
    the engine counters once the clients have warmed up."""
    from longseq.serve.app import create_app
    from longseq.serve.background import running

    name = "chat-mix-http"
    specs = workload_specs(name, args)
    clients = min(args.http_clients, len(specs))
    procs: list[subprocess.Popen] = []
    out_dir = Path(args.out)
    try:
        with running(create_app(frontend), start_timeout=60) as url:
            for shard in range(clients):
                cfg = dict(url=url, n=len(specs), seed=args.seed, chat=args.chat, salt=SALT[name], vocab=vocab,
                           shard=shard, shards=clients, concurrency=args.http_concurrency, cap_s=cap_s,
                           warmup=args.http_warmup,
                           out=str(out_dir / f".http_client_{shard}.json"))
                procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--http-client",
                                               json.dumps(cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              text=True))
            for p in procs:  # each warms up (two short requests) and says "ready"
                line = readline(p, timeout=300)
                if line != "ready":
                    raise RuntimeError(f"an HTTP client process did not start (said {line!r}, exit {p.poll()})")
            probe = new_probe()
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
            for p in procs:
                p.wait(timeout=cap_s + 120 if math.isfinite(cap_s) else None)
                if p.returncode != 0:
                    raise RuntimeError(f"an HTTP client process failed (exit {p.returncode})")
            engine_counts = probe.result()
            shards = [json.loads((out_dir / f".http_client_{s}.json").read_text()) for s in range(clients)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for s in range(clients):
            (out_dir / f".http_client_{s}.json").unlink(missing_ok=True)
    recs = [r for s in shards for r in s["requests"]]
    wall = max(s["end"] for s in shards) - min(s["start"] for s in shards)
    truncated = any(s["truncated"] for s in shards)
    if not any(r["first"] for r in recs):
        raise RuntimeError(f"no request got a token; errors: {[e for s in shards for e in s['error_examples']][:2]}")
    result = summarize(recs, wall, truncated)
    result["errors"] = sum(s["errors"] for s in shards)
    result["error_examples"] = [e for s in shards for e in s["error_examples"]][:3]
    result["engine"] = engine_counts
    result["workload"] = describe_chat_mix(*args.chat) + " (chat-mix's lengths and parameters, its own prompt tokens)"
    result["mix"] = mix_counts(specs)
    result["client"] = (f"openai {__import__('openai').__version__} AsyncOpenAI, {clients} client process(es), "
                        + (f"at most {args.http_concurrency} requests in flight per process"
                           if args.http_concurrency else "every request in flight at once")
                        + ", streaming /v1/completions, token-id prompts, extra_body ignore_eos, include_usage"
                        + (f"; warmed up first with {args.http_warmup} chat-mix requests of their own (not timed)"
                           if args.http_warmup else ""))
    result["ignore_eos"] = "sent as extra_body (longseq's server supports it, as vLLM); output counts from usage"
    return result


def readline(p: subprocess.Popen, timeout: float) -> str | None:
    """The process's next stdout line, stripped; None if none came within `timeout` seconds."""
    import threading

    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(p.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return got[0].strip() if got else None


def raise_open_files() -> None:
    """Every connection is a file descriptor: 1000 streams in flight need more than a common soft limit of 1024."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except Exception as e:  # not fatal: the run says so if connections fail
        log(f"could not raise the open-files limit: {e}")


def client_main(cfg: dict) -> None:
    """An HTTP load generator process: its shard of the chat-mix-http requests, sent at once on "go"."""
    asyncio.run(_client(cfg))


async def _client(cfg: dict) -> None:
    import openai

    raise_open_files()
    specs = chat_mix_specs(cfg["n"], cfg["seed"], *cfg["chat"])
    prompts = prompt_tokens(specs, cfg["vocab"], cfg["seed"], cfg["salt"])
    mine = list(range(cfg["shard"], cfg["n"], cfg["shards"]))
    conc = cfg["concurrency"] or len(mine)
    # openai's own httpx flavour (httpx, or httpx2 in later versions) takes its own Limits class.
    limits = type(openai.DEFAULT_CONNECTION_LIMITS)(max_connections=conc + 4, max_keepalive_connections=conc + 4)
    timeout = cfg["cap_s"] + 600 if math.isfinite(cfg["cap_s"]) else 3600.0
    http = openai.DefaultAsyncHttpxClient(limits=limits)
    client = openai.AsyncOpenAI(base_url=cfg["url"] + "/v1", api_key="unused", max_retries=0, http_client=http,
                                timeout=timeout)
    sem = asyncio.Semaphore(conc)
    recs = [dict(prompt_len=specs[i]["prompt_len"], asked=specs[i]["max_tokens"], out=0, arrival=None, first=None,
                 end=None, finished=False, chunks=0) for i in mine]
    errors: list[str] = []

    async def one(spec: dict, prompt: list[int], rec: dict) -> None:
        kw = dict(model="random", prompt=prompt, max_tokens=spec["max_tokens"], temperature=spec["temperature"],
                  top_p=spec["top_p"], stream=True, stream_options={"include_usage": True},
                  extra_body={"ignore_eos": True})
        for key in ("seed", "presence_penalty", "frequency_penalty", "logprobs"):
            if key in spec:
                kw[key] = spec[key]
        async with sem:
            rec["arrival"] = time.perf_counter()
            try:
                stream = await client.completions.create(**kw)
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].text:
                        now = time.perf_counter()
                        rec["chunks"] += 1
                        if rec["first"] is None:
                            rec["first"] = now
                        rec["end"] = now
                        if not rec["finished"]:
                            rec["out"] = rec["chunks"]  # until the usage chunk says exactly
                    if chunk.choices and chunk.choices[0].finish_reason:
                        rec["finish_reason"] = chunk.choices[0].finish_reason
                    if chunk.usage is not None:
                        rec["out"], rec["finished"] = chunk.usage.completion_tokens, True
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}"[:300])

    # Warm-up (not measured): two short requests through the whole path, then this process's share of --http-warmup
    # chat-mix requests of their own (outputs cut to 32 tokens), all at once: an engine that has not served yet
    # meets the step shapes of the workload here (kernel specialisations, allocator growth), not in the timed run.
    warm = dict(prompt_len=16, max_tokens=4, temperature=0.7, top_p=1.0)
    warm_specs = [warm, warm]
    warm_prompts = [np.random.default_rng([cfg["seed"], cfg["salt"], 99, cfg["shard"]]).integers(
        0, cfg["vocab"], 16).tolist()] * 2
    if cfg.get("warmup"):
        extra = chat_mix_specs(cfg["warmup"], cfg["seed"] + 1, *cfg["chat"])[cfg["shard"] :: cfg["shards"]]
        warm_specs += [dict(w, max_tokens=min(w["max_tokens"], 32)) for w in extra]
        warm_prompts += prompt_tokens(extra, cfg["vocab"], cfg["seed"] + 1, cfg["salt"])
    warm_recs = [dict(recs[0], chunks=0, finished=False) for _ in warm_specs]
    await asyncio.gather(*(one(w, p, r) for w, p, r in zip(warm_specs, warm_prompts, warm_recs, strict=True)))
    if errors or not all(r["finished"] for r in warm_recs):
        print(f"warm-up failed: {errors[:1] or 'no usage chunk'}", flush=True)
        sys.exit(1)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    start = time.time()
    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(one(specs[i], prompts[i], rec)) for i, rec in zip(mine, recs, strict=True)]
    done, pending = await asyncio.wait(tasks, timeout=cfg["cap_s"])
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    end = time.time()
    await client.close()
    for r in recs:  # perf_counter -> seconds since this process's start, the same base for every field
        for k in ("arrival", "first", "end"):
            if r[k] is not None:
                r[k] -= t0
    out = {"start": start, "end": end, "truncated": bool(pending), "requests": recs, "errors": len(errors),
           "error_examples": errors[:3]}
    write_text(cfg["out"], json.dumps(out))


# ---- plan, caps, output ----------------------------------------------------------------------------------------


def estimate(name: str, args, rates: dict, long_ttft: dict, overhead: bool = True) -> float:
    if name == "batch1":
        return 10.0
    specs = workload_specs(name, args)
    seconds = spec_tokens(specs) / rates[name]
    if name == "long-context":
        seconds += sum(long_ttft.get(n, 22.4 * (n / 131072) ** 2) for n in args.long_lens)
        seconds += args.long_output * len(args.long_lens) / 100  # decoding beside the long contexts
    if name == "chat-mix-http" and overhead:
        seconds += HTTP_OVERHEAD_S
    return seconds


def caps(args, names: list[str]) -> dict[str, float]:
    """Each workload's cut-off: cap_factor x its time at issue 21's targets, at least 30 s (75 s for the long
    prompts, whose 128K prefill alone took 22 s); none on --tiny or with --cap-factor 0."""
    if args.tiny or not args.cap_factor:
        return {n: float("inf") for n in names}
    return {n: max(75.0 if n == "long-context" else 30.0,
                   args.cap_factor * estimate(n, args, TARGET_RATE, LONG_TTFT_TARGET, overhead=False))
            for n in names}


def print_plan(args, names: list[str], cap: dict[str, float]) -> dict:
    plan = {}
    log(f"workloads: {', '.join(names)}; --requests {args.requests}")
    for n in names:
        specs = workload_specs(n, args)
        row = {"requests": len(specs) + (len(args.long_lens) if n == "long-context" else 0),
               "tokens": spec_tokens(specs) + (sum(args.long_lens) + args.long_output * len(args.long_lens)
                                               if n == "long-context" else 0)}
        if not args.tiny:
            row.update(target_s=round(estimate(n, args, TARGET_RATE, LONG_TTFT_TARGET), 1),
                       issue_speed_s=round(estimate(n, args, ISSUE_RATE, LONG_TTFT_ISSUE), 1),
                       cap_s=round(cap[n], 1) if math.isfinite(cap[n]) else None)
        plan[n] = row
        extra = "" if args.tiny else (f"  ~{row['target_s']:.0f} s at issue-21 targets, ~{row['issue_speed_s']:.0f} s "
                                      f"at issue-21 measured speeds, cut off at {row['cap_s']} s")
        log(f"  {n:16s} {row['requests']:5d} requests {row['tokens']:9,d} tokens{extra}")
    if args.tiny:
        log("  (--tiny: a CPU smoke run; no H200 estimate)")
    else:
        # chat-mix-http's engine process is a second engine to build, beside this process's.
        startup = STARTUP_ESTIMATE_S * (2 if args.engine_process and "chat-mix-http" in names and len(names) > 1
                                        else 1)
        t = startup + sum(r["target_s"] for r in plan.values())
        i = startup + sum(r["issue_speed_s"] for r in plan.values())
        def oh(n: str) -> float:  # what runs outside the cut-off
            return HTTP_OVERHEAD_S if n == "chat-mix-http" else 0

        w = startup + sum(min(r["issue_speed_s"], (r["cap_s"] or 1e9) + oh(n)) for n, r in plan.items())
        worst = startup + sum((r["cap_s"] or 0) + oh(n) for n, r in plan.items())
        plan["total"] = dict(target_s=round(t), issue_speed_s=round(i), issue_speed_capped_s=round(w),
                             worst_case_s=round(worst), startup_s=startup)
        log(f"  estimate on one H200 (Llama-3-8B shape), start-up ~{startup} s included: "
            f"~{t / 60:.1f} min at issue-21 targets; ~{w / 60:.1f} min at issue-21 measured speeds with the "
            f"cut-offs (~{i / 60:.1f} min without); at most ~{worst / 60:.1f} min"
            + (f"; --max-seconds {args.max_seconds:.0f} ends it by then" if args.max_seconds else ""))
    return plan


def ms(p: dict | None, key: str) -> str:
    return "—" if not p else f"{p[key]:,.1f}"


def num(x, fmt: str = ",.0f") -> str:
    return "—" if x is None else format(x, fmt)


def markdown(report: dict) -> str:
    env, res = report.get("env", {}), report["workloads"]
    cfg = env.get("engine_config", {})
    lines = [f"# Serving workloads — {report['date']}", ""]
    lines.append(f"- Device: {env.get('device', '?')}; Python {env.get('python')}, torch {env.get('torch')}, Triton "
                 f"{env.get('triton')}, transformers {env.get('transformers')}, fastapi {env.get('fastapi')}, "
                 f"uvicorn {env.get('uvicorn')}, openai {env.get('openai')}; commit {env.get('commit')}.")
    shape = env.get("model_shape", {})
    lines.append(f"- Model: {'tiny random' if report['tiny'] else 'Llama-3-8B shape, random'} {env.get('dtype')} "
                 f"weights ({shape.get('num_hidden_layers')} layers, hidden {shape.get('hidden_size')}, vocab "
                 f"{shape.get('vocab_size')}, max_position_embeddings {shape.get('max_position_embeddings')}); "
                 f"random token-id prompts, EOS ignored.")
    lines.append(f"- Engine: max_num_seqs {cfg.get('max_num_seqs')}, max_num_batched_tokens "
                 f"{cfg.get('max_num_batched_tokens')}, max_model_len {env.get('max_model_len')}, "
                 f"{env.get('kv_blocks')} KV blocks of {env.get('kv_block_size')} tokens, async scheduling "
                 f"{cfg.get('async_scheduling')}, CUDA graphs {env.get('cuda_graphs')}, prefix caching "
                 f"{cfg.get('enable_prefix_caching')}; start-up {report.get('startup_s')} s.")
    lines.append(f"- Command: `{report['command']}`")
    lines.append(f"- chat-mix: {describe_chat_mix(*report['chat'])}.")
    lines.append("- tok/s = (input + output tokens) / wall time. TTFT = first token − arrival; TPOT = (finish − "
                 "first token) / (output tokens − 1); p50 / p99 by nearest rank over the requests. Offline rows: "
                 "every request submitted at once to LLMEngine; chat-mix-http: through the HTTP server, measured "
                 "by the client.")
    lines.append("")
    lines.append("| workload | requests (finished) | wall s | tok/s (in+out) | output tok/s | TTFT p50 ms "
                 "| TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | steps | preempted | note |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        if name == "batch1":
            continue
        if "skipped" in r or "error" in r:
            note = r.get("skipped") or r.get("error")
            lines.append(f"| {name} | — | — | — | — | — | — | — | — | — | — | {note} |")
            continue
        e = r.get("engine", {})
        note = []
        if r.get("truncated"):
            note.append("**truncated** at its cut-off")
        if r.get("short_outputs"):
            note.append(f"{r['short_outputs']} stopped early")
        if r.get("errors"):
            note.append(f"{r['errors']} errors")
        if r.get("short_requests"):
            sr = r["short_requests"]
            note.append(f"all requests, long prompts included; the short ones alone: TTFT p50 / p99 "
                        f"{ms(sr['ttft_ms'], 'p50')} / {ms(sr['ttft_ms'], 'p99')} ms, TPOT p50 / p99 "
                        f"{ms(sr['tpot_ms'], 'p50')} / {ms(sr['tpot_ms'], 'p99')} ms")
        lines.append(f"| {name} | {r['requests']:,} ({r['finished']:,}) | {r['seconds']:,.1f} | "
                     f"{num(r['tokens_per_s'])} | {num(r['output_tokens_per_s'])} | {ms(r['ttft_ms'], 'p50')} | "
                     f"{ms(r['ttft_ms'], 'p99')} | {ms(r['tpot_ms'], 'p50')} | {ms(r['tpot_ms'], 'p99')} | "
                     f"{e.get('steps', '—')} | {e.get('preempted', '—')} | {'; '.join(note)} |")
    ratios = []
    a = res.get("greedy", {}).get("tokens_per_s")
    for b in ("sampled-t1", "sampled-t07-p09"):
        if a and res.get(b, {}).get("tokens_per_s"):
            ratios.append(f"{b} / greedy = {res[b]['tokens_per_s'] / a:.1%} (target ≥ 95%)")
    c = res.get("chat-mix", {}).get("tokens_per_s")
    if c:
        ratios.append(f"chat-mix = {c:,.0f} tok/s (target ≥ 18,000)")
    if c and res.get("chat-mix-http", {}).get("tokens_per_s"):
        ratios.append(f"chat-mix-http / chat-mix = {res['chat-mix-http']['tokens_per_s'] / c:.1%} (target ≥ 90%)")
    if ratios and not report["tiny"]:
        lines += ["", "Against issue 21's targets: " + "; ".join(ratios) + "."]
    lc = res.get("long-context")
    if lc and lc.get("long_prompts"):
        lines += ["", "long-context: each long prompt, and the short requests decoding while it was prefilled "
                  "(their tokens inside [arrival, first token] of the long prompt):", "",
                  "| prompt tokens | TTFT s | prefill tok/s | model TFLOP/s | short requests decoding | short TPOT p50 "
                  "ms | short TPOT p99 ms | longest short inter-token gap ms | long decode tok/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in lc["long_prompts"]:
            if p.get("ttft_s") is None:
                lines.append(f"| {p['prompt_len']:,} | cut off | — | — | — | — | — | — | — |")
                continue
            lines.append(f"| {p['prompt_len']:,} | {p['ttft_s']:.2f} | {num(p['prefill_tokens_per_s'])} | "
                         f"{p['model_tflops']:.4g} | {p['short_requests_decoding']} | "
                         f"{ms(p['short_tpot_ms'], 'p50')} | {ms(p['short_tpot_ms'], 'p99')} | "
                         f"{ms(p['short_intertoken_ms'], 'max')} | {num(p.get('decode_tokens_per_s'), ',.1f')} |")
        lines.append("")
        lines.append(f"Model FLOPs = 2·N·S + 2·L·d·S² (N = {report.get('matmul_params', 0):.3g} matmul "
                     "parameters, causal attention), as issue 21 counts them.")
    described = [(n, r) for n, r in res.items() if r.get("workload")]
    if described:
        lines += ["", "Workloads:", ""]
        for n, r in described:
            client = f" Client: {r['client']}." if r.get("client") else ""
            server = f" Server: {r['server']}." if r.get("server") else ""
            lines.append(f"- {n}: {r['workload']}.{server}{client}")
    b1 = res.get("batch1")
    if b1 and "decode_tokens_per_s" in b1:
        lines += ["", f"batch1: {b1['decode_tokens_per_s']} tok/s = {b1['share_of_bound']:.1%} of the bound "
                  f"{b1['bound_tokens_per_s']} tok/s ({b1['copy_tb_per_s']} TB/s / {b1['weight_gb']} GB)."]
    if report.get("status") != "done":
        lines += ["", f"Status: {report.get('status')} (partial: written after each workload)."]
    return "\n".join(lines) + "\n"


def save(report: dict, out: Path) -> None:
    text = json.dumps(report, indent=1, default=str)
    # One line per list of numbers (the per-request arrays), not one line per number.
    text = re.sub(r"\[\s*([-0-9.,\snul]*?)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    write_text(out / "workloads.json", text)
    write_text(out / "workloads.md", markdown(report))


def print_row(name: str, r: dict) -> None:
    if "skipped" in r or "error" in r:
        log(f"== {name}: {r.get('skipped') or r.get('error')}")
        return
    if name == "batch1":
        log(f"== batch1: {json.dumps(r)}")
        return
    log(f"== {name}: {r['requests']} requests ({r['finished']} finished{', TRUNCATED' if r['truncated'] else ''}) "
        f"in {r['seconds']:.1f} s: {num(r['tokens_per_s'])} tok/s (in+out), {num(r['output_tokens_per_s'])} output "
        f"tok/s; TTFT p50 {ms(r['ttft_ms'], 'p50')} / p99 {ms(r['ttft_ms'], 'p99')} ms; TPOT p50 "
        f"{ms(r['tpot_ms'], 'p50')} / p99 {ms(r['tpot_ms'], 'p99')} ms; engine {json.dumps(r.get('engine'))}")
    for p in r.get("long_prompts", []):
        log(f"   long prompt {p['prompt_len']}: {json.dumps(p)}")


# ---- main ----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["all"], help=f"of {', '.join(ALL_WORKLOADS)} or a-e / all")
    ap.add_argument("--requests", type=int, help="requests of greedy, sampled-*, chat-mix(-http); long-context "
                    "takes a fifth (default 1000; --quick 200; --tiny 16)")
    ap.add_argument("--quick", action="store_true", help="200 requests (about 2-3 minutes on an H200)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU, 16 requests, long prompts "
                    "of 1024 and 4096 tokens: a smoke run of every path")
    ap.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    ap.add_argument("--out", help="results folder (default benchmarks/results/<date>-serve-workloads-<device>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--long-lens", type=int, nargs="+", help="long-context prompts (default 32768 131072)")
    ap.add_argument("--long-output", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, help="default 8192 (--tiny 1024)")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--cap-factor", type=float, default=2.0, help="cut a workload off after this x its time at "
                    "issue 21's targets (0: never)")
    ap.add_argument("--max-seconds", type=float, help="the whole run's limit, start-up included: the workload "
                    "running then is cut off, later ones skipped (default 540, inside a 10-minute device command; "
                    "--tiny: none; 0: none)")
    ap.add_argument("--http-clients", type=int, help="client processes for chat-mix-http (default 4; --tiny 1)")
    ap.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=False,
                    help="chat-mix-http: the engine in a process of its own, as `longseq serve --engine-process` runs "
                    "it (built before the other workloads' engine; default: on a thread of this process, over the "
                    "engine the other workloads use, as `longseq serve` runs it)")
    ap.add_argument("--http-concurrency", type=int, default=0, help="requests in flight per client process "
                    "(0: all at once)")
    ap.add_argument("--http-warmup", type=int, default=None, help="chat-mix-http: chat-mix requests of their own "
                    "sent through the server before the timed run, outputs cut to 32 tokens (default 256; --tiny 0)")
    ap.add_argument("--commit", help="the commit to record where git cannot tell (a copy of the tree without .git)")
    ap.add_argument("--plan-only", action="store_true", help="print the plan and the time estimate, run nothing")
    ap.add_argument("--http-client", help=argparse.SUPPRESS)  # internal: run as an HTTP load generator
    args = ap.parse_args(argv)
    if args.http_client:
        return args
    args.requests = args.requests or (16 if args.tiny else 200 if args.quick else 1000)
    args.fixed_len = 256
    args.chat = (CHAT_INPUT, CHAT_OUTPUT)
    args.long_lens = args.long_lens or ([1024, 4096] if args.tiny else [32768, 131072])
    args.max_num_batched_tokens = args.max_num_batched_tokens or (1024 if args.tiny else 8192)
    args.http_clients = args.http_clients or (1 if args.tiny else 4)
    if args.http_warmup is None:
        args.http_warmup = 0 if args.tiny else 256
    if args.max_seconds is None:
        args.max_seconds = 0 if args.tiny else 540
    names = []
    for w in args.workloads:
        for n in ALIASES.get(w, [w]):
            if n not in ALL_WORKLOADS:
                ap.error(f"unknown workload {w!r}: choose from {', '.join(ALL_WORKLOADS)}, a-e or all")
            if n not in names:
                names.append(n)
    if args.engine_process and "chat-mix-http" in names:  # its engine process first, while the GPU is free
        names = ["chat-mix-http"] + [n for n in names if n != "chat-mix-http"]
    args.names = names
    return args


def max_len_needed(args) -> int:
    need = 16
    for n in args.names:
        if n in FIXED or n == "batch1":
            need = max(need, 2 * args.fixed_len)
        elif n in ("chat-mix", "chat-mix-http"):
            need = max(need, args.chat[0][3] + args.chat[1][3])
        elif n == "long-context":
            need = max(need, args.chat[0][3] + args.chat[1][3], max(args.long_lens) + args.long_output)
    return need + 16


def warm_up(engine, args, vocab: int) -> None:
    """A few requests of every kind the workloads send (greedy, sampled, seeded, penalties, logprobs; prompts of
    several lengths, so mixed prefill + decode steps run), and one prompt over several prefill chunks when the long
    prompts are to come: lazy initialisation and Triton compiles happen here, not in a measured workload."""
    rng = np.random.default_rng([args.seed, 99])
    base = dict(max_tokens=8, temperature=0.7, top_p=1.0)
    specs = [dict(base, prompt_len=n, temperature=0.0) for n in (16, 200, 600)]
    specs += [dict(base, prompt_len=300, top_p=0.9), dict(base, prompt_len=40, seed=1),
              dict(base, prompt_len=80, **PENALTIES), dict(base, prompt_len=120, logprobs=TOP_LOGPROBS)]
    if "long-context" in args.names:
        specs.append(dict(base, prompt_len=min(3 * args.max_num_batched_tokens, max(args.long_lens))))
    reqs = [(rng.integers(0, vocab, s["prompt_len"]).tolist(), sampling_params(s)) for s in specs]
    drive(engine, reqs, float("inf"))
    drive(engine, reqs[:2], float("inf"))  # once more with warm kernels


def bench_engine(args, shape: dict, device, dtype, cfg):
    """The engine every workload runs on: random weights, NullTokenizer, warmed up. Module-level, so that the
    engine process of chat-mix-http builds it by the same code (it pickles by name)."""
    import torch
    from serve_throughput import NullTokenizer

    from longseq.engine.llm_engine import LLMEngine
    from longseq.models.loader import LoadedModel

    if device.type == "cpu":  # two intra-op threads contending with the engine's host work are slower than one
        torch.set_num_threads(1)
    engine = LLMEngine(LoadedModel(build_model(shape, device, dtype), NullTokenizer(), Path("random")), cfg)
    warm_up(engine, args, shape["vocab_size"])
    return engine


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.http_client:
        return client_main(json.loads(args.http_client))
    t_start = time.monotonic()
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" and not args.tiny else torch.float32
    names = args.names
    cap = caps(args, names)
    plan = print_plan(args, names, cap)
    if "chat-mix-http" in names and (missing := http_missing()):
        log(f"WARNING: chat-mix-http will be skipped: missing Python packages: {missing}")
    if args.plan_only:
        return
    today = datetime.date.today().isoformat()
    tag = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace("NVIDIA ", "").split()[0]
    out = Path(args.out or HERE / "results" / f"{today}-serve-workloads-{tag.lower()}")
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    raise_open_files()
    report = {"date": today, "command": " ".join([Path(sys.executable).name, *sys.argv]), "tiny": args.tiny,
              "requests": args.requests, "seed": args.seed, "fixed_len": args.fixed_len, "chat": args.chat,
              "long_lens": args.long_lens, "long_output": args.long_output, "workload_names": names,
              "status": "starting", "plan": plan, "workloads": {}}

    from functools import partial

    from serve_throughput import copy_bandwidth

    from longseq.config import EngineConfig

    max_model_len = max_len_needed(args)
    shape = model_shape(args, max_model_len)
    args.bandwidth = copy_bandwidth() if "batch1" in names and device.type == "cuda" else None
    cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       max_model_len=max_model_len, max_queue=max(1024, 2 * args.requests + 64),
                       async_scheduling=args.async_scheduling, kv_cache_gib=0.5, engine_process=args.engine_process)
    report["matmul_params"] = matmul_params(shape)
    make_engine = partial(bench_engine, args, shape, device, dtype, cfg)
    ctx: Context | None = None

    def offline() -> Context:
        """The engine of this process, built (and warmed up) on first use."""
        nonlocal ctx
        if ctx is None:
            t0 = time.monotonic()
            engine = make_engine()
            ctx = Context(args, engine, engine.lm.model, shape)
            report["env"] = engine_env(engine, cfg, device, dtype, shape, args.commit)
            report["startup_s"] = round(time.monotonic() - t0, 1)
            log(f"engine: {report['env']['device']}, max_model_len {engine.max_model_len}, "
                f"{engine.blocks.num_blocks} KV blocks; start-up (model, engine, warm-up): {report['startup_s']} s")
        return ctx

    report["status"] = "running"
    save(report, out)
    runners = {"long-context": run_long_context, "chat-mix-http": run_http, "batch1": run_batch1}
    for name in names:
        in_process = name == "chat-mix-http" and args.engine_process
        left = args.max_seconds - (time.monotonic() - t_start) if args.max_seconds else float("inf")
        if name == "chat-mix-http":
            left -= 30  # the client processes' start and warm-up, the server's start and stop
        if in_process or ctx is None:
            left -= STARTUP_ESTIMATE_S  # an engine to build first
        if left < 10:
            report["workloads"][name] = {"skipped": f"--max-seconds {args.max_seconds} reached"}
            print_row(name, report["workloads"][name])
            save(report, out)
            continue
        cut = min(cap[name], left)
        t0 = time.monotonic()
        try:
            if in_process:
                log(f"-- {name} (cut-off {cut:.0f} s; the engine in its own process, `longseq serve --engine-process`)")
                r = run_http_process(args, shape["vocab_size"], make_engine, cut)
            else:
                c = offline()
                log(f"-- {name} (cut-off {cut:.0f} s)")
                r = runners[name](c, cut) if name in runners else run_offline(c, name, cut)
        except Exception as e:  # keep the other workloads' results
            import traceback

            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {e}"[:500]}
            if ctx is not None:
                for rid in list(ctx.engine.seqs):
                    ctx.engine.abort(rid)
        r["elapsed_s"] = round(time.monotonic() - t0, 1)
        report["workloads"][name] = r
        print_row(name, r)
        if device.type == "cuda":
            report.setdefault("env", {})["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30,
                                                                    2)
        save(report, out)
    report["status"] = "done"
    report["total_s"] = round(time.monotonic() - t_start, 1)
    save(report, out)
    log(f"done in {report['total_s']} s: {out / 'workloads.json'}, {out / 'workloads.md'}")
    log(markdown(report))


if __name__ == "__main__":
    main()
