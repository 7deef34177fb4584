"""Tokenizers and chat templates through transformers (the one thing we take from it), offline only."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Forced, not defaulted: longseq never downloads anything at run time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from longseq.errors import LongseqError, first_line  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def cache_dir() -> Path:
    return Path(os.environ.get("LONGSEQ_CACHE", Path.home() / ".cache" / "longseq"))


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of an HF model directory, or the one embedded in a GGUF file."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if path.is_file():
        return _gguf_tokenizer(path, AutoTokenizer)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise LongseqError(f"{path}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise LongseqError(f"{path}: cannot load the tokenizer ({first_line(e)})") from None


def _gguf_tokenizer(path: Path, auto_tokenizer) -> Any:
    # Converting a GGUF vocabulary takes seconds; keep the converted tokenizer, keyed by file identity.
    st = path.stat()
    cached = cache_dir() / "tokenizers" / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}"
    if (cached / "tokenizer.json").is_file():
        try:
            return auto_tokenizer.from_pretrained(str(cached), local_files_only=True)
        except Exception:
            shutil.rmtree(cached, ignore_errors=True)  # a stale or damaged cache entry: rebuild it
    from longseq.models.gguf_loader import open_gguf

    open_gguf(path)  # a clear error for a corrupt file before transformers' own
    try:
        tok = auto_tokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as e:
        raise LongseqError(f"{path}: cannot read the tokenizer in this GGUF ({first_line(e)})") from None
    tmp = None
    try:  # write to a temp dir, then rename: a crash never leaves a half-written cache entry
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-")
        tok.save_pretrained(tmp)
        os.replace(tmp, cached)
    except OSError:  # read-only home or a concurrent writer: the cache is only an optimisation
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return tok
