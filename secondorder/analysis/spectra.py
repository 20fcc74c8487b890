"""Figures of one symmetric matrix (a Kronecker factor), all computed in float64.

* :func:`eigenvalues`: the spectrum, ascending, from ``torch.linalg.eigvalsh`` of the
  symmetrised matrix.
* :func:`gershgorin_discs` / :func:`gershgorin_interval`: disc ``i`` has centre ``M_ii`` and
  radius ``Σ_{j≠i} |M_ij|``; every eigenvalue lies in the union of the discs (Gershgorin's
  circle theorem), so for a symmetric matrix (real eigenvalues) the interval
  ``[min_i (c_i − r_i), max_i (c_i + r_i)]`` contains ``[λ_min, λ_max]``.
* :func:`diagonal_dominance`: ``‖diag(M)‖_F² / ‖M‖_F²``, the share of the matrix's squared
  Frobenius mass on its diagonal. It is 1 exactly when ``M`` is diagonal (and, by convention,
  for the zero matrix) and below 1 as soon as one off-diagonal entry is non-zero. For a
  Kronecker product ``‖diag(A ⊗ G)‖² = ‖diag A‖² ‖diag G‖²`` and ``‖A ⊗ G‖² = ‖A‖² ‖G‖²``,
  so the dominance of ``A ⊗ G`` (the part of a K-FAC block AdaFisher's diagonal Fisher keeps)
  is the product of the factors' dominances.
* :func:`frequency_field`: ``|FFT2(M)|``, shifted so that the zero frequency is in the centre.
  A diagonal matrix's field depends on ``k + l`` only (the identity's is ``n`` on the
  anti-diagonal through the centre and 0 elsewhere), so diagonal mass shows as an
  anti-diagonal line; smooth, correlated entries (a factor of inputs that are all positive,
  say) gather near the centre; a factor whose rows sum to zero (``G`` of a softmax output:
  the logit gradients sum to zero) has a zero row and column through the centre.
* :func:`factor_summary`: all of the above as plain numbers (JSON-ready).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "condition_number",
    "diagonal_dominance",
    "eigenvalues",
    "factor_summary",
    "frequency_field",
    "gershgorin_discs",
    "gershgorin_interval",
]


def _square(m: Tensor) -> Tensor:
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(m.shape)}")
    return m.detach().to(device="cpu", dtype=torch.float64)


def eigenvalues(m: Tensor) -> Tensor:
    """Eigenvalues of the symmetric matrix ``m`` (its symmetric part), ascending, float64."""
    m = _square(m)
    return torch.linalg.eigvalsh((m + m.T) / 2)


def condition_number(eigs: Tensor) -> float:
    """``λ_max / λ_min`` of an ascending spectrum; ``inf`` unless ``λ_min > 0``."""
    low, high = float(eigs[0]), float(eigs[-1])
    return high / low if low > 0 else math.inf


def gershgorin_discs(m: Tensor) -> tuple[Tensor, Tensor]:
    """``(centres, radii)``: ``c_i = M_ii`` and ``r_i = Σ_{j≠i} |M_ij|`` (float64)."""
    m = _square(m)
    centres = torch.diagonal(m).clone()
    radii = m.abs().sum(1) - centres.abs()
    return centres, radii.clamp_min(0)


def gershgorin_interval(m: Tensor) -> tuple[float, float]:
    """``(min_i c_i − r_i, max_i c_i + r_i)``: the real extent of the union of the discs, which
    contains every eigenvalue of ``m``."""
    centres, radii = gershgorin_discs(m)
    return float((centres - radii).min()), float((centres + radii).max())


def diagonal_dominance(m: Tensor) -> float:
    """``‖diag(M)‖_F² / ‖M‖_F²`` in [0, 1]: 1 exactly for a diagonal matrix (1 for the zero
    matrix too), below 1 when any off-diagonal entry is non-zero (float64)."""
    m = _square(m)
    diag = torch.diagonal(m)
    on = float(diag.square().sum())
    # the off-diagonal mass is summed on its own, not as a difference of totals, so that
    # a small one is not lost to cancellation
    off = float((m - torch.diag(diag)).square().sum())
    if off == 0.0:
        return 1.0
    # a non-zero off-diagonal mass below eps of the diagonal's would round the ratio to 1:
    # keep it strictly below 1 (the largest float under 1 then)
    return min(on / (on + off), math.nextafter(1.0, 0.0))


def frequency_field(m: Tensor) -> Tensor:
    """``|FFT2(M)|`` with the zero frequency shifted to the centre (``torch.fft.fftshift``),
    float64, the shape of ``m``."""
    return torch.fft.fftshift(torch.fft.fft2(_square(m)).abs())


def factor_summary(m: Tensor) -> dict[str, Any]:
    """The figures of one factor as plain Python numbers.

    Keys: ``dim``, ``trace``, ``eig_min``, ``eig_max``, ``rank`` (eigenvalues above the
    rounding floor ``dim · eps · max |λ|``), ``condition_number`` (None unless ``λ_min > 0``),
    ``gershgorin`` (``[low, high]``), ``gershgorin_contains`` (whether that interval contains
    ``[λ_min, λ_max]``, with a tolerance of ``dim · eps · ‖M‖_F`` for the rounding of the
    computed eigenvalues), ``gershgorin_width_ratio`` (``(high − low) / (λ_max − λ_min)``: how
    loose the bound is; None when the eigenvalues agree to within that tolerance),
    ``diagonal_dominance`` and ``fft_dc_fraction`` (the share of ``Σ |FFT2(M)|²`` at the zero
    frequency, ``(Σ_ij M_ij)² / (n² ‖M‖_F²)`` by Parseval).
    """
    m = _square(m)
    eigs = eigenvalues(m)
    low, high = gershgorin_interval(m)
    norm = float(torch.linalg.matrix_norm(m))
    tol = m.shape[0] * torch.finfo(torch.float64).eps * norm
    eig_min, eig_max = float(eigs[0]), float(eigs[-1])
    cond = condition_number(eigs)
    field = torch.fft.fft2(m).abs().square()
    total_energy = float(field.sum())
    spread = eig_max - eig_min
    return {
        "dim": m.shape[0],
        "trace": float(torch.trace(m)),
        "eig_min": eig_min,
        "eig_max": eig_max,
        "rank": int((eigs > m.shape[0] * torch.finfo(torch.float64).eps * eigs.abs().max()).sum()),
        "condition_number": cond if math.isfinite(cond) else None,
        "gershgorin": [low, high],
        "gershgorin_contains": low - tol <= eig_min and eig_max <= high + tol,
        "gershgorin_width_ratio": (high - low) / spread if spread > tol else None,
        "diagonal_dominance": diagonal_dominance(m),
        "fft_dc_fraction": float(field[0, 0]) / total_energy if total_energy > 0 else None,
    }
