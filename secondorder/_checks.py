"""Argument checks and step schedules shared by every optimizer and config.

Everything here is a pure function of its arguments: the config dataclasses
(:mod:`secondorder.config`) validate with them, the optimizers resolve schedules with
them at each step. A check raises ``TypeError`` for a value of the wrong type and
``ValueError`` for one out of range, with a message naming the argument and what is
allowed.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

#: a hyperparameter given as a number or as a function of the step (0-based)
Schedule = float | Callable[[int], float]
#: an interval in steps, or a function of the step returning one
Interval = int | Callable[[int], int]
#: when curvature is used: None (always), a predicate of the step, or (start, stop) step ranges
UseCurvature = Callable[[int], bool] | Iterable[tuple[int, int | None]] | None


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(
    name: str, value: Any, *, low: float = 0.0, low_open: bool = False, high: float | None = None
) -> float:
    """``value`` as a float if a finite real in range, else ``ValueError``/``TypeError``."""
    if not _is_number(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    bad_low = value <= low if low_open else value < low
    if not math.isfinite(value) or bad_low or (high is not None and value > high):
        lo = f"{'>' if low_open else '>='} {low}"
        hi = f" and <= {high}" if high is not None else ""
        raise ValueError(f"{name} must be a finite number {lo}{hi}, got {value!r}")
    return value


def check_schedule(name: str, value: Any, *, low_open: bool = False) -> Schedule:
    """Accept a non-negative (or positive) number or a callable of the step."""
    if callable(value):
        return value
    return check_number(name, value, low_open=low_open)


def check_interval(name: str, value: Any) -> Interval:
    """Accept a positive int or a callable of the step returning one."""
    if callable(value):
        return value
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int or a callable of the step, got {value!r}")
    return int(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_statistics_rows(value: Any) -> int | float | None:
    """Accept None (all rows), an int >= 1 (a number of rows) or a float in (0, 1] (a
    fraction of them): an int comes back as an int, a fraction as a float. Anything else
    raises ``ValueError``, a value of another type too (``"all"``, ``True``): which of the
    three kinds a number is decides its meaning, so a wrong kind is a wrong value."""
    if value is None:
        return None
    if _is_int(value) and value >= 1:
        return int(value)
    if _is_number(value) and not _is_int(value) and 0.0 < float(value) <= 1.0:
        return float(value)
    raise ValueError(
        "statistics_rows must be None (all rows), an int >= 1 (that many rows) or a float "
        f"in (0, 1] (that fraction of the rows), got {value!r}"
    )


def check_use_curvature(
    value: Any,
) -> Callable[[int], bool] | tuple[tuple[int, int | None], ...] | None:
    """Accept None, a callable of the step, or ``(start, stop)`` step ranges (stop
    exclusive, None for an open end); ranges come back as a tuple of int pairs."""
    if value is None or callable(value):
        return value
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(
            "use_curvature must be None, a callable of the step returning a bool, or a list "
            f"of (start, stop) step ranges, got {type(value).__name__}"
        )
    ranges = []
    for item in value:
        if isinstance(item, (str, bytes)) or not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"use_curvature: each range must be a (start, stop) pair, got {item!r}")
        start, stop = item
        if not _is_int(start) or (stop is not None and not _is_int(stop)):
            raise TypeError(
                f"use_curvature: start must be an int and stop an int or None, got {item!r}"
            )
        if start < 0:
            raise ValueError(f"use_curvature: start must be >= 0, got {item!r}")
        if stop is not None and stop <= start:
            raise ValueError(
                f"use_curvature: stop must be > start (stop is exclusive; None for an open "
                f"end), got {item!r}"
            )
        ranges.append((int(start), None if stop is None else int(stop)))
    if not ranges:
        raise ValueError(
            "use_curvature: an empty list of ranges never uses curvature; "
            "use precondition=False for a plain base optimizer"
        )
    return tuple(ranges)


def resolve_schedule(name: str, value: Schedule, step: int, *, low_open: bool = False) -> float:
    """The value of a schedule at ``step``, checked like a constant would be."""
    return check_number(
        f"{name}({step})" if callable(value) else name,
        value(step) if callable(value) else value,
        low_open=low_open,
    )


def interval_at(name: str, interval: Interval, step: int) -> int:
    """The interval's value at ``step`` (a function's value checked as an interval)."""
    if callable(interval):
        return check_interval(f"{name}({step})", interval(step))
    return interval


def is_due(name: str, interval: Interval, step: int) -> bool:
    """Whether ``step`` is a multiple of the interval (evaluated at ``step``)."""
    return step % interval_at(name, interval, step) == 0


def caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the user's line: frames of this
    package and of torch (the step wrappers of ``torch.optim``, ``torch.no_grad``'s) are
    skipped."""
    inside = tuple(
        os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, torch.__file__)
    )
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def unknown_keyword(called: str, key: str, accepted: Iterable[str]) -> TypeError:
    """The ``TypeError`` Python raises for an unexpected keyword argument, naming the
    class the user called and the closest keyword it accepts."""
    close = difflib.get_close_matches(key, sorted(accepted), n=1)
    hint = f". Did you mean {close[0]!r}?" if close else ""
    return TypeError(f"{called}.__init__() got an unexpected keyword argument {key!r}{hint}")
