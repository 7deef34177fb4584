"""Needle retrieval: prompt construction in real text (exact length, the needle after a sentence end at its
depth, the haystack repeated past its end), and the whole run on a rule-based model whose accuracy is known."""

import pytest
from rule_lm import RuleLM, ids

from longseq.errors import LongseqError
from longseq.eval.needle import (
    INSTRUCTION,
    NEEDLE,
    QUESTION,
    NeedleConfig,
    _sentence_ends,
    build_needle_prompt,
    haystack_ids,
    run_needle,
)
from longseq.eval.plots import passkey_heatmap
from longseq.models.loader import LoadedModel


@pytest.mark.parametrize("length", [300, 2000])
@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
def test_prompt_shape(tokenizer, length, depth):
    p = build_needle_prompt(tokenizer, length, depth, "Oslo", "1234567", answer_tokens=12)
    assert len(p.ids) == length - 12  # exact: the haystack is cut at any token
    needle = ids(tokenizer, NEEDLE.format(subject="Oslo", key="1234567"))
    question = ids(tokenizer, QUESTION.format(subject="Oslo"))
    instruction = ids(tokenizer, INSTRUCTION)
    assert p.ids[p.needle_at : p.needle_at + len(needle)] == needle and p.key == "1234567"
    assert p.ids[-len(question):] == question
    haystack = len(p.ids) - len(instruction) - len(needle) - len(question)
    before = p.needle_at - len(instruction)
    assert list(haystack_ids(tokenizer)[:before]) == p.ids[len(instruction) : p.needle_at]  # real text, in order
    if depth == 0.0:
        assert before == 0
    elif depth == 1.0:
        assert before == haystack
    else:
        assert p.ids[p.needle_at - 1] in _sentence_ends(tokenizer)  # after a sentence, not inside a word
        assert before <= round(depth * haystack) and abs(before / haystack - depth) < 0.1


def test_haystack_repeats_past_its_end(tokenizer):
    hay = haystack_ids(tokenizer)
    p = build_needle_prompt(tokenizer, len(hay) + 5000, 1.0, "Lima", "7654321")
    body = p.ids[len(ids(tokenizer, INSTRUCTION)) : p.needle_at]
    assert len(body) > len(hay) and body[len(hay) : len(hay) + 100] == list(hay[:100])


def test_prompt_too_short(tokenizer):
    with pytest.raises(LongseqError, match="needle length 40 is too short"):
        build_needle_prompt(tokenizer, 40, 0.5, "Oslo", "1234567")


def test_run_on_a_rule_with_known_accuracy(tokenizer, tmp_path):
    reach = 500
    cfg = NeedleConfig(lengths=(300, 700, 1100), depths=(0.0, 0.5, 1.0), trials=2, seed=5)
    rule = RuleLM(tokenizer, reach, marker=" The special magic number for")
    report = run_needle(LoadedModel(model=rule, tokenizer=tokenizer, path=tmp_path / "rule"), cfg)
    # The rule sees the needle when it starts within `reach` tokens of the end; the needle's position does not
    # depend on its key or city beyond a token or two, so the expected grid follows from any one prompt.
    expected = [[1.0 if len(p.ids) - p.needle_at <= reach else 0.0
                 for p in (build_needle_prompt(tokenizer, n, d, "Oslo", "1234567") for n in cfg.lengths)]
                for d in cfg.depths]
    assert report.grid() == expected
    assert 0 < report.accuracy() < 1
    assert len({s.key for s in report.samples}) > 1 and all(len(s.key) == 7 for s in report.samples)
    assert all(s.answer == s.key for s in report.samples if s.correct)
    js = report.to_json()
    assert js["task"] == "needle" and js["config"]["answer_tokens"] == 12
    png = passkey_heatmap(report.grid(), cfg.lengths, cfg.depths, tmp_path / "needle.png", task="needle")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_config_names_the_task():
    with pytest.raises(LongseqError, match="needle depths"):
        NeedleConfig(depths=(2.0,))
