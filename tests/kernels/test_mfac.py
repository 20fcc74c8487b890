"""M-FAC kernels: references vs float64 dense oracles, Triton vs reference, memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from secondorder.kernels import HAS_TRITON
from secondorder.kernels._triton import interpreting
from secondorder.kernels.mfac import (
    mfac_coefficients,
    mfac_coefficients_reference,
    mfac_coefficients_triton,
    mfac_gram_row,
    mfac_gram_row_reference,
    mfac_gram_row_triton,
    mfac_ihvp,
    mfac_ihvp_reference,
    mfac_ihvp_triton,
)

from ..helpers import assert_close, tolerance

ROOT = Path(__file__).resolve().parents[2]


def _dense_ihvp(w: torch.Tensor, x: torch.Tensor, damping: float) -> torch.Tensor:
    """``(damping I + wᵀw/k)⁻¹ x`` by a dense float64 solve, ``w (k, B)``, ``x (B,)``.

    A plain LU solve is accurate only to cond(F)·eps -- about 3e-8 relative at damping 1e-6
    with B = 3000, worse than the Woodbury product it is meant to check -- so two steps of
    iterative refinement (residuals from the unformed F) bring it to round-off.
    """
    k, cols = w.shape
    f = damping * torch.eye(cols, dtype=torch.float64) + w.T @ w / k
    lu, pivots = torch.linalg.lu_factor(f)
    y = torch.linalg.lu_solve(lu, pivots, x[:, None])[:, 0]
    for _ in range(2):
        residual = x - (damping * y + w.T @ (w @ y) / k)
        y = y + torch.linalg.lu_solve(lu, pivots, residual[:, None])[:, 0]
    return y


def _window(nb, m, cols, count, *, dtype=torch.float64, seed=0):
    """A random window whose rows past ``count`` are NaN: they must never be read."""
    gen = torch.Generator().manual_seed(seed)
    window = torch.randn(nb, m, cols, generator=gen, dtype=torch.float64).to(dtype)
    window[:, count:] = float("nan")
    return window


def _gram(window, count):
    """The float64 dot products of the valid rows, NaN elsewhere (never read either)."""
    nb, m, _ = window.shape
    gram = torch.full((nb, m, m), float("nan"), dtype=torch.float64)
    valid = window[:, :count].double()
    gram[:, :count, :count] = valid @ valid.transpose(1, 2)
    return gram


def _relative(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _woodbury_error(got, want, x, damping):
    """The error of ``F⁻¹x`` relative to ``‖x‖/λ``, the size of the two Woodbury terms
    ``x/λ`` and ``Wᵀc/λ²`` whose difference is the result: a rounding error of ``q = Wx``
    reaches it multiplied by ``cond(K)`` at most (``‖W‖²‖K⁻¹‖/λ <= cond(K)``)."""
    return ((got.double() - want.double()).norm() / (x.double().norm() / damping)).item()


def _woodbury_cond(w: torch.Tensor, damping: float) -> float:
    """``‖F‖/λ`` for ``F = λI + wᵀw/k`` (``w (k, B)``), from the largest singular value of
    ``w`` (``‖F‖ = λ + σ²/k``): the condition number of ``F⁻¹x`` in the Woodbury form, whose
    terms are of size ``‖x‖/λ`` while the result may be as small as ``‖x‖/‖F‖``. It is
    ``cond(F)`` when ``k < B`` (``λ`` is then an eigenvalue of F) and larger otherwise."""
    k = w.shape[0]
    return (damping + torch.linalg.matrix_norm(w.double(), ord=2).item() ** 2 / k) / damping


def _k_cond(gram, count, damping) -> float:
    """The largest ``cond(K)`` over blocks, ``K = count·I + gram[:count, :count]/λ`` in
    float64 (the matrix the Woodbury solve factors), from the lower triangle of ``gram``."""
    g = gram[..., :count, :count].double().tril()
    k = (g + g.tril(-1).transpose(-1, -2)) / damping
    k = k + count * torch.eye(count, dtype=torch.float64, device=gram.device)
    return float(torch.linalg.cond(k).max())


# ---- references against dense oracles ------------------------------------------------------


@settings(deadline=None)
@given(
    m=st.integers(1, 64),
    data=st.data(),
    # hypothesis favours small integers: ask for wide windows explicitly
    cols=st.one_of(st.integers(1, 100), st.integers(1000, 2000)),
    log_damping=st.floats(-6.0, 2.0),
    nb=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_ihvp_reference_matches_dense_solve(m, data, cols, log_damping, nb, seed):
    count = data.draw(st.integers(1, m), label="count")
    damping = 10.0**log_damping
    window = _window(nb, m, cols, count, seed=seed)
    x = torch.randn(
        nb, cols, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64
    )
    chol = mfac_coefficients_reference(_gram(window, count), count, damping)
    got = mfac_ihvp_reference(window, chol, x, damping, count)
    assert got.shape == x.shape and got.dtype == torch.float64
    for b in range(nb):
        want = _dense_ihvp(window[b, :count], x[b], damping)
        # n = the B-long products plus the count-long ones (the dense LU is refined from
        # B x B residuals, the Woodbury product sums both), cond = ‖F‖/λ >= cond(F)
        cond = _woodbury_cond(window[b, :count], damping)
        assert _relative(got[b], want) <= tolerance(torch.float64, n=cols + count, cond=cond)


@pytest.mark.parametrize(
    "count, cols, damping", [(50, 3000, 1e-6), (64, 2500, 1e-4), (1, 4000, 1e-2)]
)
def test_ihvp_reference_matches_dense_solve_on_wide_windows(count, cols, damping):
    window = _window(1, 64, cols, count)
    x = torch.randn(1, cols, dtype=torch.float64)
    chol = mfac_coefficients_reference(_gram(window, count), count, damping)
    got = mfac_ihvp_reference(window, chol, x, damping, count)
    cond = _woodbury_cond(window[0, :count], damping)
    tol = tolerance(torch.float64, n=cols + count, cond=cond)
    assert _relative(got[0], _dense_ihvp(window[0, :count], x[0], damping)) <= tol


@pytest.mark.parametrize("window_dtype", [torch.float32, torch.bfloat16])
def test_ihvp_reference_in_float32_against_the_oracle(window_dtype):
    # the estimator's default: a float32 (or bfloat16) window, float32 x, float64 factor
    count, cols, damping = 30, 2000, 1e-4
    window = _window(2, 32, cols, count, dtype=window_dtype)
    x = torch.randn(2, cols)
    gram = _gram(window, count)
    chol = mfac_coefficients_reference(gram, count, damping)
    got = mfac_ihvp_reference(window, chol, x, damping, count)
    assert got.dtype == torch.float32
    for b in range(2):
        want = _dense_ihvp(window[b, :count].double(), x[b].double(), damping)
        # float32 sums of B products (q = Wx) and count products (Wᵀc); the solve is in
        # float64 (chol is), so only q's rounding is amplified, by cond(K) at most
        tol = tolerance(torch.float32, n=cols + count, cond=_k_cond(gram[b], count, damping))
        assert _woodbury_error(got[b], want, x[b], damping) <= tol


@settings(deadline=None)
@given(
    m=st.integers(1, 64),
    data=st.data(),
    log_damping=st.floats(-6.0, 2.0),
    nb=st.sampled_from([None, 1, 3]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_coefficients_reference_factor_k(m, data, log_damping, nb, dtype, seed):
    count = data.draw(st.integers(1, m), label="count")
    cols = data.draw(st.integers(1, 300), label="cols")
    damping = 10.0**log_damping
    window = _window(nb or 1, m, cols, count, seed=seed)
    gram = _gram(window, count)
    # only the lower triangle is read
    gram = gram.tril() + torch.full_like(gram, float("nan")).triu(1)
    gram = gram.to(dtype) if nb else gram[0].to(dtype)
    chol = mfac_coefficients_reference(gram, count, damping)
    lead = (nb,) if nb else ()
    assert chol.shape == (*lead, count, count) and chol.dtype == dtype
    if dtype == torch.float32 and chol.isnan().any():
        return  # K beyond float32 (documented: NaN blocks); float64 must always succeed
    k = gram[..., :count, :count].double().tril()
    k = (k + k.tril(-1).transpose(-1, -2)) / damping + count * torch.eye(count, dtype=torch.float64)
    assert torch.equal(chol, chol.tril())
    assert (chol.diagonal(dim1=-2, dim2=-1) > 0).all()
    rebuilt = chol.double() @ chol.double().transpose(-1, -2)
    # Cholesky is backward stable: the residual ‖LLᵀ − K‖/‖K‖ is n·eps, no cond; n = the
    # count-long inner products plus forming K in gram's dtype (a division and an addition)
    assert _relative(rebuilt, k) <= tolerance(dtype, n=count + 2)


def test_coefficients_mark_indefinite_blocks_nan():
    gram = _gram(_window(3, 6, 10, 6), 6)
    gram[1] -= 1e3 * torch.eye(6, dtype=torch.float64)
    chol = mfac_coefficients_reference(gram, 6, 1.0)
    assert chol[1].isnan().all()
    assert chol[[0, 2]].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "nb, m, cols, row, count", [(1, 5, 7, 2, 5), (3, 9, 800, 8, 4), (2, 1, 1, 0, 1)]
)
def test_gram_row_reference_matches_dense(dtype, nb, m, cols, row, count):
    window = torch.randn(nb, m, cols).to(dtype)
    got = mfac_gram_row_reference(window, row, count)
    assert got.shape == (nb, count)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    wd = window.double()
    want = (wd[:, :count] @ wd[:, row, :, None])[..., 0]
    # cols-long sums, in float32 for float32 and bfloat16 windows (bfloat16 products are
    # exact in float32), against Σ|w_i||w_row| <= ‖W‖‖w_row‖ (Cauchy-Schwarz)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = (wd[:, :count].norm() * wd[:, row].norm()).item()
    assert (got.double() - want).abs().max() <= tolerance(acc, n=cols) * scale
    # one block on its own: a batch of one for BLAS, another call than the batched one
    one = mfac_gram_row_reference(window[0], row, count)
    assert_close(one, got[0], dtype=acc, n=cols, scale=scale)


def test_gram_row_builds_the_gram_matrix():
    window = _window(2, 7, 50, 5)
    rows = torch.stack([mfac_gram_row(window, r, 5) for r in range(5)], dim=1)
    # two ways to sum the 50 products (a Gram matrix: its largest entry is on the diagonal)
    assert_close(rows, _gram(window, 5)[:, :5, :5], dtype=torch.float64, n=50)


# ---- dtypes, shapes, dispatch ------------------------------------------------------------


@pytest.mark.parametrize("nb, count, cols", [(1, 1, 1), (1, 48, 20000), (3, 17, 700)])
def test_bfloat16_window_matches_float32_on_the_same_values(nb, count, cols):
    damping = 1e-3
    window = _window(nb, count + 2, cols, count, dtype=torch.bfloat16)
    exact = window.float()  # bfloat16 values are exact in float32
    x = torch.randn(nb, cols)
    gram = _gram(window, count)
    chol = mfac_coefficients_reference(gram, count, damping)
    got = mfac_ihvp_reference(window, chol, x, damping, count)
    want = mfac_ihvp_reference(exact, chol, x, damping, count)
    assert got.dtype == torch.float32
    # both sum the same float32 products, tile by tile vs in one BLAS call: B-long sums for
    # q = Wx (amplified by cond(K) in the solve) and count-long ones for Wᵀc
    tol = tolerance(torch.float32, n=cols + count, cond=_k_cond(gram, count, damping))
    assert _woodbury_error(got, want, x, damping) <= tol
    # cols-long float32 sums in two orders; the largest entry is the row's own square norm
    assert_close(
        mfac_gram_row_reference(window, 0, count),
        mfac_gram_row_reference(exact, 0, count),
        dtype=torch.float32,
        n=cols,
    )


def test_float64_x_with_a_float32_window_is_computed_in_float64():
    count, cols, damping = 12, 900, 1e-5
    window = _window(2, 12, cols, count, dtype=torch.float32)
    x = torch.randn(2, cols, dtype=torch.float64)
    gram = _gram(window, count)
    chol = mfac_coefficients_reference(gram, count, damping)
    got = mfac_ihvp_reference(window, chol, x, damping, count)
    assert got.dtype == torch.float64
    want = mfac_ihvp_reference(window.double(), chol, x, damping, count)
    # float64 both ways (a float32 window is exact in float64), tile by tile vs one call
    tol = tolerance(torch.float64, n=cols + count, cond=_k_cond(gram, count, damping))
    assert _woodbury_error(got, want, x, damping) <= tol


def test_unbatched_shapes_match_the_batched_ones():
    count, damping = 6, 0.1
    window = _window(2, 8, 40, count)
    x = torch.randn(2, 40, dtype=torch.float64)
    gram = _gram(window, count)
    chol = mfac_coefficients(gram, count, damping)
    # one block alone vs in a batch: LAPACK and BLAS are called differently, so the two
    # agree to round-off: a count x count factorisation (cond(K)), 40 + count long sums
    cond = _k_cond(gram[1], count, damping)
    assert_close(
        mfac_coefficients(gram[1], count, damping), chol[1], dtype=torch.float64, n=count, cond=cond
    )
    out = mfac_ihvp(window, chol, x, damping, count)
    out1 = mfac_ihvp(window[1], chol[1], x[1], damping, count)
    assert out1.shape == (40,)
    scale = x[1].abs().max().item() / damping  # the size of the Woodbury terms
    assert_close(out1, out[1], dtype=torch.float64, n=40 + count, cond=cond, scale=scale)
    assert mfac_gram_row(window[1], 2, count).shape == (count,)


def test_dispatch_uses_the_reference_on_cpu():
    count, damping = 5, 0.5
    window = _window(2, 6, 30, count, dtype=torch.float32)
    x = torch.randn(2, 30)
    gram = _gram(window, count)
    chol = mfac_coefficients(gram, count, damping)
    assert torch.equal(chol, mfac_coefficients_reference(gram, count, damping))
    assert torch.equal(
        mfac_ihvp(window, chol, x, damping, count),
        mfac_ihvp_reference(window, chol, x, damping, count),
    )
    assert torch.equal(mfac_gram_row(window, 1, count), mfac_gram_row_reference(window, 1, count))


# ---- memory -----------------------------------------------------------------------------------


def _largest_allocation(fn) -> int:
    """The largest single CPU allocation (bytes) made while ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocations are attributed to the innermost op (aten::empty*, whose self usage is
    # exactly what it allocated); frees come later, outside it.
    return max((e.self_cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("window_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nb", [1, 2])
def test_ihvp_allocates_nothing_of_the_window_size(window_dtype, nb):
    count, cols, damping = 48, 20000, 1e-3
    window = _window(nb, 50, cols, count, dtype=window_dtype)
    x = torch.randn(nb, cols)
    chol = mfac_coefficients_reference(_gram(window, count), count, damping)
    limit = count * cols * 4  # one block's valid rows in float32
    # the probe sees the regression it guards against
    assert _largest_allocation(lambda: window[:, :count].to(torch.float32, copy=True)) >= limit
    assert _largest_allocation(lambda: mfac_ihvp_reference(window, chol, x, damping, count)) < limit
    assert _largest_allocation(lambda: mfac_gram_row_reference(window, 3, count)) < limit


# ---- argument checks --------------------------------------------------------------------------

_G = torch.eye(4, dtype=torch.float64).expand(2, 4, 4).clone()
_W = torch.zeros(2, 4, 10)
_L = torch.eye(3).expand(2, 3, 3).clone()
_X = torch.zeros(2, 10)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((_G, 3, 0.0), ValueError, "damping must be"),
        ((_G, 3, -1.0), ValueError, "damping must be"),
        ((_G, 3, float("nan")), ValueError, "damping must be"),
        ((_G, 3, "1"), ValueError, "damping must be"),
        ((_G, 0, 1.0), ValueError, "count must satisfy"),
        ((_G, 5, 1.0), ValueError, "count must satisfy"),
        ((_G, 2.0, 1.0), TypeError, "count must be an int"),
        ((_G.float().half(), 3, 1.0), TypeError, "gram must be one of"),
        ((_G.tolist(), 3, 1.0), TypeError, "gram must be a torch.Tensor"),
        ((_G[:, :, :3], 3, 1.0), ValueError, r"gram must be \(m, m\)"),
        ((_G[0, 0], 1, 1.0), ValueError, r"gram must be \(m, m\)"),
    ],
)
def test_coefficients_reject_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        mfac_coefficients(*args)
    with pytest.raises(error, match=match):
        mfac_coefficients_reference(*args)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((_W, _L, _X, 0.0, 3), ValueError, "damping must be"),
        ((_W, _L, _X, 1.0, 0), ValueError, "count must satisfy"),
        ((_W, _L, _X, 1.0, 5), ValueError, "count must satisfy"),
        ((_W, _L, _X, 1.0, True), TypeError, "count must be an int"),
        ((_W.half(), _L, _X, 1.0, 3), TypeError, "window must be one of"),
        ((_W, _L.half(), _X, 1.0, 3), TypeError, "chol must be one of"),
        ((_W, _L, _X.bfloat16(), 1.0, 3), TypeError, "x must be one of"),
        ((_W[0, 0], _L, _X, 1.0, 1), ValueError, r"window must be \(m, B\)"),
        ((_W, _L, _X[:, :9], 1.0, 3), ValueError, r"x must be \(nb, B\)"),
        ((_W, _L, _X[0], 1.0, 3), ValueError, r"x must be \(nb, B\)"),
        ((_W[0], _L[0], _X, 1.0, 3), ValueError, r"x must be \(B,\)"),
        ((_W, _L, _X, 1.0, 2), ValueError, "chol must be"),
        ((_W, _L[:1], _X, 1.0, 3), ValueError, "chol must be"),
        ((_W, _L, _X.to("meta"), 1.0, 3), ValueError, "one device"),
    ],
)
def test_ihvp_rejects_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        mfac_ihvp(*args)
    with pytest.raises(error, match=match):
        mfac_ihvp_reference(*args)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((_W, 4, 3), ValueError, "row must satisfy"),
        ((_W, -1, 3), ValueError, "row must satisfy"),
        ((_W, 1.0, 3), TypeError, "row must be an int"),
        ((_W, 0, 5), ValueError, "count must satisfy"),
        ((_W.int(), 0, 3), TypeError, "window must be one of"),
    ],
)
def test_gram_row_rejects_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        mfac_gram_row(*args)
    with pytest.raises(error, match=match):
        mfac_gram_row_reference(*args)


