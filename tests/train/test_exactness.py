"""Each memory-saving training technique computes the same loss and gradients as the plain path."""

import pytest
import torch

from longseq.attention import attention, reference_attention
from longseq.config import ModelConfig, TrainConfig
from longseq.models.llama import CausalLM
from longseq.train.lora import LoRALinear, apply_lora, merged_state_dict
from longseq.train.loss import chunked_cross_entropy, reference_cross_entropy
from longseq.train.optim import lr_factor
from tiny_models import loss_and_grads

CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_seq_len=64)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(**{**CFG.__dict__, "rope": CFG.rope, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_cross_entropy_equals_reference(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(50, 32, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(80, 32, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 80, (50,))
    targets[::3] = -100
    ref = reference_cross_entropy(hidden, weight, targets)
    g_ref = torch.autograd.grad(ref, (hidden, weight))
    out = chunked_cross_entropy(hidden, weight, targets, chunk)
    g_out = torch.autograd.grad(out, (hidden, weight))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("policy,plain", [("selective", 0), ("keep_attention", 0), ("full", 0),
                                          ("keep_attention", 1), ("full", 1)])  # plain: last layers, SwiGLU only
@pytest.mark.parametrize("lora", [False, True])
def test_recompute_policies_are_exact(policy, plain, lora):
    model = tiny()
    if lora:
        apply_lora(model, TrainConfig(lora_rank=4, lora_dropout=0.0))
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoRALinear) and m.rank:
                    m.lora_B.weight.normal_(0, 0.1)
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (2, 24))
    targets = torch.randint(0, 96, (2, 24))
    model.set_recompute("none")
    ref_loss, ref_grads = loss_and_grads(model, ids, targets)
    model.set_recompute(policy, plain_layers=plain)
    loss, grads = loss_and_grads(model, ids, targets)
    assert set(grads) == set(ref_grads) and grads
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)


def test_packed_documents_equal_separate_forwards():
    # Two documents packed in one row, positions restarting, give each document's own logits.
    model = tiny(sliding_window=5)
    torch.manual_seed(2)
    a, b = torch.randint(0, 96, (1, 9)), torch.randint(0, 96, (1, 7))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(9), torch.arange(7)]).unsqueeze(0)
    doc_ids = torch.tensor([[0] * 9 + [1] * 7])
    with torch.no_grad():
        out = model.lm_head(model.hidden(packed, positions, doc_ids=doc_ids))
        torch.testing.assert_close(out[:, :9], model(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, 9:], model(b), rtol=1e-5, atol=1e-5)
        # without the document mask the second document would see the first
        leaky = model.lm_head(model.hidden(packed, positions))
        assert (leaky[:, 9:] - model(b)).abs().max() > 1e-3


@pytest.mark.parametrize("window", [None, 3])
def test_document_mask_attention_matches_reference(window):
    torch.manual_seed(3)
    q = torch.randn(2, 4, 12, 8)
    k, v = torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    doc_ids = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 12])
    out = attention(q, k, v, window=window, doc_ids=doc_ids)
    ref = reference_attention(q, k, v, window=window, doc_ids=doc_ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_lora_starts_at_base_and_merges_exactly():
    model = tiny()
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        base = model(ids)
    apply_lora(model, TrainConfig(lora_rank=4, lora_alpha=8, lora_targets=("q_proj", "down_proj")))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base)  # B = 0 at initialisation
        for m in model.modules():
            if isinstance(m, LoRALinear) and m.rank:
                m.lora_B.weight.normal_(0, 0.1)
        adapted = model(ids)
        assert (adapted - base).abs().max() > 1e-3
        merged = tiny()
        merged.load_state_dict(merged_state_dict(model, torch.float32))
        torch.testing.assert_close(merged(ids), adapted, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert not any("k_proj.lora" in n for n in trainable)


def test_qlora_base_is_nf4_and_close_to_the_weights():
    model = tiny()
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        base = model(ids)
    apply_lora(model, TrainConfig(method="qlora", lora_rank=4))
    from longseq.train.lora import is_nf4

    linears = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(linears) == 2 * 7 and all(is_nf4(m.weight) for m in linears)
    with torch.no_grad():
        quantized = model(ids)
    rel = ((quantized - base).norm() / base.norm()).item()
    assert 1e-4 < rel < 0.2  # NF4 changes the weights a little, not a lot


def test_lr_schedule_shapes():
    cfg = TrainConfig(max_steps=10, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(10)]
    assert factors[0] == pytest.approx(0.5) and factors[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))
    assert lr_factor(10, cfg) == pytest.approx(0.1)
    linear = TrainConfig(max_steps=10, schedule="linear")
    assert lr_factor(5, linear) == pytest.approx(0.5)
    assert lr_factor(3, TrainConfig(max_steps=10, schedule="constant")) == 1.0
