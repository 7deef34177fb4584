"""`longseq train`: the training loop (setup, steps, checkpoints, clean interruption)."""

from __future__ import annotations

import resource
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from longseq.config import ModelConfig, TrainConfig
from longseq.errors import LongseqError
from longseq.plan.flops import train_flops_per_token
from longseq.train.checkpoint import load_checkpoint, read_meta, resolve_checkpoint, save_checkpoint
from longseq.train.data import default_pad_id
from longseq.train.loss import IGNORE, chunked_cross_entropy
from longseq.train.optim import build_optimizer, build_scheduler
from longseq.train.precision import resolve_precision

# Changing these between a run and its resumption would silently change what is trained.
_RESUME_KEYS = ("model", "method", "seq_len", "batch_size", "grad_accum", "lora_rank", "lora_alpha", "lora_targets",
                "lora_train_extra", "seed", "data", "optimizer", "rope_scaling", "rope_factor")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # per optimizer step run in this call
    steps: int = 0  # completed optimizer steps (including those before a resume)
    checkpoint: Path | None = None
    interrupted: bool = False
    memory: Any = None  # the MemoryChoice the run used (train/memory_plan.py)
    lm: Any = None  # the trained LoadedModel (adapters in place), for generating right after training


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in matmuls (all linear layers and the LM head; not the embedding lookup)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = cfg.hidden_size * (2 * q + 2 * kv) + 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_layers * per_layer + cfg.vocab_size * cfg.hidden_size


def apply_rope_scaling(model, cfg: TrainConfig) -> None:
    """--rope-scaling / --rope-factor: train (and export) the model with its context extended."""
    if cfg.rope_scaling is None:
        return
    model.config = model.config.with_rope_scaling(cfg.rope_scaling, cfg.rope_factor)
    model.rotary.rope = model.config.rope
    model.rotary.reset(model.lm_head.weight.device)


def build(cfg: TrainConfig):
    """Model (with adapters), tokenizer, data, optimizer, scheduler and loss scaler for a run."""
    from longseq.models.loader import load, resolve_device
    from longseq.train.data import TrainData
    from longseq.train.lora import make_trainable

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    # Full fine-tuning keeps float32 master weights; LoRA/QLoRA keep the frozen base in the compute dtype.
    load_dtype = torch.float32 if cfg.method == "full" else precision.frozen_dtype
    lm = load(cfg.model, dtype=load_dtype, device=device)
    data = TrainData.load(list(cfg.data), lm.tokenizer, on_bad_row=cfg.on_bad_row)
    model = lm.model
    apply_rope_scaling(model, cfg)
    torch.manual_seed(cfg.seed)  # LoRA initialisation
    make_trainable(model, cfg)
    model.train()
    optimizer = build_optimizer(model, cfg, device)
    return lm, data, precision, optimizer, build_scheduler(optimizer, cfg), precision.grad_scaler()


