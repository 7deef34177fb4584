"""`longseq train`: a run is set up, resumed or seeded, stepped to max_steps with checkpoints, and closed cleanly
on Ctrl-C. Each phase is one function over the run's state (`Run`)."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longseq.attention import flash
from longseq.config import TrainConfig
from longseq.errors import LongseqError
from longseq.models.loader import LoadedModel, load
from longseq.models.overrides import apply_overrides
from longseq.plan.flops import train_flops_per_token
from longseq.train import checkpoint
from longseq.train.checkpoint_files import (
    check_counters,
    checkpoint_root,
    clean_stale_temporaries,
    read_meta,
    resolve_checkpoint,
)
from longseq.train.data import TrainData, default_pad_id
from longseq.train.layout import parallelize
from longseq.train.lora import make_trainable
from longseq.train.memory_plan import MemoryChoice, plan_memory
from longseq.train.metrics import MetricsWriter, matmul_params, peak_flops, peak_memory_gib
from longseq.train.optim import build_optimizer, build_scheduler
from longseq.train.parallel import meta_loading
from longseq.train.parallel.data_parallel import grad_scaler
from longseq.train.parallel.env import DistEnv, init_distributed
from longseq.train.precision import Precision, resolve_precision
from longseq.train.step import train_step

# Changing these between a run and its resumption would silently change what is trained. (grad_accum may change
# with the number of processes, as long as the sequences per step stay the same: checked separately.)
_RESUME_KEYS = ("model", "method", "seq_len", "batch_size", "lora_rank", "lora_alpha", "lora_targets",
                "lora_train_extra", "seed", "data", "optimizer", "attention", "window",
                "rope_scaling", "rope_factor", "max_row_bytes", "router_aux_loss_coef",
                "router_z_loss_coef")
# absent from older checkpoints' configs: compared only where recorded
_ADDED_RESUME_KEYS = ("max_row_bytes", "router_aux_loss_coef", "router_z_loss_coef")
MAX_BAD_ROW_EXAMPLES_SHOWN = 5


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # per optimizer step run in this call
    steps: int = 0  # completed optimizer steps (including those before a resume)
    checkpoint: Path | None = None
    interrupted: bool = False
    memory: Any = None  # the MemoryChoice the run used (train/memory_plan.py)
    lm: Any = None  # the trained LoadedModel (adapters in place), for generating right after training


@dataclass
class Run:
    """A training run's state: what `build` sets up and the counters that checkpoints save."""

    cfg: TrainConfig
    env: DistEnv
    lm: LoadedModel  # the model with its adapters, and the tokenizer
    data: TrainData
    precision: Precision
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any  # fp16 loss scaler, or None
    step_model: nn.Module  # what a step calls: the model with its loss, data parallel when the run is
    memory: MemoryChoice | None = None
    resumed_from: Path | None = None
    step: int = 0  # completed optimizer steps
    batch_index: int = 0  # micro-batches consumed, all processes: where the data stream resumes
    tokens_seen: int = 0

    @property
    def model(self) -> nn.Module:
        return self.lm.model

    @property
    def sequences_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.env.dp

    def counters(self) -> dict[str, Any]:
        return {"batch_index": self.batch_index, "tokens_seen": self.tokens_seen, "precision": self.precision.name,
                "sequences_per_step": self.sequences_per_step}


