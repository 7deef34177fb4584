"""Finding the data files and reading them as raw rows: one per non-blank .jsonl line, one per .txt file.

Files are streamed: a .jsonl file is read line by line and a row longer than the row limit is skipped over in
fixed-size pieces, never held whole, so memory is bounded by the limit, not by the file or its longest line.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from longseq.config.train import DEFAULT_MAX_ROW_BYTES
from longseq.errors import LongseqError, first_line
from longseq.train.data.bad_rows import UnusableRow

SUFFIXES = (".jsonl", ".txt")
BOM = b"\xef\xbb\xbf"
_SKIP_PIECE = 1 << 20  # an oversized line is read past in pieces of this many bytes


@dataclass(frozen=True)
class RawRow:
    line: int  # 1-based line number; a .txt file is one row, line 1
    data: bytes | None  # None: the row is longer than the limit and was not read
    size: int  # bytes in the row (without its line break)

    def bytes(self, max_row_bytes: int) -> bytes:
        """The row's bytes, or UnusableRow when it was too long to read."""
        if self.data is None:
            raise UnusableRow("row over --max-row-bytes", f"{self.size:,} bytes > {max_row_bytes:,}")
        return self.data


def resolve_files(paths: Sequence[str | Path], suffixes: Sequence[str] = SUFFIXES, kind: str = "data",
                  none_given: str = "no training data given") -> list[Path]:
    """The files named by `paths`: files as given, folders expanded to their files with `suffixes`, sorted."""
    names = ", ".join(suffixes[:-1]) + " or " + suffixes[-1]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise LongseqError(f"{path}: no such file or directory")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise LongseqError(f"{path}: folder holds no {names} files")
            files.extend(found)
        elif path.suffix.lower() in suffixes:
            files.append(path)
        else:
            raise LongseqError(f"{path}: unsupported {kind} file (expected {', '.join(suffixes)} or a folder)")
    if not files:
        raise LongseqError(none_given)
    return files


def is_text_file(path: Path) -> bool:
    return path.suffix.lower() == ".txt"


def file_rows(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[RawRow]:
    """Each row of the file: a .txt file is one row, even when blank; a .jsonl file one per non-blank line.

    Rows over `max_row_bytes` come with `data` None (their size counted, their bytes skipped)."""
    try:
        with open(path, "rb") as f:
            if is_text_file(path):
                yield _text_row(f, max_row_bytes)
            else:
                yield from _jsonl_rows(f, max_row_bytes)
    except OSError as e:
        raise LongseqError(f"{path}: cannot read ({first_line(e)})") from None


def decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnusableRow("not UTF-8", f"byte {e.start}") from None


def _text_row(f, limit: int) -> RawRow:
    data = f.read(len(BOM) + limit + 1).removeprefix(BOM)
    if len(data) <= limit:
        return RawRow(1, data, len(data))
    return RawRow(1, None, len(data) + _skip(f, stop_at_newline=False))


def _jsonl_rows(f, limit: int) -> Iterator[RawRow]:
    # Split on b"\n" only: str.splitlines would also split on U+2028 and friends, legal unescaped inside JSON strings.
    number = 0
    while True:
        line = f.readline(limit + 1 + (len(BOM) if number == 0 else 0))  # at most the limit, a byte and "\n"
        if not line:
            return
        number += 1
        if number == 1:
            line = line.removeprefix(BOM)
        if line.endswith(b"\n"):
            line = line[:-1]
        elif len(line) > limit:  # no line break within the limit: too long; read past the rest of it
            yield RawRow(number, None, len(line) + _skip(f, stop_at_newline=True))
            continue
        if len(line) > limit:
            yield RawRow(number, None, len(line))
        elif line.strip():
            yield RawRow(number, line, len(line))


def _skip(f, stop_at_newline: bool) -> int:
    """Read past the rest of a row in bounded pieces; the bytes skipped (the line break not counted)."""
    skipped = 0
    while True:
        piece = f.readline(_SKIP_PIECE) if stop_at_newline else f.read(_SKIP_PIECE)
        if not piece:
            return skipped
        if stop_at_newline and piece.endswith(b"\n"):
            return skipped + len(piece) - 1
        skipped += len(piece)
