"""`longseq serve --attention memory`: its flags reach the model overrides the engine is built with, and what the
engine cannot serve is refused in one line before the model loads."""

import pytest

from longseq.cli import build_parser, main
from longseq.config import ModelOverrides
from longseq.config.flags import config_from


def test_memory_flags_become_model_overrides():
    args = build_parser().parse_args(["serve", "--attention", "memory", "--window", "2048", "--sink-tokens", "4",
                                      "--block-size", "64", "--retrieved-blocks", "8", "--kv-block-size", "16"])
    assert config_from(ModelOverrides, args) == ModelOverrides(attention="memory", window=2048, sink_tokens=4,
                                                               block_size=64, retrieved_blocks=8)
    assert args.kv_block_size == 16  # the engine's own flags beside them


@pytest.mark.parametrize("flags, words", [
    (["--memory-placement", "disk"], "memory_placement must be one of"),
    (["--retrieved-blocks", "-1"], "retrieved_blocks must be >= 0"),
    (["--attention-chunk", "512"], "--attention-chunk does not apply to the serving engine"),
    (["--tensor-parallel", "2"], "applied on one GPU"),
])
def test_bad_memory_flags_are_one_line(flags, words, capsys):
    assert main(["serve", "--attention", "memory", *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_load_engine_applies_the_overrides(tmp_path, tokenizer_dir):
    # What `longseq serve --attention memory` builds (on a thread or in the engine process): a model trained on
    # 256 positions serves a 700-token prompt.
    import shutil

    import torch
    import transformers

    from longseq.config import EngineConfig
    from longseq.engine import SamplingParams
    from longseq.engine.core_process import describe, load_engine

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    shutil.copytree(tokenizer_dir, tmp_path, dirs_exist_ok=True)
    overrides = ModelOverrides(attention="memory", window=64, sink_tokens=4, block_size=32, retrieved_blocks=2)
    engine = load_engine(tmp_path, "float32", "cpu", EngineConfig(num_kv_blocks=64, kv_block_size=16), None,
                         overrides)
    info = describe(engine)
    assert info["memory"] == {"sink_tokens": 4, "window": 64, "block_size": 32, "retrieved_blocks": 2}
    assert info["max_model_len"] == 64 * 16
    engine.add_request(list(range(100, 800)), SamplingParams(max_new_tokens=2, ignore_eos=True))
    outs = [o for _ in range(50) if engine.has_unfinished() for o in engine.step() if o.finished]
    assert len(outs[0].token_ids) == 2
