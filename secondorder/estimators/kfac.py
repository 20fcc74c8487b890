"""K-FAC: Kronecker-factored approximate curvature (Martens & Grosse, 2015;
Grosse & Martens, 2016 for convolutions).

For a layer with weight blocks ``W`` (bias folded in as the last column), the Fisher
block is approximated by ``A ⊗ G`` with

* ``A = mean over rows of ã ãᵀ``, ``ã`` the layer input row with a trailing 1 (for a
  convolution, the receptive-field patch; every output position is a row);
* ``G = n · Σ_rows g gᵀ`` with ``g`` the gradient of the loss w.r.t. the layer output
  and ``n`` the number of examples: when the loss is a mean over the batch,
  ``n·g`` is the per-example gradient, so ``G`` is the per-example average of
  ``Σ_positions (n g)(n g)ᵀ`` (Grosse & Martens' KFC convention).

With one example (one output position) ``A ⊗ G`` *is* the empirical Fisher block.
Statistics are the empirical Fisher: they come from the gradients of the loss the
user back-propagated.

Factors are exponential moving averages with a ramp: the k-th update uses decay
``min(1 - 1/(k+1), factor_decay)``, so the first update sets the factors to the
statistics instead of mixing them with an arbitrary initial value.

Damping conventions (``damping`` = λ):

* ``damping_mode="eigen"`` (default): ``V = Q_G [(Q_Gᵀ ∇ Q_A) / (d_G d_Aᵀ + λ)] Q_Aᵀ``,
  i.e. exactly ``(A ⊗ G + λ I)⁻¹ vec(∇)``; needs ``inverse_method="eigen"``.
* ``damping_mode="factored"``: factored Tikhonov, ``(G + λ_G I)⁻¹ ∇ (A + λ_A I)⁻¹``
  with ``λ_A = π √λ``, ``λ_G = √λ / π``, ``π = √((tr A / dim A) / (tr G / dim G))``.
  With ``inverse_method="eigen"`` the current λ is used at every step; with
  ``inverse_method="cholesky"`` the inverses (and so λ) are fixed at refresh time.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import Interval
from .._host import to_host
from ..config import OptimizerConfig, hyperparameter
from ..distributed import stat_field
from ..kernels import symmetric_factor_update
from ..kernels.conv_factor import CHUNK_ELEMENTS
from ..layers import BlockHelper, KroneckerHelper, LayerHelper
from ..linalg import (
    EIGH_BATCH_MAX_SIZE,
    damped_inverse_cholesky_many,
    pi_correction,
    symmetric_eigh_many,
)
from ..optimizer import CurvatureOptimizer
from .base import CurvatureEstimator
from .factor_layout import FactorLayout, choose_layout

_INVERSE_METHODS = ("eigen", "cholesky")
_DAMPING_MODES = ("eigen", "factored")
_FACTOR_DTYPES = (torch.float32, torch.float64)
_HALF_DTYPES = (torch.bfloat16, torch.float16)

#: the estimated cost (``Σ batch · n³`` of a refresh's decompositions) above which a
#: refresh on the CPU shows its progress when ``progress`` is None: about 10 s on a
#: 2-core CPU (a 1024-wide float32 eigendecomposition takes 1 to 3 s there)
PROGRESS_MIN_COST = 4e9


def _add_into(acc: Tensor, value: Tensor, beta: float) -> None:
    """``acc <- beta acc + value`` (with ``beta = 0`` the old contents are ignored)."""
    if beta == 0.0:
        acc.copy_(value)
    else:
        acc.mul_(beta).add_(value)


def _side_update(layout: FactorLayout, acc: Tensor, rows: Tensor, beta: float) -> None:
    """``acc <- beta acc + Σ_rows x xᵀ`` for rows ``(groups, R, n)``, kept as ``layout``
    stores the factor: whole, its diagonal blocks only, or its diagonal only."""
    if layout.kind == "full":
        symmetric_factor_update(acc, rows, beta=beta, alpha=1.0)
    elif layout.kind == "diagonal":
        _add_into(acc, rows.to(acc.dtype).square().sum(1), beta)
    else:
        b = layout.block_size
        flat = acc.view(-1, b, b)  # (groups·k, b, b): one batched product for all blocks
        symmetric_factor_update(flat, layout.block_rows(rows), beta=beta, alpha=1.0)


def _left(m: Tensor, x: Tensor) -> Tensor:
    """``m @ x`` for ``m`` one matrix per group ``(groups, n, n)`` or ``k`` diagonal
    blocks per group ``(groups, k, b, b)``, and ``x`` ``(groups, n or k·b, cols)``."""
    if m.dim() == 3:
        return m @ x
    groups, k, b = m.shape[:3]
    return (m @ x.reshape(groups, k, b, x.shape[-1])).reshape(x.shape)


def _right(x: Tensor, m: Tensor) -> Tensor:
    """``x @ m`` for ``m`` as in :func:`_left` and ``x`` ``(groups, rows, n or k·b)``."""
    if m.dim() == 3:
        return x @ m
    groups, k, b = m.shape[:3]
    blocks = x.reshape(groups, x.shape[1], k, b).transpose(1, 2)  # (groups, k, rows, b)
    return (blocks @ m).transpose(1, 2).reshape(x.shape)


def _chunks_by_size(matrices: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``matrices`` by size ``n`` (the order of first appearance), one chunk
    per matrix above :data:`~secondorder.linalg.EIGH_BATCH_MAX_SIZE` (decomposed one at a
    time anyway): the steps a refresh reports its progress in."""
    by_size: dict[int, list[int]] = {}
    for i, m in enumerate(matrices):
        by_size.setdefault(m.shape[-1], []).append(i)
    chunks = []
    for n, indices in by_size.items():
        chunks.extend([[i] for i in indices] if n > EIGH_BATCH_MAX_SIZE else [indices])
    return chunks


