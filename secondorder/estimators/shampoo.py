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
    """One tile of a parameter's matrix: its row and column ranges, and views of its
    statistics and roots in its :class:`_Group`'s stacked tensors."""

    __slots__ = ("cols", "left", "left_root", "right", "right_root", "rows", "whole")

    def __init__(self, rows: slice, cols: slice, whole: bool) -> None:
        self.rows, self.cols, self.whole = rows, cols, whole
        self.left: Tensor | None = None
        self.right: Tensor | None = None
        self.left_root: Tensor | None = None
        self.right_root: Tensor | None = None


def tiles_of(p: Tensor, max_dim: int | None) -> list[_Tile]:
    """The tiles of ``p``'s matrix, row-major (statistics not allocated yet)."""
    m, n = as_matrix(p).shape
    rows, cols = split_sizes(m, max_dim), split_sizes(n, max_dim)
    tiles = []
    r0 = 0
    for r in rows:
        c0 = 0
        for c in cols:
            tiles.append(_Tile(slice(r0, r0 + r), slice(c0, c0 + c), len(rows) == len(cols) == 1))
            c0 += c
        r0 += r
    return tiles


class _Group:
    """The tiles of one shape ``(r, c)``, dtype and device, across parameters: their
    statistics stacked, ``(k, r, r)`` and ``(k, c, c)`` (the tiles hold views), so that an
    update, a refresh and a preconditioning are one batched product (``baddbmm``, ``bmm``)
    or decomposition for all of them instead of a Python loop over tiles."""

    __slots__ = ("left", "left_root", "members", "right", "right_root")

    def __init__(
        self,
        members: list[tuple[Tensor, _Tile]],
        exponents: tuple[float, float],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.members = members
        k = len(members)
        tile = members[0][1]
        r, c = tile.rows.stop - tile.rows.start, tile.cols.stop - tile.cols.start
        self.left = torch.zeros(k, r, r, dtype=dtype, device=device) if exponents[0] else None
        self.right = torch.zeros(k, c, c, dtype=dtype, device=device) if exponents[1] else None
        self.left_root: Tensor | None = None
        self.right_root: Tensor | None = None
        for i, (_, t) in enumerate(members):
            t.left = None if self.left is None else self.left[i]
            t.right = None if self.right is None else self.right[i]

    def blocks(self, matrices: Mapping[Tensor, Tensor]) -> Tensor:
        """The members' blocks of ``matrices`` (per parameter), stacked ``(k, r, c)``."""
        if len(self.members) == 1:
            p, t = self.members[0]
            return matrices[p][t.rows, t.cols].unsqueeze(0)
        return torch.stack([matrices[p][t.rows, t.cols] for p, t in self.members])

    def set_roots(self, side: str, roots: Tensor | None) -> None:
        """The stacked roots of ``side``, and each tile's view of them."""
        setattr(self, f"{side}_root", roots)
        for i, (_, t) in enumerate(self.members):
            setattr(t, f"{side}_root", None if roots is None else roots[i])


def matrix_power(values: Tensor, vectors: Tensor, damping: float, exponent: float) -> Tensor:
    """``Q diag((λ + ε)^e) Qᵀ``."""
    return (vectors * (values + damping).pow(exponent).unsqueeze(-2)) @ vectors.transpose(-1, -2)


class ShampooEstimator(ParameterEstimator):
    """Shampoo's statistics ``L``, ``R`` per tile and their inverse roots.

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
        self.exponents = check_exponents("exponent", self.config.exponent)
        self.tiles: dict[Tensor, list[_Tile]] = {
            p: tiles_of(p, self.config.max_factor_dim) for p in self._params if p.dim() >= 2
        }
        by_shape: dict[tuple, list[tuple[Tensor, _Tile]]] = {}
        for p, tiles in self.tiles.items():
            for t in tiles:
                key = (t.rows.stop - t.rows.start, t.cols.stop - t.cols.start,
                       statistics_dtype(p), p.device)  # fmt: skip
                by_shape.setdefault(key, []).append((p, t))
        self.groups = [
            _Group(members, self.exponents, key[2], key[3]) for key, members in by_shape.items()
        ]
        self.refreshed = False

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

    def _matrices(self, grads: Mapping[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        """The gradients of the preconditioned parameters as matrices, statistics dtype."""
        return {
            p: as_matrix(grads[p].detach()).to(statistics_dtype(p))
            for p in self.tiles
            if grads.get(p) is not None
        }

    def update(self, stats: Mapping[Tensor, Tensor]) -> None:
        beta = self.config.beta2
        alpha = 1.0 if beta == 1.0 else 1 - beta
        matrices = self._matrices(stats)
        for group in self.groups:
            if all(p in matrices for p, _ in group.members):
                blocks = group.blocks(matrices)
                if group.left is not None:
                    group.left.baddbmm_(blocks, blocks.mT, beta=beta, alpha=alpha)
                if group.right is not None:
                    group.right.baddbmm_(blocks.mT, blocks, beta=beta, alpha=alpha)
                continue
            for p, t in group.members:  # some parameters have no gradient at this step
                if p not in matrices:
                    continue
                block = matrices[p][t.rows, t.cols]
                if t.left is not None:
                    t.left.addmm_(block, block.T, beta=beta, alpha=alpha)
                if t.right is not None:
                    t.right.addmm_(block.T, block, beta=beta, alpha=alpha)

    def refresh(self, damping: float) -> None:
        entries = [
            (group, side, stat)
            for group in self.groups
            for side, stat in (("left", group.left), ("right", group.right))
            if stat is not None
        ]
        for dtype in {stat.dtype for _, _, stat in entries}:
            chosen = [e for e in entries if e[2].dtype == dtype]
            decompositions = symmetric_eigh_many([stat for _, _, stat in chosen], dtype)
            for (group, side, _), (values, vectors) in zip(chosen, decompositions, strict=True):
                exponent = self.exponents[0 if side == "left" else 1]
                group.set_roots(side, matrix_power(values, vectors, damping, exponent))
        self.refreshed = True

    def precondition(self, grads: Mapping[Tensor, Tensor], damping: float) -> dict[Tensor, Tensor]:
        if not self.refreshed:
            return {}
        matrices = self._matrices(grads)
        directions: dict[Tensor, Tensor] = {}
        for group in self.groups:
            present = [i for i, (p, _) in enumerate(group.members) if p in matrices]
            if not present:
                continue
            if len(present) == len(group.members):
                blocks = group.blocks(matrices)
                if group.left_root is not None:
                    blocks = torch.bmm(group.left_root, blocks)
                if group.right_root is not None:
                    blocks = torch.bmm(blocks, group.right_root)
            else:  # some parameters have no gradient at this step
                blocks = {}
                for i in present:
                    p, t = group.members[i]
                    block = matrices[p][t.rows, t.cols]
                    if t.left_root is not None:
                        block = t.left_root @ block
                    if t.right_root is not None:
                        block = block @ t.right_root
                    blocks[i] = block
            for i in present:
                p, t = group.members[i]
                if t.whole:
                    directions[p] = blocks[i]
                    continue
                if p not in directions:
                    directions[p] = torch.empty_like(matrices[p])
                directions[p][t.rows, t.cols] = blocks[i]
        return {p: d.reshape(grads[p].shape).to(grads[p].dtype) for p, d in directions.items()}

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
        roots: dict[tuple[int, str], Tensor | None] = {}
        for tiles, entry in zip(self.tiles.values(), saved, strict=True):
            for tile, values in zip(tiles, entry, strict=True):
                for key in _TILE_TENSORS:
                    like = getattr(tile, key.removesuffix("_root"))
                    theirs = values[key]
                    if like is None:
                        continue
                    if key in ("left", "right"):
                        like.copy_(theirs)  # a view of the group's stack
                    else:
                        roots[id(tile), key] = None if theirs is None else theirs.to(like)
        for group in self.groups:
            for side in ("left", "right"):
                key = f"{side}_root"
                if getattr(group, side) is None:
                    continue
                values = [roots[id(t), key] for _, t in group.members]
                if any(v is None for v in values):
                    group.set_roots(side, None)
                else:
                    group.set_roots(side, torch.stack(values))
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
        lr (float, optional): learning rate, the grafted method's (default: 1e-2).
        params, config: see :class:`~secondorder.CurvatureOptimizer`.

    Example::

        opt = Shampoo(model.parameters(), inverse_every=10)
    """

    requires_model = False
    l2_before_precondition = True

    config_class = ShampooConfig
    estimator_class = ShampooEstimator
