"""`longseq plan train`: memory, step time, throughput, GPU-hours and cost of a training setup."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from longseq.plan.flops import (
    chinchilla_tokens,
    launch_time_s,
    overlapped_s,
    step_flops_per_token,
    step_time_s,
    train_flops_per_token,
)
from longseq.plan.hardware import GPU, INTER_NODE_GBS
from longseq.plan.memory import (
    TrainMemory,
    expert_trainable_params,
    local_trainable_params,
    train_memory,
    trainable_params,
)
from longseq.plan.models import ModelSpec
from longseq.plan.params import count_params, layer_linears, lora_params
from longseq.plan.setup import TrainSetup

# Bytes each optimizer reads and writes per trainable parameter in its (memory-bound) step: AdamW fp32 reads p, g,
# m, v and writes p, m, v (28); 8-bit Adam 1-byte states (16); SGD momentum (20); Adafactor ~ p, g twice (16).
OPTIMIZER_TRAFFIC = {"adamw": 28.0, "adamw8bit": 16.0, "sgd": 20.0, "adafactor": 16.0}
NF4_DEQUANT_TRAFFIC = 28.0  # bytes moved per weight element each time torchao dequantizes NF4 (14 written + read)
CPU_ADAM_PARAMS_PER_S = 1.5e9  # DeepSpeed CPU-Adam on a many-core host (Ren et al. 2021, arXiv 2101.06840, §6)
PCIE_GBS = 25.0  # host <-> GPU, PCIe 4.0 x16 in practice


@dataclass
class TrainPlan:
    model: str
    gpu: GPU
    setup: TrainSetup
    memory: TrainMemory
    params: int
    trainable: int
    fits: bool
    step_time_s: float  # one optimizer step (grad_accum micro-batches), all GPUs
    tokens_per_step: int  # global
    tokens_per_s: float
    mfu: float  # model FLOPs (6N + 12·L·d·S, PaLM) / (time · GPUs · peak)
    model_flops_per_token: float
    hw_flops_per_token: float
    compute_s: float  # GPU work, or the host launch time where that is longer (plan/flops.py overlapped_s)
    comm_s: float  # exposed communication per step
    other_s: float  # optimizer step, NF4 dequantization, offload transfers
    tokens: float | None = None
    time_s: float | None = None
    gpu_hours: float | None = None
    cost_usd: float | None = None
    price_per_hour: float = 0.0
    chinchilla_tokens: float = 0.0
    notes: list[str] = field(default_factory=list)
    layers: int = 0  # decoder layers on one GPU (a pipeline stage's)
    host_gib: float | None = None  # the host memory page-locked buffers may take (None: unlimited)
    active_params: int = 0  # a mixture of experts: the weights one token multiplies through (top-k experts); dense: 0

    @property
    def num_gpus(self) -> int:
        return self.setup.parallel.num_gpus

    def to_dict(self) -> dict[str, Any]:
        m = self.memory
        gib = 2**30
        return {
            "model": self.model, "gpu": self.gpu.name, "num_gpus": self.num_gpus,
            "setup": {k: v for k, v in asdict(self.setup).items() if k != "parallel"},
            "parallel": asdict(self.setup.parallel),
            "params": self.params, "trainable": self.trainable, "active_params": self.active_params,
            "memory_gib": {
                "weights": m.weights / gib, "gradients": m.gradients / gib, "optimizer": m.optimizer / gib,
                "activations": m.activations / gib, "transient": m.transient / gib,
                "allocated_peak": m.allocated / gib, "load_peak": m.load_peak / gib, "reserve": m.reserve / gib,
                "total": m.total / gib, "gpu": self.gpu.memory_gib, "host": m.host / gib,
                "host_limit": self.host_gib,
            },
            "activation_parts_gib": {k: v / gib for k, v in m.activation.parts.items()},
            "peak_phase": m.activation.phase,
            "fits": self.fits,
            "step_time_s": self.step_time_s, "tokens_per_step": self.tokens_per_step,
            "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
            "model_flops_per_token": self.model_flops_per_token, "hw_flops_per_token": self.hw_flops_per_token,
            "time_split_s": {"compute": self.compute_s, "communication": self.comm_s, "other": self.other_s},
            "tokens": self.tokens, "time_s": self.time_s, "gpu_hours": self.gpu_hours, "cost_usd": self.cost_usd,
            "price_per_gpu_hour": self.price_per_hour, "chinchilla_tokens": self.chinchilla_tokens,
            "notes": self.notes + m.notes,
        }


def _ring_allreduce_s(nbytes: float, n: int, gbs: float) -> float:
    """Ring all-reduce: each GPU sends and receives 2(n-1)/n of the buffer (Patarasuk & Yuan 2009)."""
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / (gbs * 1e9)


def _link_gbs(gpu: GPU, group: int, gpus_per_node: int) -> float:
    """One direction of the slowest link a group of `group` consecutive GPUs uses."""
    return gpu.interconnect_gbs / 2 if group <= gpus_per_node else INTER_NODE_GBS


def plan_train(spec: ModelSpec, gpu: GPU, setup: TrainSetup, tokens: float | None = None,
               price: float | None = None, efficiency: float | None = None,
               host_gib: float | None = None) -> TrainPlan:
    """Memory, step time, throughput and cost of `setup` on `gpu`. host_gib: host memory that page-locked buffers
    (offloaded layer inputs, ZeRO-Offload) may take; a plan needing more does not fit. Under recompute "offloaded"
    with offload_keep None, the plan keeps as many of the last layers' inputs on the GPU as fit (as `longseq
    train --plan auto` does)."""
    kw = dict(tokens=tokens, price=price, efficiency=efficiency, host_gib=host_gib)
    if setup.recompute == "offloaded" and setup.offload_keep is None:
        layers = spec.config.num_layers // setup.parallel.pp
        plans = (plan_train(spec, gpu, replace(setup, offload_keep=keep), **kw) for keep in range(layers - 1, -1, -1))
        on_gpu = last = None
        for plan in plans:
            if plan.fits:
                return plan
            if on_gpu is None and plan.memory.total <= gpu.memory_bytes:
                on_gpu = plan  # fits the GPU, not the host
            last = plan
        return on_gpu or last  # else keep 0: the least GPU memory
    memory = train_memory(spec, setup)
    cfg, p = spec.config, setup.parallel
    counts = count_params(spec)
    lin = layer_linears(spec)
    layer_mm = sum(x.in_features * x.out_features for n, x in lin.items() if n in ("q_proj", "k_proj", "v_proj",
                                                                                   "o_proj"))
    layer_mm += sum(x.in_features * x.out_features for n, x in lin.items()
                    if n not in ("q_proj", "k_proj", "v_proj", "o_proj")) * spec.experts_per_token
    adapters = 0 if setup.method == "full" else lora_params(spec, setup.lora_rank, setup.lora_targets)
    flops = step_flops_per_token(counts.matmul, layer_mm, adapters, cfg.num_layers, spec.q_dim, setup.seq_len,
                                 trains_base=setup.method == "full", recompute=setup.recompute,
                                 window=cfg.sliding_window)
    precision = "fp16" if setup.precision == "fp16" else ("fp32" if setup.precision == "fp32" else "bf16")
    peak = gpu.peak_tflops(precision)
    micro_tokens = setup.batch_size * setup.seq_len
    shard = p.tp * p.pp * p.sequence_shards
    micro_s = step_time_s(flops, micro_tokens / shard, peak, efficiency)
    if efficiency is None:  # a given efficiency is a measured one: launch time is in it already
        micro_s = overlapped_s(micro_s, launch_time_s(cfg.num_layers // p.pp, setup.recompute))
    compute = micro_s * (setup.grad_accum + p.pp - 1)  # 1F1B / GPipe bubble: p - 1 extra micro-steps
    gpus_per_node = p.num_gpus // p.nodes
    comm, other = 0.0, 0.0
    # DDP all-reduces fp32 gradients (DeepSpeed ZeRO 1-2: bf16); Ulysses ranks reduce gradients too.
    grad_bytes = (2.0 if p.zero in (1, 2) else 4.0) * trainable_params(spec, setup) / (p.tp * p.pp)
    dp_bw = _link_gbs(gpu, p.num_gpus, gpus_per_node)
    dp_comm = _ring_allreduce_s(grad_bytes, p.zero_ranks, dp_bw)
    if p.ep > 1:  # --ep: the routed experts' gradients (this rank's E/ep) are all-reduced over their dp/ep replicas
        expert_bytes = grad_bytes * expert_trainable_params(spec, setup) / trainable_params(spec, setup)
        dp_comm = (_ring_allreduce_s(grad_bytes - expert_bytes, p.zero_ranks, dp_bw)
                   + _ring_allreduce_s(expert_bytes / p.ep, p.zero_ranks // p.ep, dp_bw))
    if p.zero >= 3 and p.zero_ranks > 1:
        # FSDP2: all-gather every weight in forward and again in backward (in the autocast dtype), reduce-scatter
        # the fp32 gradients; each moves (n-1)/n of its bytes per GPU (ring).
        n, gathered = p.zero_ranks, (4.0 if setup.precision == "fp32" else 2.0)
        moved = (2 * gathered * counts.total + 4.0 * trainable_params(spec, setup)) / (p.tp * p.pp)
        dp_comm = (n - 1) / n * moved / (dp_bw * 1e9)
    comm += max(0.0, dp_comm - 2 / 3 * compute)  # overlapped with backward (two thirds of the step)
    act_bytes = (2 if setup.precision != "fp32" else 4) * micro_tokens * cfg.hidden_size / p.sequence_shards
    layers_here = cfg.num_layers // p.pp
    # Megatron: 2 all-reduces forward + 2 backward per layer, 2 more when the layer's forward is recomputed
    collectives = 4 + 2 * (setup.recompute in ("full", "offloaded", "keep_attention"))
    tp_comm = collectives * layers_here * _ring_allreduce_s(act_bytes, p.tp, _link_gbs(gpu, p.tp, gpus_per_node))
    attn_bytes = micro_tokens * (2 * spec.q_dim + 2 * spec.kv_dim) * 2 / p.sequence_shards
    sp_comm = 2 * layers_here * (p.sp - 1) / p.sp * attn_bytes / (_link_gbs(gpu, p.sp * p.tp, gpus_per_node) * 1e9)
    # Ring attention: per layer, cp - 1 K/V blocks forward; backward the K/V again and their fp32 dK/dV (twice
    # the bytes): four block sends, each overlapping a block's attention.
    kv_block = micro_tokens / p.sequence_shards * 2 * spec.kv_dim * 2
    ring_comm = 4 * layers_here * (p.cp - 1) * kv_block / (_link_gbs(gpu, p.num_gpus // p.nodes, gpus_per_node)
                                                          * 1e9)
    # Expert parallelism: per MoE layer two all-to-alls forward (tokens to their experts' GPUs and back) and two
    # backward, two more when the layer's forward is recomputed; each GPU sends and receives (ep-1)/ep of its
    # top-k rows (dispatch and combine, GShard: Lepikhin et al. 2020, arXiv 2006.16668), on the critical path.
    exchanges = 4 + 2 * (setup.recompute in ("full", "offloaded", "keep_attention"))
    rows_bytes = act_bytes * spec.experts_per_token
    ep_comm = (exchanges * layers_here * (p.ep - 1) / p.ep * rows_bytes / (_link_gbs(gpu, p.ep, gpus_per_node) * 1e9)
               if p.ep > 1 else 0.0)
    comm += (tp_comm + sp_comm + ring_comm + ep_comm) * setup.grad_accum
    trainable = trainable_params(spec, setup)
    local = local_trainable_params(spec, setup) if p.ep > 1 else trainable  # what this GPU's optimizer steps
    opt_shard = p.tp * p.pp * (p.zero_ranks if p.zero else 1)
    if p.offload == "none":
        other += local / opt_shard * OPTIMIZER_TRAFFIC[setup.optimizer] / (gpu.bandwidth_tbs * 1e12)
    else:  # CPU Adam, gradients down and weights up over PCIe
        other += local / opt_shard / CPU_ADAM_PARAMS_PER_S + 4.0 * local / opt_shard / (PCIE_GBS * 1e9)
    if setup.method == "qlora":  # each pass dequantizes every NF4 weight: memory-bound
        passes = 2 + (setup.recompute in ("full", "offloaded", "keep_attention"))
        other += (setup.grad_accum * passes * counts.linear / (p.tp * p.pp) * NF4_DEQUANT_TRAFFIC
                  / (gpu.bandwidth_tbs * 1e12))
    step = compute + comm + other
    tokens_per_step = micro_tokens * setup.grad_accum * p.dp
    model_flops = train_flops_per_token(counts.matmul, cfg.num_layers, spec.q_dim, setup.seq_len)
    plan = TrainPlan(
        model=spec.name, gpu=gpu, setup=setup, memory=memory, params=counts.total, trainable=trainable,
        fits=memory.total <= gpu.memory_bytes and (host_gib is None or memory.host <= host_gib * 2**30),
        step_time_s=step, tokens_per_step=tokens_per_step,
        tokens_per_s=tokens_per_step / step, mfu=model_flops * tokens_per_step / (step * p.num_gpus * peak * 1e12),
        model_flops_per_token=model_flops, hw_flops_per_token=flops.total, compute_s=compute, comm_s=comm,
        other_s=other, price_per_hour=gpu.price_per_hour if price is None else price,
        chinchilla_tokens=chinchilla_tokens(counts.total), layers=cfg.num_layers // p.pp, host_gib=host_gib,
        active_params=counts.matmul if spec.is_moe else 0,
    )
    if tokens:
        plan.tokens = tokens
        plan.time_s = tokens / plan.tokens_per_s
        plan.gpu_hours = plan.time_s * p.num_gpus / 3600
        plan.cost_usd = plan.gpu_hours * plan.price_per_hour
    if p.tp > 1 or p.pp > 1 or p.zero in (1, 2):
        plan.notes.append("tensor / pipeline parallel training and ZeRO 1-2 are modelled (Megatron / DeepSpeed), "
                          "not in longseq train, which runs DDP (zero 0), FSDP2 (zero 3) and Ulysses (sp)")
    if precision == "bf16" and not gpu.bf16_tflops:
        plan.notes.append(f"{gpu.name} has no bf16 tensor cores: timed at its fp16 rate (train with --precision fp16)")
    if host_gib is not None and memory.host > host_gib * 2**30:
        plan.notes.append(f"needs {memory.host / 2**30:.1f} GiB of page-locked host memory; --host-memory is "
                          f"{host_gib:g} GiB")
    if setup.seq_len > cfg.max_seq_len:
        plan.notes.append(f"seq-len {setup.seq_len:,} is beyond the model's native context {cfg.max_seq_len:,}: "
                          "extend RoPE (rope scaling) when training")
    return plan
