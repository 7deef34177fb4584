"""BLEU and ROUGE: our corpus scores equal sacrebleu / rouge-score called directly, and hand-computed values."""

import json
import math

import pytest

from longseq.errors import LongseqError
from longseq.eval.textgen import bleu, read_rows, rouge, run_textgen

HYPS = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog", "hello there general kenobi"]
REFS = [["the cat sat on a mat"], ["the quick brown fox jumped over the lazy dog"], ["hello there"]]


def test_bleu_matches_sacrebleu():
    import sacrebleu

    ours = bleu(HYPS, REFS)
    direct = sacrebleu.corpus_bleu(HYPS, [[r[0] for r in REFS]])
    assert ours["bleu"] == pytest.approx(direct.score, abs=1e-12)
    assert ours["precisions"] == pytest.approx(direct.precisions)
    assert ours["brevity_penalty"] == pytest.approx(direct.bp)


def test_bleu_by_hand():
    # 1..4-gram precisions 5/6, 3/5, 2/4, 1/3 ("the" clipped to one match), equal lengths: no brevity penalty.
    score = bleu(["the cat sat on the mat"], [["the cat sat on a mat"]])["bleu"]
    assert score == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-9)
    assert bleu(["a b c d e"], [["a b c d e"]])["bleu"] == pytest.approx(100)
    # Brevity penalty exp(1 - r/c) for a hypothesis shorter than its reference: all n-grams match.
    short = bleu(["a b c d e"], [["a b c d e f g"]])
    assert short["bleu"] == pytest.approx(100 * math.exp(1 - 7 / 5), abs=1e-9)


def test_bleu_several_references():
    # The second reference equals the hypothesis: every n-gram matches; rows with fewer references are allowed.
    two = bleu(["a b c d e", "x y z w v"], [["a b q d e", "a b c d e"], ["x y z w v"]])
    assert two["bleu"] == pytest.approx(100)
    one = bleu(["a b c d e", "x y z w v"], [["a b q d e"], ["x y z w v"]])
    assert one["bleu"] < 100


def test_rouge_matches_rouge_score():
    from rouge_score import rouge_scorer

    ours = rouge(HYPS, REFS)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [scorer.score(r[0], h) for h, r in zip(HYPS, REFS, strict=True)]
    for t in ("rouge1", "rouge2", "rougeL"):
        assert ours[t]["f1"] == pytest.approx(100 * sum(d[t].fmeasure for d in direct) / 3, abs=1e-9)
        assert ours[t]["precision"] == pytest.approx(100 * sum(d[t].precision for d in direct) / 3, abs=1e-9)
        assert ours[t]["recall"] == pytest.approx(100 * sum(d[t].recall for d in direct) / 3, abs=1e-9)


def test_rouge_by_hand():
    r = rouge(["the cat sat"], [["the cat ran"]])
    assert r["rouge1"]["f1"] == pytest.approx(200 / 3)  # 2 of 3 words
    assert r["rouge2"]["f1"] == pytest.approx(50)  # "the cat" of 2 bigrams
    assert r["rougeL"]["f1"] == pytest.approx(200 / 3)  # LCS "the cat"
    asym = rouge(["the cat"], [["the cat sat on the mat"]])["rouge1"]
    assert asym["precision"] == pytest.approx(100) and asym["recall"] == pytest.approx(100 * 2 / 6)
    best = rouge(["the cat sat"], [["dogs bark", "the cat sat"]])  # the best reference counts
    assert best["rougeL"]["f1"] == pytest.approx(100)


def test_read_rows_and_score_given_predictions(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": "p", "reference": r[0], "prediction": h} for h, r in zip(HYPS, REFS, strict=True)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = run_textgen(None, read_rows(path), "bleu")
    assert report.scores["bleu"] == pytest.approx(bleu(HYPS, REFS)["bleu"])
    assert report.generated == 0 and report.to_json()["examples"] == 3


@pytest.mark.parametrize("line, match", [
    ("not json", "not JSON"), ('{"prompt": "p"}', "reference"), ('{"reference": "r"}', "prompt"),
    ('{"prompt": "p", "references": []}', "references"), ('{"prediction": 3, "reference": "r"}', "prediction"),
])
def test_bad_rows(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "reference": "ok"}\n' + line + "\n")
    with pytest.raises(LongseqError, match=f"bad.jsonl:2: .*{match}"):
        read_rows(path)
