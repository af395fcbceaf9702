"""Typed configs: dataclass defaults, overridden by a YAML preset, overridden by `key=value`.

Every stage config is a frozen, keyword-only dataclass. This module turns plain dicts (from a
preset file or the command line) into those dataclasses and refuses anything it does not know:
a typo is an error that names the key and lists the valid ones, never a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

PRESETS_DIR = Path(__file__).parent / "presets"
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names it."""


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type (Path, float from int, nested dataclass)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where) if len(args) == 1 else value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=f"{where}.")
    if annotation is Path:
        return None if value is None else Path(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (tuple,) and isinstance(value, list | tuple):
        return tuple(value)
    if annotation in (int, float, str, bool) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from `values`; unknown keys raise ConfigError naming them."""
    hints = typing.get_type_hints(cls)
    known = field_names(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}"
            f" (valid keys{' of ' + prefix.rstrip('.') if prefix else ''}: {', '.join(known)})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{cls.__name__}: {e}") from None
    except ValueError as e:  # the dataclass's own checks (__post_init__): one line, not a traceback
        raise ConfigError(str(e)) from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["train.lr=3e-4", "seed=1"]` -> `{"train": {"lr": 0.0003}, "seed": 1}` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form key=value")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw  # not YAML (a cron line such as `*/30 * * * *` starts like an alias): the text itself
        # YAML 1.1 reads 3e-4 as a string; numbers people type should be numbers ("nan" stays text).
        if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
            value = float(value)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def load_preset(name: str) -> dict[str, Any]:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.exists():
        valid = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name!r} (valid presets: {', '.join(valid)})")
    return yaml.safe_load(path.read_text()) or {}


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-friendly dict of a config (Paths become strings)."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))
