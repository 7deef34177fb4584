"""`longseq train`: the training loop (setup, steps, checkpoints, clean interruption)."""

from __future__ import annotations

import resource
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from longseq.attention import flash
from longseq.config import ModelConfig, TrainConfig
from longseq.distributed import checkpoint as ckpt_io
from longseq.distributed.data_parallel import gradient_sync
from longseq.distributed.env import DistEnv, init_distributed
from longseq.errors import LongseqError
from longseq.plan.flops import train_flops_per_token
from longseq.train.checkpoint import read_meta, resolve_checkpoint
from longseq.train.data import default_pad_id
from longseq.train.loss import IGNORE
from longseq.train.optim import build_optimizer, build_scheduler
from longseq.train.precision import resolve_precision

# Changing these between a run and its resumption would silently change what is trained. (grad_accum may change
# with the number of processes, as long as the sequences per step stay the same: checked separately.)
_RESUME_KEYS = ("model", "method", "seq_len", "batch_size", "lora_rank", "lora_alpha", "lora_targets",
                "lora_train_extra", "seed", "data", "optimizer", "attention", "window",
                "rope_scaling", "rope_factor")


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


def build(cfg: TrainConfig, env: DistEnv | None = None):
    """Model (with adapters), tokenizer, data, optimizer, scheduler, loss scaler and the module a training step
    calls (the model with its loss, data parallel when the run is) for a run."""
    from longseq.distributed.data_parallel import grad_scaler, wrap
    from longseq.distributed.ulysses import enable_ulysses
    from longseq.models.loader import load, resolve_device
    from longseq.models.overrides import apply_overrides
    from longseq.train.data import TrainData
    from longseq.train.lora import make_trainable
    from longseq.train.step import TokenLoss

    env = env or DistEnv(device=resolve_device(cfg.device))
    device = env.device
    precision = resolve_precision(cfg.precision, device)
    # Full fine-tuning keeps float32 master weights; LoRA/QLoRA keep the frozen base in the compute dtype.
    load_dtype = torch.float32 if cfg.method == "full" else precision.frozen_dtype
    lm = load(cfg.model, dtype=load_dtype, device=device)
    apply_overrides(lm.model, cfg)  # attention variant / RoPE scaling flags
    data = TrainData.load(list(cfg.data), lm.tokenizer, on_bad_row=cfg.on_bad_row)
    model = lm.model
    torch.manual_seed(cfg.seed)  # LoRA initialisation
    make_trainable(model, cfg)
    model.train()
    step_model = TokenLoss(model, cfg.loss_chunk)
    if env.sp > 1:
        enable_ulysses(model, env.sp_group, env.sp)
    if env.distributed:
        step_model = wrap(step_model, env, precision, offload=cfg.fsdp_offload)
    optimizer = build_optimizer(model, cfg, torch.device("cpu") if cfg.fsdp_offload else device)
    return (lm, data, precision, optimizer, build_scheduler(optimizer, cfg), grad_scaler(env, precision),
            step_model)