# ---- Triton ------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_kernels_match_the_references_in_the_interpreter():
    # A subprocess: TRITON_INTERPRET must be set before the kernel module is first imported
    # (see _interpret_mfac.py); a module of the tests package, so that it imports ..helpers.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("SECONDORDER_REFERENCE_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels._interpret_mfac"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("checked "), proc.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: mfac_coefficients_triton(_G, 3, 1.0, block_size=8), "block_size must be"),
        (lambda: mfac_coefficients_triton(_G, 3, 1.0, block_size=128), "block_size must be"),
        (lambda: mfac_ihvp_triton(_W, _L, _X, 1.0, 3, block_rows=3), "block_rows must be"),
        (lambda: mfac_ihvp_triton(_W, _L, _X, 1.0, 3, block_cols=8), "block_cols must be"),
        (lambda: mfac_gram_row_triton(_W, 0, 3, block_cols=24), "block_cols must be"),
    ],
)
def test_triton_launchers_reject_bad_options(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(not HAS_TRITON or interpreting(), reason="needs Triton, not interpreting")
@pytest.mark.parametrize(
    "call",
    [
        lambda: mfac_coefficients_triton(_G, 3, 1.0),
        lambda: mfac_ihvp_triton(_W, _L, _X, 1.0, 3),
        lambda: mfac_gram_row_triton(_W, 0, 3),
    ],
)
def test_triton_launchers_refuse_cpu_tensors_outside_the_interpreter(call):
    with pytest.raises(ValueError, match="must be CUDA tensors"):
        call()


def _cuda_window(nb, m, cols, dtype):
    return torch.randn(nb, m, cols, device="cuda").to(dtype)


def _kernel_sum_length(cols: int, count: int) -> int:
    """Roundings that accumulate into one entry in the M-FAC kernels at the launchers'
    default blocks (256 columns, 16 rows): pass 1 (``Wx``, a gram row) adds ⌈B/256⌉ products
    per accumulator lane, then the 256 lanes as a tree (8) and the column splits (at most
    ⌈B/256⌉); pass 2 (``Wᵀc``) adds ⌈count/16⌉ per lane, 16 lanes as a tree (4), and forms
    ``x/λ − .../λ²`` (2)."""
    lanes = -(-cols // 256)
    return 2 * lanes + 8 + -(-count // 16) + 4 + 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("count, block", [(1024, None), (700, 32), (1000, 64), (50, None)])
def test_triton_coefficients_on_gpu(dtype, count, block, monkeypatch):
    monkeypatch.delenv("SECONDORDER_REFERENCE_KERNELS", raising=False)
    window = _cuda_window(2, 1024, 5000, torch.float64)
    gram = (window @ window.transpose(1, 2)).to(dtype)
    damping = 100.0  # K = count I + gram/100: well conditioned even in float32
    got = mfac_coefficients_triton(gram, count, damping, block_size=block)
    # the float64 factor of the same (rounded) gram: no TF32 or float32 cuSOLVER question
    want = mfac_coefficients_reference(gram.double(), count, damping)
    assert torch.equal(got, got.tril())
    # the factor's forward error: n = count-long inner products plus forming K in gram's
    # dtype, times cond(K)
    tol = tolerance(dtype, n=count + 2, cond=_k_cond(gram, count, damping))
    assert _relative(got, want) <= tol
    assert torch.equal(
        mfac_coefficients(gram, count, damping), mfac_coefficients_triton(gram, count, damping)
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("window_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "nb, m, count, cols", [(1, 1024, 1024, 100_000), (1, 1024, 300, 100_003), (40, 64, 64, 5000)]
)
def test_triton_ihvp_on_gpu(window_dtype, nb, m, count, cols, monkeypatch):
    monkeypatch.delenv("SECONDORDER_REFERENCE_KERNELS", raising=False)
    damping = 1e-3
    window = _cuda_window(nb, m, cols, window_dtype)
    xdtype = torch.float64 if window_dtype == torch.float64 else torch.float32
    x = torch.randn(nb, cols, device="cuda", dtype=xdtype)
    # float64 references on the GPU (no TF32 there: torch.backends.cuda.matmul.allow_tf32
    # would make a float32 reference less accurate than the kernel); the kernels sum in
    # float32 (products of a bf16 window and float32 x round once more) or float64
    n = _kernel_sum_length(cols, count) + 1
    wd = window.double()
    for row in (0, count - 1, m - 1):
        got_row = mfac_gram_row(window, row, count)
        want_row = (wd[:, :count] @ wd[:, row, :, None])[..., 0]
        # an entry's error is proportional to Σ|w_i||w_row| <= ‖w_i‖‖w_row‖
        scale = (wd[:, :count].norm(dim=-1).max() * wd[:, row].norm(dim=-1).max()).item()
        err = (got_row.double() - want_row).abs().max().item()
        assert err <= tolerance(xdtype, n=n) * scale, row
    valid = wd[:, :count]
    gram = valid @ valid.transpose(1, 2)
    chol = mfac_coefficients(gram, count, damping)
    got = mfac_ihvp(window, chol, x, damping, count)
    want = mfac_ihvp_reference(wd, chol, x.double(), damping, count)
    assert got.dtype == xdtype
    tol = tolerance(xdtype, n=n, cond=_k_cond(gram, count, damping))
    assert _woodbury_error(got, want, x, damping) <= tol
