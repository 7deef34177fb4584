"""The fused RMSNorm / RoPE / SwiGLU kernels (models/kernels/) against the eager ops, on one GPU:

- micro: forward + backward at 32K tokens with Llama-3-8B widths (and torch's F.rms_norm beside RMSNorm);
- decode: a Llama-3-8B-shaped engine at batch 1, as configured by default, then with one thing at a time taken away
  in the same process (the Triton GEMV, async scheduling, fused q/k/v and gate/up matmuls, the fused kernels via
  fused.MODE = "0"), then as run 5 of the serve table had it (kernels only): tokens/s against the bandwidth bound,
  one graph replay's GPU time, one engine step, and the kernels a replay launches (torch.profiler).

    PYTHONPATH=src python3 benchmarks/fused_kernels.py --out fused_check.json [--skip-micro]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def cuda_ms(fn, n: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def micro(S: int = 32768, d: int = 4096, inter: int = 14336, H: int = 32, H_kv: int = 8, D: int = 128) -> dict:
    from longseq.models.kernels.rms_norm import rms_norm
    from longseq.models.kernels.rope import rope
    from longseq.models.kernels.swiglu import swiglu
    from longseq.models.rope import apply_rope

    def leaf(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    x, g, u, q, k = leaf(1, S, d), leaf(1, S, inter), leaf(1, S, inter), leaf(1, S, H, D), leaf(1, S, H_kv, D)
    w = torch.ones(d, device="cuda", dtype=torch.bfloat16)
    angles = torch.rand(1, S, D // 2, device="cuda") * 6
    cos, sin = (torch.cat([f(angles), f(angles)], -1).bfloat16() for f in (torch.cos, torch.sin))
    dx, dg = torch.randn_like(x), torch.randn_like(g)

    def eager_norm():
        xf = x.float()
        (w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)).backward(dx)

    def eager_rope():
        a, b = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        (a.float().sum() + b.float().sum()).backward()

    def fused_rope():
        a, b = rope(q, k, cos, sin)
        (a.float().sum() + b.float().sum()).backward()

    times = {
        "rms_norm eager": cuda_ms(eager_norm), "rms_norm fused": cuda_ms(lambda: rms_norm(x, w, 1e-5).backward(dx)),
        "F.rms_norm": cuda_ms(lambda: F.rms_norm(x, (d,), w, 1e-5).backward(dx)),
        "swiglu eager": cuda_ms(lambda: (F.silu(g) * u).backward(dg)),
        "swiglu fused": cuda_ms(lambda: swiglu(g, u).backward(dg)),
        "rope eager": cuda_ms(eager_rope), "rope fused": cuda_ms(fused_rope),
    }
    return {name: round(ms, 3) for name, ms in times.items()}


def decode(model, prompt: list[int], bandwidth: float, **options) -> dict:
    from serve_throughput import NullTokenizer, batch1_decode

    from longseq.config import EngineConfig
    from longseq.engine.llm_engine import LLMEngine
    from longseq.generation.sampling import SamplingParams
    from longseq.models import fused
    from longseq.models.loader import LoadedModel

    engine = LLMEngine(LoadedModel(model, NullTokenizer(), Path("random")),
                       EngineConfig(max_num_seqs=1, max_model_len=1024, num_kv_blocks=512, **options))
    row = batch1_decode(engine, model, prompt, 256, bandwidth)
    graph = engine.runner.graphs[(1, 1024)].graph
    engine.add_request(prompt, SamplingParams(max_new_tokens=200, ignore_eos=True))
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(100):
        engine.step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) * 10
    while engine.has_unfinished():
        engine.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list] = {}
    for e in kernels:
        entry = by_name.setdefault(e.name[:60], [0, 0.0])
        entry[0] += 1
        entry[1] += e.device_time
    top = sorted(([name, n, round(us, 1)] for name, (n, us) in by_name.items()), key=lambda t: -t[2])[:25]
    row.update(options=options, fused_kernels=fused.MODE != "0", gemv=engine.runner.gemv_report,
               graph_replay_ms=round(cuda_ms(graph.replay, 100), 3), engine_step_ms=round(step_ms, 3),
               kernels=len(kernels), kernel_us_sum=round(sum(e.device_time for e in kernels), 1), top=top)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip-micro", action="store_true")
    args = ap.parse_args()
    from serve_throughput import LLAMA3_8B, copy_bandwidth

    from longseq.config.hf import from_hf
    from longseq.models import fused
    from longseq.models.llama import CausalLM

    result = {} if args.skip_micro else {"micro_ms_fwd_bwd_32k": micro()}
    print(json.dumps(result), flush=True)
    torch.cuda.empty_cache()
    with torch.device("meta"):
        model = CausalLM(from_hf({"model_type": "llama", **LLAMA3_8B})).to(torch.bfloat16)
    model.to_empty(device="cuda")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.rotary.reset("cuda")
    model.eval()
    bandwidth = copy_bandwidth()
    prompt = torch.randint(0, LLAMA3_8B["vocab_size"], (128,)).tolist()
    variants = [
        ("decode_default", "auto", {}),
        ("decode_no_gemv", "auto", dict(decode_gemv=False)),
        ("decode_no_async_scheduling", "auto", dict(async_scheduling=False)),
        ("decode_separate_projections", "auto", dict(fuse_projections=False)),
        ("decode_eager_ops", "0", {}),
        ("decode_run5", "auto", dict(async_scheduling=False, fuse_projections=False, decode_gemv=False)),
    ]
    for name, mode, options in variants:
        fused.MODE = mode  # graphs are captured when the engine starts: each engine keeps its path
        result[name] = decode(model, prompt, bandwidth, **options)
        print(json.dumps({k: v for k, v in result[name].items() if k != "top"}), flush=True)
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
