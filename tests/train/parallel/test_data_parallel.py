"""One optimizer step of the real training step (`train_step`) under DDP, FSDP2 (with and without CPU offload),
Ulysses, ring attention, both (2D), tensor parallelism (with FSDP2: 2-D) and pipeline stages (GPipe, 1F1B,
interleaved 1F1B), on 2 and 4 gloo processes, equals the single-process step on the same global batch: the loss,
and each trainable weight's update (SGD with lr 1 and no history: the update is the (clipped) gradient). The
planner's per-GPU weight and optimizer bytes under FSDP2 equal the shards each process holds."""

from dataclasses import replace
from typing import NamedTuple

import pytest
import torch

from dist_helpers import TINY, run_workers, synthetic_batches
from longseq.config import TrainConfig
from longseq.models.llama import CausalLM
from longseq.plan.memory import _state_bytes
from longseq.plan.models import ModelSpec
from longseq.plan.setup import parallelism_for
from longseq.train.layout import parallelize
from longseq.train.lora import LoRALinear, make_trainable
from longseq.train.optim import build_optimizer
from longseq.train.parallel.env import DistEnv, init_distributed
from longseq.train.precision import resolve_precision
from longseq.train.step import train_step

SEQ, BATCH = 16, 2

class Case(NamedTuple):
    parallel: str
    method: str
    recompute: str = "none"
    accum: int = 1  # micro-batches per rank
    offload: bool = False  # fsdp_offload
    clip: float = 0.0  # max_grad_norm
    sp: int = 1  # Ulysses
    cp: int = 1  # ring attention
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline stages (of a 4-layer model)
    schedule: str = "1f1b"


