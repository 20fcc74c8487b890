"""Statistics subsampling: the layer statistics of a random subset of each batch's examples.

With ``statistics_rows`` set, the capture (:class:`~secondorder.capture.ModelCapture`) hands
the estimator the inputs and output gradients of ``k`` of the ``n`` examples of each
recorded forward pass instead of all of them, so that the cost of the statistics (the
``Σ ã ãᵀ`` and ``Σ g gᵀ`` products, E-KFAC's projections, AdaFisher's squares) scales with
``k``, not with the batch.

What is drawn: whole examples, without replacement, uniformly among the ``n`` of the pass.
Every helper's statistics are sums over examples (a convolution's rows are the output
positions of its examples, a sequence's its tokens), so slicing the leading dimension of
the layer's input and of its output gradient with the same indices gives exactly the
statistics of those ``k`` examples; a convolution keeps its implicit-im2col factor kernel
(no patch matrix), and ``A`` and ``G`` always come from the same examples. Sampling
positions inside examples would cost less on long sequences, but would need the patch
matrix of a convolution and breaks the per-example statistics of E-KFAC and AdaFisher's
norm blocks; it is not done.

One draw per forward pass: the first layer to record a pass (of a given batch size) draws a
random permutation of its examples, and every layer of that pass (tied modules too) keeps a
prefix of it, so layers that keep the same number of examples keep the same ones.

Scaling (``n`` examples in the pass, ``k`` kept; the estimators' conventions unchanged):

* ``A = Σ_rows ã ãᵀ / rows``: the rows counted are the kept ones, and their number is fixed
  by ``k`` (each example of a layer has the same number of rows), so ``E[A]`` is the full
  batch's ``A``;
* ``G = n · Σ_rows g gᵀ``, E-KFAC's ``n Σ_n (Q_Gᵀ ∇_n Q_A)²``, AdaFisher's ``n Σ g²`` and
  the norm blocks' ``n Σ_n d_n d_nᵀ``: each is ``n`` times a sum over examples of a square
  of the output gradient, which a subset sums to ``k/n`` of in expectation. The kept output
  gradients are multiplied by ``√(n/k)`` (so the squares by ``n/k``), and the capture still
  counts ``n`` examples: every such statistic is unbiased.

Several passes before one update (gradient accumulation) are unbiased when they keep the
same fraction of their examples (``A``'s row count pools the passes). BatchNorm layers are
never subsampled (:attr:`~secondorder.layers.LayerHelper.separable_examples`): in training
mode the normalisation couples the examples of the batch, and their statistics are cheap.

The generator is a CPU ``torch.Generator`` seeded with :data:`SEED`; its state is part of
the optimizer's ``state_dict``, so that a resumed run draws the examples the uninterrupted
one would have.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_statistics_rows
from .layers import KroneckerHelper, LayerHelper

#: the seed of every sampler's generator: two runs of one script draw the same examples
SEED = 0


class ExampleSampler:
    """Draws the examples whose statistics a recorded pass contributes (module docstring).

    Args:
        statistics_rows (int | float): an int: about that many rows per layer and pass,
            rounded to the nearest number of whole examples; a float in (0, 1]: that
            fraction of the examples, rounded to the nearest. At least one example, at most
            all of them.
        seed (int, optional): the generator's seed (default: :data:`SEED`).
    """

    def __init__(self, statistics_rows: int | float, *, seed: int = SEED) -> None:
        statistics_rows = check_statistics_rows(statistics_rows)
        if statistics_rows is None:
            raise ValueError("statistics_rows=None keeps every row: build no sampler")
        self.statistics_rows = statistics_rows
        self.generator = torch.Generator().manual_seed(seed)
        #: (pass id, batch size) -> the pass's random order of its examples
        self._orders: dict[tuple[int, int], Tensor] = {}
        #: (pass id, batch size, kept, device) -> the kept indices: the layers of a pass
        #: that keep as many share one index tensor
        self._indices: dict[tuple[int, int, int, torch.device], Tensor] = {}
        #: (layer, shape of one example's output gradient) -> its rows (int statistics_rows)
        self._rows_per_example: dict[tuple[int, tuple[int, ...]], int] = {}

    def keep(self, layer: LayerHelper, batch: int, grad_output: Tensor) -> int:
        """How many of the ``batch`` examples of ``layer``'s pass are kept."""
        rows = self.statistics_rows
        if isinstance(rows, float):
            wanted = rows * batch
        else:
            # rows per example: the output-gradient rows of one example (one for a norm
            # layer's blocks, whose statistics are per-example gradients)
            key = (id(layer), tuple(grad_output.shape[1:]))
            per_example = self._rows_per_example.get(key)
            if per_example is None:
                per_example = (
                    layer.g_rows(grad_output[:1]).shape[1]
                    if isinstance(layer, KroneckerHelper)
                    else 1
                )
                self._rows_per_example[key] = per_example
            wanted = rows / max(per_example, 1)
        return min(batch, max(1, round(wanted)))

    def select(
        self, layer: LayerHelper, pass_id: int, inputs: Tensor, grad_output: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(inputs, grad_output)`` of the kept examples of ``layer``'s pass ``pass_id``,
        the output gradient scaled by ``√(n/k)`` (in float32 if it was half precision); the
        arguments themselves when every example is kept (or ``layer`` cannot be
        subsampled)."""
        batch = layer.batch_size(inputs)
        if (
            batch < 2
            or not layer.separable_examples
            or grad_output.dim() == 0
            or grad_output.shape[0] != batch
        ):
            return inputs, grad_output
        keep = self.keep(layer, batch, grad_output)
        if keep >= batch:
            return inputs, grad_output
        index = self._index(pass_id, batch, keep, inputs.device)
        kept_inputs = inputs.index_select(0, index)
        kept_grads = grad_output.index_select(0, index.to(grad_output.device))
        if kept_grads.dtype in (torch.float16, torch.bfloat16):
            # the statistics are summed in float32 anyway; √(n/k) must not overflow float16
            kept_grads = kept_grads.float()
        return kept_inputs, kept_grads.mul_(math.sqrt(batch / keep))

    def _index(self, pass_id: int, batch: int, keep: int, device: torch.device) -> Tensor:
        """The ``keep`` examples pass ``pass_id`` keeps, in batch order, on ``device``."""
        key = (pass_id, batch, keep, device)
        index = self._indices.get(key)
        if index is None:
            order = self._orders.get((pass_id, batch))
            if order is None:
                order = self._orders[(pass_id, batch)] = self.draw(batch)
            index = self._indices[key] = order[:keep].sort().values.to(device)
        return index

    def draw(self, batch: int) -> Tensor:
        """A random order of ``batch`` examples (a CPU permutation): a pass keeps a prefix."""
        return torch.randperm(batch, generator=self.generator)

    def clear(self) -> None:
        """Forget the passes' draws (their statistics were collected or discarded)."""
        self._orders = {}
        self._indices = {}

    def state_dict(self) -> dict[str, Tensor]:
        """The generator's state (draws in flight are not kept: they belong to a step's
        statistics, which are not saved either)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.clear()
