"""Our model equals Hugging Face transformers' for the same weights, for every supported family and RoPE type."""

import pytest
import torch
import transformers
from parity import assert_config_roundtrips, assert_same_greedy_tokens, random_hf_model

from longseq.config.hf import from_hf
from longseq.models import load_model

BASE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=48, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)


def rope(rope_type, **kw):
    return dict(rope_parameters=dict(rope_type=rope_type, rope_theta=10000.0, **kw))


CASES = {
    "llama-mha": (transformers.LlamaConfig, dict(num_key_value_heads=4)),
    "llama-gqa-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "llama-mqa": (transformers.LlamaConfig, dict(num_key_value_heads=1)),
    "llama-bias": (transformers.LlamaConfig, dict(attention_bias=True, mlp_bias=True)),
    "llama-rope-linear": (transformers.LlamaConfig, rope("linear", factor=2.0)),
    "llama-rope-dynamic": (transformers.LlamaConfig, rope("dynamic", factor=2.0)),
    "llama-rope-yarn": (transformers.LlamaConfig, rope("yarn", factor=2.0, original_max_position_embeddings=24)),
    "llama3.1-rope": (
        transformers.LlamaConfig,
        rope("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16),
    ),
    "mistral-sliding": (transformers.MistralConfig, dict(sliding_window=8)),
    "qwen2-bias": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen2-sliding-layers": (
        transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    ),
    "qwen3-qknorm": (transformers.Qwen3Config, dict(head_dim=32)),
}


def _hf_model(name, tmp_path_factory):
    cls, extra = CASES[name]
    path = tmp_path_factory.mktemp(name)
    return random_hf_model(cls(**{**BASE, **extra}), path), path


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    hf, path = _hf_model(request.param, tmp_path_factory)
    ours = load_model(path, dtype=torch.float32, device="cpu")
    return request.param, hf, ours


def test_logits_match(pair):
    name, hf, ours = pair
    torch.manual_seed(1)
    # 40 tokens: past the sliding window (8), the yarn/llama3 original context and, with dynamic NTK, near the end.
    ids = torch.randint(0, BASE["vocab_size"], (2, 40))
    with torch.no_grad():
        theirs, mine = hf(ids).logits, ours(ids)
    assert (mine - theirs).abs().max().item() <= 1e-4, name


def test_dynamic_ntk_beyond_context():
    # Past max_position_embeddings the dynamic base grows with the length: both must agree there too.
    cls, extra = CASES["llama-rope-dynamic"]
    hf_cfg = cls(**{**BASE, **extra, "max_position_embeddings": 16})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    ours_cfg = from_hf(hf_cfg.to_dict())
    from longseq.models.llama import CausalLM

    ours = CausalLM(ours_cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    ours.tie_weights()
    ids = torch.randint(0, BASE["vocab_size"], (1, 40))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_greedy_generation_matches(pair):
    name, hf, ours = pair
    assert_same_greedy_tokens(hf, ours, BASE["vocab_size"], 32, name)


def test_config_roundtrip(pair):
    assert_config_roundtrips(pair[2].config)


def test_loads_in_target_dtype(tmp_path_factory):
    _, path = _hf_model("qwen3-qknorm", tmp_path_factory)
    model = load_model(path, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_sharded_checkpoint(tmp_path_factory):
    cls, extra = CASES["llama-gqa-tied"]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cls(**{**BASE, **extra})).eval()
    path = tmp_path_factory.mktemp("sharded")
    hf.save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    ours = load_model(path, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, BASE["vocab_size"], (1, 12))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_unsupported_architecture_names_supported():
    from longseq.errors import LongseqError

    with pytest.raises(LongseqError, match="llama, mistral, qwen2, qwen3"):
        from_hf({"model_type": "gpt2", "vocab_size": 10})
