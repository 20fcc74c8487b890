"""Run by test_conv_factor.py in a subprocess with TRITON_INTERPRET=1, as
``python -m tests.kernels._interpret_conv_factor`` from the repository root (see
_interpret_factor.py for why): the implicit-im2col Triton kernel against the chunked torch
reference on odd shapes, every convolution parameter, fp32 / bf16 / fp16 inputs. Exits
non-zero on the first mismatch, prints ``checked N cases`` otherwise."""

from __future__ import annotations

import itertools
import os
import sys

import torch

from secondorder.kernels.conv_factor import (
    conv2d_factor_update_reference,
    conv2d_factor_update_triton,
)

from ..helpers import assert_close


class Mismatch(Exception):
    pass


def _rows(x: torch.Tensor, k, s, p, d) -> int:
    """Patch rows: examples x output positions (nn.Conv2d's output size)."""
    out = [(x.shape[2 + i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in (0, 1)]
    return x.shape[0] * out[0] * out[1]


def check(got, want, a0, beta, alpha, rows, what) -> None:
    """Both paths sum the same float32 products of the ``rows`` patch rows (half inputs
    upcast first), in different orders: float32 eps, n = rows plus the β·a term, relative to
    ``|β| max|a| + |α| max diag(Σ ã ãᵀ)`` (the diagonal of that Gram matrix bounds each
    entry's sum of |products|)."""
    prod = (want.double() - beta * a0.double()) / alpha
    scale = abs(alpha) * max(prod.diagonal(dim1=-2, dim2=-1).max().item(), 0.0)
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
    # (C, groups, kernel, stride, padding, dilation, H, W)
    geometries = [
        (3, 1, (3, 3), (1, 1), (1, 1), (1, 1), 5, 7),  # the common 3x3 'same' conv
        (4, 2, (3, 2), (2, 1), (1, 0), (1, 2), 7, 6),  # grouped, strided, dilated, odd
        (2, 1, (1, 1), (1, 1), (0, 0), (1, 1), 3, 3),  # 1x1
        (5, 1, (3, 3), (2, 2), (2, 2), (1, 1), 6, 5),  # padding larger than the stride
        (6, 3, (2, 3), (1, 2), (0, 1), (2, 1), 6, 7),
    ]
    for geometry, bias, dtype, beta in itertools.product(
        geometries, (False, True), (torch.float32, torch.bfloat16), (0.0, 0.9)
    ):
        c, groups, k, s, p, d, h, w = geometry
        x = torch.randn(3, c, h, w, generator=gen).to(dtype)
        dim = c // groups * k[0] * k[1] + int(bias)
        a0 = torch.randn(groups, dim, dim, generator=gen)
        a0 = a0 + a0.transpose(-1, -2)
        kw = dict(kernel_size=k, stride=s, padding=p, dilation=d, groups=groups, bias=bias)
        want = conv2d_factor_update_reference(a0.clone(), x, beta=beta, alpha=0.7, **kw)
        got = a0.clone() if beta else torch.full_like(a0, float("nan"))
        out = conv2d_factor_update_triton(got, x, beta=beta, alpha=0.7, block_d=16, **kw)
        if out is not got:
            raise Mismatch("the launcher must return a")
        rows = _rows(x, k, s, p, d)
        check(got, want, a0, beta, 0.7, rows, f"{geometry} bias={bias} {dtype} beta={beta}")
        cases += 1
    # float16 input, channels-last (non-contiguous) input, the launcher's default blocks,
    # a dimension spanning several 64-wide tiles, an empty batch
    x = torch.randn(2, 8, 5, 5, generator=gen).to(torch.float16)
    for x_case, bias in ((x, True), (x.float().to(memory_format=torch.channels_last), False)):
        dim = 8 * 9 + int(bias)
        a0 = torch.eye(dim).expand(1, dim, dim).clone()
        kw = dict(kernel_size=3, padding=1, bias=bias)
        want = conv2d_factor_update_reference(a0.clone(), x_case, beta=0.5, **kw)
        got = conv2d_factor_update_triton(a0.clone(), x_case, beta=0.5, **kw)
        rows = _rows(x_case, (3, 3), (1, 1), (1, 1), (1, 1))
        check(got, want, a0, 0.5, 1.0, rows, f"{x_case.dtype} contiguous={x_case.is_contiguous()}")
        cases += 1
    a0 = torch.ones(1, 10, 10)
    got = conv2d_factor_update_triton(
        a0.clone(), torch.zeros(0, 1, 4, 4), kernel_size=3, bias=True, beta=0.5
    )
    check(got, a0 * 0.5, a0, 0.5, 1.0, 0, "empty batch")
    cases += 1
    print(f"checked {cases} cases")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Mismatch as exc:
        print(exc)
        sys.exit(1)
