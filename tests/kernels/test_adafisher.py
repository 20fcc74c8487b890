"""AdaFisher's fused update: reference vs an element-by-element float64 oracle, Triton vs
reference (interpreter subprocess, and CUDA where present)."""

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
    adafisher_update,
    adafisher_update_reference,
    adafisher_update_triton,
)
from secondorder.kernels._triton import interpreting, use_triton

from ..helpers import assert_close, tolerance

ROOT = Path(__file__).resolve().parents[2]
#: rounded operations on the way to one updated weight: g + wd·w (2), β m + (1 − β) g'
#: (3), s·h + λ (2), m / bias_correction / F̃ (2), + wd·w (2), w − lr · step (2)
OPS = 13


def _scales(w0, want_w, m0, g, w_decay):
    """What the rounding error of an updated entry is proportional to: ``|w| + |lr·step|``
    for the weight (the step is ``w0 − want_w``), ``β|m| + (1 − β)|g'|`` (at most
    ``|m| + |g| + wd|w|``) for the moment; largest over the entries."""
    w0, want_w = w0.double(), want_w.double()
    scale_w = (w0.abs().max() + (w0 - want_w).abs().max()).item()
    scale_m = (m0.double().abs().max() + g.double().abs().max()).item()
    return scale_w, scale_m + w_decay * w0.abs().max().item()


def _assert_half_close(got, want, dtype, scale):
    """A half-precision result: float32 arithmetic (``OPS`` roundings on entries of size
    ``scale``), then one rounding to ``dtype`` on store, at most eps/2 of the value (n = 1,
    safety 1)."""
    torch.testing.assert_close(
        got.double(),
        want.double(),
        rtol=tolerance(dtype, n=1, safety=1),
        atol=tolerance(torch.float32, n=OPS) * scale,
    )


def _oracle(w, g, m, s, h, *, lr, beta, bias_correction, damping, weight_decay, decoupled):
    """The update written out one element at a time in float64 (no broadcasting)."""
    w, g, m, s, h = (t.double() for t in (w, g, m, s, h))
    w_new, m_new = w.clone(), m.clone()
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in w.shape)).reshape(-1, w.dim()):
        *lead, i, j = idx.tolist()
        at = (*lead, i, j)
        grad = g[at] + (0.0 if decoupled else weight_decay * w[at])
        m_new[at] = beta * m[at] + (1 - beta) * grad
        fisher = s[(*lead, i)] * h[(*lead, j)] + damping
        step = m_new[at] / bias_correction / fisher
        if decoupled:
            step = step + weight_decay * w[at]
        w_new[at] = w[at] - lr * step
    return w_new, m_new


