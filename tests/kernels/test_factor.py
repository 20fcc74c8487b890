"""The symmetric factor update: reference vs a float64 oracle, Triton vs reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder.kernels import (
    HAS_TRITON,
    symmetric_factor_update,
    symmetric_factor_update_reference,
    symmetric_factor_update_triton,
)
from secondorder.kernels._triton import interpreting, use_triton

from ..helpers import assert_close

ROOT = Path(__file__).resolve().parents[2]


def _oracle(a, x, beta, alpha):
    prod = x.double().transpose(-1, -2) @ x.double()
    return alpha * prod if beta == 0 else beta * a.double() + alpha * prod


def _bound_scale(a, x, beta, alpha) -> float:
    """``|β| max|a| + |α| max_i Σ_k x_ki²``: what the rounding error of an entry of
    ``β a + α xᵀx`` is proportional to (``Σ_k |x_ki||x_kj|`` is at most the largest
    diagonal entry of ``xᵀx``)."""
    prod = x.double().square().sum(-2).max().item() if x.numel() else 0.0
    old = a.double().abs().max().item() if beta and a.numel() else 0.0
    return abs(beta) * old + abs(alpha) * prod


def _symmetric(*shape, dtype=torch.float32, device="cpu"):
    a = torch.randn(*shape, dtype=dtype, device=device)
    return a + a.transpose(-1, -2)


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(1, 12),
    n=st.integers(0, 20),
    batch=st.sampled_from([None, 1, 3]),
    beta=st.sampled_from([0.0, 0.5, 0.95, 1.0]),
    alpha=st.floats(0.01, 10.0),
    x_dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    a_dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_reference_matches_float64_oracle(d, n, batch, beta, alpha, x_dtype, a_dtype):
    lead = () if batch is None else (batch,)
    x = torch.randn(*lead, n, d).to(x_dtype)
    a = _symmetric(*lead, d, d, dtype=a_dtype)
    want = _oracle(a, x, beta, alpha)
    scale = _bound_scale(a, x, beta, alpha)
    got = symmetric_factor_update_reference(a, x, beta=beta, alpha=alpha)
    assert got is a  # in place
    assert got.dtype == a_dtype
    # n rows summed plus the β·a term; x is cast to a's dtype first, so a float64 x into a
    # float32 a rounds once more before the product (half x is exact in float32): n + 2
    assert_close(got, want, dtype=a_dtype, n=n + 2, scale=scale)


@pytest.mark.parametrize("shape", [(4, 4), (3, 4, 4)])
@pytest.mark.parametrize("garbage", [float("nan"), float("inf")])
def test_beta_zero_ignores_garbage(shape, garbage):
    a = torch.full(shape, garbage)
    x = torch.randn(*shape[:-2], 6, 4)
    symmetric_factor_update_reference(a, x, beta=0.0, alpha=2.0)
    assert_close(a, _oracle(a, x, 0.0, 2.0), dtype=torch.float32, n=6)  # 6 rows summed


def test_reference_writes_through_a_non_contiguous_a():
    base = torch.zeros(5, 10)
    a = base[:, ::2]
    x = torch.randn(7, 5)
    symmetric_factor_update_reference(a, x, beta=0.0)
    assert_close(base[:, ::2], _oracle(a, x, 0.0, 1.0), dtype=torch.float32, n=7)  # 7 rows


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_kernel_matches_reference_in_the_interpreter():
    # A subprocess: TRITON_INTERPRET must be set before the kernel module is first imported,
    # which in this process has already happened (see _interpret_factor.py). Run as a module
    # of the tests package from the repository root, so that it imports ..helpers.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("SECONDORDER_REFERENCE_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels._interpret_factor"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("checked "), proc.stdout


def test_dispatch_uses_the_reference_on_cpu():
    x = torch.randn(5, 3)
    a = _symmetric(3, 3)
    assert not use_triton(x)
    want = symmetric_factor_update_reference(a.clone(), x, beta=0.5, alpha=1.0)
    got = symmetric_factor_update(a, x, beta=0.5, alpha=1.0)
    assert got is a
    assert torch.equal(got, want)


def test_use_triton_honours_the_reference_switch(monkeypatch):
    cpu = torch.zeros(1)
    assert not use_triton(cpu)
    monkeypatch.setenv("SECONDORDER_REFERENCE_KERNELS", "1")
    assert not use_triton(cpu)
    if torch.cuda.is_available():
        assert not use_triton(cpu.cuda())
        monkeypatch.setenv("SECONDORDER_REFERENCE_KERNELS", "0")
        assert use_triton(cpu.cuda()) == HAS_TRITON


@pytest.mark.parametrize(
    "a, x, error, match",
    [
        (torch.zeros(3, 3, dtype=torch.int32), torch.zeros(2, 3), TypeError, "a must be float32"),
        (torch.zeros(3, 3, dtype=torch.float16), torch.zeros(2, 3), TypeError, "a must be"),
        (torch.zeros(3, 3), torch.zeros(2, 3, dtype=torch.int64), TypeError, "x must be float32"),
        (torch.zeros(3, 3), [[0.0, 1.0, 2.0]], TypeError, "x must be a torch.Tensor"),
        (torch.zeros(3, 4), torch.zeros(2, 4), ValueError, r"a must be \(d, d\)"),
        (torch.zeros(3), torch.zeros(2, 3), ValueError, r"a must be \(d, d\)"),
        (torch.zeros(3, 3), torch.zeros(2, 4), ValueError, r"x must be \(n, d\)"),
        (torch.zeros(3, 3), torch.zeros(1, 2, 3), ValueError, r"x must be \(n, d\)"),
        (torch.zeros(2, 3, 3), torch.zeros(3, 5, 3), ValueError, r"x must be \(n, d\)"),
        (torch.zeros(3, 3), torch.zeros(2, 3, device="meta"), ValueError, "one device"),
    ],
)
def test_bad_inputs_name_the_argument(a, x, error, match):
    with pytest.raises(error, match=match):
        symmetric_factor_update(a, x)
    with pytest.raises(error, match=match):
        symmetric_factor_update_reference(a, x)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_n": 24}, "block_n must be a power of two"),
        ({"block_d": 8}, "block_d must be a power of two"),
        ({"input_precision": "bf16"}, "input_precision must be one of"),
    ],
)
def test_triton_launcher_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        symmetric_factor_update_triton(torch.zeros(3, 3), torch.zeros(2, 3), **kwargs)


@pytest.mark.skipif(not HAS_TRITON or interpreting(), reason="needs Triton, not interpreting")
def test_triton_launcher_refuses_cpu_tensors_outside_the_interpreter():
    with pytest.raises(ValueError, match="must be CUDA tensors"):
        symmetric_factor_update_triton(torch.zeros(3, 3), torch.zeros(2, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1000, 257), (4096, 64), (3, 100, 130), (5, 1)])
@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_triton_kernel_on_gpu(dtype, shape, beta, monkeypatch):
    monkeypatch.delenv("SECONDORDER_REFERENCE_KERNELS", raising=False)
    x = torch.randn(*shape, device="cuda").to(dtype)
    d = shape[-1]
    a = _symmetric(*shape[:-2], d, d, device="cuda")
    # the float64 oracle, not the float32 torch reference: cuBLAS may run that in TF32
    # (torch.backends.cuda.matmul.allow_tf32); the kernel multiplies in IEEE float32
    want = _oracle(a, x, beta, 0.1)
    scale = _bound_scale(a, x, beta, 0.1)
    if beta == 0:
        a.fill_(float("nan"))
    got = symmetric_factor_update(a, x, beta=beta, alpha=0.1)
    assert got is a
    # float32 accumulation of n = rows products plus the β·a term; a bf16 x is exact in
    # float32 and so are the products of two bf16 values, so float32's eps for both dtypes
    assert_close(got, want, dtype=torch.float32, n=shape[-2] + 1, scale=scale)
    assert torch.equal(got, got.transpose(-1, -2))  # mirrored tiles: symmetric by construction
