"""Rows to documents: token ids with a per-token loss mask, `{"text": ...}` rows trained on every token."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from longseq.errors import LongseqError
from longseq.train.data.bad_rows import BadRows, UnusableRow
from longseq.train.data.chat import chat_tokens
from longseq.train.data.files import decode, file_rows, is_text_file, resolve_files

OnBadRow = Literal["skip", "fail"]


@dataclass
class Document:
    input_ids: list[int]
    loss_mask: list[bool]  # per token: is this token a training target
    source: str  # "file:line"


def load_documents(
    paths: Sequence[str | Path], tokenizer: Any, on_bad_row: OnBadRow = "skip"
) -> tuple[list[Document], BadRows, int]:
    """Documents of every usable row, the report of bad ones, and the number of files read."""
    if on_bad_row not in ("skip", "fail"):
        raise LongseqError(f"on_bad_row must be 'skip' or 'fail', not {on_bad_row!r}")
    files = resolve_files(paths)
    bad = BadRows()
    docs = [doc for path in files for doc in _file_documents(path, tokenizer, bad, on_bad_row)]
    if not docs:
        detail = f"; {bad.summary()}, e.g. {bad.examples[0]}" if bad.total else ""
        raise LongseqError(f"no usable training documents in {', '.join(map(str, paths))}{detail}")
    return docs, bad, len(files)


def text_document(text: str, tokenizer: Any, source: str) -> Document:
    if not isinstance(text, str):
        raise UnusableRow("text is not a string")
    if not text.strip():
        raise UnusableRow("empty text")
    ids = list(tokenizer(text)["input_ids"])  # adds BOS where the tokenizer is configured to
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)  # documents end with EOS, so the model learns where text stops
    return Document(ids, [True] * len(ids), source)


def row_document(line: bytes, tokenizer: Any, source: str) -> Document:
    try:
        row = json.loads(decode(line))
    except json.JSONDecodeError as e:
        raise UnusableRow("invalid JSON", e.msg) from None
    if not isinstance(row, dict):
        raise UnusableRow("not a JSON object", f"got {type(row).__name__}")
    if "text" in row and "messages" in row:
        raise UnusableRow("both text and messages")
    if "text" in row:
        return text_document(row["text"], tokenizer, source)
    if "messages" in row:
        if getattr(tokenizer, "chat_template", None) is None:
            raise LongseqError(f"{source}: chat rows need a tokenizer with a chat template; this one has none")
        return Document(*chat_tokens(row["messages"], tokenizer), source)
    raise UnusableRow("neither text nor messages")


def _file_documents(path: Path, tokenizer: Any, bad: BadRows, on_bad_row: OnBadRow) -> Iterator[Document]:
    for number, raw in file_rows(path):
        source = f"{path}:{number}"
        try:
            if is_text_file(path):
                yield text_document(decode(raw), tokenizer, source)
            else:
                yield row_document(raw, tokenizer, source)
        except UnusableRow as e:
            if on_bad_row == "fail":
                raise LongseqError(f"{source}: {e}") from None
            bad.add(source, e.kind, str(e))
