"""Closed-form checks of the planner: parameter counts, KV bytes, FLOPs and time, QLoRA bytes, ZeRO, hardware."""

import json

import pytest

from longseq.config import ModelConfig
from longseq.config.hf import to_hf
from longseq.errors import LongseqError
from longseq.plan.activations import korthikanti_layer_bytes
from longseq.plan.flops import (
    chinchilla_tokens,
    step_flops_per_token,
    train_flops_per_token,
    training_time_s,
)
from longseq.plan.hardware import GPUS, find_gpu, get_gpu
from longseq.plan.memory import _state_bytes, optimizer_bytes, train_memory
from longseq.plan.models import PRESETS, ModelSpec, get_model
from longseq.plan.params import count_params, lora_params
from longseq.plan.quant import nf4_bytes_per_param
from longseq.plan.serving import kv_bytes_per_token
from longseq.plan.setup import Parallelism, TrainSetup

LLAMA3_8B = get_model("llama-3-8b")


def test_llama3_8b_params():
    counts = count_params(LLAMA3_8B)
    assert counts.total == 8_030_261_248
    assert counts.matmul == 7_504_658_432  # linears + LM head: the N of 6N
    assert lora_params(LLAMA3_8B, 16, tuple(LORA_ALL)) == 41_943_040  # the benchmark's `trainable`


LORA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("name,billions", [
    ("Llama-3-70B", 70.55), ("Llama-3.1-405B", 405.85), ("Qwen2.5-0.5B", 0.494), ("Qwen2.5-7B", 7.616),
    ("Qwen2.5-72B", 72.71), ("Qwen3-0.6B", 0.596), ("Qwen3-8B", 8.191), ("Mistral-7B", 7.242),
    ("Mixtral-8x7B", 46.70), ("SmolLM2-135M", 0.1345), ("TinyLlama-1.1B", 1.100), ("GPT-3-175B", 174.6),
])
def test_preset_param_counts_match_published(name, billions):
    assert count_params(PRESETS[name]).total / 1e9 == pytest.approx(billions, rel=0.002)


def test_matmul_params_agree_with_the_trainer():
    from longseq.train.metrics import matmul_params

    for spec in PRESETS.values():
        if spec.mlp == "swiglu" and not spec.is_moe:
            assert count_params(spec).matmul == matmul_params(spec.config)


def test_model_lookup_by_alias_and_file(tmp_path):
    assert get_model("Meta-Llama-3-8B-Instruct") is LLAMA3_8B
    assert get_model("qwen2.5-7b").config.vocab_size == 152064
    cfg = LLAMA3_8B.config
    (tmp_path / "config.json").write_text(json.dumps(to_hf(cfg)))
    from_dir = get_model(str(tmp_path))
    assert count_params(from_dir).total == count_params(LLAMA3_8B).total
    mixtral = {**to_hf(PRESETS["Mixtral-8x7B"].config), "model_type": "mixtral", "num_local_experts": 8,
               "num_experts_per_tok": 2}
    (tmp_path / "mixtral.json").write_text(json.dumps(mixtral))
    moe = get_model(str(tmp_path / "mixtral.json"))
    assert (moe.num_experts, moe.experts_per_token) == (8, 2)
    assert count_params(moe).total == count_params(PRESETS["Mixtral-8x7B"]).total
    with pytest.raises(LongseqError, match="known: Llama-3-8B"):
        get_model("llama-9b")
    with pytest.raises(LongseqError, match="no such file"):
        get_model(str(tmp_path / "missing.json"))


def test_kv_bytes_per_token():
    assert kv_bytes_per_token(LLAMA3_8B, 2) == 131072  # 2 · 32 layers · 8 KV heads · 128 · 2 bytes
    assert kv_bytes_per_token(LLAMA3_8B, 1) == 65536
    assert kv_bytes_per_token(PRESETS["GPT-3-175B"], 2) == 2 * 96 * 12288 * 2  # MHA: every head cached


def test_gpt3_seed_note_82b_on_1024_a100s():
    """82B parameters, 150B tokens, 1024 A100s at peak: 6ND / (n · 312 TFLOP/s) is at least 2.67 days."""
    days = training_time_s(6 * 82e9 * 150e9, GPUS["A100"].bf16_tflops, 1024, mfu=1.0) / 86400
    assert days == pytest.approx(2.67, abs=0.005)


def test_flops():
    # PaLM appendix B: 6N + 12·L·d·S
    assert train_flops_per_token(7.5e9, 32, 4096, 8192) == 6 * 7.5e9 + 12 * 32 * 4096 * 8192
    n, layer = count_params(LLAMA3_8B).matmul, 218_103_808
    no_attn = dict(num_layers=32, attn_dim=4096, seq_len=2, window=None)
    full = step_flops_per_token(n, layer, 0, trains_base=True, recompute="full", **no_attn)
    none = step_flops_per_token(n, layer, 0, trains_base=True, recompute="none", **no_attn)
    lora = step_flops_per_token(n, layer, 0, trains_base=False, recompute="full", **no_attn)
    head = n - 32 * layer
    assert full.matmul == pytest.approx(8 * n)  # 8N with full recompute (hardware FLOPs)
    assert none.matmul == pytest.approx(6 * n + 2 * head)  # + the chunked loss's LM-head recompute
    assert lora.matmul == pytest.approx(6 * n)  # frozen base: no weight gradients
    assert chinchilla_tokens(70e9) == pytest.approx(1.4e12)  # Chinchilla: 70B on 1.4T tokens


