"""Run by test_mfac.py in a subprocess with TRITON_INTERPRET=1, as
``python -m tests.kernels._interpret_mfac`` from the repository root.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when the kernel module is
first imported, so the interpreter checks live in a fresh process (see _interpret_factor.py).
Compares the M-FAC Triton launchers with the torch references on odd shapes; exits non-zero
with a message on the first mismatch, prints ``checked N cases`` otherwise.
"""

from __future__ import annotations

import itertools
import os
import sys
import warnings

import torch

from secondorder.kernels.mfac import (
    mfac_coefficients_reference,
    mfac_coefficients_triton,
    mfac_gram_row_reference,
    mfac_gram_row_triton,
    mfac_ihvp_reference,
    mfac_ihvp_triton,
)

from ..helpers import tolerance


class Mismatch(Exception):
    pass


def check(err: float, tol: float, what: str) -> None:
    if not err <= tol:  # also catches NaN
        raise Mismatch(f"mismatch {what}: relative error {err:.3g} > {tol:.3g}")


def k_cond(gram, count, damping) -> float:
    """The largest ``cond(K)`` over blocks, ``K = count·I + gram[:count, :count]/λ`` (from
    the lower triangle) in float64: the matrix both sides factor and solve with."""
    g = gram[..., :count, :count].double().tril()
    k = (g + g.tril(-1).transpose(-1, -2)) / damping + count * torch.eye(count, dtype=torch.float64)
    return float(torch.linalg.cond(k).max())


def coeff_tolerance(dtype, gram, count, damping) -> float:
    """Both sides factor the same K in the same dtype, in different orders: the factor's
    forward error, n = count-long inner products plus forming K (2), times cond(K)."""
    return tolerance(dtype, n=count + 2, cond=k_cond(gram, count, damping))


def ihvp_tolerance(dtype, gram, count, damping, cols) -> float:
    """Relative to ‖x‖/λ, the size of the two Woodbury terms whose difference is the result:
    B-long sums for q = Wx (their rounding amplified by cond(K) in the solve), count-long
    ones for Wᵀc; the products differ in summation order only."""
    return tolerance(dtype, n=cols + count, cond=k_cond(gram, count, damping))


def random_gram(gen, nb, m, cols, dtype):
    w = torch.randn(nb, m, cols, generator=gen, dtype=torch.float64)
    gram = (w @ w.transpose(1, 2)).to(dtype)
    return gram


def check_coefficients(gen) -> int:
    cases = 0
    # count 33 and 64 with 16-wide tiles span 3-4 block columns (panel and trailing
    # launches, padding in the last tile); None is the launcher's default (one tile <= 64)
    for dtype, (count, block) in itertools.product(
        (torch.float32, torch.float64),
        ((1, None), (5, None), (5, 16), (33, 16), (33, None), (64, 16), (64, 32), (70, 32)),
    ):
        nb, m = 2, count + 3
        gram = random_gram(gen, nb, m, 40, dtype)
        # never read: the rows and columns past count, and the strict upper triangle
        gram[:, count:, :] = float("nan")
        gram[:, :, count:] = float("nan")
        gram = gram.tril() + torch.full_like(gram, float("nan")).triu(1)
        damping = 0.05
        got = mfac_coefficients_triton(gram, count, damping, block_size=block)
        want = mfac_coefficients_reference(gram, count, damping)
        if got.shape != want.shape or got.dtype != dtype:
            raise Mismatch(f"shape/dtype {got.shape} {got.dtype} count={count}")
        if not torch.equal(got.triu(1), torch.zeros_like(got.triu(1))):
            raise Mismatch(f"not lower triangular: count={count} block={block} {dtype}")
        err = ((got - want).norm() / want.norm()).item()
        tol = coeff_tolerance(dtype, gram, count, damping)
        check(err, tol, f"coefficients count={count} block={block} {dtype}")
        cases += 1

    # an unbatched gram; a batch where one block is indefinite comes back all NaN there
    gram = random_gram(gen, 1, 9, 20, torch.float32)[0]
    got = mfac_coefficients_triton(gram, 9, 1.0)
    want = mfac_coefficients_reference(gram, 9, 1.0)
    tol = coeff_tolerance(torch.float32, gram, 9, 1.0)
    check(((got - want).norm() / want.norm()).item(), tol, "2-D gram")
    gram = random_gram(gen, 3, 40, 30, torch.float64)
    gram[1] -= 1e3 * torch.eye(40, dtype=torch.float64)
    with warnings.catch_warnings():  # the interpreter's numpy sqrt of the negative pivot
        warnings.simplefilter("ignore", RuntimeWarning)
        got = mfac_coefficients_triton(gram, 40, 1.0, block_size=16)
    if not (got[1].isnan().all() and got[[0, 2]].isfinite().all()):
        raise Mismatch("an indefinite block must come back all NaN, the others finite")
    want = mfac_coefficients_reference(gram, 40, 1.0)
    tol = coeff_tolerance(torch.float64, gram[0], 40, 1.0)
    check(((got[0] - want[0]).norm() / want[0].norm()).item(), tol, "batch with NaN block")
    return cases + 2


