"""Tensor-parallel inference on 2 gloo processes: the sharded model's logits equal the whole model's (GQA, biases,
tied and untied embeddings, a vocabulary N does not divide), and the tensor-parallel engine generates exactly what
the single-process engine generates (greedy; prefill chunks, batched decode, preemption-free)."""

import pytest
import torch
from engine_helpers import make_engine, run_engine, tiny_lm

from dist_helpers import run_workers
from longseq.config import EngineConfig, ModelConfig
from longseq.engine.tensor_parallel import TensorParallel, check_tensor_parallel, shard_model
from longseq.engine.tp_engine import build_engine, run_worker
from longseq.errors import LongseqError
from longseq.generation.sampling import SamplingParams
from longseq.models.llama import CausalLM

# vocab 97 is odd: the second rank's vocabulary slice is padded
CONFIGS = {
    "gqa-untied": dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=2),
    "bias-tied-qknorm": dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                             num_kv_heads=4, qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True,
                             qk_norm=True, arch="qwen3"),
}


def _model(name: str) -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**CONFIGS[name], max_seq_len=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.double()


IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))


def _logits_worker(rank, world):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    out = {}
    for name in CONFIGS:
        model = shard_model(_model(name), TensorParallel(world, rank))
        with torch.inference_mode():
            out[name] = model(IDS)
    return out


def test_sharded_logits_equal_whole_model():
    results = run_workers(_logits_worker, 2)
    for name in CONFIGS:
        with torch.inference_mode():
            want = _model(name)(IDS)
        for rank_out in results:
            assert rank_out[name].shape == want.shape == (2, 11, 97)
            torch.testing.assert_close(rank_out[name], want, rtol=1e-10, atol=1e-10)


PROMPTS = [[5, 9, 13, 2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55], [7, 7, 8], [90, 3, 1, 4]]
PARAMS = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
OPTIONS = dict(num_kv_blocks=64, kv_block_size=4, max_num_batched_tokens=16)  # the long prompt prefills in chunks


def _engine_worker(rank, world):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    tp = TensorParallel(world, rank)
    lm = tiny_lm()
    shard_model(lm.model, tp)
    cfg = EngineConfig(**OPTIONS, tensor_parallel=world)
    if rank != 0:
        run_worker(lm, cfg, tp)
        return None
    engine = build_engine(lm, cfg, tp)
    cache = engine.runner.cache
    kv_bytes_per_token = sum(t[0].nbytes for t in cache.k + cache.v)  # one slot of every layer's K and V pool
    weights = sum(p.numel() for p in lm.model.parameters())
    outputs = [o.token_ids for o in run_engine(engine, PROMPTS, PARAMS)]
    engine.close()
    return outputs, cache.k[0].shape[1], kv_bytes_per_token, weights


@pytest.fixture(scope="module")
def tp_engine():
    return run_workers(_engine_worker, 2)[0]


def test_tensor_parallel_engine_generates_the_same_tokens(tp_engine):
    want = [o.token_ids for o in run_engine(make_engine(tiny_lm(), **OPTIONS), PROMPTS, PARAMS)]
    outputs, kv_heads, _, _ = tp_engine
    assert kv_heads == 1  # tiny_lm has 2 KV heads: one per rank in each rank's cache
    assert outputs == want and all(len(o) == 12 for o in want)


def test_planner_predicts_each_ranks_kv_cache_and_weights(tp_engine):
    from longseq.plan.models import ModelSpec
    from longseq.plan.params import count_params
    from longseq.plan.serving import kv_bytes_per_token

    spec = ModelSpec("tiny", tiny_lm().config)
    _, _, kv, weights = tp_engine
    assert kv == kv_bytes_per_token(spec, kv_bytes=8) / 2  # float64 model: 8-byte K and V, half the heads
    # The planner halves every weight; replicated norms and the padded vocabulary row add a little on each rank.
    assert weights == pytest.approx(count_params(spec).total / 2, rel=0.02)


def test_degree_must_divide_heads_and_mlp():
    cfg = ModelConfig(**CONFIGS["gqa-untied"])
    check_tensor_parallel(cfg, 2)
    with pytest.raises(LongseqError, match="must divide the model's 2 KV heads"):
        check_tensor_parallel(cfg, 4)
    with pytest.raises(LongseqError, match="MLP width 90"):
        check_tensor_parallel(ModelConfig(**{**CONFIGS["gqa-untied"], "num_kv_heads": 4, "intermediate_size": 90}), 4)


def test_llm_with_tensor_parallel_starts_and_stops_its_workers(tmp_path, tokenizer_dir):
    import shutil

    import transformers

    from longseq.engine import LLM

    torch.manual_seed(0)
    hf = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    transformers.AutoModelForCausalLM.from_config(hf).save_pretrained(tmp_path)
    shutil.copytree(tokenizer_dir, tmp_path, dirs_exist_ok=True)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    want = LLM(str(tmp_path), device="cpu", dtype="float32", num_kv_blocks=64).generate(prompts, params)
    llm = LLM(str(tmp_path), device="cpu", dtype="float32", num_kv_blocks=64, tensor_parallel=2)
    try:
        got = llm.generate(prompts, params)
    finally:
        llm.close()
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert not llm.engine.processes[0].is_alive()  # the worker left its loop and exited
