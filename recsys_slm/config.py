"""Typed configuration: dataclasses validated on creation, YAML on disk, ``key=value`` overrides.

Every job or stage has one ``@dataclass`` config defined next to the code that uses it. Every field has a
default; ``__post_init__`` (via :func:`validate_fields`) checks each value against its type annotation and
raises :class:`ConfigError` naming the field and the allowed values. :func:`load_config` applies defaults, then
a YAML file, then command-line overrides (``train.lr=1e-4``), and rejects unknown keys with the list of known
ones. :func:`config_to_dict` gives the resolved config that every output directory records.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration key or value is invalid. The message names the key and what is allowed."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


@dataclass(frozen=True)
class _Override:
    """A command-line value: its raw text and its YAML reading. String and path fields take the raw text, so
    ``prompt.no_token=No`` stays "No" (YAML would read a boolean) and paths are never re-interpreted."""

    raw: str
    parsed: Any


def _non_none(tp: Any) -> list[Any]:
    if get_origin(tp) in (Union, types.UnionType):
        return [a for a in get_args(tp) if a is not type(None)]
    return [tp]


def _wants_text(tp: Any, raw: str) -> bool:
    for arg in _non_none(tp):
        if arg in (str, Path):
            return True
        if get_origin(arg) is Literal and raw in get_args(arg):
            return True
    return False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to annotation ``tp`` or raise ConfigError naming ``key``."""
    if isinstance(value, _Override):
        nullable = get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)
        if value.parsed is None and nullable:
            value = None
        elif _wants_text(tp, value.raw):
            value = value.raw
        else:
            value = value.parsed
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': got {value!r}; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"config key '{key}': got null; expected {_type_name(tp)}")
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(value, options[0], key)  # Optional[X]: X's own, more specific error
        for arg in options:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': got {value!r}; expected {_type_name(tp)}")
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': got {value!r}; expected {_type_name(tp)}")
        args = [a for a in get_args(tp) if a is not Ellipsis]
        items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': got {value!r}; expected a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': got {value!r}; expected a mapping of {tp.__name__} fields")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': got {value!r}; expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}': got {value!r}; expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "1e-4" as a string: accept anything float() parses.
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': got {value!r}; expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': got {value!r}; expected a string")
    if tp is Path:
        if isinstance(value, (str, Path)):
            if not str(value).strip():
                # Path("") is the current directory: an output there would replace the user's working folder.
                raise ConfigError(f"config key '{key}': got an empty path")
            return expand_path(value)
        raise ConfigError(f"config key '{key}': got {value!r}; expected a path")
    return value


def expand_model_spec(spec: str) -> str:
    """A model spec (packaged name, directory or hub id) with ``$RECSYS_SLM_HOME``/``~`` expanded when it starts
    with one: YAML files point at model directories under the cache that way; names and hub ids pass through."""
    return str(expand_path(spec)) if spec.startswith(("$", "~")) else spec


def expand_path(value: str | Path) -> Path:
    """``~`` and environment variables expanded; ``$RECSYS_SLM_HOME`` falls back to its default
    (``~/.cache/recsys_slm``) when unset, so shipped YAML files can point into the cache portably."""
    from recsys_slm.model_dir import cache_home

    text = str(value).replace("${RECSYS_SLM_HOME}", "$RECSYS_SLM_HOME")
    text = text.replace("$RECSYS_SLM_HOME", str(cache_home()))
    return Path(os.path.expandvars(text)).expanduser()


def validate_fields(cfg: Any, prefix: str = "") -> None:
    """Check and coerce every field of dataclass instance ``cfg`` in place against its annotation.

    Call it first in ``__post_init__``; range checks specific to a config follow it.

    Raises:
        ConfigError: a value does not match its annotation (the message names the field).
    """
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        object.__setattr__(cfg, f.name, _coerce(value, hints[f.name], prefix + f.name))


def check(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError(``config key 'key': message``) unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


def from_dict(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
    """Build dataclass ``cls`` from a (nested) mapping, rejecting unknown keys.

    Raises:
        ConfigError: an unknown key (the message lists the known ones) or a bad value.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"config '{prefix.rstrip('.') or cls.__name__}': expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' for {cls.__name__}; known keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        kwargs[name] = _coerce(value, tp, prefix + name)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # A nested config validates with its own field names; prefix its path so the user can find the key.
        if prefix:
            raise ConfigError(str(exc).replace("config key '", f"config key '{prefix}", 1)) from None
        raise


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[x, y]"]`` into a nested dict; values are parsed as YAML scalars/lists.

    Raises:
        ConfigError: an override is not of the form ``key=value``.
    """
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. prune.ratio=0.3)")
        key, raw = item.split("=", 1)
        try:
            parsed = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            parsed = raw  # not YAML (e.g. a path with ": "): keep the text
        value = _Override(raw, parsed)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in ``extra`` replaces."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config_data(path: str | Path | None = None, overrides: list[str] | None = None) -> tuple[dict[str, Any], str]:
    """The YAML file at ``path`` (if any) merged with ``key=value`` overrides, unvalidated, and a ``" (from ...)"``
    suffix naming the sources for error messages.

    Raises:
        ConfigError: a missing, unreadable or non-mapping YAML file (the message names the file), or a bad override.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        data = merge_dicts(data, parse_overrides(overrides))
    sources = ([f"file {path}"] if path is not None else []) + ([f"overrides {' '.join(overrides)}"] if overrides else [])
    return data, (f" (from {' and '.join(sources)})" if sources else "")


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides → a validated ``cls``.

    Raises:
        ConfigError: unknown key, bad value, unreadable or non-mapping YAML (the message names the file).
    """
    data, where = load_config_data(path, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{where}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain YAML/JSON-safe data (paths become strings, tuples lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (re-loadable with :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
