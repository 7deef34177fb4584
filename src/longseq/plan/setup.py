"""What the planner plans: a training setup (method, sequence, memory techniques) and its parallel layout, and
the one mapping from a `longseq train` configuration onto them."""

from __future__ import annotations

from dataclasses import dataclass, field

from longseq.config import TrainConfig
from longseq.config.policy import LORA_TARGETS_ALL


@dataclass(frozen=True)
class Parallelism:
    """How many GPUs and how the work is split over them (num_gpus = dp · tp · pp · sp · cp; ep splits dp)."""

    dp: int = 1  # data parallel
    tp: int = 1  # tensor parallel (Megatron, with sequence parallelism)
    pp: int = 1  # pipeline stages
    sp: int = 1  # Ulysses sequence parallel
    cp: int = 1  # context parallel (ring attention)
    ep: int = 1  # expert parallel: groups of ep data-parallel ranks share one copy of every routed expert
    zero: int = 0  # ZeRO stage over the dp ranks: 0 | 1 | 2 | 3
    offload: str = "none"  # none | optimizer (ZeRO-Offload) | params (ZeRO-Infinity: optimizer and weights)
    nodes: int = 1

    @property
    def num_gpus(self) -> int:
        return self.dp * self.tp * self.pp * self.sp * self.cp

    @property
    def zero_ranks(self) -> int:
        """Ranks that hold the same weights and partition their states: data × context × sequence parallel
        (ZeRO over dp·cp·sp, as DeepSpeed-Ulysses and longseq's FSDP2 do)."""
        return self.dp * self.cp * self.sp

    @property
    def sequence_shards(self) -> int:
        """Ranks that share one sequence, each holding this fraction of its tokens' activations."""
        return self.sp * self.cp


@dataclass(frozen=True)
class TrainSetup:
    method: str = "lora"
    seq_len: int = 2048
    batch_size: int = 1  # sequences per micro-batch per GPU (model replica)
    grad_accum: int = 1
    recompute: str = "none"
    optimizer: str = "adamw"
    precision: str = "bf16"
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = LORA_TARGETS_ALL
    train_embed: bool = False
    train_norms: bool = False
    loss_chunk: int = 1024
    packed: bool = False
    keep_hidden: bool = True
    mlp_tile: int | None = None
    offload_keep: int | None = None  # "offloaded": layers whose inputs stay on the GPU; None: as many as fit
    plain_layers: int = 0  # keep_attention / full: the last layers recompute only the SwiGLU product
    attention_layers: int = 0  # full: the layers below the plain ones recompute as keep_attention
    fused: bool = True  # fused RMSNorm / RoPE / SwiGLU kernels (what longseq runs on a GPU); False: eager ops
    parallel: Parallelism = field(default_factory=Parallelism)


def parallelism_for(cfg: TrainConfig, world_size: int, nodes: int = 1) -> Parallelism:
    """The Parallelism of a `longseq train` run on `world_size` processes."""
    return Parallelism(dp=cfg.data_parallel(world_size), tp=cfg.tp, pp=cfg.pp, sp=cfg.sp, cp=cfg.cp, ep=cfg.ep,
                       zero=3 if cfg.parallel == "fsdp" else 0, offload="params" if cfg.fsdp_offload else "none",
                       nodes=nodes)


def setup_for(cfg: TrainConfig, *, precision: str, packed: bool, recompute: str, tile: int | None = None,
              offload_keep: int | None = 0, plain_layers: int = 0, attention_layers: int = 0, fused: bool = True,
              parallel: Parallelism | None = None) -> TrainSetup:
    """The TrainSetup of a `longseq train` run: its options, the precision it resolved to, whether its data packs
    several documents per row, and the memory techniques under consideration (train/memory_plan.py). The trainer's
    step (train/step.py) drops `hidden` before backward: keep_hidden is False."""
    return TrainSetup(
        method=cfg.method, seq_len=cfg.seq_len, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        recompute=recompute, optimizer=cfg.optimizer, precision=precision, lora_rank=cfg.lora_rank,
        lora_targets=cfg.lora_targets, train_embed="embed" in cfg.lora_train_extra,
        train_norms="norm" in cfg.lora_train_extra, loss_chunk=cfg.loss_chunk, packed=packed, keep_hidden=False,
        mlp_tile=tile, offload_keep=offload_keep, plain_layers=plain_layers, attention_layers=attention_layers,
        parallel=parallel or Parallelism(),
        fused=fused)
