"""The --fit search, the serving plan and the training plan's time and cost."""

import pytest

from longseq.errors import LongseqError
from longseq.plan.fit import SearchSpace, fit_train, layouts
from longseq.plan.hardware import get_gpu
from longseq.plan.memory import train_memory
from longseq.plan.models import get_model
from longseq.plan.serving import ServeSetup, plan_serve, weight_bytes
from longseq.plan.setup import Parallelism, TrainSetup
from longseq.plan.training import plan_train

LLAMA3_8B, H100 = get_model("llama-3-8b"), get_gpu("H100")


def test_fit_returns_the_fastest_setup_that_fits():
    result = fit_train(LLAMA3_8B, H100, TrainSetup(method="lora", seq_len=32768))
    best = result.best
    assert best is not None and best.fits and result.fitting >= 1
    assert best.memory.total <= H100.memory_gib * 2**30
    # 32K on an H100: attention is the costliest recompute and its saved tensors (about 0.6 GiB a layer) still fit
    assert best.setup.recompute == "keep_attention"
    # plain recompute none at 32K does not fit: the search had to pick something else
    assert not plan_train(LLAMA3_8B, H100, TrainSetup(method="lora", seq_len=32768)).fits
    for other in result.runners_up:
        assert other.tokens_per_s <= best.tokens_per_s and other.fits


def test_fit_explains_what_to_change_when_nothing_fits():
    result = fit_train(LLAMA3_8B, get_gpu("RTX 4090"), TrainSetup(method="full", seq_len=4096),
                       SearchSpace(methods=("full",)))
    assert result.best is None
    text = result.explanation
    assert text.startswith("needs ") and "GiB per GPU" in text and "RTX 4090" in text
    assert "--method qlora" in text and "GPUs" in text


def test_fit_searches_layouts_for_several_gpus():
    assert {(p.tp, p.pp, p.sp) for p in layouts(LLAMA3_8B, 8, 1, 8192)} >= {(1, 1, 1), (8, 1, 1), (2, 2, 2)}
    assert all(p.tp <= 8 for p in layouts(LLAMA3_8B, 16, 2, 8192))
    result = fit_train(get_model("llama-3-70b"), H100, TrainSetup(method="full", seq_len=4096,
                                                                  parallel=Parallelism(dp=16, nodes=2)),
                       SearchSpace(methods=("full",), optimizers=("adamw",)))
    assert result.best is not None and result.best.setup.parallel.num_gpus == 16


def test_training_time_and_cost():
    plan = plan_train(LLAMA3_8B, H100, TrainSetup(method="lora", seq_len=4096, recompute="full"), tokens=1e9,
                      price=2.0)
    assert plan.time_s == pytest.approx(1e9 / plan.tokens_per_s)
    assert plan.gpu_hours == pytest.approx(plan.time_s / 3600)
    assert plan.cost_usd == pytest.approx(plan.gpu_hours * 2.0)
    assert 0.3 < plan.mfu < 0.6
    slower = plan_train(LLAMA3_8B, H100, TrainSetup(method="qlora", seq_len=4096, recompute="full"))
    assert slower.step_time_s > plan.step_time_s  # NF4 dequantization in every pass


def test_parallelism_divides_memory():
    one = train_memory(LLAMA3_8B, TrainSetup(method="lora", seq_len=8192, recompute="full"))
    tp = train_memory(LLAMA3_8B, TrainSetup(method="lora", seq_len=8192, recompute="full",
                                            parallel=Parallelism(tp=2)))
    assert tp.weights == pytest.approx(one.weights / 2)
    assert tp.activations == pytest.approx(one.activations / 2)
    offloaded = train_memory(LLAMA3_8B, TrainSetup(method="lora", seq_len=65536, recompute="offloaded"))
    full = train_memory(LLAMA3_8B, TrainSetup(method="lora", seq_len=65536, recompute="full"))
    assert offloaded.allocated < full.allocated - 10 * 2**30 and offloaded.host > 15 * 2**30
    tiled = train_memory(LLAMA3_8B, TrainSetup(method="lora", seq_len=65536, recompute="full", mlp_tile=8192))
    assert tiled.transient < full.transient


@pytest.mark.parametrize("bad,match", [
    (dict(parallel=Parallelism(tp=3)), "tensor parallel 3"),
    (dict(parallel=Parallelism(pp=5)), "pipeline parallel 5"),
    (dict(parallel=Parallelism(dp=2, offload="params", zero=2)), "ZeRO stage 3"),
    (dict(recompute="sometimes"), "recompute must be one of"),
    (dict(lora_targets=("c_attn",)), "lora targets"),
])
def test_impossible_setups_are_one_line_errors(bad, match):
    with pytest.raises(LongseqError, match=match):
        train_memory(LLAMA3_8B, TrainSetup(**bad))


def test_serving_capacity_and_speed():
    plan = plan_serve(LLAMA3_8B, H100, ServeSetup(context=8192, batch=32))
    assert plan.fits and plan.kv_per_token == 131072
    assert plan.kv_tokens == int(plan.kv_pool // plan.kv_per_token)
    assert plan.max_context_at_batch == plan.kv_tokens // 32
    read = plan.weights + 32 * 8192 * plan.kv_per_token
    assert plan.decode_tokens_per_s == pytest.approx(32 * H100.bandwidth_tbs * 1e12 / read)
    assert weight_bytes(LLAMA3_8B, "int4") < weight_bytes(LLAMA3_8B, "int8") < weight_bytes(LLAMA3_8B, "bf16")
    two = plan_serve(LLAMA3_8B, H100, ServeSetup(context=8192, batch=32, num_gpus=2))
    assert two.weights == pytest.approx(plan.weights / 2)
    too_big = plan_serve(get_model("llama-3-70b"), H100, ServeSetup(context=8192))
    assert not too_big.fits and "do not fit" in too_big.notes[0]
    with pytest.raises(LongseqError, match="must divide"):
        plan_serve(LLAMA3_8B, H100, ServeSetup(num_gpus=3))
