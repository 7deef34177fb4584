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