def test_korthikanti_equation_1():
    s, b, h, a = 2048, 1, 12288, 96  # GPT-3 175B layer: 34 sbh + 5 a s² b
    assert korthikanti_layer_bytes(s, b, h, a) == pytest.approx(34 * s * b * h + 5 * a * s * s * b)
    assert korthikanti_layer_bytes(s, b, h, a, tp=8, sp=True) == pytest.approx((34 * s * b * h + 5 * a * s * s * b)
                                                                              / 8)


def test_qlora_nf4_bytes():
    # Dettmers et al. 2023: 8-bit scales per 64 weights + fp32 per 256 scales = 0.127 bits/param over 4 bits
    overhead_bits = (nf4_bytes_per_param() - 0.5) * 8
    assert overhead_bits == pytest.approx(0.127, abs=0.0005)
    plain = train_memory(LLAMA3_8B, TrainSetup(method="lora", seq_len=256))
    q = train_memory(LLAMA3_8B, TrainSetup(method="qlora", seq_len=256))
    counts = count_params(LLAMA3_8B)
    assert plain.weights - q.weights == pytest.approx(counts.linear * (2 - nf4_bytes_per_param(64, 256, 2)))
    assert q.load_peak > 2 * counts.total  # longseq loads the bf16 checkpoint before quantizing


def test_zero_partitioning_follows_the_paper():
    """ZeRO fig. 1 with K = 12: 2Ψ + 2Ψ + KΨ/Nd, 2Ψ + (2+K)Ψ/Nd, (2+2+K)Ψ/Nd."""
    psi, nd = count_params(LLAMA3_8B).total, 64
    for stage, expected in ((1, 4 * psi + 12 * psi / nd), (2, 2 * psi + 14 * psi / nd), (3, 16 * psi / nd)):
        setup = TrainSetup(method="full", parallel=Parallelism(dp=nd, zero=stage, nodes=8))
        weights, grads, opt, _, _ = _state_bytes(LLAMA3_8B, setup)
        assert weights + grads + opt == pytest.approx(expected)
    single = TrainSetup(method="full")
    weights, grads, opt, _, _ = _state_bytes(LLAMA3_8B, single)
    assert weights + grads + opt == pytest.approx(16 * psi)  # longseq: fp32 weights + fp32 grads + AdamW m, v
    adam8 = optimizer_bytes(LLAMA3_8B, TrainSetup(optimizer="adamw8bit"), 1000)
    assert adam8 == pytest.approx(2 * (1 + 4 / 256) * 1000)
    tp = _state_bytes(LLAMA3_8B, TrainSetup(method="full", parallel=Parallelism(tp=4, pp=2)))
    assert tp[0] == pytest.approx(4 * psi / 8)


def test_adafactor_is_factored():
    tiny = ModelSpec("tiny", ModelConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2,
                                         num_heads=4, num_kv_heads=2))
    setup = TrainSetup(method="lora", optimizer="adafactor", lora_rank=8, lora_targets=("q_proj",))
    # per layer: A (8 x 64): rows + cols = 72; B (64 x 8): 72 -> 2 layers x 144 x 4 bytes
    assert optimizer_bytes(tiny, setup, 0) == 2 * 144 * 4


def test_hardware_table():
    assert find_gpu("NVIDIA H100 80GB HBM3") is GPUS["H100"]
    assert find_gpu("NVIDIA A100-SXM4-40GB") is GPUS["A100-40GB"]
    assert find_gpu("NVIDIA A100 80GB PCIe") is GPUS["A100"]
    assert find_gpu("NVIDIA GeForce RTX 4090") is GPUS["RTX 4090"]
    assert find_gpu("Tesla V100-SXM2-32GB") is GPUS["V100"]
    assert find_gpu("NVIDIA B200") is None
    assert get_gpu("h100") is GPUS["H100"] and get_gpu("rtx4090") is GPUS["RTX 4090"]
    assert get_gpu("a100-40gb") is GPUS["A100-40GB"]
    assert GPUS["V100"].peak_tflops("bf16") == GPUS["V100"].fp16_tflops  # no bf16 tensor cores
    for gpu in GPUS.values():
        assert gpu.memory_gib > 0 and gpu.fp16_tflops > 0 and gpu.bandwidth_tbs > 0 and gpu.price_per_hour > 0
    with pytest.raises(LongseqError, match="known: V100"):
        get_gpu("TPU v5")


def test_model_from_the_default_gguf():
    from longseq.errors import LongseqError as Missing
    from longseq.models.loader import default_model_path

    try:
        path = default_model_path()
    except Missing:
        pytest.skip("the default model package is not installed")
    spec = get_model(str(path))
    assert spec.config.tie_word_embeddings  # no output.weight tensor in the file
    assert count_params(spec).total == count_params(PRESETS["SmolLM2-135M"]).total
