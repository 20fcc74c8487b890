"""CurvatureOptimizer: the step loop shared by every second-order method.

One step::

    stats  <- capture hooks (forward/backward passes since the last step)
    update  estimator.update(stats)            every `curvature_every` steps
    refresh estimator.refresh(damping)         every `inverse_every` steps
    u       estimator.precondition(grads)      every step (raw gradient where not covered)
    clip    u <- nu * u, nu = min(1, sqrt(kl_clip / sum lr^2 <u, g>))   (optional)
    base    SGD-momentum or Adam-style update on u, L2 or decoupled weight decay

The base updates are written to match ``torch.optim.SGD`` and ``torch.optim.Adam`` /
``AdamW`` operation for operation, so that with ``precondition=False`` the optimizer
*is* that optimizer. Coupled (L2) weight decay is added to the preconditioned
direction, as in K-FAC reference implementations.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ._host import to_host
from .capture import ModelCapture, SkipPattern, describe_unsupported, find_layers, module_name
from .distributed import Communicator, default_communicator, scale_output_statistics
from .estimators.base import CurvatureEstimator
from .fisher import LIKELIHOODS, check_likelihood, sampled_loss
from .layers import LayerHelper

#: a hyperparameter given as a number or as a function of the step (0-based)
Schedule = float | Callable[[int], float]
#: an interval in steps, or a function of the step returning one
Interval = int | Callable[[int], int]
#: when curvature is used: None (always), a predicate of the step, or (start, stop) step ranges
UseCurvature = Callable[[int], bool] | Iterable[tuple[int, int | None]] | None
#: builds the estimator from the covered layers and the optimizer's parameters
EstimatorFactory = Callable[[list[LayerHelper], list[nn.Parameter]], CurvatureEstimator]

_BASES = ("sgd", "adam")
_NONFINITE = ("skip", "raise")
_FISHER_TYPES = ("empirical", "mc")


# ---- argument checking ---------------------------------------------------------------
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


def is_due(name: str, interval: Interval, step: int) -> bool:
    """Whether ``step`` is a multiple of the interval (evaluated at ``step``)."""
    every = interval(step) if callable(interval) else interval
    if callable(interval):
        check_interval(f"{name}({step})", every)
    return step % every == 0


def _takes_any_keyword(init: Callable[..., Any]) -> bool:
    """Whether ``init`` has a ``**kwargs`` parameter."""
    params = inspect.signature(inspect.unwrap(init)).parameters.values()
    return any(p.kind is p.VAR_KEYWORD for p in params)


@functools.cache
def _keyword_names(cls: type) -> frozenset[str]:
    """The keyword arguments ``cls(...)`` is known to accept: the parameters of its
    ``__init__`` and, while an ``__init__`` takes ``**kwargs`` (handed on to
    ``super().__init__``), those of the next class's."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (torch.optim.Optimizer, object):
            break
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        names.update(
            p.name
            for p in inspect.signature(inspect.unwrap(init)).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
        )
        if not _takes_any_keyword(init):
            break
    return frozenset(names)


_Init = TypeVar("_Init", bound=Callable[..., None])


