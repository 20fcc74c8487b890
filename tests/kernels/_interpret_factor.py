"""Run by test_factor.py in a subprocess with TRITON_INTERPRET=1 (set before Triton loads).

Compares the Triton launcher with the torch reference on odd shapes; exits non-zero with a
message on the first mismatch, prints the number of cases checked otherwise.
"""

from __future__ import annotations

import itertools
import sys

import torch

from secondorder.kernels.factor import (
    symmetric_factor_update_reference,
    symmetric_factor_update_triton,
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-5}  # both accumulate the same fp32 values


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    cases = 0
    for d, n, dtype, beta, batch in itertools.product(
        (1, 5, 33, 70), (1, 7, 50), (torch.float32, torch.bfloat16), (0.0, 0.95, 1.0), (None, 2)
    ):
        lead = () if batch is None else (batch,)
        x = torch.randn(*lead, n, d, generator=gen).to(dtype)
        a0 = torch.randn(*lead, d, d, generator=gen)
        a0 = a0 + a0.transpose(-1, -2)
        got = a0.clone() if beta else torch.full_like(a0, float("nan"))
        symmetric_factor_update_triton(got, x, beta=beta, alpha=0.7)
        want = symmetric_factor_update_reference(a0.clone(), x, beta=beta, alpha=0.7)
        scale = 1.0 + want.abs().max().item()
        err = (got - want).abs().max().item()
        if not err <= TOLERANCE[dtype] * scale:
            print(f"mismatch d={d} n={n} {dtype} beta={beta} batch={batch}: {err}")
            return 1
        if not torch.equal(got, got.transpose(-1, -2)):
            print(f"not exactly symmetric d={d} n={n} {dtype} beta={beta} batch={batch}")
            return 1
        cases += 1
    # a non-contiguous x (a transposed view) and an explicit block size
    x = torch.randn(40, 24, generator=gen).T
    got = torch.zeros(40, 40)
    symmetric_factor_update_triton(got, x, block_d=16, block_n=16)
    want = x.T @ x
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
        print("mismatch for a non-contiguous x")
        return 1
    print(f"checked {cases + 1} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
