"""Check TOML values against dataclass field annotations: the one TOML -> dataclass loader.

Both the peer config (``peer.config``) and the simulation scenario (``sim.scenario``) read a TOML
document into typed dataclasses. The type rules live here once: an integer is never a bool, a
float is finite (an int is accepted and widened), a path is a non-empty string, a list becomes
the annotated ``tuple``/``list``, ``X | None`` accepts None (TOML has no null, so in a file an
absent key is the None), a ``Literal`` lists its allowed values, and a nested dataclass is a
TOML table built with :func:`build_dataclass`. An annotation this module does not know is handed
through unchanged, for the dataclass' own validation to judge.

Every problem raises one neutral :class:`TomlValueError` carrying *where* (the dotted location,
e.g. ``session.group_size`` or ``hostile_peers[0]``) and *detail* (what is wrong). Each caller
turns it into its own error type: ``ConfigError("where: detail")``, ``ScenarioError(detail,
key=...)``.

This module imports nothing from ``peer.network`` or ``peer.training``, and no torch or MQTT,
so the simulation can use it without pulling in either half of a peer.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

from peer.errors import PeerError

_TYPE_NAMES: dict[Any, str] = {
    int: "integer", float: "number", bool: "boolean", str: "string", Path: "path",
}


class TomlValueError(PeerError, ValueError):
    """A TOML value does not fit its field; ``where`` names the field, ``detail`` the problem."""

    def __init__(self, where: str, detail: str) -> None:
        super().__init__(f"{where}: {detail}" if where else detail)
        self.where = where
        self.detail = detail


def type_name(annotation: Any) -> str:
    """A reader's name for an annotation: ``integer``, ``number or none``, ``list of string``."""
    origin = typing.get_origin(annotation)
    if annotation is type(None):
        return "none"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(annotation)
                           if a is not type(None))
    if origin in (tuple, list):
        args = typing.get_args(annotation)
        return f"list of {type_name(args[0])}" if args else "list"
    return _TYPE_NAMES.get(annotation, str(annotation))


def _check_union(value: Any, annotation: Any, where: str) -> Any:
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    if value is None and len(options) < len(typing.get_args(annotation)):
        return None
    errors: list[TomlValueError] = []
    for option in options:
        try:
            return check_value(value, option, where)
        except TomlValueError as exc:
            errors.append(exc)
    raise errors[0] if errors else TomlValueError(where, "unsupported value")


def _check_sequence(value: Any, annotation: Any, where: str) -> Any:
    if not isinstance(value, list | tuple):
        raise TomlValueError(where, f"expected a {type_name(annotation)}, "
                                    f"got {type(value).__name__} {value!r}")
    args = typing.get_args(annotation)
    item_type = args[0] if args else Any
    items = [check_value(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    return tuple(items) if typing.get_origin(annotation) is tuple else items


def _check_scalar(value: Any, annotation: Any, where: str) -> Any:
    if annotation is bool:
        if not isinstance(value, bool):
            raise TomlValueError(where, f"expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TomlValueError(where, f"expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TomlValueError(where, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise TomlValueError(where, f"must be finite, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise TomlValueError(where, f"expected a string, got {value!r}")
        return value
    if annotation is Path:
        if not isinstance(value, str | Path) or str(value) == "":
            raise TomlValueError(where, f"expected a path string, got {value!r}")
        return Path(value)
    # A type this checker does not know: hand the value through and let the dataclass' own
    # validation judge it.
    return value


def check_value(value: Any, annotation: Any, where: str) -> Any:
    """``value`` checked against ``annotation`` and normalised (int -> float for a float field,
    list -> tuple for a tuple field, str -> Path); TomlValueError naming ``where`` otherwise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _check_union(value, annotation, where)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise TomlValueError(where, f"must be one of {', '.join(map(repr, allowed))}, "
                                        f"got {value!r}")
        return value
    if origin in (tuple, list):
        return _check_sequence(value, annotation, where)
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if not isinstance(value, dict):
            raise TomlValueError(where, f"expected a table, got {value!r}")
        return build_dataclass(annotation, value, where)
    return _check_scalar(value, annotation, where)


def build_dataclass(cls: type, table: dict[str, Any], where: str) -> Any:
    """Build ``cls`` from a TOML table: unknown keys, missing keys, types and range errors.

    A ValueError or TypeError from the class itself (``__post_init__``, or a ``validate()``
    method some config classes use for ranges) becomes a TomlValueError naming ``where``.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise TomlValueError(where, f"unknown key {unknown[0]!r} "
                                    f"(known: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, spec in fields.items():
        if name in table:
            key = f"{where}.{name}" if where else name  # where "": the document's top level
            kwargs[name] = check_value(table[name], hints.get(name, Any), key)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise TomlValueError(where, f"missing required key {name!r}")
    try:
        instance = cls(**kwargs)
        validate = getattr(instance, "validate", None)
        if callable(validate):
            validate()
    except TomlValueError:
        raise
    except (ValueError, TypeError) as exc:
        raise TomlValueError(where, str(exc)) from None
    return instance
