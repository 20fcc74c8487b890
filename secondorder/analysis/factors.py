"""Where the factors come from: an optimizer's state, or a fresh pass over a few batches.

Every function returns float64 square matrices on the CPU, keyed by layer name (the module's
qualified name, as in ``opt.estimator.layers``): ``{name: (A, G)}`` for K-FAC factors and
``{name: (A_diag, G_diag)}`` (vectors) for AdaFisher's diagonals, both in the order input
factor, output factor. A grouped convolution's ``(groups, d, d)`` factors become one
block-diagonal matrix; a diagonal ``A`` (an Embedding's token frequencies) a diagonal matrix.
Normalisation layers (per-channel ``2 x 2`` Fisher blocks, no Kronecker factors) are left out.

**The fresh factor pass** (:func:`fresh_kfac_factors`, :func:`fresh_adafisher_diagonals`)
computes the statistics of the model at its current weights without training it and without
touching ``.grad``: it attaches the capture hooks of a :class:`~secondorder.KFACEstimator`
(or :class:`~secondorder.AdaFisherEstimator`) with float64 statistics, runs the forward pass
of every batch and ``torch.autograd.grad`` of ``loss_fn(model(x), y) / k`` (``k`` batches:
the loss of the concatenated batch when the batches have equal sizes, the gradient
accumulation convention of the optimizers), absorbs the statistics in one update (so the
factors *are* the statistics, no moving average) and removes the hooks. The model is run in
the mode it is in (statistics are recorded in eval mode too); its parameters and ``.grad`` are
left as they were (only what its own forward pass changes changes: BatchNorm running
statistics in train mode). The factors follow the optimizers' conventions:
``A = mean over rows of ã ãᵀ``, ``G = n · Σ_rows g gᵀ`` (empirical Fisher, true labels).
AdaFisher's raw diagonals of the same batches are exactly the diagonals of these ``A`` and
``G`` (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import ModelCapture, SkipPattern, find_layers
from ..estimators.adafisher import AdaFisherConfig, AdaFisherEstimator
from ..estimators.base import CurvatureEstimator
from ..estimators.kfac import KFACConfig, KFACEstimator
from ..layers import KroneckerHelper
from .spectra import diagonal_dominance, factor_summary

__all__ = [
    "FactorPair",
    "adafisher_diagonals",
    "analyze_factors",
    "compare_diagonals",
    "factor_matrix",
    "fresh_adafisher_diagonals",
    "fresh_kfac_factors",
    "kfac_factors",
]

#: ``(input factor, output factor)`` of one layer: ``(A, G)`` matrices or diagonals
FactorPair = tuple[Tensor, Tensor]
Batches = Iterable[tuple[Tensor, Tensor]]
LossFn = Callable[[Tensor, Tensor], Tensor]


def factor_matrix(factor: Tensor) -> Tensor:
    """An estimator's factor as one float64 square matrix on the CPU: ``(groups, d, d)`` ->
    block-diagonal ``(groups·d, groups·d)``; ``(groups, d)`` (a diagonal factor) -> the
    diagonal matrix of its entries."""
    m = factor.detach().to(device="cpu", dtype=torch.float64)
    if m.dim() == 3 and m.shape[1] == m.shape[2]:
        return m[0] if m.shape[0] == 1 else torch.block_diag(*m.unbind(0))
    if m.dim() == 2:
        return torch.diag(m.reshape(-1))
    raise ValueError(f"not a K-FAC factor layout (groups, d, d) or (groups, d): {tuple(m.shape)}")


def _diagonal(factor: Tensor) -> Tensor:
    return factor.detach().to(device="cpu", dtype=torch.float64).reshape(-1)


def kfac_factors(optimizer: Any) -> dict[str, FactorPair]:
    """The current ``(A, G)`` of every layer of a K-FAC-family optimizer (``KFAC``, ``EKFAC``,
    ``TwoLevelKFAC``, or anything whose ``estimator`` is a ``KFACEstimator``): the moving
    averages the optimizer preconditions with. Layers without statistics yet are left out.

    Raises:
        TypeError: the optimizer has no K-FAC estimator (the message names what it has).
    """
    est = getattr(optimizer, "estimator", None)
    if not isinstance(est, KFACEstimator):
        raise TypeError(
            f"kfac_factors needs a K-FAC-family optimizer (KFAC, EKFAC, TwoLevelKFAC); "
            f"{type(optimizer).__name__} has estimator {type(est).__name__}"
        )
    out = {}
    for layer in est.layers:
        pair = est.factors(layer.name)
        if isinstance(layer, KroneckerHelper) and pair is not None:
            out[layer.name] = (factor_matrix(pair[0]), factor_matrix(pair[1]))
    return out


def adafisher_diagonals(optimizer: Any, *, raw: bool = True) -> dict[str, FactorPair]:
    """AdaFisher's diagonals of every layer, as ``(A_diag, G_diag)`` vectors (float64).

    ``raw=True``: the statistics of its last curvature update before normalisation, ``H_D``
    and ``S_D`` (the diagonals of K-FAC's ``A`` and ``G`` for that batch; layers not yet
    updated are left out). ``raw=False``: the min-max normalised moving averages ``H`` and
    ``S`` its update divides by (all ones before the first update).

    Raises:
        TypeError: the optimizer has no AdaFisher estimator.
    """
    est = getattr(optimizer, "estimator", None)
    if not isinstance(est, AdaFisherEstimator):
        raise TypeError(
            f"adafisher_diagonals needs an AdaFisher or AdaFisherW optimizer; "
            f"{type(optimizer).__name__} has estimator {type(est).__name__}"
        )
    out = {}
    for layer in est.layers:
        if not isinstance(layer, KroneckerHelper):
            continue
        pair = est.last_raw_diagonals(layer.name) if raw else est.diagonals(layer.name)
        if pair is not None:
            s_diag, h_diag = pair
            out[layer.name] = (_diagonal(h_diag), _diagonal(s_diag))
    return out


def _capture_pass(
    model: nn.Module,
    batches: Batches,
    loss_fn: LossFn,
    estimator: Callable[[list], CurvatureEstimator],
    skip_layers: Iterable[SkipPattern] | None,
    layer_options: Mapping[str, Any] | None,
) -> tuple[CurvatureEstimator, dict[str, Any]]:
    """Record the statistics of ``batches`` (no training) and return the estimator and them."""
    batches = list(batches)
    if not batches:
        raise ValueError("the fresh factor pass needs at least one batch")
    params = [p for p in model.parameters() if p.requires_grad]
    layers, _ = find_layers(model, set(params), skip_layers, layer_options)
    if not layers:
        raise ValueError("the model has no layer with Kronecker factors (Linear, Conv, ...)")
    est = estimator(layers)
    capture = ModelCapture(layers, est.accumulate, record_in_eval=True, model=model)
    try:
        with torch.enable_grad():
            for x, y in batches:
                loss = loss_fn(model(x), y) / len(batches)
                torch.autograd.grad(loss, params, allow_unused=True)
        stats = capture.collect()
    finally:
        capture.remove()
    return est, stats


def fresh_kfac_factors(
    model: nn.Module,
    batches: Batches,
    loss_fn: LossFn,
    *,
    skip_layers: Iterable[SkipPattern] | None = None,
    layer_options: Mapping[str, Any] | None = None,
) -> dict[str, FactorPair]:
    """K-FAC's ``(A, G)`` of ``model`` at its current weights from ``batches`` (a fresh factor
    pass, see the module docstring), float64 matrices by layer name.

    Args:
        model: the network (its mode, train or eval, is used as it is).
        batches: ``(inputs, targets)`` pairs; their statistics are pooled.
        loss_fn: ``(outputs, targets) -> scalar``, a mean over the batch.
        skip_layers, layer_options: as for :class:`~secondorder.KFAC`.
    """
    # the analysis studies whole factors: no blocks, no diagonal fallback, no budget
    config = KFACConfig(
        factor_dtype=torch.float64,
        inverse_dtype=torch.float64,
        max_factor_dim=None,
        diagonal_factor_dim=None,
        factor_memory=None,
    )
    est, stats = _capture_pass(
        model,
        batches,
        loss_fn,
        lambda layers: KFACEstimator(layers, config),
        skip_layers,
        layer_options,
    )
    est.update(stats)
    return kfac_factors(_Holder(est))


def fresh_adafisher_diagonals(
    model: nn.Module,
    batches: Batches,
    loss_fn: LossFn,
    *,
    skip_layers: Iterable[SkipPattern] | None = None,
    layer_options: Mapping[str, Any] | None = None,
) -> dict[str, FactorPair]:
    """AdaFisher's raw diagonals ``(H_D, S_D)`` (as ``(A_diag, G_diag)`` vectors, float64) of
    ``model`` at its current weights from ``batches``: the same pass as
    :func:`fresh_kfac_factors` with AdaFisher's statistics."""
    config = AdaFisherConfig(factor_dtype=torch.float64)
    est, stats = _capture_pass(
        model,
        batches,
        loss_fn,
        lambda layers: AdaFisherEstimator(layers, config),
        skip_layers,
        layer_options,
    )
    est.update(stats)
    return adafisher_diagonals(_Holder(est))


