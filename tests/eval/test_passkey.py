"""Passkey retrieval: prompt construction, answer parsing, and the whole run on a rule-based model whose accuracy
per (length, depth) is known in advance."""

import pytest
from rule_lm import RuleLM

from longseq.errors import LongseqError
from longseq.eval.passkey import INSTRUCTION, NEEDLE, QUESTION, PasskeyConfig, build_prompt, parse_answer, run_passkey
from longseq.eval.plots import passkey_heatmap
from longseq.models.loader import LoadedModel


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("length", [200, 1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_prompt_shape(tokenizer, length, depth):
    p = build_prompt(tokenizer, length, depth, "12345", answer_tokens=8)
    filler_len = len(_ids(tokenizer, " The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
                                     "back again."))
    assert length - 8 - filler_len < len(p.ids) <= length - 8  # whole filler groups, room for the answer
    needle = _ids(tokenizer, NEEDLE.format(key="12345"))
    assert p.ids[p.needle_at : p.needle_at + len(needle)] == needle
    assert p.ids[-len(_ids(tokenizer, QUESTION)):] == _ids(tokenizer, QUESTION)
    haystack = len(p.ids) - len(needle) - len(_ids(tokenizer, QUESTION))
    if depth == 0.0:
        assert p.needle_at == len(_ids(tokenizer, INSTRUCTION))  # right after the instruction
    if depth == 1.0:
        assert p.needle_at + len(needle) == len(p.ids) - len(_ids(tokenizer, QUESTION))  # right before the question
    fraction = p.needle_at / haystack
    assert abs(fraction - depth) < 0.1 + 60 / length  # the instruction is ~30 tokens, filler groups 24


def test_prompt_too_short(tokenizer):
    with pytest.raises(LongseqError, match="too short"):
        build_prompt(tokenizer, 50, 0.5, "12345")


def test_parse_answer():
    assert parse_answer(" 68217.") == "68217"
    assert parse_answer(" is 123 and 456") == "123"
    assert parse_answer(" the pass key.") is None


def test_bad_config():
    for kw in (dict(depths=(1.5,)), dict(lengths=(0,)), dict(trials=0), dict(lengths=())):
        with pytest.raises(LongseqError):
            PasskeyConfig(**kw)


def test_run_on_a_rule_with_known_accuracy(tokenizer, tmp_path):
    reach = 400
    cfg = PasskeyConfig(lengths=(300, 600, 900), depths=(0.0, 0.5, 1.0), trials=2, seed=3)
    lm = LoadedModel(model=RuleLM(tokenizer, reach), tokenizer=tokenizer, path=tmp_path / "rule")
    report = run_passkey(lm, cfg)
    expected = []
    for depth in cfg.depths:
        row = []
        for length in cfg.lengths:
            p = build_prompt(tokenizer, length, depth, "12345", cfg.answer_tokens)
            row.append(1.0 if len(p.ids) - p.needle_at <= reach else 0.0)
        expected.append(row)
    assert report.grid() == expected
    assert 0 < report.accuracy() < 1  # both outcomes occur, so the grid comparison means something
    assert len(report.samples) == 3 * 3 * 2 and len({s.key for s in report.samples}) > 1
    assert all(s.answer == s.key for s in report.samples if s.correct)
    js = report.to_json()
    assert js["accuracy"] == pytest.approx(sum(map(sum, expected)) / 9)
    png = passkey_heatmap(report.grid(), cfg.lengths, cfg.depths, tmp_path / "heat.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away


def test_lengths_beyond_the_context(tokenizer, tmp_path):
    model = RuleLM(tokenizer, 10)
    model.config.max_seq_len = 500
    lm = LoadedModel(model=model, tokenizer=tokenizer, path=tmp_path)
    with pytest.raises(LongseqError, match="exceeds the model's context"):
        run_passkey(lm, PasskeyConfig(lengths=(400, 800), depths=(0.5,)))


def test_default_model_retrieves_the_key_from_memory(tmp_path):
    # SmolLM2 with memory attention (InfLLM): a 256-token window, the key ~770 tokens back, so only a retrieved
    # block holds it. CPU, about three seconds.
    from longseq.config import ModelOverrides
    from longseq.eval.model import load_for_eval

    overrides = ModelOverrides(attention="memory", window=256, block_size=32, retrieved_blocks=4)
    lm = load_for_eval(device="cpu", dtype="float32", overrides=overrides)
    cfg = PasskeyConfig(lengths=(1024,), depths=(0.25,))
    prompt = build_prompt(lm.tokenizer, 1024, 0.25, "12345", cfg.answer_tokens)
    assert len(prompt.ids) - prompt.needle_at > 2 * 256 + 32  # beyond the window of every query block
    report = run_passkey(lm, cfg)
    assert report.accuracy() == 1.0, report.samples[0].text
