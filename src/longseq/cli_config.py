"""Typed dataclass <-> CLI flags and YAML: `--lora-rank 8` and `lora_rank: 8` both set TrainConfig.lora_rank."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from longseq.errors import LongseqError, first_line

_SCALARS = {"int": int, "float": float, "str": str, "str | None": str, "int | None": int, "float | None": float}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field; unset flags stay absent (SUPPRESS) so that YAML values are not overridden by defaults."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = ",".join(default) if isinstance(default, tuple) else default
        help_text = f"{f.metadata.get('help', '')} (default: {shown})"
        if f.type == "tuple[str, ...]":
            parser.add_argument(flag, nargs="+", default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)
        elif f.type == "tuple[int, ...]":
            parser.add_argument(flag, nargs="+", type=int, default=argparse.SUPPRESS, metavar="N", help=help_text)
        elif f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=_SCALARS[f.type], default=argparse.SUPPRESS, help=help_text)


def config_from(cls: type, args: argparse.Namespace, yaml_path: str | None = None) -> Any:
    """Defaults, then the YAML file, then the flags given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if yaml_path:
        values.update(_read_yaml(Path(yaml_path), names))
    values.update({k: v for k, v in vars(args).items() if k in names})
    try:
        return cls(**values)
    except TypeError as e:  # a YAML value of the wrong type reaching a comparison
        raise LongseqError(f"invalid configuration: {e}") from None


def _read_yaml(path: Path, names: set[str]) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise LongseqError(f"{path}: no such file") from None
    except (OSError, yaml.YAMLError) as e:
        raise LongseqError(f"{path}: not a readable YAML file ({first_line(e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LongseqError(f"{path}: expected a mapping of option: value")
    unknown = sorted(set(data) - names)
    if unknown:
        raise LongseqError(f"{path}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    return data
