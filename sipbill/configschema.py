"""Typed, frozen settings loaded from one TOML file (ARCHITECTURE.md principle 6).

A settings section is a frozen dataclass; :func:`load_section` walks its type hints and turns
a TOML table into an instance, refusing unknown keys and values of the wrong type with a
:class:`ConfigError` that names the dotted key (``proxy.gateways[1].port: expected an integer``).
Semantic checks live in a ``validate()`` method on the dataclass that returns
``(relative_key, message)`` pairs, so a module declares its own rules next to its own fields.

Modules declare their section as such a dataclass; the composition root (:mod:`sipbill.settings`)
collects them, so no module edits another module's schema.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")


class ConfigError(Exception):
    """A bad configuration; ``key`` is the dotted path of the offending setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    origin = get_origin(tp)
    if origin is list or origin is tuple:
        return "a list"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a table"
    return str(tp)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors: list[ConfigError] = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else ConfigError(key, "must not be empty")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return tuple(_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or origin is typing.Mapping:
        (_k_tp, v_tp) = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {value!r}")
        return {str(k): _convert(v_tp, v, _join(key, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {value!r}")
        return load_section(tp, value, key)
    raise ConfigError(key, f"unsupported setting type {tp!r}")  # a schema bug, not user input


def load_section(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``data``; errors name the dotted key."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        name = raw_key.replace("-", "_")
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(_join(prefix, raw_key), f"unknown setting (known here: {known})")
        kwargs[name] = _convert(hints[name], value, _join(prefix, raw_key))
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(_join(prefix, missing[0]), "required setting is missing")
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        problems: Iterable[tuple[str, str]] = validate()
        for rel_key, message in problems:
            raise ConfigError(_join(prefix, rel_key), message)
    return instance


def as_dict(obj: Any, *, redact: Iterable[str] = ()) -> Any:
    """Settings as plain data (for ``config.show``), with secret keys replaced by ``"***"``."""
    secret = set(redact)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name in secret or f.metadata.get("secret"):
                out[f.name] = "***" if value else value
            else:
                out[f.name] = as_dict(value, redact=redact)
        return out
    if isinstance(obj, tuple | list):
        return [as_dict(v, redact=redact) for v in obj]
    if isinstance(obj, dict):
        return {k: as_dict(v, redact=redact) for k, v in obj.items()}
    return obj


def secret_field(default: str = "") -> Any:
    """A string setting never shown by ``config.show`` or written to logs."""
    return dataclasses.field(default=default, metadata={"secret": True})
