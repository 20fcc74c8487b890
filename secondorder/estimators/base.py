"""The estimator protocol: what every curvature method provides to the optimizer.

An estimator knows nothing of param_groups, learning rates or weight decay; the
optimizer knows nothing of Kronecker factors. Between them pass only:

* ``wants_statistics(step, curvature_due=, refresh_due=)`` — whether the passes before
  ``step`` must be recorded and absorbed (default: when ``curvature_every`` says so);
* ``accumulate(layer, inputs, grad_output, acc)`` — from the capture hooks, cheap;
* ``update(stats)`` — absorb the statistics of a curvature step;
* ``refresh(damping)`` — recompute what preconditioning needs (costly, rare);
* where the curvature acts, by :attr:`~CurvatureEstimator.acts_on`:

  - ``"gradient"``: ``precondition(grads, damping)``, the approximate ``F^-1 g`` for
    covered params, which the base update (SGD / Adam moments) then follows (K-FAC,
    E-KFAC, two-level K-FAC, M-FAC);
  - ``"moment"``: ``moment_curvature(param)``, a diagonal ``D`` that the ``"momentum"``
    base update divides its bias-corrected first moment by, ``m̂ / (D + λ)`` (AdaFisher);
  - ``"second_moment"``: ``second_moment(param)``, the quantity ``D`` whose square the
    Adam-style second moment of the ``"adahessian"`` base update averages in place of
    ``g²``, ``v ← β₂ v + (1 − β₂) D²`` (AdaHessian: ``D`` the Hessian diagonal);

* ``state_dict()`` / ``load_state_dict()``.

Class attributes say what the estimator needs from the optimizer: hooks
(:attr:`~CurvatureEstimator.requires_capture`), a backward pass with a graph
(:attr:`~CurvatureEstimator.needs_graph`), data-parallel support
(:attr:`~CurvatureEstimator.supports_distributed`).

An estimator whose statistics turn out non-finite drops them where it can (K-FAC: per
layer, the step goes on); one that cannot raises :class:`NonFiniteStatistics` from
:meth:`~CurvatureEstimator.update` with its state unchanged, and the optimizer treats the
step as one with a non-finite gradient (``nonfinite="skip"`` / ``"raise"``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from ..layers import LayerHelper

if TYPE_CHECKING:
    from ..base_updates import DiagonalCurvature
    from ..distributed import Communicator

_STAGES = ("gradient", "moment", "second_moment")
_HOOKS = {
    "gradient": "precondition",
    "moment": "moment_curvature",
    "second_moment": "second_moment",
}


class NonFiniteStatistics(FloatingPointError):
    """Raised by :meth:`CurvatureEstimator.update`, its state left unchanged, when the
    statistics of the step are not finite and cannot be dropped alone: the optimizer
    skips the step (or raises, with ``nonfinite="raise"``).

    Args:
        what (str): what is not finite, in words (``"Hessian estimate"``).
        params (Sequence[Tensor]): the parameters whose statistics are not finite.
    """

    def __init__(self, what: str, params: Sequence[Tensor]) -> None:
        super().__init__(f"non-finite {what}")
        self.what = what
        self.params = list(params)


class CurvatureEstimator(ABC):
    """Base class of the curvature estimators.

    Args:
        layers (Sequence[LayerHelper]): the layers this estimator covers (for
            estimators that use capture; may be empty for the others).
    """

    #: whether the optimizer must attach capture hooks and feed :meth:`accumulate`
    requires_capture: ClassVar[bool] = True
    #: whether the estimator works data-parallel: its statistics reduce across ranks
    #: (:mod:`secondorder.distributed`), or it needs none (built from DDP's gradients)
    supports_distributed: ClassVar[bool] = True
    #: whether the statistics may come from a random subset of each pass's examples
    #: (``statistics_rows``): the capture rescales what it hands :meth:`accumulate` so that
    #: statistics built the K-FAC way (module docstring of :mod:`secondorder.subsample`)
    #: stay unbiased
    supports_statistics_subsampling: ClassVar[bool] = True
    #: where the curvature acts: ``"gradient"`` (:meth:`precondition`), ``"moment"``
    #: (:meth:`moment_curvature`, for the ``"momentum"`` base update) or
    #: ``"second_moment"`` (:meth:`second_moment`, for the ``"adahessian"`` base update)
    acts_on: ClassVar[str] = "gradient"
    #: whether the gradients must come from ``loss.backward(create_graph=True)``
    #: (Hessian-vector products). Such an estimator (``requires_capture = False``) gets
    #: the gradients in :meth:`update` with their graph, unscaled in place under AMP but
    #: still differentiating the scaled loss (:attr:`loss_scale`); the optimizer releases
    #: the graph at the end of every step (``p.grad`` detached) and, since
    #: ``DistributedDataParallel`` cannot run a double backward, averages the gradients
    #: across the ranks of a distributed run itself.
    needs_graph: ClassVar[bool] = False
    #: set by the optimizer in a distributed run: refreshes may share work through it
    comm: Communicator | None = None
    #: set by the optimizer before :meth:`update`: the loss scale (AMP) that derivatives
    #: taken through the gradients' graph carry (1 outside a ``GradScaler`` step)
    loss_scale: float = 1.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.acts_on not in _STAGES:
            raise TypeError(f"{cls.__name__}.acts_on must be one of {_STAGES}, got {cls.acts_on!r}")
        hook = _HOOKS[cls.acts_on]
        if getattr(cls, hook) is getattr(CurvatureEstimator, hook) and not getattr(
            cls, "__abstractmethods__", None
        ):
            raise TypeError(f"{cls.__name__} acts on the {cls.acts_on}: it must define {hook}()")

    def __init__(self, layers: Sequence[LayerHelper]) -> None:
        self.layers = list(layers)
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("layer names must be unique")

    @classmethod
    def build(
        cls, layers: list[LayerHelper], params: list[nn.Parameter], config: Any, names: list[str]
    ) -> CurvatureEstimator:
        """The estimator an optimizer's ``estimator_class`` builds (the default
        :meth:`CurvatureOptimizer.build_estimator`): ``cls(layers, config)``; ``names`` are
        the parameters' names, in the order of ``params``."""
        return cls(layers, config)  # type: ignore[call-arg]

    @property
    def params(self) -> list[nn.Parameter]:
        """Every parameter whose gradient :meth:`precondition` may replace."""
        return [p for layer in self.layers for p in layer.params]

    def describe_layers(self) -> list[dict[str, Any]]:
        """One entry per covered layer for :meth:`CurvatureOptimizer.describe`: ``name``,
        ``type``, ``a`` and ``g`` (how the curvature of the layer is kept), ``factor_bytes``
        and ``state_bytes`` (None where the estimator does not say)."""
        return [
            {"name": layer.name, "type": type(layer.module).__name__, "a": "-", "g": "-",
             "factor_bytes": None, "state_bytes": None}
            for layer in self.layers
        ]  # fmt: skip

    def wants_statistics(self, step: int, *, curvature_due: bool, refresh_due: bool) -> bool:
        """Whether the passes before ``step`` are recorded and :meth:`update` absorbs them.

        Called before the passes of ``step`` (and again at the step). ``curvature_due``
        and ``refresh_due`` say whether ``curvature_every`` and ``inverse_every`` are due
        at ``step``. An estimator with schedules of its own (E-KFAC's scalings) decides
        here what the recorded passes must produce. Default: ``curvature_due``.
        """
        return curvature_due

    def accumulate(self, layer: LayerHelper, inputs: Tensor, grad_output: Tensor, acc: Any) -> Any:
        """Fold one recorded pass of ``layer`` into ``acc`` (None at first) and return it."""
        raise NotImplementedError(f"{type(self).__name__} does not use capture")

    @abstractmethod
    def update(self, stats: Mapping[str, Any]) -> None:
        """Absorb new curvature statistics at a curvature step.

        For estimators that use capture, ``stats`` maps layer names to what
        :meth:`accumulate` built since the last step; for the others it maps each
        parameter to its raw gradient.
        """

    @abstractmethod
    def refresh(self, damping: float) -> None:
        """Recompute inverses (or whatever :meth:`precondition` needs) from the state."""

    def precondition(self, grads: Mapping[Tensor, Tensor], damping: float) -> dict[Tensor, Tensor]:
        """For ``acts_on = "gradient"``: preconditioned gradients for the covered
        parameters that can be preconditioned.

        Parameters missing from the result keep their raw gradient (for example a
        layer with no statistics yet).
        """
        raise NotImplementedError(f"{type(self).__name__} acts on the {self.acts_on}")

    def moment_curvature(self, param: Tensor) -> DiagonalCurvature | None:
        """For ``acts_on = "moment"``: the diagonal curvature ``D`` of ``param`` that the
        ``"momentum"`` base update divides the bias-corrected first moment by
        (``m̂ / (D + λ)``), or None for ``D = 1`` (an uncovered parameter)."""
        raise NotImplementedError(f"{type(self).__name__} acts on the {self.acts_on}")

    def second_moment(self, param: Tensor) -> Tensor | None:
        """For ``acts_on = "second_moment"``: the quantity ``D`` of ``param`` (its shape,
        or broadcastable to it) whose square the ``"adahessian"`` base update's second
        moment averages, ``v ← β₂ v + (1 − β₂) D²``, in place of the gradient's ``g²``;
        or None for the gradient itself (plain Adam: an uncovered parameter)."""
        raise NotImplementedError(f"{type(self).__name__} acts on the {self.acts_on}")

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The curvature state needed to resume exactly (tensors and plain values)."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output and recompute derived quantities."""