def checked_keywords(init: _Init) -> _Init:
    """Decorate an optimizer's ``__init__`` that takes no ``**kwargs``: a keyword argument
    it does not take raises the ``TypeError`` Python would, but naming the class the user
    called (``KFAC.__init__()``, not the ``CurvatureOptimizer.__init__()`` that the
    subclass handed its ``**kwargs`` to), with the closest keyword that class accepts as a
    suggestion. :class:`CurvatureOptimizer` applies it to every subclass's ``__init__``
    without ``**kwargs``; one with ``**kwargs`` (which may take some for itself) hands
    them on unchecked."""
    accepted = {
        p.name
        for p in inspect.signature(init).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        for key in kwargs:
            if key not in accepted:
                called = type(self)
                close = difflib.get_close_matches(key, sorted(_keyword_names(called)), n=1)
                hint = f". Did you mean {close[0]!r}?" if close else ""
                raise TypeError(
                    f"{called.__name__}.__init__() got an unexpected keyword argument {key!r}{hint}"
                )
        init(self, *args, **kwargs)

    return checked  # type: ignore[return-value]


def _caller_stacklevel() -> int:
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


# ---- the functional core of the base updates -----------------------------------------
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
    """SGD with momentum on ``directions``, exactly as ``torch.optim.SGD`` (foreach=False).

    ``momentum_buffers`` is updated in place (``None`` entries are created).
    """
    for i, param in enumerate(params):
        d_p = directions[i]
        if weight_decay != 0:
            if decoupled:
                param.mul_(1 - lr * weight_decay)
            else:
                d_p = d_p.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = torch.clone(d_p).detach()
                momentum_buffers[i] = buf
            else:
                buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
            d_p = d_p.add(buf, alpha=momentum) if nesterov else buf
        param.add_(d_p, alpha=-lr)


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
    """Adam (``decoupled=False``) or AdamW on ``directions``, exactly as
    ``torch.optim.Adam``/``AdamW`` (foreach=False). State tensors update in place."""
    for i, param in enumerate(params):
        d_p = directions[i]
        exp_avg, exp_avg_sq, step_t = exp_avgs[i], exp_avg_sqs[i], steps[i]
        step_t += 1
        if weight_decay != 0:
            if decoupled:
                param.mul_(1 - lr * weight_decay)
            else:
                d_p = d_p.add(param, alpha=weight_decay)
        exp_avg.lerp_(d_p, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(d_p, d_p, value=1 - beta2)
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


def kl_clip_factor(pairs: Iterable[tuple[Tensor, Tensor, float]], kl_clip: float) -> float:
    """``nu = min(1, sqrt(kl_clip / sum lr^2 <u, g>))`` over (direction, gradient, lr) triples.

    Returns 1 when the sum is not positive (no trust-region information).
    """
    total = sum(to_host([(lr * lr) * torch.sum(u * g, dtype=torch.float64) for u, g, lr in pairs]))
    if not total > 0.0:
        return 1.0
    return min(1.0, math.sqrt(kl_clip / total))


# ---- the optimizer ---------------------------------------------------------------------
def _as_list(params: Any) -> list[Any]:
    """A param group's ``params`` (a tensor or an iterable of them) as a list."""
    return [params] if isinstance(params, Tensor) else list(params)


class CurvatureOptimizer(torch.optim.Optimizer):
    r"""A ``torch.optim.Optimizer`` that preconditions gradients with a curvature estimator.

    Subclasses (``KFAC``, ...) choose the estimator; this class owns everything else:
    capture hooks, the update/refresh schedule, damping, KL clipping, the base update,
    weight decay and state saving.

    Args:
        model (nn.Module): the network. Hooks attach to its supported layers. Estimators
            that need no hooks (``requires_model = False`` subclasses) also accept an
            iterable of parameters.
        estimator (EstimatorFactory, optional): ``(layers, params) -> CurvatureEstimator``.
            None (or ``precondition=False``) makes this a plain base optimizer.
        params (iterable, optional): parameters or param-group dicts, as for any
            ``torch.optim`` optimizer; they must belong to ``model``
            (default: every parameter of ``model`` that requires grad).
        lr (float): learning rate (default: 1e-2).
        base (str, optional): ``"sgd"`` (SGD with momentum) or ``"adam"`` (Adam-style
            moments of the preconditioned direction) (default: ``"sgd"``).
        momentum (float, optional): SGD momentum; sgd only (default: 0).
        dampening (float, optional): SGD momentum dampening; sgd only (default: 0).
        nesterov (bool, optional): Nesterov momentum; sgd only (default: False).
        betas (tuple[float, float], optional): Adam betas; adam only (default: (0.9, 0.999)).
        eps (float, optional): Adam epsilon; adam only (default: 1e-8).
        weight_decay (float, optional): weight decay coefficient (default: 0).
        decoupled_weight_decay (bool, optional): ``w <- w (1 - lr wd)`` (SGDW/AdamW)
            instead of adding ``wd w`` to the direction (default: False).
        damping (float or callable, optional): Tikhonov damping, or a function of the
            step returning it; must be > 0 (default: 1e-3).
        curvature_every (int or callable, optional): update the curvature statistics
            at steps that are multiples of this (default: 1).
        inverse_every (int or callable, optional): refresh inverses at steps that are
            multiples of this, and after the first statistics arrive (default: 1).
        kl_clip (float, optional): KL clipping constant κ; None disables (default: None).
        skip_layers (iterable of str or re.Pattern, optional): module names or regexes
            (full match) of layers to leave to the base update (default: None).
        layer_options (dict, optional): options for the layer helpers, e.g.
            ``{"linear_sequence": "reduce"}``; see the README's layer table (default: None).
        record_in_eval (bool, optional): also record statistics from modules in eval
            mode (default: False: eval forward passes record nothing).
        nonfinite (str, optional): what a step with a NaN/Inf gradient does:
            ``"skip"`` leaves parameters, base state and curvature untouched and
            counts it in :attr:`skipped_steps`; ``"raise"`` raises
            ``FloatingPointError`` (default: ``"skip"``).
        fisher_type (str, optional): where the layer statistics that need output
            gradients come from: ``"empirical"``, the gradients of the loss the user
            back-propagates; or ``"mc"``, a separate backward pass of a loss whose
            labels are sampled from the model (:meth:`sample_fisher`, to be called on
            the outputs before ``loss.backward()``). Only for estimators that record
            statistics with hooks (default: ``"empirical"``).
        likelihood (str, optional): the model's predictive distribution for
            ``fisher_type="mc"``: ``"categorical"`` (softmax over the last dim of
            logits), ``"bernoulli"`` (sigmoid of logits) or ``"gaussian"`` (outputs are
            means); see :mod:`secondorder.fisher`. None: give it to
            :meth:`sample_fisher` (default: None).
        likelihood_sigma (float, optional): standard deviation σ of the ``"gaussian"``
            likelihood (default: 1).
        precondition (bool, optional): False switches curvature off entirely: no hooks,
            no statistics, and the optimizer reproduces ``torch.optim.SGD`` / ``Adam`` /
            ``AdamW`` exactly (default: True).
        use_curvature (None, callable or list of pairs, optional): when the curvature is
            used, by step (0-based, skipped steps not counted): None, always; a callable
            ``step -> bool`` (a pure function of the step: it is also asked about the
            step before); or ``(start, stop)`` step ranges, ``stop`` exclusive and None
            for an open end (LBANN's ``kfac_use_interval``). At a step where it is off,
            nothing is recorded, updated or refreshed, and the step is the plain base
            update on the raw gradient (for the K-FAC family and M-FAC exactly
            ``torch.optim.SGD`` / ``Adam`` / ``AdamW``'s arithmetic; AdaFisher takes its
            ``precondition=False`` update, ``F̃ = 1 + λ``). At the first step of a range
            that follows an off step, the curvature resumes: with no statistics yet, that
            step records and absorbs them whatever ``curvature_every`` says, then refreshes;
            otherwise the inverses are refreshed (current damping) before they precondition
            it. The other schedules keep counting the global step. Also settable later as
            :attr:`use_curvature` (default: None).
        distributed (bool, optional): reduce the curvature statistics across the ranks of
            ``process_group`` and share the refreshes out (:mod:`secondorder.distributed`);
            the model must be trained data-parallel (DDP), so that every rank has the
            same averaged gradient. None: when ``torch.distributed`` is initialised with
            more than one rank (default: None).
        process_group (ProcessGroup, optional): the ranks to reduce over (default: the
            whole world).
        grad_scaler (torch.amp.GradScaler, optional): the scaler of a mixed-precision
            loop. ``scaler.step(opt)`` hands this optimizer the scale and the overflow
            flag itself (it supports AMP scaling): it unscales the gradients, skips
            steps with an overflow (counted in :attr:`skipped_steps`, no warning: the
            scaler lowers its scale) and divides the statistics the hooks saw by the
            scale². Needed only when you call ``scaler.unscale_(opt)`` before
            ``scaler.step(opt)`` (gradient clipping): the statistics are still scaled
            then, and the scaler is asked for the scale (default: None).

    Attributes:
        uncovered_parameters (list[str]): names of parameters trained by the base
            update on their raw gradient (no estimator covers them).
        left_out_layers (list[str]): one line per supported layer left to the base
            update, with the reason.
        unhooked_layers (list[str]): covered layers whose forward hooks never ran in the
            passes before the first curvature step although their parameters had
            gradients: the model uses their weights without calling the modules
            (``nn.MultiheadAttention.out_proj``, ``F.linear(x, layer.weight)``). They are
            moved to the base update then, with a warning (and listed in the two
            attributes above); :meth:`state_dict` keeps the list.
        skipped_steps (int): steps skipped because of non-finite gradients (AMP
            overflow steps included).
        comm (Communicator or None): the ranks the curvature is reduced over.

    Example (Monte-Carlo Fisher)::

        opt = KFAC(model, fisher_type="mc", likelihood="categorical")
        for x, y in loader:
            opt.zero_grad()
            logits = model(x)
            opt.sample_fisher(logits)  # sampled labels: curvature statistics only
            F.cross_entropy(logits, y).backward()  # the gradient the update uses
            opt.step()
    """

    #: whether the first argument must be an nn.Module (hooks need the layers)
    requires_model: ClassVar[bool] = True
    #: coupled (L2) weight decay is added to the gradient *before* preconditioning (M-FAC's
    #: convention) instead of to the preconditioned direction (K-FAC's)
    l2_before_precondition: ClassVar[bool] = False
    #: ``torch.amp.GradScaler.step`` hands the scale and overflow flag to ``step``
    _step_supports_amp_scaling: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not _takes_any_keyword(init):
            cls.__init__ = checked_keywords(init)  # type: ignore[method-assign]

    @checked_keywords
    def __init__(
        self,
        model: nn.Module | Iterable[nn.Parameter],
        estimator: EstimatorFactory | None = None,
        *,
        params: Iterable[Any] | None = None,
        lr: float = 1e-2,
        base: str = "sgd",
        momentum: float | None = None,
        dampening: float = 0.0,
        nesterov: bool = False,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        damping: Schedule = 1e-3,
        curvature_every: Interval = 1,
        inverse_every: Interval = 1,
        kl_clip: float | None = None,
        skip_layers: Iterable[SkipPattern] | None = None,
        layer_options: Mapping[str, Any] | None = None,
        record_in_eval: bool = False,
        nonfinite: str = "skip",
        fisher_type: str = "empirical",
        likelihood: str | None = None,
        likelihood_sigma: float | None = None,
        precondition: bool = True,
        use_curvature: UseCurvature = None,
        distributed: bool | None = None,
        process_group: Any = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        name = type(self).__name__
        module, params = self._split_model_and_params(name, model, params)
        defaults = self._base_defaults(
            base, lr, momentum, dampening, nesterov, betas, eps, weight_decay
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group, base)

        self.base = base
        self.decoupled_weight_decay = bool(decoupled_weight_decay)
        self.damping = check_schedule("damping", damping, low_open=True)
        self.curvature_every = check_interval("curvature_every", curvature_every)
        self.inverse_every = check_interval("inverse_every", inverse_every)
        self.kl_clip = None if kl_clip is None else check_number("kl_clip", kl_clip, low_open=True)
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self._check_fisher_type(fisher_type, likelihood, likelihood_sigma)
        self.fisher_type = fisher_type
        self.likelihood = likelihood
        self.likelihood_sigma = 1.0 if likelihood_sigma is None else float(likelihood_sigma)
        if not isinstance(precondition, bool):
            raise TypeError(f"precondition must be a bool, got {type(precondition).__name__}")
        self._use_curvature = check_use_curvature(use_curvature)

        self.skipped_steps = 0
        self._step = 0
        self._updates = 0  # curvature updates so far
        self._refreshes = 0  # refreshes that followed at least one update
        self.estimator: CurvatureEstimator | None = None
        self.capture: ModelCapture | None = None
        self.left_out_layers: list[str] = []
        self.unhooked_layers: list[str] = []
        self._estimator_factory = estimator
        self._sampling_fisher = False  # inside sample_fisher's backward pass
        self._fisher_sampled = False  # sample_fisher ran since the last step

        all_params = [p for g in self.param_groups for p in g["params"]]
        self._names = self._param_names(module, all_params)
        if module is None and skip_layers is not None:
            raise ValueError("skip_layers needs a model (an nn.Module), not parameters")
        layers: list[LayerHelper] = []
        if module is not None:
            # Also run with curvature off, so that bad skip_layers patterns are reported.
            layers, self.left_out_layers = find_layers(
                module, set(all_params), skip_layers, layer_options
            )
        elif layer_options:
            raise ValueError("layer_options needs a model (an nn.Module), not parameters")
        if precondition and estimator is not None:
            self.estimator = estimator(layers, all_params)
            if not self.estimator.requires_capture and (
                skip_layers is not None or record_in_eval or layer_options
            ):
                raise ValueError(
                    f"skip_layers, layer_options and record_in_eval apply to estimators that "
                    f"attach hooks; "
                    f"{name} preconditions all its parameters jointly: choose them with params="
                )
            if self.estimator.requires_capture:
                if not layers:
                    raise ValueError(
                        f"{name} found no layer it can precondition: "
                        f"{describe_unsupported(module)}"
                        + (f"; left out: {self.left_out_layers}" if self.left_out_layers else "")
                    )
                self.capture = ModelCapture(
                    layers, self.estimator.accumulate, record_in_eval=record_in_eval, model=module
                )
                self.capture.recording = self._records_at(0)
                if fisher_type == "mc":
                    # only sample_fisher's pass feeds the statistics, not the user's backward
                    self.capture.accept = self._accepting_sampled_gradients
        if fisher_type == "mc" and not (
            self.requires_model and (self.estimator is None or self.estimator.requires_capture)
        ):
            raise ValueError(
                f"fisher_type='mc' needs an estimator that records layer statistics with "
                f"hooks; {name} builds its curvature from the gradients themselves: use "
                "fisher_type='empirical'"
            )

        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
            )
        self.grad_scaler = grad_scaler
        self._stat_scale = 1.0  # loss scale of the statistics of the current step
        self.comm: Communicator | None = None
        if self.estimator is not None:
            self.comm = default_communicator(distributed, process_group)
            if self.comm is not None:
                if not self.estimator.supports_distributed:
                    raise ValueError(
                        f"{name} does not support distributed training yet; "
                        "pass distributed=False to train each rank on its own curvature"
                    )
                self.estimator.comm = self.comm
        elif distributed:
            raise ValueError("distributed=True needs curvature (precondition=True)")
        if self.estimator is None and self._use_curvature is not None:
            raise ValueError("use_curvature needs curvature (precondition=True)")

        covered = set(self.estimator.params) if self.estimator is not None else set()
        self.uncovered_parameters = [self._names[p] for p in all_params if p not in covered]
        if self.estimator is not None and self.uncovered_parameters:
            warnings.warn(
                f"{name}: no curvature estimate for {len(self.uncovered_parameters)} "
                f"parameter(s); they get the plain {base} update: "
                f"{self.uncovered_parameters}",
                stacklevel=_caller_stacklevel(),
            )

    # ---- construction helpers -----------------------------------------------------------
    @classmethod
    def _split_model_and_params(
        cls, name: str, model: Any, params: Iterable[Any] | None
    ) -> tuple[nn.Module | None, list[Any]]:
        if isinstance(model, nn.Module):
            if params is None:
                return model, [p for p in model.parameters() if p.requires_grad]
            # materialise generators (a group's "params" included) before checking them,
            # or torch would receive an exhausted iterator
            params = [
                {**item, "params": _as_list(item["params"])} if isinstance(item, dict) else item
                for item in params
            ]
            owned = {id(p) for p in model.parameters()}
            for item in params:
                group_params = item["params"] if isinstance(item, dict) else [item]
                for p in group_params:
                    if id(p) not in owned:
                        raise ValueError(
                            f"params: a parameter of shape {tuple(p.shape)} "
                            "does not belong to the model"
                        )
            return model, params
        if cls.requires_model:
            raise TypeError(
                f"{name} needs the model itself (an nn.Module) to attach hooks to its layers: "
                f"call {name}(model, ...) rather than {name}(model.parameters(), ...); "
                "use params=... to choose parameters or param groups"
            )
        if params is not None:
            raise ValueError("give parameters either as the first argument or as params=, not both")
        return None, list(model)

    @staticmethod
    def _base_defaults(
        base: str,
        lr: float,
        momentum: float | None,
        dampening: float,
        nesterov: bool,
        betas: tuple[float, float] | None,
        eps: float | None,
        weight_decay: float,
    ) -> dict[str, Any]:
        if base not in _BASES:
            raise ValueError(f"base must be one of {_BASES}, got {base!r}")
        defaults: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
        if base == "sgd":
            if betas is not None or eps is not None:
                raise ValueError("betas and eps apply to base='adam'; base='sgd' uses momentum")
            defaults.update(
                momentum=0.0 if momentum is None else momentum,
                dampening=dampening,
                nesterov=nesterov,
            )
        else:
            if momentum is not None or dampening != 0 or nesterov:
                raise ValueError(
                    "momentum, dampening and nesterov apply to base='sgd'; base='adam' uses betas"
                )
            defaults.update(
                betas=(0.9, 0.999) if betas is None else betas,
                eps=1e-8 if eps is None else eps,
            )
        return defaults

    @staticmethod
    def _check_fisher_type(
        fisher_type: str, likelihood: str | None, likelihood_sigma: float | None
    ) -> None:
        if fisher_type not in _FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {_FISHER_TYPES}, got {fisher_type!r}")
        if fisher_type == "empirical" and (likelihood is not None or likelihood_sigma is not None):
            raise ValueError(
                "likelihood and likelihood_sigma apply to fisher_type='mc' (labels sampled "
                "from the model); fisher_type='empirical' uses the gradients of your own loss"
            )
        if likelihood is not None:
            check_likelihood(likelihood)
        if likelihood_sigma is not None:
            if likelihood != "gaussian":
                raise ValueError(
                    f"likelihood_sigma applies to likelihood='gaussian', got likelihood="
                    f"{likelihood!r}"
                )
            check_number("likelihood_sigma", likelihood_sigma, low_open=True)

    @staticmethod
    def _check_group(group: dict[str, Any], base: str) -> None:
        check_number("lr", group["lr"])
        check_number("weight_decay", group["weight_decay"])
        if base == "sgd":
            check_number("momentum", group["momentum"], high=1.0)
            check_number("dampening", group["dampening"], high=1.0)
            if not isinstance(group["nesterov"], bool):
                raise TypeError("nesterov must be a bool")
            if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
                raise ValueError("nesterov needs momentum > 0 and dampening = 0")
        else:
            betas = group["betas"]
            if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
                raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
            for i, beta in enumerate(betas):
                check_number(f"betas[{i}]", beta)
                if beta >= 1.0:
                    raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
            check_number("eps", group["eps"])
        for p in group["params"]:
            if p.is_sparse:
                raise ValueError("sparse parameters are not supported")

    @staticmethod
    def _param_names(module: nn.Module | None, params: list[Tensor]) -> dict[Tensor, str]:
        """Parameter names as the (uncompiled) model gives them (see ``module_name``)."""
        named = (
            {} if module is None else {id(p): module_name(n) for n, p in module.named_parameters()}
        )
        return {p: named.get(id(p), f"param[{i}]") for i, p in enumerate(params)}

    # ---- the step -----------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Number of steps taken (skipped steps excluded)."""
        return self._step

    @property
    def use_curvature(self) -> UseCurvature:
        """When the curvature is used (see the constructor's ``use_curvature``); ranges
        read back as a tuple of ``(start, stop)`` pairs. Assigning a new schedule between
        steps takes effect at the next step."""
        return self._use_curvature

    @use_curvature.setter
    def use_curvature(self, value: UseCurvature) -> None:
        checked = check_use_curvature(value)
        if self.estimator is None and checked is not None:
            raise ValueError("use_curvature needs curvature (precondition=True)")
        previous, self._use_curvature = self._use_curvature, checked
        try:
            recording = self._records_at(self._step)  # a callable is checked here
        except Exception:
            self._use_curvature = previous
            raise
        if self.capture is not None:
            self.capture.recording = recording

    def curvature_on(self, step: int | None = None) -> bool:
        """Whether :attr:`use_curvature` switches the curvature on at ``step`` (default:
        the coming step); True at every step without a schedule."""
        step = self._step if step is None else step
        schedule = self._use_curvature
        if schedule is None:
            return True
        if callable(schedule):
            on = schedule(step)
            if not isinstance(on, bool):
                raise TypeError(f"use_curvature({step}) must return a bool, got {on!r}")
            return on
        return any(start <= step and (stop is None or step < stop) for start, stop in schedule)

    def _resumes_at(self, step: int) -> bool:
        """``step`` is the first of an on-range that follows an off step."""
        return (
            self._use_curvature is not None
            and step > 0
            and self.curvature_on(step)
            and not self.curvature_on(step - 1)
        )

    def _records_at(self, step: int) -> bool:
        """Whether the passes before ``step`` must be recorded."""
        if not self.curvature_on(step):
            return False
        return is_due("curvature_every", self.curvature_every, step) or (
            self._updates == 0 and self._resumes_at(step)
        )

    def current_damping(self) -> float:
        """The damping the next step will use."""
        return resolve_schedule("damping", self.damping, self._step, low_open=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step (see the class docstring for the order)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        grads: dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError(
                            f"{type(self).__name__} does not support sparse gradients"
                        )
                    grads[p] = p.grad
        if self.fisher_type == "mc" and self.capture is not None:
            self._check_fisher_sampled(grads)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:  # called by torch.amp.GradScaler.step
            if float(found_inf) > 0:
                if self.capture is not None:
                    self.capture.discard()
                self.skipped_steps += 1
                return loss
            grads = self._unscale(grads, getattr(self, "grad_scale", None))
        else:
            self._stat_scale = 1.0
        if not self._all_finite(grads):
            self._skip_step(grads)
            return loss

        k = self._step
        curvature = self.estimator is not None and self.curvature_on(k)
        l2_first = self.l2_before_precondition and curvature and not self.decoupled_weight_decay
        if l2_first:
            for group in self.param_groups:
                if group["weight_decay"] != 0:
                    for p in group["params"]:
                        if p in grads:
                            grads[p] = grads[p].add(p, alpha=group["weight_decay"])
        directions: Mapping[Tensor, Tensor] = grads
        if curvature:
            directions = self._precondition(k, grads)
        elif self.capture is not None:
            self.capture.discard()  # curvature off (use_curvature): nothing is absorbed

        for group in self.param_groups:
            self._base_step(group, directions, skip_l2=l2_first)

        self._step += 1
        if self.capture is not None:
            self.capture.recording = self._records_at(self._step)
        return loss

    # ---- Monte-Carlo Fisher ---------------------------------------------------------------
    def sample_fisher(
        self,
        outputs: Tensor,
        likelihood: str | None = None,
        generator: torch.Generator | None = None,
        *,
        loss_scale: float = 1.0,
    ) -> None:
        """Back-propagate a loss of labels sampled from the model, for the curvature only.

        With ``fisher_type="mc"``, call it on the model's outputs after the forward pass
        and before ``loss.backward()``. When the coming step updates the curvature, it
        samples labels from the predictive distribution the outputs parametrise,
        computes their loss (:func:`secondorder.fisher.sampled_loss`: the per-example
        negative log-likelihood averaged over the examples of the leading dimension)
        and runs ``torch.autograd.grad`` on it, keeping the graph: the layer statistics
        come from this pass alone, and ``.grad`` is left untouched, so the update uses
        the gradient of the user's own loss. At other steps it returns at once (no
        backward pass). Call it once per forward pass (see ``loss_scale`` for more).

        Args:
            outputs (Tensor): the model's outputs (logits or means, examples first).
            likelihood (str, optional): overrides the constructor's ``likelihood``
                for this call (default: None).
            generator (torch.Generator, optional): random source of the labels
                (default: None, PyTorch's global generator).
            loss_scale (float, optional): factor on the sampled loss; the statistics
                scale with its square. With gradient accumulation over ``k``
                micro-batches pass ``1/k``, as you divide your own loss; ``s`` calls on
                one forward pass with ``s ** -0.5`` average ``s`` samples (default: 1).

        Raises:
            ValueError: ``fisher_type`` is not ``"mc"``, there is no likelihood, or the
                outputs carry no gradient history.
            RuntimeError: called after ``loss.backward()`` freed the graph.
        """
        name = type(self).__name__
        if self.fisher_type != "mc":
            raise ValueError(
                f"sample_fisher needs fisher_type='mc'; this {name} has fisher_type="
                f"{self.fisher_type!r}, whose statistics come from the loss you "
                f"back-propagate. To sample labels from the model, construct it with "
                f"{name}(model, fisher_type='mc', likelihood=...)"
            )
        if likelihood is None:
            likelihood = self.likelihood
            if likelihood is None:
                raise ValueError(
                    f"sample_fisher: no likelihood; pass likelihood= (one of {LIKELIHOODS}) "
                    f"here or to {name}(...)"
                )
        check_likelihood(likelihood)
        loss_scale = check_number("loss_scale", loss_scale, low_open=True)
        if not isinstance(outputs, Tensor) or not outputs.requires_grad:
            raise ValueError(
                "sample_fisher: outputs must be the model's outputs from a forward pass "
                "with gradients enabled (they have no gradient history)"
            )
        if self.capture is None or not self.capture.recording:
            return
        params = [p for p in self.estimator.params if p.requires_grad]
        if not params:
            return
        with torch.enable_grad():
            loss = sampled_loss(outputs, likelihood, generator, sigma=self.likelihood_sigma)
            if loss_scale != 1.0:
                loss = loss * loss_scale
        self._sampling_fisher = True
        try:
            torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        except RuntimeError as exc:
            if "second time" in str(exc):
                raise RuntimeError(
                    "sample_fisher(outputs) must be called before loss.backward(): the "
                    "backward pass has freed the graph the sampled-label pass needs"
                ) from exc
            raise
        finally:
            self._sampling_fisher = False
        self._fisher_sampled = True

    def _accepting_sampled_gradients(self) -> bool:
        return self._sampling_fisher

    def _check_fisher_sampled(self, grads: Mapping[Tensor, Tensor]) -> None:
        sampled, self._fisher_sampled = self._fisher_sampled, False
        if grads and self.capture.recording and not sampled:
            raise RuntimeError(
                f"{type(self).__name__} (fisher_type='mc'): step {self._step} updates the "
                "curvature, but no sampled-label pass was recorded: call "
                "opt.sample_fisher(outputs) on the model's outputs before loss.backward() "
                "(the empirical Fisher is not used as a fallback)"
            )

    def _unscale(
        self, grads: dict[Tensor, Tensor], grad_scale: Tensor | None
    ) -> dict[Tensor, Tensor]:
        """Under ``GradScaler.step``: divide the gradients by the scale (in place, as the
        scaler's own unscale does) and note the scale the hooks' statistics carry."""
        if grad_scale is not None:
            inv = 1.0 / grad_scale.double()
            for g in grads.values():
                g.mul_(inv.to(device=g.device, dtype=g.dtype))
            stat_scale = float(grad_scale)
        elif self.grad_scaler is not None:
            stat_scale = float(self.grad_scaler.get_scale())
        elif self.capture is not None and self.capture.recording:
            raise RuntimeError(
                f"{type(self).__name__}: the gradients were unscaled by scaler.unscale_(opt), "
                "but the curvature statistics still carry the loss scale: pass the scaler "
                f"to the optimizer, {type(self).__name__}(model, ..., grad_scaler=scaler)"
            )
        else:
            stat_scale = 1.0
        # sample_fisher's backward pass does not go through the scaler
        self._stat_scale = 1.0 if self.fisher_type == "mc" else stat_scale
        return grads

    def _precondition(self, k: int, grads: dict[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        if self.capture is not None and self._updates == 0:
            self._check_coverage(grads)  # may replace the estimator
        est = self.estimator
        damping = resolve_schedule("damping", self.damping, k, low_open=True)
        updated = False
        # use_curvature: the first step after an off stretch records the first statistics
        # if there are none yet, and refreshes the inverses before they are used
        resumed = self._resumes_at(k)
        first = resumed and self._updates == 0
        if self.capture is not None:
            stats = self.capture.collect()
            due = is_due("curvature_every", self.curvature_every, k) or first
            if stats and self._stat_scale != 1.0:
                scale_output_statistics(stats, self._stat_scale**-2)
            if self.comm is not None and due:
                # collective: every rank reduces at every curvature step, with or without
                # local statistics
                stats = self.comm.reduce_statistics([layer.name for layer in est.layers], stats)
            if stats and due:
                est.update(stats)
                updated = True
        elif is_due("curvature_every", self.curvature_every, k) or first:
            est.update(grads)
            updated = True
        self._updates += updated
        # Refresh on schedule, and right after the first update whenever it comes (the
        # first recorded pass may be late: a model in eval mode at first, say).
        if (
            is_due("inverse_every", self.inverse_every, k)
            or (updated and self._refreshes == 0)
            or resumed
        ):
            est.refresh(damping)
            self._refreshes += self._updates > 0
        pre = est.precondition(grads, damping)
        if self.kl_clip is not None and pre:
            lr_of = {p: g["lr"] for g in self.param_groups for p in g["params"]}
            nu = kl_clip_factor(((u, grads[p], lr_of[p]) for p, u in pre.items()), self.kl_clip)
            if nu < 1.0:
                pre = {p: u * nu for p, u in pre.items()}
        return {**grads, **pre}

    # ---- layers whose hooks never run ------------------------------------------------------
    def _check_coverage(self, grads: Mapping[Tensor, Tensor]) -> None:
        """Before the first curvature update: the covered layers whose parameters have
        gradients but whose hooks did not run (:meth:`ModelCapture.unhooked`) would never
        get statistics, so they go to the base update now, with one warning."""
        names = [layer.name for layer in self.capture.unhooked(grads)]
        if names:
            self._leave_to_base(names, self._estimator_without(names))

    def _estimator_without(self, names: Sequence[str]) -> CurvatureEstimator:
        """A new estimator, built as the constructor built this one, for the covered layers
        other than ``names``: what ``skip_layers=names`` would have given."""
        leave = set(names)
        layers = [layer for layer in self.estimator.layers if layer.name not in leave]
        params = [p for g in self.param_groups for p in g["params"]]
        estimator = self._estimator_factory(layers, params)
        estimator.comm = self.comm
        return estimator

    def _leave_to_base(
        self, names: Sequence[str], estimator: CurvatureEstimator, *, loaded: bool = False
    ) -> None:
        """Install ``estimator`` (from :meth:`_estimator_without`) in place of the current
        one: the layers ``names`` lose their hooks and join the base update; one warning
        names them and their parameters."""
        was_covered = set(self.estimator.params)
        self.estimator = estimator
        self.capture.drop(names)
        self.capture.accumulate = estimator.accumulate
        self.unhooked_layers += names
        self.left_out_layers += [
            f"{name}: its forward hooks never ran (the model uses its weight without "
            "calling the module)"
            for name in names
        ]
        covered = set(estimator.params)
        params = [p for g in self.param_groups for p in g["params"]]
        self.uncovered_parameters = [self._names[p] for p in params if p not in covered]
        moved = [self._names[p] for p in params if p in was_covered and p not in covered]
        self._estimator_replaced()
        source = "the loaded state says that the" if loaded else "the"
        warnings.warn(
            f"{type(self).__name__}: {source} forward hooks of {list(names)} never ran "
            "although their parameters have gradients: the model uses their weights without "
            "calling the modules (nn.MultiheadAttention does so with out_proj; so does "
            "F.linear(x, layer.weight)), so they get no curvature statistics. Their "
            f"parameters {moved} get the plain {self.base} update",
            stacklevel=_caller_stacklevel(),
        )

    def _estimator_replaced(self) -> None:
        """Called after :attr:`estimator` was replaced by one for fewer layers; subclasses
        that keep per-layer structures of their own rebuild them here."""

    def _base_step(
        self, group: dict[str, Any], directions: Mapping[Tensor, Tensor], skip_l2: bool = False
    ) -> None:
        params = [p for p in group["params"] if p in directions]
        if not params:
            return
        dirs = [directions[p] for p in params]
        weight_decay = 0.0 if skip_l2 else group["weight_decay"]
        if self.base == "sgd":
            buffers = [self.state[p].get("momentum_buffer") for p in params]
            sgd_update(
                params,
                dirs,
                buffers,
                lr=group["lr"],
                momentum=group["momentum"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                weight_decay=weight_decay,
                decoupled=self.decoupled_weight_decay,
            )
            if group["momentum"] != 0:
                for p, buf in zip(params, buffers, strict=True):
                    self.state[p]["momentum_buffer"] = buf
            return
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        adam_update(
            params,
            dirs,
            [self.state[p]["exp_avg"] for p in params],
            [self.state[p]["exp_avg_sq"] for p in params],
            [self.state[p]["step"] for p in params],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=weight_decay,
            decoupled=self.decoupled_weight_decay,
        )

    @staticmethod
    def _all_finite(grads: Mapping[Tensor, Tensor]) -> bool:
        if not grads:
            return True
        return all(to_host([torch.isfinite(g).all() for g in grads.values()]))

    def _skip_step(self, grads: Mapping[Tensor, Tensor]) -> None:
        if self.capture is not None:
            self.capture.discard()
        if self.nonfinite == "raise":
            bad = [self._names.get(p, "?") for p, g in grads.items() if not torch.isfinite(g).all()]
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite gradient at step {self._step} in {bad}; "
                "set nonfinite='skip' to skip such steps"
            )
        self.skipped_steps += 1
        warnings.warn(
            f"{type(self).__name__}: non-finite gradient, step skipped "
            "(parameters, optimizer state and curvature unchanged; see skipped_steps)",
            RuntimeWarning,
            stacklevel=_caller_stacklevel(),
        )

    # ---- persistence ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state plus ``"curvature"``: step counters, the
        estimator's statistics (inverses are recomputed on load) and the
        :attr:`unhooked_layers`. Layers are named as in the uncompiled model, so a state
        saved through ``torch.compile(model)`` loads into an optimizer of ``model`` and
        the other way round."""
        state = super().state_dict()
        state["curvature"] = {
            "step": self._step,
            "updates": self._updates,
            "refreshes": self._refreshes,
            "skipped_steps": self.skipped_steps,
            "estimator": None if self.estimator is None else self.estimator.state_dict(),
            "unhooked_layers": list(self.unhooked_layers),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next step continues the same trajectory. Layers
        the saved optimizer had left to the base update because their hooks never ran
        are left to it here too (with the warning)."""
        state_dict = dict(state_dict)
        curvature = state_dict.pop("curvature", None)
        if curvature is None:
            raise ValueError(
                f"this state_dict has no 'curvature' entry: it was not saved by a "
                f"{type(self).__name__} (CurvatureOptimizer)"
            )
        if (curvature["estimator"] is None) != (self.estimator is None):
            raise ValueError(
                "state_dict and optimizer disagree on whether curvature is used "
                "(precondition=True/False)"
            )
        estimator = self.estimator
        unhooked = [
            name
            for name in curvature.get("unhooked_layers", ())
            if name not in self.unhooked_layers
        ]
        if unhooked and estimator is not None:
            covered = [layer.name for layer in estimator.layers]
            unknown = sorted(set(unhooked) - set(covered))
            if unknown:
                raise ValueError(
                    f"state_dict left layers {unknown} to the base update (their hooks never "
                    f"ran), but this {type(self).__name__} does not cover them (its layers: "
                    f"{covered}); was it saved from a different model?"
                )
            estimator = self._estimator_without(unhooked)  # installed once the state loads
        # All or nothing: torch checks the parameter counts, the estimator checks the
        # curvature against the model; a rejected state leaves this optimizer as it was.
        base_before = (self.state, self.param_groups)
        estimator_before = None if self.estimator is None else self.estimator.state_dict()
        try:
            super().load_state_dict(state_dict)
            if estimator is not None:
                estimator.load_state_dict(curvature["estimator"])
        except Exception:
            self.state, self.param_groups = base_before
            if estimator_before is not None and estimator is self.estimator:
                self.estimator.load_state_dict(estimator_before)
            raise
        if estimator is not self.estimator:
            self._leave_to_base(unhooked, estimator, loaded=True)
        self._step = int(curvature["step"])
        self._updates = int(curvature["updates"])
        self._refreshes = int(curvature["refreshes"])
        self.skipped_steps = int(curvature["skipped_steps"])
        if self.capture is not None:
            self.capture.discard()
            self.capture.recording = self._records_at(self._step)

    def remove_hooks(self) -> None:
        """Detach the capture hooks from the model (the optimizer then only preconditions
        with the curvature it already has)."""
        if self.capture is not None:
            self.capture.remove()
