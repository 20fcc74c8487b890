"""Pure linear-algebra functions used by the estimators (no module, no state)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def symmetric_eigh(matrix: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a (batch of) symmetric PSD matrix.

    Computed in ``dtype``; when that fails to converge (ill-conditioned input) it is
    retried in float64. Eigenvalues are clamped at zero: negative ones come only from
    round-off on a PSD matrix.

    Returns:
        ``(eigenvalues, eigenvectors)`` in ``dtype``.
    """
    sym = (matrix + matrix.transpose(-1, -2)).to(dtype) * 0.5
    try:
        values, vectors = torch.linalg.eigh(sym)
    except RuntimeError:
        values, vectors = torch.linalg.eigh(sym.double())
    if not (torch.isfinite(values).all() and torch.isfinite(vectors).all()):
        values, vectors = torch.linalg.eigh(sym.double())
    return values.clamp_min(0).to(dtype), vectors.to(dtype)


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
    """
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
