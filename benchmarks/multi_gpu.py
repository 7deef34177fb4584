"""Several GPUs: FSDP2 / DDP training, Ulysses' longest sequence and tensor-parallel serving, measured against
`longseq plan`'s predictions.

    python benchmarks/multi_gpu.py --gpus 8 --out results/multi-gpu          (default out: $OUT, else ./multi_gpu)
    python benchmarks/multi_gpu.py --gpus 2 --device cpu --quick             (harness smoke run: gloo, tiny shapes)

Each row runs in its own `torchrun --standalone --nproc-per-node N` (so its peak is its own, and an out-of-memory
rank ends the row instead of hanging it), on random weights of a model shape built as `longseq train` builds it
(fp32 masters for full fine-tuning, bf16 base + fp32 adapters for LoRA, the whole model on each GPU, then sharded):
- train rows: longseq's step (`train_step`, DDP or FSDP2, optionally CPU offload; Ulysses, ring attention, tensor
  parallel or pipeline stages as `longseq train` lays them out) for 1 warm-up and 2 timed steps; memory is the
  largest torch.cuda.max_memory_allocated over the ranks (load peak read before the reset);
- ulysses rows: LoRA, full recompute, sequence parallel over every GPU, doubling the sequence until it runs out of
  memory: the longest sequence that trains, against the planner's `largest fitting` answer;
- serve rows: the engine tensor-parallel over N GPUs (rank 0 schedules, the others follow), 256 requests of 256
  prompt + 256 output tokens, offline throughput, and each rank's KV pool against `longseq plan serve --num-gpus N`.
Writes multi_gpu.json and multi_gpu.md to --out.
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

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

ULYSSES_LENGTHS = (32768, 65536, 131072, 262144, 524288)


def rows_for(gpus: int, quick: bool) -> list[dict]:
    if quick:
        m, s = "random-tiny", 256
        return [dict(kind="train", model=m, parallel="fsdp", sp=1, method="full", recompute="full", seq_len=s),
                dict(kind="train", model=m, parallel="ddp", sp=1, method="lora", recompute="none", seq_len=s),
                dict(kind="train", model=m, parallel="fsdp", sp=gpus, method="lora", recompute="full", seq_len=s,
                     offload=True),
                dict(kind="serve", model=m, tp=gpus, requests=8, prompt=32, output=16),
                dict(kind="train", model=m, parallel="fsdp", sp=1, tp=gpus, method="lora", recompute="full",
                     seq_len=s),
                dict(kind="train", model=m, parallel="ddp", sp=1, cp=gpus, method="lora", recompute="full", seq_len=s),
                dict(kind="train", model=m, parallel="ddp", sp=1, pp=gpus, grad_accum=gpus, method="lora",
                     recompute="none", seq_len=s)]
    m = "Llama-3-8B"
    rows = [dict(kind="train", model=m, parallel="fsdp", sp=1, method="full", recompute="full", seq_len=8192),
            dict(kind="train", model=m, parallel="fsdp", sp=1, method="full", recompute="full", seq_len=8192,
                 offload=True),
            dict(kind="train", model=m, parallel="fsdp", sp=1, method="lora", recompute="full", seq_len=8192),
            dict(kind="train", model=m, parallel="ddp", sp=1, method="lora", recompute="full", seq_len=8192),
            dict(kind="train", model=m, parallel="fsdp", sp=1, tp=2, method="lora", recompute="full", seq_len=8192),
            dict(kind="train", model=m, parallel="fsdp", sp=1, tp=2, method="full", recompute="full", seq_len=8192),
            dict(kind="train", model=m, parallel="ddp", sp=1, pp=2, grad_accum=4, method="lora", recompute="full",
                 seq_len=8192),
            dict(kind="train", model=m, parallel="fsdp", sp=min(gpus, 8), cp=max(1, gpus // 8), method="lora",
                 recompute="full", seq_len=32768)]
    rows += [dict(kind="ulysses", model=m, parallel="fsdp", sp=min(gpus, 8), method="lora", recompute="full",
                  seq_len=n) for n in ULYSSES_LENGTHS]
    rows += [dict(kind="serve", model=m, tp=tp, requests=256, prompt=256, output=256) for tp in (1, 2, 4, 8)
             if tp <= gpus]
    return rows


# ---- one row, on every rank (under torchrun) --------------------------------------------------------------------


def run_train_row(row: dict, device: str) -> dict | None:
    import torch
    from plan_validation import build_model

    from longseq.config import TrainConfig
    from longseq.plan.random_shapes import spec_for
    from longseq.train.layout import parallelize
    from longseq.train.lora import make_trainable
    from longseq.train.optim import build_optimizer
    from longseq.train.parallel.data_parallel import grad_scaler
    from longseq.train.parallel.env import init_distributed
    from longseq.train.precision import resolve_precision
    from longseq.train.step import train_step

    cfg = TrainConfig(method=row["method"], recompute=row["recompute"], seq_len=row["seq_len"], batch_size=1,
                      optimizer="adamw", lora_rank=16, lora_alpha=32, loss_chunk=1024, parallel=row["parallel"],
                      fsdp_offload=row.get("offload", False), device=device, **_layout(row))
    env = init_distributed(cfg)
    cuda = env.device.type == "cuda"
    precision = resolve_precision("bf16" if cuda else "fp32", env.device)
    spec = spec_for(row["model"])
    model = build_model(spec, torch.float32 if cfg.method == "full" else precision.frozen_dtype, env.device)
    make_trainable(model, cfg)
    model.train()
    step_model = parallelize(model, cfg, env, precision)
    model.set_recompute(cfg.recompute)  # after a pipeline split, as longseq train plans it
    optimizer = build_optimizer(model, cfg, torch.device("cpu") if cfg.fsdp_offload else env.device)
    scaler = grad_scaler(env, precision)
    load_peak = _max_over_ranks(torch.cuda.max_memory_allocated(env.device) if cuda else 0, env)
    if cuda:
        torch.cuda.reset_peak_memory_stats(env.device)
    batches = iter(_batches(spec.config.vocab_size, cfg.seq_len, 3 * env.dp * cfg.grad_accum))
    steps = env.step_batches(batches, cfg.grad_accum)
    times = []
    for i in range(3):
        if cuda:
            torch.cuda.synchronize(env.device)
        env.barrier()
        start = time.perf_counter()
        train_step(step_model, next(steps), cfg, precision, env.device, optimizer, scaler, env)
        if cuda:
            torch.cuda.synchronize(env.device)
        if i:
            times.append(time.perf_counter() - start)
    peak = _max_over_ranks(torch.cuda.max_memory_allocated(env.device) if cuda else 0, env)
    step_s = statistics.median(times)
    if not env.is_main:
        return None
    return dict(peak_gib=peak / 2**30 if cuda else None, load_peak_gib=load_peak / 2**30 if cuda else None,
                step_s=step_s, tokens_per_s=cfg.seq_len * env.dp * cfg.grad_accum / step_s, world=env.world_size)


def _layout_text(row: dict) -> str:
    degrees = {k: v for k, v in _layout(row).items() if k != "grad_accum" and v > 1}
    return " ".join(f"{k} {v}" for k, v in degrees.items()) or "dp only"


def _layout(row: dict) -> dict:
    """The TrainConfig options of a train row's layout (rows name sp; tp, cp, pp and grad_accum when not 1)."""
    return dict(sp=row["sp"], tp=row.get("tp", 1), cp=row.get("cp", 1), pp=row.get("pp", 1),
                grad_accum=row.get("grad_accum", 1))


