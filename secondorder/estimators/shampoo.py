"""Shampoo (Gupta, Koren & Singer, 2018, https://arxiv.org/abs/1802.09568), with the
blocking, grafting and damping of Distributed Shampoo (Shi et al., 2023,
https://arxiv.org/abs/2309.06497).

Every parameter with two dimensions or more is a matrix ``G`` (``m x n``: a conv weight
``(out, in, kh, kw)`` is ``(out, in·kh·kw)``), split into tiles of at most
``max_factor_dim`` rows and columns (contiguous ranges, the last one shorter). Each tile
keeps two statistics,

    L ← β₂ L + (1 − β₂) G Gᵀ,      R ← β₂ R + (1 − β₂) Gᵀ G      (β₂ = 1: L ← L + G Gᵀ)

and its preconditioned direction is

    u = L^{e_L} G R^{e_R},      L^{e} = Q diag((λ_i + ε)^{e}) Qᵀ,

with ``L = Q diag(λ) Qᵀ`` and ε the optimizer's ``damping``; ``e_L = e_R = −1/4`` is the
paper's. The roots are recomputed every ``inverse_every`` steps from eigendecompositions of
all the statistics, one batched call per size (:func:`~secondorder.linalg.symmetric_eigh_many`).
A side whose exponent is 0 is not preconditioned and keeps no statistic.

Parameters with fewer than two dimensions (biases, norms) get no direction: they take the
grafted method's step (``graft="adam"`` by default: Adam's own update) or, without grafting,
the base update on the raw gradient.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import Schedule
from ..config import OptimizerConfig, hyperparameter
from ..linalg import symmetric_eigh_many
from ..optimizer import CurvatureOptimizer
from .base import ParameterEstimator


def _real(value: Any) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def check_exponents(name: str, value: Any) -> tuple[float, float]:
    """``value`` (a number, or a pair ``(left, right)``) as the pair of exponents, each a
    finite number <= 0 and not both 0; else ``ValueError`` naming ``name``."""
    pair = (value, value) if _real(value) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(_real(e) and e <= 0 for e in pair)
        or all(e == 0 for e in pair)
    ):
        raise ValueError(
            f"{name} must be a finite number <= 0, or a pair (left, right) of such numbers "
            f"not both 0, got {value!r}"
        )
    return (float(pair[0]), float(pair[1]))


def check_max_factor_dim(value: Any) -> None:
    if value is not None and not (
        isinstance(value, int) and not isinstance(value, bool) and value >= 1
    ):
        raise ValueError(f"max_factor_dim must be a positive int or None, got {value!r}")


def check_beta(name: str, value: Any, *, closed: bool) -> float:
    """β in (0, 1] (``closed``) or [0, 1); else ``ValueError`` naming ``name``."""
    ok = _real(value) and (0 < value <= 1 if closed else 0 <= value < 1)
    if not ok:
        interval = "(0, 1]" if closed else "[0, 1)"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


@dataclass(kw_only=True)
class ShampooConfig(OptimizerConfig):
    """Hyperparameters of Shampoo (:class:`Shampoo` and :class:`ShampooEstimator`), checked
    on construction. The defaults are Distributed Shampoo's (Adam grafting, so that SGD
    momentum defaults to 0; ε = 1e-12, β₂ = 1: the paper's sums; roots every step; tiles of at
    most 1024; the Adam graft's first moment is what is preconditioned, as Distributed
    Shampoo preconditions its filtered gradient) but for ``lr``: 1e-2, chosen by measurement
    (its README's 1e-3, in ``configs/optimizers/shampoo.yaml``, reached no digits target in 10
    epochs; see ``secondorder/docs/shampoo.md``)."""

    lr: float = hyperparameter(
        1e-2,
        "learning rate (the grafted method's: Adam's by default). 1e-2: on the six offline "
        "tasks of benchmarks/lr_sensitivity.py (3 seeds) every seed reached the target at it, "
        "with the lowest final train loss on five; 1e-3 missed digits-mlp",
    )
    graft: str | None = hyperparameter(
        "adam",
        'the step norm of each parameter: ``"adam"`` (default, Distributed Shampoo\'s), '
        '``"sgd"``, ``"adagrad"``, ``"rmsprop"`` or None (the raw Shampoo direction); '
        "parameters with fewer than 2 dimensions take that method's step itself",
    )
    damping: Schedule = hyperparameter(
        1e-12,
        "ε > 0 added to every eigenvalue of L and R before the root, or a function of the step",
    )
    beta2: float = hyperparameter(
        1.0, "β₂ in (0, 1] of the statistics: 1 sums ``G Gᵀ`` (the paper), < 1 is an EMA"
    )
    exponent: float | tuple[float, float] = hyperparameter(
        -0.25,
        "the root applied to each side, ``u = L^{e_L} G R^{e_R}``: a number for both sides "
        "(-1/4: the paper's) or a pair ``(e_L, e_R)`` of numbers <= 0; a side at 0 is not "
        "preconditioned (``(-0.5, 0)``: one-sided)",
    )
    max_factor_dim: int | None = hyperparameter(
        1024,
        "split each matrix (or tensor, merge_dims=False) into tiles of at most this many "
        "entries along every dimension, each with its own statistics (None: one tile)",
    )
    merge_dims: bool = hyperparameter(
        True,
        "a parameter of three or more dimensions (a conv weight) as one matrix "
        "``(shape[0], rest)`` (Distributed Shampoo's merging, the default) or, False, one "
        "statistic per tensor dimension, each to the root ``2e/k`` for an order-``k`` tensor "
        "(the paper's ``-1/(2k)``): a ``(64, 64, 3, 3)`` weight has factors of 64, 64, 3 and 3 "
        "instead of 64 and 576",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.beta2 = check_beta("beta2", self.beta2, closed=True)
        self.exponent = check_exponents("exponent", self.exponent)
        check_max_factor_dim(self.max_factor_dim)
        if not isinstance(self.merge_dims, bool):
            raise TypeError(f"merge_dims must be a bool, got {type(self.merge_dims).__name__}")
        if not self.merge_dims and self.exponent[0] != self.exponent[1]:
            raise ValueError(
                f"exponent={self.exponent!r} is a pair (left, right), which only a matrix has: "
                "with merge_dims=False every dimension of a tensor takes the same root; give one "
                "number, or merge_dims=True"
            )


def split_sizes(dim: int, block: int | None) -> list[int]:
    """``dim`` in contiguous ranges of ``block`` (the last one shorter); ``[dim]`` if None."""
    if block is None or dim <= block:
        return [dim]
    return [block] * (dim // block) + ([dim % block] if dim % block else [])


def as_matrix(t: Tensor) -> Tensor:
    """A parameter (or its gradient) of >= 2 dims as ``(shape[0], rest)``."""
    return t.reshape(t.shape[0], -1)


def statistics_dtype(p: Tensor) -> torch.dtype:
    """float64 for a float64 parameter, else float32."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def factor_shape(p: Tensor, merge_dims: bool) -> tuple[int, ...]:
    """The shape whose dimensions get the statistics: ``p``'s matrix ``(shape[0], rest)``,
    or with ``merge_dims=False`` a tensor of three or more dimensions as it is."""
    return tuple(p.shape) if p.dim() > 2 and not merge_dims else tuple(as_matrix(p).shape)


