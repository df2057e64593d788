"""Build typed dataclasses from plain dicts (JSON, YAML) with errors that name the field.

Used for every config lomix reads: an unknown key lists the valid ones, a wrong type says what was
expected, and nested dataclasses report their dotted path (``router.k``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError


def field_docs(cls: type) -> dict[str, str]:
    """Each field's help text: ``metadata["help"]`` of the dataclass field."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``data``, checking keys and value types recursively."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(path or cls.__name__, f"expected a mapping of fields, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=repr)  # YAML keys may be numbers or null too
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(where, unknown_key_message(unknown[0], fields))
    kwargs = {}
    for name, value in data.items():
        where = f"{path}.{name}" if path else name
        kwargs[name] = coerce(hints[name], value, where)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = f"{path}.{missing[0]}" if path else missing[0]
        raise ConfigError(where, "required field is missing")
    return cls(**kwargs)


def unknown_key_message(key: Any, valid: Any) -> str:
    """'unknown key; did you mean 'lr'? valid keys here are: ...': the nearest valid key first (a typo
    is the usual cause), then all of them."""
    names = sorted(str(name) for name in valid)
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {hint}valid keys here are: {', '.join(names)}"


def to_dict(obj: Any) -> Any:
    """The inverse of `from_dict`: plain dicts/lists/scalars, JSON- and YAML-serialisable."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return obj.to_dict()
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against type ``tp`` and convert where lossless (int -> float, list -> tuple)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        section = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
        if value is not None and type(None) in get_args(tp) and len(get_args(tp)) == 2 and section:
            return coerce(section[0], value, path)  # an optional section: its own errors name the field
        errors = []
        for arg in get_args(tp):
            try:
                return coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        key_tp, value_tp = get_args(tp) or (Any, Any)
        return {coerce(key_tp, k, f"{path} key {k!r}"): coerce(value_tp, v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and hasattr(tp, "from_config_dict"):
        # Polymorphic configs (a router's config is chosen by its "name") build themselves.
        return tp.from_config_dict(value, path)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(path, f"expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(path, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Section:
    """One top-level section of the recipe config that a method owns (its package's ``config.SECTIONS``)."""

    name: str
    config: type
    help: str


__all__ = ["Section", "coerce", "field_docs", "from_dict", "to_dict", "unknown_key_message"]