def build(cfg: TrainConfig, env: DistEnv) -> Run:
    """Model (with adapters), tokenizer, data, optimizer, scheduler, loss scaler and the step module of a run."""
    precision = resolve_precision(cfg.precision, env.device)
    # Full fine-tuning keeps float32 master weights; LoRA/QLoRA keep the frozen base in the compute dtype.
    load_dtype = torch.float32 if cfg.method == "full" else precision.frozen_dtype
    sharded = meta_loading.sharded_loading(cfg, env)  # built on meta, each rank reading only its shards
    lm = meta_loading.load_meta(cfg.model, load_dtype) if sharded else load(cfg.model, dtype=load_dtype,
                                                                            device=env.device)
    apply_overrides(lm.model, cfg.overrides)  # attention variant / RoPE scaling flags
    data = TrainData.load(list(cfg.data), lm.tokenizer, on_bad_row=cfg.on_bad_row, max_row_bytes=cfg.max_row_bytes)
    model = lm.model
    torch.manual_seed(cfg.seed)  # LoRA initialisation
    make_trainable(model, cfg)
    model.train()
    home = torch.device("cpu") if cfg.fsdp_offload else env.device
    step_model = parallelize(model, cfg, env, precision, materialize=(
        lambda root: meta_loading.materialize(root, model, lm.path, home, cfg.seed, env.device)) if sharded else None)
    optimizer = build_optimizer(model, cfg, home)
    return Run(cfg, env, lm, data, precision, optimizer, build_scheduler(optimizer, cfg), grad_scaler(env, precision),
               step_model)


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    # Before the first CUDA allocation: segments that grow in place instead of one per size class keep the caching
    # allocator's reserve close to the allocated peak at long sequences, which the planner's slack assumes
    # (plan/memory.py ALLOCATOR_SLACK). A setting of the user's own is kept.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if not cfg.data:
        raise LongseqError("no training data: pass --data FILE_OR_FOLDER")
    if os.environ.get("RANK", "0") == "0":  # before --resume latest looks: it may put a checkpoint back
        _clean_temporaries(console, cfg.out_dir)
    resume_from = resolve_checkpoint(cfg.resume, cfg.out_dir) if cfg.resume else None  # fail before the slow part
    if resume_from is not None:
        check_counters(read_meta(resume_from), resume_from, "batch_index", "tokens_seen")
    env = init_distributed(cfg)
    resume_from = env.broadcast_object(resume_from)  # every rank resumes what rank 0 found
    console.quiet = not env.is_main  # one process reports for all
    run = build(cfg, env)
    attn = run.model.config.attention  # the kernel (--attention-kernel fa4 fails here where it cannot run)
    kernel = flash.describe(attn.kernel, attn.plain, env.device,
                            run.precision.autocast_dtype or run.precision.frozen_dtype, run.model.config.head_dim)
    _report_setup(console, run)
    run.memory = plan_memory(run.model, cfg, run.precision.name, env.device, packed=run.data.stats.documents > 1,
                             world_size=env.world_size)
    _report_memory(console, run, kernel)
    if resume_from is not None:
        resume(run, resume_from)
        console.print(f"[dim]resumed from {resume_from} at step {run.step}[/]")
    else:
        torch.manual_seed(cfg.seed)  # dropout
    result = run_steps(run, console, progress)
    run.model.eval()
    if result.interrupted:  # Ctrl-C: finish the step in flight, save it, exit cleanly
        result.checkpoint = save(run)
        console.print(f"interrupted: saved {result.checkpoint} (resume with --resume latest)")
    elif result.checkpoint is not None:
        console.print(f"saved {result.checkpoint}")
    return result


def _report_setup(console, run: Run) -> None:
    cfg, model, st = run.cfg, run.model, run.data.stats
    console.print(f"[dim]data: {st.files} file(s), {st.documents:,} documents, {st.tokens:,} tokens "
                  f"({st.target_tokens:,} trained)[/]")
    bad = run.data.bad_rows
    if bad.total:
        console.print(f"[yellow]{bad.summary()}[/]")
        for example in bad.examples[:MAX_BAD_ROW_EXAMPLES_SHOWN]:  # unwrapped: file:line stays whole
            console.print(f"  {example}", style="yellow", markup=False, soft_wrap=True)
        if bad.total > MAX_BAD_ROW_EXAMPLES_SHOWN:
            console.print(f"  ... and {bad.total - MAX_BAD_ROW_EXAMPLES_SHOWN} more", style="yellow")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    console.print(f"[dim]{cfg.method}: {trainable:,} trainable parameters · {run.env.device} · {run.precision.name}"
                  + (f" · RoPE {rope.type} x{rope.factor:g} (context {model.config.max_seq_len:,})"
                     if (rope := model.config.rope).type != "default" else "") + "[/]")
    if cfg.seq_len > model.config.max_seq_len:
        console.print(f"[yellow]seq_len {cfg.seq_len:,} is past the model's context ({model.config.max_seq_len:,}): "
                      "consider --rope-scaling linear|ntk|yarn --rope-factor F[/]")


def _report_memory(console, run: Run, kernel: str) -> None:
    cfg, env = run.cfg, run.env
    console.print(f"[dim]memory: {run.memory.describe()}; loss chunks of {cfg.loss_chunk:,} tokens; attention: "
                  f"{kernel}[/]")
    if not run.memory.fits:
        console.print("[yellow]the planner predicts this run does not fit; it may run out of memory "
                      "(try a shorter --seq-len, --method qlora or --optimizer adamw8bit)[/]")
    if env.pp > 1:
        console.print(f"[dim]pipeline over {env.pp} processes ({cfg.pp_schedule}, {cfg.grad_accum} micro-batches a "
                      "step)[/]")
    elif env.distributed:
        console.print(f"[dim]{env.parallel}{' + CPU offload' if cfg.fsdp_offload else ''} over {env.world_size} "
                      f"process(es): {env.dp} data parallel × {env.tp} tensor parallel × {env.cp} context parallel "
                      f"(ring) × {env.sp} sequence parallel (Ulysses)"
                      + (f"; experts split over {env.ep} of the data-parallel processes" if env.ep > 1 else "")
                      + "[/]")


def _clean_temporaries(console, out_dir: str) -> None:
    cleaned, unknown = clean_stale_temporaries(out_dir)
    if cleaned:
        console.print(f"[dim]removed {len(cleaned)} temporary folder(s) of interrupted checkpoint saves in "
                      f"{checkpoint_root(out_dir)}[/]")
    if unknown:
        console.print(f"[yellow]{len(unknown)} temporary folder(s) of checkpoint saves by an older longseq in "
                      f"{checkpoint_root(out_dir)} ({', '.join(p.name for p in unknown[:3])}"
                      f"{', ...' if len(unknown) > 3 else ''}): remove them once no run writes there[/]")


