"""Runs the shared model on the scheduler's flat batches over a paged KV pool sized from measured (or planned)
memory."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from longseq.attention.paged import PagedBatch, PagedKVCache, decode_splits, use_decode_kernel
from longseq.attention.paged_memory import PagedMemoryKVCache
from longseq.attention.paged_memory_plan import plan_step
from longseq.config import EngineConfig
from longseq.engine.cuda_graphs import BATCH_BUCKETS, DecodeGraph, bucket, key_bucket
from longseq.engine.lora import LoRAPool
from longseq.engine.requests import max_model_len
from longseq.engine.sequence import Sequence
from longseq.engine.tensor_parallel import local_kv_heads
from longseq.engine.uploads import upload
from longseq.errors import LongseqError
from longseq.models import moe
from longseq.models.fused_linear import calibrate
from longseq.models.llama import CausalLM
from longseq.models.sparse_moe import SparseMoeBlock


def kv_bytes_per_block(model: CausalLM, block_size: int, kv_dtype: torch.dtype | None = None) -> int:
    # K and V, every layer: 2 * L * block_size * H_kv * head_dim * bytes (GQA/MQA shrink H_kv; tensor parallelism
    # keeps H_kv / N on each GPU; an FP8 pool has 1 byte a value). Memory attention adds a float32 mean key per
    # block and layer (attention/paged_memory.py).
    cfg, dtype = model.config, kv_dtype or model.lm_head.weight.dtype
    per_value = 2 * block_size * dtype.itemsize + (4 if cfg.attention.variant == "memory" else 0)
    return cfg.num_layers * local_kv_heads(model) * cfg.head_dim * per_value


def kv_pool_dtype(model: CausalLM, cfg: EngineConfig) -> torch.dtype:
    """The KV pool's dtype: the model's, or float8_e4m3fn for kv_cache_dtype fp8."""
    return torch.float8_e4m3fn if cfg.kv_cache_dtype == "fp8" else model.lm_head.weight.dtype


# Weight formats of longseq.plan (plan/quant.py) for the dtypes the engine serves in.
PLAN_FORMATS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def planned_reserve(model: CausalLM, cfg: EngineConfig) -> float:
    """kv_pool="plan": the bytes longseq.plan.serving predicts for this GPU's weights and the peak of the largest
    step (max_num_batched_tokens tokens, logits for max_num_seqs rows), and the LoRA pool where adapters are served
    (plan/lora.py), from the model's config and dtype: the engine-side glue (ModelConfig -> ModelSpec, as `longseq
    train --plan auto` does in train/memory_plan.py)."""
    from longseq.plan.lora import lora_pool_bytes
    from longseq.plan.models import ModelSpec
    from longseq.plan.serving import engine_activation_bytes, weight_bytes

    dtype = model.lm_head.weight.dtype
    if dtype not in PLAN_FORMATS:
        raise LongseqError(f"--kv-pool plan has no weight format for {dtype}; serve in bf16, fp16 or fp32, or use "
                           "--kv-pool measure")
    spec, tp, fmt = ModelSpec("engine", model.config), cfg.tensor_parallel, plan_format(model)
    step = engine_activation_bytes(spec, cfg.max_num_batched_tokens, cfg.max_num_seqs, dtype.itemsize, tp, fmt)
    loras = lora_pool_bytes(spec, cfg.max_loras, cfg.max_lora_rank, dtype.itemsize) if cfg.enable_lora else 0
    return weight_bytes(spec, fmt) / tp + step + loras


def plan_format(model: CausalLM) -> str:
    """The planner's weight format (plan/quant.py) of a loaded model: fp8 / int4 / int8 where quantized (models/quant),
    else its dtype's."""
    from longseq.models.quant import quantization_of

    method = quantization_of(model)
    if method == "int4":
        group = next((m.group_size for m in model.modules() if hasattr(m, "group_size")), 128)
        return f"int4-g{group}"
    return method or PLAN_FORMATS[model.lm_head.weight.dtype]


class ModelRunner:
    def __init__(self, model: CausalLM, cfg: EngineConfig):
        self.model, self.cfg = model, cfg
        if cfg.quantization is not None:  # a model loaded in 16 bits, handed over with quantization set
            from longseq.models.quant import quantization_of, quantize_model

            if quantization_of(model) is None:
                quantize_model(model, cfg.quantization, cfg.quant_group_size)
            elif quantization_of(model) != cfg.quantization:
                raise LongseqError(f"the model is quantized {quantization_of(model)}; it cannot be served as "
                                   f"{cfg.quantization}")
        self.device, self.dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        fused = model.fuse_projections(cfg.fuse_projections)
        for layer in fused:
            layer.gemv = False  # until timed (an earlier engine on this model may have set it)
            layer.lora = None  # likewise its adapters' hook
        # Which single-row matmuls take the Triton GEMV: timed here, before any graph is captured.
        self.gemv_report = calibrate(fused) if cfg.decode_gemv and fused and self.device.type == "cuda" else {}
        # The adapters' slots, allocated before the KV pool is sized from what is left.
        self.lora = LoRAPool(model, cfg.max_loras, cfg.max_lora_rank) if cfg.enable_lora else None
        self.block_size = cfg.kv_block_size
        self.num_blocks = cfg.num_kv_blocks or self._blocks_from_memory()
        mc = model.config
        # One block more than the block manager hands out: the scratch slot that padded graph rows write to.
        self.scratch_slot = self.num_blocks * self.block_size
        # Memory attention (InfLLM): positions run past the context, each layer reads sinks, window and retrieved
        # blocks of the pool (attention/paged_memory.py).
        self.memory = mc.attention if mc.attention.variant == "memory" else None
        if self.memory is not None:
            self.cache = PagedMemoryKVCache(mc.num_layers, self.num_blocks, self.block_size, local_kv_heads(model),
                                            mc.head_dim, kv_pool_dtype(model, cfg), self.device, self.memory,
                                            model.rotary.inv_freq, torch.promote_types(self.dtype, torch.float32))
            model.rotary.exact_angles = True
        else:
            model.rotary.exact_angles = False  # an earlier memory engine on this model may have set it
            self.cache = PagedKVCache(mc.num_layers, (self.num_blocks + 1) * self.block_size, local_kv_heads(model),
                                      mc.head_dim, kv_pool_dtype(model, cfg), self.device)
        for layer, (k_scale, v_scale) in getattr(model, "kv_cache_scales", {}).items():
            if self.cache.scales is not None:  # an FP8 checkpoint's calibrated KV scales
                self.cache.scales[layer] = torch.tensor([k_scale, v_scale])
        # Dynamic NTK reads the longest position on the host every step, which a graph cannot do.
        self.use_graphs = (cfg.cuda_graphs and self.device.type == "cuda" and mc.rope.type != "dynamic"
                           and self.memory is None)  # memory attention's key widths change with every step
        if self.use_graphs and mc.is_moe:  # without the grouped GEMM, experts size their padding on the host
            self.use_graphs = all(moe.grouped_mm_runs(self.model.lm_head.weight, b.experts.gate_up_proj,
                                                      b.experts.down_proj)
                                  for b in model.modules() if isinstance(b, SparseMoeBlock))
        # (batch bucket, key bucket, key splits, with adapters): a step without any adapter runs none of their kernels
        self.graphs: dict[tuple[int, int, int, bool], DecodeGraph] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        # The decode kernel reads each context's length on the device, so one graph per batch bucket serves every
        # length up to the model's context, and all of them are captured now rather than on a request's first
        # step. The gather path needs the key length in the graph's shapes: one graph per power-of-two length.
        # Memory attention's contexts are bounded by the pool alone.
        limit = self.num_blocks * self.block_size if self.memory is not None else mc.max_seq_len
        self.max_model_len = max_model_len(cfg, limit)
        self.fixed_keys = use_decode_kernel(self.device, mc.head_dim)
        if self.use_graphs and self.fixed_keys:
            self._capture_all()

    @torch.inference_mode()  # as every step runs: with autograd on, a capture would keep activations alive
    def _capture_all(self) -> None:
        sizes = [b for b in BATCH_BUCKETS if b < self.cfg.max_num_seqs] + [bucket(self.cfg.max_num_seqs,
                                                                                    BATCH_BUCKETS)]
        keys = self.max_model_len
        for size in reversed([b for b in sizes if b is not None]):  # largest first: the rest reuse its pool
            # Each batch size twice where they differ: the usual key splits, and those of a step whose longest
            # context dominates it (paged_decode.dominated), so that a long context never decodes unsplit.
            for splits in {decode_splits(size, self.cache.num_kv_heads, keys, self.device, lens)
                           for lens in (None, [keys] + [1] * (size - 1))}:
                for lora in (False, True) if self.lora is not None else (False,):
                    self.graphs[(size, keys, splits, lora)] = DecodeGraph(self, size, keys, self.graph_pool, splits,
                                                                         lora)

    def _blocks_from_memory(self) -> int:
        if self.device.type != "cuda":
            return max(1, int(self.cfg.kv_cache_gib * 2**30) // self.kv_bytes_per_block())
        # The KV pool gets what is left of gpu_memory_fraction after the weights and the peak activations of the
        # largest step: measured by running that step, or predicted by the planner (kv_pool="plan").
        reserve = planned_reserve(self.model, self.cfg) if self.cfg.kv_pool == "plan" else self._measured_peak()
        return self.kv_blocks_left(reserve)

    def _measured_peak(self) -> int:
        """Measure, do not guess: the allocated peak (weights included) of the largest step the scheduler issues."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        ids = torch.zeros(1, self.cfg.max_num_batched_tokens, dtype=torch.long, device=self.device)
        with torch.inference_mode(), causal_stand_in(self.model):
            self.model.logits(self.model.hidden(ids)[:, -self.cfg.max_num_seqs :])
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def kv_bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.model, self.block_size, kv_pool_dtype(self.model, self.cfg))

    def kv_blocks_left(self, reserve: float) -> int:
        """KV blocks that fit in total × gpu_memory_fraction beside other processes and `reserve` bytes (this
        process's weights and step peak)."""
        per_block = self.kv_bytes_per_block()
        free, total = torch.cuda.mem_get_info(self.device)
        others = total - free - torch.cuda.memory_reserved(self.device)  # other processes, this one's CUDA context
        budget = total * self.cfg.gpu_memory_fraction - others - reserve
        if budget < per_block:
            raise LongseqError(
                f"no GPU memory left for the KV cache (budget {budget / 2**30:.2f} GiB): raise --gpu-memory-fraction "
                "or lower --max-num-batched-tokens"
            )
        return int(budget // per_block)

    # The engine may hand `run` the step's token ids as a device tensor (the previous step's samples, not yet on
    # the host): a tensor-parallel runner, whose workers get host lists, sets this False.
    takes_device_ids = True

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]],
            ids: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Sequence]]:
        """Compute the scheduled tokens; return float32 logits (M, V) for the M sequences whose last token was
        computed (they sample next), with those sequences.

        `ids` (N,) on the device: a decode step whose tokens were sampled by the step before and are still in
        flight (not yet in the sequences' token_ids)."""
        step, to_sample = prepare_step(scheduled, ahead=ids is not None)
        return self.execute(step, ids), to_sample

    @torch.inference_mode()
    def execute(self, step: StepInputs, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The model on one step's inputs: float32 logits (M, V) of the tokens to sample from. `ids`, if given,
        replaces step.ids (placeholders then)."""
        if self.lora is None:
            return self._execute(step, ids)
        self.lora.begin_step()  # the step waits for the adapters loaded for it
        try:
            return self._execute(step, ids)
        finally:
            self.lora.end_step(step.lora_slots)

    def _execute(self, step: StepInputs, ids: torch.Tensor | None) -> torch.Tensor:
        if self.use_graphs and step.decode:
            logits = self._graph_run(step, ids)
            if logits is not None:
                return logits
        self.cache.batch = PagedBatch.build(step.block_tables, step.query_lens, step.context_lens, self.block_size,
                                            self.device, self.cache.num_kv_heads, slots_only=self.memory is not None)
        if self.memory is not None:
            self.cache.set_plan(plan_step(step.block_tables, step.query_lens, step.context_lens, self.block_size,
                                          self.memory, self.device))
        # one copy that does not wait for the GPU (engine/uploads.py), as PagedBatch.build's
        host = [step.positions, step.last] + ([] if ids is not None else [step.ids])
        pos_t, last, *new_ids = upload(self.device, ints=host)[0]
        ids_t = (ids if ids is not None else new_ids[0]).view(1, -1)  # (1, N)
        if self.lora is not None:
            self.lora.use(step.lora_slots, step.query_lens)
        hidden = self.model.hidden(ids_t, pos_t.view(1, -1), cache=self.cache)  # (1, N, d)
        if not step.last:
            return hidden.new_zeros(0, self.model.config.vocab_size, dtype=torch.float32)
        logits = self.model.logits(hidden[0, last])  # (M, V)
        return logits.float()

    def _graph_run(self, step: StepInputs, ids: torch.Tensor | None) -> torch.Tensor | None:
        size = bucket(len(step.ids), BATCH_BUCKETS)
        if size is None:
            return None
        keys = self.max_model_len if self.fixed_keys else key_bucket(max(step.context_lens))
        splits = decode_splits(size, self.cache.num_kv_heads, keys, self.device, step.context_lens)
        key = (size, keys, splits, step.lora_slots is not None)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = DecodeGraph(self, size, keys, self.graph_pool, splits, key[3])
        hidden = graph.replay(step.ids, step.positions, step.block_tables, step.context_lens, ids,
                              step.lora_slots)  # (B, d)
        # The vocabulary projection stays outside the graphs: its (B, V) output per captured graph would hold GBs.
        return self.model.logits(hidden).float()


@contextmanager
def causal_stand_in(model: CausalLM):
    """Memory attention runs only over a cache: a cache-less forward (the engine's measured step) runs causal
    attention in its place, the nearest in memory (the gathers of memory attention come on top)."""
    variants = [layer.self_attn.variant for layer in model.model.layers]
    if all(v.variant != "memory" for v in variants):
        yield
        return
    try:
        for layer, v in zip(model.model.layers, variants, strict=True):
            layer.self_attn.variant = replace(v, variant="causal")
        yield
    finally:
        for layer, v in zip(model.model.layers, variants, strict=True):
            layer.self_attn.variant = v


@dataclass
class StepInputs:
    """One engine step as plain lists: what the model needs, without the Sequence objects (tensor-parallel workers
    receive this)."""

    ids: list[int]  # the new tokens of every scheduled sequence, back to back
    positions: list[int]
    block_tables: list[list[int]]  # per sequence
    query_lens: list[int]  # per sequence: new tokens this step
    context_lens: list[int]  # per sequence: tokens with KV after this step
    last: list[int]  # indices into ids of the tokens whose logits are sampled
    decode: bool  # every sequence computes exactly its one last token (CUDA-graph eligible)
    lora_slots: list[int] | None = None  # per sequence: its adapter's slot, -1 the base; None: no adapter at all


def prepare_step(scheduled: list[tuple[Sequence, int]], ahead: bool = False) -> tuple[StepInputs, list[Sequence]]:
    """`ahead`: every sequence computes one token that is sampled but not yet appended to its token_ids (the
    ids are then placeholders; the runner takes the real ones from the device)."""
    ids, positions, to_sample, last = [], [], [], []
    for seq, n in scheduled:
        start, total = seq.num_computed_tokens, len(seq) + ahead
        ids.extend([0] * n if ahead else seq.token_ids[start : start + n])
        positions.extend(range(start, start + n))
        if start + n == total:
            to_sample.append(seq)
            last.append(len(ids) - 1)
    decode = all(n == 1 and s.num_computed_tokens + 1 == len(s) + ahead for s, n in scheduled)
    slots = [s.lora_slot for s, _ in scheduled]
    step = StepInputs(ids, positions, [s.block_table for s, _ in scheduled], [n for _, n in scheduled],
                      [s.num_computed_tokens + n for s, n in scheduled], last, decode,
                      slots if any(slot >= 0 for slot in slots) else None)
    return step, to_sample
