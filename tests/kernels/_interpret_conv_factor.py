"""Run by test_conv_factor.py in a subprocess with TRITON_INTERPRET=1 (see
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


class Mismatch(Exception):
    pass


def check(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = 1.0 + want.abs().max().item()
    err = (got - want).abs().max().item()
    # both sum the same float32 products (half inputs upcast first); only the order differs
    if not err <= 1e-5 * scale:
        raise Mismatch(f"mismatch {what}: max error {err:.3g} (scale {scale:.3g})")
    if not torch.equal(got, got.transpose(-1, -2)):
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
        check(got, want, f"{geometry} bias={bias} {dtype} beta={beta}")
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
        check(got, want, f"{x_case.dtype} contiguous={x_case.is_contiguous()}")
        cases += 1
    a0 = torch.ones(1, 10, 10)
    got = conv2d_factor_update_triton(
        a0.clone(), torch.zeros(0, 1, 4, 4), kernel_size=3, bias=True, beta=0.5
    )
    check(got, a0 * 0.5, "empty batch")
    cases += 1
    print(f"checked {cases} cases")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Mismatch as exc:
        print(exc)
        sys.exit(1)
