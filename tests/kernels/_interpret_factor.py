"""Run by test_factor.py in a subprocess with TRITON_INTERPRET=1, as
``python -m tests.kernels._interpret_factor`` from the repository root.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when the kernel module is
first imported; in the pytest process other modules have imported it long before, so the
interpreter checks live in a fresh process. Compares the Triton launcher with the torch
reference on odd shapes; exits non-zero with a message on the first mismatch, prints
``checked N cases`` otherwise.
"""

from __future__ import annotations

import itertools
import os
import sys

import torch

from secondorder.kernels.factor import (
    symmetric_factor_update_reference,
    symmetric_factor_update_triton,
)

from ..helpers import assert_close

# 16-wide tiles make d=33 and d=70 span several tile rows, so the mirrored off-diagonal
# stores and the diagonal symmetrisation are both exercised; 64 covers the launcher default.
BLOCKS = (16, 64)


class Mismatch(Exception):
    pass


def check(got, want, a0, x, beta, alpha, what):
    """Both paths sum the same float32 products (the kernel upcasts half inputs under the
    interpreter, the reference casts x to a's dtype, float64 x is rounded to float32 by
    both), in different orders: float32 eps, n = the rows of x plus the β·a term, relative
    to what an entry's rounding error is proportional to, ``|β| max|a| + |α| max Σ x²``."""
    rows = x.shape[-2]
    xx = x.to(torch.float32).double()
    scale = abs(alpha) * (xx.square().sum(-2).max().item() if x.numel() else 0.0)
    if beta and a0.numel():
        scale += abs(beta) * a0.abs().max().item()
    try:
        assert_close(got, want, dtype=torch.float32, n=rows + 1, scale=scale)
    except AssertionError as err:
        raise Mismatch(f"mismatch {what}: {err}") from None
    if not torch.equal(got, got.transpose(-1, -2)):  # mirrored tiles: symmetric by design
        raise Mismatch(f"not exactly symmetric {what}")


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    gen = torch.Generator().manual_seed(0)
    cases = 0
    for d, n, dtype, beta, batch in itertools.product(
        (1, 5, 33, 70), (1, 7, 50), (torch.float32, torch.bfloat16), (0.0, 0.95, 1.0), (None, 2)
    ):
        lead = () if batch is None else (batch,)
        block_d = BLOCKS[cases % 2]
        x = torch.randn(*lead, n, d, generator=gen).to(dtype)
        a0 = torch.randn(*lead, d, d, generator=gen)
        a0 = a0 + a0.transpose(-1, -2)
        got = a0.clone() if beta else torch.full_like(a0, float("nan"))
        out = symmetric_factor_update_triton(got, x, beta=beta, alpha=0.7, block_d=block_d)
        if out is not got:
            raise Mismatch("the launcher must return a")
        want = symmetric_factor_update_reference(a0.clone(), x, beta=beta, alpha=0.7)
        what = f"d={d} n={n} {dtype} beta={beta} batch={batch} block={block_d}"
        check(got, want, a0, x, beta, 0.7, what)
        cases += 1

    # float16 and float64 x, n = 0, the launcher's default blocks
    for dtype, n in ((torch.float16, 9), (torch.float64, 9), (torch.float32, 0)):
        x = torch.randn(3, n, 20, generator=gen).to(dtype)
        a0 = torch.randn(3, 20, 20, generator=gen)
        a0 = a0 + a0.transpose(-1, -2)
        got = symmetric_factor_update_triton(a0.clone(), x, beta=0.5, alpha=2.0)
        want = symmetric_factor_update_reference(a0.clone(), x, beta=0.5, alpha=2.0)
        check(got, want, a0, x, 0.5, 2.0, f"{dtype} n={n}")
        cases += 1

    # non-contiguous x (a transposed view) and a (a column slice), several tiles
    x = torch.randn(40, 24, generator=gen).T
    base = torch.randn(40, 80, generator=gen)
    a = base[:, ::2]
    a.copy_(a + a.T)
    a0 = a.clone()
    want = symmetric_factor_update_reference(a.clone(), x, beta=0.9, alpha=1.0)
    symmetric_factor_update_triton(a, x, beta=0.9, block_d=16, block_n=16)
    check(base[:, ::2], want, a0, x, 0.9, 1.0, "non-contiguous a and x")
    cases += 1

    # a symmetric only in its upper triangle: the kernel reads nothing else, so the result
    # is the update of the matrix mirrored from that triangle, exactly symmetric
    a0 = torch.randn(37, 37, generator=gen)
    x = torch.randn(11, 37, generator=gen)
    mirrored = a0.triu() + a0.triu(1).T
    got = symmetric_factor_update_triton(a0.clone(), x, beta=1.0, block_d=16)
    want = symmetric_factor_update_reference(mirrored.clone(), x, beta=1.0)
    check(got, want, mirrored, x, 1.0, 1.0, "upper triangle of an asymmetric a")
    cases += 1

    print(f"checked {cases} cases")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Mismatch as err:
        print(err)
        sys.exit(1)
