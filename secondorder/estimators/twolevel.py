r"""Two-level K-FAC (Tselepidis, Kohler & Orvieto, 2020, "Two-Level K-FAC Preconditioning
for Deep Learning", https://arxiv.org/abs/2011.00573).

K-FAC's block-diagonal inverse ignores the curvature *between* layers. The two-level
method adds a coarse-space correction, as in two-level domain decomposition
(additive Schwarz):

.. math::
    P = \omega_1 P_{\text{KFAC}} + \omega_2 R_0^\top (R_0 F R_0^\top + \lambda_c I)^{-1} R_0

* ``P_KFAC`` is :class:`~secondorder.estimators.kfac.KFACEstimator`'s preconditioner
  (``(A_ii ⊗ G_ii + λ I)⁻¹`` per layer, with its damping conventions).
* ``R_0`` is ``L x D``: one indicator row per layer of the coarse space, 1 on every
  coordinate of that layer (weight and bias together), 0 elsewhere. ``R_0 g`` is the
  vector of per-layer gradient sums; ``R_0ᵀ c`` broadcasts the scalar ``c_l`` over every
  coordinate of layer ``l``.
* ``F`` is the block Kronecker approximation of the Fisher *with* the cross-layer
  blocks: ``F_ij = A_ij ⊗ G_ij``, ``A_ij = E_rows[ã_i ã_jᵀ]`` (a mean over rows, as K-FAC's
  ``A``) and ``G_ij = n Σ_rows g_i g_jᵀ`` (``n`` the number of examples, as K-FAC's ``G``).
  Then ``(R_0 F R_0ᵀ)_ij = (1ᵀA_ij 1)(1ᵀG_ij 1) = E_rows[s^a_i s^a_j] · n Σ_rows s^g_i s^g_j``
  with ``s^a`` the row sum of ``ã`` (the bias column's 1 included) and ``s^g`` the row
  sum of ``g``: the ``L x L`` coarse matrix needs only two scalars per row and layer.

**Which layers.** The coarse space holds the Kronecker layers with a full ``A``
(Linear, convolutions). Other covered layers (an Embedding's diagonal ``A``, the
block normalisation layers) get ``ω_1`` times their K-FAC block preconditioner
and no coarse correction. A layer with no K-FAC direction at a step (no statistics
yet, or no gradient) is left out of the coarse correction at that step: the correction
is then ``R_Tᵀ (R_T F R_Tᵀ + λ_c I)⁻¹ R_T g`` over the layers ``T`` that have one.

**Grouped convolutions.** K-FAC treats the ``groups`` blocks of a grouped convolution as
independent; the coarse row of the layer is still one indicator over *all* its groups.
Each (layer, group) is a Kronecker unit ``u`` with row sums ``s^a_u``, ``s^g_u`` of its
own block (its bias column included), and ``F`` is taken with the blocks
``A_uv ⊗ G_uv`` between *every* pair of units, including two groups of the same layer
(those K-FAC drops; the coarse matrix keeps them, like the cross-layer blocks, which
also keeps it positive semi-definite). So
``(R_0 F R_0ᵀ)_ij = Σ_{u ∈ i, v ∈ j} E_rows[s^a_u s^a_v] · n Σ_rows s^g_u s^g_v``.

**Rows of different layers.** ``A_ij`` pairs row ``r`` of layer ``i`` with row ``r`` of
layer ``j``, so the layers must share their rows. When they do (an MLP with one row
per example; Linear layers on the tokens of the same sequences; convolutions with the
same output grid) the coarse matrix is exactly
``R_0 F R_0ᵀ``. Otherwise, as in the paper, each layer's per-position row sums are
resized to a common grid before the products:

* the grid of a layer is its output's spatial shape for convolutions (the helper's
  ``spatial_dims``) and ``(rows per example,)`` otherwise (one row per example gives
  ``(1,)``; the tokens of a sequence are a 1-D grid). Grids of different rank are
  aligned by prepending sizes of 1 (``(T,)`` is ``(1, T)`` next to ``(H, W)``);
* the common grid is the elementwise minimum of the layers' grids (the smallest grid);
* ``coarse_pooling="area"``: adaptive average pooling per dimension, output cell
  ``o`` averaging input positions ``⌊o·in/out⌋ .. ⌈(o+1)·in/out⌉ - 1`` (as
  ``torch.nn.functional.adaptive_avg_pool2d``); ``"nearest"``: position ``⌊o·in/out⌋``
  per dimension (as ``interpolate(mode="nearest")``);
* ``s^a`` is pooled as is (``A`` averages rows) and ``s^g`` pooled then multiplied by
  ``R / P`` (``R`` the layer's positions, ``P`` the common grid's): ``G`` sums over
  positions, and the scale keeps the per-example total (exactly the sum over each
  cell for area pooling with divisible sizes). Pooled to one position this is
  :class:`~secondorder.layers.LinearHelper`'s ``"reduce"`` convention: the mean of
  ``ã`` and the sum of ``g`` over the positions of an example;
* then ``E_rows`` and ``Σ_rows`` run over the ``n·P`` pooled rows.

**Statistics.** ``accumulate`` keeps, per layer and per recorded backward pass, the
unpooled row sums ``(n, groups, positions)``; ``update`` (once per curvature step,
after all passes) pools and pairs them. The ``k``-th recorded pass of a layer is paired
with the ``k``-th of every other: this assumes that every covered layer runs once per
recorded forward pass and that passes are back-propagated in the order they ran
(gradient accumulation: forward, backward, forward, backward, ...). A layer whose
passes do not fit — it ran several times in one forward (tied weights, a reused
module), missed a pass (eval mode), or saw batch sizes unlike the majority's — is
excluded from the coarse update that step, as is a layer with non-finite sums. The
``L x L`` matrix is an exponential moving average with K-FAC's ``factor_decay`` and
ramp, entry by entry: ``(i, j)`` is updated only at steps where both layers took part,
with decay ``min(1 - 1/(k+1), factor_decay)`` after ``k`` joint updates (when every
layer takes part at every step, which is the usual case, this is one ordinary EMA and
stays positive semi-definite). With gradient accumulation the sums of products run
over all passes and ``n`` is the total number of examples, as for K-FAC's factors.

**Inverse.** At every refresh (with K-FAC's inverses) ``(F_c + λ_c I)⁻¹`` is computed in
float64 by Cholesky (``L`` is small) over the layers that have coarse statistics, with
``λ_c = coarse_damping`` or, when None, the damping at that refresh.

**Weights and damping in practice.** ``ω_1 = ω_2 = 1`` by default: the paper's additive
two-level preconditioner ``P_KFAC + R_0ᵀ(R_0 F R_0ᵀ)⁻¹R_0``. The coarse step of a layer is
one value on each of its coordinates, so a coarse matrix from the first steps (small
curvature at initialisation) kept for ``inverse_every`` steps can throw a whole layer
far off; a ``coarse_damping`` of the order of the coarse matrix's diagonal avoids this
(10 on the digits bench, where ``coarse_damping = damping = 0.1`` saturated an MLP).
With a softmax cross-entropy loss the output layer's gradient rows sum to zero
(``Σ_c (p_c - y_c) = 0``), so its coarse row and its gradient sum vanish: the
correction acts on the hidden layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from .._checks import check_number
from ..config import hyperparameter
from ..layers import KroneckerHelper, LayerHelper
from ..linalg import damped_inverse_cholesky
from ..optimizer import CurvatureOptimizer
from .kfac import KFACConfig, KFACEstimator

_POOLINGS = ("area", "nearest")


@dataclass(kw_only=True)
class TwoLevelKFACConfig(KFACConfig):
    """Hyperparameters of two-level K-FAC (:class:`TwoLevelKFAC` and
    :class:`TwoLevelKFACEstimator`), checked on construction: K-FAC's
    (:class:`~secondorder.estimators.kfac.KFACConfig`; ``factor_decay`` also averages the
    coarse matrix, ``kl_clip`` clips the combined direction) and the coarse level's."""

    w1: float = hyperparameter(
        1.0,
        "ω1 >= 0, weight of the K-FAC direction; with 0 the step is the coarse correction "
        "alone and layers outside the coarse space do not move",
    )
    w2: float = hyperparameter(
        1.0,
        "ω2 >= 0, weight of the coarse correction (1: the paper's additive two-level "
        "preconditioner ``P_KFAC + R_0ᵀ(...)⁻¹R_0``; 0: plain K-FAC)",
    )
    coarse_damping: float | None = hyperparameter(
        10.0,
        "λ_c > 0 added to the coarse matrix; None uses the damping at each refresh. 10 (the "
        "bench's tuned value) by measurement: with λ_c = λ = 1e-3 the coarse step of an "
        "early refresh moves whole layers too far (no lr reached the target on digits-ae and "
        "char-gpt-generated; see docs/twolevel.md)",
    )
    coarse_pooling: str = hyperparameter(
        "area",
        '``"area"`` or ``"nearest"``: how layers with different numbers of positions are '
        "brought to a common grid",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.w1 = check_number("w1", self.w1)
        self.w2 = check_number("w2", self.w2)
        if self.w1 == 0.0 and self.w2 == 0.0:
            raise ValueError("w1 and w2 must not both be 0 (the direction would be zero)")
        if self.coarse_damping is not None:
            self.coarse_damping = check_number("coarse_damping", self.coarse_damping, low_open=True)
        if self.coarse_pooling not in _POOLINGS:
            raise ValueError(
                f"coarse_pooling must be one of {_POOLINGS}, got {self.coarse_pooling!r}"
            )


@dataclass
class _PassSums:
    """Row sums of one layer in one recorded backward pass."""

    a: Tensor  # Σ_columns ã per row, (n, groups, positions)
    g: Tensor  # Σ_columns g per row, (n, groups, positions)
    grid: tuple[int, ...]  # the positions of one example as a grid (product = positions)


@dataclass
class TwoLevelStats:
    """A coarse-space layer's statistics between two curvature updates: K-FAC's
    (``kfac``) and the row sums of every recorded pass, in order (``passes``).

    ``examples`` reads and writes the K-FAC statistic's, so that the capture's count of
    examples (one per model forward pass) reaches K-FAC's ``G``; the value it writes is
    also kept to check that the layer ran once per forward pass. In a distributed run
    ``kfac`` is reduced across ranks with the other statistics; the passes stay local
    and their coarse sums are reduced by the coarse update.
    """

    kfac: Any = None
    passes: list[_PassSums] = field(default_factory=list)
    #: the capture's count of examples (None until it says)
    model_examples: int | None = None

    @property
    def examples(self) -> int:
        return int(getattr(self.kfac, "examples", sum(p.a.shape[0] for p in self.passes)))

    @examples.setter
    def examples(self, value: int) -> None:
        self.model_examples = int(value)
        if hasattr(self.kfac, "examples"):
            self.kfac.examples = value

    @property
    def once_per_forward(self) -> bool:
        """Whether every recorded pass is a distinct model forward pass."""
        passed = sum(p.a.shape[0] for p in self.passes)
        return self.model_examples is None or self.model_examples == passed


_ADAPTIVE_AVG_POOL = {
    1: torch.nn.functional.adaptive_avg_pool1d,
    2: torch.nn.functional.adaptive_avg_pool2d,
    3: torch.nn.functional.adaptive_avg_pool3d,
}


def _area_matrix(size_in: int, size_out: int, dtype: torch.dtype) -> Tensor:
    """``(size_out, size_in)``: cell ``o`` averages ``⌊o·in/out⌋ .. ⌈(o+1)·in/out⌉ - 1``."""
    out = torch.arange(size_out)[:, None]
    pos = torch.arange(size_in)[None, :]
    start = out * size_in // size_out
    end = -((-(out + 1) * size_in) // size_out)
    cell = ((pos >= start) & (pos < end)).to(dtype)
    return cell / cell.sum(dim=1, keepdim=True)


def _pool(sums: Tensor, grid: tuple[int, ...], target: tuple[int, ...], mode: str) -> Tensor:
    """Resize ``(n, groups, prod(grid))`` to ``(n, groups, prod(target))`` (``target`` no
    larger than ``grid`` in any dimension; see the module docstring)."""
    n, groups = sums.shape[:2]
    grid = (1,) * (len(target) - len(grid)) + grid
    if grid == target:
        return sums
    if all(size == 1 for size in target):  # one cell: the mean, or the first position
        return sums.mean(dim=2, keepdim=True) if mode == "area" else sums[:, :, :1]
    x = sums.reshape(n, groups, *grid)
    if mode == "area" and len(grid) in _ADAPTIVE_AVG_POOL:
        return _ADAPTIVE_AVG_POOL[len(grid)](x, target).reshape(n, groups, -1)
    for d, (size_in, size_out) in enumerate(zip(grid, target, strict=True)):
        if size_in == size_out:
            continue
        if mode == "nearest":
            index = torch.arange(size_out, device=x.device) * size_in // size_out
            x = x.index_select(2 + d, index)
        else:
            m = _area_matrix(size_in, size_out, x.dtype).to(x.device)
            x = torch.movedim(torch.tensordot(x, m, dims=([2 + d], [1])), -1, 2 + d)
    return x.reshape(n, groups, -1)


class TwoLevelKFACEstimator(KFACEstimator):
    """K-FAC plus the two-level coarse-space correction (see the module docstring).

    Args:
        layers (Sequence[LayerHelper]): the covered layers.
        config (TwoLevelKFACConfig, optional): hyperparameters
            (default: ``TwoLevelKFACConfig()``).

    Attributes:
        coarse_layers (list[LayerHelper]): the layers of the coarse space, in the order
            of the rows and columns of :meth:`coarse_matrix` (empty when ``w2 = 0``).
        nonfinite_coarse_updates (int): layer updates of the coarse matrix dropped
            because their statistics were not finite.
    """

    config: TwoLevelKFACConfig
    #: the coarse sums pair every example's rows across layers and check that a layer saw
    #: each example of a pass once: a subset of the examples would drop them silently
    supports_statistics_subsampling = False

    def __init__(
        self, layers: Sequence[LayerHelper], config: TwoLevelKFACConfig | None = None
    ) -> None:
        config = config if config is not None else TwoLevelKFACConfig()
        super().__init__(layers, config)
        self.coarse_layers = [
            layer
            for layer in self.layers
            if config.w2 != 0.0 and isinstance(layer, KroneckerHelper) and not layer.a_diagonal
        ]
        self._coarse_index = {layer.name: i for i, layer in enumerate(self.coarse_layers)}
        size = len(self.coarse_layers)
        self._coarse: Tensor | None = None  # EMA of R0 F R0ᵀ, (L, L) float64
        self._coarse_updates = torch.zeros(size, size, dtype=torch.long)  # joint updates
        # The matrix, damping and layers the current coarse inverse came from (saved by
        # state_dict so that a resumed run recomputes bit-for-bit the same inverse).
        self._coarse_source: Tensor | None = None
        self._coarse_refresh_damping: float | None = None
        self._coarse_active: list[int] = []
        self._coarse_inverse: Tensor | None = None
        self.nonfinite_coarse_updates = 0

    # ---- statistics ---------------------------------------------------------------------
    def accumulate(self, layer: LayerHelper, inputs: Tensor, grad_output: Tensor, acc: Any) -> Any:
        # `layer` may be a tied module's helper (its name differs from the primary's);
        # tied helpers have the primary's type, so the type tells coarse membership.
        if not (self.coarse_layers and isinstance(layer, KroneckerHelper) and not layer.a_diagonal):
            return super().accumulate(layer, inputs, grad_output, acc)
        if acc is None:
            acc = TwoLevelStats()
        # one im2col for both the K-FAC factors and the row sums
        a_rows, g_rows = layer.a_rows(inputs), layer.g_rows(grad_output)
        n = layer.batch_size(inputs)
        acc.kfac = self._accumulate_rows(layer, a_rows, g_rows, acc.kfac)
        acc.kfac.examples += n
        dtype = self.config.stat_dtype
        a = torch.sum(a_rows, dim=-1, dtype=dtype)  # (groups, rows)
        g = torch.sum(g_rows, dim=-1, dtype=dtype)
        rows = a.shape[1]
        if n == 0 or rows % n:
            return acc  # cannot split rows by example: no coarse statistics from this pass
        positions = rows // n
        spatial = layer.spatial_dims
        grid = tuple(grad_output.shape[-spatial:]) if spatial else ()
        if math.prod(grid) != positions or not grid:
            grid = (positions,)
        a = rearrange(a, "x (n p) -> n x p", n=n)
        g = rearrange(g, "x (n p) -> n x p", n=n)
        acc.passes.append(_PassSums(a=a, g=g, grid=grid))
        return acc

    def update(self, stats: Mapping[str, Any]) -> None:
        coarse = {name: acc for name, acc in stats.items() if isinstance(acc, TwoLevelStats)}
        super().update({name: acc.kfac if name in coarse else acc for name, acc in stats.items()})
        if coarse or (self.comm is not None and self.coarse_layers):
            self._update_coarse(coarse)  # collective in a distributed run

    def _coarse_candidates(self, coarse: Mapping[str, TwoLevelStats]) -> list[int]:
        """Coarse indices of the layers whose passes can be paired (module docstring)."""
        fit = [
            (self._coarse_index[name], tuple(p.a.shape[0] for p in acc.passes))
            for name, acc in coarse.items()
            if name in self._coarse_index and acc.passes and acc.once_per_forward
        ]
        if not fit:
            return []
        # the batch sizes of the passes that most layers share (first layer's on a tie)
        fit.sort()
        signatures = [sig for _, sig in fit]
        common = max(signatures, key=signatures.count)
        return [i for i, sig in fit if sig == common]

    def _coarse_statistics(self, coarse: Mapping[str, TwoLevelStats], indices: list[int]) -> Tensor:
        """The coarse matrix ``R_0 F R_0ᵀ`` (float64) of one curvature step over the
        layers ``indices`` (coarse indices, see :attr:`coarse_layers`) from their
        :class:`TwoLevelStats`: pooled to the common grid of every pass, paired by pass.
        In a distributed run the sums behind it are those of every rank."""
        a_prod, g_prod, rows, examples = self._coarse_sums(coarse, indices)
        if self.comm is not None:
            a_prod, g_prod, rows, examples = self.comm.reduce_sums(a_prod, g_prod, rows, examples)
        units = (a_prod / rows) * (g_prod * examples)  # (1ᵀA_uv 1)(1ᵀG_uv 1) per unit pair
        # R_0 over units: the indicator of each unit's layer
        groups = torch.tensor([self.coarse_layers[i].groups for i in indices])
        layer_of_unit = torch.repeat_interleave(torch.arange(len(indices)), groups)
        r0 = torch.nn.functional.one_hot(layer_of_unit, len(indices)).to(units)
        return r0.T @ units @ r0

    def _coarse_sums(
        self, coarse: Mapping[str, TwoLevelStats], indices: list[int]
    ) -> tuple[Tensor, Tensor, int, int]:
        """``(Σ s^a_u s^a_v, Σ s^g_u s^g_v, rows, examples)`` over this process's pooled
        rows: the additive parts of :meth:`_coarse_statistics`."""
        accs = [coarse[self.coarse_layers[i].name] for i in indices]
        mode = self.config.coarse_pooling
        a_prod = g_prod = None
        rows = 0
        for k in range(len(accs[0].passes)):
            passes = [acc.passes[k] for acc in accs]
            rank = max(len(p.grid) for p in passes)
            grids = [(1,) * (rank - len(p.grid)) + p.grid for p in passes]
            target = tuple(min(sizes) for sizes in zip(*grids, strict=True))
            size = math.prod(target)
            a = torch.cat([_pool(p.a, p.grid, target, mode) for p in passes], dim=1)
            g = torch.cat(
                [_pool(p.g, p.grid, target, mode) * (math.prod(p.grid) / size) for p in passes],
                dim=1,
            )
            a, g = a.to(torch.float64), g.to(torch.float64)
            a_k = torch.einsum("nup,nvp->uv", a, a)
            g_k = torch.einsum("nup,nvp->uv", g, g)
            a_prod = a_k if a_prod is None else a_prod + a_k
            g_prod = g_k if g_prod is None else g_prod + g_k
            rows += a.shape[0] * size
        examples = sum(p.a.shape[0] for p in accs[0].passes)
        return a_prod, g_prod, rows, examples

    def _update_coarse(self, coarse: Mapping[str, TwoLevelStats]) -> None:
        indices = self._coarse_candidates(coarse)
        if self.comm is not None:  # the layers that fit on every rank
            indices = self.comm.common_indices(indices, len(self.coarse_layers))
        if not indices:
            return
        fresh = self._coarse_statistics(coarse, indices)
        # One host sync: keep the layers whose entries are finite (an entry (i, j) depends
        # only on layers i and j), dropping the worst offender until the rest is clean.
        finite = torch.isfinite(fresh).cpu()
        keep = list(range(len(indices)))
        while keep and not bool(finite[keep][:, keep].all()):
            bad = (~finite[keep][:, keep]).sum(dim=1)
            keep.pop(int(bad.argmax()))
        self.nonfinite_coarse_updates += len(indices) - len(keep)
        if not keep:
            return
        if len(keep) < len(indices):
            fresh = fresh[keep][:, keep]
            indices = [indices[i] for i in keep]
        size = len(self.coarse_layers)
        if self._coarse is None:
            self._coarse = fresh.new_zeros(size, size)
        everyone = len(indices) == size  # the usual case: no indexing needed
        idx = torch.tensor(indices)
        rows, cols = idx[:, None], idx[None, :]
        counts = self._coarse_updates if everyone else self._coarse_updates[rows, cols]
        # K-FAC's ramp, per entry: the first joint update sets the entry
        decay = (1.0 - 1.0 / (counts.to(torch.float64) + 1.0)).clamp(max=self.config.factor_decay)
        rows_d, cols_d = rows.to(fresh.device), cols.to(fresh.device)
        old = self._coarse if everyone else self._coarse[rows_d, cols_d]
        new = torch.where(
            (counts == 0).to(fresh.device), fresh, torch.lerp(fresh, old, decay.to(fresh))
        )
        # Out of place on purpose: `_coarse_source` may reference the current matrix.
        if everyone:
            self._coarse = new
            self._coarse_updates = self._coarse_updates + 1
        else:
            matrix = self._coarse.clone()
            matrix[rows_d, cols_d] = new
            self._coarse = matrix
            updates = self._coarse_updates.clone()
            updates[rows, cols] += 1
            self._coarse_updates = updates

    def coarse_matrix(self) -> Tensor | None:
        """The current coarse matrix (EMA of ``R_0 F R_0ᵀ``, float64, rows and columns in
        the order of :attr:`coarse_layers`; zero where no statistics yet), or None."""
        return self._coarse

    # ---- inverses -----------------------------------------------------------------------
    def refresh(self, damping: float) -> None:
        super().refresh(damping)
        if self._coarse is None:
            return
        active = [i for i in range(len(self.coarse_layers)) if self._coarse_updates[i, i] > 0]
        lam = self.config.coarse_damping
        self._compute_coarse_inverse(self._coarse, active, damping if lam is None else lam)

    def _compute_coarse_inverse(self, matrix: Tensor, active: list[int], damping: float) -> None:
        idx = torch.tensor(active, device=matrix.device)
        self._coarse_inverse = damped_inverse_cholesky(matrix[idx][:, idx], damping, torch.float64)
        self._coarse_active = list(active)
        self._coarse_source = matrix
        self._coarse_refresh_damping = float(damping)

    # ---- preconditioning ----------------------------------------------------------------
    def precondition(self, grads: Mapping[Tensor, Tensor], damping: float) -> dict[Tensor, Tensor]:
        fine = super().precondition(grads, damping)
        w1, w2 = self.config.w1, self.config.w2
        out = fine if w1 == 1.0 else {p: u * w1 for p, u in fine.items()}
        if self._coarse_inverse is None:
            return out
        # the layers of the refreshed coarse space that have a K-FAC direction now
        present = [
            k for k, i in enumerate(self._coarse_active) if self.coarse_layers[i].weight in fine
        ]
        if not present:
            return out
        layers = [self.coarse_layers[self._coarse_active[k]] for k in present]
        r = torch.stack(
            [
                sum(torch.sum(grads[p], dtype=torch.float64) for p in layer.params if p in grads)
                for layer in layers
            ]
        )
        if len(present) == len(self._coarse_active):
            inverse = self._coarse_inverse
        else:
            idx = torch.tensor([self._coarse_active[k] for k in present])
            idx = idx.to(self._coarse_source.device)
            sub = self._coarse_source[idx][:, idx]
            inverse = damped_inverse_cholesky(sub, self._coarse_refresh_damping, torch.float64)
        c = (inverse @ r.to(inverse.device)) * w2
        for k, layer in enumerate(layers):
            for p in layer.params:
                if p in out:
                    out[p] = out[p] + c[k].to(device=out[p].device, dtype=out[p].dtype)
        return out

    # ---- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        coarse: dict[str, Any] = {
            "layers": [layer.name for layer in self.coarse_layers],
            "matrix": self._coarse,
            "updates": self._coarse_updates,
            "nonfinite_updates": self.nonfinite_coarse_updates,
        }
        if self._coarse_inverse is not None:
            coarse["refresh_damping"] = self._coarse_refresh_damping
            coarse["active"] = [self.coarse_layers[i].name for i in self._coarse_active]
            if self._coarse_source is not self._coarse:
                coarse["source_matrix"] = self._coarse_source
        state["coarse"] = coarse
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        coarse = state.get("coarse")
        names = [layer.name for layer in self.coarse_layers]
        if coarse is not None and list(coarse["layers"]) != names:
            raise ValueError(
                f"two-level K-FAC state has coarse layers {list(coarse['layers'])} where this "
                f"optimizer has {names}; was it saved from a different model (or w2)?"
            )
        super().load_state_dict(state)
        size = len(names)
        self._coarse = None
        self._coarse_updates = torch.zeros(size, size, dtype=torch.long)
        self._coarse_source = self._coarse_inverse = self._coarse_refresh_damping = None
        self._coarse_active = []
        self.nonfinite_coarse_updates = 0
        if coarse is None:
            return
        device = self.coarse_layers[0].weight.device if self.coarse_layers else None
        if coarse["matrix"] is not None:
            self._coarse = self._checked_coarse(coarse["matrix"], device)
        self._coarse_updates = self._checked_coarse(coarse["updates"], torch.device("cpu")).long()
        self.nonfinite_coarse_updates = int(coarse.get("nonfinite_updates", 0))
        if "refresh_damping" in coarse:
            source = coarse.get("source_matrix")
            source = self._coarse if source is None else self._checked_coarse(source, device)
            active = [self._coarse_index[name] for name in coarse["active"]]
            self._compute_coarse_inverse(source, active, coarse["refresh_damping"])

    def _checked_coarse(self, matrix: Tensor, device: torch.device | None) -> Tensor:
        size = len(self.coarse_layers)
        if tuple(matrix.shape) != (size, size):
            raise ValueError(
                f"two-level K-FAC state has a coarse matrix of shape {tuple(matrix.shape)} "
                f"where this optimizer needs {(size, size)}"
            )
        dtype = matrix.dtype if not matrix.is_floating_point() else torch.float64
        return matrix.to(device=device, dtype=dtype)


class TwoLevelKFAC(CurvatureOptimizer):
    r"""Two-level K-FAC (Tselepidis, Kohler & Orvieto, 2020;
    https://arxiv.org/abs/2011.00573): K-FAC plus a coarse-space correction that
    accounts for the curvature between layers.

    For the gradient ``g`` of the covered layers the base update receives

    .. math::
        u = \omega_1 (A \otimes G + \lambda I)^{-1} g
          + \omega_2 R_0^\top (R_0 F R_0^\top + \lambda_c I)^{-1} R_0 g

    with the K-FAC term per layer as in :class:`~secondorder.KFAC`, ``R_0`` one
    indicator row per Linear/convolution layer (weight and bias), and ``R_0 F R_0ᵀ``
    the ``L x L`` matrix of the block Kronecker Fisher with its cross-layer blocks
    ``A_ij ⊗ G_ij`` summed over each pair of layers: ``(1ᵀA_ij 1)(1ᵀG_ij 1)``. The
    coarse term adds one scalar per layer, the same on all its coordinates. Layers of
    different spatial sizes are paired on a common pooled grid; see
    :mod:`secondorder.estimators.twolevel` for exactly what is computed and when it
    is exact. Other covered layers (Embedding, normalisation) get ``ω_1`` times their
    K-FAC direction. ``w2=0`` is :class:`~secondorder.KFAC`.

    Args:
        model (nn.Module): the network (not ``model.parameters()``).
        lr (float, optional): learning rate (default: 1e-2).
        params, config: see :class:`~secondorder.CurvatureOptimizer`.

    Example::

        opt = TwoLevelKFAC(model, lr=0.02, damping=0.1, curvature_every=1, inverse_every=10)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    """

    config_class = TwoLevelKFACConfig

    estimator_class = TwoLevelKFACEstimator
