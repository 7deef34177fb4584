"""The engine serving quantized weights (--quantization fp8 | int4) and an FP8 KV pool (--kv-cache-dtype fp8): the
same batching invariants as 16-bit serving, twice (here: eight times, float64) the KV blocks, and the built-in model
still answering; options checked in one line."""

from pathlib import Path

import pytest
import torch
from engine_helpers import TINY_VOCAB, FakeTokenizer, make_engine, random_prompts, run_engine

from longseq.attention.kv_fp8 import FP8
from longseq.config import EngineConfig
from longseq.engine import LLM, SamplingParams
from longseq.errors import LongseqError
from longseq.generation import generate_tokens
from longseq.models.loader import LoadedModel
from longseq.models.quant import quantize_model
from tiny_models import random_model

GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)
TIGHT = dict(kv_block_size=4, num_kv_blocks=24, max_num_batched_tokens=16)  # chunks and preempts


def tame_lm(method=None) -> LoadedModel:
    model = random_model(0, vocab_size=TINY_VOCAB, max_seq_len=256)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(0.3)
    if method:
        quantize_model(model, method, group_size=32)
    return LoadedModel(model, FakeTokenizer(), Path("tiny"))


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(6, 1, 30, seed=2)


@pytest.mark.parametrize("method", ["fp8", "int4", "int8"])
def test_quantized_weights_batched_equal_generate(method, prompts):
    lm = tame_lm(method)
    outs = run_engine(make_engine(lm, **TIGHT), prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == list(generate_tokens(lm.model, prompt, GREEDY))


def test_engine_quantizes_a_sixteen_bit_model_it_is_handed():
    lm = tame_lm()
    engine = make_engine(lm, quantization="int4", quant_group_size=32)
    assert lm.model.quantization == "int4"
    assert type(lm.model.model.layers[0].mlp.up_proj).__name__ == "Int4Linear"
    with pytest.raises(LongseqError, match="quantized int4; it cannot be served as fp8"):
        make_engine(lm, quantization="fp8")
    assert engine.runner.num_blocks == 64


def test_llm_serves_a_loaded_model_and_quantizes_it(prompts):
    """LLM(a LoadedModel): served as it is, `quantization` applied by the engine (what benchmarks/quant_accuracy.py's
    requantized configurations run); the same tokens as an engine over the same model. Not tensor-parallel."""
    lm = tame_lm()
    llm = LLM(lm, num_kv_blocks=64, quantization="int4", quant_group_size=32)
    assert llm.engine.lm is lm and lm.model.quantization == "int4"
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in run_engine(make_engine(lm), prompts, GREEDY)]
    with pytest.raises(LongseqError, match="served on one GPU"):
        LLM(tame_lm(), tensor_parallel=2)


def test_fp8_kv_pool_holds_more_blocks_in_the_same_memory():
    lm = tame_lm()
    plain = make_engine(lm, num_kv_blocks=None, kv_cache_gib=0.001)
    fp8 = make_engine(lm, num_kv_blocks=None, kv_cache_gib=0.001, kv_cache_dtype="fp8")
    assert fp8.runner.cache.k[0].dtype == FP8 and plain.runner.cache.k[0].dtype == torch.float32
    assert fp8.runner.num_blocks == 4 * plain.runner.num_blocks  # float32: 4 bytes a value, e4m3: 1


def test_fp8_kv_pool_serves_nearly_the_same_tokens(prompts):
    lm = tame_lm()
    ref = run_engine(make_engine(lm, **TIGHT), prompts, GREEDY)
    outs = run_engine(make_engine(lm, **TIGHT, kv_cache_dtype="fp8"), prompts, GREEDY)
    first = [o.token_ids[0] for o in outs] == [r.token_ids[0] for r in ref]
    same = sum(a == b for o, r in zip(outs, ref, strict=True) for a, b in zip(o.token_ids, r.token_ids, strict=True))
    assert first and same >= 0.75 * len(prompts) * GREEDY.max_new_tokens
    batched_alone = [run_engine(make_engine(lm, kv_cache_dtype="fp8"), [p], GREEDY)[0] for p in prompts[:2]]
    assert [o.token_ids for o in batched_alone] == [o.token_ids for o in outs[:2]]  # batching changes nothing


@pytest.mark.parametrize("options,match", [
    (dict(quantization="int3"), "quantization must be one of fp8, int4, int8"),
    (dict(quant_group_size=48), "quant_group_size must be one of 32, 64, 128"),
    (dict(kv_cache_dtype="int8"), "kv_cache_dtype must be one of auto, fp8"),
    (dict(quantization="fp8", tensor_parallel=2), "quantized weights are served on one GPU"),
])
def test_bad_options_are_one_line(options, match):
    with pytest.raises(LongseqError, match=match):
        EngineConfig(**options)


@pytest.mark.parametrize("method", ["fp8", "int4", "int8"])
def test_default_model_quantized_still_answers(method):
    llm = LLM(None, device="cpu", dtype="float32", num_kv_blocks=64, quantization=method, kv_cache_dtype="fp8")
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_new_tokens=8))[0]
    assert "Paris" in out.text
    assert llm.engine.lm.model.quantization == method


def test_tensor_parallel_refuses_a_quantized_checkpoint():
    from longseq.engine.tensor_parallel import TensorParallel, shard_model

    with pytest.raises(LongseqError, match=r"quantized weights \(fp8\) are served on one GPU"):
        shard_model(tame_lm("fp8").model, TensorParallel(2, 0))


def test_serve_and_generate_flags():
    from longseq.cli import build_parser
    from longseq.config.flags import config_from

    args = build_parser().parse_args(["serve", "--quantization", "int4", "--quant-group-size", "64",
                                      "--kv-cache-dtype", "fp8"])
    cfg = config_from(EngineConfig, args)
    assert (cfg.quantization, cfg.quant_group_size, cfg.kv_cache_dtype) == ("int4", 64, "fp8")
    gen = build_parser().parse_args(["generate", "hi", "--quantization", "fp8"])
    assert gen.quantization == "fp8" and gen.quant_group_size == 128
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["generate", "hi", "--quantization", "int3"])
    assert e.value.code == 2
