"""The base updates a :class:`~secondorder.CurvatureOptimizer` applies to its directions.

A base update turns each parameter's direction (the preconditioned gradient, or the raw
one where no curvature covers the parameter) into a parameter change, with its own
moments, learning rate and weight decay. One class per kind, selected by the config's
``base``:

* ``"sgd"`` (:class:`SGDBase`): SGD with momentum, through ``torch.optim.SGD``'s own
  functional update (multi-tensor kernels where torch uses them);
* ``"adam"`` (:class:`AdamBase`): Adam / AdamW, through ``torch.optim.Adam``'s;
* ``"momentum"`` (:class:`MomentumBase`): the bias-corrected first moment divided by a
  diagonal curvature, ``w ← w − η (m̂ / (D + λ))`` with ``D`` from the estimator's
  :meth:`~secondorder.estimators.base.CurvatureEstimator.moment_curvature` and ``D = 1``
  where it gives none (AdaFisher's update);
* ``"adahessian"`` (:class:`HessianAdamBase`): Adam whose second moment averages ``D²``,
  ``D`` from the estimator's
  :meth:`~secondorder.estimators.base.CurvatureEstimator.second_moment` (AdaHessian: the
  Hessian diagonal), with the denominator ``(√v̂)^k + ε``; plain Adam / AdamW where it
  gives none or curvature is off.

Each owns its param-group keys: :meth:`BaseUpdate.defaults` builds them from the config,
:meth:`BaseUpdate.check_group` validates a group (the constructor's and every
``add_param_group``'s), :meth:`BaseUpdate.step` updates one group. The functional cores
(:func:`sgd_update`, :func:`adam_update`, :func:`adahessian_update`) see plain lists of
tensors, never the optimizer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam
from torch.optim.sgd import sgd as _torch_sgd

from ._checks import check_number
from .kernels import adafisher_update

if TYPE_CHECKING:
    from .config import OptimizerConfig
    from .estimators.base import CurvatureEstimator
    from .optimizer import CurvatureOptimizer

__all__ = [
    "BASE_UPDATES",
    "AdamBase",
    "BaseUpdate",
    "ColumnLayout",
    "DiagonalCurvature",
    "HessianAdamBase",
    "MomentumBase",
    "SGDBase",
    "adahessian_steps",
    "adahessian_update",
    "adam_update",
    "sgd_update",
]


# ---- the functional cores --------------------------------------------------------------
#: ``foreach`` of the base updates: None is torch's own choice (multi-tensor kernels on CUDA,
#: a loop on the CPU), as ``torch.optim`` makes it; benchmarks set True to count a CPU step
#: as it runs on a GPU
FOREACH: bool | None = None


def sgd_update(
    params: list[Tensor],
    directions: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    decoupled: bool,
) -> None:
    """SGD with momentum on ``directions``: ``torch.optim.SGD``'s own functional update
    (``torch.optim.sgd.sgd``; multi-tensor ``foreach`` kernels where torch would use them,
    e.g. on CUDA), so the arithmetic is torch's. ``decoupled=True`` first shrinks the
    parameters, ``w ← w (1 − lr·wd)`` (SGDW). ``momentum_buffers`` is updated in place
    (``None`` entries are created)."""
    if weight_decay != 0 and decoupled:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
        weight_decay = 0.0
    _torch_sgd(
        params,
        directions,
        momentum_buffers,
        foreach=FOREACH,
        weight_decay=weight_decay,
        momentum=momentum,
        lr=lr,
        dampening=dampening,
        nesterov=nesterov,
        maximize=False,
    )


def adam_update(
    params: list[Tensor],
    directions: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> None:
    """Adam (``decoupled=False``) or AdamW on ``directions``: ``torch.optim.Adam``'s own
    functional update (``torch.optim.adam.adam``, with torch's choice of ``foreach``
    kernels), so the arithmetic is torch's. State tensors update in place."""
    _torch_adam(
        params,
        directions,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        foreach=FOREACH,
        decoupled_weight_decay=decoupled,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=False,
    )


