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
    PIPELINE_SCHEDULES,
    PRECISIONS,
    RECOMPUTE_POLICIES,
    SCHEDULES,
)
from longseq.errors import LongseqError

# Tokenizing a row takes about 150 times its size in memory (the tokenizer's per-token records): 8 MiB, about 2M
# tokens, takes about 1.2 GB. Longer rows are skipped as bad rows.
DEFAULT_MAX_ROW_BYTES = 8 * 2**20


def check_expert_parallel(others: list[str], method: str, precision: str, data_parallel: str | None = None) -> None:
    """--ep beside the other degrees in use (`others`: their flags), the method and the precision: a LongseqError
    for what expert parallelism does not support yet (the trainer's check and the planner's). `data_parallel`: why
    the data-parallel mode in use cannot hold expert shards, where it cannot."""
    if others:  # the sequence / tensor / pipeline splits do not route their tokens through the expert exchange
        raise LongseqError(f"--ep with {' / '.join(others)} is not supported yet: expert parallelism runs inside "
                           "plain data parallelism for now")
    if data_parallel:
        raise LongseqError(data_parallel)
    if method == "qlora":
        raise LongseqError("--ep with --method qlora is not supported: NF4 expert stacks cannot be split yet; "
                           "use --method lora or full")
    if precision == "fp16":  # the loss scaler's overflow check would not agree across the EP group
        raise LongseqError("--ep with --precision fp16 is not supported: use bf16")


def check_expert_split(ep: int, num_experts: int, dp: int | None = None) -> None:
    """--ep `ep` against the model's experts per layer (1: dense) and, where known, the data-parallel size."""
    if num_experts <= 1:
        raise LongseqError(f"--ep {ep} needs a mixture-of-experts model; this one is dense")
    if num_experts % ep:
        raise LongseqError(f"--ep {ep} must divide the model's {num_experts} experts per layer")
    if dp is not None:
        check_expert_degree(ep, dp)


