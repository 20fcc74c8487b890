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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._host import to_host
from ..capture import SkipPattern
from ..distributed import stat_field
from ..kernels import adafisher_update
from ..layers import BlockHelper, LayerHelper
from ..optimizer import CurvatureOptimizer, Interval, Schedule, check_number
from .base import CurvatureEstimator

_FACTOR_DTYPES = (torch.float32, torch.float64)


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(kw_only=True)
class AdaFisherConfig:
    """Hyperparameters of the AdaFisher estimator (checked on construction).

    Args:
        gamma (float or tuple[float, float]): the average of the normalised diagonals.
            A number ``γ`` in [0, 1): ``D ← γ D + (1 − γ) D̂`` (the paper's form). A pair
            ``(γ₁, γ₂)`` of finite numbers, ``γ₁ >= 0``, ``γ₂ > 0``: ``D ← γ₁ D + γ₂ D̂``
            (``(0.08, 0.008)`` is the reference code's) (default: 0.8).
        factor_dtype (torch.dtype): dtype of the statistics and diagonals, float32 or
            float64 (default: float32).
    """

    gamma: float | tuple[float, float] = 0.8
    factor_dtype: torch.dtype = torch.float32
    #: ``(γ₁, γ₂)``, derived from ``gamma``
    ema_weights: tuple[float, float] = field(init=False)

    def __post_init__(self) -> None:
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

    The optimizer applies them in its fused update (:class:`AdaFisher`): AdaFisher
    preconditions the first moment, not the gradient, so :meth:`precondition` leaves the
    gradient to the optimizer (it returns ``{}``). :meth:`fisher` gives ``F̃`` itself.

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
        #: layer updates dropped because their statistics were not finite
        self.nonfinite_updates = 0

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

    def precondition(self, grads: Mapping[Tensor, Tensor], damping: float) -> dict[Tensor, Tensor]:
        """``{}``: AdaFisher divides the bias-corrected *first moment* by ``F̃`` (in
        :class:`AdaFisher`'s fused update), so the gradient goes to the update as it is."""
        return {}

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


class _Column:
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
class _Target:
    """One parameter of a covered layer: its layout and where its diagonals come from."""

    layout: _WeightBlock | _Column
    layer: str
    # "kronecker": the columns of H this parameter owns; "blocks": the column of D
    columns: slice | int


def _check_beta(beta: Any) -> float:
    beta = check_number("beta", beta, high=1.0)
    if beta >= 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    return beta


