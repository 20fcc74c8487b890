"""Pure linear-algebra functions used by the estimators (no module, no state)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def symmetric_eigh(matrix: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a (batch of) symmetric PSD matrix, robust to LAPACK failures.

    Computed in ``dtype`` (a half-precision ``matrix`` is converted to it first). Large
    rank-deficient factors (a ResNet's last convolutions see far fewer rows than their 4608
    patch columns) have huge clusters of zero eigenvalues, on which the divide-and-conquer
    solver can fail to converge, even in float64. Then:
    float64; then float64 with a tiny *graded* diagonal shift
    ``diag(s * max|diag| * linspace(0, 1, n))`` for ``s`` in 1e-12, 1e-10, 1e-8, which splits
    the clusters and moves each eigenvalue by at most ``s * max|diag|``. Eigenvalues are
    clamped at zero (negative ones come only from round-off on a PSD matrix).

    A batch goes to the solver in one call, and the fallbacks are taken *per matrix*: only
    the members whose attempt failed go on to the next one. When the batched call raises,
    the member its error names is set aside and the others are decomposed again at that
    attempt, in batches around it (see :func:`_eigh_members`); a member whose eigenvalues
    or eigenvectors are not finite failed too. Every member's result is what a call on
    that member alone gives, up to the solver's round-off (a batched and a single call may
    sum in another order) and the sign of each eigenvector.

    Returns:
        ``(eigenvalues, eigenvectors)`` in ``dtype``.

    Raises:
        torch.linalg.LinAlgError: every attempt failed for some member (non-finite input,
            for example); its ``failed_members`` attribute lists their indices in the
            flattened batch.
    """
    if matrix.dtype in (torch.bfloat16, torch.float16):
        matrix = matrix.to(dtype)  # symmetrised exactly, not rounded to the half type
    sym = (matrix + matrix.transpose(-1, -2)) * 0.5
    n = sym.shape[-1]
    flat = sym.reshape(-1, n, n)
    count = flat.shape[0]
    attempts = [(dtype, 0.0)]
    if dtype != torch.float64:
        attempts.append((torch.float64, 0.0))
    attempts += [(torch.float64, s) for s in _SHIFTS]
    values: Tensor | None = None
    vectors: Tensor | None = None
    pending = list(range(count))
    error: Exception | None = None
    for attempt_dtype, shift in attempts:
        if len(pending) == count:
            m = flat.to(attempt_dtype)
        else:
            m = flat[torch.tensor(pending, device=flat.device)].to(attempt_dtype)
        if shift:
            scale = m.diagonal(dim1=-2, dim2=-1).abs().amax(-1, keepdim=True)
            grade = torch.linspace(0.0, 1.0, n, dtype=m.dtype, device=m.device)
            m = m + torch.diag_embed(shift * scale * grade)
        d, q, ok, failure = _eigh_members(m)
        error = failure or error
        if all(ok) and len(pending) == count:
            values, vectors = d.clamp_min(0).to(dtype), q.to(dtype)
            pending = []
            break
        if values is None or vectors is None:
            values = flat.new_empty((count, n), dtype=dtype)
            vectors = flat.new_empty((count, n, n), dtype=dtype)
        good = [i for i, o in enumerate(ok) if o]
        if good:
            src = torch.tensor(good, device=flat.device)
            dst = torch.tensor([pending[i] for i in good], device=flat.device)
            values[dst] = d[src].clamp_min(0).to(dtype)
            vectors[dst] = q[src].to(dtype)
        pending = [p for p, o in zip(pending, ok, strict=True) if not o]
        if not pending:
            break
    if pending:
        exc = torch.linalg.LinAlgError(
            f"eigendecomposition of {len(pending)} of the {count} matrices of a "
            f"{tuple(matrix.shape)} factor failed in every fallback (float64, graded diagonal "
            f"shifts up to {_SHIFTS[-1]:g}); last error: {error}"
        )
        exc.failed_members = pending  # type: ignore[attr-defined]
        raise exc
    assert values is not None and vectors is not None
    return values.reshape(matrix.shape[:-1]), vectors.reshape(matrix.shape)


def _eigh_members(m: Tensor) -> tuple[Tensor, Tensor, list[bool], Exception | None]:
    """``torch.linalg.eigh`` of a ``(count, n, n)`` batch, in one call unless some member
    fails, and whether each member succeeded (its results finite).

    When the batched call raises, the error names the first failing member ("(Batch
    element k)"): that member is marked failed and the members before and after it are
    decomposed again as two batches (those before succeed: the solver takes each member on
    its own), and so on. Without an index in the message each member is tried alone."""
    count = m.shape[0]
    try:
        d, q = torch.linalg.eigh(m)
        ok = [True] * count
        error: Exception | None = None
    except torch.linalg.LinAlgError as exc:
        error = exc
        d, q = m.new_zeros(m.shape[:-1]), m.new_zeros(m.shape)
        ok = [False] * count
        segments = _split_at_failure(exc, 0, count)
        while segments:
            lo, hi = segments.pop()
            try:
                d_part, q_part = torch.linalg.eigh(m[lo:hi])
            except torch.linalg.LinAlgError as part_exc:
                error = part_exc
                segments += _split_at_failure(part_exc, lo, hi)
                continue
            d[lo:hi], q[lo:hi] = d_part, q_part
            ok[lo:hi] = [True] * (hi - lo)
    finite = (torch.isfinite(d).all(-1) & torch.isfinite(q).all(-1).all(-1)).tolist()
    return d, q, [o and f for o, f in zip(ok, finite, strict=True)], error


