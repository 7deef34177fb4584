"""The planner's bytes for quantized serving (plan/quant.py, plan/serving.py): FP8 and int4 weights as longseq stores
them, an FP8 KV pool, int4 prefill's dequantized weight, and the engine's `--kv-pool plan` asking for the format of
the model it serves."""

import pytest
import torch

from longseq.plan.hardware import get_gpu
from longseq.plan.models import get_model
from longseq.plan.params import count_params
from longseq.plan.quant import get_format, int4_bytes_per_param, int8_bytes_per_param
from longseq.plan.serving import ServeSetup, engine_activation_bytes, kv_bytes_per_token, plan_serve, weight_bytes

LLAMA3_8B, H200 = get_model("llama-3-8b"), get_gpu("H200")


def test_weight_bytes_of_fp8_and_int4():
    counts = count_params(LLAMA3_8B)
    assert weight_bytes(LLAMA3_8B, "fp8") == counts.linear * 1.0 + counts.not_linear * 2.0
    # a 16-bit scale and zero per group: 0.5 + 4/G bytes a weight
    assert int4_bytes_per_param(128) == 0.53125 and int4_bytes_per_param(32) == 0.625
    assert get_format("int4").linear_bytes == get_format("int4-g128").linear_bytes
    assert weight_bytes(LLAMA3_8B, "int4-g32") > weight_bytes(LLAMA3_8B, "int4-g64") > weight_bytes(LLAMA3_8B, "int4")
    assert weight_bytes(LLAMA3_8B, "int4") < weight_bytes(LLAMA3_8B, "fp8") < weight_bytes(LLAMA3_8B, "bf16")


def test_int8_is_q8_0s_eight_and_a_half_bits():
    assert int8_bytes_per_param() * 8 == 8.5 and get_format("int8").linear_bytes == 8.5 / 8
    assert weight_bytes(LLAMA3_8B, "fp8") < weight_bytes(LLAMA3_8B, "int8") < weight_bytes(LLAMA3_8B, "bf16")


def test_fp8_kv_doubles_the_tokens_the_pool_holds():
    bf16 = plan_serve(LLAMA3_8B, H200, ServeSetup(context=131072))
    fp8 = plan_serve(LLAMA3_8B, H200, ServeSetup(context=131072, kv_dtype="fp8"))
    assert kv_bytes_per_token(LLAMA3_8B, 1) * 2 == kv_bytes_per_token(LLAMA3_8B, 2) == 131072  # 128 KiB a token
    assert fp8.kv_pool == bf16.kv_pool and fp8.kv_tokens == pytest.approx(2 * bf16.kv_tokens, abs=1)
    assert fp8.batch >= 2 * bf16.batch


def test_int4_prefill_holds_the_dequantized_gate_up_weight():
    plain = engine_activation_bytes(LLAMA3_8B, 2048, 256)
    gate_up = 2 * 14336 * 4096
    assert engine_activation_bytes(LLAMA3_8B, 2048, 256, quant="int4") == plain + 3 * gate_up
    assert engine_activation_bytes(LLAMA3_8B, 2048, 256, quant="int8") == plain + 2 * gate_up  # no unpacking
    assert engine_activation_bytes(LLAMA3_8B, 2048, 256, quant="fp8") == plain


def test_fp8_on_a_gpu_without_fp8_tensor_cores_is_noted():
    notes = plan_serve(LLAMA3_8B, get_gpu("A100"), ServeSetup(quant="fp8", context=8192)).notes
    assert any("no FP8 tensor cores" in n for n in notes)
    assert not any("FP8 tensor cores" in n for n in plan_serve(LLAMA3_8B, H200, ServeSetup(quant="fp8")).notes)


@pytest.mark.parametrize("method,fmt", [(None, "fp32"), ("fp8", "fp8"), ("int4", "int4-g32"), ("int8", "int8")])
def test_engine_plans_the_format_it_serves(method, fmt):
    from longseq.engine.model_runner import plan_format
    from longseq.models.quant import quantize_model
    from tiny_models import random_model

    model = random_model(0)
    if method:
        quantize_model(model, method, group_size=32)
    assert plan_format(model) == fmt
    assert model.lm_head.weight.dtype == torch.float32
