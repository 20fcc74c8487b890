"""Hyperparameters: one keyword-only dataclass per method, one for the shared base.

A hyperparameter is declared once, in the config of the method that owns it: its type,
default, check (``__post_init__``) and documentation (the field's ``doc`` metadata) live
there. Everything else is generated from it:

* the optimizer's keyword arguments: ``KFAC(model, lr=0.1, damping=1e-2)`` builds a
  :class:`~secondorder.KFACConfig` from the keywords (``KFAC(model, config=cfg)`` takes a
  built one, and keywords given beside it replace its fields), and
  ``inspect.signature(KFAC)`` lists the config's fields;
* the ``Hyperparameters`` section of the optimizer's docstring;
* what the bench, its YAML presets (``configs/optimizers/``) and
  ``benchmarks/step_breakdown.py`` know of a method (:func:`config_fields`).

:class:`OptimizerConfig` holds what every :class:`~secondorder.CurvatureOptimizer`
shares (learning rate, base update, damping, schedules, hooks, Fisher type, AMP,
distribution). A method's config subclasses it (or another method's config), adds its
own fields, may change defaults by redeclaring a field, and redeclares the
shared fields the method sets itself with :func:`fixed` (AdaFisher has no ``kl_clip``):
passing those raises ``TypeError``.

Example — a new method's config::

    @dataclass(kw_only=True)
    class MyConfig(OptimizerConfig):
        decay: float = hyperparameter(0.95, "EMA decay of the statistics, in [0, 1)")

        def __post_init__(self) -> None:
            super().__post_init__()
            self.decay = check_number("decay", self.decay, high=1.0)
"""

from __future__ import annotations

import dataclasses
import inspect
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._checks import (
    Interval,
    Schedule,
    UseCurvature,
    check_interval,
    check_number,
    check_schedule,
    check_statistics_rows,
    check_use_curvature,
    unknown_keyword,
)
from .fisher import check_likelihood

__all__ = ["OptimizerConfig", "config_fields", "fixed", "fixed_fields", "hyperparameter"]

_BASES = ("sgd", "adam", "momentum", "adahessian")
_NONFINITE = ("skip", "raise")
_FISHER_TYPES = ("empirical", "mc")


