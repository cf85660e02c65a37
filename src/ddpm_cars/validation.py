"""Field checks for the frozen config dataclasses: every value against its type annotation
and the :class:`Limits` its field declares, each failing with a :class:`UserError` that
names the field and says what is allowed. The command line checks its flags with the same
rules (:func:`problem`), so a value is judged the same way wherever it comes from."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import reprlib
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from ddpm_cars.errors import UserError


@dataclass(frozen=True)
class Limits:
    """The values a number field allows (for a tuple field: each of its items)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False  # high itself is not allowed
    min_items: int = 0  # tuple fields: the fewest items
    even: bool = False
    words: str = ""  # what is allowed, where the bounds alone say it badly

    def allows(self, value: Any) -> bool:
        items = value if isinstance(value, (tuple, list)) else (value,)
        return len(items) >= self.min_items and all(self._allows_one(v) for v in items)

    def _allows_one(self, value: Any) -> bool:
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        if self.high is not None and not (value < self.high if self.high_open else value <= self.high):
            return False
        return not (self.even and value % 2)

    def describe(self, items: bool = False) -> str:
        """What is allowed, after "must be": ``>= 1``, ``in [0, 1)``, ``a list of at least 2 values, each >= 1``."""
        if self.words:
            return self.words
        if self.low is not None and self.high is not None:
            bounds = f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            bounds = f"{'>' if self.low_open else '>='} {self.low}"
        else:
            bounds = f"{'<' if self.high_open else '<='} {self.high}"
        bounds = f"even and {bounds}" if self.even else bounds
        if not items:
            return bounds
        count = {0: "", 1: "one or more "}.get(self.min_items, f"at least {self.min_items} ")
        return f"a list of {count}values, each {bounds}"


POSITIVE = Limits(low=1)  # counts and sizes
NON_NEGATIVE = Limits(low=0)
PROBABILITY = Limits(low=0, high=1, high_open=True)  # in [0, 1)


def is_optional(kind: Any) -> bool:
    """Whether the annotation ``kind`` is ``X | None``."""
    return get_origin(kind) in (Union, types.UnionType) and type(None) in get_args(kind)


def describe(kind: Any, none: str = "null") -> str:
    """``kind`` (a field annotation) in words, for error messages; ``none`` names None."""
    args = get_args(kind)
    if get_origin(kind) is Literal:
        return f"one of {', '.join(map(repr, args))}"
    if get_origin(kind) in (Union, types.UnionType):
        return " or ".join(none if a is type(None) else describe(a, none) for a in args)
    if get_origin(kind) is tuple:
        return f"a list of {describe(args[0], none).removeprefix('an ').removeprefix('a ')}s"
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


def problem(value: Any, kind: Any, limits: Limits | None = None) -> str | None:
    """What is wrong with ``value`` for a field annotated ``kind`` within ``limits``
    ("must be ..."), or None when nothing is."""
    if not _matches(value, kind):
        return f"must be {describe(kind)}"
    if limits is None or value is None or limits.allows(value):
        return None
    return f"must be {limits.describe(items=get_origin(kind) is tuple)}" + (" or None" if is_optional(kind) else "")


@functools.cache
def field_types(kind: type) -> dict[str, Any]:
    """The evaluated annotation of each field of the dataclass ``kind``."""
    return get_type_hints(kind)


def check_fields(config: Any, section: str) -> None:
    """Raise :class:`UserError` naming the field unless every field of the frozen ``config``
    holds a value of its annotated type within the ``limits`` of its metadata; lists given
    for tuples become tuples."""
    kinds = field_types(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        wrong = problem(value, kinds[field.name], field.metadata.get("limits"))
        if wrong:
            raise UserError(f"{section}.{field.name} {wrong}; got {reprlib.repr(value)}")
        if isinstance(value, list):
            object.__setattr__(config, field.name, tuple(value))