def dimension_exponents(exponents: tuple[float, float], order: int) -> tuple[float, ...]:
    """The root along each dimension of a tile of ``order`` dimensions: ``(e_L, e_R)`` for a
    matrix; ``2e/order`` for each of a tensor's (the paper's ``−1/(2k)`` at ``e = −1/4``)."""
    if order == 2:
        return exponents
    return (2 * exponents[0] / order,) * order


class _Tile:
    """One tile of a parameter (of its matrix, or with ``merge_dims=False`` of the tensor):
    its ranges per dimension, and views of its statistics and roots in its
    :class:`_Group`'s stacked tensors (None along a dimension that is not preconditioned)."""

    __slots__ = ("index", "roots", "stats", "whole")

    def __init__(self, index: tuple[slice, ...], whole: bool) -> None:
        self.index, self.whole = index, whole
        self.stats: list[Tensor | None] = []
        self.roots: list[Tensor | None] = []

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.index)


def tiles_of(p: Tensor, max_dim: int | None, merge_dims: bool = True) -> list[_Tile]:
    """The tiles of ``p`` (its :func:`factor_shape`), row-major (statistics not
    allocated yet)."""
    ranges = []
    for n in factor_shape(p, merge_dims):
        starts = [0]
        for size in split_sizes(n, max_dim):
            starts.append(starts[-1] + size)
        ranges.append([slice(a, b) for a, b in itertools.pairwise(starts)])
    whole = all(len(r) == 1 for r in ranges)
    return [_Tile(index, whole) for index in itertools.product(*ranges)]


