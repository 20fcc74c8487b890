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

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import Schedule
from ..config import OptimizerConfig, hyperparameter
from ..layers import LayerHelper
from ..linalg import symmetric_eigh_many
from ..optimizer import CurvatureOptimizer
from .base import CurvatureEstimator


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
    on construction. The defaults are Distributed Shampoo's: Adam grafting (so ``lr`` is
    Adam's and SGD momentum defaults to 0), ε = 1e-12, β₂ = 1 (the paper's sums), roots every
    step, tiles of at most 1024."""

    lr: float = hyperparameter(1e-3, "learning rate (the grafted method's: Adam's by default)")
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
        "split each matrix into tiles of at most this many rows and columns, each with its "
        "own L and R (None: one tile)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.beta2 = check_beta("beta2", self.beta2, closed=True)
        self.exponent = check_exponents("exponent", self.exponent)
        check_max_factor_dim(self.max_factor_dim)


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


class _Tile:
    """One tile of a parameter's matrix: its row and column ranges and statistics."""

    __slots__ = ("cols", "left", "left_root", "right", "right_root", "rows")

    def __init__(self, rows: slice, cols: slice) -> None:
        self.rows, self.cols = rows, cols
        self.left: Tensor | None = None
        self.right: Tensor | None = None
        self.left_root: Tensor | None = None
        self.right_root: Tensor | None = None


def tiles_of(p: Tensor, max_dim: int | None, exponents: tuple[float, float]) -> list[_Tile]:
    """The tiles of ``p``'s matrix, with zero statistics on the preconditioned sides."""
    m, n = as_matrix(p).shape
    dtype = statistics_dtype(p)
    tiles = []
    r0 = 0
    for r in split_sizes(m, max_dim):
        c0 = 0
        for c in split_sizes(n, max_dim):
            tile = _Tile(slice(r0, r0 + r), slice(c0, c0 + c))
            if exponents[0] != 0:
                tile.left = torch.zeros(r, r, dtype=dtype, device=p.device)
            if exponents[1] != 0:
                tile.right = torch.zeros(c, c, dtype=dtype, device=p.device)
            tiles.append(tile)
            c0 += c
        r0 += r
    return tiles


def matrix_power(values: Tensor, vectors: Tensor, damping: float, exponent: float) -> Tensor:
    """``Q diag((λ + ε)^e) Qᵀ``."""
    return (vectors * (values + damping).pow(exponent).unsqueeze(-2)) @ vectors.transpose(-1, -2)


