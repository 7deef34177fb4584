"""Where `longseq serve` takes its API key from: a flag, a file or the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from longseq.errors import LongseqError, first_line

ENV_VAR = "LONGSEQ_API_KEY"


def resolve_api_key(key: str | None, key_file: str | Path | None,
                    environ: Mapping[str, str] = os.environ) -> str | None:
    """The key the server requires, or None for an open server: --api-key, else the first line of --api-key-file,
    else $LONGSEQ_API_KEY. A key on the command line is visible to every user of the machine (ps); the file and
    the variable are not. An empty key is an error, never an open server."""
    if key is not None and key_file is not None:
        raise LongseqError("give --api-key or --api-key-file, not both")
    if key_file is not None:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise LongseqError(f"cannot read the API key file {key_file}: {first_line(e)}") from None
        key, source = (lines[0].strip() if lines else ""), f"the API key file {key_file}"
    elif key is not None:
        source = "--api-key"
    elif ENV_VAR in environ:
        key, source = environ[ENV_VAR], f"${ENV_VAR}"
    else:
        return None
    if not key.strip():
        raise LongseqError(f"{source} gives an empty API key")
    return key.strip()
