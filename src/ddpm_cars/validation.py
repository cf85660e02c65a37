"""Field checks for the frozen config dataclasses: choices, lower bounds, and every value
against its type annotation, each failing with a ``ValueError`` that names the field."""

from __future__ import annotations

import functools
import math
import numbers
import reprlib
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


def check_choice(name: str, value: Any, choices: Any) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_positive(name: str, value: Any, minimum: int | float = 1) -> None:
    if value is None or value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value!r}")


def _describe(kind: Any) -> str:
    """``kind`` (a field annotation) in words, for error messages."""
    args = get_args(kind)
    if get_origin(kind) is Literal:
        return f"one of {', '.join(map(repr, args))}"
    if get_origin(kind) in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if get_origin(kind) is tuple:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}[kind]


def _matches(value: Any, kind: Any) -> bool:
    """Whether ``value`` is of the annotated type ``kind`` (a bool is no number; an int is a float)."""
    origin, args = get_origin(kind), get_args(kind)
    if origin is Literal:
        return isinstance(value, str) and value in args
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is tuple:  # tuple[X, ...], from a JSON list
        return isinstance(value, (tuple, list)) and all(_matches(v, args[0]) for v in value)
    if kind is type(None):
        return value is None
    if isinstance(value, bool) or kind is bool:
        return kind is bool and isinstance(value, bool)
    if kind is int:
        return isinstance(value, numbers.Integral)
    if kind is float:
        return isinstance(value, numbers.Real) and math.isfinite(value)
    return isinstance(value, kind)


@functools.cache
def _field_types(kind: type) -> dict[str, Any]:
    return get_type_hints(kind)


def check_types(config: Any, section: str) -> None:
    """Raise ``ValueError`` naming the field unless every field of the frozen ``config``
    holds a value of its annotated type; lists given for tuples become tuples."""
    for name, kind in _field_types(type(config)).items():
        value = getattr(config, name)
        if not _matches(value, kind):
            raise ValueError(f"{section}.{name} must be {_describe(kind)}; got {reprlib.repr(value)}")
        if isinstance(value, list):
            object.__setattr__(config, name, tuple(value))