class ShampooEstimator(CurvatureEstimator):
    """Shampoo's statistics ``L``, ``R`` per tile and their inverse roots.

    Args:
        params (list[nn.Parameter]): the parameters (those with >= 2 dims are
            preconditioned; the others are covered by the grafted method alone).
        config (ShampooConfig, optional): hyperparameters.
    """

    requires_capture = False

    def __init__(
        self,
        params: list[nn.Parameter],
        config: ShampooConfig | None = None,
        names: list[str] | None = None,
    ) -> None:
        super().__init__([])
        self.config = config if config is not None else ShampooConfig()
        names = names if names is not None else [f"param {i}" for i in range(len(params))]
        self.names = {p: n for p, n in zip(params, names, strict=True) if p.requires_grad}
        self._params = [p for p in params if p.requires_grad]
        self.exponents = check_exponents("exponent", self.config.exponent)
        self.tiles: dict[Tensor, list[_Tile]] = {
            p: tiles_of(p, self.config.max_factor_dim, self.exponents)
            for p in self._params
            if p.dim() >= 2
        }
        self.refreshed = False

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self._params)

    def describe_layers(self) -> list[dict[str, Any]]:
        rows = []
        for p, tiles in self.tiles.items():
            left = [t.left.shape[0] for t in tiles if t.left is not None]
            right = [t.right.shape[0] for t in tiles if t.right is not None]
            stats = [s for t in tiles for s in (t.left, t.right) if s is not None]
            nbytes = sum(s.numel() * s.element_size() for s in stats)
            rows.append({
                "name": self.names[p], "type": f"Parameter {tuple(p.shape)}",
                "a": f"{len(tiles)} tiles L {sorted(set(left))}" if left else "-",
                "g": f"R {sorted(set(right))}" if right else "-",
                "factor_bytes": nbytes, "state_bytes": 2 * nbytes,
            })  # fmt: skip
        return rows

    def update(self, stats: Mapping[Tensor, Tensor]) -> None:
        beta = self.config.beta2
        for p, tiles in self.tiles.items():
            g = stats.get(p)
            if g is None:
                continue
            matrix = as_matrix(g.detach()).to(statistics_dtype(p))
            for tile in tiles:
                block = matrix[tile.rows, tile.cols]
                for stat, outer in (
                    (tile.left, lambda b: b @ b.T),
                    (tile.right, lambda b: b.T @ b),
                ):
                    if stat is None:
                        continue
                    if beta == 1.0:
                        stat.add_(outer(block))
                    else:
                        stat.mul_(beta).add_(outer(block), alpha=1 - beta)

    def _statistics(self) -> list[tuple[_Tile, str, Tensor]]:
        return [
            (tile, side, stat)
            for tiles in self.tiles.values()
            for tile in tiles
            for side, stat in (("left", tile.left), ("right", tile.right))
            if stat is not None
        ]

    def refresh(self, damping: float) -> None:
        entries = self._statistics()
        for dtype in {stat.dtype for _, _, stat in entries}:
            group = [e for e in entries if e[2].dtype == dtype]
            decompositions = symmetric_eigh_many([stat for _, _, stat in group], dtype)
            for (tile, side, _), (values, vectors) in zip(group, decompositions, strict=True):
                exponent = self.exponents[0 if side == "left" else 1]
                setattr(tile, f"{side}_root", matrix_power(values, vectors, damping, exponent))
        self.refreshed = True

    def precondition(self, grads: Mapping[Tensor, Tensor], damping: float) -> dict[Tensor, Tensor]:
        if not self.refreshed:
            return {}
        out = {}
        for p, tiles in self.tiles.items():
            g = grads.get(p)
            if g is None:
                continue
            matrix = as_matrix(g.detach()).to(statistics_dtype(p))
            direction = torch.empty_like(matrix)
            for tile in tiles:
                block = matrix[tile.rows, tile.cols]
                if tile.left_root is not None:
                    block = tile.left_root @ block
                if tile.right_root is not None:
                    block = block @ tile.right_root
                direction[tile.rows, tile.cols] = block
            out[p] = direction.reshape(g.shape).to(g.dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone()

        return {
            "params": [
                [{k: copy(getattr(tile, k)) for k in _TILE_TENSORS} for tile in tiles]
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
        for (p, tiles), entry in zip(self.tiles.items(), saved, strict=True):
            if len(entry) != len(tiles):
                raise ValueError(
                    f"Shampoo state has {len(entry)} tiles for parameter {self.names[p]}, "
                    f"this optimizer {len(tiles)}; was it saved from a different model or "
                    "max_factor_dim?"
                )
            for tile, values in zip(tiles, entry, strict=True):
                for key in _TILE_TENSORS:
                    mine, theirs = getattr(tile, key.removesuffix("_root")), values[key]
                    missing = key in ("left", "right") and (mine is None) != (theirs is None)
                    if missing or (
                        theirs is not None and (mine is None or mine.shape != theirs.shape)
                    ):
                        have = "none" if mine is None else tuple(mine.shape)
                        given = "none" if theirs is None else tuple(theirs.shape)
                        raise ValueError(
                            f"Shampoo state has {key} of shape {given} for "
                            f"parameter {self.names[p]} of shape {tuple(p.shape)}, where this "
                            f"optimizer has {have}; was it saved from a different model, "
                            "max_factor_dim or exponent?"
                        )
        for tiles, entry in zip(self.tiles.values(), saved, strict=True):
            for tile, values in zip(tiles, entry, strict=True):
                for key in _TILE_TENSORS:
                    like = getattr(tile, key.removesuffix("_root"))
                    theirs = values[key]
                    if like is None:
                        continue
                    if key in ("left", "right"):
                        like.copy_(theirs)
                    else:
                        value = None if theirs is None else theirs.to(like).clone()
                        setattr(tile, key, value)
        self.refreshed = bool(state["refreshed"])


_TILE_TENSORS = ("left", "right", "left_root", "right_root")


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
        lr (float, optional): learning rate, the grafted method's (default: 1e-3).
        params, config: see :class:`~secondorder.CurvatureOptimizer`.

    Example::

        opt = Shampoo(model.parameters(), lr=1e-3, inverse_every=10)
    """

    requires_model = False
    l2_before_precondition = True

    config_class = ShampooConfig

    def build_estimator(
        self, layers: list[LayerHelper], params: list[nn.Parameter]
    ) -> ShampooEstimator:
        return ShampooEstimator(params, self.config, [self._names[p] for p in params])