def _split_at_failure(exc: Exception, lo: int, hi: int) -> list[tuple[int, int]]:
    """The segments of ``[lo, hi)`` still to decompose after a batched call on it raised
    ``exc``: around the failing member the message names, else every member alone (none
    when the batch was one member, which has then failed)."""
    if hi - lo == 1:
        return []
    found = _BATCH_ELEMENT.search(str(exc))
    k = int(found.group(1)) if found else -1
    if not 0 <= k < hi - lo:
        return [(i, i + 1) for i in range(lo, hi)]
    return [s for s in ((lo, lo + k), (lo + k + 1, hi)) if s[1] > s[0]]


_BATCH_ELEMENT = re.compile(r"\(Batch element (\d+)\)")


_SHIFTS = (1e-12, 1e-10, 1e-8)


def damped_inverse_cholesky(
    matrix: Tensor, damping: float | Tensor, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``(matrix + damping I)^-1`` of a (batch of) symmetric PSD matrix by Cholesky.

    ``damping`` is a number or a tensor broadcastable to the batch shape: a ``(batch,)``
    tensor gives each matrix of a ``(batch, n, n)`` stack its own damping. The batch is
    factorised in one call; a matrix whose factorisation fails (numerically indefinite)
    gets jitter growing tenfold from ``1e-6 *`` its own mean ``|diagonal|`` until it
    succeeds, then float64 is used for it. The other matrices of the batch are not
    touched: every member's inverse is what a call on that member alone gives.
    """
    n = matrix.shape[-1]
    eye = torch.eye(n, dtype=dtype, device=matrix.device)
    damping = torch.as_tensor(damping, dtype=dtype, device=matrix.device)
    damped = matrix.to(dtype) + damping[..., None, None] * eye
    flat = damped.reshape(-1, n, n)
    chol, info = torch.linalg.cholesky_ex(flat)
    failed = torch.nonzero(info).flatten().tolist()
    if not failed:
        return torch.cholesky_inverse(chol).reshape(damped.shape)
    sub = flat[torch.tensor(failed, device=flat.device)]
    scale = sub.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-30)
    jitter = scale * 1e-6
    pending = list(range(len(failed)))  # positions in `failed` still to factorise
    for _ in range(7):
        idx = torch.tensor(pending, device=flat.device)
        c, code = torch.linalg.cholesky_ex(sub[idx] + jitter[idx, None, None] * eye)
        done = code.eq(0).tolist()
        for j, (pos, ok) in enumerate(zip(pending, done, strict=True)):
            if ok:
                chol[failed[pos]] = c[j]
        pending = [pos for pos, ok in zip(pending, done, strict=True) if not ok]
        if not pending:
            return torch.cholesky_inverse(chol).reshape(damped.shape)
        jitter = jitter * 10
    rest = [failed[pos] for pos in pending]
    idx = torch.tensor(pending, device=flat.device)
    chol64 = torch.linalg.cholesky(
        sub[idx].double() + jitter[idx, None, None].double() * eye.double()
    )
    chol[torch.tensor(rest, device=flat.device)] = eye  # a placeholder, overwritten below
    inverse = torch.cholesky_inverse(chol)
    inverse[torch.tensor(rest, device=flat.device)] = torch.cholesky_inverse(chol64).to(dtype)
    return inverse.reshape(damped.shape)


def pi_correction(a_factor: Tensor, g_factor: Tensor) -> Tensor:
    """The factored-Tikhonov split ``pi = sqrt((tr A / dim A) / (tr G / dim G))``.

    Computed per block (leading batch dimension kept); 1 where either trace is zero.
    A factor with one dimension fewer than the other is its diagonal (Embedding's A).
    Half-precision factors (bfloat16, float16) give a float32 ``pi``.
    """
    if a_factor.dim() < g_factor.dim():
        ta = _widened(a_factor).mean(-1)
    else:
        ta = _widened(a_factor.diagonal(dim1=-2, dim2=-1)).mean(-1)
    tg = _widened(g_factor.diagonal(dim1=-2, dim2=-1)).mean(-1)
    ok = (ta > 0) & (tg > 0)
    ratio = torch.where(ok, ta / torch.where(ok, tg, torch.ones_like(tg)), torch.ones_like(ta))
    return ratio.sqrt()


def _widened(x: Tensor) -> Tensor:
    """``x`` in float32 when it is a half-precision type (traces summed in bfloat16 keep
    three significant digits), unchanged otherwise."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def factored_damping(a_factor: Tensor, g_factor: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """Damping added to A and G by factored Tikhonov: ``(pi sqrt(l), sqrt(l) / pi)``."""
    pi = pi_correction(a_factor, g_factor)
    root = math.sqrt(damping)
    return pi * root, root / pi


# ---- many matrices at once (a refresh's factors) -----------------------------------------
def _size_groups(matrices: Sequence[Tensor]) -> dict[tuple[Any, ...], list[int]]:
    """Indices of ``matrices`` (each ``(..., n, n)``) by ``(n, dtype, device)``, in order."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, m in enumerate(matrices):
        groups.setdefault((m.shape[-1], m.dtype, m.device), []).append(i)
    return groups


def _stacked(matrices: Sequence[Tensor]) -> tuple[Tensor, list[int]]:
    """``matrices`` (same ``n``) as one ``(total, n, n)`` batch, and each one's count."""
    n = matrices[0].shape[-1]
    flats = [m.reshape(-1, n, n) for m in matrices]
    counts = [f.shape[0] for f in flats]
    return (flats[0] if len(flats) == 1 else torch.cat(flats)), counts


def _label(names: Sequence[str] | None, i: int, m: Tensor) -> str:
    return f"{names[i]!r}" if names is not None else f"matrix {i} {tuple(m.shape)}"


#: the largest ``n`` whose matrices :func:`symmetric_eigh_many` stacks into one call. A
#: batched ``torch.linalg.eigh`` that fails for one member raises and loses the members
#: already decomposed, which must be decomposed again; above this size a call's overhead
#: is nothing next to its O(n³) work, so nothing is gained by stacking and that loss is
#: avoided. (ResNet-18's 2304- and 4608-wide conv factors need the fallbacks at most
#: refreshes: stacking them made its refresh up to 20 % slower on a 2-core CPU.)
EIGH_BATCH_MAX_SIZE = 1024


def symmetric_eigh_many(
    matrices: Sequence[Tensor],
    dtype: torch.dtype = torch.float32,
    names: Sequence[str] | None = None,
    max_batched_size: int | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """:func:`symmetric_eigh` of each of ``matrices`` (each ``(..., n, n)``, a single
    matrix or a batch), with one batched call per ``(n, dtype, device)``: the matrices of
    a size are stacked, decomposed together and split back. Fallbacks stay per matrix.
    Matrices larger than ``max_batched_size`` are decomposed one at a time.

    Args:
        matrices: the symmetric PSD matrices.
        dtype: the dtype of the decompositions (float32 or float64).
        names: a name for each matrix, for the error message.
        max_batched_size: the largest ``n`` stacked (default: :data:`EIGH_BATCH_MAX_SIZE`).

    Returns:
        ``(eigenvalues, eigenvectors)`` of each matrix, in ``dtype``, in the given order.

    Raises:
        torch.linalg.LinAlgError: every fallback failed for some matrix; the message
            names it.
    """
    limit = EIGH_BATCH_MAX_SIZE if max_batched_size is None else max_batched_size
    groups = [
        chunk
        for indices in _size_groups(matrices).values()
        for chunk in (
            [indices] if matrices[indices[0]].shape[-1] <= limit else [[i] for i in indices]
        )
    ]
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(matrices)
    for indices in groups:
        stack, counts = _stacked([matrices[i] for i in indices])
        try:
            values, vectors = symmetric_eigh(stack, dtype)
        except torch.linalg.LinAlgError as exc:
            failed = set(getattr(exc, "failed_members", ()))
            bounds = [sum(counts[:k]) for k in range(len(counts) + 1)]
            bad = [
                _label(names, i, matrices[i])
                for k, i in enumerate(indices)
                if failed.intersection(range(bounds[k], bounds[k + 1]))
            ]
            raise torch.linalg.LinAlgError(f"{', '.join(bad)}: {exc}") from exc
        for i, d, q in zip(indices, values.split(counts), vectors.split(counts), strict=True):
            out[i] = (d.reshape(matrices[i].shape[:-1]), q.reshape(matrices[i].shape))
    return out  # type: ignore[return-value]


def damped_inverse_cholesky_many(
    matrices: Sequence[Tensor],
    dampings: Sequence[float | Tensor],
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """:func:`damped_inverse_cholesky` of each of ``matrices`` with its own damping (a
    number, or a tensor broadcastable to that matrix's batch shape, as factored damping
    gives each block its π-scaled damping), with one batched call per
    ``(n, dtype, device)``. Jitter and the float64 fallback stay per matrix.

    Returns:
        ``(matrix + damping I)⁻¹`` of each matrix, in ``dtype``, in the given order.
    """
    out: list[Tensor | None] = [None] * len(matrices)
    for indices in _size_groups(matrices).values():
        stack, counts = _stacked([matrices[i] for i in indices])
        damping = torch.cat(
            [
                torch.as_tensor(dampings[i], dtype=dtype, device=stack.device)
                .expand(matrices[i].shape[:-2])
                .reshape(-1)
                for i in indices
            ]
        )
        inverses = damped_inverse_cholesky(stack, damping, dtype)
        for i, inv in zip(indices, inverses.split(counts), strict=True):
            out[i] = inv.reshape(matrices[i].shape)
    return out  # type: ignore[return-value]