def adahessian_update(
    params: list[Tensor],
    grads: list[Tensor],
    hessians: list[Tensor],
    exp_avgs: list[Tensor],
    exp_hessian_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    hessian_power: float,
    weight_decay: float,
    decoupled: bool = True,
) -> None:
    r"""One AdaHessian update of ``params`` in place (state tensors too).

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g, \quad
        v \leftarrow \beta_2 v + (1-\beta_2) D^2, \quad
        w \leftarrow w - \text{lr}\Bigl(\frac{\hat m}{\hat v^{k/2} + \epsilon} + \text{wd}\, w\Bigr)

    with ``m̂ = m/(1 − β1^t)``, ``v̂ = v/(1 − β2^t)``, ``t`` the parameter's step count
    after the increment. ``hessians`` may have size-1 dims (a spatially averaged diagonal):
    they broadcast against the parameter. ``decoupled=False`` adds ``wd w`` to the gradient
    instead (L2).
    """
    directions = adahessian_steps(
        grads,
        hessians,
        exp_avgs,
        exp_hessian_sqs,
        steps,
        params=params,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        hessian_power=hessian_power,
        weight_decay=weight_decay,
        decoupled=decoupled,
    )
    for param, direction in zip(params, directions, strict=True):
        if weight_decay != 0 and decoupled:
            param.mul_(1 - lr * weight_decay)
        param.add_(direction, alpha=-lr)