def resume(run: Run, path: Path) -> None:
    """Continue from a checkpoint: weights, optimizer, scheduler, RNG and the counters, after checking that it
    trained what this run trains."""
    meta = read_meta(path)
    check_counters(meta, path, "batch_index", "tokens_seen")
    saved = meta["config"]
    options = run.cfg.to_dict()
    changed = [k for k in _RESUME_KEYS if (k in saved or k not in _ADDED_RESUME_KEYS)
               and _norm(saved.get(k)) != _norm(options[k])]
    if changed:
        raise LongseqError(f"cannot resume {path}: the run's {', '.join(changed)} differ from the checkpoint's")
    batch_size, grad_accum = saved.get("batch_size"), saved.get("grad_accum")
    recorded = batch_size * grad_accum if isinstance(batch_size, int) and isinstance(grad_accum, int) else None
    saved_sequences = meta.get("sequences_per_step", recorded)
    if saved_sequences != run.sequences_per_step:
        raise LongseqError(f"cannot resume {path}: it trained {saved_sequences} sequences per step, this run "
                           f"{run.sequences_per_step} (batch_size × grad_accum × {run.env.dp} data-parallel "
                           "process(es)): set --grad-accum to match")
    meta = checkpoint.load(path, run.model, run.optimizer, run.scheduler, run.scaler, run.env, run.cfg.seed)
    run.step, run.batch_index, run.tokens_seen = meta["step"], meta["batch_index"], meta["tokens_seen"]
    run.resumed_from = path


def save(run: Run) -> Path:
    return checkpoint.save(run.cfg.out_dir, run.cfg, run.step, run.model, run.optimizer, run.scheduler, run.scaler,
                           run.counters(), run.env)


def run_steps(run: Run, console, progress: bool) -> TrainResult:
    """Optimizer steps until max_steps or Ctrl-C, each logged, with periodic checkpoints."""
    cfg, env, device, model = run.cfg, run.env, run.env.device, run.model
    pad_id = default_pad_id(run.lm.tokenizer)
    batches = env.step_batches(run.data.batches(cfg.seq_len, cfg.batch_size, cfg.seed, pad_id,
                                                start=run.batch_index), cfg.grad_accum)
    flops_per_token = train_flops_per_token(matmul_params(model.config), model.config.num_layers,
                                            model.config.hidden_size, cfg.seq_len)
    peak = peak_flops(device, run.precision.name)
    # A resumed run logs again the steps after its checkpoint: their earlier lines go.
    writer = MetricsWriter(Path(cfg.out_dir), enabled=env.is_main,
                           resume_step=run.step if run.resumed_from is not None else None)
    result = TrainResult(steps=run.step, memory=run.memory, lm=run.lm)
    stop = _StopFlag()
    bar = _progress(console, enabled=progress and env.is_main)
    task = bar.add_task("train", total=cfg.max_steps, completed=run.step, info="")
    try:
        with bar, stop:
            while run.step < cfg.max_steps and not stop.requested:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                loss = train_step(run.step_model, next(batches), cfg, run.precision, device, run.optimizer,
                                  run.scaler, env)
                run.scheduler.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                run.step, run.batch_index = run.step + 1, run.batch_index + cfg.grad_accum * env.dp
                tokens = run.sequences_per_step * cfg.seq_len  # all processes
                if env.distributed:  # Ctrl-C reaches the ranks at different moments: stop together
                    stop.requested = env.all_reduce_sum(float(stop.requested)) > 0
                run.tokens_seen += tokens
                result.losses.append(loss)
                metrics: dict[str, Any] = {
                    "loss": loss, "lr": float(run.scheduler.get_last_lr()[0]), "tokens_per_s": tokens / elapsed,
                    "tokens_seen": run.tokens_seen, "peak_mem_gib": peak_memory_gib(device),
                }
                if peak:
                    metrics["mfu"] = tokens / elapsed * flops_per_token / (peak * env.world_size)
                writer.write(run.step, metrics)
                info = f"loss {loss:.4f} · {metrics['tokens_per_s']:,.0f} tok/s"
                if "mfu" in metrics:
                    info += f" · MFU {metrics['mfu']:.1%}"
                bar.update(task, completed=run.step, info=info + f" · peak {metrics['peak_mem_gib']:.1f} GiB")
                if (cfg.save_every and run.step % cfg.save_every == 0) or run.step == cfg.max_steps:
                    result.checkpoint = save(run)
    finally:
        writer.close()
    result.steps, result.interrupted = run.step, stop.requested
    return result


def _norm(value):
    return list(value) if isinstance(value, (list, tuple)) else value


class _StopFlag:
    """The first Ctrl-C asks the loop to stop after the current step; a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _progress(console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(), console=console, disable=not enabled, transient=False,
    )
