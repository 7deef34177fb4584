"""Training mixture-of-experts models (issue 25 item 3): per-expert LoRA inside the expert compute (grouped, padded
and loop paths equal), QLoRA with NF4 experts, full fine-tuning, transformers' router load-balancing loss, tiling
and recompute, and exports that transformers and PEFT load with the trained model's logits."""

import shutil

import pytest
import torch
import transformers

from longseq.config import TrainConfig
from longseq.models.loader import load
from longseq.models.sparse_moe import SparseMoeBlock
from longseq.train import export as ex
from longseq.train.data import IGNORE
from longseq.train.expert_lora import LoRAExperts
from longseq.train.loop import train
from longseq.train.lora import is_nf4, make_trainable
from longseq.train.step import TokenLoss, router_loss_for
from models.parity import random_hf_model
from tiny_models import random_model

peft = pytest.importorskip("peft")

VOCAB = 49152  # the default tokenizer's, so `train` can load it from the model folder
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=None)
QWEN_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
CASES = {
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(**QWEN_MOE, shared_expert_intermediate_size=32,
                                                    mlp_only_layers=[1])),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(**QWEN_MOE, head_dim=16)),
}
AUX = 0.05  # router_aux_loss_coef of the saved configs (output_router_logits set: transformers adds the loss)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory, tokenizer_dir):
    """family -> (model folder with the default tokenizer, data file, transformers model)."""
    root = tmp_path_factory.mktemp("moe-train")
    data = root / "data.jsonl"
    data.write_text("".join(f'{{"text": "the {w} sat on the mat and the {w} ran far away"}}\n'
                            for w in ("cat", "dog", "fox", "owl", "bee", "elk", "ant", "yak")))
    out = {}
    for name, (cls, extra) in CASES.items():
        path = root / name
        hf = random_hf_model(cls(**BASE, **extra, output_router_logits=True, router_aux_loss_coef=AUX), path)
        shutil.copytree(tokenizer_dir, path, dirs_exist_ok=True)
        out[name] = path, data, hf
    return out