def format_layer_table(rows: Sequence[Mapping[str, Any]], left_out: Sequence[str]) -> str:
    """The text of :meth:`CurvatureOptimizer.describe`: one line per entry of
    :meth:`CurvatureEstimator.describe_layers`, a total, then the layers left out."""
    head = ("layer", "type", "A", "G", "factor bytes", "state bytes")
    keys = ("name", "type", "a", "g", "factor_bytes", "state_bytes")
    table = [head] + [tuple("-" if r[k] is None else str(r[k]) for k in keys) for r in rows]
    if rows:
        totals = [sum(r[k] or 0 for r in rows) for k in keys[4:]]
        table.append(("total", "", "", "", *map(str, totals)))
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    lines = [
        "  ".join(
            c.rjust(w) if i >= 4 else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in table
    ]
    lines += [f"left out: {reason}" for reason in left_out]
    return "\n".join(lines)


class ParameterEstimator(CurvatureEstimator):
    """Base of the estimators built from the parameters and their gradients alone (no
    hooks, no layers): Shampoo's and SOAP's.

    Args:
        params (list[nn.Parameter]): the parameters; those that do not require grad are
            left out.
        names (list[str], optional): their names, for messages (default ``param i``).
    """

    requires_capture = False

    def __init__(self, params: list[nn.Parameter], names: list[str] | None = None) -> None:
        super().__init__([])
        names = names if names is not None else [f"param {i}" for i in range(len(params))]
        self.names = {p: n for p, n in zip(params, names, strict=True) if p.requires_grad}
        self._params = [p for p in params if p.requires_grad]

    @classmethod
    def build(
        cls, layers: list[LayerHelper], params: list[nn.Parameter], config: Any, names: list[str]
    ) -> CurvatureEstimator:
        """``cls(params, config, names)``: the parameters, not the layers."""
        return cls(params, config, names)  # type: ignore[call-arg]

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self._params)

    @abstractmethod
    def precondition(self, grads: Mapping[Tensor, Tensor], damping: float) -> dict[Tensor, Tensor]:
        """Each parameter's direction from its gradient (acts on the gradient)."""
