"""FlashAttention-4 (flash_attn.cute, its SM90 kernels) against SDPA's cuDNN backend, causal, Llama-3-8B heads (32
query, 8 KV, head dim 128), bf16, batch 1, in the projections' (B, S, H, D) layout: seconds, TFLOP/s and the memory
each allocates beyond its inputs, forward and backward; "fa4_groups" runs one call per group of KV heads (what
training does from 256K tokens, attention/sdpa.py). Then the agreement of both with float32 math at 4K tokens
(max |error| / max |reference| of the output and the three gradients).

    python benchmarks/attention_fa4.py > attention_fa4.txt    # flash-attn-4 on a Hopper or Blackwell GPU

Causal forward FLOPs: 4·S²·H·D / 2; the backward's TFLOP/s count 2.5x the forward's (FlashAttention's backward
recomputes the scores). Times are the fastest repetition after a first call, which compiles FA4's kernels.
"""

from __future__ import annotations

import json
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

GIB = 2**30
HEADS, KV_HEADS, DIM = 32, 8, 128


def cudnn(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                             enable_gqa=True)
    return out.transpose(1, 2)


def fa4(q, k, v):
    from flash_attn.cute import flash_attn_func

    return flash_attn_func(q, k, v, causal=True)[0]


def fa4_groups(q, k, v, groups=8):
    hq, hk = q.shape[2] // groups, k.shape[2] // groups
    return torch.cat([fa4(q[:, :, i * hq:(i + 1) * hq], k[:, :, i * hk:(i + 1) * hk], v[:, :, i * hk:(i + 1) * hk])
                      for i in range(groups)], dim=2)


def inputs(S: int, dtype=torch.bfloat16):
    q, k, v = (torch.randn(1, S, h, DIM, device="cuda", dtype=dtype, requires_grad=True)
               for h in (HEADS, KV_HEADS, KV_HEADS))
    return q, k, v, torch.randn(1, S, HEADS, DIM, device="cuda", dtype=dtype)


def timed(fn, S: int, reps: int) -> dict:
    q, k, v, dout = inputs(S)
    fwd, bwd = [], []
    for r in range(reps + 1):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn(q, k, v)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        fwd_extra = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t2 = time.perf_counter()
        out.backward(dout)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        bwd_extra = torch.cuda.max_memory_allocated() - base
        if r:
            fwd.append(t1 - t0)
            bwd.append(t3 - t2)
        else:
            first = (round(t1 - t0, 2), round(t3 - t2, 2))
        q.grad = k.grad = v.grad = None
        del out
    flops = 2 * S * S * HEADS * DIM  # causal forward: 4·S²·H·D / 2
    f, b = min(fwd), min(bwd)
    return dict(S=S, fwd_s=round(f, 4), bwd_s=round(b, 4), fwd_tflops=round(flops / f / 1e12, 1),
                bwd_tflops_2_5x=round(2.5 * flops / b / 1e12, 1),
                fwdbwd_tflops_3_5x=round(3.5 * flops / (f + b) / 1e12, 1),
                fwd_extra_gib=round(fwd_extra / GIB, 2), bwd_extra_gib=round(bwd_extra / GIB, 2), first_call_s=first)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(((a.float() - b.float()).abs().max() / b.float().abs().max()).item(), 5)


def agreement(S: int = 4096) -> None:
    torch.manual_seed(0)
    q, k, v, dout = inputs(S)
    results = {}
    for name, fn in (("cudnn", cudnn), ("fa4", fa4)):
        out = fn(q, k, v)
        out.backward(dout)
        results[name] = (out.detach(), q.grad, k.grad, v.grad)
        q.grad = k.grad = v.grad = None
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2),
                                             is_causal=True, enable_gqa=True).transpose(1, 2)
    out.backward(dout.float())
    ref = (out.detach(), qf.grad, kf.grad, vf.grad)
    for name, got in results.items():
        errs = {key: rel_err(a, b) for key, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True)}
        print(json.dumps(dict(agreement=name, vs="fp32 math", **errs)), flush=True)


def main() -> None:
    import torch.nn.attention as tna

    print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
    print("activate_flash_attention_impl" in dir(tna), [n for n in dir(tna) if "impl" in n], flush=True)
    t0 = time.perf_counter()
    import flash_attn.cute  # noqa: F401  (the CUTLASS DSL import is slow: timed apart)

    print("import fa4", round(time.perf_counter() - t0, 1), flush=True)
    for S, reps in ((8192, 3), (32768, 3), (131072, 2), (524288, 1)):
        for name, fn in (("cudnn", cudnn), ("fa4", fa4), ("fa4_groups", fa4_groups)):
            if S < 131072 and name == "fa4_groups":
                continue
            try:
                print(json.dumps({**timed(fn, S, reps), "impl": name}), flush=True)
            except Exception:
                print(json.dumps(dict(S=S, impl=name, error=traceback.format_exc()[-1500:])), flush=True)
            torch.cuda.empty_cache()
    agreement()
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
