"""`longseq plan train | serve | list`: flags, and the command that prints a plan as tables or one JSON object."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from longseq.config import AttentionConfig
from longseq.errors import LongseqError

TRAIN_OUTPUTS = """outputs (one line each in the table; keys of --json):
  weights            bytes of the model as stored for this method (bf16 base, NF4 linears, fp32 adapters or masters)
  gradients          gradients alive at the step's peak moment (all of them at the optimizer step)
  optimizer states   AdamW m and v, 8-bit Adam, SGD momentum or Adafactor factors, ZeRO-partitioned over GPUs
  activations        tensors kept from forward for backward, by part, following longseq's own model code
  transient          workspace at the peak moment: loss chunk logits, norm / MLP / attention backward temporaries
  allocated peak     what torch.cuda.max_memory_allocated would report for one training step
  reserve            CUDA context and caching-allocator slack on top of the allocated peak
  total              allocated peak (or the QLoRA load peak) plus reserve, against the GPU's memory
  step time          one optimizer step: compute at longseq's measured efficiency (small models: the host's
                     per-layer kernel-launch time, which overlaps it), exposed communication, other
  throughput         trained tokens per second over all GPUs
  MFU                model FLOPs (6N + 12·L·d·S, PaLM appendix B) per second over the GPUs' dense peak
  time / GPU-hours / cost   for --tokens tokens at the GPU's approximate on-demand price (or --price)
"""

SERVE_OUTPUTS = """outputs (one line each in the table; keys of --json):
  weights            bytes of the weights in the --quant format (embeddings and LM head in 16 bits when quantized)
  KV cache           2 · layers · KV heads · head_dim · bytes per token, times context and sequences
  KV pool            what longseq's engine gives the KV cache: memory × fraction − weights − activations − LoRA
  activations        the engine's reserve: the peak of its largest step (max-num-batched-tokens tokens)
  LoRA pool          --max-loras adapter slots of --max-lora-rank, every linear layer (lora_pool in --json)
  longest context    the most tokens per sequence at --batch sequences
  most sequences     the most concurrent sequences at --context tokens each
  decode             upper bound on generated tokens/s: weights and KV read once per step at full bandwidth
  prefill            prompt tokens/s at 50% of peak FLOPs, and the time to the first token at full context
