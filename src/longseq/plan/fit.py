"""`longseq plan train --fit`: search training strategies, return the fastest one that fits in GPU memory, or say
what to change when none does."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from longseq.config.policy import DEFAULT_TILE_TOKENS, RECOMPUTE_POLICIES
from longseq.errors import LongseqError
from longseq.plan.hardware import GPU, GPUS
from longseq.plan.models import ModelSpec
from longseq.plan.setup import Parallelism, TrainSetup
from longseq.plan.training import TrainPlan, plan_train

LONGSEQ_POLICIES = RECOMPUTE_POLICIES  # what longseq train implements
DEFAULT_METHODS = ("lora", "qlora")
DEFAULT_OPTIMIZERS = ("adamw", "adamw8bit")
MAX_TP = 8  # one node's NVLink domain


@dataclass
class FitResult:
    best: TrainPlan | None
    tried: int
    fitting: int
    explanation: str = ""  # when nothing fits: what to change
    runners_up: list[TrainPlan] = field(default_factory=list)


@dataclass(frozen=True)
class SearchSpace:
    methods: tuple[str, ...] = DEFAULT_METHODS
    policies: tuple[str, ...] = LONGSEQ_POLICIES
    optimizers: tuple[str, ...] = DEFAULT_OPTIMIZERS
    zero_stages: tuple[int, ...] = (0, 1, 2, 3)
    layouts: bool = True  # search tensor / pipeline / sequence parallel degrees (else: keep the base's)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def layouts(spec: ModelSpec, num_gpus: int, nodes: int, seq_len: int) -> list[Parallelism]:
    """Every (dp, tp, pp, sp) with dp·tp·pp·sp = num_gpus that the model's shape allows, tp inside a node."""
    cfg, per_node = spec.config, num_gpus // nodes
    out = []
    for tp, pp, sp in itertools.product(_divisors(num_gpus), repeat=3):
        if num_gpus % (tp * pp * sp):
            continue
        if tp > min(MAX_TP, per_node) or cfg.num_heads % tp or cfg.num_kv_heads % tp or cfg.num_layers % pp:
            continue
        if sp > 1 and (seq_len % sp or cfg.num_heads % (sp * tp)):
            continue
        out.append(Parallelism(dp=num_gpus // (tp * pp * sp), tp=tp, pp=pp, sp=sp, nodes=nodes))
    return out


def _candidates(spec: ModelSpec, base: TrainSetup, space: SearchSpace, num_gpus: int, nodes: int,
                policies: tuple[str, ...]) -> list[TrainSetup]:
    """Setups keeping the sequences per optimizer step (micro-batch · accumulation · dp) of `base`."""
    global_batch = base.batch_size * base.grad_accum * base.parallel.dp
    out = []
    pinned = [replace(base.parallel, dp=num_gpus // base.parallel.num_gpus * base.parallel.dp, nodes=nodes)]
    for par in layouts(spec, num_gpus, nodes, base.seq_len) if space.layouts else pinned:
        if global_batch % par.dp:
            continue
        per_replica = global_batch // par.dp
        for micro in _divisors(per_replica):
            for method, policy, optimizer in itertools.product(space.methods, policies, space.optimizers):
                # Tiling only pays where whole-sequence norms and MLPs are the problem: with layer recompute.
                tiles = (None, DEFAULT_TILE_TOKENS) if policy in ("full", "keep_attention") else \
                    (DEFAULT_TILE_TOKENS,) if policy == "offloaded" else (base.mlp_tile,)
                for zero, tile in itertools.product(space.zero_stages if par.dp > 1 else (0,), tiles):
                    out.append(replace(base, method=method, recompute=policy, optimizer=optimizer, batch_size=micro,
                                       grad_accum=per_replica // micro, parallel=replace(par, zero=zero),
                                       mlp_tile=tile))
    return out


def _describe(plan: TrainPlan) -> str:
    s, p = plan.setup, plan.setup.parallel
    parts = [s.method, f"recompute {s.recompute}", f"micro-batch {s.batch_size}", s.optimizer]
    if s.mlp_tile:
        parts.insert(2, f"tiles of {s.mlp_tile:,} tokens")
    if p.num_gpus > 1:
        parts.append(f"dp {p.dp} tp {p.tp} pp {p.pp} cp {p.cp} sp {p.sp} ep {p.ep} zero {p.zero}")
    return ", ".join(parts)


def _search(spec: ModelSpec, gpu: GPU, base: TrainSetup, space: SearchSpace, num_gpus: int, nodes: int,
            policies: tuple[str, ...], **kw) -> tuple[list[TrainPlan], list[TrainPlan]]:
    plans = []
    for setup in _candidates(spec, base, space, num_gpus, nodes, policies):
        try:
            plans.append(plan_train(spec, gpu, setup, **kw))
        except LongseqError:
            continue
    fitting = sorted((p for p in plans if p.fits), key=lambda p: -p.tokens_per_s)
    return plans, fitting


def fit_train(spec: ModelSpec, gpu: GPU, base: TrainSetup, space: SearchSpace = SearchSpace(), **kw) -> FitResult:
    """The fastest setup (tokens/s by the time model) that fits, searching `space` around `base`."""
    num_gpus, nodes = base.parallel.num_gpus, base.parallel.nodes
    plans, fitting = _search(spec, gpu, base, space, num_gpus, nodes, space.policies, **kw)
    if fitting:
        return FitResult(best=fitting[0], tried=len(plans), fitting=len(fitting), runners_up=fitting[1:4])
    if not plans:
        raise LongseqError("no valid configuration: the GPU count cannot be split over this model's heads / layers")
    return FitResult(best=None, tried=len(plans), fitting=0,
                     explanation=explain(spec, gpu, base, space, min(plans, key=lambda p: p.memory.total), **kw))


def explain(spec: ModelSpec, gpu: GPU, base: TrainSetup, space: SearchSpace, smallest: TrainPlan, **kw) -> str:
    """Why nothing fits and what would: another method, more GPUs, a shorter sequence, a bigger GPU."""
    gib = 2**30
    need = smallest.memory.total / gib
    text = (f"needs {need:.1f} GiB per GPU at best ({_describe(smallest)}); {gpu.name} has {gpu.memory_gib:.1f} "
            "GiB")
    if smallest.memory.total <= gpu.memory_bytes:  # the GPU holds it; the host cannot (--host-memory)
        text = (f"needs {smallest.memory.host / gib:.1f} GiB of page-locked host memory ({_describe(smallest)}); "
                f"--host-memory is {smallest.host_gib:g} GiB")
    m = smallest.memory
    if m.load_peak > m.allocated:
        text += (f" (training itself needs {(m.allocated + m.reserve) / gib:.1f} GiB, but longseq loads the bf16 "
                 f"weights, {m.load_peak / gib:.1f} GiB, on the GPU before quantizing them to NF4)")
    num_gpus, nodes = base.parallel.num_gpus, base.parallel.nodes
    options = []
    for method in ("qlora", "lora"):
        if method in space.methods:
            continue
        plans, _ = _search(spec, gpu, base, replace(space, methods=(method,)), num_gpus, nodes, space.policies, **kw)
        smallest_other = min((p.memory.total for p in plans), default=float("inf"))
        if smallest_other <= gpu.memory_bytes:
            options.append(f"--method {method} ({smallest_other / gib:.1f} GiB)")
            break
    global_batch = base.batch_size * base.grad_accum * base.parallel.dp
    for more in (2, 4, 8, 16, 32, 64, 128, 256):
        if more <= num_gpus:
            continue
        wider = replace(base, batch_size=1, grad_accum=global_batch,
                        parallel=Parallelism(nodes=max(1, more // MAX_TP)))
        _, fitting = _search(spec, gpu, wider, space, more, max(1, more // MAX_TP), space.policies, **kw)
        if fitting:
            options.append(f"{more} GPUs ({_describe(fitting[0])})")
            break
    seq = base.seq_len // 2
    while seq >= 512:
        _, fitting = _search(spec, gpu, replace(base, seq_len=seq), space, num_gpus, nodes, space.policies, **kw)
        if fitting:
            options.append(f"--seq-len {seq}")
            break
        seq //= 2
    bigger = [g for g in GPUS.values() if need <= g.memory_gib] if need > gpu.memory_gib else []
    if bigger:
        options.append(f"a GPU with more memory ({min(bigger, key=lambda g: g.memory_gib).name})")
    return text + (". Use " + " or ".join(options) + "." if options else ": no setup tried fits.")


def largest_context(spec: ModelSpec, gpu: GPU, base: TrainSetup, step: int = 1024, limit: int = 1 << 24) -> int:
    """The longest seq_len (a multiple of `step`) whose training plan fits in one GPU's memory; 0 if none does.

    Memory grows monotonically with the sequence length, so a doubling search then a bisection finds it."""
    def fits(n: int) -> bool:
        return plan_train(spec, gpu, replace(base, seq_len=n * step)).fits

    if not fits(1):
        return 0
    low, high = 1, 2
    while high * step <= limit and fits(high):
        low, high = high, high * 2
    while high - low > 1:  # fits(low) and not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low * step