def plan_memory(model, cfg: TrainConfig, precision: str, device: torch.device, packed: bool):
    """Choose recompute / tiling / offload (train/memory_plan.py) and set them on the model."""
    from longseq.train.memory_plan import choose

    choice = choose(model.config, cfg, precision, device, packed)
    model.set_recompute(choice.recompute, keep_on_gpu=choice.offload_keep)
    model.set_tiling(choice.tile)
    return choice


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    if not cfg.data:
        raise LongseqError("no training data: pass --data FILE_OR_FOLDER")
    resume_from = resolve_checkpoint(cfg.resume, cfg.out_dir) if cfg.resume else None  # fail before the slow part
    lm, data, precision, optimizer, scheduler, scaler = build(cfg)
    model, device = lm.model, lm.device
    st = data.stats
    console.print(f"[dim]data: {st.files} file(s), {st.documents:,} documents, {st.tokens:,} tokens "
                  f"({st.target_tokens:,} trained)[/]")
    if data.bad_rows.total:
        console.print(f"[yellow]{data.bad_rows.summary()}[/]")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    console.print(f"[dim]{cfg.method}: {trainable:,} trainable parameters · {device} · {precision.name}"
                  + (f" · RoPE {cfg.rope_scaling} x{cfg.rope_factor:g} (context {model.config.max_seq_len:,})"
                     if cfg.rope_scaling else "") + "[/]")
    if cfg.seq_len > model.config.max_seq_len:
        console.print(f"[yellow]seq_len {cfg.seq_len:,} is past the model's context ({model.config.max_seq_len:,}): "
                      "consider --rope-scaling linear|ntk|yarn --rope-factor F[/]")
    memory = plan_memory(model, cfg, precision.name, device, packed=data.stats.documents > 1)
    console.print(f"[dim]memory: {memory.describe()}; loss chunks of {cfg.loss_chunk:,} tokens[/]")
    if not memory.fits:
        console.print("[yellow]the planner predicts this run does not fit; it may run out of memory "
                      "(try a shorter --seq-len, --method qlora or --optimizer adamw8bit)[/]")

    step = batch_index = 0
    tokens_seen = 0
    if resume_from is not None:
        path = resume_from
        saved = read_meta(path)["config"]
        changed = [k for k in _RESUME_KEYS if _norm(saved.get(k)) != _norm(asdict(cfg)[k])]
        if changed:
            raise LongseqError(f"cannot resume {path}: the run's {', '.join(changed)} differ from the checkpoint's")
        meta = load_checkpoint(path, model, optimizer, scheduler, scaler)
        step, batch_index, tokens_seen = meta["step"], meta["batch_index"], meta["tokens_seen"]
        console.print(f"[dim]resumed from {path} at step {step}[/]")
    else:
        torch.manual_seed(cfg.seed)  # dropout

    pad_id = default_pad_id(lm.tokenizer)
    batches = data.batches(cfg.seq_len, cfg.batch_size, cfg.seed, pad_id, start=batch_index)
    flops_per_token = train_flops_per_token(matmul_params(model.config), model.config.num_layers,
                                            model.config.hidden_size, cfg.seq_len)
    peak = _peak_flops(device, precision.name)
    out_dir = Path(cfg.out_dir)
    from longseq.train.metrics import MetricsWriter

    writer = MetricsWriter(out_dir)
    result = TrainResult(steps=step, memory=memory)
    stop = _StopFlag()

    def save() -> Path:
        counters = {"batch_index": batch_index, "tokens_seen": tokens_seen, "precision": precision.name}
        return save_checkpoint(out_dir, cfg, step, model, optimizer, scheduler, scaler, counters)

    bar = _progress(console, enabled=progress)
    task = bar.add_task("train", total=cfg.max_steps, completed=step, info="")
    try:
        with bar, stop:
            while step < cfg.max_steps and not stop.requested:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                loss = _train_step(model, [next(batches) for _ in range(cfg.grad_accum)], cfg, precision, device,
                                   optimizer, scaler)
                scheduler.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                step, batch_index = step + 1, batch_index + cfg.grad_accum
                tokens = cfg.grad_accum * cfg.batch_size * cfg.seq_len
                tokens_seen += tokens
                result.losses.append(loss)
                metrics: dict[str, Any] = {
                    "loss": loss, "lr": float(scheduler.get_last_lr()[0]), "tokens_per_s": tokens / elapsed,
                    "tokens_seen": tokens_seen, "peak_mem_gib": _peak_memory_gib(device),
                }
                if peak:
                    metrics["mfu"] = tokens / elapsed * flops_per_token / peak
                writer.write(step, metrics)
                info = f"loss {loss:.4f} · {metrics['tokens_per_s']:,.0f} tok/s"
                if "mfu" in metrics:
                    info += f" · MFU {metrics['mfu']:.1%}"
                bar.update(task, completed=step, info=info + f" · peak {metrics['peak_mem_gib']:.1f} GiB")
                if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
                    result.checkpoint = save()
    finally:
        writer.close()
    result.steps, result.interrupted, result.lm = step, stop.requested, lm
    model.eval()
    if stop.requested:  # Ctrl-C: finish the step in flight, save it, exit cleanly
        result.checkpoint = save()
        console.print(f"interrupted: saved {result.checkpoint} (resume with --resume latest)")
    elif result.checkpoint is not None:
        console.print(f"saved {result.checkpoint}")
    return result


def _train_step(model, micro_batches, cfg, precision, device, optimizer, scaler) -> float:
    """One optimizer step over grad_accum micro-batches; the loss is the mean over all their target tokens."""
    num_targets = max(1, sum(int((b.targets != IGNORE).sum()) for b in micro_batches))
    total = 0.0
    for b in micro_batches:
        ids, targets = b.input_ids.to(device), b.targets.to(device)
        positions = b.positions.to(device)
        # Rows that hold a single segment need no document mask (the fast causal kernel).
        doc_ids = b.doc_ids.to(device) if bool((b.positions[:, 1:] == 0).any()) else None
        with precision.autocast():
            loss = _loss(model, ids, positions, doc_ids, targets, cfg.loss_chunk) / num_targets
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.item()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if cfg.max_grad_norm > 0:
        params = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def _loss(model, ids, positions, doc_ids, targets, chunk: int) -> torch.Tensor:
    # A function of its own so that no local keeps the (B, S, d) hidden states alive through the layers' backward:
    # the loss chunks hold views of them only until the loss backward is done.
    hidden = model.hidden(ids, positions, doc_ids=doc_ids)
    return chunked_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, targets.flatten(), chunk)


def _norm(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    from longseq.plan.hardware import find_gpu

    gpu = find_gpu(torch.cuda.get_device_name(device))
    if gpu is None:
        return None
    return (gpu.fp16_tflops if precision == "fp16" else gpu.bf16_tflops) * 1e12


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


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