def _batches(vocab: int, seq_len: int, n: int):
    import torch

    from longseq.train.data import Batch

    g = torch.Generator().manual_seed(0)
    for i in range(n):
        ids = torch.randint(0, vocab, (1, seq_len), generator=g)
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
        yield Batch(ids, targets, torch.arange(seq_len).expand_as(ids).contiguous(), torch.zeros_like(ids), 0, i)


def _max_over_ranks(value: float, env) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], device=env.device if env.device.type == "cuda" else "cpu")
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def run_serve_row(row: dict, device: str) -> dict | None:
    import torch
    import torch.distributed as dist
    from plan_validation import _Tokenizer

    from longseq.config import EngineConfig
    from longseq.engine import LLMEngine
    from longseq.engine.tensor_parallel import TensorParallel, shard_model
    from longseq.engine.tp_engine import TensorParallelRunner
    from longseq.generation import SamplingParams
    from longseq.models.llama import CausalLM
    from longseq.models.loader import LoadedModel, resolve_device
    from longseq.plan.random_shapes import spec_for

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    dist.init_process_group("cuda:nccl,cpu:gloo" if dev.type == "cuda" else "gloo")
    control = dist.new_group(backend="gloo") if dev.type == "cuda" else None
    tp = TensorParallel(world, rank)
    spec = spec_for(row["model"])
    with torch.device("meta"):  # shard the shapes, then allocate only this rank's slices
        model = CausalLM(spec.config)
    if world > 1:
        shard_model(model, tp)
    model = model.to(torch.bfloat16 if dev.type == "cuda" else torch.float32).to_empty(device=dev).eval()
    if spec.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    torch.manual_seed(rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    model.rotary.reset(dev)
    cfg = EngineConfig(num_kv_blocks=None if dev.type == "cuda" else 256, tensor_parallel=world)
    runner = TensorParallelRunner(model, cfg, tp, control)
    if rank != 0:
        runner.serve_forever()
        return None
    engine = LLMEngine(LoadedModel(model, _Tokenizer(), Path(row["model"])), cfg, runner=runner)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_new_tokens=row["output"], ignore_eos=True)
    for _ in range(row["requests"]):
        engine.add_request(torch.randint(0, spec.config.vocab_size, (row["prompt"],), generator=g).tolist(), params)
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    elapsed = time.perf_counter() - start
    engine.close()
    return dict(kv_tokens=runner.num_blocks * cfg.kv_block_size, tokens_per_s=row["requests"] * row["output"] / elapsed,
                world=world)


