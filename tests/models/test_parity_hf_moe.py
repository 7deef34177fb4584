"""Our mixture-of-experts models equal Hugging Face transformers' for the same weights: Mixtral, Qwen2-MoE (shared
expert, dense layers) and Qwen3-MoE (q/k norm), with GQA, RoPE scaling and sliding windows; loaded from
safetensors (one file or sharded) and from a Mixtral GGUF."""

import numpy as np
import pytest
import torch
import transformers
from parity import assert_config_roundtrips, assert_same_greedy_tokens, random_hf_model

from longseq.config import ModelConfig
from longseq.config.hf import from_hf, to_hf
from longseq.errors import LongseqError
from longseq.models import load_model
from longseq.models.sparse_moe import SparseMoeBlock

BASE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=48, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
QWEN_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def rope(rope_type, **kw):
    return dict(rope_parameters=dict(rope_type=rope_type, rope_theta=10000.0, **kw))


CASES = {
    "mixtral-sliding": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2,
                                                         sliding_window=8)),
    "mixtral-top1-yarn": (transformers.MixtralConfig, dict(
        num_local_experts=3, num_experts_per_tok=1, tie_word_embeddings=True, head_dim=16,  # yarn needs it set
        **rope("yarn", factor=2.0, original_max_position_embeddings=24))),
    "qwen2moe-shared-dense-layer": (transformers.Qwen2MoeConfig, dict(
        **QWEN_MOE, shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1])),
    "qwen2moe-sparse-step-sliding": (transformers.Qwen2MoeConfig, dict(
        **QWEN_MOE, shared_expert_intermediate_size=40, norm_topk_prob=True, decoder_sparse_step=2,
        num_hidden_layers=3, use_sliding_window=True, sliding_window=8, max_window_layers=2)),
    "qwen3moe-qknorm-linear": (transformers.Qwen3MoeConfig, dict(
        **QWEN_MOE, norm_topk_prob=True, head_dim=32, **rope("linear", factor=2.0))),
    "qwen3moe-sliding-unnormalised": (transformers.Qwen3MoeConfig, dict(
        **QWEN_MOE, norm_topk_prob=False, mlp_only_layers=[0], use_sliding_window=True, sliding_window=8,
        attention_bias=True)),
}


def _hf_model(name, tmp_path_factory, **save):
    cls, extra = CASES[name]
    path = tmp_path_factory.mktemp(name)
    return random_hf_model(cls(**{**BASE, **extra}), path, **save), path


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    hf, path = _hf_model(request.param, tmp_path_factory)
    ours = load_model(path, dtype=torch.float32, device="cpu")
    return request.param, hf, ours


def _sparse_blocks(model):
    return [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, SparseMoeBlock)]


@pytest.mark.parametrize("mode", ["loop", "padded"])
def test_logits_match(pair, mode):
    name, hf, ours = pair
    for block in _sparse_blocks(ours):
        block.mode = mode
    torch.manual_seed(1)
    ids = torch.randint(0, BASE["vocab_size"], (2, 40))  # past the sliding window (8) and yarn's original context
    with torch.no_grad():
        theirs, mine = hf(ids).logits, ours(ids)
    for block in _sparse_blocks(ours):
        block.mode = None
    assert (mine - theirs).abs().max().item() <= 1e-4, name


def test_layers_are_sparse_where_transformers_builds_experts(pair):
    name, hf, ours = pair
    theirs = [hasattr(layer.mlp, "experts") for layer in hf.model.layers]
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in ours.model.layers] == theirs
    assert all(theirs) == (name.startswith("mixtral") or name == "qwen3moe-qknorm-linear")


def test_gradients_match(pair):
    # Training: the same loss gives the same gradient for every weight, routers and stacked experts included.
    name, hf, ours = pair
    torch.manual_seed(3)
    ids = torch.randint(0, BASE["vocab_size"], (2, 24))
    hf.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    hf(ids).logits.float().logsumexp(-1).mean().backward()
    ours(ids).logsumexp(-1).mean().backward()
    theirs = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert set(mine) == set(theirs), name
    for n, g in mine.items():
        assert (g - theirs[n]).abs().max().item() <= 1e-4, (name, n)
    hf.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)


def test_greedy_generation_matches(pair):
    name, hf, ours = pair
    assert_same_greedy_tokens(hf, ours, BASE["vocab_size"], 24, name)


def test_config_roundtrip(pair):
    assert_config_roundtrips(pair[2].config)


