"""LoRA training speed and memory: longseq against transformers + PEFT, same shape, same settings, same GPU.

    python benchmarks/train_speed.py --lengths 4096 16384 32768 --out results.json

Llama-3-8B shape with random bf16 weights, LoRA r=16 / alpha 32 on all seven linear layers, gradient
checkpointing of every decoder layer, bf16 autocast, batch 1, AdamW on the adapters. Each (side, length) runs in
its own process, so peak memory is that run's alone: 2 warm-up steps, then the median of --steps timed steps
(forward + backward + optimizer step). tokens/s = seq_len / step time. MFU counts 6N + 12*L*d*S model FLOPs per
token (PaLM appendix B) against the GPU's dense bf16 peak from longseq.plan.hardware (H100 SXM: 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
    rope_parameters=dict(rope_type="default", rope_theta=500000.0),
)
RANK, ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_llama3_8b():
    """Our model in the Llama-3-8B shape on the GPU, random bf16 weights (built on `meta`, filled in place)."""
    from longseq.config.hf import from_hf
    from longseq.models.llama import CausalLM

    cfg = from_hf({"model_type": "llama", **LLAMA3_8B})
    with torch.device("meta"):
        model = CausalLM(cfg).to(torch.bfloat16)
    model.to_empty(device="cuda")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    model.rotary.reset("cuda")
    return model


def build_longseq():
    from longseq.config import TrainConfig
    from longseq.train.lora import apply_lora
    from longseq.train.loss import chunked_cross_entropy

    model = random_llama3_8b()
    apply_lora(model, TrainConfig(lora_rank=RANK, lora_alpha=ALPHA, lora_targets=tuple(TARGETS)))
    model.set_recompute("full")
    model.train()

    def step_loss(ids):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model.hidden(ids)
            targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
            # 1024 tokens per chunk: longseq train's default --loss-chunk
            return chunked_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, targets.flatten(), 1024) / (
                ids.numel() - 1)

    return model, step_loss


def build_hf(autocast: bool = True, liger: bool = False):
    """transformers + PEFT, SDPA, gradient checkpointing; liger: with Liger kernels (fused linear cross-entropy,
    RMSNorm, RoPE, SwiGLU) patched into the Llama modules first, as HF Trainer's `use_liger_kernel` does."""
    import peft
    import transformers

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)

    cfg = transformers.LlamaConfig(**LLAMA3_8B)
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                       target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()

    def step_loss(ids):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return model(input_ids=ids, labels=ids).loss

    return model, step_loss


def timed_steps(model, step_loss, seq_len: int, count: int, log: bool = False):
    """`count` AdamW steps on one random sequence, peak memory counted from the first: (trainable parameters,
    each step's synchronized wall time, each step's loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, LLAMA3_8B["vocab_size"], (1, seq_len), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(count):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step_loss(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if log:
            print(f"step {i}: {times[-1]:.2f} s loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    return params, times, losses


def run_one(side: str, seq_len: int, steps: int) -> dict:
    torch.manual_seed(0)
    # hf: under bf16 autocast like longseq; hf-bf16: no autocast (bf16 weights, PEFT keeps adapters in fp32)
    model, step_loss = build_longseq() if side == "longseq" else build_hf(autocast=side == "hf")
    params, times, losses = timed_steps(model, step_loss, seq_len, 2 + steps)
    times = times[2:]  # two warm-up steps
    step = statistics.median(times)
    from longseq.config.hf import from_hf
    from longseq.plan.flops import train_flops_per_token
    from longseq.plan.hardware import find_gpu
    from longseq.train.metrics import matmul_params

    cfg = from_hf({"model_type": "llama", **LLAMA3_8B})
    flops_per_token = train_flops_per_token(matmul_params(cfg), cfg.num_layers, cfg.hidden_size, seq_len)
    peak = find_gpu(torch.cuda.get_device_name()).bf16_tflops * 1e12
    return dict(side=side, seq_len=seq_len, step_s=round(step, 3), tokens_per_s=round(seq_len / step, 1),
                mfu=round(seq_len / step * flops_per_token / peak, 4),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                trainable=sum(p.numel() for p in params), first_loss=round(losses[0], 4), step_times=times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--sides", nargs="+", default=["longseq", "hf", "hf-bf16"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--one", nargs=2, metavar=("SIDE", "LEN"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default="train_speed.json")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one[0], int(args.one[1]), args.steps)), flush=True)
        return
    import peft
    import transformers

    rows = []
    for seq_len in args.lengths:
        for side in args.sides:
            proc = subprocess.run([sys.executable, __file__, "--one", side, str(seq_len), "--steps", str(args.steps)],
                                  capture_output=True, text=True)
            found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if found:
                row = json.loads(found[0][7:])
            else:  # out of memory or another failure: record it, go on
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                row = dict(side=side, seq_len=seq_len, error="OOM" if "out of memory" in proc.stderr else tail[:200])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "step_times"}), flush=True)
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
               transformers=transformers.__version__, peft=peft.__version__)
    with open(args.out, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=2)
    print(json.dumps(env))


if __name__ == "__main__":
    main()