def _unfold(blocks: Tensor, d: int) -> Tensor:
    """The mode-``d`` unfoldings of stacked tiles ``(k, n_0, n_1, ...)``: ``(k, n_d, rest)``
    (a view for the first and the last dimension, a copy for the others)."""
    k, n = blocks.shape[0], blocks.shape[d + 1]
    if d == 0:
        return blocks.reshape(k, n, -1)
    if d == blocks.dim() - 2:
        return blocks.reshape(k, -1, n).mT
    return blocks.movedim(d + 1, 1).reshape(k, n, -1)


def mode_products(blocks: Tensor, matrices: list[Tensor | None]) -> Tensor:
    """Stacked tensors ``(k, n_0, ..., n_m)`` times ``matrices[d]`` ``(k, n_d, n_d)`` along
    every dimension ``d`` that has one: ``Σ_i x[..., i, ...] M_d[i, a]`` (for a symmetric
    root ``R``: ``R`` applied along ``d``; for a basis ``Q``: ``Qᵀ``). Each product contracts
    the leading dimension and appends the result as the last (``Xᵀ M`` on the ``(k, n_0,
    rest)`` view: ``(k, rest, n_0)``), so after one product per dimension the dimensions are
    back in order and none was moved by a copy; a dimension without a matrix is only
    rotated, and with no matrix at all ``blocks`` is returned as it is."""
    if all(m is None for m in matrices):
        return blocks
    k = blocks.shape[0]
    shape = list(blocks.shape[1:])
    for m in matrices:
        n = shape[0]
        flat = blocks.reshape(k, n, -1).mT  # (k, rest, n_d), a view
        blocks = torch.bmm(flat, m) if m is not None else flat.contiguous()
        shape = [*shape[1:], n]
        blocks = blocks.view(k, *shape)
    return blocks


