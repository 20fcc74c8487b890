"""E-KFAC: eigenvalue-corrected K-FAC (George, Laurent, Bouthillier, Ballas & Vincent, 2018,
"Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis").

K-FAC preconditions a layer's gradient ``∇`` (shape ``(g_dim, a_dim)``, bias last) in the
eigenbasis of its factors, ``A = Q_A diag(d_A) Q_Aᵀ`` and ``G = Q_G diag(d_G) Q_Gᵀ``, dividing
each coordinate by ``d_G d_Aᵀ + λ``. E-KFAC keeps the basis and replaces the Kronecker
product of eigenvalues by the second moment of the per-example gradients in that basis:

.. math::
    S = \\operatorname{mean}_n \\left(Q_G^\\top \\nabla_n Q_A\\right)^{\\odot 2}, \\qquad
    V = Q_G \\left[\\frac{Q_G^\\top \\nabla Q_A}{S + \\lambda}\\right] Q_A^\\top

(``S`` has the gradient's shape ``(groups, g_dim, a_dim)``; the square is element-wise). ``S``
is the diagonal of the empirical Fisher block in the Kronecker eigenbasis, so E-KFAC is never
worse than K-FAC in Frobenius norm (George et al., Lemma 1), and exact for a single datum.

Per-example gradients, with the K-FAC conventions (:mod:`secondorder.estimators.kfac`): for a
loss that is a mean over a batch of ``n`` examples, ``∇_n = n Σ_{rows of example n} g ãᵀ``
(a sequence's tokens, a convolution's output positions, are rows of one example). The
projection is applied to the rows before the per-example sum, ``Q_Gᵀ ∇_n Q_A =
n Σ_rows (Q_Gᵀ g)(Q_Aᵀ ã)ᵀ``, so each statistic costs two small products per row and at most
``n · g_dim · a_dim`` numbers at once (none at all with one row per example).

Schedule (``k`` is the optimizer step, 0-based):

* the K-FAC factors are EMA-updated at steps that are multiples of ``curvature_every``;
* the eigenbasis is recomputed at multiples of ``inverse_every``, and ``S`` is then *reset* to
  the K-FAC products ``d_G d_Aᵀ`` from the same factors: right after a refresh E-KFAC's
  direction is K-FAC's;
* at multiples of ``scale_every`` the per-example statistics of that step update ``S`` by an
  EMA in the current basis. The reset counts as the first update in the new basis, and the
  k-th statistics after it are mixed in with decay ``min(1 - 1/(k+1), scale_decay)`` (K-FAC's
  ramp): until the cap, ``S`` is the plain mean of the reset and the statistics since.

The estimator records only what its step uses (capture is the costly part): factor sums at
factor steps; projected per-example squares at scale steps, except at refresh steps (the
reset would overwrite them) and before the first basis exists: the estimator tells the
optimizer which passes to record (:meth:`EKFACEstimator.wants_statistics`).

Layers: every Kronecker layer (:class:`~secondorder.layers.KroneckerHelper`) with a full ``A``
(Linear, Conv2d) gets E-KFAC. Kronecker layers with a diagonal ``A`` (``a_diagonal``:
Embedding) and block layers (:class:`~secondorder.layers.BlockHelper`: normalisation) are
left to the plain :class:`KFACEstimator` code path: their
statistics, inverses and directions are K-FAC's (they are recorded at factor steps only).

Approximations: the per-example statistics of a layer run several times in one forward pass
(or of tied weights) add the squares of each use's contribution, ignoring the cross terms
between uses. With ``layer_options={"linear_sequence": "reduce"}`` a Linear layer's rows are
already one per example (mean input, summed output gradient), and ``∇_n`` is built from
them: exact when the positions share one output gradient, as the helper documents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from .._checks import Interval, check_interval, is_due
from .._host import to_host
from ..config import hyperparameter
from ..distributed import stat_field
from ..layers import KroneckerHelper, LayerHelper
from ..optimizer import CurvatureOptimizer
from .kfac import KFACConfig, KFACEstimator, KroneckerStats, _right


@dataclass(kw_only=True)
class EKFACConfig(KFACConfig):
    """Hyperparameters of E-KFAC (:class:`EKFAC` and :class:`EKFACEstimator`), checked on
    construction: K-FAC's (:class:`KFACConfig`; ``curvature_every`` is the factor
    interval, ``inverse_every`` the eigenbasis one) and the scalings'. The scalings are kept
    in ``factor_dtype``; projections and directions use ``inverse_dtype``.
    ``inverse_method`` and ``damping_mode`` must stay ``"eigen"`` (E-KFAC lives in the
    eigenbasis)."""

    scale_every: Interval = hyperparameter(1, "scaling update interval, in steps")
    scale_decay: float | None = hyperparameter(
        None, "EMA decay of the scalings, in [0, 1); None means ``factor_decay``"
    )

    def __post_init__(self) -> None:
        if self.inverse_method != "eigen" or self.damping_mode != "eigen":
            raise ValueError(
                "E-KFAC preconditions in the factors' eigenbasis: inverse_method and "
                f"damping_mode must be 'eigen', got {self.inverse_method!r} and "
                f"{self.damping_mode!r}"
            )
        super().__post_init__()
        self.scale_every = check_interval("scale_every", self.scale_every)
        if self.scale_decay is None:
            self.scale_decay = self.factor_decay
        decay = self.scale_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f"scale_decay must be a number in [0, 1), got {decay!r}")


@dataclass
class EigenbasisStats:
    """What the capture hooks accumulate for one E-KFAC layer between two steps."""

    kfac: KroneckerStats | None = None  # the K-FAC factor sums (factor steps only)
    # Σ_n (Q_Gᵀ ∇̂_n Q_A)² with ∇̂_n = Σ_rows g ãᵀ (scale steps only), (groups, g_dim, a_dim)
    scale_sum: Tensor | None = field(default=None, metadata=stat_field("output"))
    # the Q_A it was projected with: statistics from another basis are dropped
    basis: Tensor | None = None
    examples: int = 0  # set by the capture on collect


@dataclass
class _ScaleState:
    scalings: Tensor  # (groups, g_dim, a_dim), factor_dtype
    updates: int  # the reset counts as one


class EKFACEstimator(KFACEstimator):
    """K-FAC factors and eigenbases, with per-coordinate scalings from per-example gradients.

    Args:
        layers (Sequence[LayerHelper]): the covered layers.
        config (EKFACConfig, optional): hyperparameters (default: ``EKFACConfig()``).

    Three schedules, in steps: the factors are updated every ``curvature_every``, the
    eigenbasis recomputed every ``inverse_every``, the scalings updated every
    ``scale_every``. :meth:`wants_statistics` asks for the passes of a step where either
    statistic is due and notes which ones the recorded passes must produce (no scalings at
    refresh steps, where the reset discards them). Used without an optimizer (no call to
    :meth:`wants_statistics`), every recorded pass produces both.
    """

    def __init__(
        self,
        layers: Sequence[LayerHelper],
        config: EKFACConfig | None = None,
    ) -> None:
        config = config if config is not None else EKFACConfig()
        if not isinstance(config, EKFACConfig):
            raise TypeError(f"config must be an EKFACConfig, got {type(config).__name__}")
        super().__init__(layers, config)
        #: ``(factors, scalings)``: what the passes recorded now must produce (None: both)
        self._plan: tuple[bool, bool] | None = None
        #: names of the layers E-KFAC covers; the others take the K-FAC path
        self.eigen_layers = [
            layer.name
            for layer in self.layers
            if isinstance(layer, KroneckerHelper) and not layer.a_diagonal
        ]
        self._eigen = set(self.eigen_layers)
        self._kfac_params = {
            p for layer in self.layers if layer.name not in self._eigen for p in layer.params
        }
        self._scales: dict[str, _ScaleState] = {}

    # ---- statistics ---------------------------------------------------------------------
    @property
    def has_scalings(self) -> bool:
        """Whether some layer has an eigenbasis (and so scalings to update)."""
        return bool(self._scales)

    def wants_statistics(self, step: int, *, curvature_due: bool, refresh_due: bool) -> bool:
        scalings = (
            is_due("scale_every", self.config.scale_every, step)
            and not refresh_due
            and self.has_scalings
        )
        self._plan = (curvature_due, scalings)
        return curvature_due or scalings

    def accumulate(self, layer: LayerHelper, inputs: Tensor, grad_output: Tensor, acc: Any) -> Any:
        record_factors, record_scales = (True, True) if self._plan is None else self._plan
        name = self._owner[id(layer)]
        if name not in self._eigen:
            return super().accumulate(layer, inputs, grad_output, acc) if record_factors else acc
        basis = self._state[name].inverse if record_scales and name in self._scales else None
        if not (record_factors or basis):
            return acc
        a = layer.a_rows(inputs)
        g = layer.g_rows(grad_output)
        acc = EigenbasisStats() if acc is None else acc
        if record_factors:
            acc.kfac = self._accumulate_rows(layer, a, g, acc.kfac)
        n = layer.batch_size(inputs)
        if basis:
            a_layout, g_layout = self.layouts[name]
            squares = self._projected_squares(a_layout.pad(a), g_layout.pad(g), basis, n)
            squares = squares.to(self.config.stat_dtype)
            acc.scale_sum = squares if acc.scale_sum is None else acc.scale_sum.add_(squares)
            acc.basis = basis
        acc.examples += n  # the capture's collect() recounts it once per model forward
        return acc

    def _projected_squares(
        self, a: Tensor, g: Tensor, basis: Mapping[str, Tensor | None], n: int
    ) -> Tensor:
        """``Σ_n (Q_Gᵀ ∇̂_n Q_A)²`` with ``∇̂_n = Σ_{rows of n} g ãᵀ``, ``(groups, G, A)``
        for rows in the padded layouts (a blocked factor's ``Q`` is block diagonal, a
        diagonal factor's the identity)."""
        dtype = self.config.inverse_dtype
        a_proj, g_proj = a.to(dtype), g.to(dtype)
        if basis["q_a"] is not None:
            a_proj = _right(a_proj, basis["q_a"])  # rows of (Q_Aᵀ ã)ᵀ
        if basis["q_g"] is not None:
            g_proj = _right(g_proj, basis["q_g"])  # rows of (Q_Gᵀ g)ᵀ
        per_example = a.shape[1] // n
        if per_example == 1:
            # One row per example: (Q_Gᵀ g)(Q_Aᵀ ã)ᵀ squared is (Q_Gᵀ g)² ((Q_Aᵀ ã)²)ᵀ.
            return g_proj.square().transpose(-1, -2) @ a_proj.square()
        grads = torch.einsum(
            "xnlg,xnla->xnga",
            rearrange(g_proj, "x (n l) g -> x n l g", n=n),
            rearrange(a_proj, "x (n l) a -> x n l a", n=n),
        )
        return grads.square_().sum(1)

    def update(self, stats: Mapping[str, Any]) -> None:
        kfac_stats: dict[str, KroneckerStats] = {}
        fresh: dict[str, Tensor] = {}
        for name, acc in stats.items():
            if acc is None:
                continue
            if not isinstance(acc, EigenbasisStats):
                kfac_stats[name] = acc  # a layer on the K-FAC path
                continue
            if acc.kfac is not None and acc.kfac.rows > 0:
                acc.kfac.examples = acc.examples
                kfac_stats[name] = acc.kfac
            state = self._state[name]
            if acc.scale_sum is not None and acc.basis is state.inverse:
                # mean_n (n ·)² of the unscaled per-example sums: n Σ_n (...)²
                fresh[name] = (acc.scale_sum * acc.examples).to(self.config.factor_dtype)
        super().update(kfac_stats)
        if not fresh:
            return
        finite = to_host([torch.isfinite(s).all() for s in fresh.values()])
        for (name, s_new), ok in zip(fresh.items(), finite, strict=True):
            if not ok:
                self.nonfinite_updates += 1
                continue
            scale = self._scales[name]
            decay = min(1.0 - 1.0 / (scale.updates + 1), self.config.scale_decay)
            scale.scalings = torch.lerp(s_new, scale.scalings, decay)
            scale.updates += 1

    def eigenbasis(self, name: str) -> tuple[Tensor | None, Tensor | None] | None:
        """``(Q_A, Q_G)`` of E-KFAC layer ``name``, ``(groups, a_dim, a_dim)`` and
        ``(groups, g_dim, g_dim)`` (None before the first refresh); a blocked factor's
        is its blocks' ``(groups, k, b, b)``, a diagonal factor's None (the identity)."""
        if name not in self._scales:
            return None
        inv = self._state[name].inverse
        return inv["q_a"], inv["q_g"]

    def scalings(self, name: str) -> Tensor | None:
        """The current scalings ``S`` of layer ``name``, ``(groups, g_dim, a_dim)`` (None
        before the first refresh, and for layers on the K-FAC path); with a blocked
        factor whose blocks are padded, its padded width (:class:`FactorLayout`)."""
        scale = self._scales.get(name)
        return None if scale is None else scale.scalings

    # ---- eigenbasis ---------------------------------------------------------------------
    def refresh(self, damping: float) -> None:
        super().refresh(damping)
        for name in self.eigen_layers:
            inv = self._state[name].inverse
            if inv:
                self._scales[name] = _ScaleState(self._kfac_products(inv), updates=1)

    def _kfac_products(self, inv: Mapping[str, Tensor]) -> Tensor:
        products = inv["d_g"].flatten(1)[:, :, None] * inv["d_a"].flatten(1)[:, None, :]
        return products.to(self.config.factor_dtype)

    def precondition(self, grads: Mapping[Tensor, Tensor], damping: float) -> dict[Tensor, Tensor]:
        kfac_grads = {p: g for p, g in grads.items() if p in self._kfac_params}
        out = super().precondition(kfac_grads, damping)
        dtype = self.config.inverse_dtype
        # layers of one shape go through one batch of products, as in K-FAC's precondition
        batches: dict[Any, list[tuple[LayerHelper, Tensor]]] = {}
        for name in self.eigen_layers:
            layer = self._by_name[name]
            scale = self._scales.get(name)
            if scale is None or layer.weight not in grads:
                continue
            grad = layer.grad_matrix(grads)
            key = self._batch_key(name, self._state[name].inverse, grad)
            key = ("alone", name) if key is None else (*key, tuple(scale.scalings.shape[1:]))
            batches.setdefault(key, []).append((layer, grad))
        for items in batches.values():
            names = [layer.name for layer, _ in items]
            if len(items) == 1:
                inv, grad = self._state[names[0]].inverse, items[0][1]
                scalings = self._scales[names[0]].scalings
            else:
                inv = self._stacked_inverse(names)
                grad = torch.cat([g for _, g in items])
                scalings = torch.cat([self._scales[name].scalings for name in names])
            a_layout, g_layout = self.layouts[names[0]]
            v = self._to_eigenbasis(inv, a_layout.pad(g_layout.pad(grad.to(dtype), -2), -1))
            v = self._from_eigenbasis(inv, v / (scalings.to(dtype) + damping))
            v = a_layout.unpad(g_layout.unpad(v, -2), -1)
            for (layer, g), part in zip(
                items, v.split([g.shape[0] for _, g in items]), strict=True
            ):
                out.update(layer.split_matrix(part.to(g.dtype)))
        return out

    def _layer_tensors(self, name: str) -> list[Tensor]:
        scale = self._scales.get(name)
        return super()._layer_tensors(name) + ([] if scale is None else [scale.scalings])

    # ---- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["scalings"] = {
            name: {"scalings": scale.scalings, "updates": scale.updates}
            for name, scale in self._scales.items()
        }
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("scalings", {})
        unknown = sorted(set(saved) - self._eigen)
        if unknown:
            raise ValueError(
                f"E-KFAC state has scalings for layers {unknown} that this model does not "
                f"precondition with E-KFAC (its layers: {self.eigen_layers}); was it saved "
                "from a different model?"
            )
        super().load_state_dict(state)  # recomputes the eigenbases from the saved sources
        scales = {}
        for name in self.eigen_layers:
            inv = self._state[name].inverse
            if not inv:
                continue
            if name not in saved:
                scales[name] = _ScaleState(self._kfac_products(inv), updates=1)
                continue
            layer = self._by_name[name]
            s = saved[name]["scalings"]
            a_layout, g_layout = self.layouts[name]
            expected = (layer.groups, g_layout.padded_dim, a_layout.padded_dim)
            if tuple(s.shape) != expected:
                raise ValueError(
                    f"E-KFAC state for layer {name!r} has scalings of shape {tuple(s.shape)} "
                    f"where the layer needs {expected}; was it saved from a different model?"
                )
            s = s.to(device=layer.weight.device, dtype=self.config.factor_dtype)
            scales[name] = _ScaleState(s, updates=int(saved[name]["updates"]))
        self._scales = scales


