"""The planner counts multi-LoRA serving's adapter pool (plan/lora.py): its bytes match the engine's pool on a tiny
model, and `plan serve --max-loras` takes them from the KV pool."""

import pytest

from longseq.errors import LongseqError
from longseq.plan.hardware import get_gpu
from longseq.plan.lora import lora_pool_bytes, rank_elements_per_layer
from longseq.plan.models import ModelSpec, get_model
from longseq.plan.serving import ServeSetup, plan_serve

LLAMA3_8B, H200 = get_model("llama-3-8b"), get_gpu("H200")


def test_llama3_8b_slot_sizes():
    # q, k, v, o: (4096 + 4096) + 2 (4096 + 1024) + (4096 + 4096); gate, up, down: 3 (4096 + 14336)
    assert rank_elements_per_layer(LLAMA3_8B, 0) == 81_920
    assert lora_pool_bytes(LLAMA3_8B, 1, 16) == 16 * 81_920 * 32 * 2  # 84 MB a rank-16 slot in bf16
    assert lora_pool_bytes(get_model("mixtral-8x7b"), 1, 16) < lora_pool_bytes(get_model("llama-3-8b"), 1, 16)


def test_the_plan_equals_the_engines_pool():
    from longseq.engine.lora import LoRAPool
    from tiny_models import random_model

    model = random_model(0)
    model.fuse_projections()
    pool = LoRAPool(model, 3, 8)
    assert pool.nbytes == lora_pool_bytes(ModelSpec("tiny", model.config), 3, 8, model.lm_head.weight.element_size())


def test_plan_serve_counts_the_pool_against_the_kv_cache():
    plain = plan_serve(LLAMA3_8B, H200, ServeSetup(context=512))
    lora = plan_serve(LLAMA3_8B, H200, ServeSetup(context=512, max_loras=64, max_lora_rank=16))
    assert lora.lora_pool == lora_pool_bytes(LLAMA3_8B, 64, 16)
    assert plain.kv_pool - lora.kv_pool == pytest.approx(lora.lora_pool)
    assert lora.to_dict()["memory_gib"]["lora_pool"] == pytest.approx(lora.lora_pool / 2**30)
    assert any("LoRA pool: 64 adapter slots" in n for n in lora.notes)
    with pytest.raises(LongseqError, match="max-lora-rank"):
        plan_serve(LLAMA3_8B, H200, ServeSetup(max_loras=4, max_lora_rank=128))