class _Group:
    """The tiles of one shape, dtype and device, across parameters: their statistics
    stacked, ``(k, n_d, n_d)`` per dimension ``d`` (the tiles hold views), so that an update,
    a refresh and a preconditioning are one batched product (``baddbmm``, ``bmm``) or
    decomposition for all of them instead of a Python loop over tiles."""

    __slots__ = ("exponents", "members", "roots", "stats")

    def __init__(
        self,
        members: list[tuple[Tensor, _Tile]],
        exponents: tuple[float, ...],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.members, self.exponents = members, exponents
        k = len(members)
        shape = members[0][1].shape
        self.stats = [
            torch.zeros(k, n, n, dtype=dtype, device=device) if e else None
            for n, e in zip(shape, exponents, strict=True)
        ]
        self.roots: list[Tensor | None] = [None] * len(shape)
        for i, (_, t) in enumerate(members):
            t.stats = [None if s is None else s[i] for s in self.stats]
            t.roots = [None] * len(shape)

    def blocks(self, tensors: Mapping[Tensor, Tensor]) -> Tensor:
        """The members' tiles of ``tensors`` (per parameter), stacked ``(k, *shape)``."""
        if len(self.members) == 1:
            p, t = self.members[0]
            return tensors[p][t.index].unsqueeze(0)
        return torch.stack([tensors[p][t.index] for p, t in self.members])

    def set_roots(self, d: int, roots: Tensor | None) -> None:
        """The stacked roots along dimension ``d``, and each tile's view of them."""
        self.roots[d] = roots
        for i, (_, t) in enumerate(self.members):
            t.roots[d] = None if roots is None else roots[i]


def matrix_power(values: Tensor, vectors: Tensor, damping: float, exponent: float) -> Tensor:
    """``Q diag((λ + ε)^e) Qᵀ``."""
    return (vectors * (values + damping).pow(exponent).unsqueeze(-2)) @ vectors.transpose(-1, -2)


class ShampooEstimator(ParameterEstimator):
    """Shampoo's statistics per tile and dimension, and their inverse roots.

    Args:
        params (list[nn.Parameter]): the parameters (those with >= 2 dims are
            preconditioned; the others are covered by the grafted method alone).
        config (ShampooConfig, optional): hyperparameters.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        config: ShampooConfig | None = None,
        names: list[str] | None = None,
    ) -> None:
        super().__init__(params, names)
        self.config = config if config is not None else ShampooConfig()
        cfg = self.config
        self.exponents = check_exponents("exponent", cfg.exponent)
        self.shapes = {p: factor_shape(p, cfg.merge_dims) for p in self._params if p.dim() >= 2}
        self.tiles: dict[Tensor, list[_Tile]] = {
            p: tiles_of(p, cfg.max_factor_dim, cfg.merge_dims) for p in self.shapes
        }
        by_shape: dict[tuple, list[tuple[Tensor, _Tile]]] = {}
        for p, tiles in self.tiles.items():
            for t in tiles:
                by_shape.setdefault((t.shape, statistics_dtype(p), p.device), []).append((p, t))
        self.groups = [
            _Group(members, dimension_exponents(self.exponents, len(key[0])), key[1], key[2])
            for key, members in by_shape.items()
        ]
        self.refreshed = False

    def describe_layers(self) -> list[dict[str, Any]]:
        rows = []
        for p, tiles in self.tiles.items():
            sizes = [sorted({t.shape[d] for t in tiles if t.stats[d] is not None})
                     for d in range(len(self.shapes[p]))]  # fmt: skip
            stats = [s for t in tiles for s in t.stats if s is not None]
            nbytes = sum(s.numel() * s.element_size() for s in stats)
            factors = " x ".join(str(n) if n else "-" for n in sizes)
            rows.append({
                "name": self.names[p], "type": f"Parameter {tuple(p.shape)}",
                "a": f"{len(tiles)} tile{'s' if len(tiles) > 1 else ''}",
                "g": f"factors {factors}",
                "factor_bytes": nbytes, "state_bytes": 2 * nbytes,
            })  # fmt: skip
        return rows

    def _tensors(self, grads: Mapping[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        """The gradients of the preconditioned parameters in their factor shapes (a matrix,
        or the tensor itself), statistics dtype."""
        return {
            p: grads[p].detach().reshape(shape).to(statistics_dtype(p))
            for p, shape in self.shapes.items()
            if grads.get(p) is not None
        }

    def update(self, stats: Mapping[Tensor, Tensor]) -> None:
        beta = self.config.beta2
        alpha = 1.0 if beta == 1.0 else 1 - beta
        tensors = self._tensors(stats)
        for group in self.groups:
            if all(p in tensors for p, _ in group.members):
                parts = [(group.blocks(tensors), group.stats)]
            else:  # some parameters have no gradient at this step: tile by tile
                parts = [
                    (tensors[p][t.index].unsqueeze(0), [None if s is None else s[i : i + 1]
                                                        for s in group.stats])
                    for i, (p, t) in enumerate(group.members)
                    if p in tensors
                ]  # fmt: skip
            for blocks, stats_d in parts:
                for d, stat in enumerate(stats_d):
                    if stat is not None:
                        unfolded = _unfold(blocks, d)
                        stat.baddbmm_(unfolded, unfolded.mT, beta=beta, alpha=alpha)

    def refresh(self, damping: float) -> None:
        entries = [
            (group, d, stat)
            for group in self.groups
            for d, stat in enumerate(group.stats)
            if stat is not None
        ]
        for dtype in {stat.dtype for _, _, stat in entries}:
            chosen = [e for e in entries if e[2].dtype == dtype]
            decompositions = symmetric_eigh_many([stat for _, _, stat in chosen], dtype)
            for (group, d, _), (values, vectors) in zip(chosen, decompositions, strict=True):
                group.set_roots(d, matrix_power(values, vectors, damping, group.exponents[d]))
        self.refreshed = True

    def precondition(self, grads: Mapping[Tensor, Tensor], damping: float) -> dict[Tensor, Tensor]:
        if not self.refreshed:
            return {}
        tensors = self._tensors(grads)
        directions: dict[Tensor, Tensor] = {}
        for group in self.groups:
            present = [i for i, (p, _) in enumerate(group.members) if p in tensors]
            if not present:
                continue
            if len(present) == len(group.members):
                blocks = mode_products(group.blocks(tensors), group.roots)
            else:  # some parameters have no gradient at this step
                blocks = {}
                for i in present:
                    p, t = group.members[i]
                    block = tensors[p][t.index].unsqueeze(0)
                    roots = [None if r is None else r.unsqueeze(0) for r in t.roots]
                    blocks[i] = mode_products(block, roots)[0]
            for i in present:
                p, t = group.members[i]
                if t.whole:
                    directions[p] = blocks[i]
                    continue
                if p not in directions:
                    directions[p] = torch.empty_like(tensors[p])
                directions[p][t.index] = blocks[i]
        return {p: d.reshape(grads[p].shape).to(grads[p].dtype) for p, d in directions.items()}

    def state_dict(self) -> dict[str, Any]:
        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone()

        return {
            "params": [
                [
                    {"stats": [copy(s) for s in tile.stats], "roots": [copy(r) for r in tile.roots]}
                    for tile in tiles
                ]
                for tiles in self.tiles.values()
            ],
            "refreshed": self.refreshed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = list(state["params"])
        if len(saved) != len(self.tiles):
            raise ValueError(
                f"Shampoo state has statistics for {len(saved)} parameters with >= 2 dims, "
                f"this optimizer {len(self.tiles)}; was it saved from a different model?"
            )
        saved = [[_upgrade(dict(values)) for values in entry] for entry in saved]
        for (p, tiles), entry in zip(self.tiles.items(), saved, strict=True):
            if len(entry) != len(tiles):
                raise ValueError(
                    f"Shampoo state has {len(entry)} tiles for parameter {self.names[p]}, "
                    f"this optimizer {len(tiles)}; was it saved from a different model, "
                    "max_factor_dim or merge_dims?"
                )
            for tile, values in zip(tiles, entry, strict=True):
                mine = [(f"stats[{d}]", s) for d, s in enumerate(tile.stats)]
                theirs = [(f"stats[{d}]", s) for d, s in enumerate(values["stats"])]
                if len(values["roots"]) != len(values["stats"]) or len(mine) != len(theirs):
                    self._mismatch(p, "statistics", len(theirs), len(mine))
                for d, ((key, a), (_, b)) in enumerate(zip(mine, theirs, strict=True)):
                    root = values["roots"][d]
                    if (a is None) != (b is None) or (
                        a is not None and (a.shape != b.shape
                                           or (root is not None and root.shape != a.shape))
                    ):  # fmt: skip
                        self._mismatch(p, key, _shape(b), _shape(a))
        for tiles, entry in zip(self.tiles.values(), saved, strict=True):
            for tile, values in zip(tiles, entry, strict=True):
                for mine, theirs in zip(tile.stats, values["stats"], strict=True):
                    if mine is not None:
                        mine.copy_(theirs)  # a view of the group's stack
        self._load_roots(saved)
        self.refreshed = bool(state["refreshed"])

    def _mismatch(self, p: Tensor, key: str, given: Any, have: Any) -> None:
        raise ValueError(
            f"Shampoo state has {key} of shape {given} for parameter {self.names[p]} of shape "
            f"{tuple(p.shape)}, where this optimizer has {have}; was it saved from a "
            "different model, max_factor_dim, merge_dims or exponent?"
        )

    def _load_roots(self, saved: list[list[dict[str, Any]]]) -> None:
        roots = {
            id(tile): values["roots"]
            for tiles, entry in zip(self.tiles.values(), saved, strict=True)
            for tile, values in zip(tiles, entry, strict=True)
        }
        for group in self.groups:
            for d, stat in enumerate(group.stats):
                if stat is None:
                    continue
                values = [roots[id(t)][d] for _, t in group.members]
                if any(v is None for v in values):
                    group.set_roots(d, None)
                else:
                    group.set_roots(d, torch.stack(values).to(stat))


def _shape(t: Any) -> Any:
    return "none" if t is None else tuple(t.shape)


def _upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """A tile's saved state of the earlier matrix-only format (``left``, ``right``,
    ``left_root``, ``right_root``) in the per-dimension one (``stats``, ``roots``)."""
    if "stats" in values:
        return values
    return {
        "stats": [values.get("left"), values.get("right")],
        "roots": [values.get("left_root"), values.get("right_root")],
    }


class Shampoo(CurvatureOptimizer):
    r"""Shampoo (Gupta et al., 2018) with Distributed Shampoo's defaults (Adam grafting).

    Each parameter with two or more dimensions, as a matrix ``G`` split into tiles of at
    most ``max_factor_dim``, gets the direction

    .. math::
        u = L^{e_L} G R^{e_R}, \qquad L = \sum_t G_t G_t^\top,\; R = \sum_t G_t^\top G_t

    (EMAs with ``beta2 < 1``), the roots taken on the eigenvalues plus ε = ``damping``
    every ``inverse_every`` steps. With ``graft="adam"`` (the default) each parameter's
    step has the norm of Adam's step, and parameters with fewer than two dimensions take
    Adam's step itself; with the curvature off (``precondition=False``) it *is*
    ``torch.optim.Adam``. Coupled weight decay is added to the gradient before the
    statistics and the preconditioning (Distributed Shampoo's convention).

    Args:
        model (nn.Module or iterable of Parameters): what to optimise (no hooks).
        lr (float, optional): learning rate, the grafted method's (default: 1e-2).
        params, config: see :class:`~secondorder.CurvatureOptimizer`.

    Example::

        opt = Shampoo(model.parameters(), inverse_every=10)
    """

    requires_model = False
    l2_before_precondition = True

    config_class = ShampooConfig
    estimator_class = ShampooEstimator
