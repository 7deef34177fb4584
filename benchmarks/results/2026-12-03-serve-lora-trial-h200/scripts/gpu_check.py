"""GPU checks of multi-LoRA serving: CUDA graphs + async scheduling + Triton kernels against eager and merged."""
import sys, time, tempfile
from pathlib import Path
import torch
from engine_helpers import FakeTokenizer, make_engine, random_prompts, run_engine, tiny_lm
from lora_adapters import ALL_TARGETS, merge_adapter, write_adapter
from longseq.engine import SamplingParams
from longseq.models.loader import LoadedModel
from tiny_models import random_model

dev = torch.device("cuda")
P = SamplingParams(max_new_tokens=24, ignore_eos=True)
tmp = Path(tempfile.mkdtemp())
ADS = {"attn": (4, ("q_proj", "v_proj")), "mlp": (2, ("gate_proj", "down_proj")),
       "mix": (8, ("k_proj", "o_proj", "up_proj")), "all": (16, ALL_TARGETS)}

def lm_on(dtype, merged=None, **shape):
    m = random_model(0, vocab_size=512, max_seq_len=512, **shape)
    if merged: merge_adapter(m, merged)
    return LoadedModel(m.to(dev, dtype), FakeTokenizer(), Path("tiny"))

def run_named(engine, prompts, names, params=P):
    ids = [engine.add_request(p, params, lora=n) for p, n in zip(prompts, names)]
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished: done[o.request_id] = o
    return [done[i].token_ids for i in ids]

def check(dtype, shape, n=24, label=""):
    base = random_model(0, vocab_size=512, max_seq_len=512, **shape)
    for i, (name, (r, t)) in enumerate(ADS.items()):
        write_adapter(tmp / f"{label}{name}", base, r, t, seed=i, std=0.3 if not shape else 0.05)
    ads = {n_: tmp / f"{label}{n_}" for n_ in ADS}
    names = [[None, "attn", "mlp", "mix", "all"][i % 5] for i in range(n)]
    prompts = random_prompts(n, 3, 60, seed=1, vocab=512)
    results = {}
    for mode, opts in {"graphs": {}, "eager": dict(cuda_graphs=False, async_scheduling=False),
                       "tight": dict(max_loras=1)}.items():
        eng = make_engine(lm_on(dtype, **shape), **{**dict(enable_lora=True, max_loras=4, max_lora_rank=16,
                          num_kv_blocks=512), **opts})
        for k, v in ads.items(): eng.add_lora(k, v)
        t = time.time()
        results[mode] = run_named(eng, prompts, names)
        torch.cuda.synchronize()
        print(f"[{label}{dtype}] {mode}: {time.time()-t:.2f}s graphs={eng.runner.use_graphs} ngraphs={len(eng.runner.graphs)} "
              f"loads={eng.runner.lora.num_loads} evictions={eng.runner.lora.num_evictions} ahead={eng.num_steps_ahead}", flush=True)
    merged = []
    for p, nm in zip(prompts, names):
        merged.append(run_engine(make_engine(lm_on(dtype, ads.get(nm), **shape), num_kv_blocks=64, cuda_graphs=False), [p], P)[0].token_ids)
    def agree(a, b):
        same = sum(x == y for x, y in zip(a, b)); full = sum(x == y for x, y in zip(a, b) if True)
        prefix = [next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), len(x)) for x, y in zip(a, b)]
        return f"{sum(x == y for x, y in zip(a, b))}/{len(a)} identical, mean common prefix {sum(prefix)/len(prefix):.1f}/{len(a[0])}"
    print(f"[{label}{dtype}] graphs vs eager: {agree(results['graphs'], results['eager'])}")
    print(f"[{label}{dtype}] graphs vs tight(max_loras=1): {agree(results['graphs'], results['tight'])}")
    print(f"[{label}{dtype}] graphs vs merged alone: {agree(results['graphs'], merged)}")
    print(f"[{label}{dtype}] eager vs merged alone: {agree(results['eager'], merged)}")
    base_rows = [i for i, n in enumerate(names) if n is None]
    print(f"[{label}{dtype}] base rows vs merged(base): {sum(results['graphs'][i] == merged[i] for i in base_rows)}/{len(base_rows)}", flush=True)

check(torch.float32, {}, label="tiny-")
check(torch.bfloat16, dict(hidden_size=512, intermediate_size=1024, num_layers=4, num_heads=8, num_kv_heads=2), label="mid-")