@pytest.mark.parametrize("name", ["mixtral-sliding", "qwen2moe-shared-dense-layer"])
def test_sharded_checkpoint(name, tmp_path_factory):
    hf, path = _hf_model(name, tmp_path_factory, max_shard_size="20KB")  # experts split across shards
    assert len(list(path.glob("*.safetensors"))) > 3 and (path / "model.safetensors.index.json").is_file()
    ours = load_model(path, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, BASE["vocab_size"], (1, 12))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_loads_in_target_dtype(tmp_path_factory):
    _, path = _hf_model("qwen3moe-qknorm-linear", tmp_path_factory)
    model = load_model(path, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_missing_expert_is_named(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    _, path = _hf_model("mixtral-sliding", tmp_path_factory)
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LongseqError, match="missing, e.g. 'model.layers.1.mlp.experts.gate_up_proj'"):
        load_model(path, dtype=torch.float32, device="cpu")


def _permute(w, heads):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: Q/K rows interleaved for its RoPE."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_mixtral_gguf(tmp_path):
    # A GGUF as llama.cpp writes Mixtral: a "llama" with expert_count, experts as (E, out, in) `_exps` tensors.
    import gguf

    cls, extra = CASES["mixtral-sliding"]
    hf_cfg = cls(**{**BASE, **extra, "sliding_window": None})  # llama.cpp's Mixtral graph has no window
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    state = {n: p.detach().numpy() for n, p in hf.state_dict().items()}
    writer = gguf.GGUFWriter(str(tmp_path / "mixtral.gguf"), "llama")
    writer.add_block_count(2)
    writer.add_context_length(48)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(hf_cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(hf_cfg.rms_norm_eps)
    writer.add_expert_count(4)
    writer.add_expert_used_count(2)
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    for i in range(2):
        p, blk = f"model.layers.{i}.", f"blk.{i}."
        gate_up = state[p + "mlp.experts.gate_up_proj"]  # (E, 2I, d)
        tensors = {
            "attn_norm": state[p + "input_layernorm.weight"],
            "attn_q": _permute(state[p + "self_attn.q_proj.weight"], 4),
            "attn_k": _permute(state[p + "self_attn.k_proj.weight"], 2),
            "attn_v": state[p + "self_attn.v_proj.weight"],
            "attn_output": state[p + "self_attn.o_proj.weight"],
            "ffn_norm": state[p + "post_attention_layernorm.weight"],
            "ffn_gate_inp": state[p + "mlp.gate.weight"],
            "ffn_gate_exps": gate_up[:, :96],
            "ffn_up_exps": gate_up[:, 96:],
            "ffn_down_exps": state[p + "mlp.experts.down_proj"],
        }
        for name, w in tensors.items():
            writer.add_tensor(f"{blk}{name}.weight", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = load_model(tmp_path / "mixtral.gguf", dtype=torch.float32, device="cpu")
    assert ours.config.arch == "mixtral" and ours.config.num_experts == 4
    ids = torch.randint(0, BASE["vocab_size"], (2, 30))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_unsupported_moe_variants_fail_in_one_line():
    with pytest.raises(LongseqError, match="unsupported mixture-of-experts architecture 'deepseek_v3'") as e:
        from_hf({"model_type": "deepseek_v3", "n_routed_experts": 256, "vocab_size": 10})
    assert "mixtral, qwen2_moe, qwen3_moe" in str(e.value) and "\n" not in str(e.value)
    mixtral = to_hf(from_hf(transformers.MixtralConfig(**BASE).to_dict()))
    with pytest.raises(LongseqError, match="router_jitter_noise"):
        from_hf({**mixtral, "router_jitter_noise": 0.1})
    tiny = dict(vocab_size=10, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=2)
    with pytest.raises(LongseqError, match="unsupported MoE router 'sigmoid'"):
        ModelConfig(**tiny, num_experts=4, experts_per_token=2, router="sigmoid")
    with pytest.raises(LongseqError, match="experts_per_token"):
        ModelConfig(**tiny, num_experts=4, experts_per_token=5)
    with pytest.raises(LongseqError, match="cannot express"):
        to_hf(ModelConfig(**tiny, arch="mixtral", num_experts=4, experts_per_token=2, sparse_layers=(True, False)))


def test_qwen2_moe_window_layers_without_layer_types():
    # Older config.json files have no layer_types: the layers transformers derives from max_window_layers.
    cls, extra = CASES["qwen2moe-sparse-step-sliding"]
    hf = cls(**{**BASE, **extra, "num_hidden_layers": 5, "max_window_layers": 3}).to_dict()
    assert from_hf({k: v for k, v in hf.items() if k != "layer_types"}) == from_hf(hf)
    assert from_hf(hf).sliding_layers == (True, False, True, False, False)