def _run_cfg(moe_dirs, name, tmp_path, **kw):
    path, data, _ = moe_dirs[name]
    base = dict(model=str(path), data=(str(data),), out_dir=str(tmp_path / "out"), seq_len=16, batch_size=2,
                max_steps=4, lr=2e-2, lora_rank=4, lora_alpha=8, precision="fp32", device="cpu", save_every=0,
                plan="off", warmup_steps=0, schedule="constant", max_grad_norm=0.0)
    return TrainConfig.from_dict({**base, **kw})


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_lora_training_reduces_the_loss_and_keeps_the_router_frozen(moe_dirs, name, tmp_path):
    result = train(_run_cfg(moe_dirs, name, tmp_path, seq_len=32, batch_size=4, max_steps=6), progress=False)
    assert result.losses[-1] < result.losses[0] - 0.2, result.losses
    trainable = {n for n, p in result.lm.model.named_parameters() if p.requires_grad}
    assert "model.layers.0.mlp.experts.lora_A.gate_up_proj" in trainable
    assert "model.layers.1.mlp.experts.lora_B.down_proj" in trainable
    assert not any(".mlp.gate." in n or n.endswith("experts.gate_up_proj") for n in trainable)
    # the checkpoint exports (merged) with the trained model's logits
    ex.export(result.checkpoint, tmp_path / "merged", fmt="merged", dtype="float32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert (result.lm.model(ids) - theirs(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_qlora_and_full_fine_tuning_train(moe_dirs, method, tmp_path):
    result = train(_run_cfg(moe_dirs, "mixtral", tmp_path, method=method, lr=2e-2 if method == "qlora" else 2e-3),
                   progress=False)
    assert result.losses[-1] < result.losses[0], result.losses
    experts = result.lm.model.model.layers[0].mlp.experts
    if method == "qlora":
        assert isinstance(experts, LoRAExperts) and is_nf4(experts.gate_up_proj)
    else:
        assert experts.gate_up_proj.requires_grad and result.lm.model.model.layers[0].mlp.gate.weight.requires_grad


def _loss_and_grads(model, ids, targets, mode):
    for block in _blocks(model):
        block.mode = mode
    model.zero_grad(set_to_none=True)
    loss = TokenLoss(model, 16, router_loss_for(model, 0.1, 0.01))(ids, None, None, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_grouped_padded_and_loop_paths_give_equal_loss_and_grads(method, arch):
    extra = dict(shared_expert_intermediate_size=64) if arch == "qwen2_moe" else {}
    model = random_model(arch=arch, num_experts=4, experts_per_token=2, moe_intermediate_size=64, **extra).train()
    make_trainable(model, TrainConfig(method=method, lora_rank=4, lora_alpha=8))
    with torch.no_grad():  # adapters away from their zero start, so their gradients all flow
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    torch.manual_seed(3)
    ids, targets = torch.randint(0, 97, (2, 24)), torch.randint(0, 97, (2, 24))
    ref_loss, ref_grads = _loss_and_grads(model, ids, targets, "loop")
    assert any("experts.lora_A" in n or n.endswith("experts.down_proj") for n in ref_grads)
    for mode in ("padded", "grouped_mm"):
        loss, grads = _loss_and_grads(model, ids, targets, mode)
        assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-5), mode
        assert grads.keys() == ref_grads.keys()
        for n, g in grads.items():
            assert torch.allclose(g, ref_grads[n], rtol=1e-4, atol=1e-5), (mode, n)


@pytest.mark.parametrize("name", list(CASES))
def test_aux_loss_loss_and_grads_equal_transformers(moe_dirs, name):
    path, _, hf = moe_dirs[name]
    lm = load(str(path), dtype=torch.float32, device="cpu")
    model = lm.model.train()
    make_trainable(model, TrainConfig(method="full"))
    router = router_loss_for(model, None)  # the config's: transformers' router_aux_loss_coef
    assert router.aux_coef == AUX
    torch.manual_seed(4)
    ids = torch.randint(0, VOCAB, (2, 12))
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE)], dim=1)  # transformers shifts labels itself
    loss = TokenLoss(model, 8, router)(ids, None, None, targets) / (targets != IGNORE).sum()
    loss.backward()
    hf.train()
    hf.zero_grad(set_to_none=True)
    out = hf(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    assert abs(router.balance_loss().item() - out.aux_loss.item()) <= 1e-6
    assert abs(loss.item() - out.loss.item()) <= 1e-5
    theirs = dict(hf.named_parameters())
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, theirs[n].grad, rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize("policy", ["tiling", "full", "keep_attention", "selective"])
def test_tiling_and_recompute_keep_loss_and_grads(policy):
    model = random_model(arch="qwen2_moe", num_experts=4, experts_per_token=2, moe_intermediate_size=32,
                         shared_expert_intermediate_size=32).train()
    make_trainable(model, TrainConfig(method="lora", lora_rank=4, lora_alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    ids, targets = torch.randint(0, 97, (2, 24)), torch.randint(0, 97, (2, 24))
    ref_loss, ref_grads = _loss_and_grads(model, ids, targets, "padded")
    if policy == "tiling":
        model.set_tiling(7)
    else:
        model.set_recompute(policy)
    loss, grads = _loss_and_grads(model, ids, targets, "padded")
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        assert torch.allclose(g, ref_grads[n], rtol=1e-4, atol=1e-5), n


def _trained_lora(path, method, extra=()):
    lm = load(str(path), dtype=torch.float32, device="cpu")
    cfg = TrainConfig(method=method, lora_rank=4, lora_alpha=8, lora_train_extra=extra)
    make_trainable(lm.model, cfg)
    torch.manual_seed(5)
    with torch.no_grad():  # as if trained: every factor and extra away from its initial value
        for p in lm.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return lm.model.eval(), cfg


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("name", list(CASES))
def test_merged_export_loads_in_transformers_with_equal_logits(moe_dirs, name, method, tmp_path):
    path = moe_dirs[name][0]
    model, _ = _trained_lora(path, method)
    ex.export_merged(model, tmp_path / "merged", dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        diff = (model(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("name", list(CASES))
def test_peft_export_loads_with_equal_logits(moe_dirs, name, tmp_path):
    path = moe_dirs[name][0]
    model, cfg = _trained_lora(path, "lora", extra=("router",))
    ex.export_peft(model, cfg, tmp_path / "adapter", str(path))
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        diff = (model(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_plan_auto_tiles_and_plans_all_experts(moe_dirs, tmp_path):
    result = train(_run_cfg(moe_dirs, "qwen3_moe", tmp_path, plan="auto", tile_tokens=8, max_steps=2),
                   progress=False)
    assert result.memory.auto and result.memory.tile == 8
    assert all(block.tile == 8 for block in _blocks(result.lm.model))
    assert all(torch.isfinite(torch.tensor(result.losses)))
