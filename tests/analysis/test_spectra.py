"""Figures of one factor (secondorder.analysis.spectra) against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from secondorder.analysis import (
    diagonal_dominance,
    eigenvalues,
    factor_summary,
    frequency_field,
    gershgorin_discs,
    gershgorin_interval,
)

from ..helpers import tolerance

_entries = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def spd_matrices(draw: st.DrawFn) -> torch.Tensor:
    """``B Bᵀ + εI`` for a drawn ``B`` (n x k), scaled by a drawn power of ten: SPD."""
    n = draw(st.integers(1, 12))
    k = draw(st.integers(1, 12))
    b = torch.from_numpy(draw(arrays(np.float64, (n, k), elements=_entries)))
    scale = 10.0 ** draw(st.integers(-6, 6))
    shift = draw(st.floats(1e-6, 1.0))
    return scale * (b @ b.T + shift * torch.eye(n, dtype=torch.float64))


@given(spd_matrices())
def test_gershgorin_interval_contains_every_eigenvalue(m: torch.Tensor) -> None:
    low, high = gershgorin_interval(m)
    eigs = torch.linalg.eigvalsh(m)  # the float64 reference, independent of the module
    # an eigenvalue's error is n·eps of the matrix's norm (backward stable, symmetric)
    tol = tolerance(torch.float64, n=m.shape[0]) * float(torch.linalg.matrix_norm(m))
    assert low - tol <= float(eigs[0]) and float(eigs[-1]) <= high + tol
    # and every eigenvalue lies in at least one disc
    centres, radii = gershgorin_discs(m)
    for lam in eigs:
        assert bool(((lam - centres).abs() <= radii + tol).any())
    assert factor_summary(m)["gershgorin_contains"]


def test_gershgorin_discs_by_hand() -> None:
    m = torch.tensor([[4.0, -1.0, 0.5], [-1.0, 3.0, 0.0], [0.5, 0.0, -2.0]])
    centres, radii = gershgorin_discs(m)
    assert centres.tolist() == [4.0, 3.0, -2.0]
    assert radii.tolist() == [1.5, 1.0, 0.5]
    assert gershgorin_interval(m) == (-2.5, 5.5)
    assert centres.dtype == torch.float64


@given(arrays(np.float64, st.integers(1, 10), elements=_entries))
def test_dominance_is_one_exactly_for_diagonal_matrices(diagonal: np.ndarray) -> None:
    assert diagonal_dominance(torch.diag(torch.from_numpy(diagonal))) == 1.0


@given(
    spd_matrices().filter(lambda m: m.shape[0] > 1),
    st.data(),
)
def test_dominance_is_below_one_with_any_off_diagonal_entry(m: torch.Tensor, data) -> None:
    n = m.shape[0]
    i = data.draw(st.integers(0, n - 1))
    j = data.draw(st.integers(0, n - 1).filter(lambda j: j != i))
    d = torch.diag(torch.diagonal(m))
    d[i, j] = d[j, i] = data.draw(st.floats(1e-6, 1e6)) * float(m.abs().max())
    dominance = diagonal_dominance(d)
    assert 0.0 < dominance < 1.0
    reference = float(torch.diagonal(d).square().sum() / d.square().sum())
    # two ways to sum the n² squares (the off-diagonal mass on its own, or with the rest)
    assert dominance == pytest.approx(reference, rel=tolerance(torch.float64, n=n * n))


def test_dominance_examples() -> None:
    assert diagonal_dominance(torch.zeros(3, 3)) == 1.0
    assert diagonal_dominance(torch.ones(2, 2)) == pytest.approx(0.5)
    assert diagonal_dominance(torch.ones(4, 4)) == pytest.approx(0.25)
    # off-diagonal mass far below eps of the diagonal's still reads below 1
    tiny = torch.eye(2, dtype=torch.float64)
    tiny[0, 1] = 1e-12
    assert diagonal_dominance(tiny) < 1.0
    # A ⊗ G: the dominances multiply
    a = torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=torch.float64)
    g = torch.tensor([[1.0, -0.5, 0.1], [-0.5, 2.0, 0.2], [0.1, 0.2, 0.7]], dtype=torch.float64)
    assert diagonal_dominance(torch.kron(a, g)) == pytest.approx(
        diagonal_dominance(a) * diagonal_dominance(g), rel=tolerance(torch.float64, n=36)
    )  # sums over the 36 entries of A ⊗ G


@given(spd_matrices())
def test_eigenvalues_and_summary_match_numpy(m: torch.Tensor) -> None:
    reference = np.linalg.eigvalsh(m.numpy())  # numpy's LAPACK, another build than torch's
    # eigenvalues of a symmetric matrix are accurate to n·eps·‖M‖ (backward stable)
    n = m.shape[0]
    tol = tolerance(torch.float64, n=n)
    top = float(abs(reference).max())
    np.testing.assert_allclose(eigenvalues(m).numpy(), reference, rtol=tol, atol=tol * top)
    summary = factor_summary(m)
    assert summary["dim"] == n
    assert summary["eig_min"] == pytest.approx(reference[0], rel=tol, abs=tol * top)
    assert summary["eig_max"] == pytest.approx(reference[-1], rel=tol)
    # the sum of n positive diagonal entries, in two orders
    assert summary["trace"] == pytest.approx(float(np.trace(m.numpy())), rel=tol)
    if summary["condition_number"] is not None:  # the same two numbers divided
        assert summary["condition_number"] == summary["eig_max"] / summary["eig_min"]
    # the Gershgorin interval contains the spectrum: the ratio is 1 or more, up to the
    # rounding of the two eigenvalues (tol·‖M‖ each) relative to their spread
    ratio = summary["gershgorin_width_ratio"]
    if ratio is not None:
        spread = summary["eig_max"] - summary["eig_min"]
        assert ratio >= 1 - 2 * tol * top / spread


def test_summary_of_a_singular_matrix() -> None:
    v = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    summary = factor_summary(torch.outer(v, v))  # rank 1
    assert summary["rank"] == 1
    assert summary["condition_number"] is None  # λ_min is 0 up to rounding, not > 0 reliably
    assert summary["eig_max"] == pytest.approx(14.0, rel=tolerance(torch.float64, n=3))


def test_frequency_field_matches_numpy_and_parseval() -> None:
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(7, 7, generator=gen, dtype=torch.float64)
    m = m @ m.T
    field = frequency_field(m)
    reference = np.abs(np.fft.fftshift(np.fft.fft2(m.numpy())))
    # two FFT implementations (pocketfft, torch's): a 7 x 7 transform sums 49 terms, each
    # entry's error relative to Σ|m_ij| (which bounds every |FFT| entry)
    tol = tolerance(torch.float64, n=49)
    total = float(m.abs().sum())
    np.testing.assert_allclose(field.numpy(), reference, rtol=tol, atol=tol * total)
    # zero frequency in the centre: the sum of the entries
    assert field[3, 3] == pytest.approx(float(m.sum().abs()), abs=tol * total)
    dc = factor_summary(m)["fft_dc_fraction"]
    want = float(m.sum()) ** 2 / (49 * float(m.square().sum()))
    # a squared sum of entries of both signs: its error is relative to (Σ|m_ij|)², Parseval's
    # Σ|FFT|² sums 49 terms
    assert dc == pytest.approx(want, abs=tol * total**2 / (49 * float(m.square().sum())))
    # a diagonal matrix's field depends on k + l only (the identity's is n on the anti-diagonal
    # k + l = 0 mod n, 0 elsewhere); a constant matrix has all its energy at zero frequency
    d = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    shifted = torch.fft.ifftshift(frequency_field(d))  # back to k, l = 0..4
    tol = tolerance(torch.float64, n=25) * float(d.abs().sum())  # 25-term sums, as above
    for k in range(5):
        for j in range(5):
            assert shifted[k, j] == pytest.approx(float(shifted[(k + j) % 5, 0]), abs=tol)
    rel = tolerance(torch.float64, n=25)
    assert factor_summary(torch.eye(5))["fft_dc_fraction"] == pytest.approx(1 / 5, rel=rel)
    assert factor_summary(torch.ones(5, 5))["fft_dc_fraction"] == pytest.approx(1.0, rel=rel)


def test_non_square_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="square"):
        diagonal_dominance(torch.ones(2, 3))
