"""Plans as rich tables for the terminal (rich is imported here only, when a table is printed)."""

from __future__ import annotations

from typing import Any

from longseq.plan.fit import FitResult
from longseq.plan.memory_attention import MemoryAttentionPlan
from longseq.plan.serving import ServePlan
from longseq.plan.training import TrainPlan

GIB = 2**30


def _gib(x: float) -> str:
    return f"{x / GIB:,.2f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:,.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 86400:,.1f} days"


def _count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:,.2f}{unit}"
    return f"{x:,.0f}"


def train_title(plan: TrainPlan) -> str:
    s, p = plan.setup, plan.setup.parallel
    method = s.method if s.method == "full" else f"{s.method} r{s.lora_rank}"
    par = f" · dp {p.dp} tp {p.tp} pp {p.pp} cp {p.cp} sp {p.sp} ep {p.ep} zero {p.zero}" if p.num_gpus > 1 else ""
    return (f"{plan.model} · {method} · {s.seq_len:,} tokens × {s.batch_size} (× {s.grad_accum} accum) · "
            f"recompute {s.recompute} · {s.optimizer} · {p.num_gpus} × {plan.gpu.name}{par}")


def train_tables(plan: TrainPlan) -> list[Any]:
    from rich.table import Table

    m, s = plan.memory, plan.setup
    mem = Table(title=train_title(plan), title_justify="left", show_edge=False)
    mem.add_column("memory per GPU")
    mem.add_column("GiB", justify="right")
    mem.add_column("what", style="dim")
    base = {"full": "fp32 master weights", "lora": "bf16 base + fp32 adapters",
            "qlora": "NF4 linears, bf16 embeddings/norms/head + fp32 adapters"}[s.method]
    active = f", {_count(plan.active_params)} active" if plan.active_params else ""
    mem.add_row("weights", _gib(m.weights), f"{base} ({_count(plan.params)} params{active}, "
                f"{_count(plan.trainable)} trained)")
    mem.add_row("gradients", _gib(m.gradients), "alive at the peak")
    mem.add_row("optimizer states", _gib(m.optimizer), s.optimizer)
    mem.add_row("activations", _gib(m.activations), "saved for backward")
    for key, value in m.activation.parts.items():
        if key != "transient" and value >= 0.005 * GIB:
            mem.add_row(f"  {key}", _gib(value), "", style="dim")
    mem.add_row("transient", _gib(m.transient), f"at the peak ({m.activation.phase}): workspace, less what "
                "backward has freed")
    mem.add_row("allocated peak", _gib(m.allocated), "torch.cuda.max_memory_allocated", style="bold")
    if m.load_peak > m.allocated:
        what = ("bf16 weights on the GPU before NF4 quantization" if s.method == "qlora" else
                "the whole model on each GPU before --ep drops the other experts (GGUF; not an HF directory)"
                if s.parallel.ep > 1 else
                "the whole model on each GPU before FSDP2 shards it")
        mem.add_row("load peak", _gib(m.load_peak), what)
    mem.add_row("reserve", _gib(m.reserve), "CUDA context + allocator slack")
    verdict = "[green]fits[/]" if m.total <= plan.gpu.memory_bytes else "[red]does not fit[/]"
    mem.add_row("total", _gib(m.total), f"of {plan.gpu.memory_gib:.1f} GiB: {verdict}", style="bold")
    if m.host:
        what = "pinned CPU memory (offload)"
        if s.recompute == "offloaded":
            what += f": {plan.layers - min(s.offload_keep or 0, plan.layers)} of {plan.layers} layer inputs"
        if plan.host_gib is not None:
            over = m.host > plan.host_gib * GIB
            what += f"; [red]more than {plan.host_gib:g} GiB[/]" if over else f"; of {plan.host_gib:g} GiB: fits"
        mem.add_row("host memory", _gib(m.host), what)

    speed = Table(show_edge=False, show_header=False)
    speed.add_column("metric")
    speed.add_column("value", justify="right")
    speed.add_column("what", style="dim")
    speed.add_row("step time", _duration(plan.step_time_s),
                  f"{plan.tokens_per_step:,} tokens: compute {_duration(plan.compute_s)}, "
                  f"comm {_duration(plan.comm_s)}, other {_duration(plan.other_s)}")
    speed.add_row("throughput", f"{plan.tokens_per_s:,.0f} tok/s",
                  f"{plan.tokens_per_s / plan.num_gpus:,.0f} per GPU")
    speed.add_row("MFU", f"{plan.mfu:.1%}", "6N + 12·L·d·S model FLOPs (PaLM) / peak")
    speed.add_row("FLOPs / token", _count(plan.hw_flops_per_token),
                  f"executed (causal attention, recompute); model {_count(plan.model_flops_per_token)}")
    if plan.time_s is not None:
        speed.add_row("tokens", _count(plan.tokens or 0),
                      f"Chinchilla-optimal pre-training: {_count(plan.chinchilla_tokens)}")
        speed.add_row("time", _duration(plan.time_s), f"{plan.gpu_hours:,.1f} GPU-hours")
        speed.add_row("cost", f"${plan.cost_usd:,.0f}", f"at ${plan.price_per_hour:.2f} per GPU-hour (approximate)")
    return [mem, speed]