"""


def add_plan_args(p: argparse.ArgumentParser, parser_class: type = argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="plan_command", required=True, parser_class=parser_class)
    t = sub.add_parser("train", help="memory, time and cost of training a model on given GPUs",
                       description="Predict per-GPU memory, step time, throughput and cost of a training run.",
                       epilog=TRAIN_OUTPUTS, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(t)
    t.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default: 2048)")
    t.add_argument("--method", default=None, help="full, lora or qlora; with --fit a comma list to search "
                   "(default: lora; --fit: lora,qlora)")
    t.add_argument("--recompute", default=None, help="auto, none, selective, keep_attention, full or offloaded "
                   "(default auto: what longseq train --plan auto would pick on this GPU; --fit searches all five)")
    t.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch per GPU (default: 1)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    t.add_argument("--optimizer", default=None, help="adamw, adamw8bit, sgd or adafactor (default: adamw; "
                   "--fit: adamw,adamw8bit)")
    t.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    t.add_argument("--lora-rank", type=int, default=16)
    t.add_argument("--lora-targets", default=None, help="comma list (default: every linear of a layer)")
    t.add_argument("--train-extra", default="", help="LoRA: also train embed and/or norm (comma list)")
    t.add_argument("--loss-chunk", type=int, default=1024, help="tokens per LM-head + loss chunk (default: 1024)")
    t.add_argument("--packed", action="store_true", help="several documents per sequence (an S×S mask per layer)")
    t.add_argument("--mlp-tile", type=int, default=None, help="tiled RMSNorms and MLPs: tokens per tile "
                   "(0: untiled; default: as planned under recompute auto, else untiled)")
    t.add_argument("--plain-layers", type=int, default=None, help="recompute keep_attention / full: the last layers "
                   "that recompute only the SwiGLU product (default: 0; auto: as many as fit)")
    t.add_argument("--attention-layers", type=int, default=None, help="recompute full: the last layers that keep "
                   "their attention (recompute as keep_attention; default: 0; auto: as many as fit)")
    t.add_argument("--offload-keep", type=int, default=None, help="recompute offloaded: the last layers whose "
                   "inputs stay on the GPU (default: as many as fit, as longseq train picks)")
    t.add_argument("--gpu-memory", type=float, default=None, help="GiB of each GPU the run may use, below its "
                   "memory (a shared GPU): recompute auto plans within it, as longseq train --gpu-memory does")
    t.add_argument("--host-memory", type=float, default=None, help="GiB of host memory that page-locked buffers "
                   "(offloaded layer inputs, ZeRO-Offload) may take (default: unlimited)")
    t.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default: 1)")
    t.add_argument("--pp", type=int, default=1, help="pipeline stages (default: 1)")
    t.add_argument("--sp", type=int, default=1, help="Ulysses sequence-parallel degree (longseq train --sp; "
                   "default: 1)")
    t.add_argument("--cp", type=int, default=1, help="context-parallel degree: ring attention (longseq train --cp; "
                   "default: 1)")
    t.add_argument("--ep", type=int, default=1, help="expert-parallel degree: data-parallel GPUs that split each "
                   "mixture-of-experts layer's experts (longseq train --ep; divides dp and the experts; default: 1)")
    t.add_argument("--zero", type=int, default=None, help="ZeRO stage 0-3 over data × sequence parallel ranks; "
                   "longseq train --parallel ddp is 0, fsdp is 3 (--fit searches)")
    t.add_argument("--offload", default="none", choices=["none", "optimizer", "params"],
                   help="ZeRO-Offload of optimizer states, or of weights and gradients too (longseq train "
                   "--fsdp-offload is params)")
    t.add_argument("--tokens", type=float, default=None, help="tokens to train on, for time and cost (e.g. 1e9)")
    t.add_argument("--price", type=float, default=None, help="USD per GPU-hour (default: the table's estimate)")
    t.add_argument("--efficiency", type=float, default=None,
                   help="fraction of peak FLOPs sustained (default: longseq's measured H100 efficiencies)")
    t.add_argument("--fit", action="store_true", help="search strategies; print the fastest that fits (exit status 1 "
                   "when none does, with what to change)")
    t.set_defaults(plan_func=run_train)

    s = sub.add_parser("serve", help="memory and speed of serving a model on given GPUs",
                       description="Predict KV-cache capacity, longest context, concurrency and speed bounds.",
                       epilog=SERVE_OUTPUTS, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(s)
    s.add_argument("--quant", default="bf16", help="bf16, fp16, fp8, int8, int4 (group 128; int4-g32, int4-g64) or nf4 "
                   "(default: bf16; fp8, int4 and int8 (Q8_0) are `longseq serve --quantization`'s)")
    s.add_argument("--kv-dtype", default="bf16", help="bf16, fp16 or fp8 (default: bf16; fp8: `longseq serve "
                   "--kv-cache-dtype fp8`)")
    s.add_argument("--context", type=int, default=None, help="tokens per sequence (default: the model's context)")
    s.add_argument("--batch", type=int, default=None, help="concurrent sequences (default: as many as fit)")
    s.add_argument("--gpu-memory-fraction", type=float, default=0.9)
    s.add_argument("--max-num-batched-tokens", type=int, default=2048)
    s.add_argument("--max-num-seqs", type=int, default=256)
    s.add_argument("--max-loras", type=int, default=0, help="LoRA adapter slots (longseq serve --max-loras; "
                   "default: 0, no adapters)")
    s.add_argument("--max-lora-rank", type=int, default=16, help="the rank each adapter slot holds (default: 16)")
    m = s.add_argument_group("memory attention (InfLLM; `longseq generate / eval --attention memory`)")
    m.add_argument("--attention", default="causal", choices=["causal", "memory"],
                   help="memory: also report what memory attention holds per sequence on the GPU and the host")
    defaults = AttentionConfig()
    m.add_argument("--sink-tokens", type=int, default=defaults.sink_tokens)
    m.add_argument("--window", type=int, default=defaults.local_window, help="the local window (tokens)")
    m.add_argument("--block-size", type=int, default=defaults.block_size)
    m.add_argument("--retrieved-blocks", type=int, default=defaults.retrieved_blocks)
    m.add_argument("--memory-placement", default=defaults.memory_placement, help="gpu or host")
    s.set_defaults(plan_func=run_serve)

    lst = sub.add_parser("list", help="the preset models and GPUs")
    lst.add_argument("--json", action="store_true", help="one JSON object")
    lst.set_defaults(plan_func=run_list)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a preset (longseq plan list), a config.json, a model folder or "
                   "a .gguf")
    p.add_argument("--gpu", default="H100", help="GPU type (longseq plan list; default: H100)")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs in all (default: 1)")
    p.add_argument("--nodes", type=int, default=1, help="machines the GPUs are spread over (default: 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (value or "").split(",") if x.strip())


def run_plan(args: argparse.Namespace) -> int:
    return args.plan_func(args)


def _print(payload: dict[str, Any] | None, tables: list[Any], lines: list[str], notes: list[str]) -> None:
    if payload is not None:
        print(json.dumps(payload, indent=2, default=str))
        return
    from rich.console import Console

    console = Console(highlight=False)
    for table in tables:
        console.print(table)
        console.print()
    for line in lines:
        console.print(line)
    for note in notes:
        console.print(f"[dim]note: {note}[/]")


def run_train(args: argparse.Namespace) -> int:
    from longseq.plan.auto import Fixed, choose, with_candidate
    from longseq.plan.fit import DEFAULT_METHODS, DEFAULT_OPTIMIZERS, LONGSEQ_POLICIES, SearchSpace, fit_train
    from longseq.plan.hardware import get_gpu
    from longseq.plan.memory import check_experts
    from longseq.plan.models import get_model
    from longseq.plan.params import layer_linears
    from longseq.plan.report import fit_lines, train_tables
    from longseq.plan.setup import Parallelism, TrainSetup
    from longseq.plan.training import plan_train

    spec, gpu = get_model(args.model), get_gpu(args.gpu)
    for name in ("num_gpus", "nodes", "tp", "pp", "sp", "cp", "ep", "seq_len", "batch_size", "grad_accum", "lora_rank",
                 "loss_chunk"):
        if getattr(args, name) <= 0:
            raise LongseqError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    model_par = args.tp * args.pp * args.sp * args.cp
    if args.num_gpus % model_par:
        raise LongseqError(f"--num-gpus {args.num_gpus} is not a multiple of tp·pp·cp·sp = {model_par}")
    if args.tokens is not None and args.tokens <= 0:
        raise LongseqError("--tokens must be positive")
    if args.offload_keep is not None and args.offload_keep < 0:
        raise LongseqError(f"--offload-keep must be 0 or more, got {args.offload_keep}")
    if args.gpu_memory is not None and not args.gpu_memory > 0:
        raise LongseqError(f"--gpu-memory must be positive, got {args.gpu_memory:g}")
    if args.host_memory is not None and args.host_memory <= 0:
        raise LongseqError(f"--host-memory must be positive, got {args.host_memory:g}")
    methods = _split(args.method) or (DEFAULT_METHODS if args.fit else ("lora",))
    policies = _split(args.recompute) or (LONGSEQ_POLICIES if args.fit else ("auto",))
    if "auto" in policies and (args.fit or len(policies) > 1):
        raise LongseqError("--recompute auto is the planner's own choice; --fit searches the policies you list")
    optimizers = _split(args.optimizer) or (DEFAULT_OPTIMIZERS if args.fit else ("adamw",))
    if not args.fit and (len(methods) > 1 or len(policies) > 1 or len(optimizers) > 1):
        raise LongseqError("several values for --method / --recompute / --optimizer need --fit")
    extra = set(_split(args.train_extra))
    if extra - {"embed", "norm"}:
        raise LongseqError(f"--train-extra takes embed and/or norm; got {sorted(extra - {'embed', 'norm'})}")
    parallel = Parallelism(dp=args.num_gpus // model_par, tp=args.tp, pp=args.pp, sp=args.sp, cp=args.cp,
                           ep=args.ep, zero=args.zero or 0, offload=args.offload, nodes=args.nodes)
    for name in ("plain_layers", "attention_layers"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise LongseqError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if args.plain_layers and args.attention_layers:
        raise LongseqError("set --plain-layers or --attention-layers, not both: the planner models one at a time")
    setup = TrainSetup(method=methods[0], seq_len=args.seq_len, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, recompute="none" if policies[0] == "auto" else policies[0],
                       optimizer=optimizers[0],
                       precision=args.precision, lora_rank=args.lora_rank,
                       lora_targets=_split(args.lora_targets) or tuple(layer_linears(spec)),
                       train_embed="embed" in extra, train_norms="norm" in extra, loss_chunk=args.loss_chunk,
                       packed=args.packed, mlp_tile=args.mlp_tile or None, offload_keep=args.offload_keep,
                       plain_layers=args.plain_layers or 0, attention_layers=args.attention_layers or 0,
                       parallel=parallel)
    check_experts(spec, setup)  # before --fit, which would skip every candidate of a refused --ep
    kw = dict(tokens=args.tokens, price=args.price, efficiency=args.efficiency, host_gib=args.host_memory)
    if args.fit:
        zero = (args.zero,) if args.zero is not None else (0,) if args.ep > 1 else (0, 1, 2, 3)
        space = SearchSpace(methods=methods, policies=policies, optimizers=optimizers, zero_stages=zero,
                            layouts=model_par == 1 and args.ep == 1)
        result = fit_train(spec, gpu, setup, space, **kw)
        payload = {"fit": {"found": result.best is not None, "tried": result.tried, "fitting": result.fitting,
                           "explanation": result.explanation}}
        if result.best is not None:
            payload["plan"] = result.best.to_dict()
        if not args.json:
            tables = train_tables(result.best) if result.best else []
            notes = (result.best.notes + result.best.memory.notes) if result.best else []
            _print(None, tables, fit_lines(result), notes)
            return 0 if result.best else 1
        _print(payload, [], [], [])
        return 0 if result.best else 1
    picked = None
    if policies[0] == "auto":  # as `longseq train --plan auto` picks, against this GPU's memory
        fixed = Fixed("auto", args.mlp_tile, args.offload_keep, args.plain_layers, args.attention_layers)
        host = None if args.host_memory is None else args.host_memory * 2**30
        budget = gpu.memory_bytes if args.gpu_memory is None else min(gpu.memory_bytes, args.gpu_memory * 2**30)
        picked = choose(spec, setup, fixed, budget, host, offload=parallel.num_gpus == 1)
        setup = with_candidate(setup, (picked.recompute, picked.tile, picked.offload_keep, picked.plain_layers,
                                       picked.attention_layers))
    plan = plan_train(spec, gpu, setup, **kw)
    lines = []
    if picked is not None:
        flags = picked.flags(spec.config.num_layers)
        lines.append(f"as longseq train --plan auto would pick on the {gpu.name}: {flags}"
                     + ("" if picked.fits else " (the most frugal: nothing fits)"))
    if args.json:
        payload = plan.to_dict()
        if picked is not None:
            payload["auto"] = {"fits": picked.fits, "flags": flags}
        _print(payload, [], [], [])
    else:
        hint = [] if plan.fits else ["[red]does not fit[/]: try --fit to search for a setup that does"]
        _print(None, train_tables(plan), lines + hint, plan.notes + plan.memory.notes)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from longseq.plan.hardware import get_gpu
    from longseq.plan.models import get_model
    from longseq.plan.report import memory_attention_table, serve_tables
    from longseq.plan.serving import ServeSetup, plan_serve

    spec, gpu = get_model(args.model), get_gpu(args.gpu)
    if args.max_num_batched_tokens <= 0 or args.max_num_seqs <= 0:
        raise LongseqError("--max-num-batched-tokens and --max-num-seqs must be positive")
    setup = ServeSetup(quant=args.quant, kv_dtype=args.kv_dtype, context=args.context, batch=args.batch,
                       num_gpus=args.num_gpus, gpu_memory_fraction=args.gpu_memory_fraction,
                       max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                       max_loras=args.max_loras, max_lora_rank=args.max_lora_rank)
    plan = plan_serve(spec, gpu, setup)
    memory = _memory_attention(args, spec, plan) if args.attention == "memory" else None
    if args.json:
        payload = plan.to_dict()
        if memory is not None:
            payload["memory_attention"] = dict(memory[0].to_dict(), longest_context=memory[1])
        _print(payload, [], [], [])
    else:
        tables = serve_tables(plan) + ([memory_attention_table(plan, *memory)] if memory is not None else [])
        _print(None, tables, [], plan.notes)
    return 0


def _memory_attention(args: argparse.Namespace, spec, plan):
    """(the plan of one sequence at the serve plan's context, the longest context its batch fits on the GPU)."""
    from longseq.plan.memory_attention import longest_context, plan_memory_attention

    if args.kv_dtype != "bf16" or args.num_gpus != 1:
        raise LongseqError("memory attention keeps its K/V in the model's dtype on one GPU: drop --kv-dtype and "
                           "--num-gpus")
    attn = AttentionConfig(variant="memory", sink_tokens=args.sink_tokens, local_window=args.window,
                           block_size=args.block_size, retrieved_blocks=args.retrieved_blocks,
                           memory_placement=args.memory_placement)
    left = plan.budget - plan.weights - plan.activations - plan.lora_pool
    return (plan_memory_attention(spec, attn, plan.context),
            longest_context(spec, attn, left, max(1, plan.batch)))


def run_list(args: argparse.Namespace) -> int:
    from longseq.plan.hardware import GPUS
    from longseq.plan.models import PRESETS
    from longseq.plan.params import count_params

    models = {name: {"params": count_params(spec).total, "source": spec.source} for name, spec in PRESETS.items()}
    gpus = {key: {"name": g.name, "memory_gib": g.memory_gib, "bf16_tflops": g.bf16_tflops,
                  "bandwidth_tbs": g.bandwidth_tbs, "price_per_hour": g.price_per_hour} for key, g in GPUS.items()}
    if args.json:
        print(json.dumps({"models": models, "gpus": gpus}, indent=2))
        return 0
    out = sys.stdout
    out.write("models: " + ", ".join(f"{k} ({v['params'] / 1e9:.2f}B)" for k, v in models.items()) + "\n")
    out.write("gpus: " + ", ".join(f"{k} ({v['memory_gib']:.0f} GiB)" for k, v in gpus.items()) + "\n")
    return 0
