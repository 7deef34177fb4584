"""Sharded loading on 2 gloo processes: a model built on meta, split by FSDP2 (with CPU offload, and with tensor
parallelism) or into pipeline stages, then filled by each rank with only its slices of a sharded safetensors
checkpoint. Every weight equals the single-process load (LoRA adapters included), each rank reads about half the
bytes (under FSDP together all of them, once), and one training step gives the single-process loss."""

import shutil

import pytest
import torch
from safetensors import safe_open

from dist_helpers import run_workers, synthetic_batches
from longseq.config import TrainConfig
from longseq.models.loader import load
from longseq.train.layout import parallelize
from longseq.train.lora import make_trainable
from longseq.train.optim import build_optimizer
from longseq.train.parallel import meta_loading
from longseq.train.parallel.env import DistEnv, init_distributed
from longseq.train.precision import resolve_precision
from longseq.train.step import TokenLoss, train_step

SEQ, BATCH, VOCAB = 16, 2, 96
# name -> TrainConfig options of the run
LAYOUTS = {
    "fsdp-full": dict(method="full", parallel="fsdp"),
    "fsdp-offload-lora": dict(method="lora", parallel="fsdp", fsdp_offload=True),
    "tp2-fsdp-lora": dict(method="lora", parallel="fsdp", tp=2),
    "pp2-lora": dict(method="lora", pp=2, grad_accum=2),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    """A tiny random Llama in two safetensors shards with an index."""
    import transformers

    path = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path, max_shard_size="60KB")
    shutil.copytree(tokenizer_dir, path, dirs_exist_ok=True)
    assert (path / "model.safetensors.index.json").is_file()
    return path


def _config(model_dir, **kw) -> TrainConfig:
    return TrainConfig(model=str(model_dir), lora_rank=4, optimizer="sgd", lr=1.0, max_grad_norm=1.0,
                       precision="fp32", device="cpu", loss_chunk=16, seq_len=SEQ, batch_size=BATCH, **kw)


def _step(model, step_model, cfg, env):
    precision = resolve_precision("fp32", env.device)
    optimizer = build_optimizer(model, cfg, env.device)
    micro = next(env.step_batches(iter(synthetic_batches(2, BATCH, SEQ, VOCAB)), cfg.grad_accum))
    return train_step(step_model, micro, cfg, precision, env.device, optimizer, None, env)


def _worker(rank, world, model_dir):
    out = {}
    for name, options in LAYOUTS.items():
        cfg = _config(model_dir, **options)
        env = init_distributed(cfg)
        assert meta_loading.sharded_loading(cfg, env)
        lm = meta_loading.load_meta(cfg.model, torch.float32)
        model = lm.model
        torch.manual_seed(cfg.seed)
        make_trainable(model, cfg)
        step_model = parallelize(model, cfg, env, resolve_precision("fp32", env.device))
        assert all(p.device.type == "meta" for p in model.parameters())
        stats = meta_loading.materialize(step_model, model, lm.path, env.device, cfg.seed, env.device)
        held = sum(_local(p).numel() * p.element_size() for p in model.parameters())
        weights = {n: _whole(p).clone() for n, p in model.named_parameters()}  # a pipeline stage's own
        out[name] = (stats.bytes_read, held, weights, _step(model, step_model, cfg, env))
    return out


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _whole(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


@pytest.fixture(scope="module")
def results(model_dir):
    return run_workers(_worker, 2, model_dir)


def _checkpoint_bytes(model_dir) -> int:
    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            total += sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in f.keys())
    return total


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_rank_loads_its_shards_of_the_single_process_model(results, model_dir, name):
    layout = LAYOUTS[name]
    dp = 2 // (layout.get("tp", 1) * layout.get("pp", 1))
    # one process: the micro-batches of all dp ranks
    cfg = _config(model_dir, method=layout["method"], grad_accum=layout.get("grad_accum", 1) * dp)
    reference = load(cfg.model, dtype=torch.float32, device="cpu").model
    torch.manual_seed(cfg.seed)
    make_trainable(reference, cfg)
    total = _checkpoint_bytes(model_dir)
    model_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    everything = dict(reference.named_parameters())
    held = set()
    for _, _, weights, _ in (r[name] for r in results):  # as loaded, before the step
        assert weights.keys() <= everything.keys()
        held |= weights.keys()
        for n, w in weights.items():
            torch.testing.assert_close(w, everything[n].detach(), rtol=0, atol=0, msg=n)
    assert held == everything.keys()
    ref_loss = _step(reference, TokenLoss(reference, cfg.loss_chunk), cfg, DistEnv())
    read = [r[name][0] for r in results]
    for bytes_read, held, _, loss in (r[name] for r in results):
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert held <= 0.55 * model_bytes  # this rank's shards, about half the model
        # about half of the checkpoint read (tensor-parallel ranks both read the layers' small norms whole)
        assert 0.45 * total <= bytes_read <= 0.55 * total
    if not layout.get("tp"):
        assert sum(read) == total  # FSDP, pipeline stages: every byte read once, by one rank


@pytest.mark.parametrize("layers,message", [(3, r"9 weight\(s\) missing, e.g. 'model.layers.2.input_layernorm.weight'"),
                                            (1, "unexpected weight 'model.layers.1.")])
def test_a_checkpoint_of_another_shape_is_one_line(model_dir, tmp_path, layers, message):
    import json

    from longseq.errors import LongseqError

    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    with pytest.raises(LongseqError, match=f"^{other}: {message}"):
        meta_loading.load_meta(str(other), torch.float32)
