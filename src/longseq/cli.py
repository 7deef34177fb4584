"""`longseq` console script: each subcommand maps onto a typed function of the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from longseq.errors import LongseqError, first_line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default prints the whole usage first)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH",
                   help="HF model directory or .gguf file (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string (repeatable; \\n and \\t are understood)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="longseq", description="Plan, train, serve and evaluate long-context LLMs.")
    parser.add_argument("--version", action="version", version=f"longseq {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate text for a prompt, streamed to the terminal")
    g.add_argument("prompt", help='the prompt ("-" reads standard input)')
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("--no-chat", action="store_true", help="plain completion, without the chat template")
    g.add_argument("--system", default=None, help="a system message (chat mode)")
    g.add_argument("--quantization", default=None, choices=["fp8", "int4", "int8"],
                   help="decoder weights quantized at load (default: as the checkpoint stores them)")
    g.add_argument("--quant-group-size", type=int, default=128, help="int4: inputs per scale and zero (default: 128)")
    from longseq.config import ModelOverrides
    from longseq.config.flags import add_dataclass_flags

    add_dataclass_flags(g, ModelOverrides)  # --attention streaming --window 1024: unbounded generation, ...
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="fine-tune a model (full, LoRA or QLoRA) on JSONL / text data")
    t.add_argument("--config", default=None, metavar="YAML", help="a YAML file of these options; flags override it")
    from longseq.config import TrainConfig

    add_dataclass_flags(t, TrainConfig)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="write a checkpoint as a PEFT adapter or a merged HF model directory")
    e.add_argument("--checkpoint", required=True, help="a checkpoint folder (out_dir/checkpoints/step-N)")
    e.add_argument("--format", choices=["peft", "merged"], default="peft")
    e.add_argument("--out", required=True, help="the folder to create")
    e.add_argument("--dtype", default="bfloat16", help="merged weights dtype: float32, bfloat16 or float16")
    e.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("serve", help="OpenAI-compatible HTTP server over the paged, continuously batching engine")
    _add_model_args(v)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1/* and /openapi.json (visible in `ps`: prefer "
                        "--api-key-file or $LONGSEQ_API_KEY)")
    v.add_argument("--api-key-file", default=None, metavar="PATH", help="read the API key from this file's first line")
    v.add_argument("--max-request-bytes", type=int, default=None, metavar="N",
                   help="refuse larger request bodies with 413 (default: 8 MiB)")
    v.add_argument("--served-model-name", default=None, help="model id in the API (default: the model's file name)")
    v.add_argument("--lora", nargs="+", action="extend", default=[], metavar="NAME=PATH",
                   help="LoRA adapters (PEFT folders) served beside the model, each selected by a request's `model`: "
                        "NAME (implies --enable-lora; more at run time: POST /v1/load_lora_adapter)")
    from longseq.config import EngineConfig

    add_dataclass_flags(v, EngineConfig)
    add_dataclass_flags(v, ModelOverrides)  # --attention memory --window 4096: contexts past the model's (InfLLM)
    v.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="generate, LoRA-teach the built-in model three new facts, plan, passkey "
                       "heatmap (CPU, minutes)")
    d.add_argument("--model", default=None, metavar="PATH", help="model to use (default: the built-in one)")
    d.add_argument("--device", default="auto", help="cpu, cuda or cuda:N")
    d.add_argument("--data", default="data/demo/facts.jsonl", help="chat JSONL of the facts to teach")
    d.add_argument("--steps", type=int, default=20, help="fine-tuning steps")
    d.set_defaults(func=cmd_demo)

    pl = sub.add_parser("plan", help="predict memory, time and cost of training or serving a model on given GPUs")
    from longseq.plan.cli import add_plan_args

    add_plan_args(pl, _Parser)
    pl.set_defaults(func=cmd_plan)

    ev = sub.add_parser("eval", help="passkey retrieval, perplexity, BLEU / ROUGE and generation throughput")
    from longseq.eval.cli import add_eval_args

    add_eval_args(ev, _Parser)
    ev.set_defaults(func=cmd_eval)
    return parser


def _version() -> str:
    from longseq import __version__

    return __version__


def cmd_generate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from longseq.config import ModelOverrides
    from longseq.config.flags import config_from
    from longseq.generation import SamplingParams, generate
    from longseq.models.loader import load, resolve_model_path
    from longseq.models.overrides import apply_overrides

    overrides = config_from(ModelOverrides, args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=tuple(s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop),
    )
    err = Console(stderr=True, highlight=False)
    path = resolve_model_path(args.model)
    with err.status(f"loading {path.name}"):
        lm = load(path, dtype=args.dtype, device=args.device, quantization=args.quantization,
                  group_size=args.quant_group_size)
    apply_overrides(lm.model, overrides)
    chat = not args.no_chat
    if chat and getattr(lm.tokenizer, "chat_template", None) is None:
        err.print("[yellow]this model has no chat template: generating as plain text (--no-chat)[/]")
        chat = False
    dtype = str(lm.model.lm_head.weight.dtype).removeprefix("torch.")
    quantized = getattr(lm.model, "quantization", None)
    err.print(f"[dim]{path.name} · {lm.device} · {dtype}{f' · {quantized} weights' if quantized else ''}[/]")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = generate(lm, prompt, params, chat=chat, system=args.system, on_text=write)
    write("\n")
    err.print(
        f"[dim]{result.prompt_tokens} prompt + {len(result.token_ids)} new tokens · "
        f"first token {result.time_to_first_token_s * 1e3:.0f} ms · "
        f"{result.decode_tokens_per_s:.1f} tok/s · finish: {result.finish_reason}[/]"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from longseq.config import TrainConfig
    from longseq.config.flags import config_from
    from longseq.train.loop import train

    cfg = config_from(TrainConfig, args, args.config)
    from longseq.train.parallel.launch import launched_by_torchrun, relaunch

    if cfg.nproc > 1 and not launched_by_torchrun():
        return relaunch(cfg)
    result = train(cfg)
    if result.interrupted:
        return 130
    if result.checkpoint is not None and os.environ.get("RANK", "0") == "0":
        print(f"export with: longseq export --checkpoint {result.checkpoint} --format peft --out ADAPTER_DIR")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from longseq.train.export import export

    out = export(args.checkpoint, args.out, args.format, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from functools import partial

    from rich.console import Console

    from longseq.config import EngineConfig, ModelOverrides
    from longseq.config.engine import check_served_overrides
    from longseq.config.flags import config_from
    from longseq.engine.async_engine import AsyncLLMEngine
    from longseq.engine.core_client import EngineCoreClient
    from longseq.engine.core_process import describe, load_engine
    from longseq.models.loader import resolve_model_path
    from longseq.serve import serve
    from longseq.serve.auth import resolve_api_key
    from longseq.serve.body import DEFAULT_MAX_REQUEST_BYTES

    cfg = config_from(EngineConfig, args)
    overrides = config_from(ModelOverrides, args)
    if overrides == ModelOverrides():
        overrides = None
    else:
        check_served_overrides(overrides)  # before the model loads
    loras = _lora_args(args.lora)
    if loras:
        cfg = dataclasses.replace(cfg, enable_lora=True)
    api_key = resolve_api_key(args.api_key, args.api_key_file)  # before the model loads: a bad key fails at once
    max_request_bytes = DEFAULT_MAX_REQUEST_BYTES if args.max_request_bytes is None else args.max_request_bytes
    if max_request_bytes <= 0:
        raise LongseqError(f"--max-request-bytes must be positive, got {max_request_bytes}")
    err = Console(stderr=True, highlight=False)
    path = resolve_model_path(args.model)
    name = args.served_model_name or path.stem
    if name in loras:
        raise LongseqError(f"--lora {name}=...: '{name}' is the served model's name; give the adapter another")
    make_engine = partial(load_engine, path, args.dtype, args.device, cfg, loras, overrides)  # all before it serves
    with err.status(f"loading {path.name}" + (" in the engine process" if cfg.engine_process else "")):
        if cfg.engine_process:
            frontend = EngineCoreClient(make_engine, model_name=name)
            info, engine = frontend.info, None
        else:
            engine = make_engine()
            frontend, info = AsyncLLMEngine(engine, model_name=name), describe(engine)
    for lora, adapter in info["loras"].items():
        err.print(f"[dim]LoRA adapter {lora}: rank {adapter['rank']}, {', '.join(adapter['targets'])}[/]")
    blocks, quantized = info["num_kv_blocks"], info["quantization"]
    kv = " (fp8)" if cfg.kv_cache_dtype == "fp8" else ""
    err.print(f"[dim]{name} · {info['device']}{f' · {quantized} weights' if quantized else ''} · KV pool{kv} "
              f"{blocks:,} blocks × {cfg.kv_block_size} tokens = {blocks * cfg.kv_block_size:,} tokens · context "
              f"{info['max_model_len']:,} · engine "
              f"{'in its own process' if cfg.engine_process else 'on a thread of the server'}[/]")
    if (memory := info["memory"]) is not None:
        err.print(f"[dim]memory attention (InfLLM): {memory['sink_tokens']} sink tokens, window {memory['window']:,}, "
                  f"blocks of {memory['block_size']} tokens, {memory['retrieved_blocks']} retrieved per query "
                  "block[/]")
    if (pool := info["lora_pool"]) is not None:
        err.print(f"[dim]LoRA pool: {pool['num_slots']} slots of rank {pool['max_rank']} "
                  f"({pool['nbytes'] / 2**20:,.0f} MiB)[/]")
    if cfg.tensor_parallel > 1:
        err.print(f"[dim]tensor parallel over {cfg.tensor_parallel} processes (KV heads and weights / "
                  f"{cfg.tensor_parallel} each)[/]")
    err.print(f"serving on http://{args.host}:{args.port}/v1")
    try:
        serve(frontend, host=args.host, port=args.port, api_key=api_key, served_model_name=name,
              log_level="warning", max_request_bytes=max_request_bytes)
    finally:
        frontend.shutdown()
        if engine is not None:
            engine.close()
    return 0


def _lora_args(values: list[str]) -> dict[str, str]:
    """--lora NAME=PATH ... as {name: path}."""
    loras: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise LongseqError(f"--lora takes NAME=PATH, got {value!r}")
        if name in loras:
            raise LongseqError(f"--lora: the name {name!r} is given twice")
        loras[name] = path
    return loras


def cmd_demo(args: argparse.Namespace) -> int:
    from longseq.demo import run_demo

    return run_demo(model=args.model, device=args.device, data=args.data, steps=args.steps)


def cmd_eval(args: argparse.Namespace) -> int:
    from longseq.eval.cli import run_eval

    return run_eval(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from longseq.plan.cli import run_plan

    return run_plan(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LongseqError as e:
        if os.environ.get("RANK", "0") == "0":  # torchrun workers all fail alike on bad input: say it once
            print(f"longseq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlongseq: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError":
            print(f"longseq: error: out of GPU memory ({first_line(e)})", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
