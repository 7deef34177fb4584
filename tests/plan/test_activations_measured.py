"""The planner's activation model against what longseq's training step keeps and peaks at, measured on CPU.

Same tiny models, same code path as the trainer and the H100 benchmark (bf16 autocast, chunked loss, LoRA /
QLoRA / full fine-tuning, recompute none / selective / full), so a change in longseq's model code that moves
memory shows up here first. The eager path (what CPU runs) for every case; the fused kernels (what GPUs run) for
a subset, under Triton's CPU interpreter (its bfloat16 values are wrong, its tensors' sizes are not).
"""

import pytest
import torch
from memtrack import build, parse_policy, peak_bytes, saved_bytes, transient_bytes

from longseq.config import ModelConfig
from longseq.models import fused as fused_ops
from longseq.plan.activations import NF4_DEQUANT_BYTES, activation_peak
from longseq.plan.activations import saved_bytes as predicted_saved
from longseq.plan.memory import TORCHAO_NF4_BYTES, nf4_quantize_bytes
from longseq.plan.models import ModelSpec
from longseq.plan.setup import TrainSetup

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QV = ("q_proj", "v_proj")
LLAMA = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=896, num_layers=3, num_heads=4, num_kv_heads=1)
QWEN3 = ModelConfig(arch="qwen3", vocab_size=640, hidden_size=192, intermediate_size=512, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=64, qk_norm=True, tie_word_embeddings=True)
QWEN2 = ModelConfig(arch="qwen2", vocab_size=640, hidden_size=256, intermediate_size=768, num_layers=2, num_heads=4,
                    num_kv_heads=4, qkv_bias=True)

CASES = [
    (LLAMA, "lora", "none", ALL), (LLAMA, "lora", "selective", ALL), (LLAMA, "lora", "full", ALL),
    (LLAMA, "lora", "keep_attention", ALL), (LLAMA, "full", "keep_attention", ALL),
    (QWEN3, "lora", "keep_attention", ALL),
    (LLAMA, "lora", "none", QV), (LLAMA, "lora", "selective", QV), (LLAMA, "lora", "full", QV),
    (LLAMA, "full", "none", ALL), (LLAMA, "full", "selective", ALL), (LLAMA, "full", "full", ALL),
    (QWEN3, "lora", "none", ALL), (QWEN3, "lora", "selective", ALL), (QWEN3, "lora", "full", ALL),
    (QWEN3, "full", "none", ALL), (QWEN3, "full", "full", ALL),
    (QWEN2, "lora", "none", ALL), (QWEN2, "lora", "full", ALL), (QWEN2, "full", "none", ALL),
    # the last layers plain (SwiGLU recomputed only), "+N" of them
    (LLAMA, "lora", "keep_attention+2", ALL), (LLAMA, "lora", "keep_attention+3", ALL), (LLAMA, "lora", "full+1", ALL),
    (LLAMA, "full", "keep_attention+1", ALL), (QWEN3, "lora", "keep_attention+1", ALL),
    # full's last layers under keep_attention, "^N" of them
    (LLAMA, "lora", "full^1", ALL), (LLAMA, "lora", "full^2", ALL), (LLAMA, "full", "full^2", ALL),
]
SHAPES = [(1, 512, 1024, False), (2, 384, 256, True)]  # batch, seq, loss chunk, trainer keeps `hidden`


def _id(case):
    cfg, method, policy, targets = case
    return f"{cfg.arch}-{method}-{policy}-{len(targets)}"


FUSED_CASES = [
    (LLAMA, "lora", "none", ALL), (LLAMA, "lora", "selective", ALL), (LLAMA, "lora", "full", ALL),
    (LLAMA, "lora", "keep_attention", ALL), (LLAMA, "full", "none", ALL), (QWEN3, "lora", "none", ALL),
    (QWEN3, "full", "full", ALL), (LLAMA, "lora", "keep_attention+2", ALL), (LLAMA, "lora", "full^2", ALL),
]


