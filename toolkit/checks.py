"""Rules on plain values, each written once: a frozen config dataclass checks its fields with them, and a
script's argparse reads the same fields' flags with them, in the same words.

A field names its rule in its metadata, and its default is the one default of the library and the flag:

    >>> from dataclasses import dataclass, field
    >>> AT_LEAST_1 = Check(int, "at least 1", lambda v: v >= 1)
    >>> @dataclass(frozen=True)
    ... class Recipe:
    ...     epochs: int = field(default=150, metadata={"check": AT_LEAST_1})
    ...     def __post_init__(self):
    ...         check_fields(self)
    >>> Recipe(epochs=0)
    Traceback (most recent call last):
    ...
    ValueError: epochs must be at least 1, got 0
    >>> AT_LEAST_1.parse("3"), flag_rule(Recipe, "epochs")["default"]  # argparse: add_argument(..., **flag_rule(...))
    (3, 150)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from typing import Any, Callable

__all__ = ["Check", "check_fields", "default_of", "flag_rule"]


@dataclasses.dataclass(frozen=True)
class Check:
    """A value's rule.

    Attributes:
        kind: `int` (a whole number, not a bool) or `float` (a finite number): how a flag's text is read.
        what: what a good value is, as it reads after "must be" ("at least 1").
        ok: whether a value of the right kind is good.
    """

    kind: type
    what: str
    ok: Callable[[Any], bool]

    def problem(self, value: Any) -> str | None:
        """None when `value` keeps the rule; else what is wrong, e.g. `must be at least 1, got 0`."""
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                return f"must be a whole number, got {value!r}"
        elif isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return f"must be {self.what}, got {value}"
        return None if self.ok(value) else f"must be {self.what}, got {value}"

    def parse(self, text: str) -> Any:
        """A flag's text as a good value, for argparse's `type=` (an `argparse.ArgumentTypeError` otherwise)."""
        try:
            value = self.kind(text)
        except ValueError:
            kind = "a whole number" if self.kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
        problem = self.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value


def check_fields(obj: Any, error: type[Exception] = ValueError) -> None:
    """Check every field of the dataclass `obj` whose metadata names a `check`; raise `error` at the first bad one.

    A tuple or list value is checked item by item and must not be empty; None passes where it is the
    field's default.
    """
    for f in dataclasses.fields(obj):
        check, value = f.metadata.get("check"), getattr(obj, f.name)
        if check is None or (value is None and f.default is None):
            continue
        if isinstance(value, (tuple, list)):
            if not value:
                raise error(f"{f.name} must not be empty")
            problems = [check.problem(v) for v in value]
        else:
            problems = [check.problem(value)]
        problem = next((p for p in problems if p is not None), None)
        if problem is not None:
            raise error(f"{f.name} {problem}")


def default_of(cls: type, name: str) -> Any:
    """The default of field `name` of the dataclass `cls` (the one place it is written)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def flag_rule(cls: type, name: str) -> dict[str, Any]:
    """argparse's `type` and `default` for the flag of field `name` of the dataclass `cls`: the field's rule
    (when its metadata names a `check`) and its default."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    check = f.metadata.get("check")
    return {"default": default_of(cls, name), **({"type": check.parse} if check is not None else {})}