def adahessian_steps(
    grads: list[Tensor],
    hessians: list[Tensor],
    exp_avgs: list[Tensor],
    exp_hessian_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    params: list[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    hessian_power: float,
    weight_decay: float,
    decoupled: bool = True,
) -> list[Tensor]:
    """AdaHessian's moments (updated in place, see :func:`adahessian_update`) and its
    steps ``m̂ / (v̂^{k/2} + ε)``, returned, not applied: the parameters are not written
    (coupled decay, ``decoupled=False``, adds ``wd·w`` to the gradient)."""
    out = []
    for param, grad, hessian, exp_avg, exp_hessian_sq, step_t in zip(
        params, grads, hessians, exp_avgs, exp_hessian_sqs, steps, strict=True
    ):
        step_t += 1
        if weight_decay != 0 and not decoupled:
            grad = grad.add(param, alpha=weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_hessian_sq.mul_(beta2).addcmul_(hessian, hessian, value=1 - beta2)
        step = step_t.item()
        denom = exp_hessian_sq / (1 - beta2**step)
        denom = denom.sqrt_() if hessian_power == 1 else denom.pow_(hessian_power / 2)
        out.append(exp_avg.div(denom.add_(eps)).div_(1 - beta1**step))
    return out


# ---- the diagonal curvature of the "momentum" base ---------------------------------------
class Layout(Protocol):
    """How a parameter is seen as a batch of ``(rows, cols)`` matrices, the shape its
    diagonal curvature ``D = first ⊗ second`` is given in."""

    def view(self, t: Tensor) -> Tensor | None:
        """A strided view of ``t`` in the layout, or None where no view gives it."""

    def copy(self, t: Tensor) -> Tensor:
        """``t`` in the layout, as a new tensor."""

    def write(self, t: Tensor, matrix: Tensor) -> None:
        """Write ``matrix`` (in the layout) back into ``t``."""


class ColumnLayout:
    """A parameter as a ``shape`` matrix with one column (a bias, a norm layer's scale,
    an uncovered parameter), in its own element order."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def view(self, t: Tensor) -> Tensor | None:
        return t.view(self.shape) if t.is_contiguous() else None

    def copy(self, t: Tensor) -> Tensor:
        return t.reshape(self.shape).clone()

    def write(self, t: Tensor, matrix: Tensor) -> None:
        t.copy_(matrix.view(t.shape))


@dataclass
class DiagonalCurvature:
    """A parameter's diagonal curvature ``D[..., i, j] = first[..., i] · second[..., j]``
    in ``layout`` (``second`` a one-element tensor for a column: ``D = first``)."""

    layout: Layout
    first: Tensor
    second: Tensor

    def damped(self, damping: float, dtype: torch.dtype) -> Tensor:
        """``F̃ = first ⊗ second + λ`` materialised in the layout, in ``dtype``."""
        return (self.first.to(dtype).unsqueeze(-1) * self.second.to(dtype).unsqueeze(-2)).add_(
            damping
        )


# ---- the base updates ----------------------------------------------------------------------
class BaseUpdate(ABC):
    """One kind of base update (see the module docstring)."""

    #: the ``base`` value that selects it
    name: ClassVar[str]
    #: whether :meth:`step` applies the config's ``graft`` itself (the bases that read the
    #: curvature: their step is not a direction the optimizer could graft beforehand)
    grafts_itself: ClassVar[bool] = False

    @abstractmethod
    def defaults(self, config: OptimizerConfig) -> dict[str, Any]:
        """The param-group defaults this base reads, from the config."""

    def check_group(self, group: Mapping[str, Any]) -> None:
        """Validate a param group's hyperparameters (``ValueError``/``TypeError``)."""
        check_number("lr", group["lr"])
        check_number("weight_decay", group["weight_decay"])
        for p in group.get("params", ()):
            if p.is_sparse:
                raise ValueError("sparse parameters are not supported")

    def normalise_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """A new param group, before the defaults fill it in (:meth:`add_param_group`)."""
        return group

    def sync(self, opt: CurvatureOptimizer) -> None:  # noqa: B027 (most bases keep none)
        """Make the param groups consistent before they are saved (:meth:`state_dict`)."""

    def restore(self, opt: CurvatureOptimizer) -> None:
        """Complete and check the param groups after a state dict was loaded (one saved by
        an older version may lack keys)."""
        for group in opt.param_groups:
            self.check_group(group)

    @abstractmethod
    def step(
        self,
        opt: CurvatureOptimizer,
        group: dict[str, Any],
        directions: Mapping[Tensor, Tensor],
        *,
        weight_decay: float,
        curvature: CurvatureEstimator | None,
    ) -> None:
        """Update the parameters of ``group`` that have a direction. ``weight_decay`` is
        the coupled decay to apply (0 where it went into the gradient already);
        ``curvature`` is the estimator at a step that uses curvature, else None."""


class SGDBase(BaseUpdate):
    name = "sgd"

    def defaults(self, config: OptimizerConfig) -> dict[str, Any]:
        return {
            "lr": config.lr,
            "weight_decay": config.weight_decay,
            "momentum": config.momentum,
            "dampening": config.dampening,
            "nesterov": config.nesterov,
        }

    def check_group(self, group: Mapping[str, Any]) -> None:
        super().check_group(group)
        check_number("momentum", group["momentum"], high=1.0)
        check_number("dampening", group["dampening"], high=1.0)
        if not isinstance(group["nesterov"], bool):
            raise TypeError("nesterov must be a bool")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0")

    def step(self, opt, group, directions, *, weight_decay, curvature):
        params = [p for p in group["params"] if p in directions]
        if not params:
            return
        buffers = [opt.state[p].get("momentum_buffer") for p in params]
        sgd_update(
            params,
            [directions[p] for p in params],
            buffers,
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            weight_decay=weight_decay,
            decoupled=opt.decoupled_weight_decay,
        )
        if group["momentum"] != 0:
            for p, buf in zip(params, buffers, strict=True):
                opt.state[p]["momentum_buffer"] = buf


def check_betas(betas: Any, count: int = 2) -> None:
    """``betas`` must be a tuple or list of ``count`` numbers in [0, 1)."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == count):
        what = "a pair of numbers" if count == 2 else "(beta,)"
        raise ValueError(f"betas must be {what} in [0, 1), got {betas!r}")
    for i, beta in enumerate(betas):
        check_number(f"betas[{i}]", beta)
        if beta >= 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")


class AdamBase(BaseUpdate):
    name = "adam"

    def defaults(self, config: OptimizerConfig) -> dict[str, Any]:
        return {
            "lr": config.lr,
            "weight_decay": config.weight_decay,
            "betas": config.betas,
            "eps": config.eps,
        }

    def check_group(self, group: Mapping[str, Any]) -> None:
        super().check_group(group)
        check_betas(group["betas"])
        check_number("eps", group["eps"])

    def step(self, opt, group, directions, *, weight_decay, curvature):
        params = [p for p in group["params"] if p in directions]
        if not params:
            return
        for p in params:
            state = opt.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        adam_update(
            params,
            [directions[p] for p in params],
            [opt.state[p]["exp_avg"] for p in params],
            [opt.state[p]["exp_avg_sq"] for p in params],
            [opt.state[p]["step"] for p in params],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=weight_decay,
            decoupled=opt.decoupled_weight_decay,
        )


class MomentumBase(BaseUpdate):
    r"""The bias-corrected first moment over a diagonal curvature (AdaFisher's update):

    .. math::
        m \leftarrow \beta m + (1-\beta)(g + \kappa_{L2} w), \qquad
        w \leftarrow w - \eta\,\big(\hat m / (D + \lambda) + \kappa_{W} w\big)

    with ``m̂ = m / (1 − βᵗ)``, ``λ`` the damping and ``D`` the estimator's
    :meth:`~secondorder.estimators.base.CurvatureEstimator.moment_curvature` of the
    parameter, or 1 where it gives none or curvature is off. Param groups hold β twice, as
    ``beta`` and as ``betas = (beta,)`` (the key that ``OneCycleLR`` / ``CyclicLR`` write);
    each step copies whichever changed since the last step to the other."""

    name = "momentum"
    grafts_itself = True

    def defaults(self, config: OptimizerConfig) -> dict[str, Any]:
        beta = config.beta  # type: ignore[attr-defined]
        return {
            "lr": config.lr,
            "beta": beta,
            "betas": (beta,),
            "weight_decay": config.weight_decay,
        }

    def check_group(self, group: Mapping[str, Any]) -> None:
        super().check_group(group)
        _check_beta(group["beta"])
        check_betas(group["betas"], count=1)
        if group["betas"][0] != group["beta"]:
            raise ValueError(
                f"a param group sets beta={group['beta']!r} and betas={tuple(group['betas'])!r}: "
                "they are the same decay, set one of them"
            )

    def normalise_group(self, group: dict[str, Any]) -> dict[str, Any]:
        group = dict(group)
        if "betas" in group and "beta" not in group:
            check_betas(group["betas"], count=1)
            group["beta"] = group["betas"][0]
        elif "beta" in group and "betas" not in group:
            group["betas"] = (group["beta"],)
        return group

    @staticmethod
    def synced_beta(opt: CurvatureOptimizer, group: dict[str, Any]) -> float:
        """The group's β, with ``beta`` and ``betas[0]`` made equal again: the one that
        changed since the last step (a scheduler writes ``betas``) wins."""
        seen = opt.__dict__.setdefault("_synced_beta", {})
        beta, betas = group["beta"], group["betas"]
        check_betas(betas, count=1)
        if beta != betas[0]:
            last = seen.get(id(group))
            if last is not None and beta == last:
                beta = group["beta"] = betas[0]
            elif last is not None and betas[0] == last:
                group["betas"] = (beta, *betas[1:])
            else:
                raise ValueError(
                    f"param group's beta={beta!r} and betas[0]={betas[0]!r} were both changed "
                    "since the last step; they are the same decay: set one of them"
                )
        seen[id(group)] = beta
        return _check_beta(beta)

    def sync(self, opt: CurvatureOptimizer) -> None:
        for group in opt.param_groups:  # a scheduler's pending change is saved in both
            self.synced_beta(opt, group)

    def restore(self, opt: CurvatureOptimizer) -> None:
        seen = opt.__dict__.setdefault("_synced_beta", {})
        for group in opt.param_groups:
            group.setdefault("betas", (group["beta"],))  # saved before betas existed
            self.check_group(group)
            seen[id(group)] = group["beta"]

    def step(self, opt, group, directions, *, weight_decay, curvature):
        if opt.config.graft is not None:
            self._grafted_step(opt, group, directions, weight_decay, curvature)
            return
        lr, beta = group["lr"], self.synced_beta(opt, group)
        damping = opt.current_damping()
        for p in group["params"]:
            grad = directions.get(p)
            if grad is None:
                continue
            state = self._counted_state(opt, p)
            kwargs = {
                "lr": lr,
                "beta": beta,
                "bias_correction": 1.0 - beta ** state["step"].item(),
                "damping": damping,
                "weight_decay": weight_decay,
                "decoupled": opt.decoupled_weight_decay,
            }
            diagonal = None if curvature is None else curvature.moment_curvature(p)
            if diagonal is None:  # D = 1: F̃ = 1 + λ
                one = _one(p)
                diagonal = DiagonalCurvature(
                    ColumnLayout((p.numel(), 1)), one.expand(p.numel()), one
                )
            layout, exp_avg = diagonal.layout, state["exp_avg"]
            g = layout.view(grad)
            if g is None:
                g = layout.copy(grad)
            w, m = layout.view(p), layout.view(exp_avg)
            if w is not None and m is not None:
                adafisher_update(w, g, m, diagonal.first, diagonal.second, **kwargs)
                continue
            # no strided view of the parameter in the layout: update copies
            w, m = layout.copy(p), layout.copy(exp_avg)
            adafisher_update(w, g, m, diagonal.first, diagonal.second, **kwargs)
            layout.write(p, w)
            layout.write(exp_avg, m)

    @staticmethod
    def _counted_state(opt: CurvatureOptimizer, p: Tensor) -> dict[str, Any]:
        """``p``'s state (``step``, ``exp_avg``), created at its first step, with the step
        count advanced."""
        state = opt.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        return state

    def _grafted_step(self, opt, group, directions, weight_decay, curvature):
        """With ``graft``: the moment of every parameter is updated as without it, and the
        step ``u = m̂ / (D + λ)`` of each one with a curvature takes the grafted method's
        norm (:func:`secondorder.grafting.apply_grafted_base`); the others take the grafted
        method's own step (``graft="adam"``: Adam's)."""
        from .grafting import apply_grafted_base

        beta = self.synced_beta(opt, group)
        damping = opt.current_damping()
        coupled = weight_decay != 0 and not opt.decoupled_weight_decay
        steps: dict[Tensor, Tensor] = {}
        for p in group["params"]:
            grad = directions.get(p)
            if grad is None:
                continue
            state = self._counted_state(opt, p)
            exp_avg = state["exp_avg"]
            exp_avg.lerp_(grad.add(p, alpha=weight_decay) if coupled else grad, 1 - beta)
            diagonal = None if curvature is None else curvature.moment_curvature(p)
            if diagonal is None:
                continue
            layout = diagonal.layout
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            m = layout.copy(exp_avg).to(dtype)
            u = m.div_(diagonal.damped(damping, dtype)).div_(1.0 - beta ** state["step"].item())
            steps[p] = torch.empty_like(p)
            layout.write(steps[p], u)
        apply_grafted_base(opt, group, directions, steps, weight_decay=weight_decay)


class HessianAdamBase(BaseUpdate):
    r"""Adam whose second moment averages the square of the estimator's
    :meth:`~secondorder.estimators.base.CurvatureEstimator.second_moment` ``D`` in place
    of ``g²`` (AdaHessian's update, :func:`adahessian_update`):

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g, \quad
        v \leftarrow \beta_2 v + (1-\beta_2) D^2, \quad
        w \leftarrow w - \eta\Bigl(\frac{\hat m}{(\sqrt{\hat v})^k + \epsilon}
            + \kappa_W w\Bigr)

    State: ``step``, ``exp_avg``, ``exp_hessian_diag_sq`` and ``hessian_diag``, the ``D``
    of the last update. A parameter without ``D`` (uncovered, or curvature off) takes the
    plain Adam / AdamW update (:func:`adam_update`, its second moment ``exp_avg_sq``), so
    that with ``precondition=False`` this is ``torch.optim.Adam`` / ``AdamW``."""

    name = "adahessian"
    grafts_itself = True

    def defaults(self, config: OptimizerConfig) -> dict[str, Any]:
        return {
            "lr": config.lr,
            "weight_decay": config.weight_decay,
            "betas": config.betas,
            "eps": config.eps,
            "hessian_power": config.hessian_power,  # type: ignore[attr-defined]
        }

    def check_group(self, group: Mapping[str, Any]) -> None:
        super().check_group(group)
        check_betas(group["betas"])
        # > 0: with eps = 0 a coordinate without gradient and curvature (an input that is
        # always 0, an unused output) would take the step 0/0 = NaN
        check_number("eps", group["eps"], low_open=True)
        check_number("hessian_power", group["hessian_power"], high=1.0)

    def step(self, opt, group, directions, *, weight_decay, curvature):
        params = [p for p in group["params"] if p in directions]
        if not params:
            return
        hessian, plain = [], []
        for p in params:
            diag = None if curvature is None else curvature.second_moment(p)
            state = opt.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if diag is None:
                if "exp_avg_sq" not in state:
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                plain.append(p)
                continue
            if "exp_hessian_diag_sq" not in state:
                state["exp_hessian_diag_sq"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format
                )
            state["hessian_diag"] = diag
            hessian.append(p)
        beta1, beta2 = group["betas"]
        common = {
            "lr": group["lr"],
            "beta1": beta1,
            "beta2": beta2,
            "eps": group["eps"],
            "weight_decay": weight_decay,
            "decoupled": opt.decoupled_weight_decay,
        }
        state = opt.state
        if opt.config.graft is not None:
            from .grafting import apply_grafted_base

            common.pop("lr")
            steps = adahessian_steps(
                [directions[p] for p in hessian],
                [state[p]["hessian_diag"] for p in hessian],
                [state[p]["exp_avg"] for p in hessian],
                [state[p]["exp_hessian_diag_sq"] for p in hessian],
                [state[p]["step"] for p in hessian],
                params=hessian,
                hessian_power=group["hessian_power"],
                **common,
            )
            apply_grafted_base(
                opt,
                group,
                directions,
                dict(zip(hessian, steps, strict=True)),
                weight_decay=weight_decay,
            )
            return
        if hessian:
            adahessian_update(
                hessian,
                [directions[p] for p in hessian],
                [state[p]["hessian_diag"] for p in hessian],
                [state[p]["exp_avg"] for p in hessian],
                [state[p]["exp_hessian_diag_sq"] for p in hessian],
                [state[p]["step"] for p in hessian],
                hessian_power=group["hessian_power"],
                **common,
            )
        if plain:
            adam_update(
                plain,
                [directions[p] for p in plain],
                [state[p]["exp_avg"] for p in plain],
                [state[p]["exp_avg_sq"] for p in plain],
                [state[p]["step"] for p in plain],
                **common,
            )


def _check_beta(beta: Any) -> float:
    beta = check_number("beta", beta, high=1.0)
    if beta >= 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    return beta


_ONES: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _one(p: Tensor) -> Tensor:
    """A one-element tensor of ones on ``p``'s device (in float64 for a float64 ``p``)."""
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    key = (p.device, dtype)
    if key not in _ONES:
        _ONES[key] = torch.ones(1, device=p.device, dtype=dtype)
    return _ONES[key]


#: every base update, by the ``base`` value that selects it
BASE_UPDATES: dict[str, BaseUpdate] = {
    b.name: b for b in (SGDBase(), AdamBase(), MomentumBase(), HessianAdamBase())
}
