"""Served latency: time to first token and time per output token at a few request rates, over HTTP.

    python benchmarks/serve_latency.py --rates 2 4 8 16 --requests 200 --out latency.json

The real server (`longseq.serve.create_app` under uvicorn on 127.0.0.1) over the engine of a Llama-3-8B-shaped model
with random bf16 weights. Clients send streaming /v1/completions requests with token-id prompts (random, --input-len
tokens, exactly --output-len tokens out, EOS ignored) at Poisson arrival times of the given rate, as vLLM's
benchmark_serving does. TTFT = request sent -> first streamed token; TPOT = (last token - first token) /
(tokens - 1), per request; p50/p99 over the requests of a rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch


def percentiles(values: list[float]) -> dict[str, float]:
    """Milliseconds: p50 and p99 by nearest rank, and the mean."""
    xs = sorted(values)
    p50, p99 = (xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] for q in (0.5, 0.99))
    return {"p50": round(p50 * 1e3, 1), "p99": round(p99 * 1e3, 1), "mean": round(sum(xs) / len(xs) * 1e3, 1)}


async def one_request(client, prompt: list[int], output_len: int, start: float) -> dict:
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    sent = time.perf_counter()
    body = {"model": "random", "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True,
            "ignore_eos": True}
    times = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    times.append(time.perf_counter())
    return {"ttft": times[0] - sent, "tpot": (times[-1] - times[0]) / max(1, len(times) - 1), "tokens": len(times),
            "latency": times[-1] - sent}


async def run_rate(base_url: str, rate: float, prompts: list[list[int]], output_len: int, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    t, starts = time.perf_counter() + 0.5, []
    for _ in prompts:
        starts.append(t)
        t += rng.expovariate(rate)
    limits = httpx.Limits(max_connections=len(prompts))
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        jobs = [one_request(client, p, output_len, s) for p, s in zip(prompts, starts, strict=True)]
        res = await asyncio.gather(*jobs)
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in res)
    return {"rate": rate, "requests": len(res), "wall_s": round(wall, 2),
            "output_tokens_per_s": round(tokens / wall, 1),
            "ttft_ms": percentiles([r["ttft"] for r in res]), "tpot_ms": percentiles([r["tpot"] for r in res]),
            "short_outputs": sum(r["tokens"] != output_len for r in res)}


def client(args) -> None:
    """The load generator, in its own process: 100 streaming clients parsing SSE in the server's process would
    take the GIL from the engine thread and inflate every latency they measure."""
    vocab = 128256
    g = torch.Generator().manual_seed(1)
    rows = []
    asyncio.run(run_rate(args.client, 4.0, torch.randint(0, vocab, (8, args.input_len), generator=g).tolist(), 8, 0))
    for i, rate in enumerate(args.rates):
        prompts = torch.randint(0, vocab, (args.requests, args.input_len), generator=g).tolist()
        rows.append(asyncio.run(run_rate(args.client, rate, prompts, args.output_len, seed=i)))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(rows))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", type=float, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--requests", type=int, default=200, help="per rate")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--out", required=True)
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--client", help=argparse.SUPPRESS)  # internal: run as the load generator against this URL
    args = ap.parse_args()
    if args.client:
        return client(args)

    import uvicorn
    from serve_throughput import NullTokenizer
    from train_speed import random_llama3_8b

    from longseq.config import EngineConfig
    from longseq.engine.async_engine import AsyncLLMEngine
    from longseq.engine.llm_engine import LLMEngine
    from longseq.models.loader import LoadedModel
    from longseq.serve.app import create_app

    torch.manual_seed(0)
    model = random_llama3_8b().eval()
    t0 = time.perf_counter()
    cfg = EngineConfig(max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=2048,
                       async_scheduling=args.async_scheduling)
    engine = AsyncLLMEngine(LLMEngine(LoadedModel(model, NullTokenizer(), Path("random")), cfg), "random")
    startup = time.perf_counter() - t0
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=args.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.1)
    result = {"input_len": args.input_len, "output_len": args.output_len, "engine_startup_s": round(startup, 1),
              "kv_blocks": engine.engine.blocks.num_blocks, "client": "separate process",
              "async_scheduling": args.async_scheduling}
    rows_file = Path(args.out).with_suffix(".rows.json")
    subprocess.run([sys.executable, __file__, "--client", f"http://127.0.0.1:{args.port}", "--out", str(rows_file),
                    "--rates", *map(str, args.rates), "--requests", str(args.requests), "--input-len",
                    str(args.input_len), "--output-len", str(args.output_len)], check=True)
    result["rates"] = json.loads(rows_file.read_text())
    rows_file.unlink()
    result["env"] = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    Path(args.out).write_text(json.dumps(result, indent=2))
    server.should_exit = True
    thread.join(timeout=10)
    engine.shutdown()


if __name__ == "__main__":
    main()