def check_ihvp(gen) -> int:
    cases = 0
    for wdtype, cols, nb in itertools.product(
        (torch.float32, torch.bfloat16), (1, 37, 300), (1, 3)
    ):
        m, count, damping = 21, 19, 1e-2
        window = torch.randn(nb, m, cols, generator=gen).to(wdtype)
        window[:, count:] = float("nan")  # rows past count are never read
        valid = window[:, :count].double()
        gram = valid @ valid.transpose(1, 2)
        chol = mfac_coefficients_reference(gram, count, damping)
        x = torch.randn(nb, cols, generator=gen)
        block = {"block_rows": 8, "block_cols": 32} if cases % 2 else {}
        got = mfac_ihvp_triton(window, chol, x, damping, count, **block)
        want = mfac_ihvp_reference(window, chol, x, damping, count)
        if got.shape != x.shape or got.dtype != x.dtype:
            raise Mismatch(f"ihvp shape/dtype {got.shape} {got.dtype}")
        err = ((got - want).norm() / (x.norm() / damping)).item()
        tol = ihvp_tolerance(torch.float32, gram, count, damping, cols)
        check(err, tol, f"ihvp {wdtype} B={cols} nb={nb} {block}")
        rows = mfac_gram_row_triton(window, count - 2, count, **block)
        want_rows = mfac_gram_row_reference(window, count - 2, count)
        err = ((rows - want_rows).norm() / want_rows.norm()).item()
        # B-long float32 sums (bf16 products are exact in float32); the row's own square
        # norm is among the entries, so the norm of the row is at least each entry's scale
        check(err, tolerance(torch.float32, n=cols), f"gram_row {wdtype} B={cols} nb={nb} {block}")
        cases += 1

    # float64 windows and x, float32 window with float64 x, unbatched, non-contiguous x,
    # more row blocks than one and several column splits
    for wdtype, xdtype, count in (
        (torch.float64, torch.float64, 40),
        (torch.float32, torch.float64, 17),
        (torch.bfloat16, torch.float32, 1),
    ):
        cols, damping = 301, 0.3
        window = torch.randn(2, 45, cols, generator=gen).to(wdtype)
        x = torch.randn(cols, 2, generator=gen, dtype=xdtype).T
        valid = window[:, :count].double()
        gram = valid @ valid.transpose(1, 2)
        chol = mfac_coefficients_reference(gram, count, damping)
        got = mfac_ihvp_triton(window, chol, x, damping, count, block_rows=16, block_cols=16)
        want = mfac_ihvp_reference(window, chol, x, damping, count)
        acc = torch.float64 if torch.float64 in (wdtype, xdtype) else torch.float32
        tol = ihvp_tolerance(acc, gram, count, damping, cols)
        err = ((got - want).norm() / (x.norm() / damping)).item()
        check(err, tol, f"ihvp window {wdtype} x {xdtype} count={count}")
        got1 = mfac_ihvp_triton(window[1], chol[1], x[1], damping, count)
        err = ((got1 - want[1]).norm() / (x[1].norm() / damping)).item()
        check(err, tol, f"unbatched ihvp {wdtype}")
        if wdtype == torch.float64:
            rows = mfac_gram_row_triton(window, 3, count, block_cols=64)
            want_rows = mfac_gram_row_reference(window, 3, count)
            tol = tolerance(torch.float64, n=cols)
            check(((rows - want_rows).norm() / want_rows.norm()).item(), tol, "gram_row f64")
        cases += 1
    return cases


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    gen = torch.Generator().manual_seed(0)
    cases = check_coefficients(gen) + check_ihvp(gen)
    print(f"checked {cases} cases")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Mismatch as err:
        print(err)
        sys.exit(1)
