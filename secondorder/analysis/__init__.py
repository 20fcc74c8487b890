"""Curvature analysis: what the Kronecker factors look like, and where optimizers go.

Per layer of a model, from a K-FAC-family optimizer's factors (:func:`kfac_factors`), an
AdaFisher optimizer's diagonals (:func:`adafisher_diagonals`) or a fresh factor pass over a few
batches without training (:func:`fresh_kfac_factors`, :func:`fresh_adafisher_diagonals`):
eigenvalue spectra of ``A`` and ``G``, condition numbers, Gershgorin disc bounds against the
true eigenvalue range, diagonal dominance (the premise of AdaFisher's diagonal approximation)
and the 2-D FFT magnitude ("frequency field") of each factor (:func:`analyze_factors`,
:mod:`secondorder.analysis.spectra`); the loss on a 2-D plane of weight space with optimizer
trajectories on it (:mod:`secondorder.analysis.landscape`); pictures of all of it
(:mod:`secondorder.analysis.plots`); and the command line ``python -m secondorder.analysis``
(:func:`run_analysis`).

Example::

    from secondorder.analysis import analyze_factors, fresh_kfac_factors, plots

    factors = fresh_kfac_factors(model, [(x, y)], F.cross_entropy)  # {layer: (A, G)}
    report = analyze_factors(factors)
    report["0"]["A"]["diagonal_dominance"], report["0"]["G"]["condition_number"]
    plots.plot_gershgorin(factors, "gershgorin.png")
"""

from . import plots
from .factors import (
    adafisher_diagonals,
    analyze_factors,
    compare_diagonals,
    factor_matrix,
    fresh_adafisher_diagonals,
    fresh_kfac_factors,
    kfac_factors,
)
from .landscape import (
    flat_weights,
    loss_surface,
    pca_directions,
    project,
    random_directions,
    unflatten,
)
from .pipeline import run_analysis
from .spectra import (
    condition_number,
    diagonal_dominance,
    eigenvalues,
    factor_summary,
    frequency_field,
    gershgorin_discs,
    gershgorin_interval,
)

__all__ = [
    "adafisher_diagonals",
    "analyze_factors",
    "compare_diagonals",
    "condition_number",
    "diagonal_dominance",
    "eigenvalues",
    "factor_matrix",
    "factor_summary",
    "flat_weights",
    "frequency_field",
    "fresh_adafisher_diagonals",
    "fresh_kfac_factors",
    "gershgorin_discs",
    "gershgorin_interval",
    "kfac_factors",
    "loss_surface",
    "pca_directions",
    "plots",
    "project",
    "random_directions",
    "run_analysis",
    "unflatten",
]
