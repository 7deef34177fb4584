"""The planner's model of longseq's multi-GPU training: Ulysses and ring attention divide activations by their
degrees (Ulysses except the whole-sequence document mask; only Ulysses is bounded by the KV heads), FSDP2 shards
over data × sequence parallel ranks, loads the whole model first, and offloads weights, gradients and optimizer
state; a TrainConfig maps onto a Parallelism."""

import pytest

from longseq.config import ModelConfig, TrainConfig
from longseq.errors import LongseqError
from longseq.plan.activations import activation_peak
from longseq.plan.hardware import get_gpu
from longseq.plan.memory import _state_bytes, train_memory
from longseq.plan.models import ModelSpec, get_model
from longseq.plan.params import count_params
from longseq.plan.setup import Parallelism, TrainSetup, parallelism_for
from longseq.plan.training import plan_train

SPEC = ModelSpec("tiny", ModelConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=4,
                                     num_heads=8, num_kv_heads=4))


def test_ulysses_and_ring_divide_saved_activations():
    # fp32 LoRA: no per-layer constants (weight casts), so everything saved is per token
    base = dict(method="lora", precision="fp32", seq_len=4096, recompute="none")
    one = activation_peak(SPEC, TrainSetup(**base)).saved
    for sp, cp in ((2, 1), (4, 1), (1, 2), (1, 8), (2, 4)):
        saved = activation_peak(SPEC, TrainSetup(**base, parallel=Parallelism(sp=sp, cp=cp))).saved
        assert saved * sp * cp == pytest.approx(one)


def test_ulysses_keeps_the_whole_document_mask():
    s, layers = 4096, SPEC.config.num_layers

    def mask_and_kv(sp):  # packed minus plain: the (S, S) mask and k/v expanded to every query head
        parallel = Parallelism(sp=sp)
        packed = activation_peak(SPEC, TrainSetup(method="lora", precision="fp32", seq_len=s, parallel=parallel,
                                                  packed=True)).saved
        return packed - activation_peak(SPEC, TrainSetup(method="lora", precision="fp32", seq_len=s,
                                                         parallel=parallel)).saved

    expanded = 2 * 4 * (SPEC.q_dim - SPEC.kv_dim)  # bytes per token
    for sp in (1, 2, 4):
        assert mask_and_kv(sp) == pytest.approx(layers * (s * s + s / sp * expanded))


def test_fsdp_shards_over_data_and_sequence_ranks():
    psi = count_params(SPEC).total
    for dp, sp in ((8, 1), (4, 2), (1, 8)):
        setup = TrainSetup(method="full", parallel=Parallelism(dp=dp, sp=sp, zero=3))
        weights, grads, opt, host, _ = _state_bytes(SPEC, setup)
        assert (weights, grads, opt, host) == pytest.approx((4 * psi / 8, 4 * psi / 8, 8 * psi / 8, 0))
    memory = train_memory(SPEC, TrainSetup(method="full", parallel=Parallelism(dp=4, sp=2, zero=3)))
    assert memory.load_peak == pytest.approx(4 * psi)  # fp32 weights loaded whole before fully_shard
    ddp = train_memory(SPEC, TrainSetup(method="full", parallel=Parallelism(dp=8)))
    assert ddp.weights == pytest.approx(4 * psi) and ddp.load_peak == 0


def test_fsdp_offload_keeps_only_gathered_layers_on_the_gpu():
    setup = TrainSetup(method="full", parallel=Parallelism(dp=8, zero=3, offload="params"))
    weights, grads, opt, host, notes = _state_bytes(SPEC, setup)
    psi = count_params(SPEC).total
    assert (weights, grads, opt) == (0, 0, 0) and host == pytest.approx(16 * psi / 8)
    assert any("CPUOffloadPolicy" in n for n in notes)


def test_train_config_maps_onto_parallelism():
    cfg = TrainConfig(parallel="fsdp", fsdp_offload=True, sp=2, seq_len=64)
    assert parallelism_for(cfg, 8) == Parallelism(dp=4, sp=2, zero=3, offload="params")
    assert parallelism_for(TrainConfig(parallel="ddp"), 4) == Parallelism(dp=4)
    cfg = TrainConfig(parallel="fsdp", cp=2, sp=2, seq_len=64)
    assert parallelism_for(cfg, 8) == Parallelism(dp=2, cp=2, sp=2, zero=3)
    assert parallelism_for(TrainConfig(tp=2, seq_len=64), 8) == Parallelism(dp=4, tp=2)
    assert parallelism_for(TrainConfig(pp=4, grad_accum=4), 4) == Parallelism(pp=4)
    assert parallelism_for(TrainConfig(parallel="ddp", ep=2), 4) == Parallelism(dp=4, ep=2)


def test_ulysses_degree_must_divide_kv_heads():
    spec = get_model("llama-3-8b")  # 8 KV heads
    plan_train(spec, get_gpu("H100"), TrainSetup(seq_len=8192, parallel=Parallelism(sp=8)))
    with pytest.raises(LongseqError, match="8 KV heads"):
        plan_train(spec, get_gpu("H100"), TrainSetup(seq_len=8192, parallel=Parallelism(sp=16)))
    plan_train(spec, get_gpu("H100"), TrainSetup(seq_len=8192, parallel=Parallelism(sp=8, cp=2)))  # ring: no limit