class _Holder:
    """Looks like an optimizer to :func:`kfac_factors` / :func:`adafisher_diagonals`."""

    def __init__(self, estimator: CurvatureEstimator) -> None:
        self.estimator = estimator


def analyze_factors(factors: Mapping[str, FactorPair]) -> dict[str, dict[str, Any]]:
    """Per layer: ``{"A": summary, "G": summary, "kron_dominance": dom(A)·dom(G)}`` with the
    summaries of :func:`~secondorder.analysis.spectra.factor_summary` (eigenvalue range,
    condition number, Gershgorin interval, diagonal dominance, ...). ``kron_dominance`` is the
    diagonal dominance of the Kronecker block ``A ⊗ G``: the share of its squared Frobenius
    mass a diagonal approximation (AdaFisher's) keeps."""
    out: dict[str, dict[str, Any]] = {}
    for name, (a, g) in factors.items():
        out[name] = {
            "A": factor_summary(a),
            "G": factor_summary(g),
            "kron_dominance": diagonal_dominance(a) * diagonal_dominance(g),
        }
    return out


def compare_diagonals(
    factors: Mapping[str, FactorPair], diagonals: Mapping[str, FactorPair]
) -> dict[str, dict[str, float]]:
    """How AdaFisher's diagonals relate to full K-FAC factors, per layer present in both:
    ``max_rel_diff_A`` / ``max_rel_diff_G`` (``max |d − diag(M)| / max |diag(M)|``: about
    1e-7 when both come from the same batches and weights, since AdaFisher's statistics are
    the factors' diagonals) and the dominances ``dominance_A``, ``dominance_G``,
    ``kron_dominance`` of the full factors (how much of them the diagonals are)."""
    out: dict[str, dict[str, float]] = {}
    for name in factors.keys() & diagonals.keys():
        a, g = factors[name]
        a_diag, g_diag = diagonals[name]
        entry = {}
        for key, full, diag in (("A", a, a_diag), ("G", g, g_diag)):
            ref = torch.diagonal(full)
            if ref.shape != diag.shape:
                raise ValueError(
                    f"layer {name!r}: diagonal of {key} has {diag.numel()} entries, the factor "
                    f"{ref.numel()}"
                )
            scale = float(ref.abs().max())
            diff = float((diag - ref).abs().max())
            entry[f"max_rel_diff_{key}"] = diff / scale if scale > 0 else diff
            entry[f"dominance_{key}"] = diagonal_dominance(full)
        entry["kron_dominance"] = entry["dominance_A"] * entry["dominance_G"]
        out[name] = entry
    return {name: out[name] for name in factors if name in out}