@dataclass(kw_only=True)
class KFACConfig(OptimizerConfig):
    """Hyperparameters of K-FAC (:class:`KFAC` and :class:`KFACEstimator`), checked on
    construction; the shared ones are :class:`~secondorder.config.OptimizerConfig`'s, with
    K-FAC's defaults: factors every 10 steps, inverses every 100 (KFAC-Pytorch's and
    KAISA's) with warm-up refreshes at steps 10, 20, 40 and 80, and Adam grafting
    (``graft="auto"``, per weight row, Adam's first moment with β₁ 0.8 preconditioned) with
    Adam's learning rate scale, chosen by measurement
    (``benchmarks/lr_sensitivity.py``: at the papers' settings — SGD momentum 0.9, KL
    clipping, no graft — K-FAC reached the targets at almost no learning rate; see
    ``secondorder/docs/kfac.md``). ``graft=None`` is the papers' update, with SGD momentum
    0.9; the papers' full settings are ``configs/optimizers/kfac.yaml``."""

    default_momentum: ClassVar[float] = 0.9

    lr: float = hyperparameter(1e-2, "learning rate (with a graft, the grafted method's)")
    curvature_every: Interval = hyperparameter(10, "factor update interval, in steps")
    inverse_every: Interval = hyperparameter(100, "inverse (eigenbasis) refresh interval")
    inverse_warmup: bool = hyperparameter(
        True,
        "also refresh at steps c, 2c, 4c, ... below ``inverse_every`` (c = "
        "``curvature_every``: steps 10, 20, 40 and 80 at the defaults): otherwise the first "
        "100 steps use the inverses of the first batch's factors; chosen by measurement "
        "(``benchmarks/lr_sensitivity.py``)",
    )
    graft: str | None = hyperparameter(
        "auto",
        'the step norm\'s source (see OptimizerConfig): ``"auto"`` is ``"adam"`` with '
        'base="sgd" unless adaptive_lr / adaptive_momentum is set; None: the papers\' update',
    )
    graft_betas: tuple[float, float] = hyperparameter(
        (0.8, 0.999),
        "the grafted Adam's β₁ and β₂: β₁ 0.8 (Adam's 0.9 averages about 10 gradients, 0.8 "
        "about 5, so the preconditioned moment follows the gradient sooner); by measurement "
        "(``benchmarks/lr_sensitivity.py``: with 0.9 K-FAC missed the autoencoder's target at "
        "Adam's learning rates and ended above Adam's loss on the character GPT)",
    )
    graft_norm: str = hyperparameter(
        "row",
        'what takes the grafted step\'s norm (see OptimizerConfig): ``"row"`` (each row of a '
        "weight, each 1-D parameter), by measurement: on a character GPT with packed q/k/v "
        'projections it trained at Adam\'s learning rates where ``"parameter"`` did not',
    )
    kl_clip: float | None = hyperparameter(
        None,
        "KL clipping constant κ, None disables; needs graft=None (the papers use 1e-3 "
        "to 1e-2 with it)",
    )
    factor_decay: float = hyperparameter(0.95, "EMA decay of the factors, in [0, 1)")
    inverse_method: str = hyperparameter("eigen", '``"eigen"`` or ``"cholesky"``')
    damping_mode: str = hyperparameter(
        "eigen",
        '``"eigen"`` (λ added to eigenvalue products: exactly ``(A ⊗ G + λI)⁻¹``) or '
        '``"factored"`` (Tikhonov damping split between the factors with π)',
    )
    factor_dtype: torch.dtype = hyperparameter(
        torch.float32,
        "dtype of the statistics and factors: float32 or float64, or bfloat16 / float16 "
        "to halve their memory in mixed-precision training (sums then round at every "
        "addition)",
    )
    inverse_dtype: torch.dtype = hyperparameter(
        torch.float32,
        "dtype of eigendecompositions / inverses and of the preconditioning products, "
        "float32 or float64",
    )
    max_factor_dim: int | None = hyperparameter(
        256,
        "factors wider than this are split into diagonal blocks of at most this size "
        "(as equal as possible; only the blocks are accumulated and decomposed); None "
        "keeps every factor whole",
    )
    diagonal_factor_dim: int | None = hyperparameter(
        8192,
        "factors wider than this keep only their diagonal (a vocabulary-sized G: only "
        "Σ g² per output is accumulated, the inverse is elementwise); None disables",
    )
    factor_memory: int | None = hyperparameter(
        256 * 2**20,
        "bytes one factor's statistics may take (in factor_dtype); a factor that would "
        "take more gets smaller blocks, or its diagonal, with one warning; None: no limit",
    )
    progress: bool | None = hyperparameter(
        None,
        "print refresh progress to stderr: True always, False never, None when the "
        "decompositions of a refresh are estimated to be long (CPU, first such refresh)",
    )

    @property
    def stat_dtype(self) -> torch.dtype:
        """The dtype a step's statistics are summed in: ``factor_dtype``, or float32 when
        that is a half-precision type."""
        return torch.float32 if self.factor_dtype in _HALF_DTYPES else self.factor_dtype

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.factor_decay, (int, float)) or not 0.0 <= self.factor_decay < 1.0:
            raise ValueError(f"factor_decay must be a number in [0, 1), got {self.factor_decay!r}")
        if self.inverse_method not in _INVERSE_METHODS:
            raise ValueError(
                f"inverse_method must be one of {_INVERSE_METHODS}, got {self.inverse_method!r}"
            )
        if self.damping_mode not in _DAMPING_MODES:
            raise ValueError(
                f"damping_mode must be one of {_DAMPING_MODES}, got {self.damping_mode!r}"
            )
        if self.inverse_method == "cholesky" and self.damping_mode == "eigen":
            raise ValueError(
                "damping_mode='eigen' adds damping to eigenvalue products and needs "
                "inverse_method='eigen'; use damping_mode='factored' with inverse_method='cholesky'"
            )
        if self.factor_dtype not in _FACTOR_DTYPES + _HALF_DTYPES:
            raise ValueError(
                "factor_dtype must be torch.float32, torch.float64, torch.bfloat16 or "
                f"torch.float16, got {self.factor_dtype!r}"
            )
        if self.inverse_dtype not in _FACTOR_DTYPES:
            raise ValueError(
                "inverse_dtype must be torch.float32 or torch.float64 (inverses are never "
                f"computed in half precision), got {self.inverse_dtype!r}"
            )
        for name, low in (("max_factor_dim", 1), ("diagonal_factor_dim", 1), ("factor_memory", 1)):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < low
            ):
                raise ValueError(f"{name} must be an int >= {low} or None, got {value!r}")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise ValueError(f"progress must be True, False or None, got {self.progress!r}")


