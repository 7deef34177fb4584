"""Expert parallelism in training (--ep, train/parallel/experts.py): two optimizer steps of the real training step
on 2 gloo processes (dp 2, ep 2) and 4 (dp 4, ep 2: two EP groups) equal one process on the same global batch:
losses (router load-balancing loss included) and the updated weights, each rank holding only its experts. Then
`train` end to end with --ep 2: the single-process losses; its DCP checkpoints (full expert stacks) resume
under --ep and on one process, single-process checkpoints resume under --ep, and all export the single-process
adapter. Bad layouts are one-line errors."""

import shutil
from typing import NamedTuple

import pytest
import torch

from dist_helpers import run_workers, synthetic_batches
from longseq.config import TrainConfig
from longseq.errors import LongseqError
from longseq.models.expert_parallel import expert_parameters
from longseq.train.layout import parallelize
from longseq.train.lora import make_trainable
from longseq.train.optim import build_optimizer
from longseq.train.parallel.env import DistEnv, init_distributed
from longseq.train.precision import resolve_precision
from longseq.train.step import train_step
from tiny_models import random_model

SEQ, BATCH, STEPS = 16, 2, 2
STEPS_RUN = 4  # of `train`, a checkpoint every 2
MODEL = dict(arch="qwen2_moe", num_experts=4, experts_per_token=2, moe_intermediate_size=32,
             shared_expert_intermediate_size=32)


class Case(NamedTuple):
    method: str
    ep: int = 2
    accum: int = 1  # micro-batches per rank
    clip: float = 0.0
    extra: tuple = ()  # lora_train_extra


CASES_2 = {"lora-router-accum": Case("lora", accum=2, extra=("router",)), "full-clip": Case("full", clip=0.5)}
CASES_4 = {"dp4-ep2-lora-clip": Case("lora", clip=0.5, extra=("router",))}


def two_steps(case: Case, world: int, distributed: bool):
    """Losses of STEPS SGD steps and every trainable weight after them; distributed: this rank's (its experts'
    rows), else one process with accum × world micro-batches a step."""
    cfg = TrainConfig(method=case.method, lora_rank=4, lora_alpha=8, lora_train_extra=case.extra, optimizer="sgd",
                      lr=0.5, max_grad_norm=case.clip, precision="fp32", device="cpu", loss_chunk=16, seq_len=SEQ,
                      batch_size=BATCH, grad_accum=case.accum * (1 if distributed else world),
                      parallel="ddp" if distributed else "none", ep=case.ep if distributed else 1,
                      router_aux_loss_coef=0.05)
    model = random_model(**MODEL).train()
    torch.manual_seed(0)
    make_trainable(model, cfg)
    with torch.no_grad():  # B = 0 at init would leave A without gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    env = init_distributed(cfg) if distributed else DistEnv()
    precision = resolve_precision("fp32", env.device)
    step_model = parallelize(model, cfg, env, precision)
    optimizer = build_optimizer(model, cfg, env.device)
    batches = iter(synthetic_batches(STEPS * case.accum * world, BATCH, SEQ, 97))
    steps = env.step_batches(batches, cfg.grad_accum)
    losses = [train_step(step_model, next(steps), cfg, precision, env.device, optimizer, None, env)
              for _ in range(STEPS)]
    shard = next((m.expert_shard for m in model.modules() if getattr(m, "expert_shard", None)), None)
    held = {id(p) for p in expert_parameters(model)}
    weights = {n: (p.detach().clone(), id(p) in held) for n, p in model.named_parameters() if p.requires_grad}
    return losses, weights, (shard.first, shard.num_local) if shard else None


def _worker(rank: int, world: int, cases: dict):
    return {name: two_steps(case, world, distributed=True) for name, case in cases.items()}


@pytest.fixture(scope="module")
def results_2():
    return run_workers(_worker, 2, CASES_2, timeout=120)


@pytest.fixture(scope="module")
def results_4():
    return run_workers(_worker, 4, CASES_4, timeout=120)


def _check(results, case, world):
    ref_losses, ref_weights, _ = two_steps(case, world, distributed=False)
    for rank, rank_results in enumerate(results):
        losses, weights, (first, num_local) = rank_results
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert num_local == MODEL["num_experts"] // case.ep and first == (rank % case.ep) * num_local
        assert weights.keys() == ref_weights.keys()
        assert any(split for _, split in weights.values())
        for n, (w, split) in weights.items():
            ref = ref_weights[n][0][first : first + num_local] if split else ref_weights[n][0]
            torch.testing.assert_close(w, ref, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", list(CASES_2))
def test_two_processes_equal_one(results_2, name):
    _check([r[name] for r in results_2], CASES_2[name], 2)


@pytest.mark.parametrize("name", list(CASES_4))
def test_four_processes_two_expert_groups_equal_one(results_4, name):
    _check([r[name] for r in results_4], CASES_4[name], 4)


# --- `train` end to end: losses, DCP checkpoint, export -------------------------------------------------------


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, tokenizer_dir):
    """(root, model folder, data): a tiny random Mixtral (4 experts, top 2, router loss on) with the default
    tokenizer."""
    import transformers

    from models.parity import random_hf_model

    root = tmp_path_factory.mktemp("ep-train")
    path = root / "model"
    hf_cfg = transformers.MixtralConfig(vocab_size=49152, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                                        router_aux_loss_coef=0.05, bos_token_id=1, eos_token_id=2)
    random_hf_model(hf_cfg, path)
    shutil.copytree(tokenizer_dir, path, dirs_exist_ok=True)
    data = root / "data.jsonl"
    data.write_text("".join(f'{{"text": "the {w} sat on the mat and the {w} ran far away"}}\n'
                            for w in ("cat", "dog", "fox", "owl", "bee", "elk", "ant", "yak")))
    return root, path, data


