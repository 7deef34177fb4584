"""Activation memory of longseq's training step, tensor by tensor, and the moment of the step where it peaks.

The generic reference is Korthikanti et al. 2022 (arXiv 2205.05198), eq. 1: a GPT layer saves s·b·h·(34 + 5·a·s/h)
bytes in 16-bit training (`korthikanti_layer_bytes`). longseq differs, and this module follows longseq's code
(models/llama.py, train/lora.py, train/loss.py, attention/sdpa.py) rather than the generic formula:

- SDPA (flash / memory-efficient kernels) keeps no s×s scores: the 5·a·s/h term is a (B, H, S) fp32 log-sum-exp.
- RMSNorm (not LayerNorm), SwiGLU (three S×I tensors), RoPE'd q and k, GQA k/v of H_kv heads; no dropout.
- RMSNorm computes in fp32: each norm keeps a fp32 copy of its input (4·d bytes a token). On a GPU the fused
  kernels (models/kernels/, `fused`) keep the input itself and one fp32 rstd, SwiGLU keeps gate and up only (no
  silu(gate)), and RoPE keeps nothing beyond the shared cos/sin.
- LoRA: the frozen base matmul keeps nothing (its weight needs no grad; plain or NF4, models/recompute.py
  frozen_linear); adapter A keeps its input, B keeps x·Aᵀ (r values a token).
- Full fine-tuning keeps fp32 master weights under bf16 autocast: the residual stream is fp32, each linear casts its
  input to bf16 separately (q, k, v make three copies of the normed input) and saves the cast bf16 weight.
- recompute "full" keeps each layer's input; backward recomputes one layer at a time. "selective" recomputes the
  attention core (norms, RoPE, SDPA) and silu(gate)·up, keeping every matmul output (after Korthikanti et al.).
- The LM head and the loss run chunk by chunk (train/loss.py): only chunk × vocab fp32 logits exist at a time.

The peak of a step is the largest of a few moments of backward, each measured tensor by tensor on CPU with
torch's saved-tensor hooks and a live-storage tracker (tests/plan/test_activations_measured.py):
the loss chunks (three fp32 chunk × vocab tensors), the final RMSNorm backward (five fp32 S × d temporaries),
the last layer's MLP backward (gate, up, silu(gate) and three S × I gradients at once) and attention backward.
- `mlp_tile` (models/tiling.py) runs every RMSNorm and MLP over that many tokens at a time: norms keep their input
  and one fp32 rsqrt a token, the MLP keeps its input, and the MLP's intermediates exist for one tile at a time.
  A recomputed layer's first norm then saves the layer input itself (no extra copy). The tiled step peaks where a
  recomputed layer's working set is largest: attention backward (saved q, k, v, output, the normed input, dO,
  dQ/dK/dV and FlashAttention's fp32 dQ accumulator and GQA-expanded dK/dV) once the MLP half is freed, or the
  recompute reaching o_proj (the projections' pre-RoPE q and k are still referenced there).
- "offloaded" (models/offload.py) sends the inputs of all but the last `offload_keep` layers to pinned host
  memory. In backward a kept layer sees the kept inputs below it; an offloaded layer its own input and the
  prefetched previous one, and otherwise what a layer under "full" holds (non-reentrant checkpoints). These moments
  are checked on CPU in tests/plan/test_tiled_offloaded_measured.py, and against measured H100 rows in
  test_validation_h100.py.
- Long sequences attend one group of KV heads at a time in training (attention/sdpa.py, `attention_groups`): the
  backward kernel's workspace exists for one group; the groups' dQ/dK/dV pieces are joined into dQ, dK, dV.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from longseq.config.policy import PLAIN_LAYER_POLICIES, attention_groups
from longseq.plan.models import ModelSpec
from longseq.plan.params import (
    ATTENTION_LINEARS,
    MLP_LINEARS,
    count_params,
    layer_linears,
    lora_expert_params,
    lora_params,
    lora_weight_elements,
    routed_expert_params,
)
from longseq.plan.setup import TrainSetup

POLICIES = ("none", "selective", "keep_attention", "full", "offloaded")
FP32 = 4  # RMSNorm statistics, loss logits, log-sum-exp, master weights
INDEX = 8  # int64 token ids and targets
NORM_BACKWARD_TEMPS = 5  # fp32 S×d tensors alive at once in RMSNorm's backward (measured: grad·r, mean grad, x, 2x, …)
LOSS_TEMPS = 3  # fp32 chunk×V tensors in the loss backward: log-softmax output, nll grad, log-softmax grad
MLP_BACKWARD_TENSORS = 6  # S×I tensors at the MLP backward: gate, up, silu(gate) and three gradients
FUSED_MLP_BACKWARD_TENSORS = 6  # kernels/swiglu.py, measured on CPU: at down_proj's backward as many as eager
NF4_DEQUANT_BYTES = 14.0  # per weight element, transient, while torchao 0.18 dequantizes an NF4 weight (measured)


@dataclass
class ActivationPeak:
    saved: float  # bytes kept from forward for backward, on one GPU
    peak: float  # activation + workspace bytes at the step's worst moment (weights and optimizer excluded)
    grads: float  # gradient bytes alive at that moment (trainable weights' .grad)
    phase: str  # which moment: loss backward, final norm backward, MLP backward, attention backward, forward end
    parts: dict[str, float] = field(default_factory=dict)  # `peak` split by what holds the bytes
    host: float = 0.0  # bytes in pinned host memory (offloaded layer inputs)
    events: dict[str, float] = field(default_factory=dict)  # every candidate moment's activations + grads
    all_grads: float = 0.0  # every trainable weight's gradient (the optimizer step's moment)


@dataclass(frozen=True)
class _Sizes:
    a: int  # activation bytes (autocast dtype)
    r: int  # residual-stream bytes (fp32 when full fine-tuning keeps fp32 master weights)
    full: bool
    targets: frozenset[str]
    saves: frozenset[str]  # linears whose input is saved (trainable base weight or a LoRA adapter)
    norm_grad: bool
    emb_grad: bool
    casts: bool  # autocast casts fp32 weights (full fine-tuning in bf16/fp16)
    fused: bool  # fused RMSNorm / SwiGLU kernels


def _sizes(st: TrainSetup) -> _Sizes:
    full = st.method == "full"
    a = 4 if st.precision == "fp32" else 2
    targets = frozenset() if full else frozenset(st.lora_targets)
    saves = frozenset(ATTENTION_LINEARS + ("gate_proj", "up_proj", "down_proj")) if full else targets
    return _Sizes(a=a, r=4 if full else a, full=full, targets=targets, saves=saves,
                  norm_grad=full or st.train_norms, emb_grad=full or st.train_embed, casts=full and a == 2,
                  fused=st.fused)


def korthikanti_layer_bytes(seq_len: int, batch: int, hidden: int, heads: int, tp: int = 1, sp: bool = False) -> float:
    """Generic per-layer activation bytes of a 16-bit GPT layer with no recompute."""
    s, b, h, a, t = seq_len, batch, hidden, heads, tp
    if sp:  # Korthikanti et al. 2022, eq. 5 (tensor + sequence parallel): sbh(34/t + 5as/(ht))
        return s * b * h * (34 / t + 5 * a * s / (h * t))
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))  # eq. 2 (tensor parallel), eq. 1 at t = 1


def _norm_bytes(z: _Sizes, d: int, input_needs_grad: bool, tiled: bool = False) -> float:
    """Per token: RMSNorm keeps a fp32 copy of its input (x.float(), or x itself when fp32) and rsqrt (one fp32),
    plus x.to(dtype) when its weight trains (longseq RMSNorm: weight * x.to(dtype)). Tiled: its input and rsqrt.
    Fused (kernels/rms_norm.py): its input and rstd, when its input or its weight needs a gradient."""
    if z.fused:
        return (z.r * d + FP32) if input_needs_grad or z.norm_grad else 0.0
    if tiled:
        return z.r * d + FP32
    out = (FP32 * d + FP32) if input_needs_grad else 0.0
    return out + (z.r * d if z.norm_grad else 0.0)


def layer_bytes_per_token(spec: ModelSpec, st: TrainSetup, policy: str, first: bool = False) -> dict[str, float]:
    """Bytes one decoder layer keeps for backward, per token, by part. `first`: layer 0, whose input needs no grad
    when the embedding is frozen (LoRA): its input norm then keeps nothing."""
    z, cfg = _sizes(st), spec.config
    d, q, kv, inter, k = cfg.hidden_size, spec.q_dim, spec.kv_dim, cfg.intermediate_size, spec.experts_per_token
    if policy in ("full", "offloaded"):  # checkpoint keeps only the layer input (torch.utils.checkpoint saves args)
        return {"layer inputs": float(z.r * d)}
    # Grouped attention (long sequences): the groups' outputs, which their kernels save, and their join, which the
    # output projection (or keep_attention's second checkpoint) saves, are two tensors, not one.
    joined = z.a * q if _attention_groups(spec, st) > 1 else 0.0
    if policy == "keep_attention":  # DecoderLayer: two checkpoints (they save the layer input and the attention
        # output) around attention, which keeps RoPE'd q, k, v, its output and the log-sum-exp
        return {"layer inputs": float(z.r * d), "attention": attention_kept_bytes_per_token(spec, st) + joined}
    x_rg = not first or z.emb_grad
    casts_in = z.casts and z.r != z.a  # fp32 normed input, cast to bf16 by each linear separately
    qkv_saving = [n for n in ("q_proj", "k_proj", "v_proj") if n in z.saves]
    parts: dict[str, float] = {}
    tiled = st.mlp_tile is not None
    parts["norms"] = _norm_bytes(z, d, x_rg, tiled) + _norm_bytes(z, d, True, tiled)
    parts["normed inputs"] = (z.a * d * (len(qkv_saving) if casts_in else min(1, len(qkv_saving)))
                              + _mlp_input_bytes(spec, st))
    lse = FP32 * cfg.num_heads
    if st.packed:  # masked SDPA: k/v repeated to H heads (attention/sdpa.py) and the bool (S, S) mask saved;
        # Ulysses attends over the whole sequence on every GPU: S·S bytes over S/sp local tokens
        kv_saved = 2 * z.a * q + st.seq_len * st.parallel.sp
    else:
        kv_saved = 2 * z.a * kv
    if policy in ("none", "plain"):
        attn = z.a * q + kv_saved + z.a * q + lse  # RoPE'd q and k, v, output, log-sum-exp
        attn += joined if "o_proj" in z.saves else 0.0
        if cfg.qk_norm:  # Qwen3: q_norm / k_norm
            attn += _qk_norm_bytes(z, spec)
    else:  # selective: the checkpointed core keeps q, k, v (pre-RoPE); o_proj keeps the output if it saves inputs
        attn = z.a * q + (2 * z.a * kv) + (z.a * q if "o_proj" in z.saves else 0)
    if spec.mlp == "gelu":  # GELU's input (the up projection's output), and its output when down_proj saves it
        mlp = (1 + ("down_proj" in z.saves)) * z.a * inter * k
    elif policy == "none":  # gate, silu(gate) (not fused), up, silu·up (down's input)
        mlp = (3 - z.fused + ("down_proj" in z.saves)) * z.a * inter * k
    else:  # selective, plain: gate and up (checkpoint inputs); silu·up only when down_proj's weight trains (a
        # frozen down_proj, LoRA's, is inside SwiGLU's checkpoint)
        mlp = (2 + ("down_proj" in z.saves and z.full)) * z.a * inter * k
    parts["attention"] = attn
    parts["mlp"] = mlp if st.mlp_tile is None else 0.0  # tiled: intermediates exist per tile only (see peak)
    # LoRA B keeps x·Aᵀ; a tiled MLP's adapters run inside the tile (models/tiling.py _TiledMLP saves only its input)
    adapters = [t for t in z.targets if t in layer_linears(spec) and not (tiled and t in MLP_LINEARS)
                and not (policy in ("selective", "plain") and t == "down_proj")]
    parts["lora"] = z.a * st.lora_rank * sum(layer_linears(spec)[t].copies for t in adapters)
    return {key: value for key, value in parts.items() if value}


def _dequant_bytes(spec: ModelSpec, st: TrainSetup) -> float:
    """Transient bytes while torchao dequantizes the layer's largest NF4 weight (on this GPU's shard)."""
    biggest = max(x.in_features * x.out_features for x in layer_linears(spec).values())
    return NF4_DEQUANT_BYTES * biggest / st.parallel.tp


def _attention_groups(spec: ModelSpec, st: TrainSetup) -> int:
    """Groups of KV heads training attention runs one after another on a GPU (policy.attention_groups over its
    share of the KV heads; packed rows attend by documents instead: 1)."""
    p = st.parallel
    return 1 if st.packed else attention_groups(max(1, spec.config.num_kv_heads // (p.tp * p.sp)), st.seq_len)


def attention_kept_bytes_per_token(spec: ModelSpec, st: TrainSetup) -> float:
    """Per token, what SDPA saves for its backward: RoPE'd q, k, v, the output and a fp32 log-sum-exp per head
    (packed rows: k/v expanded to H heads and the bool mask, attention/sdpa.py _sdpa_masked)."""
    z, cfg = _sizes(st), spec.config
    kv = 2 * z.a * spec.q_dim + st.seq_len * st.parallel.sp if st.packed else 2 * z.a * spec.kv_dim
    return float(2 * z.a * spec.q_dim + kv + FP32 * cfg.num_heads)


def _mlp_input_bytes(spec: ModelSpec, st: TrainSetup) -> float:
    """Per token, the MLP's saved input: _TiledMLP saves the post-attention norm's output (residual dtype:
    weight * x.to(dtype) in RMSNorm); untiled, gate/up keep it when they save inputs (autocast: a bf16 cast each)."""
    z, d = _sizes(st), spec.config.hidden_size
    if st.mlp_tile is not None:
        return float(z.r * d)
    gu_saving = [n for n in ("gate_proj", "up_proj") if n in z.saves and (n != "gate_proj" or spec.mlp == "swiglu")]
    return float(z.a * d * (len(gu_saving) if z.casts and z.r != z.a else min(1, len(gu_saving))))


def mlp_half_bytes_per_token(spec: ModelSpec, st: TrainSetup) -> float:
    """Per token, what the MLP half of a (not checkpointed) layer keeps beside its intermediates ("mlp"): the
    post-attention RMSNorm, the MLP's input and its adapters' x·Aᵀ. Backward frees them before the layer's
    attention backward starts (autograd releases a node's saved tensors once it has run)."""
    z, d = _sizes(st), spec.config.hidden_size
    tiled = st.mlp_tile is not None
    lin = layer_linears(spec)
    adapters = 0 if tiled else sum(lin[t].copies for t in z.targets & set(MLP_LINEARS) if t in lin)
    return _norm_bytes(z, d, True, tiled) + _mlp_input_bytes(spec, st) + z.a * st.lora_rank * adapters


def qkv_half_bytes_per_token(spec: ModelSpec, st: TrainSetup) -> float:
    """Per token, what the attention half before SDPA keeps (a not checkpointed layer): the input RMSNorm, the normed
    input the q/k/v projections save, their adapters' x·Aᵀ and, with q/k norms (Qwen3), those norms' fp32 copies."""
    z, cfg = _sizes(st), spec.config
    d = cfg.hidden_size
    qkv = [n for n in ("q_proj", "k_proj", "v_proj") if n in z.saves]
    normed = z.a * d * (len(qkv) if z.casts and z.r != z.a else min(1, len(qkv)))
    lin = layer_linears(spec)
    adapters = sum(lin[t].copies for t in z.targets & {"q_proj", "k_proj", "v_proj"} if t in lin)
    qk_norms = _qk_norm_bytes(z, spec) if cfg.qk_norm else 0.0
    return _norm_bytes(z, d, True, st.mlp_tile is not None) + normed + z.a * st.lora_rank * adapters + qk_norms


def _qk_norm_bytes(z: _Sizes, spec: ModelSpec) -> float:
    """Per token, Qwen3's q_norm and k_norm over each head: fp32 copies of q and k and one rsqrt per head (plus q, k
    in the activation dtype when the norm weights train); fused, q and k themselves and the rstd."""
    cfg, q, kv = spec.config, spec.q_dim, spec.kv_dim
    rstd = FP32 * (cfg.num_heads + cfg.num_kv_heads)
    if z.fused:
        return z.a * (q + kv) + rstd
    return FP32 * (q + kv) + rstd + (z.a * (q + kv) if z.norm_grad else 0)


def outside_bytes_per_token(spec: ModelSpec, st: TrainSetup) -> dict[str, float]:
    """Per token, outside the layers: RoPE cos/sin (x's dtype), the final norm, the hidden states the loss chunks
    keep, the int64 targets, the token ids when the embedding trains."""
    z, cfg = _sizes(st), spec.config
    d = cfg.hidden_size
    return {
        "rope cos/sin": 2.0 * z.r * cfg.head_dim,
        "final norm": _norm_bytes(z, d, True, st.mlp_tile is not None),
        "hidden (loss input)": float(z.r * d),
        "targets and ids": float(INDEX * (1 + z.emb_grad)),
    }


def _tokens(st: TrainSetup) -> float:
    return st.batch_size * st.seq_len / st.parallel.sequence_shards


def _layer_constants(spec: ModelSpec, st: TrainSetup, policy: str | None = None) -> float:
    """Bytes per layer, not per token, kept for backward: bf16 casts of the adapters (LoRA) or of the fp32 weights
    (full fine-tuning under autocast), which autocast caches and the matmuls save. Selective and plain layers
    recompute down_proj's adapter inside SwiGLU's checkpoint: its casts are not kept."""
    z = _sizes(st)
    if z.casts:
        return 2.0 * _cast_elements(spec, st) / spec.config.num_layers
    if z.a == 2 and z.targets:
        inside = {"down_proj"} if (policy or st.recompute) in ("selective", "plain") else set()
        return 2.0 * lora_weight_elements(spec, st.lora_rank, tuple(t for t in z.targets if t not in inside))
    return 0.0


def _layer_saved(spec: ModelSpec, st: TrainSetup, first: bool, policy: str | None = None) -> dict[str, float]:
    """One layer's saved bytes for the micro-batch on one GPU (policy of the setup by default), by part."""
    scale = _tokens(st) / st.parallel.tp
    return {k: v * scale for k, v in layer_bytes_per_token(spec, st, policy or st.recompute, first=first).items()}


def _plain(st: TrainSetup, layers: int) -> int:
    """How many of the last layers are plain (recompute only SwiGLU's product) on this GPU."""
    return min(st.plain_layers, layers) if st.recompute in PLAIN_LAYER_POLICIES else 0


def _kept(st: TrainSetup, layers: int) -> int:
    """How many layers below the plain ones recompute as keep_attention under full on this GPU."""
    return min(st.attention_layers, layers - _plain(st, layers)) if st.recompute == "full" else 0


def saved_bytes(spec: ModelSpec, st: TrainSetup) -> dict[str, float]:
    """Bytes kept from forward for backward for the whole micro-batch on one GPU, by part (what saved-tensor hooks
    see: unique storages, parameters excluded)."""
    layers = spec.config.num_layers // st.parallel.pp
    plain, kept = _plain(st, layers), _kept(st, layers)
    out: dict[str, float] = {}
    for i in range(layers):
        policy = "plain" if i >= layers - plain else "keep_attention" if i >= layers - plain - kept else None
        for key, value in _layer_saved(spec, st, st.parallel.pp == 1 and i == 0, policy).items():
            out[key] = out.get(key, 0.0) + value
    for key, value in outside_bytes_per_token(spec, st).items():
        out[key] = out.get(key, 0.0) + value * _tokens(st) / st.parallel.tp
    if st.packed and st.recompute != "none":
        out["targets and ids"] += INDEX * _tokens(st) / st.parallel.tp  # doc_ids are a checkpoint input
    if st.recompute in ("none", "selective", "plain") or plain:  # layers that are not recomputed
        constants = _layer_constants(spec, st, "plain" if plain else None)
        out["weight casts"] = constants * (plain or layers) / st.parallel.tp
    if st.parallel.pp > 1:  # 1F1B: the first stage holds pp micro-batches of its layers (Narayanan et al. 2021, §2.2)
        out = {key: value * st.parallel.pp for key, value in out.items()}
    return {key: value for key, value in out.items() if value}


def _away(st: TrainSetup) -> float:
    """Of each routed expert's weights, gradients and states, the share the other ranks of its expert-parallel group
    hold (1 - 1/ep; 0 without --ep)."""
    return 1 - 1 / st.parallel.ep


def _cast_elements(spec: ModelSpec, st: TrainSetup) -> float:
    """Linear weight elements autocast casts to bf16 on one GPU (every layer): all but the other ranks' experts."""
    return count_params(spec).linear - routed_expert_params(spec, biases=False) * _away(st)


def _grad_bytes(spec: ModelSpec, st: TrainSetup) -> tuple[float, float, float]:
    """(LM head, one layer, everything) gradient bytes on one GPU: fp32 .grad of the trainable weights (of the
    routed experts, this rank's under --ep)."""
    z, cfg = _sizes(st), spec.config
    shard = st.parallel.tp * st.parallel.pp
    if z.full:
        counts, away = count_params(spec), routed_expert_params(spec) * _away(st)
        head = FP32 * cfg.vocab_size * cfg.hidden_size
        layer = FP32 * (counts.attention + counts.mlp - away + 2 * cfg.hidden_size * cfg.num_layers) / cfg.num_layers
        return head / st.parallel.tp, layer / shard, FP32 * (counts.total - away) / shard
    targets = tuple(z.targets)
    adapters = FP32 * (lora_params(spec, st.lora_rank, targets)
                       - lora_expert_params(spec, st.lora_rank, targets) * _away(st)) / shard
    return 0.0, adapters / cfg.num_layers, adapters


def activation_peak(spec: ModelSpec, st: TrainSetup, kernel_workspace: bool = True) -> ActivationPeak:
    """The activation bytes at the worst moment of one training micro-step, and which moment that is.

    Each candidate moment is (activations + workspace, gradients alive then); the step's peak is the largest sum.
    Backward frees a layer's activations as it goes and creates that layer's gradients, so for the layer moments
    only the ends can be the largest: the last layer (first in backward), layer 0, and under "offloaded" the last
    offloaded layer (the first one backward meets, with its own input and the prefetched previous one).
    kernel_workspace=False leaves out what CUDA kernels allocate inside themselves (FlashAttention-2 backward's fp32
    dQ accumulator and GQA-expanded dK/dV), which a CPU run never allocates and a dispatch-level tracker never sees,
    and counts a plain LoRA layer's MLP backward as that tracker sees it (see `swiglu_tensors` below).
    """
    if st.recompute not in POLICIES + ("plain",):
        raise ValueError(f"recompute must be one of {POLICIES}")
    layers = spec.config.num_layers // st.parallel.pp
    plain, kept = _plain(st, layers), _kept(st, layers)
    if plain and kept:
        raise ValueError("the planner models plain layers or keep_attention layers under full, not both")
    if plain:
        events, saved, host, all_grads = _mixed_events(spec, st, plain, kernel_workspace)
    elif kept:
        events, saved, host, all_grads = _kept_attention_events(spec, st, kept, kernel_workspace)
    else:
        events, saved, host, all_grads = _events(spec, st, kernel_workspace)
    phase = max(events, key=lambda e: sum(events[e]))
    act, grad = events[phase]
    total = sum(saved.values())
    if phase == "optimizer step":  # nothing of the forward is left
        total, saved = 0.0, {}
    parts = dict(saved)
    parts["transient"] = act - total
    return ActivationPeak(saved=total, peak=act, grads=grad, phase=phase, parts=parts, host=host,
                          events={e: sum(v) for e, v in events.items()}, all_grads=all_grads)


def _mixed_events(spec: ModelSpec, st: TrainSetup, plain: int, kernel_workspace: bool):
    """keep_attention / full with the last `plain` layers plain. Backward meets the plain layers first: their
    moments are those of an all-plain model whose lower layers hold the recomputed policy's (smaller) saved
    tensors instead; the recomputed layers' moments are those of a model of just them (the plain layers' tensors
    are freed by then, their gradients exist)."""
    all_plain = replace(st, recompute="plain", plain_layers=0)
    events, _, _, all_grads = _events(spec, all_plain, kernel_workspace)
    saved = saved_bytes(spec, st)
    shift = sum(saved_bytes(spec, all_plain).values()) - sum(saved.values())
    events = {e: (act - shift if e != "optimizer step" else act, g) for e, (act, g) in events.items()
              if "layer 0" not in e}
    events.update(_lower_layer_events(spec, replace(st, plain_layers=0), plain, "recomputed", kernel_workspace))
    return events, saved, 0.0, all_grads


def _kept_attention_events(spec: ModelSpec, st: TrainSetup, kept: int, kernel_workspace: bool):
    """full with the last `kept` layers under keep_attention. Backward meets those first: their moments are those
    of an all-keep_attention model whose lower layers keep only their inputs; the full layers' moments are those
    of a model of just them (the kept layers' tensors are freed by then, their gradients exist)."""
    cfg = spec.config
    layers = cfg.num_layers // st.parallel.pp
    keep = replace(st, recompute="keep_attention", attention_layers=0)
    events, _, host, all_grads = _events(spec, keep, kernel_workspace)
    saved = saved_bytes(spec, st)
    shift = sum(saved_bytes(spec, keep).values()) - sum(saved.values())  # moments that hold every saved tensor
    # Layer moments count the attention the layers below hold (_events `inputs_at`): the full ones hold none.
    below_attention = attention_kept_bytes_per_token(spec, keep) * _tokens(st) / st.parallel.tp * (layers - kept)
    events = {e: (act if e == "optimizer step" else act - (below_attention if _layer_moment(e) else shift), g)
              for e, (act, g) in events.items() if "layer 0" not in e}
    events.update(_lower_layer_events(spec, replace(st, attention_layers=0), kept, "full", kernel_workspace))
    return events, saved, host, all_grads


def _lower_layer_events(spec: ModelSpec, st: TrainSetup, top: int, name: str, kernel_workspace: bool):
    """The layer moments below the `top` layers of another policy, once backward has passed those: the moments of a
    model of just the lower layers under `st`'s one policy, with the top layers' gradients alive."""
    layers = spec.config.num_layers // st.parallel.pp
    if top >= layers:
        return {}
    below = replace(spec, config=replace(spec.config, num_layers=(layers - top) * st.parallel.pp))
    _, layer_grad, _ = _grad_bytes(spec, st)
    return {e.replace("last layer", f"last {name} layer"): (act, g + top * layer_grad)
            for e, (act, g) in _events(below, st, kernel_workspace)[0].items() if _layer_moment(e)}


def _layer_moment(event: str) -> bool:
    return "layer" in event or event == "NF4 dequantize"


def _events(spec: ModelSpec, st: TrainSetup, kernel_workspace: bool):
    """Every candidate moment as (activation bytes, gradient bytes), the saved tensors by part (offloaded ones not
    counted), the pinned host bytes and all gradients' bytes. One policy for every layer."""
    z, cfg = _sizes(st), spec.config
    d, inter, k = cfg.hidden_size, cfg.intermediate_size, spec.experts_per_token
    layers = cfg.num_layers // st.parallel.pp
    t = _tokens(st) / st.parallel.tp  # tokens' worth of activations on this GPU (tensor/sequence parallel shard them)
    vocab = cfg.vocab_size / st.parallel.tp  # vocabulary-parallel loss under tensor parallelism
    tiled = st.mlp_tile is not None
    recomputing = st.recompute in ("full", "offloaded", "keep_attention")
    saved = saved_bytes(spec, st)
    u_in = z.r * d * t  # one layer input (the residual stream)
    # keep_attention: the layers below the one in backward still hold their attention's saved tensors; the layer's
    # own are counted in its recompute (none_rest) as under "full".
    kept_attention = attention_kept_bytes_per_token(spec, st) * t if st.recompute == "keep_attention" else 0.0
    # CausalLM.hidden: under "offloaded" the layers below num_layers - offload_keep run under checkpoints
    # whose saved input goes to pinned host memory (models/offload.py); the last offload_keep stay as under "full".
    offloaded = layers - min(st.offload_keep or 0, layers) if st.recompute == "offloaded" else 0
    host = 0.0
    if offloaded:
        per_layer = saved["layer inputs"] / layers
        host = per_layer * offloaded
        saved["layer inputs"] = per_layer * (layers - offloaded)
    total = sum(saved.values())
    outside = {key: v * t for key, v in outside_bytes_per_token(spec, st).items()}
    cos_sin_ids = outside["rope cos/sin"] + (INDEX * t if z.emb_grad else 0.0)
    head_grad, layer_grad, all_grads = _grad_bytes(spec, st)
    persist = all_grads if st.grad_accum > 1 else None

    def grads(value: float) -> float:
        return persist if persist is not None else value

    dy = z.r * d * t  # the gradient flowing back along the residual stream
    mlp_rows = t if st.mlp_tile is None else min(t, st.mlp_tile / st.parallel.tp)
    width = inter * k
    swiglu_tensors = FUSED_MLP_BACKWARD_TENSORS if z.fused else MLP_BACKWARD_TENSORS
    if z.fused and st.recompute in ("selective", "plain") and spec.mlp == "swiglu":
        if st.recompute == "plain" and "down_proj" in z.targets and kernel_workspace:
            # The checkpoint takes in the LoRA down_proj (recompute.swiglu_output). On the GPU this moment holds
            # two S×I tensors fewer than the CPU tracker sees under Triton's interpreter (the H200 rows of
            # benchmarks/results/2026-12-03-train-liger-h200 at 32K and 128K; tests/plan/test_validation_h200.py);
            # which two is not established.
            swiglu_tensors -= 1
        else:
            swiglu_tensors += 1  # the checkpoint's recomputed silu(gate)·up is alive through the kernel's backward
    mlp_event = (swiglu_tensors if spec.mlp == "swiglu" else 4) * z.a * width * mlp_rows
    # _TiledMLP.backward allocates the whole input gradient (torch.empty_like(rows)) before its first tile, and
    # differentiates each tile's recomputed output (tile × d).
    mlp_dx = z.r * d * t if tiled else 0.0
    mlp_event += z.a * d * mlp_rows if tiled else 0.0
    if st.method == "qlora" and tiled:  # _TiledMLP.backward recomputes each tile: its frozen matmuls dequantize
        # each NF4 weight in full (torchao) beside the tile's temporaries (measured on CPU)
        mlp_event += _dequant_bytes(spec, st)
    none_layer = {key: v * t for key, v in layer_bytes_per_token(spec, st, "none").items()}
    none_rest = sum(v for key, v in none_layer.items() if key != "mlp")
    if st.recompute == "keep_attention":  # the first checkpoint (norm, q/k/v projections) is recomputed only after
        # attention's backward: through the MLP backward its half of the layer does not exist
        none_rest -= qkv_half_bytes_per_token(spec, st) * t
    mlp_half = mlp_half_bytes_per_token(spec, st) * t
    const = _layer_constants(spec, st) / st.parallel.tp
    # The recomputed layer's first norm saves the layer input itself: the tiled and fused norms save x, and the
    # plain one's x.float() is x when the residual is fp32 (full fine-tuning).
    alias = u_in if tiled or z.fused else (FP32 * d * t if z.r == FP32 else 0.0)

    hidden_kept = outside["hidden (loss input)"] if st.keep_hidden else 0.0
    # At a layer's MLP backward its down_proj is done: the bf16 cast of that weight is already freed; at its
    # attention backward, all of the MLP's casts are.
    down_cast = 2.0 * inter * d * k / st.parallel.tp if z.casts else 0.0
    mlp_casts = 2.0 * (sum(x.params for n, x in layer_linears(spec).items() if n in MLP_LINEARS)
                       - routed_expert_params(spec, biases=False) / cfg.num_layers * _away(st)) / st.parallel.tp
    mlp_casts = mlp_casts if z.casts else 0.0

    def inputs_at(i: int) -> float:
        """Layer inputs on the GPU while layer i (0-based, counted from the input) runs its backward."""
        if i >= offloaded:  # inputs of the layers from `offloaded` to i (later ones: freed)
            return (i - offloaded + 1) * u_in + i * kept_attention
        # offloaded: its own input fetched back and, from layer 1 up, the previous one prefetched (offload.py _unpack)
        return (1 + (i > 0)) * u_in

    def mlp_moment(i: int) -> float:
        """Activations at the MLP backward of layer i."""
        common = cos_sin_ids + hidden_kept + dy + mlp_event + mlp_dx - down_cast
        if recomputing:
            return inputs_at(i) + none_rest - alias + const + common
        first = _layer_saved(spec, st, st.parallel.pp == 1)
        other = _layer_saved(spec, st, False)
        kept = sum(first.values()) + i * sum(other.values()) - (other if i else first).get("mlp", 0.0)
        return kept + const * (i + 1) + common

    q_bytes, kv_bytes = z.a * spec.q_dim * t, z.a * spec.kv_dim * t
    groups = _attention_groups(spec, st)
    attn_ws = 2 * q_bytes + 2 * kv_bytes  # dO, dQ, dK, dV (grouped: the groups' pieces, joined once all exist)
    if kernel_workspace:  # inside the backward kernel (FlashAttention-2 mha_bwd, cuDNN measured alike on an H100):
        # dq_accum (fp32, B·S·H·D) and, under GQA, dk_expanded / dv_expanded; for one group at a time when grouped.
        # FlashAttention-4 keeps fp32 dK/dV accumulators of the KV heads instead (4 GiB less at 512K, whole): an
        # upper bound there (benchmarks/results/2026-11-25-fa4-h100)
        attn_ws += (FP32 * spec.q_dim * t + (2 * q_bytes if cfg.num_kv_heads != cfg.num_heads else 0.0)) / groups

    def o_proj_moment(i: int) -> float:
        """Activations when layer i's recompute reaches o_proj: Attention.forward still holds the projections'
        q and k (pre-RoPE locals) beside what the attention core saved, and o_proj (with LoRA) has its base output
        and the sum (train/lora.py: addmm adds B·A·x inside the matmul). The residual gradient of the layer's
        output is waiting."""
        o_out = z.a * d * t * (2 if "o_proj" in z.targets else 1)
        return (inputs_at(i) + none_rest - mlp_half - alias + const + z.a * (spec.q_dim + spec.kv_dim) * t
                + o_out + cos_sin_ids + hidden_kept + dy)

    def attention_moment(i: int) -> float:
        """Activations at the attention backward of layer i: its MLP half is done and freed (saved tensors, weight
        casts, the MLP's temporaries); the residual gradient is now the mid-layer one."""
        joined = q_bytes if groups > 1 and "o_proj" in z.saves else 0.0  # o_proj's backward has freed it
        return mlp_moment(i) - mlp_event - mlp_dx + down_cast - mlp_casts - mlp_half - joined + attn_ws

    chunk = min(st.loss_chunk, _tokens(st))
    chunks = -(-_tokens(st) // chunk)
    # From the second chunk on, the hidden states' gradient buffer (r·d a token) is being accumulated.
    loss = LOSS_TEMPS * FP32 * chunk * vocab + (z.r * d * t if chunks > 1 else 0.0)
    if z.casts:  # the chunk's recompute casts the LM head and the fp32 hidden chunk to bf16
        loss += z.a * vocab * d + z.a * chunk * d / st.parallel.tp
    hidden_freed = 0.0 if st.keep_hidden else outside["hidden (loss input)"]
    # The fused norm's backward allocates only its input's gradient; the eager one five fp32 temporaries (a tile's).
    norm_temps = z.r * d * t if z.fused else NORM_BACKWARD_TEMPS * FP32 * d * mlp_rows
    events: dict[str, tuple[float, float]] = {
        "loss backward": (total + loss, grads(head_grad if chunks > 1 else 0.0)),
        "final norm backward": (total - hidden_freed - INDEX * t + norm_temps,
                                grads(head_grad)),
        "MLP backward, last layer": (mlp_moment(layers - 1), grads(head_grad + layer_grad / 3)),
        "attention backward, last layer": (attention_moment(layers - 1), grads(head_grad + layer_grad)),
    }
    if z.full or st.grad_accum > 1:
        events["MLP backward, layer 0"] = (mlp_moment(0), grads(head_grad + (layers - 1 + 1 / 3) * layer_grad))
    if recomputing:
        events["attention output projection, last layer recompute"] = (o_proj_moment(layers - 1),
                                                                       grads(head_grad))
    if 0 < offloaded < layers:  # the last offloaded layer, first of them in backward
        top, done = offloaded - 1, layers - offloaded  # `done` layers have their gradients already
        events["MLP backward, last offloaded layer"] = (mlp_moment(top),
                                                        grads(head_grad + (done + 1 / 3) * layer_grad))
        events["attention backward, last offloaded layer"] = (attention_moment(top),
                                                              grads(head_grad + (done + 1) * layer_grad))
    events["optimizer step"] = (0.0, all_grads)
    if z.casts:  # autocast caches a bf16 copy of every fp32 weight until the forward's autocast region ends
        casts = 2.0 * _cast_elements(spec, st) / (st.parallel.tp * st.parallel.pp) if recomputing else 0.0
        events["forward end"] = (total + casts + (z.a + 2 * FP32) * chunk * vocab, grads(0.0))
    if st.method == "qlora":  # torchao dequantizes each NF4 weight in full before its matmul (forward, recompute)
        dequant = _dequant_bytes(spec, st)
        if recomputing:  # the last layer's recompute reaches down_proj with gate, up, silu(gate), silu·up and
            # the mid-layer residual (a local of the layer's forward) alive
            # (tiled: the post-attention norm saved that residual, already counted)
            at = (mlp_moment(layers - 1) - mlp_event - mlp_dx + 4 * z.a * width * mlp_rows
                  + (0.0 if tiled else z.r * d * t) + dequant)
        else:
            at = total - sum(outside.values()) + outside["rope cos/sin"] + dequant
        events["NF4 dequantize"] = (at, grads(0.0))
    return events, saved, host, all_grads
