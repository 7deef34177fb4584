"""Mixture-of-experts LoRA training step: the expert compute's paths (grouped GEMM, padded bmm, per-expert loop)
timed on the same model, same batch, same GPU.

    python benchmarks/moe_train_speed.py --lengths 8192 32768 --layers 4 --out moe.json

Qwen3-30B-A3B shape (128 experts, top 8, expert width 768, d 2048) cut to --layers decoder layers, random bf16
weights, LoRA r=16 / alpha 32 on attention and on every expert's stacked gate_up / down projections, full
recompute, bf16 autocast, batch 1, AdamW on the adapters. Per (path, length): 2 warm-up steps, then the median of
--steps timed steps (forward + backward + optimizer step) and the peak allocated memory. `--shape tiny --device cpu`
checks the script itself on a CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SHAPES = {
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=40960,
                          rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
    "tiny": dict(model_type="qwen3_moe", vocab_size=512, hidden_size=64, intermediate_size=128,
                 moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096),
}


def build(shape: str, layers: int, device: str):
    """Our model of `shape` with `layers` layers, random weights in bf16 (float32 on CPU), LoRA applied."""
    from longseq.config import TrainConfig
    from longseq.config.hf import from_hf
    from longseq.models.llama import CausalLM
    from longseq.train.lora import make_trainable

    cfg = from_hf({**SHAPES[shape], "num_hidden_layers": layers})
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device("meta"):
        model = CausalLM(cfg).to(dtype)
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    model.rotary.reset(device)
    make_trainable(model, TrainConfig(method="lora", lora_rank=16, lora_alpha=32))
    model.set_recompute("full")
    return model.train()


def run(model, mode: str, seq_len: int, steps: int, device: str) -> dict:
    from longseq.models.sparse_moe import SparseMoeBlock
    from longseq.train.step import TokenLoss

    for block in model.modules():
        if isinstance(block, SparseMoeBlock):
            block.mode = mode
    step_model = TokenLoss(model, 4096)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), device=device)
    cuda = device == "cuda"
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(2 + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = step_model(ids, None, None, ids) / seq_len
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {"mode": mode, "seq_len": seq_len, "step_s": step, "tokens_per_s": seq_len / step, "loss": loss.item(),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192])
    ap.add_argument("--modes", nargs="+", default=["grouped_mm", "padded", "loop"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = build(args.shape, args.layers, args.device)
    rows = []
    for seq_len in args.lengths:
        for mode in args.modes:
            rows.append(run(model, mode, seq_len, args.steps, args.device))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
