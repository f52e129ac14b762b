"""Range checks for option values, as Typer callbacks: a bad value is a one-line usage error (exit 2).

Click's numeric ranges let `nan` through (every comparison with it is false) and cannot say "> 0"; these
callbacks check finiteness and open or closed bounds. Use them as `typer.Option(..., callback=positive)`.
"""

import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

import typer

T = TypeVar("T")


def _number_check(test: Callable[[float], bool], wanted: str) -> Callable[[T], T]:
    """A callback that passes None through and refuses any number (or list item) failing `test` or not finite."""

    def callback(value: T) -> T:
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is None:
                continue
            if not math.isfinite(item) or not test(item):
                raise typer.BadParameter(f"must be {wanted}, got {item}")
        return value

    return callback


positive = _number_check(lambda v: v > 0, "a finite number > 0")
non_negative = _number_check(lambda v: v >= 0, "a finite number >= 0")
unit_interval = _number_check(lambda v: 0 <= v <= 1, "in [0, 1]")
fraction = _number_check(lambda v: 0 < v <= 1, "in (0, 1] (a fraction of the whole)")


def non_blank(value: Any) -> Any:
    """A text option given explicitly must say something: `--targets ''` is not 'use the default'."""
    if value is not None and not str(value).strip():
        raise typer.BadParameter("must not be empty")
    return value


def regex(value: Any) -> Any:
    """A regular-expression option must compile (checked before any work, not deep inside a job)."""
    if value is not None:
        try:
            re.compile(value)
        except re.error as err:
            raise typer.BadParameter(f"{value!r} is not a valid regular expression: {err}") from None
    return value