def _run_cfg(moe_run, out, **kw) -> TrainConfig:
    root, path, data = moe_run
    base = dict(model=str(path), data=(str(data),), out_dir=str(root / out), seq_len=16, batch_size=2, grad_accum=2,
                max_steps=STEPS_RUN, lr=2e-2, lora_rank=4, lora_alpha=8, precision="fp32", device="cpu", save_every=2,
                plan="off", warmup_steps=0, schedule="constant", max_grad_norm=1.0, optimizer="adamw")
    return TrainConfig.from_dict({**base, **kw})


def _copy_checkpoint(root, source: str, out: str, step: int = 2) -> None:
    from longseq.train import checkpoint_files as ckpt

    src = ckpt.checkpoint_root(root / source) / f"step-{step:06d}"
    shutil.copytree(src, ckpt.checkpoint_root(root / out) / src.name)


def _train_worker(rank, world, moe_run):
    """--ep 2 from scratch; then, resumed at step 2, from its own DCP checkpoint and from the single-process one."""
    import torch.distributed as dist

    from longseq.train.loop import train

    out = {"ep": train(_run_cfg(moe_run, "ep", grad_accum=1, ep=2), progress=False).losses}
    if rank == 0:
        _copy_checkpoint(moe_run[0], "ep", "ep-from-ep")
    dist.barrier()
    for run in ("ep-from-ep", "ep-from-single"):
        out[run] = train(_run_cfg(moe_run, run, grad_accum=1, ep=2, resume="latest"), progress=False).losses
    return out


def test_train_with_ep_equals_one_process_resumes_and_exports_the_same_adapter(moe_run):
    from safetensors.torch import load_file

    from longseq.train import checkpoint_files as ckpt
    from longseq.train.export import export
    from longseq.train.loop import train

    root = moe_run[0]
    single = train(_run_cfg(moe_run, "single"), progress=False).losses
    _copy_checkpoint(root, "single", "ep-from-single")
    for losses in run_workers(_train_worker, 2, moe_run, timeout=240):
        assert losses["ep"] == pytest.approx(single, rel=1e-5)
        for run in ("ep-from-ep", "ep-from-single"):
            assert losses[run] == pytest.approx(single[2:], rel=1e-5), run
    _copy_checkpoint(root, "ep", "one-from-ep")  # the full expert stacks, read by one process
    assert train(_run_cfg(moe_run, "one-from-ep", resume="latest"), progress=False).losses == pytest.approx(
        single[2:], rel=1e-5)
    adapters = []
    for run in ("single", "ep", "ep-from-ep", "ep-from-single", "one-from-ep"):
        step = ckpt.list_checkpoints(root / run)[-1]
        assert step.name == f"step-{STEPS_RUN:06d}"
        out = export(step, root / f"adapter-{run}", "peft")
        adapters.append(load_file(str(out / "adapter_model.safetensors")))
    assert any("experts" in n for n in adapters[0])
    for other in adapters[1:]:
        assert other.keys() == adapters[0].keys()
        for name in adapters[0]:  # AdamW's first steps magnify float rounding where a gradient is near 0
            torch.testing.assert_close(other[name], adapters[0][name], rtol=1e-4, atol=1e-5)


# --- bad layouts ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,message", [
    (dict(ep=2, tp=2, parallel="fsdp"), "--ep with --tp is not supported yet"),
    (dict(ep=2, cp=2), "--ep with --cp is not supported yet"),
    (dict(ep=2, parallel="fsdp"), "--ep with --parallel fsdp is not supported"),
    (dict(ep=2, parallel="none"), "--ep with --parallel none is not supported"),
    (dict(ep=2, method="qlora"), "--ep with --method qlora is not supported"),
    (dict(ep=2, precision="fp16"), "--ep with --precision fp16 is not supported"),
    (dict(ep=0), "ep must be positive"),
])
def test_bad_flags_are_one_line(kw, message):
    with pytest.raises(LongseqError, match=message) as e:
        TrainConfig(seq_len=32, **kw)
    assert "\n" not in str(e.value)


def test_ep_must_divide_the_data_parallel_size():
    with pytest.raises(LongseqError, match=r"ep 4 must divide the data-parallel size \(2\)"):
        TrainConfig(ep=4).data_parallel(2)
    with pytest.raises(LongseqError, match=r"ep 2 must divide the data-parallel size \(3\)"):
        TrainConfig(ep=2, dp=3).data_parallel(3)
    assert TrainConfig(ep=2).data_parallel(4) == 4


def test_dense_model_or_uneven_experts_are_refused():
    from longseq.train.parallel.experts import split_experts

    env = DistEnv(parallel="ddp", dp=2, ep=2)
    with pytest.raises(LongseqError, match="--ep 2 needs a mixture-of-experts model; this one is dense"):
        split_experts(random_model(), env)
    with pytest.raises(LongseqError, match="--ep 3 must divide the model's 4 experts per layer"):
        split_experts(random_model(**MODEL), DistEnv(parallel="ddp", dp=3, ep=3))
