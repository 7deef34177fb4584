"""Where does a chat-mix step's time go? Step timings by kind, a profiler table of one mixed prefill step, the
chunk-attention paths, then chat-mix and long-context with the old (masked) chunk attention and the new one."""
import json, os, sys, time
from pathlib import Path
ROOT = Path(os.environ["ROOT"]); sys.path.insert(0, str(ROOT / "benchmarks"))
import torch
import serve_workloads as sw
from serve_throughput import NullTokenizer
from longseq.config import EngineConfig
from longseq.engine.llm_engine import LLMEngine
from longseq.models.loader import LoadedModel
import longseq.attention.sdpa as sdpa
import longseq.attention.paged as paged
from longseq.attention.masks import causal_mask

OUT = Path(os.environ["OUT"]); OUT.mkdir(exist_ok=True)
res = {}
dev = torch.device("cuda")

# 1. chunk attention alone
def old_chunk(q, k, v, q_start):
    pos = torch.arange(k.shape[2], device=q.device)
    return sdpa._sdpa_masked(q, k, v, causal_mask(pos[q_start:], pos, None))
def timeit(f, n=5):
    f(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): f()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n
for S, T in [(8192, 16384), (8192, 131072), (2048, 4096)]:
    q = torch.randn(1, 32, S, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 8, T, 128, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
    a = sdpa.attention(q, k, v, q_start=T - S); b = old_chunk(q, k, v, T - S)
    flops = 4 * 32 * 128 * (S * (T - S) + S * S / 2)
    tn, to = timeit(lambda: sdpa.attention(q, k, v, q_start=T - S)), timeit(lambda: old_chunk(q, k, v, T - S))
    r = dict(max_diff=(a.float() - b.float()).abs().max().item(), new_ms=tn * 1e3, old_ms=to * 1e3,
             new_tflops=flops / tn / 1e12, old_tflops=flops / to / 1e12)
    res[f"chunk {S}x{T}"] = r; print("chunk", S, T, r, flush=True)
    del q, k, v, a, b
torch.cuda.empty_cache()

# 2. engine
args = sw.parse_args(["--quick", "--workloads", "chat-mix", "long-context", "--max-seconds", "0"])
shape = sw.model_shape(args, sw.max_len_needed(args))
model = sw.build_model(shape, dev, torch.bfloat16)
cfg = EngineConfig(max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=sw.max_len_needed(args), max_queue=2048,
                   async_scheduling=True, kv_cache_gib=0.5)
engine = LLMEngine(LoadedModel(model, NullTokenizer(), Path("random")), cfg)
ctx = sw.Context(args, engine, model, shape)
sw.warm_up(ctx)
steps = []
orig = engine.runner.execute
def timed(step, ids=None):
    torch.cuda.synchronize(); t = time.perf_counter(); out = orig(step, ids); torch.cuda.synchronize()
    ql = step.query_lens
    steps.append(dict(ms=(time.perf_counter() - t) * 1e3, tokens=len(step.ids), seqs=len(ql),
                      prefills=sum(1 for n in ql if n > 1), chunked=sum(1 for n, c in zip(ql, step.context_lens) if 1 < n < c),
                      max_ctx=max(step.context_lens), decode=step.decode))
    return out
engine.runner.execute = timed

def summary(tag):
    pre = [s for s in steps if s["prefills"]]; dec = [s for s in steps if not s["prefills"]]
    r = dict(steps=len(steps), prefill_steps=len(pre), prefill_ms=sum(s["ms"] for s in pre),
             decode_steps=len(dec), decode_ms=sum(s["ms"] for s in dec), first_steps=steps[:16])
    print(tag, json.dumps({k: v for k, v in r.items() if k != "first_steps"}), flush=True)
    for s in steps[:16]: print("  ", s, flush=True)
    return r

old_attend = paged._attend_context
def old_attend_context(q, k_pool, v_pool, slots, ctx_len, window):
    k = k_pool[slots].transpose(0, 1).unsqueeze(0); v = v_pool[slots].transpose(0, 1).unsqueeze(0)
    if window is None and ctx_len > q.shape[2]:
        return old_chunk(q, k, v, ctx_len - q.shape[2])
    return sdpa.attention(q, k, v, q_start=ctx_len - q.shape[2], window=window)

for tag, fn in [("old", old_attend_context), ("new", old_attend)]:
    paged._attend_context = fn
    for name in ["chat-mix", "long-context"]:
        steps.clear()
        r = sw.run_long_context(ctx, 120) if name == "long-context" else sw.run_offline(ctx, name, 60)
        keep = {k: r.get(k) for k in ("tokens_per_s", "wall_s", "ttft_ms", "tpot_ms", "long")}
        print("==", tag, name, json.dumps(keep, default=str)[:1500], flush=True)
        res[f"{tag} {name}"] = dict(result=r, steps=summary(f"{tag} {name}"))
        (OUT / "profile.json").write_text(json.dumps(res, default=str, indent=1))

# 3. profiler on a few mixed steps of chat-mix (new path)
from torch.profiler import profile, ProfilerActivity
specs = sw.workload_specs("chat-mix", args)[:60]
reqs = list(zip(ctx.tokens(specs, "chat-mix"), [sw.sampling_params(s) for s in specs]))
for p, sp in reqs: engine.add_request(p, sp)
engine.step()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(3): engine.step()
    torch.cuda.synchronize()
tab = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
print(tab[:6000]); (OUT / "prof_cuda.txt").write_text(tab)
(OUT / "prof_cpu.txt").write_text(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
while engine.has_unfinished(): engine.step()