def worker(row: dict, device: str, result: str) -> None:
    out = (run_serve_row if row["kind"] == "serve" else run_train_row)(row, device)
    if out is not None:
        Path(result).write_text(json.dumps(out))


# ---- predictions ------------------------------------------------------------------------------------------------


def predict(row: dict, gpus: int, device_name: str) -> dict:
    from longseq.config import TrainConfig
    from longseq.plan.hardware import GPUS, find_gpu
    from longseq.plan.random_shapes import spec_for
    from longseq.plan.serving import ServeSetup, plan_serve
    from longseq.plan.setup import TrainSetup, parallelism_for
    from longseq.plan.training import plan_train

    gpu = (find_gpu(device_name) if device_name else None) or GPUS["H100"]
    spec = spec_for(row["model"])
    if row["kind"] == "serve":
        plan = plan_serve(spec, gpu, ServeSetup(num_gpus=row["tp"], context=row["prompt"] + row["output"]))
        return dict(kv_tokens=plan.kv_tokens, decode_bound_tokens_per_s=plan.decode_tokens_per_s)
    cfg = TrainConfig(parallel=row["parallel"], fsdp_offload=row.get("offload", False), seq_len=row["seq_len"],
                      **_layout(row))
    setup = TrainSetup(method=row["method"], seq_len=row["seq_len"], recompute=row["recompute"], lora_rank=16,
                       loss_chunk=1024, grad_accum=cfg.grad_accum, parallel=parallelism_for(cfg, gpus))
    plan = plan_train(spec, gpu, setup)
    return dict(peak_gib=plan.memory.allocated / 2**30, load_peak_gib=plan.memory.load_peak / 2**30,
                step_s=plan.step_time_s, tokens_per_s=plan.tokens_per_s, fits=plan.fits)


# ---- the driver -------------------------------------------------------------------------------------------------