def plan_memory(model, cfg: TrainConfig, precision: str, device: torch.device, packed: bool, world_size: int = 1):
    """Choose recompute / tiling / offload (train/memory_plan.py) and set them on the model."""
    from longseq.plan.training import parallelism_for
    from longseq.train.memory_plan import choose

    choice = choose(model.config, cfg, precision, device, packed, parallelism_for(cfg, world_size))
    model.set_recompute(choice.recompute, keep_on_gpu=choice.offload_keep, plain_layers=choice.plain_layers)
    model.set_tiling(choice.tile)
    if world_size == 1:  # page-lock the offloaded layer inputs' host buffers now, not in the first step
        model.reserve_offload(cfg.batch_size, cfg.seq_len)
    return choice


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    if not cfg.data:
        raise LongseqError("no training data: pass --data FILE_OR_FOLDER")
    resume_from = resolve_checkpoint(cfg.resume, cfg.out_dir) if cfg.resume else None  # fail before the slow part
    env = init_distributed(cfg)
    console.quiet = not env.is_main  # one process reports for all
    lm, data, precision, optimizer, scheduler, scaler, step_model = build(cfg, env)
    model, device = lm.model, lm.device
    attn = model.config.attention  # the kernel (--attention-kernel fa4 fails here where it cannot run)
    kernel = flash.describe(attn.kernel, attn.plain, device, precision.autocast_dtype or precision.frozen_dtype,
                            model.config.head_dim)
    st = data.stats
    console.print(f"[dim]data: {st.files} file(s), {st.documents:,} documents, {st.tokens:,} tokens "
                  f"({st.target_tokens:,} trained)[/]")
    if data.bad_rows.total:
        console.print(f"[yellow]{data.bad_rows.summary()}[/]")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    console.print(f"[dim]{cfg.method}: {trainable:,} trainable parameters · {device} · {precision.name}"
                  + (f" · RoPE {rope.type} x{rope.factor:g} (context {model.config.max_seq_len:,})"
                     if (rope := model.config.rope).type != "default" else "") + "[/]")
    if cfg.seq_len > model.config.max_seq_len:
        console.print(f"[yellow]seq_len {cfg.seq_len:,} is past the model's context ({model.config.max_seq_len:,}): "
                      "consider --rope-scaling linear|ntk|yarn --rope-factor F[/]")
    memory = plan_memory(model, cfg, precision.name, device, packed=data.stats.documents > 1,
                         world_size=env.world_size)
    console.print(f"[dim]memory: {memory.describe()}; loss chunks of {cfg.loss_chunk:,} tokens; attention: "
                  f"{kernel}[/]")
    if not memory.fits:
        console.print("[yellow]the planner predicts this run does not fit; it may run out of memory "
                      "(try a shorter --seq-len, --method qlora or --optimizer adamw8bit)[/]")
    if env.distributed:
        console.print(f"[dim]{env.parallel}{' + CPU offload' if cfg.fsdp_offload else ''} over {env.world_size} "
                      f"process(es): {env.dp} data parallel × {env.sp} sequence parallel (Ulysses)[/]")
    sequences_per_step = cfg.batch_size * cfg.grad_accum * env.dp

    step = batch_index = 0
    tokens_seen = 0
    if resume_from is not None:
        path = resume_from
        saved = read_meta(path)["config"]
        changed = [k for k in _RESUME_KEYS if _norm(saved.get(k)) != _norm(asdict(cfg)[k])]
        if changed:
            raise LongseqError(f"cannot resume {path}: the run's {', '.join(changed)} differ from the checkpoint's")
        saved_sequences = read_meta(path).get("sequences_per_step", saved["batch_size"] * saved["grad_accum"])
        if saved_sequences != sequences_per_step:
            raise LongseqError(f"cannot resume {path}: it trained {saved_sequences} sequences per step, this run "
                               f"{sequences_per_step} (batch_size × grad_accum × {env.dp} data-parallel "
                               "process(es)): set --grad-accum to match")
        meta = ckpt_io.load(path, model, optimizer, scheduler, scaler, env, cfg.seed)
        step, batch_index, tokens_seen = meta["step"], meta["batch_index"], meta["tokens_seen"]
        console.print(f"[dim]resumed from {path} at step {step}[/]")
    else:
        torch.manual_seed(cfg.seed)  # dropout

    pad_id = default_pad_id(lm.tokenizer)
    batches = env.step_batches(data.batches(cfg.seq_len, cfg.batch_size, cfg.seed, pad_id, start=batch_index),
                               cfg.grad_accum)
    flops_per_token = train_flops_per_token(matmul_params(model.config), model.config.num_layers,
                                            model.config.hidden_size, cfg.seq_len)
    peak = _peak_flops(device, precision.name)
    out_dir = Path(cfg.out_dir)
    from longseq.train.metrics import MetricsWriter

    writer = MetricsWriter(out_dir, enabled=env.is_main)
    result = TrainResult(steps=step, memory=memory)
    stop = _StopFlag()

    def save() -> Path:
        counters = {"batch_index": batch_index, "tokens_seen": tokens_seen, "precision": precision.name,
                    "sequences_per_step": sequences_per_step}
        return ckpt_io.save(out_dir, cfg, step, model, optimizer, scheduler, scaler, counters, env)

    bar = _progress(console, enabled=progress and env.is_main)
    task = bar.add_task("train", total=cfg.max_steps, completed=step, info="")
    try:
        with bar, stop:
            while step < cfg.max_steps and not stop.requested:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                loss = _train_step(step_model, next(batches), cfg, precision, device, optimizer, scaler, env)
                scheduler.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                step, batch_index = step + 1, batch_index + cfg.grad_accum * env.dp
                tokens = sequences_per_step * cfg.seq_len  # all processes
                if env.distributed:  # Ctrl-C reaches the ranks at different moments: stop together
                    stop.requested = env.all_reduce_sum(float(stop.requested)) > 0
                tokens_seen += tokens
                result.losses.append(loss)
                metrics: dict[str, Any] = {
                    "loss": loss, "lr": float(scheduler.get_last_lr()[0]), "tokens_per_s": tokens / elapsed,
                    "tokens_seen": tokens_seen, "peak_mem_gib": _peak_memory_gib(device),
                }
                if peak:
                    metrics["mfu"] = tokens / elapsed * flops_per_token / (peak * env.world_size)
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


def _train_step(model, micro_batches, cfg, precision, device, optimizer, scaler, env: DistEnv | None = None
                ) -> float:
    """One optimizer step over grad_accum micro-batches; the loss is the mean over all their target tokens, on all
    processes: sum of token losses / total target tokens (so data parallel equals one process on the same batch).

    `model` is a train.step.TokenLoss (possibly DDP / FSDP-wrapped) or a bare CausalLM."""
    from longseq.models.llama import CausalLM
    from longseq.train.step import TokenLoss

    env = env or DistEnv(device=device)
    if isinstance(model, CausalLM):
        model = TokenLoss(model, cfg.loss_chunk)
    shard = env.shard_sequence  # Ulysses: this rank's slice of each sequence; the identity otherwise
    num_targets = max(1, env.all_reduce_sum(sum(int((shard(b.targets) != IGNORE).sum()) for b in micro_batches)))
    total = 0.0
    for i, b in enumerate(micro_batches):
        ids, targets, positions = (shard(t).to(device) for t in (b.input_ids, b.targets, b.positions))
        # Rows that hold a single segment need no document mask (the fast causal kernel). The whole sequence's:
        # under Ulysses attention runs over all of it.
        doc_ids = b.doc_ids.to(device) if bool((b.positions[:, 1:] == 0).any()) else None
        with gradient_sync(model, env, sync=i == len(micro_batches) - 1):  # exchange grads on the last one only
            with precision.autocast():
                loss = model(ids, positions, doc_ids, targets) / num_targets
            # DDP and FSDP average gradients over the processes; times their number, that mean is the sum.
            scaled = loss * env.world_size if env.distributed else loss
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.item()
    total = env.all_reduce_sum(total)
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