def hyperparameter(default: Any, doc: str) -> Any:
    """A dataclass field with a default and the one line (or paragraph) that documents it."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple or None")
    return dataclasses.field(default=default, metadata={"doc": doc})


def fixed(value: Any) -> Any:
    """Redeclare a shared field in a method's config as set by the method itself: not a
    keyword of its optimizer (passing it raises ``TypeError``), always ``value``."""
    return dataclasses.field(default=value, init=False)


def config_fields(config: type[OptimizerConfig] | OptimizerConfig) -> list[dataclasses.Field]:
    """The fields a user may set on ``config`` (a class or an instance), in declaration
    order: every field but the :func:`fixed` ones and the derived ones."""
    cls = config if isinstance(config, type) else type(config)
    return [f for f in dataclasses.fields(cls) if f.init]


def fixed_fields(config: type[OptimizerConfig]) -> dict[str, Any]:
    """The :func:`fixed` fields of ``config`` with their values."""
    return {
        f.name: f.default
        for f in dataclasses.fields(config)
        if not f.init and f.default is not dataclasses.MISSING
    }


@dataclass(kw_only=True)
class OptimizerConfig:
    """What every :class:`~secondorder.CurvatureOptimizer` takes (checked on construction).

    Each field is documented by its ``doc`` metadata; :meth:`describe` renders them.
    Subclasses are a method's config: see the module docstring.
    """

    #: the SGD momentum ``momentum=None`` stands for with ``base="sgd"``
    default_momentum: ClassVar[float] = 0.0
    #: the damping ``damping=None`` stands for, without and with ``adaptive_damping``
    default_damping: ClassVar[float] = 1e-3
    default_adaptive_damping: ClassVar[float] = 0.1
    #: the field that sets how often curvature statistics are gathered (for tools that
    #: vary it, such as ``benchmarks/step_breakdown.py``)
    statistics_interval: ClassVar[str] = "curvature_every"

    lr: float = hyperparameter(1e-2, "learning rate")
    base: str = hyperparameter(
        "sgd",
        '``"sgd"`` (SGD with momentum) or ``"adam"`` (Adam-style moments of the '
        'preconditioned direction); AdaFisher\'s is ``"momentum"`` (the bias-corrected '
        'first moment over ``F̃ = D + λ``), AdaHessian\'s ``"adahessian"`` (Adam whose '
        "second moment averages the squared Hessian diagonal)",
    )
    momentum: float | None = hyperparameter(
        None, "SGD momentum, in [0, 1]; sgd only (None: the method's default)"
    )
    dampening: float = hyperparameter(0.0, "SGD momentum dampening; sgd only")
    nesterov: bool = hyperparameter(False, "Nesterov momentum; sgd only")
    betas: tuple[float, float] | None = hyperparameter(
        None, "Adam betas, each in [0, 1); adam only (None: (0.9, 0.999))"
    )
    eps: float | None = hyperparameter(None, "Adam epsilon; adam only (None: 1e-8)")
    weight_decay: float = hyperparameter(0.0, "weight decay coefficient, >= 0")
    decoupled_weight_decay: bool = hyperparameter(
        False, "``w <- w (1 - lr wd)`` (SGDW/AdamW) instead of adding ``wd w`` to the direction"
    )
    damping: Schedule | None = hyperparameter(
        None,
        "Tikhonov damping λ > 0, or a function of the step returning it; None: 1e-3, or 0.1 "
        "with ``adaptive_damping`` (where it is only λ's start: from 1e-3 the adaptation "
        "took too long to raise it, and one digits run in three never reached the target)",
    )
    curvature_every: Interval = hyperparameter(
        1, "update the curvature statistics at steps that are multiples of this"
    )
    inverse_every: Interval = hyperparameter(
        1, "refresh the inverses at steps that are multiples of this (and after the first update)"
    )
    inverse_warmup: bool = hyperparameter(
        False,
        "also refresh at steps c, 2c, 4c, 8c, ... below ``inverse_every`` (c = "
        "``curvature_every``) where the curvature was updated: the first factors change "
        "fastest, and a run shorter than ``inverse_every`` would otherwise keep the inverses "
        "of its first batch throughout; log₂(inverse_every / curvature_every) refreshes more "
        "in all",
    )
    kl_clip: float | None = hyperparameter(None, "KL clipping constant κ > 0; None disables")
    graft: str | None = hyperparameter(
        None,
        "take each parameter's step norm from a first-order method: 'sgd', 'adagrad', "
        "'rmsprop' or 'adam' (then lr is that method's, and momentum defaults to 0); any "
        "base but 'adam' (with the bases 'momentum' and 'adahessian' the base's own step "
        "takes the norm); 'auto': 'adam' with base='sgd', None with another base or with "
        "adaptive_lr / adaptive_momentum (which choose the step size themselves); excludes "
        "kl_clip (grafting sets every step's norm, so clipping would have no effect); "
        "see :mod:`secondorder.grafting`",
    )
    graft_betas: tuple[float, float] = hyperparameter(
        (0.9, 0.999), "the grafted method's β₁ (adam) and β₂ (adam, rmsprop)"
    )
    graft_eps: float = hyperparameter(1e-8, "the grafted method's ε")
    graft_norm: str = hyperparameter(
        "parameter",
        'what takes the grafted method\'s step norm: ``"parameter"`` (each parameter, as '
        'Distributed Shampoo) or ``"row"`` (each row of a weight: an output unit of a Linear, '
        "an output channel of a convolution, a token of an embedding; 1-D parameters whole)",
    )
    graft_moment: bool = hyperparameter(
        True,
        'with graft="adam": precondition Adam\'s bias-corrected first moment m̂ (Distributed '
        "Shampoo's filtered gradient) instead of the raw gradient, so that the direction "
        "carries the momentum its norm comes from; False: the raw gradient",
    )
    skip_layers: Iterable[Any] | None = hyperparameter(
        None, "module names or regexes (full match) of layers to leave to the base update"
    )
    layer_options: Mapping[str, Any] | None = hyperparameter(
        None,
        'options of the layer helpers, e.g. ``{"linear_sequence": "reduce"}`` (see '
        "secondorder/docs/layers.md)",
    )
    record_in_eval: bool = hyperparameter(False, "also record statistics from modules in eval mode")
    statistics_rows: int | float | None = hyperparameter(
        None,
        "the rows (examples, tokens, conv positions) the layer statistics come from, drawn "
        "at random as whole examples per forward pass: None (all), an int (about that many "
        "rows per layer), or a float in (0, 1] (that fraction of the examples); at least one "
        "example, rescaled so that the statistics stay unbiased (secondorder/subsample.py)",
    )
    nonfinite: str = hyperparameter(
        "skip",
        'a step with a NaN/Inf gradient: ``"skip"`` it (counted in ``skipped_steps``) or '
        '``"raise"`` ``FloatingPointError``',
    )
    fisher_type: str = hyperparameter(
        "empirical",
        '``"empirical"`` (statistics from the loss you back-propagate) or ``"mc"`` (labels '
        "sampled from the model by ``sample_fisher``)",
    )
    likelihood: str | None = hyperparameter(
        None,
        'the predictive distribution for ``fisher_type="mc"``: ``"categorical"``, '
        '``"bernoulli"`` or ``"gaussian"``',
    )
    likelihood_sigma: float | None = hyperparameter(
        None, 'standard deviation σ of the ``"gaussian"`` likelihood (None: 1)'
    )
    precondition: bool = hyperparameter(
        True, "False switches curvature off: the plain base update (``torch.optim``'s)"
    )
    use_curvature: UseCurvature = hyperparameter(
        None,
        "when curvature is used: None (always), a callable ``step -> bool``, or "
        "``(start, stop)`` step ranges",
    )
    distributed: bool | None = hyperparameter(
        None,
        "reduce the statistics across the ranks of ``process_group`` (None: when "
        "torch.distributed runs more than one rank)",
    )
    process_group: Any = hyperparameter(None, "the ranks to reduce over (None: the world)")
    grad_scaler: torch.amp.GradScaler | None = hyperparameter(
        None,
        "the ``torch.amp.GradScaler`` of a mixed-precision loop that calls "
        "``scaler.unscale_(opt)`` before ``scaler.step(opt)``",
    )
    adaptive_damping: bool = hyperparameter(
        False,
        "adapt λ by the Levenberg–Marquardt rule on the reduction ratio ρ of the step (needs "
        "``step(closure)``; λ starts at ``damping``, a number; secondorder/docs/optimizer.md)",
    )
    damping_adaptation_interval: int = hyperparameter(
        5, "adaptive_damping: adapt λ every this many steps (positive int)"
    )
    damping_adaptation_decay: float = hyperparameter(
        0.95**5, "adaptive_damping: ω in (0, 1): λ ← ωλ if ρ > 3/4, λ ← λ/ω if ρ < 1/4"
    )
    min_damping: float = hyperparameter(1e-8, "adaptive_damping: lower bound of λ, > 0")
    max_damping: float | None = hyperparameter(
        None, "adaptive_damping: upper bound of λ (None: none)"
    )
    adaptive_lr: bool = hyperparameter(
        False,
        "choose the step size α on the direction each step by minimising the damped quadratic "
        "model with exact Hessian-vector products (needs ``step(closure)`` and "
        '``base="sgd"``; ``lr`` is then only the fallback)',
    )
    adaptive_momentum: bool = hyperparameter(
        False,
        "choose the coefficient μ on the previous step likewise (M&G's momentum, which "
        'replaces SGD momentum: needs ``base="sgd"`` and ``momentum`` unset or 0)',
    )

    def __post_init__(self) -> None:
        if self.base not in _BASES:
            raise ValueError(f"base must be one of {_BASES[:2]}, got {self.base!r}")
        self._check_graft()
        self._check_adaptive()  # before momentum=None takes the method's default
        if self.base == "sgd":
            if self.betas is not None or self.eps is not None:
                raise ValueError("betas and eps apply to base='adam'; base='sgd' uses momentum")
            if self.momentum is None:
                # Adam's step carries its own momentum
                self.momentum = 0.0 if self.graft == "adam" else self.default_momentum
        elif self.base == "adam":
            if self.momentum is not None or self.dampening != 0 or self.nesterov:
                raise ValueError(
                    "momentum, dampening and nesterov apply to base='sgd'; base='adam' uses betas"
                )
            self.betas = (0.9, 0.999) if self.betas is None else tuple(self.betas)
            self.eps = 1e-8 if self.eps is None else self.eps
        from .base_updates import BASE_UPDATES  # the base updates import this module

        BASE_UPDATES[self.base].check_group(self.group_defaults())
        if not isinstance(self.decoupled_weight_decay, bool):
            raise TypeError(
                "decoupled_weight_decay must be a bool, got "
                f"{type(self.decoupled_weight_decay).__name__}"
            )
        self.damping = check_schedule("damping", self.damping, low_open=True)
        self.curvature_every = check_interval("curvature_every", self.curvature_every)
        self.inverse_every = check_interval("inverse_every", self.inverse_every)
        if self.kl_clip is not None:
            self.kl_clip = check_number("kl_clip", self.kl_clip, low_open=True)
        if self.nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {self.nonfinite!r}")
        self._check_fisher_type()
        for name in ("precondition", "record_in_eval", "inverse_warmup"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.distributed is not None and not isinstance(self.distributed, bool):
            raise TypeError(f"distributed must be a bool or None, got {self.distributed!r}")
        self.use_curvature = check_use_curvature(self.use_curvature)
        self.statistics_rows = check_statistics_rows(self.statistics_rows)
        if self.grad_scaler is not None and not isinstance(self.grad_scaler, torch.amp.GradScaler):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(self.grad_scaler).__name__}"
            )

    def _check_graft(self) -> None:
        from .base_updates import check_betas
        from .grafting import GRAFT_NORMS, GRAFTS

        if not isinstance(self.graft_moment, bool):
            raise TypeError(f"graft_moment must be a bool, got {type(self.graft_moment).__name__}")
        if self.graft_norm not in GRAFT_NORMS:
            raise ValueError(f"graft_norm must be one of {GRAFT_NORMS}, got {self.graft_norm!r}")
        if self.graft == "auto":
            adaptive_step = self.adaptive_lr is True or self.adaptive_momentum is True
            self.graft = "adam" if self.base == "sgd" and not adaptive_step else None
        if self.graft is None:
            return
        if self.graft not in GRAFTS:
            raise ValueError(f"graft must be None, 'auto' or one of {GRAFTS}, got {self.graft!r}")
        if self.kl_clip is not None:
            raise ValueError(
                f"kl_clip ({self.kl_clip!r}) has no effect with graft={self.graft!r}: grafting "
                "sets each parameter's step norm after clipping. Pass kl_clip=None, or "
                "graft=None for the papers' clipped update"
            )
        if self.base == "adam":
            raise ValueError(
                "graft applies to base='sgd', 'momentum' or 'adahessian', not to base='adam' "
                "(Adam's step sets its own size: pick one of the two)"
            )
        check_betas(self.graft_betas)
        self.graft_betas = tuple(self.graft_betas)
        self.graft_eps = check_number("graft_eps", self.graft_eps)

    def _check_adaptive(self) -> None:
        """The adaptive damping / learning rate / momentum options (secondorder/adaptive.py)."""
        for name in ("adaptive_damping", "adaptive_lr", "adaptive_momentum"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        interval = self.damping_adaptation_interval
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ValueError(
                f"damping_adaptation_interval must be a positive int, got {interval!r}"
            )
        decay = check_number("damping_adaptation_decay", self.damping_adaptation_decay)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"damping_adaptation_decay must be in (0, 1), got {decay!r}")
        self.damping_adaptation_decay = decay
        self.min_damping = check_number("min_damping", self.min_damping, low_open=True)
        if self.max_damping is not None:
            self.max_damping = check_number("max_damping", self.max_damping, low_open=True)
            if self.max_damping < self.min_damping:
                raise ValueError(
                    f"max_damping ({self.max_damping!r}) must be >= min_damping "
                    f"({self.min_damping!r})"
                )
        if self.damping is None:  # the default: adaptive damping starts higher
            if self.adaptive_damping:
                start = max(self.default_adaptive_damping, self.min_damping)
                if self.max_damping is not None:
                    start = min(start, self.max_damping)
                self.damping = start
            else:
                self.damping = self.default_damping
        if self.adaptive_damping:
            if callable(self.damping):
                raise ValueError(
                    "adaptive_damping adapts λ from the number damping= gives; it cannot be "
                    "combined with a damping schedule (a callable damping)"
                )
            damping = check_number("damping", self.damping, low_open=True)
            if damping < self.min_damping or (
                self.max_damping is not None and damping > self.max_damping
            ):
                raise ValueError(
                    f"adaptive_damping: damping ({damping!r}) must lie in [min_damping, "
                    f"max_damping] = [{self.min_damping!r}, {self.max_damping!r}]"
                )
        adaptive = [n for n in ("adaptive_lr", "adaptive_momentum") if getattr(self, n)]
        if adaptive and self.graft is not None:
            raise ValueError(
                f"{' and '.join(adaptive)} choose the step's size themselves; graft= sets it "
                "from another method: use one or the other"
            )
        if adaptive and self.base != "sgd":
            raise ValueError(
                f"{' and '.join(adaptive)} choose the step δ = α(−Δ) + μ δ_prev themselves and "
                f'need base="sgd"; base={self.base!r} has its own moments (use adaptive_damping '
                "alone with it)"
            )
        if adaptive and (self.nesterov or self.dampening != 0):
            raise ValueError(
                f"{' and '.join(adaptive)}: the step is α(−Δ) + μ δ_prev, with no nesterov or "
                "dampening; leave them unset"
            )
        if adaptive and self.decoupled_weight_decay:
            raise ValueError(
                f"{' and '.join(adaptive)}: decoupled_weight_decay scales the decay by lr, "
                "which the adaptive step replaces; use coupled weight decay (the default)"
            )
        if self.adaptive_momentum:
            if self.momentum not in (None, 0, 0.0):
                raise ValueError(
                    f"adaptive_momentum chooses μ each step; leave momentum unset (got "
                    f"momentum={self.momentum!r})"
                )
            self.momentum = 0.0  # no SGD momentum buffer: μ δ_prev replaces it
        if adaptive or self.adaptive_damping:
            on = [
                n
                for n in ("adaptive_damping", "adaptive_lr", "adaptive_momentum")
                if getattr(self, n)
            ]
            if self.grad_scaler is not None:
                raise ValueError(f"{', '.join(on)} do not support grad_scaler (AMP)")
            if self.distributed:
                raise ValueError(f"{', '.join(on)} do not support distributed training")

    def _check_fisher_type(self) -> None:
        if self.fisher_type not in _FISHER_TYPES:
            raise ValueError(
                f"fisher_type must be one of {_FISHER_TYPES}, got {self.fisher_type!r}"
            )
        if self.fisher_type == "empirical" and (
            self.likelihood is not None or self.likelihood_sigma is not None
        ):
            raise ValueError(
                "likelihood and likelihood_sigma apply to fisher_type='mc' (labels sampled "
                "from the model); fisher_type='empirical' uses the gradients of your own loss"
            )
        if self.likelihood is not None:
            check_likelihood(self.likelihood)
        if self.likelihood_sigma is not None:
            if self.likelihood != "gaussian":
                raise ValueError(
                    "likelihood_sigma applies to likelihood='gaussian', got likelihood="
                    f"{self.likelihood!r}"
                )
            check_number("likelihood_sigma", self.likelihood_sigma, low_open=True)

    def group_defaults(self) -> dict[str, Any]:
        """The param-group defaults of the base update (``lr``, ``weight_decay`` and the
        base's own: ``momentum``/``dampening``/``nesterov``, ``betas``/``eps``, or
        ``beta``/``betas``)."""
        from .base_updates import BASE_UPDATES

        return BASE_UPDATES[self.base].defaults(self)

    # ---- building from keywords ---------------------------------------------------------
    @classmethod
    def from_keywords(
        cls,
        called: str,
        keywords: Mapping[str, Any],
        config: OptimizerConfig | None = None,
        *,
        extra: Iterable[str] = (),
    ) -> OptimizerConfig:
        """The config an optimizer called as ``called(..., **keywords)`` uses: ``config``
        (an instance of this class) with ``keywords`` replacing its fields, or a new one.
        A keyword that is no field (or a fixed one) raises the ``TypeError`` Python would,
        naming ``called`` and the closest accepted keyword (``extra`` lists the
        optimizer's other keywords, for the suggestion)."""
        accepted = {f.name for f in config_fields(cls)}
        fixed = fixed_fields(cls)
        for key in keywords:
            if key in fixed:
                raise TypeError(
                    f"{called}.__init__() got an unexpected keyword argument {key!r}: "
                    f"{called} sets it itself ({key}={fixed[key]!r})"
                )
            if key not in accepted:
                raise unknown_keyword(called, key, accepted | set(extra))
        if config is None:
            return cls(**keywords)
        if not isinstance(config, cls):
            raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
        given = {f.name: getattr(config, f.name) for f in config_fields(cls)}
        return cls(**{**given, **keywords})

    @classmethod
    def signature_parameters(cls) -> list[inspect.Parameter]:
        """The keyword-only parameters an optimizer built from this config accepts."""
        return [
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type
            )
            for f in config_fields(cls)
            if f.name != "lr"
        ]

    @classmethod
    def describe(cls, indent: int = 8) -> str:
        """The fields as the ``Args`` lines of a docstring: ``name (default): doc``."""
        lines = []
        for f in config_fields(cls):
            doc = f.metadata.get("doc", "")
            text = f"{f.name} (default: {f.default!r}): {doc}"
            lines.append(
                textwrap.fill(
                    text,
                    width=92,
                    initial_indent=" " * indent,
                    subsequent_indent=" " * (indent + 4),
                )
            )
        return "\n".join(lines)