def check_expert_degree(ep: int, dp: int) -> None:
    if dp % ep:
        raise LongseqError(f"ep {ep} must divide the data-parallel size ({dp}): expert-parallel groups are made of "
                           "data-parallel processes")


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
                          "run, fsdp with --tp, none on one; fsdp shards weights, gradients and optimizer state, "
                          "ZeRO-3)", default="auto")
    fsdp_offload: bool = flag("fsdp: keep the sharded weights, gradients and optimizer state in CPU memory",
                              default=False)
    dp: int | None = flag("data-parallel degree: process groups that train different micro-batches (default: the "
                          "processes left over by tp x cp x sp; dp x tp x cp x sp must equal the number of "
                          "processes)", default=None)
    tp: int = flag("tensor-parallel degree (Megatron with sequence parallelism): processes that split every "
                   "decoder weight matrix; divides the model's KV heads and MLP width; needs --parallel fsdp",
                   default=1)
    cp: int = flag("context-parallel degree (ring attention): processes that share each sequence in load-balanced "
                   "chunks, any number of them whatever the KV heads", default=1)
    sp: int = flag("Ulysses degree: processes that share each sequence by heads (divides the model's KV heads); "
                   "with --cp, Ulysses inside each ring rank (2D)", default=1)
    pp: int = flag("pipeline stages: processes that each hold a run of the decoder layers, a step's --grad-accum "
                   "micro-batches flowing through them (for now without dp / tp / cp / sp)", default=1)
    pp_schedule: str = flag("gpipe | 1f1b | interleaved-1f1b (two stages per process): the pipeline's order of "
                            "micro-batch forwards and backwards", default="1f1b")
    ep: int = flag("expert-parallel degree: data-parallel processes that split every mixture-of-experts layer's "
                   "experts among them, exchanging tokens all-to-all (EP groups inside dp, as DeepSpeed-MoE and "
                   "Megatron: divides dp and the expert count; needs ddp, without tp / cp / sp / pp)", default=1)
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
                              ("parallel", PARALLEL_MODES), ("pp_schedule", PIPELINE_SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise LongseqError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "lora_rank", "loss_chunk", "keep_last",
                     "log_every", "tp", "cp", "sp", "pp", "ep", "nproc", "max_row_bytes"):
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
        if self.dp is not None and self.dp <= 0:
            raise LongseqError(f"dp must be positive, got {self.dp}")
        self._check_layout()

    @property
    def sequence_shards(self) -> int:
        """Processes that share one sequence: each holds seq_len / sequence_shards of its tokens."""
        return self.cp * self.sp * self.tp

    def _check_layout(self) -> None:
        """The parallel degrees on their own (data_parallel checks them against the number of processes)."""
        split = self.sequence_shards * (2 if self.cp > 1 else 1)  # ring attention: 2 chunks per rank
        if self.seq_len % split:
            how = " x ".join(f"{n} {getattr(self, n)}" for n in ("tp", "cp", "sp") if getattr(self, n) > 1)
            raise LongseqError(f"seq_len {self.seq_len} must be a multiple of {split} ({how}"
                               f"{' x 2 chunks per ring rank' if self.cp > 1 else ''})")
        if self.fsdp_offload and self.parallel != "fsdp":
            raise LongseqError("fsdp_offload needs --parallel fsdp")
        several = [f"--{n} {getattr(self, n)}" for n in ("tp", "cp", "sp", "pp") if getattr(self, n) > 1]
        if self.parallel == "none" and (several or (self.dp or 1) > 1):
            raise LongseqError(f"{(several or ['--dp'])[0]} needs several processes: use --parallel ddp or fsdp")
        if self.pp > 1:
            self._check_pipeline()
        if self.ep > 1:
            self._check_experts()
        if self.tp > 1:
            if self.parallel == "ddp":
                raise LongseqError("--tp needs --parallel fsdp (or auto): DDP cannot replicate tensor-parallel "
                                   "weights")
            if self.cp > 1 or self.sp > 1:
                raise LongseqError("--tp with --cp or --sp is not supported yet: tensor parallelism already "
                                   "splits the sequence over its processes (sequence parallelism)")
            if self.method == "qlora":
                raise LongseqError("--tp with --method qlora is not supported: NF4 weights cannot be split by "
                                   "tensor parallelism; use --method lora, or --parallel fsdp without --tp")
            if self.fsdp_offload:
                raise LongseqError("--tp with --fsdp-offload is not supported yet")
            if self.tile_tokens:
                raise LongseqError("--tp with --tile-tokens is not supported: tensor parallelism already splits the "
                                   "norms' tokens and the MLP's width")

    def _check_experts(self) -> None:
        # The expert shards are plain per-rank tensors: FSDP2 would shard and average them as replicated weights.
        mode = (f"--ep with --parallel {self.parallel} is not supported: expert parallelism needs --parallel ddp (or "
                "auto)") if self.parallel in ("none", "fsdp") else None
        check_expert_parallel([f"--{n}" for n in ("tp", "cp", "sp", "pp") if getattr(self, n) > 1], self.method,
                              self.precision, mode)

    def _check_pipeline(self) -> None:
        others = [f"--{n}" for n in ("dp", "tp", "cp", "sp") if (getattr(self, n) or 1) > 1]
        if others:
            raise LongseqError(f"--pp with {' / '.join(others)} is not supported yet: pipeline stages run without "
                               "data, tensor or sequence parallelism for now")
        if self.grad_accum < self.pp:
            raise LongseqError(f"--pp {self.pp} needs at least {self.pp} micro-batches per step to fill the "
                               f"pipeline: --grad-accum {self.pp} or more")
        if self.pp_schedule == "interleaved-1f1b" and self.grad_accum % self.pp:
            raise LongseqError(f"--pp-schedule interleaved-1f1b needs --grad-accum a multiple of --pp {self.pp}")
        if self.fsdp_offload:
            raise LongseqError("--pp with --fsdp-offload is not supported: the stages are not sharded")
        if self.precision == "fp16":
            raise LongseqError("--pp with --precision fp16 is not supported (loss scaling inside the schedule): "
                               "use bf16")

    def data_parallel(self, world_size: int) -> int:
        """The data-parallel degree on `world_size` processes: --dp, or what tp x cp x sp leaves over. A layout
        that does not multiply to world_size is a one-line error."""
        model_parallel = self.tp * self.cp * self.sp * self.pp
        degrees = " x ".join(f"{n} {getattr(self, n)}" for n in ("tp", "cp", "sp", "pp") if getattr(self, n) > 1)
        if self.dp is None:
            if world_size % model_parallel:
                raise LongseqError(f"{degrees} = {model_parallel} processes per model replica does not divide the "
                                   f"{world_size} process(es) launched")
            return self._check_expert_degree(world_size // model_parallel)
        if self.dp * model_parallel != world_size:
            product = " x ".join([f"dp {self.dp}", *([degrees] if degrees else [])])
            raise LongseqError(f"{product} = {self.dp * model_parallel} processes, but {world_size} were launched")
        return self._check_expert_degree(self.dp)

    def _check_expert_degree(self, dp: int) -> int:
        check_expert_degree(self.ep, dp)
        return dp

    def to_dict(self) -> dict[str, Any]:
        """{option: value}, flat as flags and YAML keys are (checkpoints record the run's options so)."""
        return to_flat(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return from_flat(cls, values)
