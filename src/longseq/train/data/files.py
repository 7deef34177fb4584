"""Finding the data files and reading them as raw rows: one per non-blank .jsonl line, one per .txt file."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from longseq.errors import LongseqError, first_line
from longseq.train.data.bad_rows import UnusableRow

SUFFIXES = (".jsonl", ".txt")
BOM = b"\xef\xbb\xbf"


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


def file_rows(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of each row: a .txt file is one row, even when blank; a .jsonl file one per line."""
    data = _read_bytes(path).removeprefix(BOM)
    if is_text_file(path):
        yield 1, data
        return
    # Split on b"\n" only: str.splitlines would also split on U+2028 and friends, legal unescaped inside JSON strings.
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            yield number, line


def decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnusableRow("not UTF-8", f"byte {e.start}") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise LongseqError(f"{path}: cannot read ({first_line(e)})") from None