class EKFAC(CurvatureOptimizer):
    r"""E-KFAC, eigenvalue-corrected K-FAC (George et al., 2018;
    https://arxiv.org/abs/1806.03884).

    For every ``nn.Linear`` and ``nn.Conv2d`` the gradient ``∇`` (bias as the last column)
    is replaced by

    .. math::
        V = Q_G \left[\frac{Q_G^\top \nabla Q_A}{S + \lambda}\right] Q_A^\top, \qquad
        S = \operatorname{EMA}\, \operatorname{mean}_n \left(Q_G^\top \nabla_n Q_A\right)^{\odot 2}

    with ``Q_A``, ``Q_G`` the eigenvectors of the K-FAC factors and ``∇_n`` the per-example
    gradients; ``S`` is reset to the K-FAC eigenvalue products ``d_G d_Aᵀ`` at every basis
    refresh (see :mod:`secondorder.estimators.ekfac`). Then KL clipping and the base
    update, as for :class:`~secondorder.KFAC`. Layers with a diagonal ``A`` (Embedding) and
    normalisation layers get K-FAC's direction.

    The three schedules (factors every ``curvature_every`` steps, eigenbasis every
    ``inverse_every``, scalings every ``scale_every``) are the estimator's
    (:class:`EKFACEstimator`): only the passes these need are recorded.

    Args:
        model (nn.Module): the network (not ``model.parameters()``).
        lr (float, optional): learning rate (default: 1e-2).
        params, config: see :class:`~secondorder.CurvatureOptimizer`.

    Example::

        opt = EKFAC(model, lr=0.05, damping=1e-2, curvature_every=1, inverse_every=10)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    """

    config_class = EKFACConfig

    estimator_class = EKFACEstimator
