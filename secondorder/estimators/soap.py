"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al., 2024,
https://arxiv.org/abs/2409.11321).

Every parameter with two dimensions is a matrix ``G`` (``m x n``). Its statistics are EMAs
``L ← β L + (1 − β) G Gᵀ``, ``R ← β R + (1 − β) Gᵀ G`` (``shampoo_beta``, by default Adam's
β₂), and every ``inverse_every`` steps the basis is refreshed from their eigenvectors, ``L =
Q_L Λ Q_Lᵀ``, ``R = Q_R Λ' Q_Rᵀ``. Each step then runs Adam in the rotated space:

    G' = Q_Lᵀ G Q_R
    m ← β₁ m + (1 − β₁) G',   v ← β₂ v + (1 − β₂) G'²     (Adam's moments, rotated space)
    u = Q_L [ (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε) ] Q_Rᵀ

and ``u`` is handed to the base update, SGD with momentum 0: ``w ← w − lr·u``. A side
longer than ``max_factor_dim`` (or of size 1) keeps ``Q = I`` and no statistic
(``max_factor_dim=0``: no rotation at all, the step is Adam's). Parameters with fewer than
two dimensions get Adam's direction (no rotation).

**Tensors** (a conv weight ``(out, in, kh, kw)``): by default (``merge_dims=False``, the
reference's) every dimension ``d`` has its own statistic ``L_d ← β L_d + (1 − β) G_(d)
G_(d)ᵀ`` over the mode-``d`` unfolding and its own basis, and the rotation acts along every
dimension (``G' = G ×_1 Q_1ᵀ ×_2 … ×_k Q_kᵀ``, the Kronecker product of the bases on
``vec(G)``); the matrix case above is ``k = 2``. A 64-channel 3 x 3 conv then has factors of
64, 64, 3 and 3 instead of 64 and 576. ``merge_dims=True`` takes the weight as the matrix
``(out, in·kh·kw)``, as :mod:`~secondorder.estimators.shampoo` (Distributed Shampoo's
merging).

**The refresh.** By default (``basis_refresh="qr"``, the reference's) the first basis comes
from an eigendecomposition and every later one from one step of power iteration: the old
columns are sorted by their estimated eigenvalues ``diag(Q_oldᵀ L Q_old)``, descending, ``v``
is permuted alike along that side, and ``Q_new = qr(L Q_old,sorted)`` (a basis close to the
old one, column by column). With ``basis_refresh="eigh"`` every basis is a full
eigendecomposition, whose columns may come in another order, with other signs, and mixed
within clusters of close eigenvalues; ``v`` (the second moments of the coordinates of the old
basis) is then carried over as the diagonal, in the new basis, of the second-moment matrix it
stands for (``Σ v_ij (q_i q_iᵀ) ⊗ (r_j r_jᵀ)``), with ``P = Q_oldᵀ Q_new`` on each side:

    v ← (P_L ∘ P_L)ᵀ v (P_R ∘ P_R)

When the two bases agree up to order and signs this *is* the reference's permutation.

**The first moment** is kept in the rotated space, ``m' = Q_Lᵀ m Q_R``: it is linear in the
gradients, so ``m' ← β₁ m' + (1 − β₁) G'`` with the ``G'`` the second moment needs anyway, and
at a refresh ``m' ← P_Lᵀ m' P_R``. That is the reference's ``Q_Lᵀ m Q_R`` to round-off with two
matrix products a step fewer (the reference keeps ``m`` in the original space and rotates it
at every step).

**The first step.** A parameter whose basis is built from its first gradient alone (the
refresh that follows the first statistics) does not move at that step: in that basis
``G' = Q_Lᵀ G Q_R`` is diagonal (the singular values) up to round-off, and Adam's first
step ``G'/|G'|`` would turn every round-off entry into a ±1 as large as the signal (the
direction of a float32 first step had a cosine of 0.30 with the gradient, Adam's sign step
0.84). So that step only makes the basis, as the reference's first step makes only its
preconditioner, and Adam's moments and bias correction start at the next gradient.
Parameters without a rotation (fewer than two dimensions, sides above ``max_factor_dim``)
take Adam's step from the first gradient (the reference skips their first step too), and
a decoupled weight decay still applies at that step.

Differences from the reference: the statistics and the basis refresh come *before* the step
(the framework's order; the reference updates them after its step); ε is added as
``torch.optim.Adam`` adds it (``√(v/(1 − β₂ᵗ)) + ε``; the reference adds it to ``√v``); the
first basis's columns come in ascending order of eigenvalue (the reference flips them to
descending: Adam is the same in any order).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import Interval, Schedule, UseCurvature
from ..config import OptimizerConfig, fixed, hyperparameter
from ..linalg import symmetric_eigh_many
from ..optimizer import CurvatureOptimizer
from .base import ParameterEstimator
from .shampoo import as_matrix, check_beta, mode_products, statistics_dtype


def _check_max_dim(value: Any) -> None:
    if value is not None and not (
        isinstance(value, int) and not isinstance(value, bool) and value >= 0
    ):
        raise ValueError(f"max_factor_dim must be an int >= 0 or None, got {value!r}")


@dataclass(kw_only=True)
class SOAPConfig(OptimizerConfig):
    """Hyperparameters of SOAP (:class:`SOAP` and :class:`SOAPEstimator`), checked on
    construction; the defaults are the reference implementation's (betas (0.95, 0.95), ε 1e-8,
    basis every 10 steps by one power iteration and QR, sides up to 10000; its lr 3e-3 and
    weight decay 0.01, decoupled, are in ``configs/optimizers/soap.yaml``) but for ``lr``:
    1e-2, chosen by measurement (see ``secondorder/docs/shampoo.md``). The base update is SGD with
    momentum 0 on SOAP's Adam direction: there is no grafting, KL clipping, damping or
    curvature-off mode (without the rotation SOAP is Adam: ``max_factor_dim=0``)."""

    lr: float = hyperparameter(
        1e-2,
        "learning rate. 1e-2: on digits-mlp, digits-cnn and toy-regression (10 epochs, 2 "
        "seeds, benchmarks/lr_sensitivity.py) every seed reached the target at lr 1e-2..0.1 / "
        "3e-3..0.1 / 3e-3..3e-2, and 1e-2 had the lowest final loss on all three; the "
        "reference's 3e-3 missed digits-mlp",
    )
    soap_betas: tuple[float, float] = hyperparameter(
        (0.95, 0.95), "Adam's (β₁, β₂) in the rotated space, each in [0, 1)"
    )
    soap_eps: float = hyperparameter(1e-8, "Adam's ε in the rotated space, >= 0")
    shampoo_beta: float | None = hyperparameter(
        None, "β in (0, 1] of the EMAs of L and R (1: sums); None: β₂ of ``soap_betas``"
    )
    max_factor_dim: int | None = hyperparameter(
        10000,
        "a side (rows or columns of the matrix) longer than this is not rotated (Q = I, no "
        "statistic); 0: no rotation at all (Adam); None: no limit",
    )
    merge_dims: bool = hyperparameter(
        False,
        "a parameter of three or more dimensions (a conv weight) as one matrix "
        "``(shape[0], rest)`` (Distributed Shampoo's merging) instead of one statistic and "
        "basis per dimension (the reference's default, ``merge_dims=False``: a "
        "``(64, 64, 3, 3)`` weight has factors of 64, 64, 3 and 3, not 64 and 576)",
    )
    inverse_every: Interval = hyperparameter(
        10, "refresh the basis at steps that are multiples of this (and after the first update)"
    )
    decoupled_weight_decay: bool = hyperparameter(
        True, "``w <- w (1 - lr wd)`` (AdamW's, the reference's) instead of adding ``wd w`` to G"
    )
    basis_refresh: str = hyperparameter(
        "qr",
        'how a refresh finds the new basis: ``"qr"`` (the reference\'s: the old columns sorted '
        "by their estimated eigenvalues ``diag(Qᵀ L Q)``, v permuted alike, then one power "
        "iteration and a QR decomposition, ``Q ← qr(L Q)``; about 1.5x cheaper than an "
        'eigendecomposition on one CPU thread at size 512) or ``"eigh"`` (a full '
        "eigendecomposition, v carried by ``(P∘P)``); the first basis is always an "
        "eigendecomposition",
    )
    momentum: float | None = fixed(0.0)
    graft: str | None = fixed(None)
    kl_clip: float | None = fixed(None)
    damping: Schedule = fixed(1e-30)
    use_curvature: UseCurvature = fixed(None)
    precondition: bool = fixed(True)

    def __post_init__(self) -> None:
        super().__post_init__()
        betas = self.soap_betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"soap_betas must be a pair (beta1, beta2), got {betas!r}")
        self.soap_betas = (
            check_beta("soap_betas[0]", betas[0], closed=False),
            check_beta("soap_betas[1]", betas[1], closed=False),
        )
        if not (isinstance(self.soap_eps, (int, float)) and 0 <= self.soap_eps < float("inf")):
            raise ValueError(f"soap_eps must be a finite number >= 0, got {self.soap_eps!r}")
        if self.shampoo_beta is not None:
            self.shampoo_beta = check_beta("shampoo_beta", self.shampoo_beta, closed=True)
        _check_max_dim(self.max_factor_dim)
        if not isinstance(self.merge_dims, bool):
            raise TypeError(f"merge_dims must be a bool, got {type(self.merge_dims).__name__}")
        if self.basis_refresh not in BASIS_REFRESHES:
            raise ValueError(
                f"basis_refresh must be one of {BASIS_REFRESHES}, got {self.basis_refresh!r}"
            )


#: the ways :class:`SOAPEstimator` refreshes a basis
BASIS_REFRESHES = ("qr", "eigh")


def _mode(x: Tensor, m: Tensor, d: int) -> Tensor:
    """``Σ_i x[..., i, ...] m[i, a]`` along dimension ``d`` (for a matrix: ``mᵀ x`` along the
    rows, ``x m`` along the columns)."""
    if x.dim() == 2:
        return m.T @ x if d == 0 else x @ m
    return torch.tensordot(x, m, dims=([d], [0])).movedim(-1, d)


def _products(x: Tensor, matrices: list[Tensor | None]) -> Tensor:
    """``Σ_i x[..., i, ...] M_d[i, a]`` along every dimension ``d`` with a matrix: Shampoo's
    :func:`~secondorder.estimators.shampoo.mode_products` on ``x`` alone."""
    batched = [None if m is None else m.unsqueeze(0) for m in matrices]
    return mode_products(x.unsqueeze(0), batched)[0]


def _unfold(x: Tensor, d: int) -> Tensor:
    """The mode-``d`` unfolding of ``x``: ``(shape[d], rest)``."""
    if x.dim() == 2:
        return x if d == 0 else x.T
    return x.movedim(d, 0).reshape(x.shape[d], -1)


class _State:
    """One parameter's SOAP state: the moments in the parameter's shape (a matrix, or with
    ``merge_dims=False`` the tensor itself), one statistic and basis per dimension (None: a
    dimension that is not rotated)."""

    __slots__ = ("bases", "exp_avg", "exp_avg_sq", "seen", "stats", "step")

    def __init__(self, p: Tensor, max_dim: int | None, merge_dims: bool = False) -> None:
        dtype = statistics_dtype(p)
        if p.dim() < 2:
            shape: tuple[int, ...] = tuple(p.shape)
        elif p.dim() == 2 or merge_dims:
            shape = tuple(as_matrix(p).shape)
        else:
            shape = tuple(p.shape)
        self.exp_avg = torch.zeros(shape, dtype=dtype, device=p.device)
        self.exp_avg_sq = torch.zeros(shape, dtype=dtype, device=p.device)
        self.step = 0  # Adam steps taken (its bias correction)
        self.seen = 0  # gradients preconditioned, the skipped first one included
        self.stats: list[Tensor | None] = []
        self.bases: list[Tensor | None] = []
        if p.dim() >= 2:
            for n in shape:
                rotated = n > 1 and (max_dim is None or n <= max_dim)
                self.stats.append(
                    torch.zeros(n, n, dtype=dtype, device=p.device) if rotated else None
                )
                self.bases.append(None)

    @property
    def rotated(self) -> bool:
        """Whether some dimension has a statistic."""
        return any(stat is not None for stat in self.stats)

    def rotate(self, x: Tensor) -> Tensor:
        """``x`` in the bases: ``Q_dᵀ`` along every dimension ``d`` with one."""
        return _products(x, self.bases)

    def rotate_back(self, x: Tensor) -> Tensor:
        """The inverse of :meth:`rotate`: ``Q_d`` along every dimension with a basis."""
        return _products(x, [None if q is None else q.T for q in self.bases])


class SOAPEstimator(ParameterEstimator):
    """SOAP's statistics, bases and Adam moments (rotated second moment).

    Args:
        params (list[nn.Parameter]): the parameters (those with >= 2 dims are rotated; the
            others get Adam's direction).
        config (SOAPConfig, optional): hyperparameters.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        config: SOAPConfig | None = None,
        names: list[str] | None = None,
    ) -> None:
        super().__init__(params, names)
        self.config = config if config is not None else SOAPConfig()
        cfg = self.config
        self.states = {p: _State(p, cfg.max_factor_dim, cfg.merge_dims) for p in self._params}

    @property
    def shampoo_beta(self) -> float:
        beta = self.config.shampoo_beta
        return self.config.soap_betas[1] if beta is None else beta

    def update(self, stats: Mapping[Tensor, Tensor]) -> None:
        beta = self.shampoo_beta
        for p, state in self.states.items():
            g = stats.get(p)
            if g is None or not state.rotated:
                continue
            x = g.detach().to(state.exp_avg.dtype).reshape(state.exp_avg.shape)
            for d, stat in enumerate(state.stats):
                if stat is not None:
                    unfolded = _unfold(x, d)
                    _ema_outer(stat, unfolded, unfolded.T, beta)

    def refresh(self, damping: float) -> None:
        qr = self.config.basis_refresh == "qr"
        sides = [
            (state, d, stat)
            for state in self.states.values()
            for d, stat in enumerate(state.stats)
            if stat is not None
        ]
        # (state, dimension) -> the new basis; the reference's QR step where an old one exists
        new: dict[tuple[int, int], Tensor] = {}
        eigh = []
        for state, d, stat in sides:
            old = state.bases[d]
            if qr and old is not None:
                new[id(state), d] = _power_qr(state, d, stat, old)
            else:
                eigh.append((state, d, stat))
        for dtype in {stat.dtype for _, _, stat in eigh}:
            group = [e for e in eigh if e[2].dtype == dtype]
            decompositions = symmetric_eigh_many([stat for _, _, stat in group], dtype)
            for (state, d, _), (_, vectors) in zip(group, decompositions, strict=True):
                old = state.bases[d]
                # (P ∘ P), P = Q_oldᵀ Q_new (no old basis: the identity), along dimension d
                carry = (vectors if old is None else old.T @ vectors).square()
                state.exp_avg_sq = _mode(state.exp_avg_sq, carry, d)
                new[id(state), d] = vectors
        for state in self.states.values():
            if not state.rotated:
                continue
            # the first moment lives in the rotated space: m' ← P_dᵀ m' along each dimension
            m = state.exp_avg
            for d in range(len(state.bases)):
                basis = new.get((id(state), d))
                if basis is None:
                    continue
                old = state.bases[d]
                m = _mode(m, basis if old is None else old.T @ basis, d)
                state.bases[d] = basis
            state.exp_avg = m

    def precondition(self, grads: Mapping[Tensor, Tensor], damping: float) -> dict[Tensor, Tensor]:
        beta1, beta2 = self.config.soap_betas
        eps = self.config.soap_eps
        out = {}
        for p, state in self.states.items():
            g = grads.get(p)
            if g is None:
                continue
            state.seen += 1
            if state.seen == 1 and any(q is not None for q in state.bases):
                # The basis was just built from this one gradient: in it G' is diagonal up to
                # round-off, and Adam's first step, G'/|G'|, would give every round-off entry
                # the size of a signal one. Only the basis is made (the reference's first
                # step makes only the preconditioner too); Adam starts at the next gradient.
                out[p] = torch.zeros_like(g)
                continue
            matrix = g.detach().to(state.exp_avg.dtype).reshape(state.exp_avg.shape)  # or tensor
            state.step += 1
            rotated = state.rotate(matrix)
            # both moments in the rotated space (the first one is linear in G: rotating it
            # here, once per refresh, is rotating it at every step)
            state.exp_avg.lerp_(rotated, 1 - beta1)
            state.exp_avg_sq.mul_(beta2).addcmul_(rotated, rotated, value=1 - beta2)
            bias_correction1 = 1 - beta1**state.step
            bias_correction2_sqrt = (1 - beta2**state.step) ** 0.5
            denom = (state.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            direction = state.exp_avg / denom / bias_correction1
            out[p] = state.rotate_back(direction).reshape(g.shape).to(g.dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone()

        return {
            "states": [
                {
                    "step": s.step,
                    "seen": s.seen,
                    "exp_avg": s.exp_avg.clone(),
                    "exp_avg_sq": s.exp_avg_sq.clone(),
                    "stats": [copy(t) for t in s.stats],
                    "bases": [copy(t) for t in s.bases],
                }
                for s in self.states.values()
            ]
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = [_upgrade(dict(entry)) for entry in state["states"]]
        if len(saved) != len(self.states):
            raise ValueError(
                f"SOAP state holds {len(saved)} parameters, this optimizer {len(self.states)}; "
                "was it saved from a different model?"
            )
        for (p, s), entry in zip(self.states.items(), saved, strict=True):
            pairs = [("exp_avg", entry["exp_avg"], s.exp_avg)]
            pairs.append(("exp_avg_sq", entry["exp_avg_sq"], s.exp_avg_sq))
            stats, bases = list(entry["stats"]), list(entry["bases"])
            if len(stats) != len(s.stats) or len(bases) != len(s.bases):
                stats = bases = [None] * len(s.stats)  # reported below as a shape mismatch
                pairs.append(("stats", entry["stats"], s.stats))
            for d, (theirs, like) in enumerate(zip(stats, s.stats, strict=True)):
                pairs.append((f"stats[{d}]", theirs, like))
                if bases[d] is not None:
                    pairs.append((f"bases[{d}]", bases[d], like))
            for key, theirs, like in pairs:
                if isinstance(like, list) or _shape(theirs) != _shape(like):
                    raise ValueError(
                        f"SOAP state has {key} of shape {_shape(theirs)} for parameter "
                        f"{self.names[p]} of shape {tuple(p.shape)}, where this optimizer has "
                        f"{_shape(like)}; was it saved from a different model, max_factor_dim "
                        "or merge_dims?"
                    )
        for s, entry in zip(self.states.values(), saved, strict=True):
            like = s.exp_avg
            s.exp_avg = entry["exp_avg"].to(like).clone()
            s.exp_avg_sq = entry["exp_avg_sq"].to(like).clone()
            s.stats = [None if t is None else t.to(like).clone() for t in entry["stats"]]
            s.bases = [None if t is None else t.to(like).clone() for t in entry["bases"]]
            s.step = int(entry["step"])
            # a state saved before the first step was skipped: every gradient was an Adam step
            s.seen = int(entry.get("seen", entry["step"]))


def _shape(t: Any) -> Any:
    if isinstance(t, list):
        return f"{len(t)} dimensions"
    return "none" if t is None else tuple(t.shape)


def _upgrade(entry: dict[str, Any]) -> dict[str, Any]:
    """A saved state of the earlier matrix-only format (``left``, ``right``, ``left_basis``,
    ``right_basis``) in the per-dimension one (``stats``, ``bases``)."""
    if "stats" in entry:
        return entry
    two = entry.get("left") is not None or entry.get("right") is not None
    two = two or entry["exp_avg"].dim() == 2
    entry["stats"] = [entry.get("left"), entry.get("right")] if two else []
    entry["bases"] = [entry.get("left_basis"), entry.get("right_basis")] if two else []
    return entry


def _power_qr(state: _State, d: int, stat: Tensor, old: Tensor) -> Tensor:
    """The reference's refresh of dimension ``d``: the columns of ``old`` sorted by the
    estimated eigenvalues ``diag(oldᵀ L old)`` (descending), ``v`` permuted alike along that
    dimension, then one power-iteration step, ``qr(L old_sorted)``."""
    power = stat @ old
    order = torch.argsort((old * power).sum(0), descending=True)
    state.exp_avg_sq = state.exp_avg_sq.index_select(d, order)
    return torch.linalg.qr(power[:, order]).Q


def _ema_outer(stat: Tensor, a: Tensor, b: Tensor, beta: float) -> None:
    """``stat ← β stat + (1 − β) a b`` (β = 1: ``stat + a b``), in place, one product."""
    if beta == 1.0:
        stat.addmm_(a, b)
    else:
        stat.addmm_(a, b, beta=beta, alpha=1 - beta)


class SOAP(CurvatureOptimizer):
    r"""SOAP (Vyas et al., 2024): Adam in the eigenbasis of Shampoo's ``L`` and ``R``.

    Each parameter with two or more dimensions, as a matrix ``G``, is rotated to
    ``Q_Lᵀ G Q_R`` (``Q`` the eigenvectors of the EMAs ``L`` of ``G Gᵀ`` and ``R`` of
    ``Gᵀ G``, refreshed every ``inverse_every`` steps), where Adam's second moment lives; the
    first moment lives in the original space and is rotated when used. The Adam direction is
    rotated back and the base update takes ``w ← w − lr·u`` (SGD, momentum 0). Parameters
    with fewer than two dimensions get Adam's direction. Coupled weight decay, if chosen, is
    added to the gradient before the moments (as Adam); the default is decoupled (AdamW's).

    Args:
        model (nn.Module or iterable of Parameters): what to optimise (no hooks).
        lr (float, optional): learning rate (default: 1e-2).
        params, config: see :class:`~secondorder.CurvatureOptimizer`.

    Example::

        opt = SOAP(model.parameters(), weight_decay=0.01)
    """

    requires_model = False
    l2_before_precondition = True

    config_class = SOAPConfig
    estimator_class = SOAPEstimator
