r"""AdaFisher and AdaFisherW (Gomes et al., 2024, "AdaFisher: Adaptive Second Order
Optimization via Fisher Information", https://arxiv.org/abs/2405.16397).

AdaFisher is Adam with its square-rooted second moment replaced by a diagonal Fisher
approximation built from the *diagonals* of the two K-FAC factors.

**Statistics** (empirical Fisher, the gradients of the loss the user back-propagates; or
the Monte-Carlo Fisher with ``fisher_type="mc"``). For a ``"kronecker"`` layer (Linear,
convolutions, Embedding), with the same rows and scaling as
:class:`~secondorder.estimators.kfac.KFACEstimator`:

* ``H_D = mean over rows of ã²`` -- the diagonal of K-FAC's ``A`` (``ã`` the input row with
  the trailing 1 of the bias column); for an Embedding, the token frequencies
  ``a_diag_sum / rows``;
* ``S_D = n · Σ_rows g²`` -- the diagonal of K-FAC's ``G`` (``n`` examples, ``g`` the
  output gradient of a loss that is a batch mean).

The per-layer diagonals cover every group of a grouped convolution, shape
``(groups, a_dim)`` and ``(groups, g_dim)``.

**Normalisation and averaging.** At every curvature step (every ``curvature_every``
steps) each new diagonal is min-max normalised over the whole layer,
``D̂ = (D − min D) / (max D − min D)`` in ``[0, 1]`` (a constant diagonal, e.g. a layer
with a single output, becomes all ones: it carries no relative information, and the
reference's ``1e-12`` guard would turn it into zeros, i.e. ``F̃ = λ`` and a ``1/λ`` step),
then folded into an exponential moving average initialised to ones:
``H ← γ₁ H + γ₂ Ĥ``, ``S ← γ₁ S + γ₂ Ŝ``. With ``gamma=γ`` (a number, the paper's form)
``γ₁ = γ, γ₂ = 1 − γ``; γ = 0.8 is the paper's value. After ``k`` updates the initial ones
still weigh ``γᵏ`` (with ``curvature_every=100``, 0.33 after 500 steps). The reference code
instead computes
``0.08 H + 0.008 Ĥ`` (its ``gammas=[0.92, 0.008]``, i.e. ``(1 − 0.92) H + 0.008 Ĥ``): not a
convex combination, it shrinks ``H`` and ``S`` to about ``0.0087`` of their normalised
values, so that ``F̃ ≈ λ`` and the update is close to ``lr/λ`` times the momentum; pass
``gamma=(0.08, 0.008)`` to reproduce it.

**Update** of a weight block ``W`` (``(groups, g_dim, a_dim)``, the bias as its last
column), every step:

.. math::
    \tilde F = S\,H^\top + \lambda, \qquad
    m \leftarrow \beta m + (1-\beta)(g + \kappa_{L2} w), \qquad
    w \leftarrow w - \eta\,\big(\hat m / \tilde F + \kappa_{W} w\big)

with ``m̂ = m / (1 − βᵗ)`` and no square root; ``κ_L2`` is AdaFisher's weight decay,
``κ_W`` AdaFisherW's (decoupled). ``F̃`` is never materialised:
:func:`secondorder.kernels.adafisher_update` (a Triton kernel on CUDA) forms it element by
element from the two diagonals, once for the weight and once for the bias column.

**Normalisation layers** (``"blocks"`` helpers: BatchNorm, LayerNorm, GroupNorm). Their
scale and shift act element-wise, so the Fisher does not factor into an input and an
output diagonal. The reference code forces them into the Kronecker form (an "input"
diagonal from channel sums of the raw inputs, an "output" diagonal from channel sums of
the output gradients); here each channel's ``(scale, shift)`` gets the exact diagonal
empirical Fisher ``n · Σ_n d_n²`` of the per-example gradients ``d_n`` the helper computes
(the same per-example scaling as ``S_D``), min-max normalised over the layer and averaged
like ``H`` and ``S``; ``F̃ = D + λ`` element-wise.

**Everything else** -- parameters of layers without a helper, free-standing
``nn.Parameter``\ s, layers in ``skip_layers`` -- is updated at every step as if its
diagonals had stayed at their initial ones: ``F̃ = 1 + λ``, ``w ← w − η m̂/(1 + λ)``
(bias-corrected momentum; with the convex average covered ``F̃`` lie in ``[λ, 1 + λ]``, so
this is the most conservative step a covered coordinate can take). Every parameter is
matched to its layer by identity, so an unsupported layer never shifts the update of the
layers after it (the reference matches parameters to modules by position, and stops
updating the trailing layers).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._checks import Interval, Schedule
from .._host import to_host
from ..base_updates import ColumnLayout, DiagonalCurvature
from ..config import OptimizerConfig, fixed, hyperparameter
from ..distributed import stat_field
from ..layers import BlockHelper, LayerHelper
from ..optimizer import CurvatureOptimizer
from .base import CurvatureEstimator

_FACTOR_DTYPES = (torch.float32, torch.float64)


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(kw_only=True)
class AdaFisherConfig(OptimizerConfig):
    """Hyperparameters of AdaFisher (:class:`AdaFisher` and :class:`AdaFisherEstimator`),
    checked on construction. The paper's are lr 1e-3, β 0.9, λ 1e-3, γ 0.8, ``T_cov`` 100, no
    grafting (``configs/optimizers/adafisher.yaml``); the defaults refresh the diagonals
    every step and graft Adam's step norm per weight row onto AdaFisher's step ``m̂ / F̃``,
    with λ 0.03 and lr 0.03, chosen by measurement (issue 18, docs/adafisher.md). The base
    update is the ``"momentum"`` one (the bias-corrected first moment over ``F̃``); SGD's and
    Adam's base fields, ``kl_clip`` and ``inverse_every`` do not apply. The paper's training
    recipes use weight decay 5e-4, a choice of the experiment rather than of the optimizer."""

    lr: float = hyperparameter(
        0.03,
        "learning rate η: Adam's, with the default graft (the paper's 1e-3 is for graft=None, "
        "and below its bands of good lrs here). 0.03 reached every target of the issue-18 grid "
        "with every seed but the GPT's (two of three)",
    )
    graft: str | None = hyperparameter(
        "adam",
        "each row of a weight (graft_norm) takes the norm of Adam's step and keeps AdaFisher's "
        "direction m̂ / F̃ (secondorder.grafting); None: the paper's update, whose step size "
        "depends on how F̃ is normalised",
    )
    graft_norm: str = hyperparameter(
        "row",
        'the units that take Adam\'s step norm: "row" (each output unit, channel or token; '
        '1-D parameters whole) or "parameter"',
    )
    beta: float = hyperparameter(
        0.9, "decay β of the first moment, in [0, 1); param groups may set it (or ``betas``)"
    )
    damping: Schedule = hyperparameter(
        0.03,
        "λ > 0 of ``F̃ = S Hᵀ + λ``, or a function of the step returning it: the largest ratio "
        "between two coordinates' steps is ``(1 + λ)/λ`` (the paper's 1e-3: 1000x). 0.03 with "
        "the Adam graft per row: the most good learning rates over the issue-18 grid; 3e-3 "
        "without a graft (docs/adafisher.md)",
    )
    gamma: float | tuple[float, float] = hyperparameter(
        0.8,
        "averaging of the normalised diagonals: ``γ`` in [0, 1) (``D ← γ D + (1 − γ) D̂``) "
        "or a pair ``(γ₁, γ₂)``, ``γ₁ >= 0``, ``γ₂ > 0`` (``D ← γ₁ D + γ₂ D̂``; "
        "``(0.08, 0.008)`` reproduces the reference code)",
    )
    curvature_every: Interval = hyperparameter(
        1,
        "steps between updates of the diagonals (the paper's ``T_cov``, 100 there: on runs "
        "of a few hundred steps the diagonals would stay near their initial ones, F̃ ≈ 1, "
        "plain momentum)",
    )
    weight_decay: float = hyperparameter(
        0.0, "κ, L2 decay added to the gradient before the first moment (AdaFisherW: decoupled)"
    )
    factor_dtype: torch.dtype = hyperparameter(
        torch.float32, "dtype of the statistics and diagonals, float32 or float64"
    )
    base: str = fixed("momentum")
    momentum: float | None = fixed(None)
    dampening: float = fixed(0.0)
    nesterov: bool = fixed(False)
    betas: tuple[float, float] | None = fixed(None)
    eps: float | None = fixed(None)
    kl_clip: float | None = fixed(None)
    inverse_every: Interval = fixed(1)
    inverse_warmup: bool = fixed(False)
    decoupled_weight_decay: bool = fixed(False)
    #: ``(γ₁, γ₂)``, derived from ``gamma``
    ema_weights: tuple[float, float] = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        gamma = self.gamma
        if _real(gamma):
            if not (math.isfinite(gamma) and 0.0 <= gamma < 1.0):
                raise ValueError(f"gamma must be a number in [0, 1) or a pair, got {gamma!r}")
            self.ema_weights = (float(gamma), 1.0 - float(gamma))
        elif isinstance(gamma, (tuple, list)) and len(gamma) == 2 and all(map(_real, gamma)):
            old, new = (float(g) for g in gamma)
            if not (math.isfinite(old) and math.isfinite(new) and old >= 0.0 and new > 0.0):
                raise ValueError(
                    f"gamma as a pair (γ₁, γ₂) needs finite γ₁ >= 0 and γ₂ > 0, got {gamma!r}"
                )
            self.ema_weights = (old, new)
        else:
            raise TypeError(
                f"gamma must be a number in [0, 1) or a pair of numbers (γ₁, γ₂), got {gamma!r}"
            )
        if self.factor_dtype not in _FACTOR_DTYPES:
            raise ValueError(
                f"factor_dtype must be torch.float32 or torch.float64, got {self.factor_dtype!r}"
            )


@dataclass
class DiagonalStats:
    """Sums accumulated by the capture hooks for a ``"kronecker"`` layer between two
    curvature updates."""

    a_sq_sum: Tensor = field(metadata=stat_field("input"))  # Σ_rows ã², (groups, a_dim)
    g_sq_sum: Tensor = field(metadata=stat_field("output"))  # Σ_rows g², (groups, g_dim)
    rows: int = 0
    examples: int = 0


@dataclass
class BlockDiagonalStats:
    """Sums accumulated for a ``"blocks"`` layer: ``Σ_n d_n²`` per channel, ``(C, k)``."""

    sq_sum: Tensor = field(metadata=stat_field("output"))
    examples: int = 0


def min_max_normalise(diagonal: Tensor) -> Tensor:
    """``(d − min d) / (max d − min d)`` over the whole tensor, in ``[0, 1]``; all ones when
    the tensor is constant (no host synchronisation)."""
    low, high = diagonal.min(), diagonal.max()
    span = high - low
    scaled = (diagonal - low) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, scaled, torch.ones_like(scaled))


@dataclass
class _LayerState:
    # "kronecker": (S, H) = ((groups, g_dim), (groups, a_dim)); "blocks": (D, None), (C, k)
    first: Tensor
    second: Tensor | None
    updates: int = 0
    # the last statistics before normalisation, for inspection (not saved)
    raw: tuple[Tensor, Tensor | None] | None = None


class AdaFisherEstimator(CurvatureEstimator):
    """AdaFisher's diagonal factors for a list of layers.

    AdaFisher preconditions the first moment, not the gradient (``acts_on = "moment"``):
    :meth:`moment_curvature` gives each covered parameter's diagonal ``D`` (``S Hᵀ`` in
    the layer's weight-block layout, or a normalisation layer's ``D``), which the
    ``"momentum"`` base update divides the bias-corrected first moment by, ``m̂ / (D + λ)``,
    in one fused kernel (:func:`secondorder.kernels.adafisher_update`). :meth:`fisher`
    gives ``F̃`` itself.

    Args:
        layers (Sequence[LayerHelper]): the covered layers.
        config (AdaFisherConfig, optional): hyperparameters (default: ``AdaFisherConfig()``).
    """

    def __init__(
        self, layers: Sequence[LayerHelper], config: AdaFisherConfig | None = None
    ) -> None:
        super().__init__(layers)
        self.config = config if config is not None else AdaFisherConfig()
        self._by_name = {layer.name: layer for layer in self.layers}
        self._state = {layer.name: self._initial_state(layer) for layer in self.layers}
        self._targets: dict[Tensor, _Target] = {}
        for layer in self.layers:
            self._add_targets(layer)
        #: layer updates dropped because their statistics were not finite
        self.nonfinite_updates = 0

    acts_on = "moment"

    def _add_targets(self, layer: LayerHelper) -> None:
        if isinstance(layer, BlockHelper):
            shape = (layer.block_count, 1)
            self._targets[layer.weight] = _Target(ColumnLayout(shape), layer.name, 0)
            if layer.bias is not None:
                self._targets[layer.bias] = _Target(ColumnLayout(shape), layer.name, 1)
            return
        cols = layer.a_dim - int(layer.has_bias)
        self._targets[layer.weight] = _Target(_WeightBlock(layer), layer.name, slice(0, cols))
        if layer.bias is not None:
            shape = (layer.groups, layer.g_dim, 1)
            self._targets[layer.bias] = _Target(ColumnLayout(shape), layer.name, slice(cols, None))

    def moment_curvature(self, param: Tensor) -> DiagonalCurvature | None:
        """``D`` of a covered parameter in its layout: ``S Hᵀ`` restricted to the
        parameter's columns (weight block or bias column) of a Kronecker layer, the
        parameter's column of a normalisation layer's ``D``; None for any other."""
        target = self._targets.get(param)
        if target is None:
            return None
        first, second = self.diagonals(target.layer)
        if second is None:  # a normalisation layer: F̃ = D[:, column]·1 + λ
            one = torch.ones(1, dtype=first.dtype, device=first.device)
            return DiagonalCurvature(target.layout, first[:, target.columns], one)
        return DiagonalCurvature(target.layout, first, second[..., target.columns])

    def _shapes(self, layer: LayerHelper) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        if isinstance(layer, BlockHelper):
            return (layer.block_count, layer.block_size), None
        return (layer.groups, layer.g_dim), (layer.groups, layer.a_dim)

    def _initial_state(self, layer: LayerHelper) -> _LayerState:
        first, second = self._shapes(layer)
        ones = {"dtype": self.config.factor_dtype, "device": layer.weight.device}
        return _LayerState(
            first=torch.ones(first, **ones),
            second=None if second is None else torch.ones(second, **ones),
        )

    # ---- statistics ---------------------------------------------------------------------
    def accumulate(
        self,
        layer: LayerHelper,
        inputs: Tensor,
        grad_output: Tensor,
        acc: DiagonalStats | BlockDiagonalStats | None,
    ) -> DiagonalStats | BlockDiagonalStats:
        dtype = self.config.factor_dtype
        if isinstance(layer, BlockHelper):
            d = layer.per_example_grads(inputs, grad_output).to(dtype)
            sq = d.square().sum(0)
            if acc is None:
                acc = BlockDiagonalStats(sq_sum=sq)
            else:
                acc.sq_sum.add_(sq)
            acc.examples += d.shape[0]
            return acc
        g_sq = layer.g_rows(grad_output).to(dtype).square().sum(1)
        a_sq, rows = layer.a_square_sum(inputs, dtype)
        if acc is None:
            acc = DiagonalStats(a_sq_sum=a_sq, g_sq_sum=g_sq)
        else:
            acc.a_sq_sum.add_(a_sq)
            acc.g_sq_sum.add_(g_sq)
        acc.rows += rows
        acc.examples += layer.batch_size(inputs)
        return acc

    def raw_diagonals(
        self, stats: Mapping[str, DiagonalStats | BlockDiagonalStats]
    ) -> dict[str, tuple[Tensor, Tensor | None]]:
        """The new diagonals of each layer with statistics, before normalisation:
        ``(S_D, H_D)`` for a ``"kronecker"`` layer (``n Σ g²`` and ``mean ã²``, the
        diagonals of K-FAC's ``G`` and ``A``), ``(n Σ_n d_n², None)`` for a ``"blocks"``
        layer."""
        fresh: dict[str, tuple[Tensor, Tensor | None]] = {}
        for name, acc in stats.items():
            if isinstance(acc, BlockDiagonalStats):
                if acc.examples > 0:
                    fresh[name] = (acc.sq_sum * acc.examples, None)
            elif acc.rows > 0:
                fresh[name] = (acc.g_sq_sum * acc.examples, acc.a_sq_sum / acc.rows)
        return fresh

    def update(self, stats: Mapping[str, DiagonalStats | BlockDiagonalStats]) -> None:
        fresh = self.raw_diagonals(stats)
        if not fresh:
            return
        finite = to_host(
            [
                torch.isfinite(first).all()
                & (True if second is None else torch.isfinite(second).all())
                for first, second in fresh.values()
            ]
        )
        keep, new = self.config.ema_weights
        for (name, (first, second)), ok in zip(fresh.items(), finite, strict=True):
            if not ok:
                self.nonfinite_updates += 1
                continue
            state = self._state[name]
            state.first = keep * state.first + new * min_max_normalise(first)
            if second is not None:
                state.second = keep * state.second + new * min_max_normalise(second)
            state.updates += 1
            state.raw = (first, second)

    def refresh(self, damping: float) -> None:
        """Nothing to recompute: ``F̃`` is formed from the diagonals inside the update."""

    # ---- inspection ---------------------------------------------------------------------
    def diagonals(self, name: str) -> tuple[Tensor, Tensor | None]:
        """The averaged normalised diagonals of layer ``name``: ``(S, H)`` for a
        ``"kronecker"`` layer, ``(D, None)`` for a ``"blocks"`` layer (ones before the
        first update)."""
        state = self._state[name]
        return state.first, state.second

    def last_raw_diagonals(self, name: str) -> tuple[Tensor, Tensor | None] | None:
        """The statistics of the last update of layer ``name`` before normalisation, as
        :meth:`raw_diagonals` gives them (None before the first update)."""
        return self._state[name].raw

    def fisher(self, name: str, damping: float) -> Tensor:
        """``F̃`` of layer ``name``, materialised: ``S Hᵀ + λ`` as ``(groups, g_dim, a_dim)``
        (the layout of :meth:`~secondorder.layers.LayerHelper.grad_matrix`), or ``D + λ`` as
        ``(C, k)`` (the layout of ``grad_blocks``)."""
        first, second = self.diagonals(name)
        if second is None:
            return first + damping
        return first.unsqueeze(-1) * second.unsqueeze(-2) + damping

    # ---- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        layers = {
            name: {"first": state.first, "second": state.second, "updates": state.updates}
            for name, state in self._state.items()
            if state.updates > 0
        }
        return {"layers": layers, "nonfinite_updates": self.nonfinite_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        layers = state.get("layers", {})
        unknown = sorted(set(layers) - set(self._state))
        if unknown:
            raise ValueError(
                f"AdaFisher state has layers {unknown} that this model does not have "
                f"(its layers: {sorted(self._state)}); was it saved from a different model?"
            )
        new_states = {}
        for name, entry in layers.items():
            layer = self._by_name[name]
            shapes = self._shapes(layer)
            tensors = []
            for key, shape in zip(("first", "second"), shapes, strict=True):
                t = entry[key]
                if (t is None) != (shape is None) or (
                    t is not None and tuple(t.shape) != tuple(shape)
                ):
                    got = None if t is None else tuple(t.shape)
                    raise ValueError(
                        f"AdaFisher state for layer {name!r} has a diagonal of shape {got} "
                        f"where the layer needs {shape}; was it saved from a different model?"
                    )
                tensors.append(
                    None
                    if t is None
                    else t.to(device=layer.weight.device, dtype=self.config.factor_dtype)
                )
            new_states[name] = _LayerState(tensors[0], tensors[1], updates=int(entry["updates"]))
        self._state = {
            layer.name: new_states.get(layer.name) or self._initial_state(layer)
            for layer in self.layers
        }
        self.nonfinite_updates = int(state.get("nonfinite_updates", 0))


# ---- how the fused update sees each parameter --------------------------------------------
def _block_strides(layer: LayerHelper, t: Tensor) -> tuple[tuple, tuple, int] | None:
    """``(sizes, strides, offset)`` such that ``t.as_strided(sizes, strides,
    t.storage_offset() + offset)`` is the ``(groups, g_dim, a_dim − bias)`` weight block of
    weight-shaped ``t`` in the helper's layout, or None if no strided view gives it.

    The helper's own ``grad_matrix`` is applied to the storage offsets of ``t``'s elements,
    so any layout the helper defines (an Embedding's transposed block, a channels-last
    convolution weight) is found without knowing the module type."""
    offsets = torch.zeros((), dtype=torch.int64)
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride(), strict=True)):
        shape = [1] * t.dim()
        shape[dim] = size
        offsets = offsets + (torch.arange(size, dtype=torch.int64) * stride).view(shape)
    matrix = layer.grad_matrix({layer.weight: offsets.expand(t.shape)})
    if layer.bias is not None:
        matrix = matrix[..., :-1]
    if matrix.numel() == 0:
        return None
    base = int(matrix[0, 0, 0])
    strides = tuple(
        int(matrix.select(d, 1).flatten()[0]) - base if matrix.shape[d] > 1 else 0 for d in range(3)
    )
    grid = base + sum(
        torch.arange(n, dtype=torch.int64).view([-1 if i == d else 1 for i in range(3)]) * s
        for d, (n, s) in enumerate(zip(matrix.shape, strides, strict=True))
    )
    if not torch.equal(matrix, grid.expand(matrix.shape)):
        return None
    return tuple(matrix.shape), strides, base


class _WeightBlock:
    """A Kronecker layer's weight as its ``(groups, g_dim, a_dim − bias)`` block."""

    def __init__(self, layer: LayerHelper) -> None:
        self.layer = layer
        self._layouts: dict[tuple, tuple[tuple, tuple, int] | None] = {}

    def view(self, t: Tensor) -> Tensor | None:
        key = (tuple(t.shape), t.stride())
        if key not in self._layouts:
            self._layouts[key] = _block_strides(self.layer, t)
        layout = self._layouts[key]
        if layout is None:
            return None
        sizes, strides, offset = layout
        return t.as_strided(sizes, strides, t.storage_offset() + offset)

    def copy(self, t: Tensor) -> Tensor:
        matrix = self.layer.grad_matrix({self.layer.weight: t})
        return (matrix[..., :-1] if self.layer.bias is not None else matrix).contiguous()

    def write(self, t: Tensor, matrix: Tensor) -> None:
        if self.layer.bias is not None:
            matrix = torch.cat([matrix, matrix.new_zeros((*matrix.shape[:-1], 1))], dim=-1)
        t.copy_(self.layer.split_matrix(matrix)[self.layer.weight])


@dataclass
class _Target:
    """One parameter of a covered layer: its layout and where its diagonals come from."""

    layout: _WeightBlock | ColumnLayout
    layer: str
    # "kronecker": the columns of H this parameter owns; "blocks": the column of D
    columns: slice | int


class AdaFisher(CurvatureOptimizer):
    r"""AdaFisher (Gomes et al., 2024; https://arxiv.org/abs/2405.16397).

    For every parameter, every step (``t`` counts the parameter's steps):

    .. math::
        m \leftarrow \beta m + (1-\beta)(g + \kappa w), \qquad
        w \leftarrow w - \eta\, \frac{m / (1 - \beta^t)}{\tilde F}

    with ``F̃ = S Hᵀ + λ`` for the weight block of a Linear, convolution or Embedding
    layer (``S``, ``H``: min-max normalised, averaged diagonals of K-FAC's ``G`` and
    ``A``, refreshed every ``curvature_every`` steps), ``F̃ = D + λ`` for a normalisation
    layer's scale and shift (``D``: the normalised, averaged diagonal empirical Fisher),
    and ``F̃ = 1 + λ`` for every other parameter, with ``precondition=False`` and at steps
    where ``use_curvature`` is off. The estimator (:class:`AdaFisherEstimator`) gives ``D``,
    the ``"momentum"`` base update (:class:`~secondorder.base_updates.MomentumBase`)
    applies it. See :mod:`secondorder.estimators.adafisher` for the statistics, the
    constants and their sources. :class:`AdaFisherW` decouples the weight decay.

    Args:
        model (nn.Module): the network (not ``model.parameters()``).
        lr (float, optional): learning rate η (default: 0.03; the paper's is 1e-3).
        params (iterable, optional): parameters or param-group dicts of ``model``
            (default: all its parameters that require grad). Groups may set ``lr``,
            ``beta`` (or ``betas``) and ``weight_decay``.
        config (AdaFisherConfig, optional): see :class:`~secondorder.CurvatureOptimizer`.

    **Schedulers.** Each param group holds β twice: as ``beta`` and as ``betas = (beta,)``,
    the form that schedulers cycling the momentum of Adam-style optimizers write
    (``OneCycleLR`` / ``CyclicLR`` with ``cycle_momentum=True`` set ``betas[0]``). Every
    step reads the group's β afresh: whichever of the two was changed since the last step
    is copied to the other (changing both to different values raises ``ValueError``).
    A state dict saved before ``betas`` existed loads (``betas`` is rebuilt from ``beta``).

    Attributes:
        uncovered_parameters (list[str]): parameters updated with ``F̃ = 1 + λ``.

    Example::

        opt = AdaFisher(model, lr=1e-3)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    """

    config_class = AdaFisherConfig

    estimator_class = AdaFisherEstimator


@dataclass(kw_only=True)
class AdaFisherWConfig(AdaFisherConfig):
    """:class:`AdaFisherConfig` with decoupled weight decay (:class:`AdaFisherW`)."""

    weight_decay: float = hyperparameter(
        0.0, "κ, decoupled weight decay ``w ← w − η κ w`` (as AdamW)"
    )
    decoupled_weight_decay: bool = fixed(True)


class AdaFisherW(AdaFisher):
    r"""AdaFisherW: :class:`AdaFisher` with decoupled weight decay (as AdamW),

    .. math::
        m \leftarrow \beta m + (1-\beta) g, \qquad
        w \leftarrow w - \eta \left(\frac{m / (1 - \beta^t)}{\tilde F} + \kappa w\right).

    Arguments as for :class:`AdaFisher`; ``weight_decay`` is κ (default: 0).
    """

    config_class = AdaFisherWConfig
