"""Typed, frozen config sections built from plain YAML data, with one-line errors.

Each stage owns a frozen, keyword-only dataclass for its section. ``from_dict`` builds
one from a mapping, checking unknown keys (with a "did you mean" hint), types and the
ranges declared in field metadata; ``to_dict`` turns it back into plain data.

Field metadata understood: ``min``, ``max`` (inclusive bounds), ``choices`` (allowed
values), ``help`` (one line, shown by ``synth check --explain`` and in errors).

Example:
    >>> from dataclasses import dataclass, field
    >>> @dataclass(frozen=True, kw_only=True)
    ... class Steps:
    ...     steps: int = field(default=100, metadata={"min": 1})
    >>> from_dict(Steps, {"steps": 5}).steps
    5
"""

from __future__ import annotations

import dataclasses
import datetime
import types
import typing
from typing import Any, Literal, Mapping, Union, get_args, get_origin

from synth.errors import ConfigError
from synth.registry import did_you_mean


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        inner = _type_name(args[0]) if args else "any"
        return f"a list of {inner}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"expected null, got {value!r}", key=key)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key)
            except ConfigError as err:
                errors.append(err)
        non_none = [a for a in args if a is not type(None)]
        if len(errors) == 1 and (dataclasses.is_dataclass(non_none[0]) or get_origin(non_none[0]) in (list, tuple, dict)):
            raise errors[0]
        raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", key=key)
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(
            f"expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}{did_you_mean(str(value), [str(a) for a in allowed])}",
            key=key,
        )
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key=key)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", key=key)
        args = [a for a in get_args(tp) if a is not Ellipsis]
        inner = args[0] if args else Any
        return tuple(_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping, got {value!r}", key=key)
        args = get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"expected true or false, got {value!r}", key=key)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"expected an integer, got {value!r}", key=key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {value!r}", key=key)
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. session ids written as numbers
        if isinstance(value, datetime.date):
            return value.isoformat()  # e.g. session ids written as dates (YAML reads 2026-12-07 as a date)
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", key=key)
        return value
    return value


def _check_meta(f: dataclasses.Field, value: Any, key: str) -> None:
    meta = f.metadata
    if value is None:
        return
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if "min" in meta and v < meta["min"]:
            raise ConfigError(f"expected a value >= {meta['min']}, got {v!r}", key=key)
        if "max" in meta and v > meta["max"]:
            raise ConfigError(f"expected a value <= {meta['max']}, got {v!r}", key=key)
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(
            f"expected one of {', '.join(map(str, meta['choices']))}, got {value!r}{did_you_mean(str(value), [str(c) for c in meta['choices']])}",
            key=key,
        )


def from_dict(cls: type, data: Any, *, key: str = "") -> Any:
    """Build the frozen dataclass ``cls`` from ``data``, validating every field.

    Args:
        cls: a dataclass type (fields with defaults are optional in ``data``).
        data: a mapping (``None`` means all defaults).
        key: the dotted key path of this section, used in error messages.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: naming the key path and what was expected.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping, got {type(data).__name__} {data!r}"[:200], key=key or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            raise ConfigError(
                f"unknown key '{k}'{did_you_mean(str(k), list(fields))}; expected one of: {', '.join(fields)}",
                key=key or None,
            )
    kwargs = {}
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        if name in data:
            value = _convert(hints[name], data[name], sub)
            _check_meta(f, value, sub)
            kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{name}'", key=key or None)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.at(key=key or None) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err), key=key or None) from None


def to_dict(obj: Any) -> Any:
    """Plain-data (YAML-safe) form of a config dataclass, recursively."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s keys replaced, recursing into mappings present in both.

    A registry spec that names another component (a different ``name``) replaces the
    base's spec instead of merging into it (its arguments are another component's).
    Lists and other values replace the base's.
    """
    out = dict(base)
    for k, v in override.items():
        old = out.get(k)
        nested = isinstance(v, Mapping) and isinstance(old, Mapping) and v.get("name", old.get("name")) == old.get("name")
        out[k] = deep_merge(old, v) if nested else v
    return out