def fit_lines(result: FitResult) -> list[str]:
    if result.best is None:
        return [f"[red]nothing fits[/] ({result.tried} setups tried): {result.explanation}"]
    lines = [f"[green]fastest fitting setup[/] of {result.fitting} that fit ({result.tried} tried)"]
    for plan in result.runners_up:
        lines.append(f"  next: {train_title(plan)} · {plan.tokens_per_s:,.0f} tok/s · "
                     f"{plan.memory.total / GIB:.1f} GiB")
    return lines


def serve_tables(plan: ServePlan) -> list[Any]:
    from rich.table import Table

    s = plan.setup
    title = (f"{plan.model} · {s.quant} weights · {s.kv_dtype} KV · {plan.context:,} context × {plan.batch} "
             f"sequences · {s.num_gpus} × {plan.gpu.name}")
    mem = Table(title=title, title_justify="left", show_edge=False)
    mem.add_column("memory per GPU")
    mem.add_column("GiB", justify="right")
    mem.add_column("what", style="dim")
    mem.add_row("weights", _gib(plan.weights), s.quant)
    used = plan.batch * plan.context * plan.kv_per_token
    mem.add_row("KV cache", _gib(used), f"{plan.batch} × {plan.context:,} tokens × {plan.kv_per_token:,.0f} B")
    mem.add_row("KV pool", _gib(plan.kv_pool), f"{plan.kv_tokens:,} tokens of context the engine can hold")
    mem.add_row("activations", _gib(plan.activations),
                f"engine reserve: a {s.max_num_batched_tokens:,}-token step")
    if s.max_loras:
        mem.add_row("LoRA pool", _gib(plan.lora_pool), f"{s.max_loras} adapter slots of rank {s.max_lora_rank}")
    mem.add_row("budget", _gib(plan.budget), f"{s.gpu_memory_fraction:.0%} of {plan.gpu.memory_gib:.1f} GiB: "
                + ("[green]fits[/]" if plan.fits else "[red]does not fit[/]"), style="bold")
    speed = Table(show_edge=False, show_header=False)
    speed.add_column("metric")
    speed.add_column("value", justify="right")
    speed.add_column("what", style="dim")
    speed.add_row("longest context", f"{plan.max_context_at_batch:,}", f"at {plan.batch} sequences")
    speed.add_row("most sequences", f"{plan.kv_tokens // max(1, plan.context):,}", f"at {plan.context:,} tokens each")
    speed.add_row("decode", f"{plan.decode_tokens_per_s:,.0f} tok/s",
                  f"≤ {plan.decode_tokens_per_s_per_seq:,.1f} per sequence (bandwidth bound)")
    speed.add_row("prefill", f"{plan.prefill_tokens_per_s:,.0f} tok/s",
                  f"first token after {_duration(plan.time_to_first_token_s)} at full context")
    return [mem, speed]


def memory_attention_table(plan: ServePlan, memory: MemoryAttentionPlan, longest: int) -> Any:
    """What memory attention holds for one sequence at the plan's context, next to full attention's KV cache."""
    from rich.table import Table

    t = Table(title=f"memory attention (longseq generate / eval; not served yet) · one sequence at "
              f"{memory.context:,} tokens · memory on the {memory.placement}", title_justify="left", show_edge=False)
    t.add_column("per sequence")
    t.add_column("amount", justify="right")
    t.add_column("what", style="dim")
    for name, nbytes in memory.gpu_parts.items():
        t.add_row(name, f"{_gib(nbytes)} GiB", "GPU")
    full = memory.context * plan.kv_per_token
    t.add_row("GPU in all", f"{_gib(memory.gpu_bytes)} GiB", f"full attention's KV cache: {_gib(full)} GiB",
              style="bold")
    if memory.host_bytes:
        t.add_row("host memory", f"{_gib(memory.host_bytes)} GiB",
                  f"{memory.blocks:,} blocks a layer ({memory.blocks_allocated:,} allocated)")
    t.add_row("keys a decoded token reads", f"{memory.keys_per_token:,}", f"full attention: {memory.context:,}")
    step = (plan.weights + memory.read_bytes) / (plan.gpu.bandwidth_tbs * 1e12)
    t.add_row("decode", f"{1 / step:,.1f} tok/s", "per sequence at batch 1 (bandwidth bound: weights, keys read, "
              "representative keys scored)")
    if memory.host_copy_bytes:
        t.add_row("copied to the GPU", f"{_gib(memory.host_copy_bytes)} GiB", "per decoded token: retrieved blocks")
    t.add_row("longest context", f"{longest:,}", f"tokens × {max(1, plan.batch)} sequence(s) in the GPU budget "
              "left after weights and activations")
    return t
