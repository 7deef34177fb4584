"""Typed dataclass <-> CLI flags and YAML: `--lora-rank 8` and `lora_rank: 8` both set TrainConfig.lora_rank.

A field declared with `nested(Cls)` holds another option dataclass (TrainConfig's model overrides): its fields are
flags and YAML keys of their own at the top level, so the holder's options read as one flat set.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from longseq.errors import LongseqError, first_line

_SCALARS = {"int": int, "float": float, "str": str, "str | None": str, "int | None": int, "float | None": float}
# What a YAML file or a checkpoint's recorded config may hold for a field of each declared type (ints count as
# floats; bools are not numbers here); tuple fields also take a list or a comma-separated string.
_ACCEPTED = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
             "tuple[str, ...]": (tuple, list, str), "tuple[int, ...]": (tuple, list, str, int)}
_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def flag(text: str, **kw: Any) -> Any:
    """A dataclass field that is a flag and a YAML key; `text` is its help."""
    return dataclasses.field(metadata={"help": text}, **kw)


def nested(cls: type) -> Any:
    """A field holding the option dataclass `cls`, whose fields are flattened into the holder's flags and keys."""
    return dataclasses.field(default_factory=cls, metadata={"nested": cls})


def flat_fields(cls: type) -> Iterator[dataclasses.Field]:
    """The fields that are flags: nested option classes' fields in place of the field holding them."""
    for f in dataclasses.fields(cls):
        if "nested" in f.metadata:
            yield from flat_fields(f.metadata["nested"])
        else:
            yield f


def to_flat(obj: Any) -> dict[str, Any]:
    """A config as {flag name: value}, nested option classes flattened (what YAML, checkpoints and flags hold)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out.update(to_flat(value) if "nested" in f.metadata else {f.name: value})
    return out


def from_flat(cls: type, values: dict[str, Any]) -> Any:
    """`cls` from {flag name: value}; absent names keep their defaults. Unknown names are a TypeError."""
    kwargs: dict[str, Any] = {}
    rest = dict(values)
    for f in dataclasses.fields(cls):
        if "nested" in f.metadata:
            inner = f.metadata["nested"]
            names = {g.name for g in flat_fields(inner)}
            kwargs[f.name] = from_flat(inner, {k: rest.pop(k) for k in list(rest) if k in names})
        elif f.name in rest:
            kwargs[f.name] = _checked(f, rest.pop(f.name))
    if rest:
        raise TypeError(f"{cls.__name__} has no option(s) {', '.join(sorted(rest))}")
    return cls(**kwargs)


def _checked(f: dataclasses.Field, value: Any) -> Any:
    """`value` when its type suits the field's declared type, else a TypeError naming the field."""
    declared = str(f.type)
    base = declared.removesuffix(" | None")
    if (value is None and declared.endswith(" | None")) or base not in _ACCEPTED:
        return value
    numeric_bool = isinstance(value, bool) and base != "bool"
    if numeric_bool or not isinstance(value, _ACCEPTED[base]):
        raise TypeError(f"{f.name} must be {_TYPE_NAMES.get(base, 'a list')}, got {str(value)[:60]!r}")
    return value


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field; unset flags stay absent (SUPPRESS) so that YAML values are not overridden by defaults."""
    for f in flat_fields(cls):
        flag_name = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = ",".join(default) if isinstance(default, tuple) else default
        help_text = f"{f.metadata.get('help', '')} (default: {shown})"
        if f.type == "tuple[str, ...]":
            parser.add_argument(flag_name, nargs="+", default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=help_text)
        elif f.type == "tuple[int, ...]":
            parser.add_argument(flag_name, nargs="+", type=int, default=argparse.SUPPRESS, metavar="N", help=help_text)
        elif f.type == "bool":
            parser.add_argument(flag_name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(flag_name, type=_SCALARS[f.type], default=argparse.SUPPRESS, help=help_text)


def config_from(cls: type, args: argparse.Namespace, yaml_path: str | None = None) -> Any:
    """Defaults, then the YAML file, then the flags given on the command line."""
    names = {f.name for f in flat_fields(cls)}
    values: dict[str, Any] = {}
    if yaml_path:
        values.update(_read_yaml(Path(yaml_path), names))
    values.update({k: v for k, v in vars(args).items() if k in names})
    try:
        return from_flat(cls, values)
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
