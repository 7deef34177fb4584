"""Attention variants inside the model: generation's cached decode equals the training forward, the chunked path
trains like the plain one, and `apply_overrides` switches variants and RoPE scaling on a built model."""

import pytest
import torch

from longseq.config import AttentionConfig, ModelConfig, ModelOverrides
from longseq.errors import LongseqError
from longseq.models.overrides import apply_overrides
from tiny_models import cached_logits, random_model

VARIANTS = {
    "sliding": ModelOverrides(attention="sliding", window=5),
    "streaming": ModelOverrides(attention="streaming", window=5, sink_tokens=2),
    "dilated": ModelOverrides(attention="dilated", segment_lengths=(4, 8), dilation_rates=(1, 2)),
    "block_sparse": ModelOverrides(attention="block_sparse", block_size=4, local_blocks=2, global_blocks=1),
    "alibi": ModelOverrides(alibi=True),
    "chunked": ModelOverrides(attention_chunk=5),
    "chunked_dilated": ModelOverrides(attention="dilated", segment_lengths=(8,), dilation_rates=(2,),
                                      attention_chunk=3),
}
N = 18


def tiny_model(seed=0):
    return random_model(seed).double()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (2, N), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_cached_decode_equals_full_forward(name, tokens):
    model = apply_overrides(tiny_model(), VARIANTS[name])
    full = model(tokens)
    torch.testing.assert_close(cached_logits(model, tokens, 7), full, atol=1e-10, rtol=0)
    plain = tiny_model()(tokens)
    if name == "chunked":  # the same attention, computed in tiles
        torch.testing.assert_close(full, plain, atol=1e-10, rtol=0)
    else:
        assert not torch.allclose(full, plain, atol=1e-3)  # the variant is not ignored


@pytest.mark.parametrize("name", ["dilated", "alibi", "block_sparse"])
def test_chunked_training_step_equals_plain(name, tokens):
    # The trainer's call: hidden states of packed documents, then a loss; the chunked path gives the same gradients.
    doc_ids = torch.tensor([[0] * 8 + [1] * 10, [0] * 18])
    positions = torch.cat([torch.arange(8), torch.arange(10)]).expand(2, N)
    grads = []
    for chunk in (None, 4):
        model = apply_overrides(tiny_model(), VARIANTS[name])
        if chunk:
            apply_overrides(model, ModelOverrides(attention_chunk=chunk))
        model.train()
        model.hidden(tokens, positions, doc_ids=doc_ids).pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-10, rtol=0)


def test_overrides_switch_rope_and_context():
    model = tiny_model()
    inv = model.rotary.inv_freq.clone()
    apply_overrides(model, ModelOverrides(rope_scaling="linear", rope_factor=4))
    assert model.config.rope.type == "linear" and model.config.max_seq_len == 256
    torch.testing.assert_close(model.rotary.inv_freq, inv.float() / 4)  # position interpolation: positions / 4
    apply_overrides(model, ModelOverrides(rope_scaling="ntk", rope_factor=2))
    assert model.config.rope.type == "dynamic" and model.config.max_seq_len == 128
    apply_overrides(model, ModelOverrides(rope_scaling="none", max_seq_len=100))
    assert model.config.rope.type == "default" and model.config.max_seq_len == 100
    torch.testing.assert_close(model.rotary.inv_freq, inv.float())


def test_overrides_switch_windows():
    model = apply_overrides(tiny_model(), ModelOverrides(attention="sliding", window=7))
    assert [layer.self_attn.window for layer in model.model.layers] == [7, 7]
    apply_overrides(model, ModelOverrides(attention="causal"))
    assert [layer.self_attn.window for layer in model.model.layers] == [None, None]
    assert model.config.sliding_window is None


@pytest.mark.parametrize("kw", [dict(attention="streaming"), dict(attention="mistral"), dict(rope_scaling="xpos"),
                                dict(rope_factor=0.5), dict(window=0), dict(segment_lengths="a,b")])
def test_bad_overrides(kw):
    with pytest.raises(LongseqError):
        ModelOverrides(**kw)


def test_bad_combinations_on_a_model():
    with pytest.raises(LongseqError):
        apply_overrides(tiny_model(), ModelOverrides(rope_scaling="yarn"))  # no factor > 1
    with pytest.raises(LongseqError):  # 6 is no multiple of 4
        apply_overrides(tiny_model(), ModelOverrides(attention="dilated", segment_lengths=(6,), dilation_rates=(4,)))


def test_engine_refuses_other_variants():
    from longseq.engine.llm_engine import LLMEngine
    from longseq.models.loader import LoadedModel

    model = apply_overrides(tiny_model().float(), ModelOverrides(attention="dilated", segment_lengths=(8,)))
    with pytest.raises(LongseqError, match="causal or sliding-window"):
        LLMEngine(LoadedModel(model=model, tokenizer=None, path=None))


def test_config_streaming_needs_window():
    with pytest.raises(LongseqError):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                    attention=AttentionConfig(variant="streaming"))
