r"""Adaptive damping, learning rate and momentum (Martens & Grosse 2015, §6.5 and §7).

Every :class:`~secondorder.CurvatureOptimizer` takes three options (fields of
:class:`~secondorder.config.OptimizerConfig`), which need ``opt.step(closure)``:

* ``adaptive_damping``: every ``damping_adaptation_interval`` steps, the Levenberg–Marquardt
  rule moves λ by the reduction ratio of the step just taken,

  .. math::
      \rho = \frac{h(\theta + \delta) - h(\theta)}{M(\delta)}, \qquad
      M(\delta) = \tfrac12 \delta^\top (C + (\lambda + \eta) I)\,\delta + \nabla h^\top \delta,

  :math:`\lambda \leftarrow \omega\lambda` if :math:`\rho > 3/4`, :math:`\lambda \leftarrow
  \lambda/\omega` if :math:`\rho < 1/4` (ω = ``damping_adaptation_decay``), clipped to
  ``[min_damping, max_damping]``. ``h`` is the closure's loss plus the coupled L2 term
  :math:`\tfrac\eta2|\theta|^2` (η = ``weight_decay``, 0 when it is decoupled), and δ the
  parameter change of the step, whatever made it (the base update, or the adaptive one).
* ``adaptive_lr`` / ``adaptive_momentum``: the step is :math:`\delta = \alpha v_1 + \mu v_2`
  with :math:`v_1 = -\Delta` (Δ the preconditioned direction, raw gradient where no curvature
  covers a parameter, plus η θ) and :math:`v_2` the previous step; (α, μ) minimise
  :math:`M(\delta)`: :math:`Q c = -b` with :math:`Q_{ij} = v_i^\top (C + (\lambda+\eta) I) v_j`,
  :math:`b_i = \nabla h^\top v_i`, over the coefficients that are adaptive (the other one is
  fixed: α = each group's ``lr``, μ = each group's ``momentum``).

**C** is the Hessian of the closure's loss with respect to the optimised parameters, at θ,
on the closure's batch: its products :math:`Cv` are double-backward (Hessian-vector)
products. The optimizer calls the closure once more at θ for them (one extra forward pass,
a backward pass with a graph and one double backward per vector), and once at θ + δ at a
damping-adaptation step (one forward pass). In these extra calls nothing is recorded for the
curvature statistics, ``loss.backward()`` is intercepted (the optimizer differentiates the
loss itself) and ``.grad`` is left as the first call set it. The closure must compute the
same loss each time it is called at the same parameters (same batch, no dropout).

The module keeps the math in pure functions (:func:`minimise_quadratic_model`,
:func:`quadratic_model_change`, :func:`reduction_ratio`, :func:`levenberg_marquardt`,
:func:`curvature_products`) and the state in :class:`AdaptiveState`, whose two hooks the
optimizer's ``step`` calls around its base update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ._host import to_host

if TYPE_CHECKING:
    from .config import OptimizerConfig
    from .optimizer import CurvatureOptimizer

__all__ = [
    "LM_LOWER",
    "LM_UPPER",
    "Adaptation",
    "AdaptiveState",
    "curvature_products",
    "levenberg_marquardt",
    "minimise_quadratic_model",
    "quadratic_model_change",
    "reduction_ratio",
]

#: ρ below this: the quadratic model was too optimistic, more damping
LM_LOWER = 0.25
#: ρ above this: the quadratic model is trustworthy, less damping
LM_UPPER = 0.75


# ---- the math ------------------------------------------------------------------------------
def quadratic_model_change(matrix: Tensor, linear: Tensor, coefficients: Tensor) -> float:
    """``M(δ) − M(0) = ½ cᵀQc + bᵀc`` for ``δ = Σ c_i v_i``, ``Q_ij = v_iᵀ(C + λI)v_j`` and
    ``b_i = ∇ᵀv_i``."""
    c = coefficients.double()
    return float(0.5 * c @ matrix.double() @ c + linear.double() @ c)


def minimise_quadratic_model(
    matrix: Tensor, linear: Tensor, fixed: Sequence[float | None]
) -> Tensor | None:
    """The minimiser ``c`` of ``½ cᵀQc + bᵀc`` over the entries whose ``fixed[i]`` is None,
    the others held at ``fixed[i]``: ``Q_FF c_F = −(b_F + Q_FX c_X)``.

    Returns None when the free block ``Q_FF`` is not positive definite (the model has no
    minimum) or the solution is not finite. Float64 throughout.
    """
    q, b = matrix.double(), linear.double()
    c = torch.tensor([0.0 if f is None else float(f) for f in fixed], dtype=torch.float64)
    free = [i for i, f in enumerate(fixed) if f is None]
    if not free:
        return c
    held = [i for i, f in enumerate(fixed) if f is not None]
    rhs = -(b[free] + q[free][:, held] @ c[held])
    factor, info = torch.linalg.cholesky_ex(q[free][:, free])
    if int(info) != 0:
        return None
    c[free] = torch.cholesky_solve(rhs[:, None], factor)[:, 0]
    return c if bool(torch.isfinite(c).all()) else None


def reduction_ratio(loss: float, loss_after: float, model_change: float) -> float:
    """``ρ = (h(θ+δ) − h(θ)) / M(δ)``: −inf when the new loss is not finite (the step
    diverged), NaN when the model predicts no decrease (``M(δ) >= 0``: no information)."""
    if not math.isfinite(loss_after):
        return -math.inf
    if not model_change < 0.0:
        return math.nan
    return (loss_after - loss) / model_change


def levenberg_marquardt(
    damping: float,
    rho: float,
    decay: float,
    *,
    min_damping: float,
    max_damping: float | None = None,
) -> float:
    """The Levenberg–Marquardt rule: ``λ ω`` if ``ρ > 3/4``, ``λ / ω`` if ``ρ < 1/4``, else
    ``λ`` (also for a NaN ρ), clipped to ``[min_damping, max_damping]``."""
    if rho > LM_UPPER:
        damping = damping * decay
    elif rho < LM_LOWER:
        damping = damping / decay
    damping = max(damping, min_damping)
    return damping if max_damping is None else min(damping, max_damping)


def curvature_products(
    loss: Tensor, params: Sequence[Tensor], vectors: Sequence[Sequence[Tensor]]
) -> list[list[Tensor]]:
    """``C v`` for each ``v`` in ``vectors`` (one tensor per parameter), ``C`` the Hessian of
    ``loss`` w.r.t. ``params``: one backward pass with a graph, then one double backward per
    vector. ``loss`` must still have its graph."""
    with torch.enable_grad():
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        products = []
        for k, v in enumerate(vectors):
            if not live:  # the loss is linear in the parameters
                products.append([torch.zeros_like(p) for p in params])
                continue
            hv = torch.autograd.grad(
                [grads[i] for i in live],
                params,
                grad_outputs=[v[i].to(grads[i].dtype) for i in live],
                retain_graph=k < len(vectors) - 1,
                allow_unused=True,
            )
            products.append(
                [
                    torch.zeros_like(p) if h is None else h.detach()
                    for p, h in zip(params, hv, strict=True)
                ]
            )
    return products


def _dot(x: Sequence[Tensor], y: Sequence[Tensor], weights: Sequence[float] | None = None):
    """``Σ_p w_p ⟨x_p, y_p⟩`` as a float64 tensor (on the parameters' device)."""
    terms = [torch.sum(a.double() * b.double()) for a, b in zip(x, y, strict=True)]
    if weights is not None:
        terms = [t * w for t, w in zip(terms, weights, strict=True)]
    return torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64)