def _inputs(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    *lead, rows, cols = shape
    w = torch.randn(shape, generator=gen).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    m = (0.1 * torch.randn(shape, generator=gen)).to(dtype)
    s = torch.rand((*lead, rows), generator=gen)
    h = torch.rand((*lead, cols), generator=gen)
    return w, g, m, s, h


@given(
    shape=st.sampled_from([(1, 1), (3, 5), (4, 1), (1, 6), (2, 3, 4)]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    decoupled=st.booleans(),
    step=st.sampled_from([1, 2, 10]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    damping=st.sampled_from([1e-3, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_reference_matches_the_elementwise_oracle(
    shape, dtype, decoupled, step, weight_decay, damping, seed
):
    w, g, m, s, h = _inputs(shape, dtype, seed)
    kwargs = {
        "lr": 0.05,
        "beta": 0.9,
        "bias_correction": 1 - 0.9**step,
        "damping": damping,
        "weight_decay": weight_decay,
        "decoupled": decoupled,
    }
    want_w, want_m = _oracle(w, g, m, s, h, **kwargs)
    scale_w, scale_m = _scales(w, want_w, m, g, weight_decay)
    g0 = g.clone()
    out = adafisher_update_reference(w, g, m, s, h, **kwargs)
    assert out is w  # in place
    assert torch.equal(g, g0)  # the gradient is never written
    assert_close(w, want_w, dtype=dtype, n=OPS, scale=scale_w)
    assert_close(m, want_m, dtype=dtype, n=OPS, scale=scale_m)


def test_reference_writes_through_strided_views():
    """The embedding block is a transposed view of the weight; the update lands in it."""
    weight = torch.randn(11, 6)  # (num_embeddings, embedding_dim)
    exp_avg = torch.zeros(11, 6)
    grad = torch.randn(11, 6)
    s, h = torch.rand(6), torch.rand(11)
    kwargs = {"lr": 0.1, "beta": 0.9, "bias_correction": 0.1, "damping": 1e-3}
    want_w, want_m = _oracle(
        weight.T, grad.T, exp_avg.T, s, h, weight_decay=0.0, decoupled=False, **kwargs
    )
    scale_w, scale_m = _scales(weight.T, want_w, exp_avg.T, grad.T, 0.0)
    adafisher_update_reference(weight.T, grad.T, exp_avg.T, s, h, **kwargs)
    assert_close(weight.T, want_w, dtype=torch.float32, n=OPS, scale=scale_w)
    assert_close(exp_avg.T, want_m, dtype=torch.float32, n=OPS, scale=scale_m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_are_computed_in_float32(dtype):
    w, g, m, s, h = _inputs((5, 7), dtype)
    kwargs = {"lr": 0.05, "beta": 0.9, "bias_correction": 0.1, "damping": 1e-3}
    want_w, want_m = _oracle(w, g, m, s, h, weight_decay=0.01, decoupled=True, **kwargs)
    scale_w, scale_m = _scales(w, want_w, m, g, 0.01)
    adafisher_update_reference(w, g, m, s, h, weight_decay=0.01, decoupled=True, **kwargs)
    assert w.dtype == dtype and m.dtype == dtype
    _assert_half_close(w, want_w, dtype, scale_w)
    _assert_half_close(m, want_m, dtype, scale_m)


def test_decoupled_and_coupled_decay_differ_as_the_formulas_say():
    w, g, m, s, h = _inputs((4, 3))
    kwargs = {"lr": 0.1, "beta": 0.9, "bias_correction": 1.0, "damping": 0.5}
    coupled, decoupled = w.clone(), w.clone()
    adafisher_update_reference(coupled, g, m.clone(), s, h, weight_decay=0.2, **kwargs)
    adafisher_update_reference(
        decoupled, g, m.clone(), s, h, weight_decay=0.2, decoupled=True, **kwargs
    )
    fisher = s[:, None] * h[None, :] + 0.5
    # L2: the decay enters the moment, scaled by (1 − β)/F̃; decoupled: lr·wd·w directly
    delta = decoupled.double() - coupled.double()
    want = 0.1 * (0.1 * 0.2 * w.double() / fisher.double() - 0.2 * w.double())
    # each run rounds OPS times on entries of size |w| + |lr·step|, the delta is far smaller
    scale = (w.abs().max() + (w - coupled).abs().max()).item()
    assert_close(delta, want, dtype=torch.float32, n=OPS, scale=scale)


def test_dispatch_uses_the_reference_on_cpu():
    w, g, m, s, h = _inputs((3, 4))
    assert not use_triton(w)
    kwargs = {"lr": 0.1, "beta": 0.9, "bias_correction": 0.5, "damping": 1e-3}
    want_w, want_m = w.clone(), m.clone()
    adafisher_update_reference(want_w, g, want_m, s, h, **kwargs)
    assert adafisher_update(w, g, m, s, h, **kwargs) is w
    assert torch.equal(w, want_w) and torch.equal(m, want_m)


_OK = {"lr": 0.1, "beta": 0.9, "bias_correction": 0.5, "damping": 1e-3}


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"param": torch.zeros(3, 4, dtype=torch.int32)}, TypeError, "param must have a float"),
        ({"grad": [[0.0] * 4] * 3}, TypeError, "grad must be a torch.Tensor"),
        ({"param": torch.zeros(12)}, ValueError, r"param must be \(rows, cols\)"),
        ({"grad": torch.zeros(4, 3)}, ValueError, "grad must have param's shape"),
        ({"exp_avg": torch.zeros(3, 5)}, ValueError, "exp_avg must have param's shape"),
        ({"s_diag": torch.zeros(4)}, ValueError, "s_diag must have shape"),
        ({"h_diag": torch.zeros(3)}, ValueError, "h_diag must have shape"),
        ({"h_diag": torch.zeros(4, device="meta")}, ValueError, "h_diag must be on param's"),
        ({"lr": -1.0}, ValueError, "lr must be"),
        ({"lr": "0.1"}, TypeError, "lr must be a real number"),
        ({"beta": 1.0}, ValueError, r"beta must be a finite number in \[0, 1\)"),
        ({"bias_correction": 0.0}, ValueError, "bias_correction must be"),
        ({"damping": 0.0}, ValueError, "damping must be a finite number > 0"),
        ({"weight_decay": float("nan")}, ValueError, "weight_decay must be"),
    ],
)
def test_bad_inputs_name_the_argument(change, error, match):
    names = ("param", "grad", "exp_avg", "s_diag", "h_diag")
    tensors = dict(zip(names, _inputs((3, 4)), strict=True))
    scalars = dict(_OK)
    for key, value in change.items():
        (tensors if key in tensors else scalars)[key] = value
    args = list(tensors.values())
    with pytest.raises(error, match=match):
        adafisher_update(*args, **scalars)
    with pytest.raises(error, match=match):
        adafisher_update_reference(*args, **scalars)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_kernel_matches_reference_in_the_interpreter():
    # A subprocess: TRITON_INTERPRET must be set before the kernel module is first imported,
    # which in this process has already happened (see _interpret_adafisher.py); a module of
    # the tests package, run from the repository root, so that it imports ..helpers.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("SECONDORDER_REFERENCE_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels._interpret_adafisher"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("checked "), proc.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("kwargs", [{"block_r": 3}, {"block_c": 0}])
def test_triton_launcher_rejects_bad_blocks(kwargs):
    with pytest.raises(ValueError, match="must be a power of two"):
        adafisher_update_triton(*_inputs((3, 4)), **_OK, **kwargs)


@pytest.mark.skipif(not HAS_TRITON or interpreting(), reason="needs Triton, not interpreting")
def test_triton_launcher_refuses_cpu_tensors_outside_the_interpreter():
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        adafisher_update_triton(*_inputs((3, 4)), **_OK)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (4096, 513), (3, 64, 129), (100000, 1)])
@pytest.mark.parametrize("decoupled", [False, True])
def test_triton_kernel_on_gpu(dtype, shape, decoupled, monkeypatch):
    monkeypatch.delenv("SECONDORDER_REFERENCE_KERNELS", raising=False)
    w, g, m, s, h = (t.cuda() for t in _inputs(shape, dtype))
    kwargs = {**_OK, "weight_decay": 0.01, "decoupled": decoupled}
    # the reference in float64 (float64 param: float64 arithmetic), on the same values
    want_w, want_m = w.double(), m.double()
    adafisher_update_reference(want_w, g.double(), want_m, s.double(), h.double(), **kwargs)
    scale_w, scale_m = _scales(w, want_w, m, g, 0.01)
    assert adafisher_update(w, g, m, s, h, **kwargs) is w
    if dtype == torch.float32:
        assert_close(w, want_w, dtype=dtype, n=OPS, scale=scale_w)
        assert_close(m, want_m, dtype=dtype, n=OPS, scale=scale_m)
    else:  # float32 arithmetic, one rounding to bfloat16 on store
        _assert_half_close(w, want_w, dtype, scale_w)
        _assert_half_close(m, want_m, dtype, scale_m)
