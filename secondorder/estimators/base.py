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

* ``state_dict()`` / ``load_state_dict()``.

Class attributes say what the estimator needs from the optimizer: hooks
(:attr:`~CurvatureEstimator.requires_capture`), a backward pass with a graph
(:attr:`~CurvatureEstimator.needs_graph`), data-parallel support
(:attr:`~CurvatureEstimator.supports_distributed`).
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

_STAGES = ("gradient", "moment")


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
    #: where the curvature acts: ``"gradient"`` (:meth:`precondition`) or ``"moment"``
    #: (:meth:`moment_curvature`, for the ``"momentum"`` base update)
    acts_on: ClassVar[str] = "gradient"
    #: whether the gradients must come from ``loss.backward(create_graph=True)``
    #: (Hessian-vector products)
    needs_graph: ClassVar[bool] = False
    #: set by the optimizer in a distributed run: refreshes may share work through it
    comm: Communicator | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.acts_on not in _STAGES:
            raise TypeError(f"{cls.__name__}.acts_on must be one of {_STAGES}, got {cls.acts_on!r}")
        hook = "precondition" if cls.acts_on == "gradient" else "moment_curvature"
        if getattr(cls, hook) is getattr(CurvatureEstimator, hook) and not getattr(
            cls, "__abstractmethods__", None
        ):
            raise TypeError(f"{cls.__name__} acts on the {cls.acts_on}: it must define {hook}()")

    def __init__(self, layers: Sequence[LayerHelper]) -> None:
        self.layers = list(layers)
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("layer names must be unique")

    @property
    def params(self) -> list[nn.Parameter]:
        """Every parameter whose gradient :meth:`precondition` may replace."""
        return [p for layer in self.layers for p in layer.params]

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

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The curvature state needed to resume exactly (tensors and plain values)."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output and recompute derived quantities."""