def _setup(method, policy, targets, batch, seq, chunk, keep, fused=False):
    policy, plain, kept = parse_policy(policy)
    return TrainSetup(method=method, recompute=policy, batch_size=batch, seq_len=seq, lora_targets=targets,
                      loss_chunk=chunk, keep_hidden=keep, fused=fused, plain_layers=plain, attention_layers=kept)


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"b{s[0]}s{s[1]}c{s[2]}")
def test_saved_and_peak_bytes_match_longseq(case, shape):
    _check_saved_and_peak(case, shape, fused=False)


@pytest.mark.parametrize("case", FUSED_CASES, ids=_id)
def test_saved_and_peak_bytes_match_longseq_fused_kernels(case, monkeypatch):
    monkeypatch.setattr(fused_ops, "MODE", "1")
    _check_saved_and_peak(case, SHAPES[1], fused=True)


def _check_saved_and_peak(case, shape, fused):
    cfg, method, policy, targets = case
    batch, seq, chunk, keep = shape
    model = build(cfg, method, policy, targets)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    spec, st = ModelSpec("tiny", cfg), _setup(method, policy, targets, batch, seq, chunk, keep, fused)

    measured = saved_bytes(model, ids, chunk)
    predicted = sum(predicted_saved(spec, st).values())
    assert predicted == pytest.approx(measured, rel=0.01), (predicted, measured)

    model.zero_grad(set_to_none=True)
    peak = peak_bytes(model, ids, chunk, keep)
    if fused:  # a process's first fused selective step peaks ~1 S×I lower (interpreter warm-up); measure warm
        model.zero_grad(set_to_none=True)
        peak = peak_bytes(model, ids, chunk, keep)
    plan = activation_peak(spec, st, kernel_workspace=not fused)  # fused: as the CPU tracker sees the kernels
    if "+" in policy or "^" in policy:  # layers of two policies: composed from two models' moments, mostly above
        high = 1.04 if "+" in policy else 1.05  # "^": at 3 layers, the lone full layer's moment is the widest
        assert 0.98 * peak <= plan.peak + plan.grads <= high * peak, (plan.phase, plan.peak + plan.grads, peak)
    else:
        assert plan.peak + plan.grads == pytest.approx(peak, rel=0.03), (plan.phase, plan.peak + plan.grads, peak)


@pytest.mark.parametrize("policy", ["none", "full"])
def test_qlora_saved_and_peak(policy):
    pytest.importorskip("torchao")
    model = build(LLAMA, "qlora", policy, ALL)
    ids = torch.randint(0, LLAMA.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    spec, st = ModelSpec("tiny", LLAMA), _setup("qlora", policy, ALL, 1, 512, 1024, False)
    assert sum(predicted_saved(spec, st).values()) == pytest.approx(saved_bytes(model, ids, 1024), rel=0.01)
    model.zero_grad(set_to_none=True)
    plan = activation_peak(spec, st)
    assert plan.peak + plan.grads == pytest.approx(peak_bytes(model, ids, 1024, False), rel=0.05)


def test_nf4_storage_and_transients_match_torchao():
    """NF4 bytes per weight, and the transient bytes of quantizing and dequantizing one weight, as torchao does."""
    pytest.importorskip("torchao")
    from longseq.train.lora import to_nf4_weight

    for shape in ((256, 896), (2048, 1024)):
        weight = torch.randn(*shape, dtype=torch.bfloat16)
        peak, alive = transient_bytes(to_nf4_weight, weight, skip={weight.untyped_storage().data_ptr()})
        assert alive / weight.numel() == pytest.approx(TORCHAO_NF4_BYTES, rel=0.002)
        assert peak == pytest.approx(nf4_quantize_bytes(weight.numel()), rel=0.02)
    nf4 = to_nf4_weight(weight)
    parts = {getattr(nf4, name).untyped_storage().data_ptr() for name in
             ("quantized_scalers", "quantization_factor", "scaler_mean", "quantized_data", "nf4")}
    peak, _ = transient_bytes(lambda w: w.to(torch.bfloat16), nf4, skip=parts)
    assert peak / weight.numel() == pytest.approx(NF4_DEQUANT_BYTES, rel=0.05)
