"""Schedules for hyperparameters given as a function of the step.

Every optimizer accepts ``damping`` (and the intervals) as a number or as a callable of
the 0-based step; the objects here are such callables, picklable and with a readable
``repr`` (a lambda is neither).
"""

from __future__ import annotations

import math
import numbers

_KINDS = ("exponential", "linear")


def _positive(name: str, value: object) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


class DampingWarmup:
    r"""Damping that starts large and settles at a target over ``steps`` steps.

    K-FAC's curvature is poorly estimated in the first steps, where a large damping keeps
    the update close to a scaled gradient step; the damping then decays to its working
    value (as in LBANN's K-FAC and Osawa et al., 2019, https://arxiv.org/abs/1811.12019).
    At step ``k``:

    .. math::
        \lambda_k = \begin{cases}
            \lambda_0 \, (\lambda_T / \lambda_0)^{k / T} & \text{exponential} \\
            \lambda_0 + (\lambda_T - \lambda_0)\, k / T & \text{linear}
        \end{cases} \quad (k < T), \qquad \lambda_k = \lambda_T \quad (k \ge T).

    Args:
        initial (float): λ₀, the damping at step 0; > 0.
        target (float): λ_T, the damping from step ``steps`` on; > 0.
        steps (int): T, the number of steps of the warm-up; >= 1.
        kind (str, optional): ``"exponential"`` (geometric interpolation) or
            ``"linear"`` (default: ``"exponential"``).

    Example::

        opt = KFAC(model, damping=DampingWarmup(1.0, 1e-3, steps=500))
    """

    def __init__(self, initial: float, target: float, steps: int, kind: str = "exponential"):
        self.initial = _positive("initial", initial)
        self.target = _positive("target", target)
        if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.steps = int(steps)
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        self.kind = kind

    def __call__(self, step: int) -> float:
        """The damping at ``step`` (0-based, >= 0)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step!r}")
        if step >= self.steps:
            return self.target
        t = step / self.steps
        if self.kind == "exponential":
            return self.initial * (self.target / self.initial) ** t
        return self.initial + (self.target - self.initial) * t

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(initial={self.initial!r}, target={self.target!r}, "
            f"steps={self.steps!r}, kind={self.kind!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DampingWarmup):
            return NotImplemented
        return (self.initial, self.target, self.steps, self.kind) == (
            other.initial,
            other.target,
            other.steps,
            other.kind,
        )

    def __hash__(self) -> int:
        return hash((self.initial, self.target, self.steps, self.kind))
