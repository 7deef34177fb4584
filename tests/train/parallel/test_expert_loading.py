"""Expert-parallel loading (--ep from an HF safetensors directory, train/parallel/meta_loading.py) on 2 gloo
processes: a tiny random Qwen2-MoE (shared expert, 4 experts) saved as sharded safetensors with one matrix per expert
is built on meta, split, and each rank gives storage to and reads only its 2 experts of every sparse block and the
non-expert weights. Every weight, LoRA adapters included, equals the rows one process loads and draws; two steps
give the same losses and updated weights as today's whole load (then split) and as one process."""

import shutil

import pytest
import torch
from safetensors import safe_open

from dist_helpers import run_workers, synthetic_batches
from longseq.config import TrainConfig
from longseq.models.expert_parallel import expert_parameters
from longseq.models.loader import load
from longseq.train.layout import parallelize
from longseq.train.lora import make_trainable
from longseq.train.optim import build_optimizer
from longseq.train.parallel import meta_loading
from longseq.train.parallel.env import DistEnv, init_distributed
from longseq.train.precision import resolve_precision
from longseq.train.step import train_step

SEQ, BATCH, VOCAB, STEPS, EXPERTS = 16, 2, 96, 2, 4
METHODS = ("lora", "full")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    """A tiny random Qwen2-MoE in several safetensors shards with an index, experts stored one matrix each."""
    import transformers

    from models.parity import random_hf_model

    path = tmp_path_factory.mktemp("moe-sharded")
    cfg = transformers.Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=32, num_experts=EXPERTS, num_experts_per_tok=2,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    random_hf_model(cfg, path, max_shard_size="60KB")
    shutil.copytree(tokenizer_dir, path, dirs_exist_ok=True)
    assert (path / "model.safetensors.index.json").is_file()
    return path


def _config(model_dir, method: str, distributed: bool) -> TrainConfig:
    return TrainConfig(model=str(model_dir), method=method, lora_rank=4, lora_alpha=8, optimizer="sgd", lr=0.5,
                       max_grad_norm=1.0, precision="fp32", device="cpu", loss_chunk=16, seq_len=SEQ,
                       batch_size=BATCH, grad_accum=1 if distributed else 2, router_aux_loss_coef=0.05,
                       parallel="ddp" if distributed else "none", ep=2 if distributed else 1)


def _steps(model, step_model, cfg, env):
    """Losses of STEPS steps and every trainable weight after them, with whether this rank holds only its rows."""
    precision = resolve_precision("fp32", env.device)
    optimizer = build_optimizer(model, cfg, env.device)
    steps = env.step_batches(iter(synthetic_batches(STEPS * 2, BATCH, SEQ, VOCAB)), cfg.grad_accum)
    losses = [train_step(step_model, next(steps), cfg, precision, env.device, optimizer, None, env)
              for _ in range(STEPS)]
    split = {id(p) for p in expert_parameters(model)}
    return losses, {n: (p.detach().clone(), id(p) in split) for n, p in model.named_parameters() if p.requires_grad}


def _meta_run(cfg, env):
    lm = meta_loading.load_meta(cfg.model, torch.float32)
    model = lm.model
    torch.manual_seed(cfg.seed)
    make_trainable(model, cfg)
    seen = {}

    def materialize(root):  # called once the experts are split, before DDP wraps the model
        seen["before"] = {n: (p.device.type, p.shape[0]) for n, p in model.named_parameters() if ".experts." in n}
        seen["stats"] = meta_loading.materialize(root, model, lm.path, env.device, cfg.seed, env.device)
        seen["loaded"] = {n: p.detach().clone() for n, p in model.named_parameters()}

    step_model = parallelize(model, cfg, env, resolve_precision("fp32", env.device), materialize=materialize)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    return seen, held, _steps(model, step_model, cfg, env)


def _whole_run(cfg, env):
    model = load(cfg.model, dtype=torch.float32, device=env.device).model
    torch.manual_seed(cfg.seed)
    make_trainable(model, cfg)
    return _steps(model, parallelize(model, cfg, env, resolve_precision("fp32", env.device)), cfg, env)


def _worker(rank, world, model_dir):
    out = {}
    for method in METHODS:
        cfg = _config(model_dir, method, distributed=True)
        env = init_distributed(cfg)
        assert meta_loading.sharded_loading(cfg, env)
        out[method] = (_meta_run(cfg, env), _whole_run(cfg, env))
    return out


@pytest.fixture(scope="module")
def results(model_dir):
    return run_workers(_worker, 2, model_dir, timeout=180)


def _checkpoint_bytes(model_dir) -> tuple[int, int]:
    """(all tensor bytes, the experts' ones)."""
    total = experts = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                total += t.numel() * t.element_size()
                experts += t.numel() * t.element_size() if ".experts." in name else 0
    return total, experts


@pytest.mark.parametrize("method", METHODS)
def test_each_rank_loads_only_its_experts_and_trains_as_the_whole_load_and_one_process(results, model_dir, method):
    cfg = _config(model_dir, method, distributed=False)
    reference = load(cfg.model, dtype=torch.float32, device="cpu").model
    torch.manual_seed(cfg.seed)
    make_trainable(reference, cfg)
    everything = {n: p.detach().clone() for n, p in reference.named_parameters()}
    model_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    ref_losses, ref_weights = _steps(reference, parallelize(reference, cfg, DistEnv(), resolve_precision(
        "fp32", torch.device("cpu"))), cfg, DistEnv())
    total, expert_bytes = _checkpoint_bytes(model_dir)
    local = EXPERTS // 2
    for rank, r in enumerate(results):
        (seen, held, (losses, weights)), (whole_losses, whole_weights) = r[method]
        # split on meta: no expert stack ever had E rows on this rank
        assert seen["before"] and all(d == "meta" and n == local for d, n in seen["before"].values())
        assert seen["stats"].bytes_read == total - expert_bytes // 2  # its experts' matrices, every other weight
        assert held < model_bytes - 0.4 * expert_bytes
        rows = slice(rank * local, (rank + 1) * local)
        assert seen["loaded"].keys() == everything.keys()
        assert any("lora_A" in n and ".experts." in n for n in seen["loaded"]) == (method == "lora")
        for n, w in seen["loaded"].items():  # the weights and adapters one process loads and draws, its rows
            ref = everything[n][rows] if ".experts." in n else everything[n]
            torch.testing.assert_close(w, ref, rtol=0, atol=0, msg=n)
        assert losses == pytest.approx(whole_losses, rel=1e-6)
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert weights.keys() == whole_weights.keys() == ref_weights.keys()
        for n, (w, split) in weights.items():
            torch.testing.assert_close(w, whole_weights[n][0], rtol=1e-6, atol=1e-7, msg=n)
            ref = ref_weights[n][0][rows] if split else ref_weights[n][0]
            torch.testing.assert_close(w, ref, rtol=1e-4, atol=1e-6, msg=n)