# ---- the closure's extra calls ------------------------------------------------------------
class _KeepLoss(TorchFunctionMode):
    """Inside the closure: ``loss.backward()`` keeps the loss (and its graph) instead of
    running backward."""

    def __init__(self) -> None:
        super().__init__()
        self.loss: Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is Tensor.backward:
            self.loss = args[0]
            return None
        return func(*args, **(kwargs or {}))


@contextmanager
def _quiet(opt: CurvatureOptimizer) -> Iterator[None]:
    """An extra closure call: nothing recorded for the curvature, ``.grad`` as it was."""
    params = [p for g in opt.param_groups for p in g["params"]]
    saved = [p.grad for p in params]
    for p in params:  # so that the closure's zero_grad cannot zero them in place
        p.grad = None
    capture = opt.capture
    recording = capture.recording if capture is not None else False
    if capture is not None:
        capture.recording = False
    try:
        yield
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g
        if capture is not None:
            capture.recording = recording


def _loss_with_graph(opt: CurvatureOptimizer, closure: Callable[[], Any]) -> Tensor:
    with _quiet(opt), torch.enable_grad(), _KeepLoss() as mode:
        returned = closure()
    loss = mode.loss if mode.loss is not None else returned
    if not isinstance(loss, Tensor) or loss.grad_fn is None:
        raise RuntimeError(
            "adaptive_lr / adaptive_momentum / adaptive_damping: the closure's loss has no "
            "graph to differentiate twice; the closure must compute the loss with gradients "
            "enabled and call loss.backward() (or return the loss)"
        )
    return loss


