"""`longseq plan serve`: weights, KV cache, how long a context and how many sequences fit, and speed bounds.

The KV budget follows longseq's engine (engine/model_runner.py): total memory × gpu_memory_fraction, minus the
weights, minus the peak activations of the largest step (max_num_batched_tokens tokens, max_num_seqs logits rows).
The engine measures those two by running that step, or, with `--kv-pool plan`, takes them from `weight_bytes` and
`engine_activation_bytes` here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from longseq.config.policy import MAX_LORA_RANK
from longseq.errors import LongseqError
from longseq.plan.flops import forward_flops_per_token
from longseq.plan.hardware import GPU
from longseq.plan.lora import lora_pool_bytes
from longseq.plan.models import ModelSpec
from longseq.plan.params import count_params
from longseq.plan.quant import KV_BYTES, dequant_transient_bytes, get_format

PREFILL_MFU = 0.5  # assumed share of peak in prefill (large matmuls); decode is bandwidth-bound instead


@dataclass(frozen=True)
class ServeSetup:
    quant: str = "bf16"  # weight format: bf16 | fp16 | fp8 | int8 | int4 (int4-g32 / g64 / g128) | nf4
    kv_dtype: str = "bf16"  # bf16 | fp16 | fp8
    context: int | None = None  # tokens per sequence (prompt + output); default: the model's context
    batch: int | None = None  # concurrent sequences; default: as many as fit at `context`
    num_gpus: int = 1  # tensor parallel
    gpu_memory_fraction: float = 0.9  # EngineConfig default
    max_num_batched_tokens: int = 2048  # EngineConfig default: the largest step the engine profiles
    max_num_seqs: int = 256
    max_loras: int = 0  # LoRA adapter slots on each GPU (engine/lora/pool.py); 0: no adapters
    max_lora_rank: int = 16


@dataclass
class ServePlan:
    model: str
    gpu: GPU
    setup: ServeSetup
    weights: float  # bytes per GPU
    kv_per_token: float  # bytes per token of context, per GPU
    activations: float  # the engine's reserve: peak of its largest step
    budget: float  # gpu memory × fraction
    kv_pool: float  # what is left for the KV cache
    kv_tokens: int  # tokens of context the pool holds (all sequences together)
    context: int
    batch: int  # concurrent sequences at `context`
    max_context_at_batch: int  # the longest context for `batch` sequences
    fits: bool
    decode_tokens_per_s: float  # all sequences together, upper bound
    decode_tokens_per_s_per_seq: float
    prefill_tokens_per_s: float
    time_to_first_token_s: float
    notes: list[str] = field(default_factory=list)
    lora_pool: float = 0.0  # bytes of the adapter slots (plan/lora.py)

    def to_dict(self) -> dict[str, Any]:
        gib = 2**30
        return {
            "model": self.model, "gpu": self.gpu.name, "num_gpus": self.setup.num_gpus, "setup": asdict(self.setup),
            "memory_gib": {"weights": self.weights / gib, "kv_cache": self.kv_pool / gib,
                           "activations": self.activations / gib, "lora_pool": self.lora_pool / gib,
                           "budget": self.budget / gib,
                           "gpu": self.gpu.memory_gib},
            "kv_bytes_per_token": self.kv_per_token, "kv_tokens": self.kv_tokens, "context": self.context,
            "batch": self.batch, "max_context_at_batch": self.max_context_at_batch, "fits": self.fits,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "decode_tokens_per_s_per_seq": self.decode_tokens_per_s_per_seq,
            "prefill_tokens_per_s": self.prefill_tokens_per_s, "time_to_first_token_s": self.time_to_first_token_s,
            "notes": self.notes,
        }


def kv_bytes_per_token(spec: ModelSpec, kv_bytes: float = 2) -> float:
    """K and V of every layer: 2 · L · kv_heads · head_dim · bytes (GQA/MQA keep only kv_heads). EleutherAI's
    "Transformer Math 101" writes 2 · n_layers · n_heads · d_head, which counts values, not bytes: it lacks the
    ×2 bytes of fp16 (and uses all heads, not the KV heads of GQA)."""
    cfg = spec.config
    return 2.0 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_bytes


def weight_bytes(spec: ModelSpec, quant: str) -> float:
    """Stored weights: decoder linears in the format, embeddings / LM head / norms in 16 bits when quantized."""
    fmt, counts = get_format(quant), count_params(spec)
    return fmt.linear_bytes * counts.linear + fmt.other_bytes * counts.not_linear


def engine_activation_bytes(spec: ModelSpec, tokens: int, seqs: int, act_bytes: int = 2, tp: int = 1,
                            quant: str = "bf16") -> float:
    """Peak of one inference step of `tokens` tokens (no saved tensors): the residual and a normed copy, the MLP's
    gate, up, silu(gate) and product (4 · S × I at once), and the LM head's logits for the sampled rows in bf16
    and fp32 (model_runner: lm_head(...).float()). Tensor parallel (distributed/tensor_parallel.py): the residual
    stream is replicated, the MLP split over tp, and the logits all-gathered: the local V/tp slice, the gathered
    pieces and their concatenation in bf16, then the fp32 copy (none when the model is fp32: .float() is a no-op).
    A quantized `quant` adds what its layers hold while they run (plan/quant.py: int4's dequantized weight)."""
    cfg = spec.config
    per_token = act_bytes * (2 * cfg.hidden_size + 4 * cfg.intermediate_size * spec.experts_per_token / tp)
    copy = 4 if act_bytes != 4 else 0
    logits = act_bytes + copy if tp == 1 else act_bytes / tp + 2 * act_bytes + copy
    gate_up = 2 * cfg.intermediate_size * cfg.hidden_size / tp  # the largest fused linear (gate and up)
    return (tokens * per_token + min(tokens, seqs) * cfg.vocab_size * logits
            + dequant_transient_bytes(quant, gate_up))


def plan_serve(spec: ModelSpec, gpu: GPU, setup: ServeSetup) -> ServePlan:
    if setup.kv_dtype not in KV_BYTES:
        raise LongseqError(f"unknown KV dtype {setup.kv_dtype!r}; known: {', '.join(KV_BYTES)}")
    cfg, tp = spec.config, setup.num_gpus
    if tp <= 0 or cfg.num_kv_heads % tp or cfg.num_heads % tp:
        raise LongseqError(f"--num-gpus {tp} must divide the heads ({cfg.num_heads}) and KV heads "
                           f"({cfg.num_kv_heads})")
    if not 0 < setup.gpu_memory_fraction <= 1:
        raise LongseqError("gpu-memory-fraction must be in (0, 1]")
    if setup.max_loras < 0 or not 1 <= setup.max_lora_rank <= MAX_LORA_RANK:
        raise LongseqError(f"max-loras must be >= 0 and max-lora-rank in [1, {MAX_LORA_RANK}]")
    for name in ("context", "batch"):
        if getattr(setup, name) is not None and getattr(setup, name) <= 0:
            raise LongseqError(f"{name} must be positive")
    weights = weight_bytes(spec, setup.quant) / tp
    kv = kv_bytes_per_token(spec, KV_BYTES[setup.kv_dtype]) / tp
    act = engine_activation_bytes(spec, setup.max_num_batched_tokens, setup.max_num_seqs, tp=tp, quant=setup.quant)
    # Adapters in the serving dtype (16 bits) whatever the weights' format.
    loras = lora_pool_bytes(spec, setup.max_loras, setup.max_lora_rank, 2) if setup.max_loras else 0.0
    budget = gpu.memory_bytes * setup.gpu_memory_fraction
    pool = max(0.0, budget - weights - act - loras)
    kv_tokens = int(pool // kv)
    context = setup.context or cfg.max_seq_len
    batch = setup.batch or max(0, min(setup.max_num_seqs, kv_tokens // context))
    max_context = kv_tokens // max(1, batch)
    fits = weights + act + loras < budget and batch >= 1 and batch * context <= kv_tokens
    # Decode: every step reads all weights (MoE: the experts the batch routes to) and each sequence's KV.
    counts = count_params(spec)
    active = 1.0 if not spec.is_moe else min(1.0, max(1, batch) * spec.experts_per_token / spec.num_experts)
    expert_bytes = get_format(setup.quant).linear_bytes * (counts.mlp / tp) if spec.is_moe else 0.0
    read = weights - expert_bytes * (1 - active) + max(1, batch) * context * kv
    bw = gpu.bandwidth_tbs * 1e12
    peak = gpu.peak_tflops("fp8" if setup.quant == "fp8" and gpu.fp8_tflops else "bf16") * 1e12 * tp
    decode_compute = max(1, batch) * forward_flops_per_token(counts.matmul, cfg.num_layers, spec.q_dim, context)
    step = max(read / bw, decode_compute / peak)
    prefill_flops = forward_flops_per_token(counts.matmul, cfg.num_layers, spec.q_dim, context / 2)
    plan = ServePlan(
        model=spec.name, gpu=gpu, setup=setup, weights=weights, kv_per_token=kv, activations=act, budget=budget,
        kv_pool=pool, kv_tokens=kv_tokens, context=context, batch=batch, max_context_at_batch=max_context,
        fits=fits, decode_tokens_per_s=max(1, batch) / step, decode_tokens_per_s_per_seq=1 / step,
        prefill_tokens_per_s=peak * PREFILL_MFU / prefill_flops,
        time_to_first_token_s=context * prefill_flops / (peak * PREFILL_MFU), lora_pool=loras,
    )
    if weights + act + loras >= budget:
        plan.notes.append(f"the weights alone ({weights / 2**30:.1f} GiB) do not fit in {budget / 2**30:.1f} GiB: "
                          "use a smaller --quant or more GPUs")
    elif batch * context > kv_tokens:
        plan.notes.append(f"{batch} × {context:,} tokens need {batch * context * kv / 2**30:.1f} GiB of KV cache, "
                          f"{pool / 2**30:.1f} GiB are left")
    if setup.quant == "fp8" and not gpu.fp8_tflops:
        plan.notes.append(f"{gpu.name} has no FP8 tensor cores: longseq serve --quantization fp8 refuses it (int4 "
                          "runs)")
    if context > cfg.max_seq_len:
        plan.notes.append(f"context {context:,} is beyond the model's native {cfg.max_seq_len:,} tokens")
    if setup.max_loras:
        plan.notes.append(f"LoRA pool: {setup.max_loras} adapter slots of rank {setup.max_lora_rank} "
                          f"({loras / setup.max_loras / 2**20:,.0f} MiB each); a decode step also reads the factors "
                          "of every adapter in its batch (not in the decode bound below)")
    plan.notes.append("decode speed: bandwidth upper bound (weights + KV read once a step); longseq's engine "
                      "reaches a fraction of it today (its paged decode gathers the KV cache every step)")
    return plan
