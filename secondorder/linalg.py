"""Pure linear-algebra functions used by the estimators (no module, no state)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def symmetric_eigh(matrix: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a (batch of) symmetric PSD matrix, robust to LAPACK failures.

    Computed in ``dtype``. Large rank-deficient factors (a ResNet's last convolutions see
    far fewer rows than their 4608 patch columns) have huge clusters of zero eigenvalues,
    on which the divide-and-conquer solver can fail to converge, even in float64. Then:
    float64; then float64 with a tiny *graded* diagonal shift
    ``diag(s * max|diag| * linspace(0, 1, n))`` for ``s`` in 1e-12, 1e-10, 1e-8, which splits
    the clusters and moves each eigenvalue by at most ``s * max|diag|``. Eigenvalues are
    clamped at zero (negative ones come only from round-off on a PSD matrix).

    Returns:
        ``(eigenvalues, eigenvectors)`` in ``dtype``.

    Raises:
        torch.linalg.LinAlgError: every attempt failed (non-finite input, for example).
    """
    sym = (matrix + matrix.transpose(-1, -2)) * 0.5
    attempts = [(dtype, 0.0), (torch.float64, 0.0), *((torch.float64, s) for s in _SHIFTS)]
    error: Exception | None = None
    for attempt_dtype, shift in attempts:
        m = sym.to(attempt_dtype)
        if shift:
            n = m.shape[-1]
            scale = m.diagonal(dim1=-2, dim2=-1).abs().amax(-1, keepdim=True)
            grade = torch.linspace(0.0, 1.0, n, dtype=m.dtype, device=m.device)
            m = m + torch.diag_embed(shift * scale * grade)
        try:
            values, vectors = torch.linalg.eigh(m)
        except torch.linalg.LinAlgError as exc:
            error = exc
            continue
        if torch.isfinite(values).all() and torch.isfinite(vectors).all():
            return values.clamp_min(0).to(dtype), vectors.to(dtype)
    raise torch.linalg.LinAlgError(
        f"eigendecomposition of a {tuple(matrix.shape)} factor failed in every fallback "
        f"(float64, graded diagonal shifts up to {_SHIFTS[-1]:g}); last error: {error}"
    )


_SHIFTS = (1e-12, 1e-10, 1e-8)


def damped_inverse_cholesky(
    matrix: Tensor, damping: float | Tensor, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``(matrix + damping I)^-1`` of a (batch of) symmetric PSD matrix by Cholesky.

    ``damping`` is a number or a tensor broadcastable to the batch shape. When the
    factorisation fails (numerically indefinite), jitter growing tenfold from
    ``1e-6 * mean diagonal`` is added until it succeeds, then float64 is used.
    """
    n = matrix.shape[-1]
    eye = torch.eye(n, dtype=dtype, device=matrix.device)
    damping = torch.as_tensor(damping, dtype=dtype, device=matrix.device)
    damped = matrix.to(dtype) + damping[..., None, None] * eye
    scale = damped.diagonal(dim1=-2, dim2=-1).abs().mean().clamp_min(1e-30)
    jitter = 0.0
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(damped + jitter * eye)
        if not info.any():
            return torch.cholesky_inverse(chol)
        jitter = float(scale) * 1e-6 if jitter == 0.0 else jitter * 10
    chol = torch.linalg.cholesky(damped.double() + jitter * eye.double())
    return torch.cholesky_inverse(chol).to(dtype)


def pi_correction(a_factor: Tensor, g_factor: Tensor) -> Tensor:
    """The factored-Tikhonov split ``pi = sqrt((tr A / dim A) / (tr G / dim G))``.

    Computed per block (leading batch dimension kept); 1 where either trace is zero.
    A factor with one dimension fewer than the other is its diagonal (Embedding's A).
    """
    if a_factor.dim() < g_factor.dim():
        ta = a_factor.mean(-1)
    else:
        ta = a_factor.diagonal(dim1=-2, dim2=-1).mean(-1)
    tg = g_factor.diagonal(dim1=-2, dim2=-1).mean(-1)
    ok = (ta > 0) & (tg > 0)
    ratio = torch.where(ok, ta / torch.where(ok, tg, torch.ones_like(tg)), torch.ones_like(ta))
    return ratio.sqrt()


def factored_damping(a_factor: Tensor, g_factor: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """Damping added to A and G by factored Tikhonov: ``(pi sqrt(l), sqrt(l) / pi)``."""
    pi = pi_correction(a_factor, g_factor)
    root = math.sqrt(damping)
    return pi * root, root / pi
