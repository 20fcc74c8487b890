"""The estimator protocol: what every curvature method provides to the optimizer.

An estimator knows nothing of param_groups, learning rates or weight decay; the
optimizer knows nothing of Kronecker factors. Between them pass only:

* ``accumulate(layer, inputs, grad_output, acc)`` — from the capture hooks, cheap;
* ``update(stats)`` — absorb the statistics of a curvature step;
* ``refresh(damping)`` — recompute what ``precondition`` needs (costly, rare);
* ``precondition(grads, damping)`` — the approximate ``F^-1 g`` for covered params;
* ``state_dict()`` / ``load_state_dict()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from ..layers import LayerHelper

if TYPE_CHECKING:
    from ..distributed import Communicator


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
    #: set by the optimizer in a distributed run: refreshes may share work through it
    comm: Communicator | None = None

    def __init__(self, layers: Sequence[LayerHelper]) -> None:
        self.layers = list(layers)
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("layer names must be unique")

    @property
    def params(self) -> list[nn.Parameter]:
        """Every parameter whose gradient :meth:`precondition` may replace."""
        return [p for layer in self.layers for p in layer.params]

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

    @abstractmethod
    def precondition(self, grads: Mapping[Tensor, Tensor], damping: float) -> dict[Tensor, Tensor]:
        """Preconditioned gradients for the covered parameters that can be preconditioned.

        Parameters missing from the result keep their raw gradient (for example a
        layer with no statistics yet).
        """

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The curvature state needed to resume exactly (tensors and plain values)."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output and recompute derived quantities."""