def _check_betas(betas: Any, beta: Any = None) -> None:
    """``betas`` must be ``(β,)`` (AdaFisher has one decay), equal to ``beta`` if given."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == 1):
        raise ValueError(
            f"betas must be (beta,): AdaFisher has one decay, that of the first moment; "
            f"got {betas!r}"
        )
    _check_beta(betas[0])
    if beta is not None and betas[0] != beta:
        raise ValueError(
            f"a param group sets beta={beta!r} and betas={tuple(betas)!r}: they are the same "
            "decay, set one of them"
        )


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
    and ``F̃ = 1 + λ`` for every other parameter. See :mod:`secondorder.estimators.adafisher`
    for the statistics, the constants and their sources. :class:`AdaFisherW` decouples the
    weight decay.

    Args:
        model (nn.Module): the network (not ``model.parameters()``).
        lr (float, optional): learning rate η (default: 1e-3, the paper's).
        beta (float, optional): decay β of the first moment, in [0, 1) (default: 0.9).
        damping (float or callable, optional): λ, > 0, or a function of the step returning
            it (default: 1e-3, the paper's).
        gamma (float or tuple[float, float], optional): averaging of the normalised
            diagonals, ``γ`` (``D ← γ D + (1 − γ) D̂``) or ``(γ₁, γ₂)``
            (``D ← γ₁ D + γ₂ D̂``; ``(0.08, 0.008)`` reproduces the reference code)
            (default: 0.8, the paper's).
        curvature_every (int or callable, optional): steps between updates of the
            diagonals, the paper's ``T_cov`` (default: 100, the paper's).
        weight_decay (float, optional): κ, L2 decay added to the gradient before the
            first moment (default: 0; the paper's training recipes use 5e-4, a choice of
            the experiment rather than of the optimizer).
        factor_dtype (torch.dtype, optional): dtype of the diagonals, float32 or float64
            (default: float32).
        params (iterable, optional): parameters or param-group dicts of ``model``
            (default: all its parameters that require grad). Groups may set ``lr``,
            ``beta`` (or ``betas``) and ``weight_decay``.
        skip_layers, layer_options, record_in_eval, nonfinite, fisher_type, likelihood,
            likelihood_sigma, precondition, use_curvature, distributed, process_group,
            grad_scaler: as for :class:`~secondorder.CurvatureOptimizer`.
            With ``precondition=False`` every parameter takes the ``F̃ = 1 + λ`` update.

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

    #: AdaFisherW's decoupled weight decay ``w ← w − η κ w``
    decoupled: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        *,
        beta: float = 0.9,
        damping: Schedule = 1e-3,
        gamma: float | tuple[float, float] = 0.8,
        curvature_every: Interval = 100,
        weight_decay: float = 0.0,
        factor_dtype: torch.dtype = torch.float32,
        params: Iterable[Any] | None = None,
        skip_layers: Iterable[SkipPattern] | None = None,
        layer_options: Mapping[str, Any] | None = None,
        record_in_eval: bool = False,
        nonfinite: str = "skip",
        fisher_type: str = "empirical",
        likelihood: str | None = None,
        likelihood_sigma: float | None = None,
        precondition: bool = True,
        use_curvature: Any = None,
        distributed: bool | None = None,
        process_group: Any = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        config = AdaFisherConfig(gamma=gamma, factor_dtype=factor_dtype)
        super().__init__(
            model,
            lambda layers, params: AdaFisherEstimator(layers, config),
            params=params,
            lr=lr,
            # The label the base class's warning about uncovered parameters shows: they
            # get the bias-corrected momentum update with F̃ = 1 + λ.
            base="momentum",
            momentum=beta,
            weight_decay=weight_decay,
            decoupled_weight_decay=self.decoupled,
            damping=damping,
            curvature_every=curvature_every,
            inverse_every=1,
            kl_clip=None,
            skip_layers=skip_layers,
            layer_options=layer_options,
            record_in_eval=record_in_eval,
            nonfinite=nonfinite,
            fisher_type=fisher_type,
            likelihood=likelihood,
            likelihood_sigma=likelihood_sigma,
            precondition=precondition,
            use_curvature=use_curvature,
            distributed=distributed,
            process_group=process_group,
            grad_scaler=grad_scaler,
        )
        self._targets: dict[Tensor, _Target] = {}
        for layer in [] if self.estimator is None else self.estimator.layers:
            self._add_targets(layer)
        self._factor_dtype = config.factor_dtype
        self._ones: dict[torch.device, Tensor] = {}

    # ---- construction -------------------------------------------------------------------
    def _base_defaults(
        self,
        base: str,
        lr: float,
        momentum: float | None,
        dampening: float,
        nesterov: bool,
        betas: tuple[float, float] | None,
        eps: float | None,
        weight_decay: float,
    ) -> dict[str, Any]:
        return {"lr": lr, "beta": momentum, "betas": (momentum,), "weight_decay": weight_decay}

    @staticmethod
    def _check_group(group: dict[str, Any], base: str) -> None:
        check_number("lr", group["lr"])
        check_number("weight_decay", group["weight_decay"])
        _check_beta(group["beta"])
        _check_betas(group["betas"], group["beta"])
        for p in group["params"]:
            if p.is_sparse:
                raise ValueError("sparse parameters are not supported")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``; a group that sets one of ``beta`` and
        ``betas`` gets the other from it rather than from the defaults."""
        group = dict(param_group)
        if "betas" in group and "beta" not in group:
            _check_betas(group["betas"])
            group["beta"] = group["betas"][0]
        elif "beta" in group and "betas" not in group:
            group["betas"] = (group["beta"],)
        super().add_param_group(group)
        self._synced_betas()[id(self.param_groups[-1])] = self.param_groups[-1]["beta"]

    def _synced_betas(self) -> dict[int, Any]:
        """The β of each param group (by ``id``) as of its creation or its last step."""
        if "_synced_beta" not in self.__dict__:  # add_param_group runs inside __init__
            self._synced_beta: dict[int, Any] = {}
        return self._synced_beta

    def _group_beta(self, group: dict[str, Any]) -> float:
        """The group's β, with ``beta`` and ``betas[0]`` made equal again: the one that
        changed since the last step (a scheduler writes ``betas``) wins."""
        seen = self._synced_betas()
        beta, betas = group["beta"], group["betas"]
        _check_betas(betas)
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

    def state_dict(self) -> dict[str, Any]:
        for group in self.param_groups:  # a scheduler's pending change is saved in both
            self._group_beta(group)
        return super().state_dict()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        seen = self._synced_betas()  # kept: a rejected load puts the old groups back
        for group in self.param_groups:
            if "betas" not in group:  # saved before AdaFisher had betas
                group["betas"] = (group["beta"],)
            _check_betas(group["betas"], group["beta"])
            seen[id(group)] = group["beta"]

    def _estimator_replaced(self) -> None:
        # layers left to the base update (hooks that never ran) lose their targets
        self._targets = {}
        for layer in self.estimator.layers:
            self._add_targets(layer)

    def _add_targets(self, layer: Any) -> None:
        if layer.kind == "blocks":
            shape = (layer.block_count, 1)
            self._targets[layer.weight] = _Target(_Column(shape), layer.name, 0)
            if layer.bias is not None:
                self._targets[layer.bias] = _Target(_Column(shape), layer.name, 1)
            return
        cols = layer.a_dim - int(layer.has_bias)
        self._targets[layer.weight] = _Target(_WeightBlock(layer), layer.name, slice(0, cols))
        if layer.bias is not None:
            shape = (layer.groups, layer.g_dim, 1)
            self._targets[layer.bias] = _Target(_Column(shape), layer.name, slice(cols, None))

    # ---- the update ---------------------------------------------------------------------
    def _one(self, device: torch.device) -> Tensor:
        if device not in self._ones:
            self._ones[device] = torch.ones(1, device=device, dtype=self._factor_dtype)
        return self._ones[device]

    def _diagonals(self, p: Tensor, target: _Target | None) -> tuple[Any, Tensor, Tensor]:
        """``(layout, s_diag, h_diag)`` of parameter ``p`` for the fused update."""
        one = self._one(p.device)
        if target is None or not self.curvature_on():  # uncovered or off: F̃ = 1·1 + λ
            return _Column((p.numel(), 1)), one.expand(p.numel()), one
        first, second = self.estimator.diagonals(target.layer)
        if second is None:  # a normalisation layer: F̃ = D[:, column]·1 + λ
            return target.layout, first[:, target.columns], one
        return target.layout, first, second[..., target.columns]

    def _base_step(
        self, group: dict[str, Any], directions: Mapping[Tensor, Tensor], skip_l2: bool = False
    ) -> None:
        lr, beta, weight_decay = group["lr"], self._group_beta(group), group["weight_decay"]
        damping = self.current_damping()
        for p in group["params"]:
            grad = directions.get(p)
            if grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            bias_correction = 1.0 - beta ** state["step"].item()
            layout, s_diag, h_diag = self._diagonals(p, self._targets.get(p))
            exp_avg = state["exp_avg"]
            kwargs = {
                "lr": lr,
                "beta": beta,
                "bias_correction": bias_correction,
                "damping": damping,
                "weight_decay": weight_decay,
                "decoupled": self.decoupled_weight_decay,
            }
            g = layout.view(grad)
            if g is None:
                g = layout.copy(grad)
            w, m = layout.view(p), layout.view(exp_avg)
            if w is not None and m is not None:
                adafisher_update(w, g, m, s_diag, h_diag, **kwargs)
                continue
            # no strided view of the parameter in the block layout: update copies
            w, m = layout.copy(p), layout.copy(exp_avg)
            adafisher_update(w, g, m, s_diag, h_diag, **kwargs)
            layout.write(p, w)
            layout.write(exp_avg, m)


class AdaFisherW(AdaFisher):
    r"""AdaFisherW: :class:`AdaFisher` with decoupled weight decay (as AdamW),

    .. math::
        m \leftarrow \beta m + (1-\beta) g, \qquad
        w \leftarrow w - \eta \left(\frac{m / (1 - \beta^t)}{\tilde F} + \kappa w\right).

    Arguments as for :class:`AdaFisher`; ``weight_decay`` is κ (default: 0).
    """

    decoupled = True
