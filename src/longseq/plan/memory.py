"""Training memory per GPU: weights, gradients, optimizer states, activations, and how parallelism divides them.

Single GPU, the layout of longseq train: full fine-tuning keeps fp32 weights (the master copy), fp32 gradients and
the optimizer's fp32 states, under bf16 autocast; LoRA keeps the frozen base in bf16 and fp32 adapters with their
gradients and states; QLoRA stores every decoder linear weight in NF4 (embeddings, norms, LM head stay bf16).
Several GPUs: ZeRO (Rajbhandari et al. 2020, arXiv 1910.02054, fig. 1) keeps bf16 weights (2Ψ), bf16 gradients
(2Ψ) and K·Ψ optimizer bytes (K = 12 for Adam: fp32 master + m + v) and partitions them over the Nd data-parallel
ranks: stage 1 2Ψ+2Ψ+KΨ/Nd, stage 2 2Ψ+(2+K)Ψ/Nd (DeepSpeed's layout; modelled, not in longseq). Stage 3 is
longseq's FSDP2 (`--parallel fsdp`): fp32 sharded weights, fp32 sharded gradients, AdamW m and v, 16Ψ/Nd as in the
paper, plus the gathered bf16 weights of the layer at work (and the next, prefetched) and of the root (embedding,
LM head), which FSDP2 keeps gathered from forward to the end of backward; `--offload params` is FSDP2's
CPUOffloadPolicy (weights, gradients and optimizer state in host memory). DDP (`--parallel ddp`) is stage 0 with
gradients as bucket views (no second copy). longseq loads the whole model on each GPU before sharding it (the load
peak). Ulysses (`--sp`) divides the tokens per GPU. Tensor and pipeline parallelism divide the weights by t·p
(Megatron; modelled, longseq only serves tensor-parallel). Expert parallelism (`--ep`, train/parallel/experts.py,
as DeepSpeed-MoE, Rajbhandari et al. 2022, arXiv 2201.05596) divides the routed experts' weights, gradients,
optimizer states and adapters by ep; assuming balanced routing, each rank computes as many expert rows as
without it, and holds one exchange's all-to-all send and receive buffers (top-k copies of its tokens' hidden states).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from longseq.config.train import check_expert_parallel, check_expert_split
from longseq.errors import LongseqError
from longseq.plan.activations import POLICIES, ActivationPeak, activation_peak
from longseq.plan.models import ModelSpec
from longseq.plan.params import (
    MLP_LINEARS,
    count_params,
    layer_linears,
    lora_expert_params,
    lora_params,
    routed_expert_params,
)
from longseq.plan.quant import nf4_bytes_per_param
from longseq.plan.setup import TrainSetup

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "sgd")
PRECISIONS = ("bf16", "fp16", "fp32")
# torchao NF4 (what longseq's QLoRA uses): 64-weight blocks, second-level scales per 256 in the weight dtype.
TORCHAO_NF4_BYTES = nf4_bytes_per_param(64, 256, second_level_bytes=2)
# torchao AdamW8bit: two 8-bit states with one fp32 scale per 256 (Dettmers et al. 2021, arXiv 2110.02861);
# tensors under 4096 elements keep fp32 states.
ADAM8BIT_BYTES = 2 * (1 + 4 / 256)


CUDA_CONTEXT_GIB = 0.5  # CUDA context, cuBLAS / cuDNN handles: outside PyTorch's allocator
# Caching-allocator reserve over the allocated peak, with the expandable segments `longseq train` turns on (the
# reserved / allocated of benchmarks/results/2026-12-03-train-liger-h200; fixed-size segments fragment more).
ALLOCATOR_SLACK = 0.02


def nf4_quantize_bytes(elements: int) -> float:
    """Transient bytes while torchao 0.18 quantizes one bf16 weight to NF4 (measured): 3 per element, plus a fp32
    distance table to the 16 NF4 levels over chunks of 2^20 elements."""
    return 3.0 * elements + 16 * 4 * min(elements, 2**20)


@dataclass
class TrainMemory:
    """Bytes on one GPU at the step's peak (what torch.cuda.max_memory_allocated reports), and beside it."""

    weights: float  # model weights as stored (frozen base + trainable)
    gradients: float  # gradients alive at the peak
    optimizer: float  # optimizer states (and the fp32 master copy under ZeRO)
    activations: float  # saved for backward
    transient: float  # workspace at the peak moment: loss chunk, norm / MLP / attention backward temporaries
    activation: ActivationPeak
    trainable: int  # trainable parameters (whole model)
    host: float = 0.0  # pinned host memory (offloaded optimizer, weights, layer inputs)
    load_peak: float = 0.0  # longseq QLoRA loads the bf16 model on the GPU before quantizing it
    notes: list[str] = field(default_factory=list)

    @property
    def allocated(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.transient

    @property
    def reserve(self) -> float:
        """Beyond the allocated peak: CUDA context and caching-allocator slack."""
        return CUDA_CONTEXT_GIB * 2**30 + ALLOCATOR_SLACK * max(self.allocated, self.load_peak)

    @property
    def total(self) -> float:
        return max(self.allocated, self.load_peak) + self.reserve


def validate(spec: ModelSpec, setup: TrainSetup) -> None:
    """LongseqError for settings that cannot work (one line, for the CLI)."""
    cfg, p = spec.config, setup.parallel
    checks = [
        (setup.method in METHODS, f"method must be one of {', '.join(METHODS)}; got {setup.method!r}"),
        (setup.recompute in POLICIES, f"recompute must be one of {', '.join(POLICIES)}; got {setup.recompute!r}"),
        (setup.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {setup.optimizer!r}"),
        (setup.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
        (min(setup.seq_len, setup.batch_size, setup.grad_accum, setup.loss_chunk, setup.lora_rank) > 0,
         "seq-len, batch-size, grad-accum, loss-chunk and lora-rank must be positive"),
        (min(p.dp, p.tp, p.pp, p.sp, p.cp, p.nodes) > 0, "parallel degrees and nodes must be positive"),
        (p.zero in (0, 1, 2, 3), f"zero stage must be 0, 1, 2 or 3; got {p.zero}"),
        (p.offload in ("none", "optimizer", "params"), "offload must be none, optimizer or params"),
        (p.offload != "params" or p.zero == 3, "offloading weights (params) needs ZeRO stage 3"),
        (cfg.num_heads % p.tp == 0 and cfg.num_kv_heads % p.tp == 0,
         f"tensor parallel {p.tp} must divide the heads ({cfg.num_heads}) and KV heads ({cfg.num_kv_heads})"),
        (cfg.num_layers % p.pp == 0, f"pipeline parallel {p.pp} must divide the {cfg.num_layers} layers"),
        (setup.seq_len % p.sequence_shards == 0 and cfg.num_kv_heads % p.sp == 0,
         f"sequence parallel {p.sp} must divide the sequence length and the {cfg.num_kv_heads} KV heads (Ulysses "
         "splits heads)"),
        (p.num_gpus % p.nodes == 0, f"{p.num_gpus} GPUs do not split evenly over {p.nodes} nodes"),
        (p.tp <= p.num_gpus // p.nodes, f"tensor parallel {p.tp} spans nodes: keep it within one node"),
        (setup.method == "full" or (setup.lora_targets and not set(setup.lora_targets) - set(layer_linears(spec))),
         f"lora targets must be among {', '.join(layer_linears(spec))}"),
    ]
    for ok, message in checks:
        if not ok:
            raise LongseqError(message)
    check_experts(spec, setup)


def check_experts(spec: ModelSpec, setup: TrainSetup) -> None:
    """LongseqError for an expert-parallel degree `longseq train --ep` refuses (config/train.py, the trainer's
    messages where they apply)."""
    p = setup.parallel
    if p.ep <= 0:
        raise LongseqError(f"ep must be positive, got {p.ep}")
    if p.ep == 1:
        return
    mode = f"--ep with --zero {p.zero} is not supported: expert parallelism needs --parallel ddp (--zero 0)"
    check_expert_parallel([f"--{n}" for n in ("tp", "cp", "sp", "pp") if getattr(p, n) > 1], setup.method,
                          setup.precision, mode if p.zero else None)
    check_expert_split(p.ep, spec.routed_experts if spec.is_moe else 1, p.dp)


def optimizer_bytes(spec: ModelSpec, setup: TrainSetup, trainable: int) -> float:
    """Optimizer state bytes for the trainable parameters (whole model, before any partitioning).

    AdamW: m and v in the parameter dtype, fp32 (Loshchilov & Hutter 2019): 8 B/param. AdamW8bit: block-wise
    8-bit m and v (Dettmers et al. 2021): ≈2 B/param. SGD with momentum: 4 B/param. Adafactor (Shazeer & Stern
    2018, arXiv 1804.04235): factored second moment, rows + cols per matrix, no first moment (torch.optim).
    """
    if setup.optimizer == "adamw":
        return 8.0 * trainable
    if setup.optimizer == "adamw8bit":
        return ADAM8BIT_BYTES * trainable
    if setup.optimizer == "sgd":
        return 4.0 * trainable
    return 4.0 * _adafactor_elements(spec, setup)


def _adafactor_elements(spec: ModelSpec, setup: TrainSetup) -> int:
    cfg = spec.config
    if setup.method == "full":
        per_layer = sum((x.in_features + x.out_features) * x.copies for x in layer_linears(spec).values())
        head = 0 if cfg.tie_word_embeddings else cfg.vocab_size + cfg.hidden_size
        norms = (2 * cfg.num_layers + 1) * cfg.hidden_size  # vectors keep a full second moment
        return cfg.num_layers * per_layer + cfg.vocab_size + cfg.hidden_size + head + norms
    lin = layer_linears(spec)
    per_layer = sum((setup.lora_rank + lin[t].in_features + setup.lora_rank + lin[t].out_features) * lin[t].copies
                    for t in setup.lora_targets)
    return cfg.num_layers * per_layer


def _extra_optimizer_bytes(spec: ModelSpec, setup: TrainSetup, extra: int) -> float:
    """LongLoRA's trainable embedding and norms (fp32-equivalent bytes; states take the parameters' dtype)."""
    if setup.optimizer != "adafactor":
        return optimizer_bytes(spec, setup, extra)
    cfg = spec.config
    embed = cfg.vocab_size + cfg.hidden_size if setup.train_embed else 0  # factored: rows + cols
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size if setup.train_norms else 0  # vectors: full
    return 4.0 * (embed + norms)


def trainable_params(spec: ModelSpec, setup: TrainSetup) -> int:
    counts = count_params(spec)
    if setup.method == "full":
        return counts.total
    extra = (counts.embedding if setup.train_embed else 0) + (counts.norms if setup.train_norms else 0)
    return lora_params(spec, setup.lora_rank, setup.lora_targets) + extra


def expert_trainable_params(spec: ModelSpec, setup: TrainSetup) -> int:
    """Of trainable_params, the routed experts' (their weights, or their adapters): what --ep splits."""
    if setup.method == "full":
        return routed_expert_params(spec)
    return lora_expert_params(spec, setup.lora_rank, setup.lora_targets)


def local_trainable_params(spec: ModelSpec, setup: TrainSetup) -> float:
    """Trainable parameters on one GPU before tp / pp / ZeRO divide them: the routed experts' by ep."""
    return trainable_params(spec, setup) - expert_trainable_params(spec, setup) * (1 - 1 / setup.parallel.ep)


def _expert_optimizer_bytes(spec: ModelSpec, setup: TrainSetup) -> float:
    """Of optimizer_bytes, the routed experts' states (Adafactor: their factored rows + cols, as
    _adafactor_elements counts them)."""
    if setup.optimizer != "adafactor":
        return optimizer_bytes(spec, setup, expert_trainable_params(spec, setup))
    if not spec.is_moe:
        return 0.0
    lin, r = layer_linears(spec), setup.lora_rank
    names = MLP_LINEARS if setup.method == "full" else [t for t in setup.lora_targets if t in MLP_LINEARS]
    per_expert = sum(lin[n].in_features + lin[n].out_features + (0 if setup.method == "full" else 2 * r)
                     for n in names if n in lin)
    return 4.0 * spec.config.num_layers * spec.routed_experts * per_expert


def exchange_bytes(spec: ModelSpec, setup: TrainSetup) -> float:
    """One MoE layer's all-to-all under --ep: the send and the receive buffer of top-k copies of this rank's tokens'
    hidden states in the autocast dtype (balanced routing: as many rows come in as go out); 0 without --ep."""
    if setup.parallel.ep == 1:
        return 0.0
    tokens = setup.batch_size * setup.seq_len / setup.parallel.sequence_shards
    dtype = 4 if setup.precision == "fp32" else 2
    return 2 * dtype * tokens * spec.experts_per_token * spec.config.hidden_size


def _state_bytes(spec: ModelSpec, setup: TrainSetup) -> tuple[float, float, float, float, list[str]]:
    """(weights, all gradients, optimizer, host) bytes on one GPU, and notes."""
    p, counts = setup.parallel, count_params(spec)
    shard = p.tp * p.pp  # model parallelism divides every weight-shaped thing
    trainable = trainable_params(spec, setup)
    notes: list[str] = []
    frozen_bytes = 4 if setup.precision == "fp32" else 2
    # --ep: the other ranks of this one's expert-parallel group hold this share of the routed experts' weights,
    # adapters, gradients and states (check_experts leaves only DDP, LoRA or full, without ZeRO)
    away = 1 - 1 / p.ep
    expert_opt = _expert_optimizer_bytes(spec, setup) * away if p.ep > 1 else 0.0
    if setup.method == "full":
        zero_layout = p.zero_ranks > 1 and p.zero in (1, 2)  # DeepSpeed bf16 + fp32 master; else fp32 (FSDP2 shards it)
        weight_b, grad_b = (2.0, 2.0) if zero_layout else (4.0, 4.0)
        master = 4.0 * trainable if zero_layout and setup.precision != "fp32" else 0.0
        experts = routed_expert_params(spec) * away
        weights, grads = weight_b * (counts.total - experts), grad_b * (trainable - experts)
        opt = optimizer_bytes(spec, setup, trainable) - expert_opt + master
    else:
        base = counts.total - routed_expert_params(spec) * away
        if setup.method == "qlora":
            weights = TORCHAO_NF4_BYTES * counts.linear + frozen_bytes * counts.not_linear
        else:
            weights = frozen_bytes * base
        adapters = lora_params(spec, setup.lora_rank, setup.lora_targets)
        extra = trainable - adapters  # LongLoRA's embeddings / norms train in the frozen dtype
        local_adapters = adapters - lora_expert_params(spec, setup.lora_rank, setup.lora_targets) * away
        weights += 4.0 * local_adapters
        grads = 4.0 * local_adapters + frozen_bytes * extra
        opt = (optimizer_bytes(spec, setup, adapters) - expert_opt
               + _extra_optimizer_bytes(spec, setup, extra) * frozen_bytes / 4)
    weights, grads, opt = weights / shard, grads / shard, opt / shard
    host = 0.0
    n = p.zero_ranks
    if n > 1 and p.zero >= 1:
        opt /= n
    if n > 1 and p.zero >= 2:
        grads /= n
    if n > 1 and p.zero >= 3:
        weights /= n
    if p.offload in ("optimizer", "params"):
        host += opt
        opt = 0.0
        notes.append("optimizer states in CPU memory (ZeRO-Offload): the optimizer step runs on the CPU")
    if p.offload == "params":
        host += weights + grads
        weights = grads = 0.0
        notes.append("weights and gradients in CPU memory (FSDP2 CPUOffloadPolicy / ZeRO-Infinity): streamed to "
                     "the GPU layer by layer")
    return weights, grads, opt, host, notes


def train_memory(spec: ModelSpec, setup: TrainSetup) -> TrainMemory:
    """Peak bytes on one GPU for a training setup."""
    validate(spec, setup)
    act = activation_peak(spec, setup)
    weights, grads_all, opt, host, notes = _state_bytes(spec, setup)
    p, counts = setup.parallel, count_params(spec)
    gathered = 4.0 if setup.precision == "fp32" else 2.0  # FSDP2 gathers in the autocast dtype
    if p.zero >= 3 and p.zero_ranks > 1:  # a ZeRO-3 rank gathers one layer's full weights (and prefetches the next)
        weights += 2 * gathered * counts.linear / spec.config.num_layers / (p.tp * p.pp)
        weights += gathered * (counts.embedding + counts.lm_head) / (p.tp * p.pp)  # the root: embedding, head
    share = act.grads / act.all_grads if act.all_grads else 0.0  # of the gradients, alive at the peak
    memory = TrainMemory(weights=weights, gradients=share * grads_all, optimizer=opt, activations=act.saved,
                         transient=act.peak - act.saved, activation=act, trainable=trainable_params(spec, setup),
                         host=host + act.host, notes=notes)
    if p.ep > 1:
        if act.phase != "optimizer step":  # counted at the peak moment whatever it is: an upper bound outside MoE
            memory.transient += exchange_bytes(spec, setup)
        notes.append(f"expert parallel {p.ep}: each GPU holds {spec.routed_experts // p.ep} of the "
                     f"{spec.routed_experts} routed experts per layer; activations assume balanced routing (as many "
                     "expert rows per GPU as without --ep)")
    if setup.method == "qlora":  # longseq loads the bf16 checkpoint on the GPU, then quantizes weight by weight
        biggest = max(x.in_features * x.out_features for x in layer_linears(spec).values())
        memory.load_peak = (2.0 * counts.total + nf4_quantize_bytes(biggest)) / (p.tp * p.pp)
    elif p.zero >= 3 and p.zero_ranks > 1:  # FSDP2: the whole model is on each GPU until fully_shard splits it
        load_b = 4.0 if setup.method == "full" or setup.precision == "fp32" else 2.0
        memory.load_peak = load_b * counts.total / (p.tp * p.pp)
    elif p.ep > 1:  # a GGUF model loads whole before --ep drops the other experts; an HF directory loads only this
        # GPU's experts (train/parallel/meta_loading.py), but the plan does not know the source: the upper bound
        memory.load_peak = _state_bytes(spec, replace(setup, parallel=replace(p, ep=1)))[0]
    return memory

