"""The smoothed training loss that the report's "to target" column and the loss plots share.

A module of its own so that :mod:`~secondorder.bench.report` (which draws the plots when it
writes the results) and :mod:`~secondorder.bench.plots` both use it without importing each
other.
"""

from __future__ import annotations

__all__ = ["TARGET_WINDOW", "trailing_mean"]

TARGET_WINDOW = 10
"""Steps in the trailing mean of the mini-batch loss that is compared with the target."""


def trailing_mean(values: list[float], window: int = TARGET_WINDOW) -> list[float]:
    """Mean of the last ``window`` values at every position (of all values so far before the
    ``window``-th): the smoothed loss that the "to target" column and the plots use."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