@dataclass
class KroneckerStats:
    """Sums accumulated by the capture hooks between two curvature updates."""

    # Σ ã ãᵀ over rows, (groups, a_dim, a_dim); Σ ã, (groups, a_dim) for a diagonal A
    a_sum: Tensor = field(metadata=stat_field("input", symmetric=True))
    # Σ g gᵀ over rows, (groups, g_dim, g_dim)
    g_sum: Tensor = field(metadata=stat_field("output", symmetric=True))
    rows: int = 0
    examples: int = 0


@dataclass
class BlockStats:
    """Sums accumulated for a :class:`~secondorder.layers.BlockHelper` layer
    (normalisation): per-example gradient outer products ``Σ_n d_n d_nᵀ`` per channel,
    ``(C, k, k)`` (``(C, k)`` squares in diagonal mode)."""

    fisher_sum: Tensor = field(metadata=stat_field("output", symmetric=True))
    examples: int = 0


@dataclass
class _LayerState:
    a_factor: Tensor | None = None
    g_factor: Tensor | None = None
    updates: int = 0
    # The factors and damping the current inverse was computed from: saved by
    # state_dict so that a resumed run recomputes bit-for-bit the same inverse.
    source: tuple[Tensor, Tensor] | None = None
    refresh_damping: float | None = None
    inverse: dict[str, Tensor] = field(default_factory=dict)


