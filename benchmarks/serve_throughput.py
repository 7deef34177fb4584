"""Offline serving throughput: longseq's engine against transformers `generate`, same weights, same run.

    python benchmarks/serve_throughput.py --requests 1000 --input-len 256 --output-len 256 --out serve.json

Llama-3-8B shape with random bf16 weights (shared by both sides: no second copy), random prompts, exactly
--output-len tokens each (EOS ignored). longseq: every request submitted at once to `LLMEngine` (continuous
batching, paged KV pool sized from measured memory). transformers: `generate` in static batches of
--hf-batch over the first --hf-requests prompts. Throughput = (input + output tokens) / wall time, as vLLM's
benchmark_throughput reports it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_parameters=dict(rope_type="default", rope_theta=500000.0),
)


class NullTokenizer:
    """Random token ids have no text worth decoding; the engine's detokenizer still runs on every token."""

    eos_token_id = None
    pad_token_id = None

    def decode(self, ids, **kwargs) -> str:
        return "x" * len(ids)


def copy_bandwidth(gib: int = 4) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read and written (the issue's 2.9 TB/s convention)."""
    x = torch.empty(gib * 2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    rate = 10 * 2 * x.numel() / (start.elapsed_time(end) / 1e3)
    del x, y
    torch.cuda.empty_cache()
    return rate


def batch1_decode(engine, model, prompt: list[int], new_tokens: int, bandwidth: float, repeats: int = 3) -> dict:
    """One request alone in the engine (CUDA-graph decode at batch 1): decode tok/s = (n - 1) / (last token time -
    first token time), median of `repeats`, against the bound copy rate / weight bytes (every weight read once per
    token)."""
    from longseq.generation.sampling import SamplingParams

    rates = []
    for _ in range(repeats + 1):  # the first is a warm-up
        engine.add_request(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
        m = outs[-1].metrics
        rates.append((len(outs[-1].token_ids) - 1) / (m["finished"] - m["first_token"]))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    decode = sorted(rates[1:])[len(rates[1:]) // 2]
    bound = bandwidth / weight_bytes
    return dict(prompt_len=len(prompt), new_tokens=new_tokens, decode_tokens_per_s=round(decode, 1),
                runs=[round(r, 1) for r in rates[1:]], copy_tb_per_s=round(bandwidth / 1e12, 3),
                weight_gb=round(weight_bytes / 1e9, 2), bound_tokens_per_s=round(bound, 1),
                share_of_bound=round(decode / bound, 3))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--hf-requests", type=int, default=32)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import transformers

    from longseq.config import EngineConfig
    from longseq.config.hf import from_hf
    from longseq.engine.llm_engine import LLMEngine
    from longseq.generation.sampling import SamplingParams
    from longseq.models.llama import CausalLM
    from longseq.models.loader import LoadedModel

    with torch.device("cuda"):
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**LLAMA3_8B),
                                                           dtype=torch.bfloat16).eval()
    with torch.device("meta"):
        ours = CausalLM(from_hf({"model_type": "llama", **LLAMA3_8B}))
    ours.load_state_dict(hf.state_dict(), assign=True, strict=False)  # the same tensors: no extra memory
    ours.tie_weights()
    ours.rotary.reset("cuda")
    ours.eval()

    torch.manual_seed(1)
    prompts = torch.randint(0, LLAMA3_8B["vocab_size"], (args.requests, args.input_len)).tolist()
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    result = {"requests": args.requests, "input_len": args.input_len, "output_len": args.output_len}

    bandwidth = copy_bandwidth()  # before the engine gives the GPU's free memory to its KV pool
    cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       max_model_len=args.input_len + args.output_len + 16)
    engine = LLMEngine(LoadedModel(ours, NullTokenizer(), Path("random")), cfg)
    result["kv_blocks"] = engine.blocks.num_blocks
    result["gemv"] = engine.runner.gemv_report
    for p in prompts[:4]:  # warm-up
        engine.add_request(p, SamplingParams(max_new_tokens=8, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    steps = generated = 0
    while engine.has_unfinished():
        generated += len(engine.step())
        steps += 1
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    total = args.requests * (args.input_len + args.output_len)
    result["longseq"] = dict(seconds=round(elapsed, 2), tokens_per_s=round(total / elapsed, 1),
                             output_tokens_per_s=round(generated / elapsed, 1), steps=steps,
                             preempted=engine.scheduler.num_preempted)
    print(json.dumps(result), flush=True)
    result["batch1"] = batch1_decode(engine, ours, prompts[0][:128], args.output_len, bandwidth)
    print(json.dumps(result["batch1"]), flush=True)

    hf_prompts = torch.tensor(prompts[: args.hf_requests], device="cuda")
    kw = dict(do_sample=False, max_new_tokens=args.output_len, min_new_tokens=args.output_len, pad_token_id=0,
              eos_token_id=None)
    hf.generate(hf_prompts[:2, :16], attention_mask=torch.ones_like(hf_prompts[:2, :16]), max_new_tokens=4,
                do_sample=False, pad_token_id=0)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(hf_prompts), args.hf_batch):
        batch = hf_prompts[i : i + args.hf_batch]
        hf.generate(batch, attention_mask=torch.ones_like(batch), **kw)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    total = len(hf_prompts) * (args.input_len + args.output_len)
    result["transformers"] = dict(seconds=round(elapsed, 2), tokens_per_s=round(total / elapsed, 1),
                                  output_tokens_per_s=round(len(hf_prompts) * args.output_len / elapsed, 1),
                                  batch=args.hf_batch, requests=len(hf_prompts))
    from longseq.attention.paged import use_decode_kernel
    from longseq.models import fused

    result["env"] = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                         transformers=transformers.__version__, fused_kernels=fused.available(),
                         paged_decode_kernel=use_decode_kernel(torch.device("cuda"), 128),
                         peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
