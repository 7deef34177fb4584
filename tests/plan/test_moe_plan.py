"""The planner's mixture-of-experts terms (plan/models.model_spec, plan/params.py): total parameters (every expert)
and the active ones a token multiplies through, and LoRA adapter counts, equal to the real models'."""

import json

import pytest

from longseq.config import TrainConfig
from longseq.config.hf import to_hf
from longseq.config.policy import LORA_TARGETS_ALL
from longseq.plan.hardware import find_gpu
from longseq.plan.models import get_model, model_spec
from longseq.plan.params import count_params, lora_params, routed_expert_params
from longseq.plan.setup import TrainSetup
from longseq.plan.training import plan_train
from longseq.train.lora import apply_lora
from tiny_models import random_model

MOE = dict(num_experts=8, experts_per_token=2, moe_intermediate_size=48)


@pytest.mark.parametrize("arch,extra", [("mixtral", dict(intermediate_size=48)), ("qwen3_moe", dict(qk_norm=True)),
                                        ("qwen3_moe", dict(qk_norm=True, tie_word_embeddings=True))])
@pytest.mark.parametrize("targets", [LORA_TARGETS_ALL, ("q_proj", "v_proj", "down_proj"), ("up_proj",)])
def test_total_active_and_adapter_parameters_match_the_model(arch, extra, targets):
    model = random_model(arch=arch, **MOE, **extra)
    spec = model_spec("tiny", model.config)
    counts = count_params(spec)
    assert counts.total == sum(p.numel() for p in model.parameters())
    d, k, width = model.config.hidden_size, MOE["experts_per_token"], MOE["moe_intermediate_size"]
    per_layer_attention = sum(p.numel() for n, p in model.named_parameters()
                              if "layers.0.self_attn" in n and n.endswith("proj.weight"))
    active = model.config.num_layers * (per_layer_attention + k * 3 * d * width) + model.config.vocab_size * d
    assert counts.matmul == active
    trainable = apply_lora(model, TrainConfig(method="lora", lora_rank=4, lora_targets=targets))
    assert lora_params(spec, 4, targets) == sum(p.numel() for n, p in model.named_parameters() if n in trainable)


def test_qwen2_moe_is_planned_approximately():
    cfg = random_model(arch="qwen2_moe", **MOE, shared_expert_intermediate_size=96).config
    spec = model_spec("tiny", cfg)
    assert (spec.num_experts, spec.experts_per_token) == (8 + 2, 2 + 2)  # the shared expert as 2 of width 48
    assert spec.routed_experts == 8  # what --ep splits: the shared expert stays whole on every GPU
    d, width, layers = cfg.hidden_size, MOE["moe_intermediate_size"], cfg.num_layers
    assert routed_expert_params(spec) == layers * 8 * 3 * d * width


def test_plan_train_reports_total_and_active_parameters(tmp_path):
    cfg = random_model(arch="qwen3_moe", **MOE, qk_norm=True).config
    (tmp_path / "config.json").write_text(json.dumps(to_hf(cfg)))
    spec = get_model(str(tmp_path / "config.json"))  # a Qwen3-MoE config.json plans (approximately)
    plan = plan_train(spec, find_gpu("H100"), TrainSetup(seq_len=1024, method="lora", lora_rank=4))
    counts = count_params(spec)
    assert plan.params == counts.total > plan.active_params == counts.matmul > 0
    assert plan.to_dict()["active_params"] == counts.matmul
