"""Rows to documents: token ids with a per-token loss mask, `{"text": ...}` rows trained on every token."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from longseq.config.train import DEFAULT_MAX_ROW_BYTES
from longseq.errors import LongseqError, first_line
from longseq.train.data.bad_rows import BadRows, UnusableRow, check_unicode, tokenize
from longseq.train.data.chat import chat_tokens
from longseq.train.data.files import decode, file_rows, is_text_file, resolve_files

OnBadRow = Literal["skip", "fail"]


@dataclass
class Document:
    input_ids: list[int]
    loss_mask: list[bool]  # per token: is this token a training target
    source: str  # "file:line"


def load_documents(
    paths: Sequence[str | Path], tokenizer: Any, on_bad_row: OnBadRow = "skip",
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
) -> tuple[list[Document], BadRows, int]:
    """Documents of every usable row, the report of bad ones, and the number of files read.

    Rows over `max_row_bytes` are bad rows, skipped without being read whole."""
    if on_bad_row not in ("skip", "fail"):
        raise LongseqError(f"on_bad_row must be 'skip' or 'fail', not {on_bad_row!r}")
    if max_row_bytes <= 0:
        raise LongseqError(f"max_row_bytes must be positive, got {max_row_bytes}")
    files = resolve_files(paths)
    bad = BadRows()
    docs = [doc for path in files for doc in _file_documents(path, tokenizer, bad, on_bad_row, max_row_bytes)]
    if not docs:
        detail = f"; {bad.summary()}, e.g. {bad.examples[0]}" if bad.total else ""
        raise LongseqError(f"no usable training documents in {', '.join(map(str, paths))}{detail}")
    return docs, bad, len(files)


def text_document(text: str, tokenizer: Any, source: str) -> Document:
    if not isinstance(text, str):
        raise UnusableRow("text is not a string")
    if not text.strip():
        raise UnusableRow("empty text")
    check_unicode(text, "text")
    ids = tokenize(tokenizer, text)  # adds BOS where the tokenizer is configured to
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)  # documents end with EOS, so the model learns where text stops
    return Document(ids, [True] * len(ids), source)


def row_document(line: bytes, tokenizer: Any, source: str) -> Document:
    try:
        row = json.loads(decode(line))
    except json.JSONDecodeError as e:
        raise UnusableRow("invalid JSON", e.msg) from None
    except RecursionError:  # the parser recurses once per level of [ / {
        raise UnusableRow("nested too deeply", "JSON nesting deeper than Python's recursion limit") from None
    except ValueError as e:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise UnusableRow("invalid JSON", first_line(e, 150)) from None
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


def _file_documents(path: Path, tokenizer: Any, bad: BadRows, on_bad_row: OnBadRow,
                    max_row_bytes: int) -> Iterator[Document]:
    for row in file_rows(path, max_row_bytes):
        source = f"{path}:{row.line}"
        try:
            raw = row.bytes(max_row_bytes)
            if is_text_file(path):
                yield text_document(decode(raw), tokenizer, source)
            else:
                yield row_document(raw, tokenizer, source)
        except UnusableRow as e:
            if on_bad_row == "fail":
                raise LongseqError(f"{source}: {e}") from None
            bad.add(source, e.kind, str(e))
