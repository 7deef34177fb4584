"""Options of a training run (`longseq train`): data, method, optimizer, memory techniques, parallelism."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from longseq.config.flags import flag, from_flat, nested, to_flat
from longseq.config.overrides import ModelOverrides
from longseq.config.policy import (
    LORA_TARGETS_ALL,
    METHODS,
    OPTIMIZERS,
    PARALLEL_MODES,
    PRECISIONS,
    RECOMPUTE_POLICIES,
    SCHEDULES,
)
from longseq.errors import LongseqError

# Tokenizing a row takes about 150 times its size in memory (the tokenizer's per-token records): 8 MiB, about 2M
# tokens, takes about 1.2 GB. Longer rows are skipped as bad rows.
DEFAULT_MAX_ROW_BYTES = 8 * 2**20


@dataclass
class TrainConfig:
    """Everything a training run needs. `longseq train` flags and YAML keys are these field names, with the model
    overrides' fields among them (flat: `--rope-scaling yarn`, `rope_scaling: yarn`)."""

    overrides: ModelOverrides = nested(ModelOverrides)

    data: tuple[str, ...] = flag("JSONL (text or chat messages) or .txt files / folders", default=())
    model: str | None = flag("HF model directory or .gguf file (default: the built-in model)", default=None)
    out_dir: str = flag("where checkpoints, metrics and exports go", default="runs/train")
    method: str = flag("lora | qlora | full", default="lora")
    seq_len: int = flag("tokens per packed sequence", default=2048)
    batch_size: int = flag("sequences per micro-batch", default=1)
    grad_accum: int = flag("micro-batches per optimizer step", default=1)
    max_steps: int = flag("optimizer steps", default=100)
    lr: float = flag("peak learning rate", default=2e-4)
    weight_decay: float = flag("decoupled weight decay", default=0.0)
    warmup_steps: int = flag("linear warm-up steps", default=0)
    schedule: str = flag("cosine | linear | constant decay after warm-up", default="cosine")
    min_lr_ratio: float = flag("final learning rate as a fraction of lr", default=0.0)
    max_grad_norm: float = flag("gradient clipping norm; 0 disables", default=1.0)
    optimizer: str = flag("adamw | adamw8bit | sgd | adafactor", default="adamw")
    precision: str = flag("auto | bf16 | fp16 | fp32 (auto: bf16 on GPU, fp32 on CPU)", default="auto")
    plan: str = flag("auto: choose recompute, tiling and offload from the planner and the free memory; off: "
                      "as the flags say", default="auto")
    recompute: str = flag("activation checkpointing: auto | none | selective | keep_attention (recompute all but "
                           "attention) | full | offloaded (full, with layer inputs in pinned host memory)",
                           default="auto")
    tile_tokens: int | None = flag("tokens per RMSNorm / MLP tile for long sequences; 0: off (default: planned)",
                                   default=None)
    offload_keep: int | None = flag("recompute offloaded: the last layers whose inputs stay on the GPU "
                                    "(default: planned from free memory)", default=None)
    plain_layers: int | None = flag("recompute keep_attention / full: the last layers that recompute only the "
                                    "SwiGLU product (default: as many as fit)", default=None)
    attention_layers: int | None = flag("recompute full: the last layers that keep their attention (recompute as "
                                        "keep_attention; default: as many as fit)", default=None)
    gpu_memory: float | None = flag("GiB of GPU memory the run may plan for, below what the GPU has free (a shared "
                                    "GPU); --plan auto fits its choices in it (default: all that is free)",
                                    default=None)
    lora_rank: int = flag("LoRA rank r", default=16)
    lora_alpha: float = flag("LoRA alpha (scale = alpha / r)", default=32.0)
    lora_dropout: float = flag("dropout on the LoRA input", default=0.0)
    lora_targets: tuple[str, ...] = flag("linear layers that get adapters", default=LORA_TARGETS_ALL)
    lora_train_extra: tuple[str, ...] = flag("also train: embed, norm (LongLoRA); router (mixture of experts)",
                                             default=())
    router_aux_loss_coef: float | None = flag("mixture of experts: weight of the router load-balancing loss, as "
                                              "transformers adds it (default: the model config.json's "
                                              "router_aux_loss_coef where its output_router_logits is set, else 0)",
                                              default=None)
    router_z_loss_coef: float = flag("mixture of experts: weight of the router z-loss (ST-MoE); none of Mixtral, "
                                     "Qwen2-MoE, Qwen3-MoE uses it", default=0.0)
    loss_chunk: int = flag("tokens per chunk of the fused LM-head + cross-entropy", default=1024)
    seed: int = flag("data order, initialisation and dropout", default=0)
    device: str = flag("cpu, cuda or cuda:N", default="auto")
    save_every: int = flag("checkpoint every N steps; 0: only at the end", default=100)
    keep_last: int = flag("checkpoints kept", default=3)
    resume: str | None = flag("checkpoint directory, or 'latest' in out_dir", default=None)
    log_every: int = flag("steps between metric lines", default=1)
    on_bad_row: str = flag("skip | fail on malformed data rows", default="skip")
    max_row_bytes: int = flag("largest data row read, in bytes: a .jsonl line or a whole .txt file (longer ones are "
                              "bad rows); tokenizing a row takes about 150x its size in memory",
                              default=DEFAULT_MAX_ROW_BYTES)
    parallel: str = flag("auto | none | ddp | fsdp: data parallelism over the processes (auto: ddp when several "
                          "run, none on one; fsdp shards weights, gradients and optimizer state, ZeRO-3)",
                          default="auto")
    fsdp_offload: bool = flag("fsdp: keep the sharded weights, gradients and optimizer state in CPU memory",
                              default=False)
    sequence_parallel: int = flag("Ulysses degree: processes that share each sequence (divides the model's KV "
                                  "heads and seq_len)", default=1)
    nproc: int = flag("processes to start on this machine (re-launches itself under torchrun); ignored when "
                       "already launched by torchrun", default=1)

    def __post_init__(self):
        if isinstance(self.data, str):
            self.data = (self.data,)
        for name in ("lora_targets", "lora_train_extra"):  # "q_proj,v_proj" and ["q_proj", "v_proj"] alike
            value = getattr(self, name)
            items = value.split(",") if isinstance(value, str) else [x for v in value for x in str(v).split(",")]
            setattr(self, name, tuple(x.strip() for x in items if x.strip()))
        self.data = tuple(str(d) for d in self.data)
        for name, allowed in (("method", METHODS), ("precision", PRECISIONS), ("optimizer", OPTIMIZERS),
                              ("schedule", SCHEDULES), ("recompute", ("auto", *RECOMPUTE_POLICIES)),
                              ("on_bad_row", ("skip", "fail")), ("plan", ("auto", "off")),
                              ("parallel", PARALLEL_MODES)):
            if getattr(self, name) not in allowed:
                raise LongseqError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "lora_rank", "loss_chunk", "keep_last",
                     "log_every", "sequence_parallel", "nproc", "max_row_bytes"):
            if getattr(self, name) <= 0:
                raise LongseqError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "warmup_steps", "min_lr_ratio", "max_grad_norm", "save_every"):
            if not getattr(self, name) >= 0:
                raise LongseqError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("tile_tokens", "offload_keep", "plain_layers", "attention_layers"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise LongseqError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.plain_layers and self.attention_layers:
            raise LongseqError("set plain_layers or attention_layers, not both: the planner models one at a time")
        if self.overrides.attention == "memory":  # InfLLM is training-free: its memory lives in generation's cache
            raise LongseqError("--attention memory is for generation and evaluation, not training")
        if self.gpu_memory is not None and not self.gpu_memory > 0:
            raise LongseqError(f"gpu_memory must be a positive number of GiB, got {self.gpu_memory}")
        if not 0 <= self.lora_dropout < 1:
            raise LongseqError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        bad = set(self.lora_targets) - set(LORA_TARGETS_ALL)
        if bad or not self.lora_targets:
            raise LongseqError(f"lora_targets must be among {', '.join(LORA_TARGETS_ALL)}; got {sorted(bad) or 'none'}")
        bad = set(self.lora_train_extra) - {"embed", "norm", "router"}
        if bad:
            raise LongseqError(f"lora_train_extra takes embed, norm and/or router; got {sorted(bad)}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                raise LongseqError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seq_len % self.sequence_parallel:
            raise LongseqError(f"seq_len {self.seq_len} must be a multiple of sequence_parallel "
                               f"{self.sequence_parallel} (each process holds seq_len / sequence_parallel tokens)")
        if self.fsdp_offload and self.parallel != "fsdp":
            raise LongseqError("fsdp_offload needs --parallel fsdp")
        if self.parallel == "none" and self.sequence_parallel > 1:
            raise LongseqError("sequence_parallel needs several processes: use --parallel ddp or fsdp")

    def to_dict(self) -> dict[str, Any]:
        """{option: value}, flat as flags and YAML keys are (checkpoints record the run's options so)."""
        return to_flat(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return from_flat(cls, values)
