"""Expert parallelism in the planner (`longseq plan train --ep`, train/parallel/experts.py): the routed experts'
weights, gradients, optimizer states and adapters divided by ep, the rest unchanged; the all-to-all exchange in
memory and step time; ep 1 as before; the trainer's refusals as one-line errors."""

import json

import pytest

from longseq.cli import main
from longseq.plan.hardware import get_gpu
from longseq.plan.memory import exchange_bytes, train_memory
from longseq.plan.models import get_model
from longseq.plan.params import count_params, lora_expert_params, lora_params, routed_expert_params
from longseq.plan.setup import Parallelism, TrainSetup
from longseq.plan.training import _link_gbs, _ring_allreduce_s, plan_train

MIXTRAL = get_model("mixtral")
H200 = get_gpu("H200")


def _setup(method: str, ep: int, dp: int = 4, **kw) -> TrainSetup:
    # grad_accum 2: every gradient is alive at the peak (memory.gradients is all of this GPU's)
    base = dict(method=method, seq_len=2048, grad_accum=2, recompute="full")
    return TrainSetup(**{**base, **kw}, parallel=Parallelism(dp=dp, ep=ep))


def test_routed_expert_params_are_the_mlp_without_the_router():
    cfg, counts = MIXTRAL.config, count_params(MIXTRAL)
    assert routed_expert_params(MIXTRAL) == cfg.num_layers * 8 * 3 * cfg.hidden_size * cfg.intermediate_size
    assert counts.mlp - routed_expert_params(MIXTRAL) == cfg.num_layers * cfg.hidden_size * 8  # the router
    assert routed_expert_params(get_model("llama-3-8b")) == 0


def test_ep_halves_the_full_fine_tuning_experts_only():
    experts, total = routed_expert_params(MIXTRAL), count_params(MIXTRAL).total
    one, two = (train_memory(MIXTRAL, _setup("full", ep)) for ep in (1, 2))
    # fp32 weights and gradients, AdamW's fp32 m and v (memory.py): attention, embeddings, norms, router stay whole
    assert one.weights == 4.0 * total and one.gradients == 4.0 * total and one.optimizer == 8.0 * total
    assert two.weights == pytest.approx(4.0 * (total - experts) + 4.0 * experts / 2, rel=1e-12)
    assert two.gradients == pytest.approx(4.0 * (total - experts) + 4.0 * experts / 2, rel=1e-12)
    assert two.optimizer == pytest.approx(8.0 * (total - experts) + 8.0 * experts / 2, rel=1e-12)
    assert two.trainable == one.trainable == total  # the whole model's, as reported
    assert one.load_peak == 0.0 and two.load_peak == one.weights  # loaded whole before the split
    # Adafactor: each expert matrix's factored second moment (rows + cols) goes with its expert
    cfg = MIXTRAL.config
    factored = cfg.num_layers * 8 * 3 * (cfg.hidden_size + cfg.intermediate_size)
    one, two = (train_memory(MIXTRAL, _setup("full", ep, optimizer="adafactor")) for ep in (1, 2))
    assert one.optimizer - two.optimizer == pytest.approx(4.0 * factored / 2, rel=1e-9)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "sgd"])
def test_ep_halves_the_expert_adapters_and_frozen_experts(optimizer):
    experts, total = routed_expert_params(MIXTRAL), count_params(MIXTRAL).total
    targets = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
    adapters, expert_adapters = lora_params(MIXTRAL, 16, targets), lora_expert_params(MIXTRAL, 16, targets)
    assert 0 < expert_adapters < adapters
    one, two = (train_memory(MIXTRAL, _setup("lora", ep, optimizer=optimizer, lora_targets=targets))
                for ep in (1, 2))
    assert two.weights == pytest.approx(2.0 * (total - experts / 2) + 4.0 * (adapters - expert_adapters / 2),
                                        rel=1e-12)
    assert two.gradients == pytest.approx(4.0 * (adapters - expert_adapters / 2), rel=1e-12)
    assert two.optimizer == pytest.approx(one.optimizer * (adapters - expert_adapters / 2) / adapters, rel=1e-12)
    attention_only = ("q_proj", "v_proj")  # adapters outside the experts: unchanged by ep
    a1, a2 = (train_memory(MIXTRAL, _setup("lora", ep, lora_targets=attention_only)) for ep in (1, 2))
    assert (a2.gradients, a2.optimizer) == (a1.gradients, a1.optimizer)


def test_ep_adds_the_exchange_buffers_as_transient():
    one, two = (train_memory(MIXTRAL, _setup("lora", ep)) for ep in (1, 2))
    tokens = 2048  # one sequence of 2048 per GPU: top-2 bf16 rows of d, a send and a receive buffer
    assert exchange_bytes(MIXTRAL, _setup("lora", 2)) == 2 * 2 * tokens * 2 * MIXTRAL.config.hidden_size
    assert two.activation.phase == one.activation.phase
    assert two.transient == pytest.approx(one.transient + exchange_bytes(MIXTRAL, _setup("lora", 2)), rel=1e-12)
    assert two.activations == one.activations  # balanced routing: as many expert rows per GPU


