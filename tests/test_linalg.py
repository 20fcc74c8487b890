"""Pure linear algebra: eigendecomposition fallbacks, Cholesky jitter, factored damping."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from secondorder.linalg import (
    damped_inverse_cholesky,
    factored_damping,
    pi_correction,
    symmetric_eigh,
)

from .helpers import assert_close, tolerance


def _psd(n: int, rank: int, seed: int, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, rank, n, generator=gen, dtype=torch.float64)
    return x.transpose(1, 2) @ x / rank


@given(n=st.integers(1, 30), rank=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_eigh_reconstructs_psd_matrices(n, rank, seed):
    m = _psd(n, rank, seed)
    d, q = symmetric_eigh(m, torch.float64)
    assert (d >= 0).all()
    # the eigensolver's backward error and the n-term sums of the reconstruction, each
    # n·eps of ‖M‖ (clamping a negative eigenvalue to 0 moves it by less than that)
    norm = float(torch.linalg.matrix_norm(m, ord=2))
    rec = (q * d.unsqueeze(-2)) @ q.transpose(-1, -2)
    assert_close(rec, m, dtype=torch.float64, n=2 * n, scale=norm)


def test_eigh_falls_back_when_lapack_fails(monkeypatch):
    """Failures in float32 and plain float64 (as seen on ResNet-18's 4608-wide conv
    factors) go to the graded diagonal shift; the result is still accurate."""
    m = _psd(40, 3, seed=1)  # rank 3: 37 repeated zero eigenvalues
    real = torch.linalg.eigh
    calls = []

    def flaky(a, *args, **kwargs):
        calls.append(a.dtype)
        if len(calls) <= 2:
            raise torch.linalg.LinAlgError("failed to converge (simulated)")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    d, q = symmetric_eigh(m.float(), torch.float32)
    assert calls == [torch.float32, torch.float64, torch.float64]
    rec = (q.double() * d.double().unsqueeze(-2)) @ q.double().transpose(-1, -2)
    # the input rounded to float32 and the result returned in float32, around a float64
    # eigensolver: float32 round-off of a 40 x 40 reconstruction, relative to ‖M‖
    norm = float(torch.linalg.matrix_norm(m, ord=2))
    assert_close(rec, m, dtype=torch.float32, n=2 * 40, scale=norm)
    assert d.dtype == torch.float32


def test_eigh_reports_when_every_attempt_fails(monkeypatch):
    def broken(a, *args, **kwargs):
        raise torch.linalg.LinAlgError("no")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.raises(torch.linalg.LinAlgError, match="failed in every fallback"):
        symmetric_eigh(torch.eye(3))


@given(
    n=st.integers(1, 12),
    rank=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    damping=st.floats(1e-6, 10.0),
)
def test_damped_inverse_cholesky_is_the_inverse(n, rank, seed, damping):
    m = _psd(n, rank, seed, batch=2)
    inv = damped_inverse_cholesky(m, damping, torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    damped = m + damping * eye
    # the residual of an inverse through Cholesky: n·eps·cond of the damped matrix
    cond = float(torch.linalg.cond(damped).max())
    assert_close(inv @ damped, eye.expand(2, n, n), dtype=torch.float64, n=n, cond=cond)


def test_cholesky_adds_jitter_to_an_indefinite_matrix():
    m = torch.tensor([[[1.0, 0.0], [0.0, -1e-9]]], dtype=torch.float64)
    inv = damped_inverse_cholesky(m, 0.0, torch.float64)
    assert torch.isfinite(inv).all() and inv[0, 0, 0] == pytest.approx(1.0, rel=1e-6)


def test_pi_correction_and_factored_damping():
    a = torch.diag_embed(torch.tensor([[4.0, 4.0]]))
    g = torch.diag_embed(torch.tensor([[1.0, 1.0, 1.0]]))
    rel = tolerance(torch.float32, n=4)  # a few float32 roundings of traces and roots
    assert pi_correction(a, g).item() == pytest.approx(2.0, rel=rel)
    a_damp, g_damp = factored_damping(a, g, 0.01)
    assert a_damp.item() == pytest.approx(0.2, rel=rel) and g_damp.item() == pytest.approx(
        0.05, rel=rel
    )
    assert pi_correction(torch.zeros(1, 2, 2), g).item() == 1.0  # zero trace: no split
