"""FLOPs of training and inference, and the time they take on a GPU."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Fractions of dense peak that longseq's eager PyTorch step sustains, fitted (relative least squares) to the five
# H100 LoRA runs in benchmarks/results/2026-11-24-train-lora-h100 (Llama-3-8B shape, full recompute, 4K-64K
# tokens): matmul work (linears, LM head, elementwise overhead folded in) and FlashAttention work. Step-time error
# of the fit: within 1.6% on all five runs. Other GPUs and stacks: pass --efficiency.
MATMUL_EFFICIENCY = 0.384
ATTENTION_EFFICIENCY = 0.581
# Host time per decoder layer per pass of longseq's eager step: Python and kernel launches for the norms, RoPE,
# SwiGLU, LoRA adds, ... (passes: forward 1, backward 2, a recompute 1 more). The CPU issues kernels while the GPU
# runs earlier ones, so this does not add to the GPU time: a step takes about hypot(GPU time, launch time)
# (`overlapped_s`), the GPU time where kernels are long (8B), the launch time where they are short (0.5B-1.7B).
# Fitted with the two efficiencies above held fixed: relative least squares over the 25 measured training rows of
# benchmarks/results/2026-11-24-plan-validation-h100/validation.json and the five calibration runs, on a 0.05 ms
# grid, keeping every Llama-3-8B full-recompute row (validation rows 0-2, the calibration runs) within 5%: 1.45 ms
# (unconstrained, 1.70 ms puts the 4K calibration run at +6.8%); 1.40 ms leaves room for run-to-run noise (that 4K
# step measured 0.531 s and 0.550 s in two runs). |Error| over the 30 rows: median 44% -> 8%, max 78% -> 46%.
# What is left is GPU time the FLOP model misses in small models at long sequences, mostly with LoRA (-30% to -46%:
# elementwise work, ∝ tokens·(d + I), that MATMUL_EFFICIENCY absorbs at the 8B width).
LAYER_PASS_LAUNCH_S = 1.40e-3
LAYER_PASSES = {"none": 3, "selective": 4, "keep_attention": 4, "full": 4, "offloaded": 4}
FA_BACKWARD_RATIO = 2.5  # FlashAttention-2 backward does 2.5x the forward's matmul FLOPs (Dao 2023, §3.1)
CHINCHILLA_TOKENS_PER_PARAM = 20.0  # compute-optimal tokens ≈ 20 N (Hoffmann et al. 2022, arXiv 2203.15556)


def train_flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Model FLOPs per trained token: 6N for the matmuls (Kaplan et al. 2020) plus 12 * L * d * S for attention
    scores and values (PaLM, Chowdhery et al. 2022, appendix B, which counts the full, not causally halved,
    score matrix). Recompute is not counted (model, not hardware, FLOPs), so MFU is comparable across policies."""
    return 6.0 * num_params + 12.0 * num_layers * hidden_size * seq_len


def forward_flops_per_token(num_params: int, num_layers: int, attn_dim: int, keys: float) -> float:
    """Inference FLOPs per token: 2N (Kaplan et al. 2020) + attention 4·L·d_attn·keys for a query that sees `keys`
    keys (QKᵀ and AV, 2 FLOPs a multiply-add; a causal prefill of S tokens averages S/2 keys)."""
    return 2.0 * num_params + 4.0 * num_layers * attn_dim * keys


@dataclass(frozen=True)
class StepFlops:
    """Hardware FLOPs of one training token, split by the kernel kind that runs them."""

    matmul: float  # linears and LM head: forward, recompute, input and weight gradients
    attention: float  # causal FlashAttention: forward, recompute, backward

    @property
    def total(self) -> float:
        return self.matmul + self.attention


def step_flops_per_token(matmul_params: int, layer_matmul_params: int, adapter_params: int, num_layers: int,
                         attn_dim: int, seq_len: int, *, trains_base: bool, recompute: str,
                         window: int | None = None) -> StepFlops:
    """Hardware FLOPs per token of longseq's training step (what the GPU executes, recompute included).

    Forward 2N; backward 2N for input gradients plus 2N for weight gradients when the base trains (frozen LoRA
    bases skip it: 4N not 6N); full recompute repeats the layers' forward (+2 N_layers, so 8N full / 6N LoRA);
    the chunked loss always recomputes the LM head (counted in N's forward). Adapters: 8 FLOPs a parameter with
    recompute, 6 without. Attention, causal: forward 2·L·d_attn·S̄ with S̄ the mean keys a query sees (S/2, or the
    sliding window), backward FA_BACKWARD_RATIO × forward, recompute (full or selective, not keep_attention) one more
    forward; keep_attention recomputes the layers' matmuls as full does. With a frozen base that is an upper
    bound: a recompute skips the matmuls whose outputs no backward reads (models/recompute.py: q/k/v and down
    under keep_attention, down under full), and plain layers recompute none."""
    head = matmul_params - num_layers * layer_matmul_params  # the LM head (and anything outside the layers)
    recomputes = recompute in ("full", "offloaded", "keep_attention")
    mm = 2.0 * matmul_params + 2.0 * matmul_params + (2.0 * matmul_params if trains_base else 0.0)
    mm += 2.0 * head  # chunked loss: the LM head forward runs again in backward
    if recomputes:
        mm += 2.0 * num_layers * layer_matmul_params
    mm += (8.0 if recomputes else 6.0) * adapter_params
    keys = seq_len / 2 if window is None else min(seq_len / 2, window)
    fwd = 4.0 * num_layers * attn_dim * keys  # QKᵀ and AV, 2 FLOPs per multiply-add
    attn = fwd * (1 + FA_BACKWARD_RATIO + (recompute not in ("none", "keep_attention")))
    return StepFlops(matmul=mm, attention=attn)


def step_time_s(flops: StepFlops, tokens: float, peak_tflops: float, efficiency: float | None = None) -> float:
    """Seconds for `tokens` tokens on one GPU: each kind of work at its measured sustained fraction of peak, or,
    with `efficiency`, all executed FLOPs (recompute included) at that one fraction."""
    peak = peak_tflops * 1e12
    if efficiency is not None:
        return tokens * flops.total / (peak * efficiency)
    return tokens * (flops.matmul / MATMUL_EFFICIENCY + flops.attention / ATTENTION_EFFICIENCY) / peak


def launch_time_s(num_layers: int, recompute: str) -> float:
    """Host (Python + kernel launch) time of one micro-step's decoder layers on one GPU."""
    return LAYER_PASS_LAUNCH_S * num_layers * LAYER_PASSES[recompute]


def overlapped_s(gpu_s: float, launch_s: float) -> float:
    """A step whose kernels take `gpu_s` on the GPU and `launch_s` to issue from the host, which overlap: the
    smooth maximum sqrt(gpu² + launch²) fitted above (the overlap is partial: the step's host syncs, such as
    reading the loss, drain the queue)."""
    return math.hypot(gpu_s, launch_s)


def training_time_s(total_flops: float, peak_tflops: float, num_gpus: int, mfu: float = 1.0) -> float:
    """Wall time of `total_flops` on `num_gpus` GPUs at a model-FLOPs utilization: FLOPs / (n · peak · MFU)."""
    return total_flops / (num_gpus * peak_tflops * 1e12 * mfu)


def chinchilla_tokens(num_params: float) -> float:
    """Compute-optimal pre-training tokens for a model size: D ≈ 20 N (Hoffmann et al. 2022, table 3)."""
    return CHINCHILLA_TOKENS_PER_PARAM * num_params