def _loss_value(opt: CurvatureOptimizer, closure: Callable[[], Any]) -> float:
    with _quiet(opt), torch.enable_grad(), _KeepLoss():
        returned = closure()
    return _as_float(returned)


def _as_float(loss: Any) -> float:
    return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)


# ---- the state -----------------------------------------------------------------------------
@dataclass
class Adaptation:
    """What the adaptive options chose at one step (for logging).

    Attributes:
        step (int): the step (0-based).
        alpha (float or None): α, the coefficient on ``−Δ``; None where the groups' ``lr``
            was used (``adaptive_lr`` off).
        mu (float or None): μ, the coefficient on the previous step; None where the groups'
            ``momentum`` was used (``adaptive_momentum`` off).
        damping (float): λ used at this step.
        next_damping (float): λ of the next step (differs after an adaptation).
        model_change (float or None): ``M(δ)``, the predicted change (None where not
            computed).
        loss (float or None): the closure's loss at θ.
        loss_after (float or None): the closure's loss at θ + δ, at damping-adaptation
            steps (ρ adds the change of the coupled L2 term to it).
        rho (float or None): the reduction ratio, at damping-adaptation steps.
        fallback (bool): the damped model had no minimum along ``−Δ`` (negative
            curvature): the step took α = the first group's ``lr`` (μ as without
            ``adaptive_momentum``, or 0 with it).
    """

    step: int
    alpha: float | None = None
    mu: float | None = None
    damping: float = math.nan
    next_damping: float = math.nan
    model_change: float | None = None
    loss: float | None = None
    loss_after: float | None = None
    rho: float | None = None
    fallback: bool = False


