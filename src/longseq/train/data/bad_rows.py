"""Rows that cannot be used: the error a row raises, the checks that raise it, and the report of those skipped."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from longseq.errors import first_line

MAX_BAD_EXAMPLES = 20


class UnusableRow(Exception):
    # Raised while reading one row; the caller either skips the row (counting it by kind) or fails the run.
    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind} ({detail})" if detail else kind)
        self.kind = kind


def tokenize(tokenizer: Any, text: str) -> list[int]:
    """The token ids of `text`; a text the tokenizer refuses is an unusable row, not a crash."""
    try:
        return list(tokenizer(text)["input_ids"])
    except Exception as e:
        raise UnusableRow("tokenizer failed", first_line(e, 150)) from None


def check_unicode(text: str, what: str) -> None:
    """JSON's \\ud800-style escapes can decode to unpaired UTF-16 surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UnusableRow("unpaired surrogate", f"{what} holds \\u{ord(text[e.start]):04x} at character {e.start}"
                          ) from None


@dataclass
class BadRow:
    source: str  # "file:line"
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass
class BadRows:
    """Rows that could not be used: counts by kind of problem and the first few examples."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[BadRow] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, source: str, kind: str, reason: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.examples) < MAX_BAD_EXAMPLES:
            self.examples.append(BadRow(source, reason))

    def summary(self) -> str:
        if not self.total:
            return "no bad rows"
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        return f"{self.total} bad row(s) skipped: {kinds}"
