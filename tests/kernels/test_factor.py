"""The symmetric factor update: reference vs float64 oracle, Triton vs reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from secondorder.kernels import (
    HAS_TRITON,
    symmetric_factor_update,
    symmetric_factor_update_reference,
    symmetric_factor_update_triton,
)


def _oracle(a, x, beta, alpha):
    prod = x.double().transpose(-1, -2) @ x.double()
    return alpha * prod if beta == 0 else beta * a.double() + alpha * prod


@given(
    d=st.integers(1, 12),
    n=st.integers(1, 20),
    batch=st.sampled_from([None, 1, 3]),
    beta=st.sampled_from([0.0, 0.5, 0.95, 1.0]),
    alpha=st.floats(0.01, 10.0),
    x_dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    a_dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_reference_matches_float64_oracle(d, n, batch, beta, alpha, x_dtype, a_dtype):
    lead = () if batch is None else (batch,)
    x = torch.randn(*lead, n, d).to(x_dtype)
    a = torch.randn(*lead, d, d, dtype=a_dtype)
    a = a + a.transpose(-1, -2)
    want = _oracle(a, x, beta, alpha)
    got = symmetric_factor_update_reference(a, x, beta=beta, alpha=alpha)
    assert got is a  # in place
    tol = 1e-12 if a_dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * (1 + want.abs().max()))


def test_beta_zero_ignores_garbage():
    a = torch.full((4, 4), float("nan"))
    x = torch.randn(6, 4)
    symmetric_factor_update_reference(a, x, beta=0.0, alpha=2.0)
    torch.testing.assert_close(a, 2.0 * x.T @ x)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_kernel_matches_reference_in_the_interpreter():
    script = Path(__file__).with_name("_interpret_factor.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("SECONDORDER_REFERENCE_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("checked 145 cases")


def test_dispatch_uses_the_reference_on_cpu(monkeypatch):
    x = torch.randn(5, 3)
    a = torch.eye(3)
    want = symmetric_factor_update_reference(a.clone(), x, beta=0.5, alpha=1.0)
    torch.testing.assert_close(symmetric_factor_update(a, x, beta=0.5, alpha=1.0), want)


@pytest.mark.parametrize(
    "a, x, error, match",
    [
        (torch.zeros(3, 3, dtype=torch.int32), torch.zeros(2, 3), TypeError, "a must be float32"),
        (
            torch.zeros(3, 3),
            torch.zeros(2, 3, dtype=torch.int64),
            TypeError,
            "x must be a floating",
        ),
        (torch.zeros(3, 4), torch.zeros(2, 4), ValueError, r"a must be \(d, d\)"),
        (torch.zeros(3, 3), torch.zeros(2, 4), ValueError, "x must be"),
        (torch.zeros(2, 3, 3), torch.zeros(3, 5, 3), ValueError, "x must be"),
    ],
)
def test_bad_inputs_name_the_argument(a, x, error, match):
    with pytest.raises(error, match=match):
        symmetric_factor_update(a, x)


def test_triton_launcher_rejects_bad_blocks():
    if not HAS_TRITON:
        pytest.skip("Triton is not installed")
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        symmetric_factor_update_triton(torch.zeros(3, 3), torch.zeros(2, 3), block_n=24)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-3)])
@pytest.mark.parametrize("shape", [(1000, 257), (4096, 64), (3, 100, 130)])
def test_triton_kernel_on_gpu(dtype, tol, shape):
    x = torch.randn(*shape, device="cuda").to(dtype)
    d = shape[-1]
    a = torch.randn(*shape[:-2], d, d, device="cuda")
    a = a + a.transpose(-1, -2)
    want = symmetric_factor_update_reference(a.clone(), x, beta=0.9, alpha=0.1)
    got = symmetric_factor_update(a, x, beta=0.9, alpha=0.1)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    assert torch.equal(got, got.transpose(-1, -2))