def test_ep_one_is_the_plan_without_it():
    # ep 1 leaves no trace: the same memory, time and JSON as a layout that never names it (dense and MoE)
    for spec in (MIXTRAL, get_model("llama-3-8b")):
        for method in ("full", "lora", "qlora"):
            setup = TrainSetup(method=method, seq_len=4096, recompute="full", parallel=Parallelism(dp=4))
            plan = plan_train(spec, H200, setup)
            again = plan_train(spec, H200, TrainSetup(method=method, seq_len=4096, recompute="full",
                                                      parallel=Parallelism(dp=4, ep=1)))
            assert plan.to_dict() == again.to_dict()
    full = plan_train(MIXTRAL, H200, _setup("full", 1, seq_len=512))  # DDP: one all-reduce of every fp32 gradient
    dp_comm = _ring_allreduce_s(4.0 * full.trainable, 4, _link_gbs(H200, 4, 4))
    assert full.comm_s == max(0.0, dp_comm - 2 / 3 * full.compute_s)


def test_ep_step_time_adds_the_all_to_all_and_splits_the_expert_all_reduce():
    layers, d = MIXTRAL.config.num_layers, MIXTRAL.config.hidden_size
    one, two = (plan_train(MIXTRAL, H200, _setup("full", ep, seq_len=512)) for ep in (1, 2))
    # 2 all-to-alls forward, 2 backward, 2 in the recomputed forward, per layer and micro-batch; each GPU sends
    # half of its top-2 bf16 rows (ep 2)
    link = _link_gbs(H200, 2, 4)
    all_to_all = 2 * 6 * layers * 0.5 * (2 * 512 * 2 * d) / (link * 1e9)
    experts, total = routed_expert_params(MIXTRAL), count_params(MIXTRAL).total
    dp_link = _link_gbs(H200, 4, 4)
    dp_comm = (_ring_allreduce_s(4.0 * (total - experts), 4, dp_link)
               + _ring_allreduce_s(4.0 * experts / 2, 2, dp_link))
    assert two.comm_s == pytest.approx(max(0.0, dp_comm - 2 / 3 * two.compute_s) + all_to_all, rel=1e-9)
    assert two.compute_s == one.compute_s and two.other_s < one.other_s  # half the experts' optimizer step
    lora = [plan_train(MIXTRAL, H200, _setup("lora", ep)) for ep in (1, 2, 4)]
    assert lora[0].comm_s < lora[1].comm_s < lora[2].comm_s  # (ep-1)/ep of the rows leave each GPU


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


BASE = ["plan", "train", "--model", "mixtral", "--gpu", "H200", "--seq-len", "4096"]


def test_plan_train_ep_json_table_and_fit(capsys):
    code, out, _ = run([*BASE, "--num-gpus", "4", "--ep", "2", "--recompute", "full", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["parallel"]["ep"] == 2 and data["parallel"]["dp"] == 4
    assert any("expert parallel 2" in note for note in data["notes"])
    code, out, _ = run([*BASE, "--num-gpus", "4", "--ep", "2", "--recompute", "full"], capsys)
    assert code == 0 and "dp 4 tp 1 pp 1 cp 1 sp 1 ep 2 zero 0" in " ".join(out.split())
    code, out, _ = run([*BASE, "--num-gpus", "4", "--ep", "2", "--fit", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["plan"]["parallel"]["ep"] == 2 and data["plan"]["parallel"]["zero"] == 0


@pytest.mark.parametrize("argv,needle", [
    (["--num-gpus", "2", "--ep", "4"], "ep 4 must divide the data-parallel size (2)"),
    (["--num-gpus", "6", "--ep", "3"], "--ep 3 must divide the model's 8 experts per layer"),
    (["--num-gpus", "4", "--ep", "2", "--tp", "2"], "--ep with --tp is not supported yet"),
    (["--num-gpus", "4", "--ep", "2", "--pp", "2"], "--ep with --pp is not supported yet"),
    (["--num-gpus", "4", "--ep", "2", "--cp", "2"], "--ep with --cp is not supported yet"),
    (["--num-gpus", "4", "--ep", "2", "--sp", "2"], "--ep with --sp is not supported yet"),
    (["--num-gpus", "4", "--ep", "2", "--zero", "3"], "expert parallelism needs --parallel ddp"),
    (["--num-gpus", "4", "--ep", "2", "--method", "qlora"], "--ep with --method qlora is not supported"),
    (["--num-gpus", "4", "--ep", "2", "--precision", "fp16"], "--ep with --precision fp16 is not supported"),
    (["--num-gpus", "4", "--ep", "0"], "--ep must be positive"),
    (["--model", "llama-3-8b", "--num-gpus", "2", "--ep", "2"], "needs a mixture-of-experts model"),
])
def test_plan_train_ep_errors(argv, needle, capsys):
    code, _, err = run([*BASE, *argv], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
