"""Generate for a JSONL of prompts and score against references: BLEU (sacrebleu) and ROUGE-1/2/L (rouge-score).

BLEU (Papineni et al. 2002): geometric mean of clipped 1..4-gram precisions times a brevity penalty, over the whole
corpus, as sacrebleu computes it (Post 2018, arXiv 1804.08771: its default 13a tokenizer, so scores compare across
papers). ROUGE (Lin 2004): n-gram (ROUGE-1, -2) and longest-common-subsequence (ROUGE-L) overlap, as precision,
recall and F1 per example with Porter stemming, averaged over examples; with several references an example takes
the best-scoring one (rouge-score's `score_multi`). Scores are reported on a 0-100 scale.

Rows: {"prompt": str or chat messages, "reference": str} or {"references": [str, ...]}; a row that already has a
"prediction" is scored as it is (no generation).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longseq.errors import LongseqError, first_line

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@dataclass
class TextRow:
    prompt: str | list[dict] | None
    references: list[str]
    prediction: str | None = None
    source: str = ""


@dataclass
class TextGenReport:
    task: str
    predictions: list[str]
    references: list[list[str]]
    scores: dict[str, Any]
    generated: int = 0  # rows generated here (the others came with a prediction)
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, **self.scores, "examples": len(self.predictions), "generated": self.generated,
                "seconds": self.seconds, "rows": self.rows}


def read_rows(path: str | Path) -> list[TextRow]:
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LongseqError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LongseqError(f"{path}: cannot read as UTF-8 text ({first_line(e)})") from None
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LongseqError(f"{where}: not JSON ({first_line(e)})") from None
        if not isinstance(row, dict):
            raise LongseqError(f"{where}: expected a JSON object")
        refs = row.get("references", [row["reference"]] if "reference" in row else None)
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise LongseqError(f"{where}: needs \"reference\" (a string) or \"references\" (a list of strings)")
        prediction, prompt = row.get("prediction"), row.get("prompt")
        if prediction is not None and not isinstance(prediction, str):
            raise LongseqError(f"{where}: \"prediction\" must be a string")
        if prediction is None and not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt)):
            raise LongseqError(f"{where}: needs a \"prompt\" (a string or chat messages) or a \"prediction\"")
        rows.append(TextRow(prompt, refs, prediction, where))
    if not rows:
        raise LongseqError(f"{path}: no rows")
    return rows


def bleu(predictions: list[str], references: list[list[str]]) -> dict[str, Any]:
    """Corpus BLEU; examples may have different numbers of references (missing ones are None for sacrebleu)."""
    import sacrebleu

    width = max(len(r) for r in references)
    streams = [[r[i] if i < len(r) else None for r in references] for i in range(width)]
    result = sacrebleu.corpus_bleu(predictions, streams)
    return {"bleu": result.score, "precisions": list(result.precisions), "brevity_penalty": result.bp,
            "hyp_len": result.sys_len, "ref_len": result.ref_len}


def rouge(predictions: list[str], references: list[list[str]]) -> dict[str, Any]:
    """Mean precision / recall / F1 of ROUGE-1, ROUGE-2 and ROUGE-L, 0-100."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    sums = {t: [0.0, 0.0, 0.0] for t in ROUGE_TYPES}
    for prediction, refs in zip(predictions, references, strict=True):
        scores = scorer.score_multi(refs, prediction)
        for t in ROUGE_TYPES:
            s = scores[t]
            sums[t] = [sums[t][0] + s.precision, sums[t][1] + s.recall, sums[t][2] + s.fmeasure]
    n = len(predictions)
    return {t: {"precision": 100 * p / n, "recall": 100 * r / n, "f1": 100 * f / n} for t, (p, r, f) in sums.items()}


def run_textgen(lm: Any, rows: list[TextRow], task: str, params: Any = None, chat: bool = True,
                system: str | None = None) -> TextGenReport:
    """Generate the missing predictions (greedy unless `params` says otherwise), then score them with `task`
    (bleu or rouge)."""
    from longseq.generation import SamplingParams, generate

    if task not in ("bleu", "rouge"):
        raise LongseqError(f"unknown text metric {task!r}")
    params = params or SamplingParams(max_new_tokens=128)
    predictions, generated, start = [], 0, time.perf_counter()
    for row in rows:
        if row.prediction is None:
            if lm is None:
                raise LongseqError(f"{row.source}: no prediction and no model to generate one")
            row.prediction = generate(lm, row.prompt, params, chat=chat, system=system).text.strip()
            generated += 1
        predictions.append(row.prediction)
    references = [row.references for row in rows]
    scores = bleu(predictions, references) if task == "bleu" else rouge(predictions, references)
    table = [{"source": r.source, "prediction": r.prediction, "references": r.references} for r in rows]
    return TextGenReport(task, predictions, references, scores, generated, time.perf_counter() - start, table)