class AdaptiveState:
    """Adaptive damping, learning rate and momentum of one optimizer (see the module
    docstring). Built from the config by :meth:`from_config` (None when every option is off);
    the optimizer calls :meth:`before_base_update` and :meth:`after_base_update` around its
    base update, and saves :meth:`state_dict`. The damping in use is the optimizer's
    ``damping`` attribute, which this object sets.

    Attributes:
        last (Adaptation or None): what the last step chose.
    """

    #: per-parameter optimizer state: the previous step δ (adaptive_lr / adaptive_momentum)
    previous_key = "previous_update"

    def __init__(self, config: OptimizerConfig) -> None:
        self.config = config  # the adaptive options and their bounds
        self.last: Adaptation | None = None
        self._snapshot: list[Tensor] | None = None  # θ before a base update that is measured
        self._pending: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, config: OptimizerConfig) -> AdaptiveState | None:
        if config.adaptive_damping or config.adaptive_lr or config.adaptive_momentum:
            return cls(config)
        return None

    @property
    def replaces_base_update(self) -> bool:
        """Whether the step is ``α v₁ + μ v₂`` (else the base update's, measured)."""
        return self.config.adaptive_lr or self.config.adaptive_momentum

    def adapts_damping_at(self, step: int) -> bool:
        cfg = self.config
        return cfg.adaptive_damping and (step + 1) % cfg.damping_adaptation_interval == 0

    # ---- the hooks -------------------------------------------------------------------------
    def before_base_update(
        self,
        opt: CurvatureOptimizer,
        closure: Callable[[], Any] | None,
        loss: Any,
        grads: Mapping[Tensor, Tensor],
        directions: Mapping[Tensor, Tensor],
        *,
        l2_applied: bool,
    ) -> Mapping[Tensor, Tensor]:
        """Called with the step's gradients and directions; returns the directions the base
        update must follow (none when this object made the step itself)."""
        if closure is None:
            on = [
                n
                for n in ("adaptive_damping", "adaptive_lr", "adaptive_momentum")
                if getattr(self.config, n)
            ]
            raise RuntimeError(
                f"{type(opt).__name__}: {', '.join(on)} needs the loss: call "
                "opt.step(closure) with a closure that computes the loss, calls "
                "loss.backward() and returns the loss"
            )
        if opt.comm is not None:
            raise RuntimeError(
                "adaptive_damping / adaptive_lr / adaptive_momentum do not support "
                "distributed training (each rank would choose its own λ, α, μ)"
            )
        k = opt.steps
        self._pending = None
        self._snapshot = None
        self.last = None
        if not directions:
            return directions
        record = Adaptation(
            step=k,
            damping=float(opt.damping),
            next_damping=float(opt.damping),
            loss=_as_float(loss),
        )
        self.last = record
        if not self.replaces_base_update:
            if self.adapts_damping_at(k):
                self._snapshot = [p.detach().clone() for p in self._params(opt, directions)]
                self._pending = {
                    "params": self._params(opt, directions),
                    "grads": grads,
                    "l2_applied": l2_applied,
                }
            return directions
        self._adaptive_step(opt, closure, grads, directions, l2_applied, record)
        return {}

    def after_base_update(
        self,
        opt: CurvatureOptimizer,
        closure: Callable[[], Any] | None,
        grads: Mapping[Tensor, Tensor],
    ) -> None:
        """Called after the base update: the damping adaptation of a step that adapts it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        record = self.last
        params = pending["params"]
        if self._snapshot is not None:  # the base update made δ: measure it, model it at θ
            before, self._snapshot = self._snapshot, None
            after = [p.detach().clone() for p in params]
            delta = [a - b for a, b in zip(after, before, strict=True)]
            for p, b in zip(params, before, strict=True):
                p.copy_(b)
            try:
                matrix, linear = self._model(
                    opt, closure, params, pending["grads"], [delta], pending["l2_applied"]
                )
            finally:
                for p, a in zip(params, after, strict=True):
                    p.copy_(a)
            record.model_change = quadratic_model_change(
                matrix, linear, torch.ones(1, dtype=torch.float64)
            )
            pending["delta"] = delta
            pending["before"] = before
        wd = self._coupled_decay(opt, params)
        # h includes the coupled L2 term: h(θ+δ) − h(θ) gains Σ η (θᵀδ + ½|δ|²)
        l2_change = float(
            _dot(pending["before"], pending["delta"], wd)
            + 0.5 * _dot(pending["delta"], pending["delta"], wd)
        )
        record.loss_after = _loss_value(opt, closure)
        record.rho = reduction_ratio(
            record.loss, record.loss_after + l2_change, record.model_change
        )
        opt.damping = levenberg_marquardt(
            float(opt.damping),
            record.rho,
            self.config.damping_adaptation_decay,
            min_damping=self.config.min_damping,
            max_damping=self.config.max_damping,
        )
        record.next_damping = float(opt.damping)

    # ---- the step α v₁ + μ v₂ ---------------------------------------------------------------
    def _adaptive_step(
        self,
        opt: CurvatureOptimizer,
        closure: Callable[[], Any],
        grads: Mapping[Tensor, Tensor],
        directions: Mapping[Tensor, Tensor],
        l2_applied: bool,
        record: Adaptation,
    ) -> None:
        params = self._params(opt, directions)
        lr = {p: g["lr"] for g in opt.param_groups for p in g["params"]}
        momentum = {p: g["momentum"] for g in opt.param_groups for p in g["params"]}
        wd = self._coupled_decay(opt, params)
        descent = [
            -(directions[p] if l2_applied or w == 0 else directions[p].add(p, alpha=w))
            for p, w in zip(params, wd, strict=True)
        ]
        previous = [opt.state[p].get(self.previous_key) for p in params]
        has_previous = all(d is not None for d in previous) and bool(_dot(previous, previous) > 0)
        # a coefficient that is not adaptive is 1 on a vector scaled per group
        if not self.config.adaptive_lr:
            descent = [lr[p] * d for p, d in zip(params, descent, strict=True)]
        vectors = [descent]
        if has_previous:
            if not self.config.adaptive_momentum:
                previous = [momentum[p] * d for p, d in zip(params, previous, strict=True)]
            vectors.append(previous)
        matrix, linear = self._model(opt, closure, params, grads, vectors, l2_applied)
        wanted = [None if self.config.adaptive_lr else 1.0]
        if has_previous:
            wanted.append(None if self.config.adaptive_momentum else 1.0)
        coefficients = minimise_quadratic_model(matrix, linear, wanted)
        if coefficients is None and len(wanted) == 2 and wanted[1] is None:
            # δ_prev nearly parallel to Δ, or negative curvature along it: drop μ
            wanted[1] = 0.0
            coefficients = minimise_quadratic_model(matrix, linear, wanted)
        if coefficients is None:
            # no minimum along Δ (negative curvature): the first group's lr, as SGD would
            record.fallback = True
            coefficients = torch.tensor(
                [opt.param_groups[0]["lr"], *wanted[1:]], dtype=torch.float64
            )
        else:
            record.alpha = float(coefficients[0]) if self.config.adaptive_lr else None
            if self.config.adaptive_momentum:
                record.mu = float(coefficients[1]) if has_previous else 0.0
        record.model_change = quadratic_model_change(matrix, linear, coefficients)
        c = [float(x) for x in coefficients]
        delta = []
        for i, p in enumerate(params):
            d = vectors[0][i] * c[0]
            if len(vectors) == 2:
                d = d.add(vectors[1][i], alpha=c[1])
            delta.append(d.to(p.dtype))
        if self.adapts_damping_at(record.step):
            before = [p.detach().clone() for p in params]
            self._pending = {
                "params": params,
                "before": before,
                "delta": delta,
                "l2_applied": l2_applied,
            }
        for p, d in zip(params, delta, strict=True):
            p.add_(d)
            opt.state[p][self.previous_key] = d

    # ---- the quadratic model ---------------------------------------------------------------
    def _model(
        self,
        opt: CurvatureOptimizer,
        closure: Callable[[], Any],
        params: list[Tensor],
        grads: Mapping[Tensor, Tensor],
        vectors: list[list[Tensor]],
        l2_applied: bool,
    ) -> tuple[Tensor, Tensor]:
        """``Q`` and ``b`` of the damped model on ``vectors`` at the current θ."""
        loss = _loss_with_graph(opt, closure)
        products = curvature_products(loss, params, vectors)
        del loss
        wd = self._coupled_decay(opt, params)
        damping = float(opt.damping)
        gradient = [
            grads[p] if l2_applied or w == 0 else grads[p].add(p, alpha=w)
            for p, w in zip(params, wd, strict=True)
        ]
        n = len(vectors)
        entries = []
        for i in range(n):
            for j in range(n):
                entries.append(
                    0.5 * (_dot(vectors[i], products[j]) + _dot(vectors[j], products[i]))
                    + _dot(vectors[i], vectors[j], [damping + w for w in wd])
                )
        entries += [_dot(gradient, v) for v in vectors]
        values = torch.tensor(to_host(entries), dtype=torch.float64)
        return values[: n * n].reshape(n, n), values[n * n :]

    @staticmethod
    def _params(opt: CurvatureOptimizer, present: Mapping[Tensor, Tensor]) -> list[Tensor]:
        return [p for g in opt.param_groups for p in g["params"] if p in present]

    @staticmethod
    def _coupled_decay(opt: CurvatureOptimizer, params: list[Tensor]) -> list[float]:
        """Each parameter's coupled L2 coefficient η (0 where the decay is decoupled)."""
        if opt.decoupled_weight_decay:
            return [0.0] * len(params)
        decay = {p: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        return [float(decay[p]) for p in params]

    # ---- persistence -------------------------------------------------------------------------
    def state_dict(self, opt: CurvatureOptimizer) -> dict[str, Any]:
        """λ (adaptive damping) and the last record; the previous step δ is per-parameter
        optimizer state (``previous_update``)."""
        return {
            "damping": float(opt.damping) if self.config.adaptive_damping else None,
            "last": None if self.last is None else asdict(self.last),
        }

    def load_state_dict(self, opt: CurvatureOptimizer, state: Mapping[str, Any] | None) -> None:
        if state is None:
            if self.config.adaptive_damping:
                raise ValueError(
                    "this state_dict was saved without adaptive_damping: it has no adapted λ"
                )
            return
        if self.config.adaptive_damping:
            if state.get("damping") is None:
                raise ValueError(
                    "this state_dict was saved without adaptive_damping: it has no adapted λ"
                )
            opt.damping = float(state["damping"])
        last = state.get("last")
        self.last = None if last is None else Adaptation(**last)