CASES_2 = {
    "ddp-lora-accum": Case("ddp", "lora", accum=2),
    "fsdp-full-selective-clip": Case("fsdp", "full", "selective", clip=1.0),
    "fsdp-offload-lora-full-recompute-accum": Case("fsdp", "lora", "full", accum=2, offload=True),
    "ulysses2-ddp-lora-full-recompute": Case("ddp", "lora", "full", accum=2, sp=2),
    "ulysses2-fsdp-full": Case("fsdp", "full", clip=1.0, sp=2),
    "ring2-ddp-lora-selective-accum": Case("ddp", "lora", "selective", accum=2, cp=2),
    "ring2-fsdp-full-clip": Case("fsdp", "full", "full", clip=1.0, cp=2),
    "tp2-fsdp-lora-selective-accum": Case("fsdp", "lora", "selective", accum=2, tp=2),
    "tp2-fsdp-full-clip": Case("fsdp", "full", "keep_attention", clip=1.0, tp=2),
    "pp2-1f1b-lora-clip": Case("ddp", "lora", accum=2, clip=1.0, pp=2),
    "pp2-gpipe-full-selective": Case("ddp", "full", "selective", accum=3, pp=2, schedule="gpipe"),
    "pp2-interleaved-lora-full-recompute": Case("ddp", "lora", "full", accum=4, clip=1.0, pp=2,
                                                schedule="interleaved-1f1b"),
}
CASES_4 = {
    "dp2-ulysses2-fsdp-lora-selective": Case("fsdp", "lora", "selective", clip=1.0, sp=2),
    "ring2-ulysses2-fsdp-full": Case("fsdp", "full", clip=1.0, sp=2, cp=2),
    "dp2-tp2-fsdp-lora-full-recompute": Case("fsdp", "lora", "full", clip=1.0, tp=2),
}


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def one_step(case: tuple, world: int, distributed: bool):
    """Loss and updates of one step; single process (distributed False) uses grad_accum × dp micro-batches."""
    dp = world // (case.sp * case.cp * case.tp * case.pp)
    accum = case.accum
    layout = dict(sp=case.sp, cp=case.cp, tp=case.tp, pp=case.pp, pp_schedule=case.schedule) if distributed else {}
    cfg = TrainConfig(method=case.method, lora_rank=4, optimizer="sgd", lr=1.0, max_grad_norm=case.clip,
                      recompute=case.recompute, precision="fp32", device="cpu", loss_chunk=16, seq_len=SEQ,
                      batch_size=BATCH, grad_accum=accum if distributed else accum * dp,
                      parallel=case.parallel if distributed else "none", fsdp_offload=case.offload and distributed,
                      **layout)
    torch.manual_seed(0)
    model = CausalLM(replace(TINY, num_layers=4) if case.pp > 1 else TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    make_trainable(model, cfg)
    with torch.no_grad():  # B = 0 at init would leave A without gradient
        for m in model.modules():
            if isinstance(m, LoRALinear) and m.rank:
                m.lora_B.weight.normal_(0, 0.1)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    env = init_distributed(cfg) if distributed else DistEnv()
    precision = resolve_precision("fp32", env.device)
    step_model = parallelize(model, cfg, env, precision)
    model.set_recompute(case.recompute)  # as the trainer does, after the split (a pipeline stage's layers)
    optimizer = build_optimizer(model, cfg, env.device)
    batches = synthetic_batches(accum * dp, BATCH, SEQ, TINY.vocab_size)
    micro = next(env.step_batches(iter(batches), cfg.grad_accum))
    loss = train_step(step_model, micro, cfg, precision, env.device, optimizer, None, env)
    params = dict(model.named_parameters())  # a pipeline stage's own
    updates = {n: before[n] - _full(params[n]).detach() for n in names if n in params}
    held = {"weights": sum(_local_bytes(p) for p in model.parameters()),
            "optimizer": sum(_local_bytes(t) for st in optimizer.state.values() for t in st.values()
                             if torch.is_tensor(t))}
    return loss, updates, held


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t  # this process's shard of a DTensor
    return t.numel() * t.element_size()


def _worker(rank: int, world: int, cases: dict):
    return {name: one_step(case, world, distributed=True) for name, case in cases.items()}


@pytest.fixture(scope="module")
def results_2():
    return run_workers(_worker, 2, CASES_2)


@pytest.fixture(scope="module")
def results_4():
    return run_workers(_worker, 4, CASES_4)


def _check(results, name, case, world):
    ref_loss, ref_updates, _ = one_step(case, world, distributed=False)
    held = set()
    for rank_results in results:
        loss, updates, _ = rank_results[name]
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert updates.keys() <= ref_updates.keys() and len(updates) > 0  # a pipeline stage: some of them
        held |= updates.keys()
        for n in updates:
            assert ref_updates[n].abs().max() > 0, n  # a weight that does not move would prove nothing
            torch.testing.assert_close(updates[n], ref_updates[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    assert held == ref_updates.keys()


@pytest.mark.parametrize("name", list(CASES_2))
def test_two_processes_equal_one(results_2, name):
    _check(results_2, name, CASES_2[name], 2)


@pytest.mark.parametrize("name", list(CASES_4))
def test_four_processes_equal_one(results_4, name):
    _check(results_4, name, CASES_4[name], 4)


@pytest.mark.parametrize("name,world", [("fsdp-full-selective-clip", 2), ("ulysses2-fsdp-full", 2),
                                        ("dp2-ulysses2-fsdp-lora-selective", 4)])
def test_planner_predicts_fsdp_shards(results_2, results_4, name, world):
    from longseq.plan.setup import TrainSetup

    case = {**CASES_2, **CASES_4}[name]
    cfg = TrainConfig(parallel=case.parallel, sp=case.sp, seq_len=SEQ)
    setup = TrainSetup(method=case.method, seq_len=SEQ, optimizer="sgd", precision="fp32", lora_rank=4,
                       parallel=parallelism_for(cfg, world))
    weights, _, optimizer, _, _ = _state_bytes(ModelSpec("tiny", TINY), setup)
    for rank_results in (results_2 if world == 2 else results_4):
        held = rank_results[name][2]
        assert held == {"weights": weights, "optimizer": optimizer}
