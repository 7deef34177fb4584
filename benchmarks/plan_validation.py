"""`longseq plan` predicted vs measured, on one GPU: longseq's trainer step and serving engine over many configs.

    python benchmarks/plan_validation.py --out results/plan-validation      (default: $OUT, else ./plan_validation)
    python benchmarks/plan_validation.py --device cpu --quick              (harness smoke run: tiny shapes, no memory)

Training rows run longseq's own step (train/loop.py `train_step`: bf16 autocast, chunked loss, grad clipping,
the optimizer) on random weights of a model shape, each in its own process so its peak is its own: the model is
built as `longseq train` builds it (fp32 masters for full fine-tuning, bf16 base + fp32 adapters for LoRA, NF4
after loading for QLoRA), then 1 warm-up and 2 timed steps. Memory: torch.cuda.max_memory_allocated after
reset_peak_memory_stats (the QLoRA load peak is read before the reset). Engine rows build LLMEngine, which sizes its
KV pool from measured memory (and record beside it the block count `--kv-pool plan` gives in the same memory), then
time decode steps of a batch. A row that runs out of memory is recorded as OOM
(with the prediction, which should say it does not fit). Writes validation.json and validation.md to --out.
Runtime on one H100: about 6 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from longseq.plan.random_shapes import spec_for  # noqa: E402

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def T(model, method, recompute, seq_len, batch=1, optimizer="adamw"):  # noqa: N802  (a row of the table)
    return dict(kind="train", model=model, method=method, recompute=recompute, seq_len=seq_len, batch=batch,
                optimizer=optimizer)


def E(model, fraction, batched_tokens, batch=32, prompt=512):  # noqa: N802
    return dict(kind="engine", model=model, fraction=fraction, batched_tokens=batched_tokens, batch=batch,
                prompt=prompt)


CONFIGS = [
    T("Llama-3-8B", "lora", "full", 4096), T("Llama-3-8B", "lora", "full", 8192),
    T("Llama-3-8B", "lora", "full", 16384),
    T("Llama-3-8B", "lora", "selective", 4096), T("Llama-3-8B", "lora", "none", 2048),
    T("Llama-3-8B", "lora", "none", 2048, batch=2), T("Llama-3-8B", "qlora", "full", 4096),
    T("Llama-3-8B", "qlora", "none", 2048),
    T("TinyLlama-1.1B", "full", "none", 2048), T("TinyLlama-1.1B", "full", "selective", 2048),
    T("TinyLlama-1.1B", "full", "full", 4096), T("TinyLlama-1.1B", "full", "full", 4096, batch=2),
    T("TinyLlama-1.1B", "lora", "none", 4096), T("TinyLlama-1.1B", "lora", "selective", 4096, batch=2),
    T("TinyLlama-1.1B", "qlora", "full", 8192), T("TinyLlama-1.1B", "full", "full", 4096, optimizer="adamw8bit"),
    T("Qwen2.5-0.5B", "lora", "none", 4096, batch=2), T("Qwen2.5-0.5B", "lora", "full", 16384),
    T("Qwen2.5-0.5B", "full", "none", 2048, batch=2), T("Qwen2.5-0.5B", "full", "full", 8192),
    T("Qwen2.5-0.5B", "qlora", "selective", 4096),
    T("SmolLM2-360M", "full", "none", 4096), T("SmolLM2-360M", "full", "selective", 4096, batch=2),
    T("SmolLM2-360M", "lora", "full", 16384), T("SmolLM2-360M", "qlora", "none", 4096),
    T("Qwen3-1.7B", "lora", "none", 4096), T("Qwen3-1.7B", "lora", "full", 16384),
    T("Qwen3-1.7B", "full", "full", 4096),
    T("Qwen3-1.7B", "qlora", "full", 8192),
    T("random-d1024", "lora", "none", 8192, batch=2), T("random-d1024", "full", "none", 2048, batch=2),
    T("random-d1024", "lora", "selective", 16384),
    E("Llama-3-8B", 0.9, 2048), E("Llama-3-8B", 0.9, 8192, batch=64), E("Qwen2.5-0.5B", 0.5, 2048),
    E("TinyLlama-1.1B", 0.8, 4096),
]
QUICK = [T("random-tiny", "lora", "full", 256), T("random-tiny", "full", "none", 128, batch=2),
         T("random-tiny", "qlora", "selective", 256), E("random-tiny", 0.9, 256, batch=4, prompt=32)]


def build_model(spec, dtype, device):
    import torch

    from longseq.models.llama import CausalLM

    with torch.device("meta"):
        model = CausalLM(spec.config)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()  # to_empty gives tied parameters separate storage
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    model.rotary.reset(device)
    return model


def run_train(row: dict, device_name: str) -> dict:
    import torch

    from longseq.config import TrainConfig
    from longseq.train.lora import make_trainable
    from longseq.train.optim import build_optimizer
    from longseq.train.precision import resolve_precision
    from longseq.train.step import train_step

    device = torch.device(device_name)
    spec = spec_for(row["model"])
    cfg = TrainConfig(method=row["method"], recompute=row["recompute"], seq_len=row["seq_len"],
                      batch_size=row["batch"], optimizer=row["optimizer"], lora_rank=16, lora_alpha=32, loss_chunk=1024)
    precision = resolve_precision("bf16", device)
    model = build_model(spec, torch.float32 if cfg.method == "full" else torch.bfloat16, device)
    make_trainable(model, cfg)
    model.set_recompute(cfg.recompute)
    model.train()
    optimizer = build_optimizer(model, cfg, device)
    cuda = device.type == "cuda"
    load_peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.config.vocab_size, (row["batch"], row["seq_len"]), generator=g)
    batch = SimpleNamespace(input_ids=ids, targets=torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1),
                            positions=torch.arange(row["seq_len"]).expand_as(ids).contiguous(),
                            doc_ids=torch.zeros_like(ids))
    times = []
    for i in range(3):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        train_step(model, [batch], cfg, precision, device, optimizer, None)
        if cuda:
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return dict(peak_gib=peak, load_peak_gib=load_peak, step_s=statistics.median(times))


class _Tokenizer:
    eos_token_id = None
    chat_template = None

    def decode(self, ids, **_):
        return "".join(f" w{int(i)}" for i in ids)

    def __call__(self, text):
        return {"input_ids": [int(w[1:]) for w in text.split()]}


def run_engine(row: dict, device_name: str) -> dict:
    import torch

    from longseq.config import EngineConfig
    from longseq.engine import LLMEngine
    from longseq.generation import SamplingParams
    from longseq.models.loader import LoadedModel

    device = torch.device(device_name)
    spec = spec_for(row["model"])
    model = build_model(spec, torch.bfloat16, device).eval()
    cfg = EngineConfig(gpu_memory_fraction=row["fraction"], max_num_batched_tokens=row["batched_tokens"],
                       max_num_seqs=256, num_kv_blocks=None if device.type == "cuda" else 64)
    engine = LLMEngine(LoadedModel(model, _Tokenizer(), Path(row["model"])), cfg)
    kv_tokens = engine.runner.num_blocks * cfg.kv_block_size
    planned_blocks = None
    if device.type == "cuda":  # what `--kv-pool plan` would have given, in the same memory (no step run for it)
        from longseq.engine.model_runner import planned_reserve

        planned_blocks = engine.runner.kv_blocks_left(planned_reserve(model, cfg))
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    for _ in range(row["batch"]):
        engine.add_request(torch.randint(0, spec.config.vocab_size, (row["prompt"],), generator=g).tolist(), params)
    while any(not s.output_ids for s in engine.seqs.values()):
        engine.step()  # prefill every prompt (chunked by max_num_batched_tokens)
    times = []
    for _ in range(8):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return dict(kv_tokens=kv_tokens, num_blocks=engine.runner.num_blocks, planned_blocks=planned_blocks,
                decode_tokens_per_s=row["batch"] / statistics.median(times))


def predict(row: dict, device_name: str) -> dict:
    from longseq.plan.hardware import GPUS, find_gpu
    from longseq.plan.serving import ServeSetup, plan_serve
    from longseq.plan.setup import TrainSetup
    from longseq.plan.training import plan_train

    gpu = (find_gpu(device_name) if device_name else None) or GPUS["H100"]
    spec = spec_for(row["model"])
    if row["kind"] == "train":
        setup = TrainSetup(method=row["method"], seq_len=row["seq_len"], batch_size=row["batch"],
                           recompute=row["recompute"], optimizer=row["optimizer"], loss_chunk=1024, keep_hidden=True)
        plan = plan_train(spec, gpu, setup)
        out = dict(peak_gib=plan.memory.allocated / 2**30, step_s=plan.step_time_s, fits=plan.fits,
                   phase=plan.memory.activation.phase)
        if row["method"] == "qlora":  # longseq loads the bf16 weights on the GPU, then quantizes them
            out["load_peak_gib"] = plan.memory.load_peak / 2**30
        return out
    plan = plan_serve(spec, gpu, ServeSetup(gpu_memory_fraction=row["fraction"], context=row["prompt"] + 16,
                                            batch=row["batch"], max_num_batched_tokens=row["batched_tokens"]))
    return dict(kv_tokens=plan.kv_tokens, decode_tokens_per_s=plan.decode_tokens_per_s, fits=plan.fits)


def one(row: dict, device: str) -> dict:
    run = run_train if row["kind"] == "train" else run_engine
    return run(row, device)


def _error(pred, meas):
    return None if pred is None or not meas else round(pred / meas - 1, 4)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "plan_validation")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes only (harness check)")
    ap.add_argument("--only", type=int, nargs="*", help="row indices to run")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(json.loads(args.one), args.device)), flush=True)
        return
    rows = QUICK if args.quick else CONFIGS
    if args.only:
        rows = [rows[i] for i in args.only]
    device_name = ""
    if args.device.startswith("cuda"):
        import torch

        device_name = torch.cuda.get_device_name(torch.device(args.device))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, started = [], time.perf_counter()
    for i, row in enumerate(rows):
        pred = predict(row, device_name)
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(row), "--device", args.device],
                                  capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired:
            proc = SimpleNamespace(stdout="", stderr="timed out after 240 s")
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if found:
            meas = json.loads(found[0][7:])
        else:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            meas = {"error": "OOM" if "out of memory" in proc.stderr.lower() else tail[:200]}
        rec = dict(row=row, predicted=pred, measured=meas)
        for key in ("peak_gib", "load_peak_gib", "step_s", "kv_tokens", "decode_tokens_per_s"):
            if key in pred and meas.get(key) is not None:
                rec[f"error_{key}"] = _error(pred[key], meas[key])
        if meas.get("planned_blocks") is not None:  # the engine's own --kv-pool plan against its measured pool
            rec["error_planned_blocks"] = _error(meas["planned_blocks"], meas["num_blocks"])
        results.append(rec)
        print(f"[{i + 1}/{len(rows)} {time.perf_counter() - started:.0f}s] {json.dumps(rec)}", flush=True)
    env = {"device": device_name or args.device, "python": sys.version.split()[0]}
    try:
        import torch

        env["torch"] = torch.__version__
    except ImportError:
        pass
    (out / "validation.json").write_text(json.dumps({"env": env, "rows": results}, indent=2))
    (out / "validation.md").write_text(markdown(results, env))
    print((out / "validation.md").read_text())


def markdown(results: list[dict], env: dict) -> str:
    lines = [f"# longseq plan: predicted vs measured ({env['device']}, torch {env.get('torch', '?')})", "",
             "| # | model | method | recompute | seq × batch | opt | peak GiB meas | pred | err | step s meas | pred | "
             "err | peak moment |", "|" + "---|" * 13]
    engine = ["", "| # | model | fraction | batched tokens | KV tokens meas | pred | err | KV blocks: measure | "
              "plan | err | decode tok/s meas | bound | meas / bound |", "|" + "---|" * 13]
    train_errors = []
    for i, rec in enumerate(results):
        r, p, m = rec["row"], rec["predicted"], rec["measured"]
        if r["kind"] == "train":
            if "error" in m:
                lines.append(f"| {i} | {r['model']} | {r['method']} | {r['recompute']} | {r['seq_len']} × {r['batch']}"
                             f" | {r['optimizer']} | {m['error']} | {p['peak_gib']:.2f} | predicted fits: {p['fits']}"
                             f" | | {p['step_s']:.3f} | | {p['phase']} |")
                continue
            err = rec.get("error_peak_gib")
            if err is not None:
                train_errors.append(abs(err))
            peak = "–" if m["peak_gib"] is None else f"{m['peak_gib']:.2f}"
            lines.append(f"| {i} | {r['model']} | {r['method']} | {r['recompute']} | {r['seq_len']} × {r['batch']} | "
                         f"{r['optimizer']} | {peak} | {p['peak_gib']:.2f} | {_pct(err)} | {m['step_s']:.3f} | "
                         f"{p['step_s']:.3f} | {_pct(rec.get('error_step_s'))} | {p['phase']} |")
        else:
            if "error" in m:
                engine.append(f"| {i} | {r['model']} | {r['fraction']} | {r['batched_tokens']} | {m['error']} | "
                              f"{p['kv_tokens']:,} | | | | | | | |")
                continue
            ratio = m["decode_tokens_per_s"] / p["decode_tokens_per_s"]
            planned = "–" if m.get("planned_blocks") is None else f"{m['planned_blocks']:,}"
            engine.append(f"| {i} | {r['model']} | {r['fraction']} | {r['batched_tokens']} | {m['kv_tokens']:,} | "
                          f"{p['kv_tokens']:,} | {_pct(rec.get('error_kv_tokens'))} | {m.get('num_blocks', 0):,} | "
                          f"{planned} | {_pct(rec.get('error_planned_blocks'))} | "
                          f"{m['decode_tokens_per_s']:,.0f} | {p['decode_tokens_per_s']:,.0f} | {ratio:.0%} |")
    if train_errors:
        lines += ["", f"Training peak memory: mean |error| {statistics.mean(train_errors):.1%}, "
                      f"max {max(train_errors):.1%} over {len(train_errors)} rows."]
    return "\n".join(lines + engine) + "\n"


def _pct(x):
    return "–" if x is None else f"{x:+.1%}"


if __name__ == "__main__":
    main()
