"""Long-context LoRA / QLoRA training: longseq (techniques picked by its planner) against transformers + PEFT.

    PYTHONPATH=src python benchmarks/long_context.py --runs longseq:4096 liger:4096 hf:4096 longseq:131072 \
        qlora:262144 longseq:32768:auto:32.1 --out long_context.json

Llama-3-8B shape, random bf16 weights, LoRA r=16 / alpha 32 on all seven linear layers, batch 1, one random
sequence, AdamW on the adapters. Each run is its own process (its peak memory is its own):
- `longseq` / `qlora`: the memory techniques `longseq train` would pick on this GPU (train/memory_plan.py: recompute
  none / selective / full / offloaded, tiled norms and MLPs), chunked LM-head + loss, bf16 autocast.
- `hf`: transformers + PEFT, SDPA attention, gradient checkpointing, under the same bf16 autocast.
- `liger`: the same with Liger kernels (liger-kernel: fused linear cross-entropy, RMSNorm, RoPE, SwiGLU), the peer
  most HF Trainer / Axolotl / LLaMA-Factory users run.
A longseq run's spec may end in a memory budget, `longseq:32768:auto:32.1`: `--gpu-memory 32.1` (GiB); `liger` or
`hf` in its place takes that peer's measured peak (allocated) at the same length from an earlier run of the list,
so that both sides are held to the same memory.
All runs use PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (less fragmentation, for both sides). longseq's
attention is FlashAttention-4 where flash-attn-4 is installed (each row's `attention`), else SDPA; runs timed without
a warm-up step (past 128K) first run attention on 1K tokens (FA4 compiles its kernels on first use), and, as the
trainer does, page-lock the offloaded layer inputs' host buffers before the first step.
Step = forward + backward + optimizer step; tokens/s = seq_len / median step time. MFU counts model FLOPs per token
6N + 6·L·d·S (causal attention: half the S×S scores; N = 7.5e9 matmul parameters) against 989.4 TFLOP/s; the PaLM
convention (6N + 12·L·d·S, non-causal) is reported beside it. Peak host memory is the process's VmHWM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_speed import ALPHA, LLAMA3_8B, RANK, TARGETS, build_hf, random_llama3_8b, timed_steps  # noqa: E402


def host_peak_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def build_longseq(method: str, seq_len: int, recompute: str | None, gpu_memory: float | None = None):
    from longseq.config import TrainConfig
    from longseq.train.lora import make_trainable
    from longseq.train.memory_plan import plan_memory
    from longseq.train.step import TokenLoss

    model = random_llama3_8b()
    tcfg = TrainConfig(data=("-",), method=method, seq_len=seq_len, lora_rank=RANK, lora_alpha=ALPHA,
                       lora_targets=tuple(TARGETS), recompute=recompute or "auto",
                       gpu_memory=gpu_memory)
    make_trainable(model, tcfg)
    torch.cuda.empty_cache()
    choice = plan_memory(model, tcfg, "bf16", torch.device("cuda"), packed=False)
    model.train()
    loss_of = TokenLoss(model, 1024)  # the trainer's step module: `hidden` is freed before the layers' backward

    def step_loss(ids):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            return loss_of(ids, positions, None, targets) / (ids.numel() - 1)

    return model, step_loss, choice


PEERS = ("hf", "liger")


def run_one(side: str, seq_len: int, warmup: int, steps: int, recompute: str | None,
            gpu_memory: float | None = None) -> dict:
    torch.manual_seed(0)
    row: dict = dict(side=side, seq_len=seq_len)
    if side in PEERS:
        model, step_loss = build_hf(autocast=True, liger=side == "liger")
    else:
        model, step_loss, choice = build_longseq("qlora" if side == "qlora" else "lora", seq_len, recompute,
                                                 gpu_memory)
        from longseq.models import fused

        row.update(forced=recompute is not None, gpu_memory=gpu_memory, fused=fused.available(),
                   recompute=choice.recompute,
                   tile=choice.tile, offload_keep=choice.offload_keep, plain_layers=choice.plain_layers,
                   predicted_gib=round(choice.predicted_gib, 2), predicted_host_gib=round(choice.host_gib, 2),
                   planned=choice.describe())
    if side not in PEERS:
        row["attention"] = warm_attention(seq_len) if warmup == 0 else attention_kernel()
    _, times, losses = timed_steps(model, step_loss, seq_len, warmup + steps, log=True)
    step = statistics.median(times[warmup:])
    if os.environ.get("LONG_CONTEXT_PROFILE"):
        row["profile_s"] = profile_step(model, step_loss, seq_len,
                                        os.path.join(os.environ["LONG_CONTEXT_PROFILE"], f"{side}_{seq_len}.txt"))
    from longseq.config.hf import from_hf
    from longseq.plan.hardware import find_gpu
    from longseq.train.metrics import matmul_params

    cfg = from_hf({"model_type": "llama", **LLAMA3_8B})
    n, layers, d = matmul_params(cfg), cfg.num_layers, cfg.hidden_size
    peak = find_gpu(torch.cuda.get_device_name()).bf16_tflops * 1e12
    tps = seq_len / step
    offloader = getattr(model, "offloader", None)
    row.update(step_s=round(step, 3), tokens_per_s=round(tps, 1),
               mfu_causal=round(tps * (6 * n + 6 * layers * d * seq_len) / peak, 4),
               mfu_palm=round(tps * (6 * n + 12 * layers * d * seq_len) / peak, 4),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
               reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
               host_peak_gib=round(host_peak_gib(), 2),
               pinned_gib=round(offloader.host_bytes / 2**30, 2) if offloader is not None else 0.0,
               warmup=warmup, timed=steps, losses=[round(x, 4) for x in losses], step_times=times)
    return row


def attention_kernel() -> str:
    from longseq.attention import flash

    head_dim = LLAMA3_8B["hidden_size"] // LLAMA3_8B["num_attention_heads"]
    return flash.describe("auto", True, torch.device("cuda"), torch.bfloat16, head_dim)


def warm_attention(seq_len: int) -> str:
    """Runs timed without a warm-up step (long ones): compile FA4's kernels (CuTe DSL, on first use) or build
    cuDNN's plans for this run's head groups on a short sequence, outside the timed step."""
    from longseq.attention import attention
    from longseq.config import policy

    heads, kv_heads = LLAMA3_8B["num_attention_heads"], LLAMA3_8B["num_key_value_heads"]
    dim = LLAMA3_8B["hidden_size"] // heads
    groups, short = policy.attention_groups(kv_heads, seq_len), 1024
    real, policy.ATTENTION_GROUP_TOKENS = policy.ATTENTION_GROUP_TOKENS, short if groups > 1 else 1 << 62
    try:
        q, k, v = (torch.randn(1, short, h, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
                   for h in (heads, kv_heads, kv_heads))
        attention(q, k, v).sum().backward()
        torch.cuda.synchronize()
    finally:
        policy.ATTENTION_GROUP_TOKENS = real
    return attention_kernel()


KERNEL_KINDS = (("attention", ("flash", "fmha", "cudnn", "attn")),
                ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk")),
                ("copies", ("memcpy", "memset")))


def profile_step(model, step_loss, seq_len: int, path: str) -> dict:
    """One more forward + backward under torch.profiler: GPU kernel seconds by kind (attention, matmul, copies,
    the rest: norms, RoPE, SwiGLU, adds, casts, loss), and the 40 costliest kernels written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, LLAMA3_8B["vocab_size"], (1, seq_len), device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step_loss(ids).backward()
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    kinds: dict[str, float] = {}
    for e in prof.key_averages():
        seconds = e.device_time_total / 1e6
        if seconds <= 0:
            continue
        name = e.key.lower()
        kind = next((k for k, words in KERNEL_KINDS if any(w in name for w in words)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + seconds
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="device_time_total", row_limit=40, max_name_column_width=90))
    return {k: round(v, 4) for k, v in sorted(kinds.items())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", default=[],
                    help="SIDE:LEN[:RECOMPUTE[:GPU_MEMORY_GIB]], SIDE in longseq, qlora, hf, liger; RECOMPUTE auto: "
                    "the planner's choice; GPU_MEMORY_GIB hf / liger: that peer's peak at this length")
    ap.add_argument("--out", default="long_context.json")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--profile", help="folder: profile one extra step of each run (kernel seconds by kind)")
    ap.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        side, n, warm, steps, rc, budget = args.one
        row = run_one(side, int(n), int(warm), int(steps), None if rc in ("-", "auto") else rc,
                      None if budget == "-" else float(budget))
        print("RESULT " + json.dumps(row), flush=True)
        return
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    if args.profile:
        env["LONG_CONTEXT_PROFILE"] = os.path.abspath(args.profile)
    rows = []
    for spec in args.runs:
        side, n, *rest = spec.split(":")
        n, rc, budget = int(n), (rest + ["-", "-"])[0], (rest + ["-", "-"])[1]
        if budget in PEERS:  # the peer's measured peak at this length
            peer = [r for r in rows if r["side"] == budget and r["seq_len"] == n and "peak_gib" in r]
            if not peer:
                print(f"skipping {spec}: no {budget} run at {n} tokens before it", flush=True)
                continue
            budget = str(peer[-1]["peak_gib"])
        warm, steps = (1, 2) if n <= 65536 else (1, 1) if n <= 131072 else (0, 1)
        cmd = [sys.executable, __file__, "--one", side, str(n), str(warm), str(steps), rc, budget]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
            out, err = proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            out, err = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        found = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if found:
            row = json.loads(found[0][7:])
        else:
            tail = (err.strip().splitlines() or ["?"])[-1]
            row = dict(side=side, seq_len=n, error="OOM" if "out of memory" in err else tail[:300])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "step_times"}), flush=True)
        with open(args.out, "w") as f:  # after every run: a later timeout keeps what finished
            json.dump({"env": _env(), "rows": rows}, f, indent=2)


def _env() -> dict:
    import peft
    import transformers

    try:
        from importlib.metadata import version

        liger = version("liger-kernel")
    except Exception:
        liger = None
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                transformers=transformers.__version__, peft=peft.__version__, liger_kernel=liger)


if __name__ == "__main__":
    main()