class KFACEstimator(CurvatureEstimator):
    """K-FAC factors, inverses and preconditioning for a list of layers.

    Args:
        layers (Sequence[LayerHelper]): the covered layers.
        config (KFACConfig, optional): hyperparameters (default: ``KFACConfig()``).
    """

    def __init__(self, layers: Sequence[LayerHelper], config: KFACConfig | None = None) -> None:
        super().__init__(layers)
        self.config = config if config is not None else KFACConfig()
        self._state = {layer.name: _LayerState() for layer in self.layers}
        self._by_name = {layer.name: layer for layer in self.layers}
        #: the layer owning each helper the capture may hand to :meth:`accumulate` (a tied
        #: module's helper has its own name but the primary layer's weight and factors)
        self._owner = {id(m): layer.name for layer in self.layers for m in (layer, *layer.tied)}
        #: layer updates dropped because their statistics were not finite
        self.nonfinite_updates = 0
        #: ``(A, G)`` layouts of every Kronecker layer (full, blocks or diagonal)
        self.layouts: dict[str, tuple[FactorLayout, FactorLayout]] = {}
        #: the stacked inverses of layers preconditioned together (see :meth:`precondition`)
        self._stack_cache: dict[tuple[str, ...], tuple[list[Any], dict[str, Tensor | None]]] = {}
        self._choose_layouts()
        self._progress_shown = False  # automatic progress: only the first long refresh

    def _choose_layouts(self) -> None:
        """Fill :attr:`layouts` from ``max_factor_dim``, ``diagonal_factor_dim`` and
        ``factor_memory``; one warning names the factors the memory budget changed."""
        cfg = self.config
        itemsize = torch.empty((), dtype=cfg.factor_dtype).element_size()
        budget_changed = []
        for layer in self.layers:
            if not isinstance(layer, KroneckerHelper):
                continue
            sides = []
            for side, dim in (("A", layer.a_dim), ("G", layer.g_dim)):
                if side == "A" and layer.a_diagonal:  # one-hot inputs: diagonal by nature
                    sides.append(FactorLayout(dim, "diagonal"))
                    continue
                layout, changed = choose_layout(
                    dim,
                    layer.groups,
                    itemsize,
                    max_factor_dim=cfg.max_factor_dim,
                    diagonal_factor_dim=cfg.diagonal_factor_dim,
                    factor_memory=cfg.factor_memory,
                )
                if changed:
                    budget_changed.append(f"{layer.name} {side} ({layout.describe()})")
                sides.append(layout)
            self.layouts[layer.name] = (sides[0], sides[1])
        if budget_changed:
            warnings.warn(
                f"K-FAC: factor_memory={cfg.factor_memory} bytes: these factors would take "
                f"more, and are stored as blocks or diagonals instead: "
                f"{', '.join(budget_changed)}",
                stacklevel=4,
            )

    # ---- statistics ---------------------------------------------------------------------
    def accumulate(
        self,
        layer: LayerHelper,
        inputs: Tensor,
        grad_output: Tensor,
        acc: KroneckerStats | BlockStats | None,
    ) -> KroneckerStats | BlockStats:
        if isinstance(layer, BlockHelper):
            return self._accumulate_blocks(layer, inputs, grad_output, acc)
        g = layer.g_rows(grad_output)
        acc, beta = self._kronecker_sums(layer, acc, g)
        a_layout, g_layout = self._layouts_of(layer)
        if a_layout.kind == "full" or layer.a_diagonal:
            # the helper's own way (a convolution's skips the patch matrix of the whole input)
            layer.a_factor_update(inputs, acc.a_sum, beta=beta)
        elif a_layout.kind == "diagonal":
            _add_into(acc.a_sum, layer.a_square_sum(inputs, acc.a_sum.dtype)[0], beta)
        else:
            self._blocked_input_update(layer, inputs, acc.a_sum, beta)
        _side_update(g_layout, acc.g_sum, g, beta)
        acc.rows += g.shape[1]  # one output-gradient row per input row
        acc.examples += layer.batch_size(inputs)
        return acc

    def _blocked_input_update(
        self, layer: KroneckerHelper, inputs: Tensor, a: Tensor, beta: float
    ) -> None:
        """``a <- beta a + Σ ã ãᵀ`` on the diagonal blocks only, from the rows of a few
        examples at a time (a convolution's patches of the whole batch may be large)."""
        a_layout = self._layouts_of(layer)[0]
        if inputs.dim() <= layer.unbatched_dims or inputs.shape[0] <= 1:
            _side_update(a_layout, a, layer.a_rows(inputs), beta)
            return
        rows_per_example = layer.rows_count(inputs[:1])
        sizes = a_layout.block_sizes()
        blocked = rows_per_example * inputs.shape[0] * layer.groups * sum(b * b for b in sizes)
        whole = layer.a_full_if_cheaper(inputs, blocked)  # a convolution's correlations
        if whole is not None:
            _add_into(a, a_layout.diagonal_blocks(whole.to(a.dtype)), beta)
            return
        per_example = max(1, rows_per_example * layer.a_dim * layer.groups)
        step = max(1, CHUNK_ELEMENTS // per_example)
        for start in range(0, inputs.shape[0], step):
            rows = layer.a_rows(inputs[start : start + step])
            _side_update(a_layout, a, rows, beta if start == 0 else 1.0)

    def _accumulate_rows(
        self, layer: KroneckerHelper, a: Tensor, g: Tensor, acc: KroneckerStats | None
    ) -> KroneckerStats:
        """Fold rows already built (``a_rows`` / ``g_rows`` of a layer with a full ``A``)
        into ``acc`` (a new one when None): ``Σ ã ãᵀ``, ``Σ g gᵀ`` and the row count, not
        the examples. Subclasses that need the rows for statistics of their own build
        them once and call this for the factors."""
        acc, beta = self._kronecker_sums(layer, acc, g)
        a_layout, g_layout = self._layouts_of(layer)
        _side_update(a_layout, acc.a_sum, a, beta)
        _side_update(g_layout, acc.g_sum, g, beta)
        acc.rows += a.shape[1]
        return acc

    def _accumulate_blocks(
        self, layer: BlockHelper, inputs: Tensor, grad_output: Tensor, acc: BlockStats | None
    ) -> BlockStats:
        d = layer.per_example_grads(inputs, grad_output).to(self.config.stat_dtype)
        if layer.block_mode == "full":
            outer = torch.einsum("nci,ncj->cij", d, d)
        else:
            outer = d.square().sum(0)
        if acc is None:
            acc = BlockStats(fisher_sum=outer)
        else:
            acc.fisher_sum.add_(outer)
        acc.examples += d.shape[0]
        return acc

    def _fresh_statistics(
        self, stats: Mapping[str, KroneckerStats | BlockStats]
    ) -> dict[str, tuple[Tensor, Tensor | None]]:
        """The new factors of each layer with statistics: ``(A, G)``, or ``(F, None)``
        for a blocks layer (``F = n Σ_n d_n d_nᵀ``: the per-example gradients of a loss
        that is a batch mean, rescaled by ``n``, averaged)."""
        fresh: dict[str, tuple[Tensor, Tensor | None]] = {}
        for name, acc in stats.items():
            if isinstance(acc, BlockStats):
                if acc.examples > 0:
                    fresh[name] = (acc.fisher_sum * acc.examples, None)
            elif acc.rows > 0:
                fresh[name] = (acc.a_sum / acc.rows, acc.g_sum * acc.examples)
        return fresh

    def update(self, stats: Mapping[str, KroneckerStats | BlockStats]) -> None:
        fresh = self._fresh_statistics(stats)
        if not fresh:
            return
        finite = to_host(
            [
                torch.isfinite(a).all() & (True if g is None else torch.isfinite(g).all())
                for a, g in fresh.values()
            ]
        )
        for (name, (a_new, g_new)), ok in zip(fresh.items(), finite, strict=True):
            if not ok:
                self.nonfinite_updates += 1
                continue
            state = self._state[name]
            a_new = a_new.to(self.config.factor_dtype)
            g_new = None if g_new is None else g_new.to(self.config.factor_dtype)
            decay = min(1.0 - 1.0 / (state.updates + 1), self.config.factor_decay)
            if state.a_factor is None or decay == 0.0:
                state.a_factor, state.g_factor = a_new, g_new
            else:
                # Out of place on purpose: `state.source` may still reference the old
                # factors the current inverse came from.
                state.a_factor = torch.lerp(a_new, state.a_factor, decay)
                if g_new is not None:
                    state.g_factor = torch.lerp(g_new, state.g_factor, decay)
            state.updates += 1

    def factors(self, name: str) -> tuple[Tensor, Tensor] | None:
        """The current ``(A, G)`` of layer ``name`` (None before the first update)."""
        state = self._state[name]
        return None if state.a_factor is None else (state.a_factor, state.g_factor)

    # ---- inverses -----------------------------------------------------------------------
    def refresh(self, damping: float) -> None:
        ready = {name: st for name, st in self._state.items() if st.a_factor is not None}
        if self.comm is None:
            self._compute_inverses(
                [(name, st, st.a_factor, st.g_factor, damping) for name, st in ready.items()]
            )
            return

        # Distributed: each layer's decompositions go to one rank (by cost Σ n³), each rank
        # batches the layers it owns, the results are broadcast, so every rank holds the
        # same inverses.
        def compute_many(names: Sequence[str]) -> dict[str, dict[str, Tensor | None]]:
            self._compute_inverses(
                [(n, ready[n], ready[n].a_factor, ready[n].g_factor, damping) for n in names]
            )
            return {n: ready[n].inverse for n in names}

        shared = self.comm.share(
            {n: self._refresh_cost(st) for n, st in ready.items()}, compute_many=compute_many
        )
        for name, state in ready.items():
            state.inverse = shared[name]
            state.source = (state.a_factor, state.g_factor)
            state.refresh_damping = float(damping)

    @staticmethod
    def _refresh_cost(state: _LayerState) -> float:
        """The cost model of a layer's refresh: ``Σ batch · n³`` over its matrix factors
        (``batch`` the groups, times the blocks of a blocked factor)."""
        return float(
            sum(
                f[..., 0, 0].numel() * f.shape[-1] ** 3
                for f in (state.a_factor, state.g_factor)
                if f is not None and f.dim() >= 3
            )
        )

    def _compute_inverses(
        self, items: Sequence[tuple[str, _LayerState, Tensor, Tensor | None, float]]
    ) -> None:
        """Fill ``state.inverse`` (and the factors and damping it came from) for every
        ``(name, state, a, g, damping)`` item: ``g`` None is a blocks layer whose Fisher
        blocks are ``a``; a diagonal ``A`` (``a`` one dimension short of ``g``) has the
        identity as eigenbasis, ``q_a`` None.

        One batched eigendecomposition (or Cholesky factorisation) per factor size: the A
        and G factors of all layers and the blocks of the normalisation layers are grouped
        by ``(n, dtype, device)`` (each possibly a ``(groups, n, n)`` batch itself),
        decomposed together in ``inverse_dtype`` and split back. The results are those of
        one solver call per matrix (``per_layer_refresh`` in the tests' helpers) up to the
        solver's round-off (a batched and a single call need not sum in the same order;
        eigenvectors may differ in sign, or by a rotation inside a cluster of equal
        eigenvalues, which changes no preconditioned direction), fallbacks and jitter
        included, which stay per matrix. Nothing is stored unless every decomposition
        succeeds."""
        cfg = self.config
        dtype = cfg.inverse_dtype
        eigen = cfg.inverse_method == "eigen"
        inverses: list[dict[str, Tensor | None]] = [{} for _ in items]
        # jobs: (matrix, label, item index, key(s) of the result); the keys are inserted
        # now, in the per-layer path's order, and filled once the solvers have run
        eig_jobs: list[tuple[Tensor, str, int, str, str]] = []
        chol_jobs: list[tuple[Tensor, float | Tensor, int, str]] = []
        for i, (name, _, a, g, damping) in enumerate(items):
            inv = inverses[i]
            if g is None:  # blocks layer: the (C, k, k) Fisher blocks, (C, k) diagonal
                if a.dim() == 2:
                    inv["block_diag"] = a.to(dtype).clamp_min(0)
                elif eigen:
                    inv.update(block_d=None, block_q=None)
                    eig_jobs.append((a, f"{name} (blocks)", i, "block_d", "block_q"))
                else:
                    inv["block_inv"] = None
                    chol_jobs.append((a, damping, i, "block_inv"))
                continue
            a_layout, g_layout = self.layouts[name]
            if eigen:
                for side, f, layout in (("a", a, a_layout), ("g", g, g_layout)):
                    if layout.kind == "diagonal":
                        inv.update({f"d_{side}": f.clamp_min(0).to(dtype), f"q_{side}": None})
                    else:
                        inv.update({f"d_{side}": None, f"q_{side}": None})
                        label = f"{name} ({side.upper()})"
                        eig_jobs.append((f, label, i, f"d_{side}", f"q_{side}"))
                if cfg.damping_mode == "factored":
                    # π depends only on the factors: keep it, apply the current λ per step.
                    inv["pi"] = self._pi(name, a, g).to(dtype)
            else:
                pi = self._pi(name, a, g)
                root = math.sqrt(damping)
                for side, f, layout, damp in (
                    ("a", a, a_layout, pi * root),
                    ("g", g, g_layout, root / pi),
                ):
                    if layout.kind == "diagonal":
                        shifted = f.to(dtype).clamp_min(0) + damp.to(dtype)[:, None]
                        inv[f"{side}_inv_diag"] = 1.0 / shifted
                    else:
                        inv[f"{side}_inv"] = None
                        if layout.kind == "blocks":
                            damp = damp[:, None]  # the same damping for every block
                        chol_jobs.append((f, damp, i, f"{side}_inv"))
        with self._progress(eig_jobs, chol_jobs) as report:
            for chunk in _chunks_by_size([job[0] for job in eig_jobs]):
                jobs = [eig_jobs[j] for j in chunk]
                decomposed = symmetric_eigh_many(
                    [job[0] for job in jobs], dtype, names=[job[1] for job in jobs]
                )
                for (_, _, i, key_d, key_q), (d, q) in zip(jobs, decomposed, strict=True):
                    inverses[i][key_d], inverses[i][key_q] = d, q
                report([job[0] for job in jobs])
            for chunk in _chunks_by_size([job[0] for job in chol_jobs]):
                jobs = [chol_jobs[j] for j in chunk]
                inverted = damped_inverse_cholesky_many(
                    [job[0] for job in jobs], [job[1] for job in jobs], dtype
                )
                for (_, _, i, key), inv in zip(jobs, inverted, strict=True):
                    inverses[i][key] = inv
                report([job[0] for job in jobs])
        for (_, state, a, g, damping), inv in zip(items, inverses, strict=True):
            state.inverse = inv  # type: ignore[assignment]
            state.source = (a, g)
            state.refresh_damping = float(damping)

    def _pi(self, name: str, a: Tensor, g: Tensor) -> Tensor:
        """Factored Tikhonov's ``π = √((tr A / dim A) / (tr G / dim G))`` per group, from
        factors in any layout (the blocks hold every diagonal entry of the factor, and
        the padding none)."""
        a_layout, g_layout = self.layouts[name]
        if a_layout.kind != "blocks" and g_layout.kind == "full":
            return pi_correction(a, g)  # the diagonal-A case included
        means = []
        for f, layout in ((a, a_layout), (g, g_layout)):
            diag = f if layout.kind == "diagonal" else f.diagonal(dim1=-2, dim2=-1)
            diag = diag.reshape(f.shape[0], -1).to(
                torch.float32 if f.dtype in _HALF_DTYPES else f.dtype
            )
            means.append(diag.sum(-1) / layout.dim)
        ta, tg = means
        ok = (ta > 0) & (tg > 0)
        return torch.where(
            ok, ta / torch.where(ok, tg, torch.ones_like(tg)), torch.ones_like(ta)
        ).sqrt()

    @contextmanager
    def _progress(
        self, eig_jobs: Sequence[tuple[Any, ...]], chol_jobs: Sequence[tuple[Any, ...]]
    ) -> Iterator[Callable[[Sequence[Tensor]], None]]:
        """Yield the function that reports a batch of decompositions done: it prints a
        line to stderr when ``progress`` is True, or when it is None and the estimated
        cost ``Σ batch · n³`` exceeds :data:`PROGRESS_MIN_COST` on the CPU (only at the
        first such refresh); otherwise it does nothing."""
        matrices = [job[0] for job in (*eig_jobs, *chol_jobs)]
        cost = sum(m[..., 0, 0].numel() * m.shape[-1] ** 3 for m in matrices)
        show = self.config.progress
        if show is None:
            show = (
                not self._progress_shown
                and cost > PROGRESS_MIN_COST
                and all(m.device.type == "cpu" for m in matrices)
            )
        if not show or not matrices:
            yield lambda done: None
            return
        self._progress_shown = True
        total = sum(m[..., 0, 0].numel() for m in matrices)
        sizes: dict[int, int] = {}
        for m in matrices:
            sizes[m.shape[-1]] = sizes.get(m.shape[-1], 0) + m[..., 0, 0].numel()
        plan = ", ".join(f"{c} x {n}" for n, c in sorted(sizes.items(), reverse=True))
        kind = "eigendecompositions" if eig_jobs else "Cholesky inverses"
        print(
            f"secondorder: K-FAC refresh: {total} {kind} to compute ({plan}); this may take "
            "a while (progress=False silences this)",
            file=sys.stderr,
            flush=True,
        )
        start = time.perf_counter()
        done = 0

        def report(batch: Sequence[Tensor]) -> None:
            nonlocal done
            count = sum(m[..., 0, 0].numel() for m in batch)
            done += count
            print(
                f"secondorder: K-FAC refresh: {done}/{total} done ({count} of size "
                f"{batch[0].shape[-1]}), {time.perf_counter() - start:.1f} s",
                file=sys.stderr,
                flush=True,
            )

        yield report

    def precondition(self, grads: Mapping[Tensor, Tensor], damping: float) -> dict[Tensor, Tensor]:
        """The directions of every covered layer with inverses. Layers whose inverses have
        the same shapes (ResNet stages repeat one convolution shape; normalisation layers
        share their block size) are preconditioned together: their gradients are stacked
        along the groups (channels) dimension and go through one set of batched products,
        so a step dispatches a few operations per shape instead of per layer."""
        out: dict[Tensor, Tensor] = {}
        batches: dict[Any, list[tuple[LayerHelper, Tensor]]] = {}
        for layer in self.layers:
            inv = self._state[layer.name].inverse
            if not inv or layer.weight not in grads:
                continue
            if isinstance(layer, BlockHelper):
                blocks = layer.grad_blocks(grads)
                key = ("blocks", *sorted((k, tuple(v.shape[1:])) for k, v in inv.items()))
                batches.setdefault((*key, blocks.dtype, blocks.device), []).append((layer, blocks))
                continue
            grad = layer.grad_matrix(grads)
            key = self._batch_key(layer.name, inv, grad)
            if key is None:
                direction = self._apply(inv, grad, damping, layer.name)
                out.update(layer.split_matrix(direction.to(grad.dtype)))
            else:
                batches.setdefault(key, []).append((layer, grad))
        for key, items in batches.items():
            names = [layer.name for layer, _ in items]
            if len(items) == 1:
                stacked, grad = self._state[names[0]].inverse, items[0][1]
            else:
                stacked = self._stacked_inverse(names)
                grad = torch.cat([g for _, g in items])
            if key[0] == "blocks":
                direction = self._apply_blocks(stacked, grad, damping)
            else:
                direction = self._apply(stacked, grad, damping, names[0])
            parts = direction.split([g.shape[0] for _, g in items])
            for (layer, g), part in zip(items, parts, strict=True):
                if isinstance(layer, BlockHelper):
                    out.update(layer.split_blocks(part.to(g.dtype)))
                else:
                    out.update(layer.split_matrix(part.to(g.dtype)))
        return out

    def _batch_key(self, name: str, inv: Mapping[str, Any], grad: Tensor) -> Any:
        """Layers with equal keys can be preconditioned in one batch: the eigen path, the
        same factor layouts and inverse shapes, dtype and device. None: alone."""
        if "d_g" not in inv or "pi" in inv:
            return None
        a_layout, g_layout = self.layouts[name]
        return (
            tuple(grad.shape[1:]),
            grad.dtype,
            grad.device,
            a_layout,
            g_layout,
            *(
                None if inv[key] is None else tuple(inv[key].shape[1:])
                for key in ("q_a", "q_g", "d_a", "d_g")
            ),
        )

    def _stacked_inverse(self, names: Sequence[str]) -> dict[str, Tensor | None]:
        """The inverses of layers ``names`` concatenated along the groups dimension; cached
        until a refresh replaces one of them."""
        invs = [self._state[name].inverse for name in names]
        key = tuple(names)
        cached = self._stack_cache.get(key)
        if cached is not None and all(a is b for a, b in zip(cached[0], invs, strict=True)):
            return cached[1]
        stacked = {
            k: None if invs[0][k] is None else torch.cat([inv[k] for inv in invs]) for k in invs[0]
        }
        self._stack_cache[key] = (invs, stacked)
        return stacked

    def _apply(self, inv: dict[str, Tensor], grad: Tensor, damping: float, name: str) -> Tensor:
        grad = grad.to(self.config.inverse_dtype)
        a_layout, g_layout = self.layouts[name]
        x = a_layout.pad(g_layout.pad(grad, -2), -1)
        if "g_inv" in inv or "g_inv_diag" in inv:
            if "g_inv" in inv:
                x = _left(inv["g_inv"], x)
            else:
                x = inv["g_inv_diag"][:, :, None] * x
            if "a_inv" in inv:
                x = _right(x, inv["a_inv"])
            else:
                x = x * inv["a_inv_diag"][:, None, :]
            return a_layout.unpad(g_layout.unpad(x, -2), -1)
        v = self._to_eigenbasis(inv, x)
        d_g, d_a = inv["d_g"].flatten(1), inv["d_a"].flatten(1)
        if "pi" in inv:
            root = damping**0.5
            pi = inv["pi"][:, None]
            denom = (d_g + root / pi)[:, :, None] * (d_a + root * pi)[:, None, :]
        else:
            denom = (d_g[:, :, None] * d_a[:, None, :]).add_(damping)
        # in place where v is a new tensor (not the gradient itself: diagonal factors)
        fresh = inv["q_a"] is not None or inv["q_g"] is not None
        v = v.div_(denom) if fresh else v / denom
        v = self._from_eigenbasis(inv, v)
        return a_layout.unpad(g_layout.unpad(v, -2), -1)

    @staticmethod
    def _to_eigenbasis(inv: Mapping[str, Tensor | None], x: Tensor) -> Tensor:
        """``Q_Gᵀ x Q_A`` for a gradient ``x`` in the padded layouts ``(groups, G, A)``
        (block-diagonal ``Q`` for blocked factors, the identity for diagonal ones)."""
        q_a, q_g = inv["q_a"], inv["q_g"]
        if q_g is not None:
            x = _left(q_g.transpose(-1, -2), x)
        return x if q_a is None else _right(x, q_a)

    @staticmethod
    def _from_eigenbasis(inv: Mapping[str, Tensor | None], v: Tensor) -> Tensor:
        """``Q_G v Q_Aᵀ``: the inverse of :meth:`_to_eigenbasis`."""
        q_a, q_g = inv["q_a"], inv["q_g"]
        if q_g is not None:
            v = _left(q_g, v)
        return v if q_a is None else _right(v, q_a.transpose(-1, -2))

    def _apply_blocks(self, inv: dict[str, Tensor], blocks: Tensor, damping: float) -> Tensor:
        """``(F_c + λI)⁻¹ d_c`` for every channel ``c`` of a blocks layer; ``blocks``
        is ``(C, k)``."""
        x = blocks.to(self.config.inverse_dtype)
        if "block_diag" in inv:
            return x / (inv["block_diag"] + damping)
        if "block_inv" in inv:
            return (inv["block_inv"] @ x.unsqueeze(-1)).squeeze(-1)
        q = inv["block_q"]
        v = (q.transpose(-1, -2) @ x.unsqueeze(-1)).squeeze(-1) / (inv["block_d"] + damping)
        return (q @ v.unsqueeze(-1)).squeeze(-1)

    # ---- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        layers = {}
        for name, state in self._state.items():
            if state.a_factor is None:
                continue
            entry: dict[str, Any] = {
                "a_factor": state.a_factor,
                "g_factor": state.g_factor,
                "updates": state.updates,
            }
            if state.source is not None:
                entry["refresh_damping"] = state.refresh_damping
                a_src, g_src = state.source
                if a_src is not state.a_factor or g_src is not state.g_factor:
                    entry["source_a_factor"], entry["source_g_factor"] = a_src, g_src
            layers[name] = entry
        return {"layers": layers, "nonfinite_updates": self.nonfinite_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        layers = state.get("layers", {})
        unknown = sorted(set(layers) - set(self._state))
        if unknown:
            raise ValueError(
                f"K-FAC state has layers {unknown} that this model does not have "
                f"(its layers: {sorted(self._state)}); was it saved from a different model?"
            )
        new_states = {}
        pending = []  # the inverses to recompute, all together once every entry is checked
        for name, entry in layers.items():
            layer = self._by_name[name]
            a_shape, g_shape = self._factor_shapes(layer)
            a = self._checked(layer, entry["a_factor"], a_shape)
            g = self._checked(layer, entry["g_factor"], g_shape)
            st = _LayerState(a_factor=a, g_factor=g, updates=int(entry["updates"]))
            if "refresh_damping" in entry:
                a_src = self._checked(layer, entry.get("source_a_factor", a), a_shape)
                g_src = self._checked(layer, entry.get("source_g_factor", g), g_shape)
                pending.append((name, st, a_src, g_src, entry["refresh_damping"]))
            new_states[name] = st
        self._compute_inverses(pending)
        self._state = {name: new_states.get(name, _LayerState()) for name in self._state}
        self.nonfinite_updates = int(state.get("nonfinite_updates", 0))

    def _kronecker_sums(
        self, layer: KroneckerHelper, acc: KroneckerStats | None, like: Tensor
    ) -> tuple[KroneckerStats, float]:
        """``acc``, or new (uninitialised) sums shaped for ``layer``'s layouts on ``like``'s
        device, with the ``beta`` the first addition uses (0: the fresh contents are
        ignored)."""
        if acc is not None:
            return acc, 1.0
        dtype = self.config.stat_dtype
        a_shape, g_shape = self._factor_shapes(layer)
        sums = KroneckerStats(
            a_sum=like.new_empty(a_shape, dtype=dtype), g_sum=like.new_empty(g_shape, dtype=dtype)
        )
        return sums, 0.0

    def _layouts_of(self, layer: KroneckerHelper) -> tuple[FactorLayout, FactorLayout]:
        """The ``(A, G)`` layouts of ``layer`` or, for a tied module's helper (the capture
        hands those to :meth:`accumulate`), of the primary layer that owns the weight."""
        return self.layouts[self._owner[id(layer)]]

    def _factor_shapes(self, layer: LayerHelper) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """Shapes of a layer's stored ``(A, G)`` (``(F, None)`` for blocks layers), as
        their :attr:`layouts` store them."""
        if isinstance(layer, BlockHelper):
            c, k = layer.block_count, layer.block_size
            return ((c, k, k) if layer.block_mode == "full" else (c, k)), None
        a_layout, g_layout = self._layouts_of(layer)
        return a_layout.shape(layer.groups), g_layout.shape(layer.groups)

    # ---- report -------------------------------------------------------------------------
    def describe_layers(self) -> list[dict[str, Any]]:
        """One entry per covered layer: ``name``, ``type`` (the module's class), ``a`` and
        ``g`` (how each factor is kept: ``"full 785"``, ``"3 blocks of 683"``,
        ``"diagonal 32000"``; a normalisation layer's per-channel blocks in ``a``),
        ``factor_bytes`` (what the factors take once accumulated, in ``factor_dtype``)
        and ``state_bytes`` (what the estimator holds for the layer now: factors,
        inverses and the factors they came from, and a subclass's own state)."""
        itemsize = torch.empty((), dtype=self.config.factor_dtype).element_size()
        rows = []
        for layer in self.layers:
            a_shape, g_shape = self._factor_shapes(layer)
            if isinstance(layer, BlockHelper):
                a = f"{layer.block_count} blocks of {layer.block_size}" + (
                    "" if layer.block_mode == "full" else " (diagonal)"
                )
                g = "-"
            else:
                a_layout, g_layout = self.layouts[layer.name]
                a, g = a_layout.describe(), g_layout.describe()
            numel = math.prod(a_shape) + (0 if g_shape is None else math.prod(g_shape))
            rows.append(
                {
                    "name": layer.name,
                    "type": type(layer.module).__name__,
                    "a": a,
                    "g": g,
                    "factor_bytes": numel * itemsize,
                    "state_bytes": _bytes(self._layer_tensors(layer.name)),
                }
            )
        return rows

    def _layer_tensors(self, name: str) -> list[Tensor]:
        """Every tensor the estimator holds for layer ``name`` (subclasses add theirs)."""
        state = self._state[name]
        tensors = [state.a_factor, state.g_factor, *(state.source or ())]
        tensors += list(state.inverse.values())
        return [t for t in tensors if isinstance(t, Tensor)]

    def _checked(
        self, layer: LayerHelper, factor: Tensor | None, expected: tuple[int, ...] | None
    ) -> Tensor | None:
        if expected is None or factor is None:
            if (expected is None) != (factor is None):
                raise ValueError(
                    f"K-FAC state for layer {layer.name!r} does not match the layer's kind "
                    "(Kronecker factors vs per-channel blocks); "
                    "was it saved from a different model?"
                )
            return None
        if tuple(factor.shape) != tuple(expected):
            raise ValueError(
                f"K-FAC state for layer {layer.name!r} has a factor of shape "
                f"{tuple(factor.shape)} where the layer needs {tuple(expected)}; "
                "was it saved from a different model, or with other max_factor_dim / "
                "diagonal_factor_dim / factor_memory settings?"
            )
        return factor.to(device=layer.weight.device, dtype=self.config.factor_dtype)


def _bytes(tensors: Sequence[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class KFAC(CurvatureOptimizer):
    r"""K-FAC (Martens & Grosse, 2015; https://arxiv.org/abs/1503.05671), with the
    convolution factors of Grosse & Martens (2016; https://arxiv.org/abs/1602.01407).

    For every supported layer (``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding``, and
    the normalisation layers' per-channel blocks: see :mod:`secondorder.layers`) the
    gradient ``∇`` (bias as the last column) is replaced by

    .. math::
        V = Q_G \left[\frac{Q_G^\top \nabla Q_A}{d_G d_A^\top + \lambda}\right] Q_A^\top
          = (A \otimes G + \lambda I)^{-1} \operatorname{vec}(\nabla)

    (default ``damping_mode="eigen"``; see :mod:`secondorder.estimators.kfac` for the
    factored-Tikhonov form), then KL-clipped and fed to the base update. Parameters
    of other layers get the base update on their raw gradient.

    Args:
        model (nn.Module): the network (not ``model.parameters()``).
        lr (float, optional): learning rate (default: 1e-2).
        params, config: see :class:`~secondorder.CurvatureOptimizer`.

    Example::

        opt = KFAC(model, lr=0.05, damping=1e-3, curvature_every=1, inverse_every=10)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    With ``fisher_type="mc"`` the ``G`` statistics come from labels sampled from the
    model (an unbiased estimate of the true Fisher) instead of the true labels:
    :meth:`~secondorder.CurvatureOptimizer.sample_fisher` back-propagates their loss,
    for the statistics only, before the usual backward::

        opt = KFAC(model, fisher_type="mc", likelihood="categorical")
        for x, y in loader:
            opt.zero_grad()
            logits = model(x)
            opt.sample_fisher(logits)  # samples labels, back-propagates for the statistics
            F.cross_entropy(logits, y).backward()  # the gradient the update uses
            opt.step()
    """

    config_class = KFACConfig

    estimator_class = KFACEstimator
