"""The Conv2d input factor without the unfolded patches: reference vs a float64 oracle
(explicit loops), Triton vs reference, the layer helpers' lean path vs their rows, and
the memory the lean path allocates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from secondorder.kernels import HAS_TRITON
from secondorder.kernels.conv_factor import (
    conv2d_factor_update,
    conv2d_factor_update_correlation,
    conv2d_factor_update_reference,
)
from secondorder.layers.conv import Conv1dHelper, Conv2dHelper, Conv3dHelper

from ..helpers import assert_close, dense_conv_patches, with_ones

ROOT = Path(__file__).resolve().parents[2]


def _oracle(x: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, int]:
    """The float64 ``Σ_rows ã ãᵀ`` by explicit loops, and the number of rows it sums."""
    patches = dense_conv_patches(x.double(), conv)  # (groups, rows, cols), explicit loops
    if conv.bias is not None:
        patches = torch.stack([with_ones(p) for p in patches])
    return patches.transpose(1, 2) @ patches, patches.shape[1]


@settings(max_examples=30, deadline=None)
@given(
    c_per_group=st.integers(1, 3),
    groups=st.integers(1, 2),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    batch=st.integers(1, 4),
    bias=st.booleans(),
    chunk=st.sampled_from([None, 1, 40]),
    beta=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_reference_matches_the_float64_oracle(
    c_per_group, groups, kh, kw, stride, padding, dilation, batch, bias, chunk, beta
):
    c = c_per_group * groups
    conv = nn.Conv2d(c, groups, (kh, kw), stride, padding, dilation, groups=groups, bias=bias)
    x = torch.randn(batch, c, 7, 6)
    dim = c_per_group * kh * kw + int(bias)
    a0 = torch.randn(groups, dim, dim, dtype=torch.float64)
    a0 = a0 + a0.transpose(1, 2)
    got = a0.clone() if beta else torch.full_like(a0, float("nan"))
    conv2d_factor_update_reference(
        got, x, kernel_size=(kh, kw), stride=stride, padding=padding, dilation=dilation,
        groups=groups, bias=bias, beta=beta, alpha=0.5, chunk_elements=chunk,
    )  # fmt: skip
    prod, rows = _oracle(x, conv)
    want = 0.5 * prod + (beta * a0 if beta else 0.0)
    # n: the rows summed plus the β·a term; an entry's error is proportional to
    # |β| max|a| + α max diag(Σ ã ãᵀ) (Cauchy-Schwarz), not to the entry
    scale = beta * a0.abs().max().item() + 0.5 * prod.diagonal(dim1=1, dim2=2).max().item()
    assert_close(got, want, dtype=torch.float64, n=rows + 1, scale=scale)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_kernel_matches_reference_in_the_interpreter():
    # as a module of the tests package, from the repository root (it imports ..helpers)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("SECONDORDER_REFERENCE_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels._interpret_conv_factor"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("checked "), proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_on_gpu_matches_float64(dtype):
    conv = nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(8, 16, 17, 15)
    want, rows = _oracle(x.to(dtype).float(), conv)  # float64: no TF32 question
    a = torch.empty(1, 16 * 9 + 1, 16 * 9 + 1, device="cuda")
    conv2d_factor_update(a, x.to("cuda", dtype), kernel_size=3, padding=1, bias=True, beta=0.0)
    assert torch.equal(a, a.transpose(1, 2))  # mirrored tiles: symmetric by construction
    # float32 accumulation of `rows` products (a bf16 x and the products of two bf16 values
    # are exact in float32, so float32's eps for both); max |entry| is on the diagonal
    assert_close(a.cpu(), want, dtype=torch.float32, n=rows)


def test_dispatch_on_cpu_takes_the_correlation_path_for_stride_1_else_the_reference(monkeypatch):
    x = torch.randn(2, 3, 5, 5)
    a = torch.zeros(1, 28, 28)
    want = conv2d_factor_update_correlation(a.clone(), x, kernel_size=3, bias=True)
    assert torch.equal(conv2d_factor_update(a.clone(), x, kernel_size=3, bias=True), want)
    strided = conv2d_factor_update_reference(a.clone(), x, kernel_size=3, stride=2, bias=True)
    got = conv2d_factor_update(a.clone(), x, kernel_size=3, stride=2, bias=True)
    assert torch.equal(got, strided)
    monkeypatch.setenv("SECONDORDER_REFERENCE_KERNELS", "1")
    want = conv2d_factor_update_reference(a.clone(), x, kernel_size=3, bias=True)
    assert torch.equal(conv2d_factor_update(a.clone(), x, kernel_size=3, bias=True), want)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    groups=st.sampled_from([1, 2]),
    per_group=st.integers(1, 3),
    size=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    kernel=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    padding=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    bias=st.booleans(),
    beta=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_the_correlation_path_equals_the_patches(
    batch, groups, per_group, size, kernel, padding, bias, beta
):
    """Stride 1, dilation 1: the blocks from the channels' correlations at each offset
    difference, corrected at the boundary rows and columns, are the patches' sums (float64,
    every kernel, padding and input size where at least one output position exists)."""
    h, w = size
    kh, kw = kernel
    ph, pw = padding
    assume(h + 2 * ph >= kh and w + 2 * pw >= kw)
    channels = groups * per_group
    x = torch.randn(batch, channels, h, w, dtype=torch.float64)
    dim = per_group * kh * kw + int(bias)
    a0 = torch.randn(groups, dim, dim, dtype=torch.float64)
    a0 = a0 + a0.transpose(1, 2)
    kw_args = {"kernel_size": kernel, "padding": padding, "groups": groups, "bias": bias}
    want = conv2d_factor_update_reference(a0.clone(), x, beta=beta, alpha=2.0, **kw_args)
    got = conv2d_factor_update_correlation(a0.clone(), x, beta=beta, alpha=2.0, **kw_args)
    # sums of |x x'| over the rows in another order, bounded by the patches' |ã|ᵀ|ã|
    bound = conv2d_factor_update_reference(a0.abs(), x.abs(), beta=beta, alpha=2.0, **kw_args)
    assert_close(got, want, n=batch * (h + 2 * ph) * (w + 2 * pw), scale=float(bound.max()))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"a": torch.zeros(1, 28, 28, dtype=torch.float16)}, TypeError, "a must be float32"),
        ({"x": torch.zeros(2, 3, 5, 5, dtype=torch.int64)}, TypeError, "x must be a floating"),
        ({"x": torch.zeros(3, 5, 5)}, ValueError, r"x must be \(B, C, H, W\)"),
        ({"a": torch.zeros(1, 27, 27)}, ValueError, r"a must have shape \(1, 28, 28\)"),
        ({"groups": 2}, ValueError, "groups must be a positive divisor"),
        ({"kernel_size": 7, "a": torch.zeros(1, 148, 148)}, ValueError, "the kernel does not fit"),
        ({"stride": 0}, ValueError, "stride must be an int or a pair"),
        ({"chunk_elements": 0}, ValueError, "chunk_elements must be a positive int"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"a": torch.zeros(1, 28, 28), "x": torch.zeros(2, 3, 5, 5), "kernel_size": 3,
            "bias": True}  # fmt: skip
    args.update(kwargs)
    a, x = args.pop("a"), args.pop("x")
    with pytest.raises(error, match=match):
        conv2d_factor_update_reference(a, x, **args)


CONVS = [
    nn.Conv2d(4, 6, 3, padding=1),
    nn.Conv2d(4, 6, (2, 3), stride=(2, 1), padding=(1, 0), groups=2),
    nn.Conv2d(4, 6, 2, padding="same", bias=False),  # asymmetric padding
    nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", dilation=1),
    nn.Conv2d(4, 4, 3, padding=2, padding_mode="circular", dilation=2),
    nn.Conv2d(4, 4, 3, padding=1, padding_mode="replicate", stride=2),
    nn.Conv1d(4, 6, 3, padding=1),
    nn.Conv1d(4, 6, 4, padding="same", padding_mode="reflect"),
    nn.Conv3d(2, 3, 2, padding=1),
]


@pytest.mark.parametrize("conv", CONVS, ids=lambda m: repr(m))
def test_helper_lean_path_equals_its_rows(conv):
    helper = {1: Conv1dHelper, 2: Conv2dHelper, 3: Conv3dHelper}[conv.weight.dim() - 2]
    layer = helper(conv.double(), "conv")
    x = torch.randn(3, conv.in_channels, *([7] * (conv.weight.dim() - 2)), dtype=torch.float64)
    rows = layer.a_rows(x)
    want = rows.transpose(1, 2) @ rows
    a = torch.full((layer.groups, layer.a_dim, layer.a_dim), float("nan"), dtype=torch.float64)
    layer.a_factor_update(x, a, beta=0.0)
    # two summation orders of the same rows (a Gram matrix: max |entry| on the diagonal)
    n = rows.shape[1]
    assert_close(a, want, dtype=torch.float64, n=n)
    layer.a_factor_update(x, a, beta=1.0)  # accumulates
    assert_close(a, 2 * want, dtype=torch.float64, n=n + 1)


def _biggest_allocation(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


def test_lean_path_allocates_about_the_input_not_nine_times_it():
    conv = nn.Conv2d(16, 16, 3, padding=1)
    layer = Conv2dHelper(conv, "conv")
    x = torch.randn(16, 16, 32, 32)
    input_bytes = x.numel() * 4
    a = torch.zeros(1, layer.a_dim, layer.a_dim)
    lean = _biggest_allocation(lambda: layer.a_factor_update(x, a, beta=0.0))
    unfold = _biggest_allocation(lambda: layer.a_rows(x))
    assert unfold >= 9 * input_bytes  # the patch matrix: k² times the input
    assert lean <= 1.2 * input_bytes  # one chunk of patches, no bigger than the input


@pytest.mark.parametrize("conv", CONVS, ids=lambda m: repr(m))
def test_helper_square_sum_equals_its_rows(conv):
    """AdaFisher's diagonal Σ_rows ã² by strided sums, against the patch rows."""
    helper = {1: Conv1dHelper, 2: Conv2dHelper, 3: Conv3dHelper}[conv.weight.dim() - 2]
    layer = helper(conv.double(), "conv")
    x = torch.randn(3, conv.in_channels, *([7] * (conv.weight.dim() - 2)), dtype=torch.float64)
    rows = layer.a_rows(x)
    diag, count = layer.a_square_sum(x)
    assert count == rows.shape[1]
    assert_close(diag, rows.square().sum(1), dtype=torch.float64, n=count)  # count rows summed