def launch(row: dict, nproc: int, device: str, timeout: int) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__,
               "--worker", json.dumps(row), "--device", device, "--result", str(result)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}
        if result.is_file():
            return json.loads(result.read_text())
        text = proc.stderr + proc.stdout
        if "out of memory" in text.lower():
            return {"error": "OOM"}
        lines = [line for line in text.splitlines() if "Error" in line] or text.strip().splitlines() or ["?"]
        return {"error": lines[-1][:200]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=8, help="processes (GPUs) per row")
    ap.add_argument("--out", default=os.environ.get("OUT") or "multi_gpu")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (harness check; --device cpu runs on gloo)")
    ap.add_argument("--only", type=int, nargs="*", help="row indices to run")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per row")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker), args.device, args.result)
        return
    rows = rows_for(args.gpus, args.quick)
    if args.only:
        rows = [rows[i] for i in args.only]
    device_name = ""
    if args.device.startswith("cuda"):
        import torch

        device_name = torch.cuda.get_device_name(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, started, ulysses_failed = [], time.perf_counter(), False
    for i, row in enumerate(rows):
        nproc = row["tp"] if row["kind"] == "serve" else args.gpus
        pred = predict(row, nproc, device_name)
        if row["kind"] == "ulysses" and ulysses_failed:  # longer than one that did not fit
            meas = {"error": "skipped (a shorter sequence failed)"}
        else:
            meas = launch(row, nproc, args.device, args.timeout)
            ulysses_failed |= row["kind"] == "ulysses" and "error" in meas
        rec = dict(row=row, gpus=nproc, predicted=pred, measured=meas)
        for key in ("peak_gib", "load_peak_gib", "step_s", "kv_tokens"):
            if pred.get(key) and meas.get(key):
                rec[f"error_{key}"] = round(pred[key] / meas[key] - 1, 4)
        results.append(rec)
        print(f"[{i + 1}/{len(rows)} {time.perf_counter() - started:.0f}s] {json.dumps(rec)}", flush=True)
    env = {"device": device_name or args.device, "gpus": args.gpus, "python": sys.version.split()[0]}
    import torch

    env["torch"] = torch.__version__
    (out / "multi_gpu.json").write_text(json.dumps({"env": env, "rows": results}, indent=2))
    (out / "multi_gpu.md").write_text(markdown(results, env))
    print((out / "multi_gpu.md").read_text())


def markdown(results: list[dict], env: dict) -> str:
    lines = [f"# longseq on {env['gpus']} × {env['device']} (torch {env['torch']})", "",
             "| # | kind | model | parallel | layout | method | recompute | seq | peak GiB meas | pred | err | "
             "load GiB meas | pred | tok/s meas | pred |", "|" + "---|" * 15]
    for i, rec in enumerate(results):
        r, p, m = rec["row"], rec["predicted"], rec["measured"]
        if r["kind"] == "serve":
            lines.append(f"| {i} | serve | {r['model']} | tensor | {r['tp']} | | | {r['prompt']}+{r['output']} | "
                         f"KV tokens {m.get('kv_tokens', m.get('error'))} | {p['kv_tokens']:,} | "
                         f"{_pct(rec.get('error_kv_tokens'))} | | | {_num(m.get('tokens_per_s'))} | "
                         f"≤ {p['decode_bound_tokens_per_s']:,.0f} |")
            continue
        meas_peak = m.get("error") or _num(m.get("peak_gib"), 2)
        lines.append(f"| {i} | {r['kind']} | {r['model']} | {r['parallel']}{' + offload' if r.get('offload') else ''}"
                     f" | {_layout_text(r)} | {r['method']} | {r['recompute']} | {r['seq_len']:,} | {meas_peak} | "
                     f"{p['peak_gib']:.2f} (fits: {p['fits']}) | {_pct(rec.get('error_peak_gib'))} | "
                     f"{_num(m.get('load_peak_gib'), 2)} | {p['load_peak_gib']:.2f} | {_num(m.get('tokens_per_s'))} | "
                     f"{p['tokens_per_s']:,.0f} |")
    longest = [r["row"]["seq_len"] for r in results if r["row"]["kind"] == "ulysses" and "error" not in r["measured"]]
    if longest:
        lines += ["", f"Ulysses: the longest sequence that trained is {max(longest):,} tokens."]
    return "\n".join(lines) + "\n"


def _num(x, digits: int = 0) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _pct(x) -> str:
    return "–" if x is None else f"{x:+.1%}"


if __name__ == "__main__":
    main()
