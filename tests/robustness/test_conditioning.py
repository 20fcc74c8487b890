"""Ill-conditioned and rank-deficient curvature, damping near zero, batch size 1.

Every optimizer keeps finite parameters and a finite state on inputs that are all zeros
(rank-deficient factors: only the bias column is non-zero), identical rows (rank 1), or
columns of 1e30 and 1e-30 (``ã ãᵀ`` overflows float32: those statistics are dropped and
counted) with a damping of 1e-12 (AdaHessian: ``eps=1e-12``). M-FAC with a damping too small
for its arithmetic retries the factorisation in float64 and then raises a
``FloatingPointError`` that names a damping that works (and that damping does work).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from secondorder.estimators.mfac import MFACEstimator

from ._common import (
    ALL,
    CLASSES,
    HOOKED,
    IN_SHAPE,
    all_finite,
    batches,
    make_optimizer,
    tensors_in,
    tiny_model,
    train,
    updates_of,
)

TINY = 1e-12


def _inputs(kind: str, steps: int = 6, batch: int = 8) -> list:
    gen = torch.Generator().manual_seed(5)
    data = []
    for _ in range(steps):
        y = torch.randint(0, CLASSES, (batch,), generator=gen)
        if kind == "zeros":
            x = torch.zeros(batch, *IN_SHAPE)
        elif kind == "identical-rows":
            x = torch.randn(1, *IN_SHAPE, generator=gen).expand(batch, *IN_SHAPE).clone()
            y = y[:1].expand(batch).clone()
        else:  # "dynamic-range"
            x = torch.randn(batch, *IN_SHAPE, generator=gen)
            x[..., 0] *= 1e30
            x[..., 1] *= 1e-30
        data.append((x, y))
    return data


def _tiny_damping(name: str) -> dict:
    if name == "soap":  # no damping: Adam's ε in the rotated space
        return {"soap_eps": TINY}
    return {"eps": TINY} if name == "adahessian" else {"damping": TINY}


def _state_is_finite(opt) -> bool:
    return all(
        bool(torch.isfinite(t).all()) for t in tensors_in(opt.state_dict()) if t.is_floating_point()
    )


@pytest.mark.parametrize("kind", ["zeros", "identical-rows", "dynamic-range"])
@pytest.mark.parametrize("name", ALL)
def test_degenerate_inputs_with_tiny_damping_keep_everything_finite(name, kind):
    model = tiny_model()
    opt = make_optimizer(name, model, **_tiny_damping(name))
    train(model, opt, _inputs(kind))
    assert opt.skipped_steps == 0  # the gradients themselves stayed finite
    assert opt.steps == 6
    assert all_finite(model)
    assert _state_is_finite(opt)
    if name in HOOKED:
        # statistics were recorded and absorbed, except the overflowing ones
        assert updates_of(opt) > 0
        overflow = opt.estimator.nonfinite_updates
        assert overflow > 0 if kind == "dynamic-range" else overflow == 0


@pytest.mark.parametrize("name", ALL)
def test_batch_size_one(name):
    model = tiny_model()
    opt = make_optimizer(name, model)
    gen = torch.Generator().manual_seed(2)
    data = [
        (torch.randn(1, *IN_SHAPE, generator=gen), torch.randint(0, CLASSES, (1,), generator=gen))
        for _ in range(6)
    ]
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, data)
    assert opt.steps == 6 and opt.skipped_steps == 0
    assert all_finite(model) and _state_is_finite(opt)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    if name in HOOKED:
        assert updates_of(opt) == (3 if name.startswith("adafisher") else 6)  # every 2 / 1
        assert opt.estimator.nonfinite_updates == 0


# ---- M-FAC: the documented fallbacks -------------------------------------------------------
@pytest.fixture
def float64_retries(monkeypatch):
    """The dampings of M-FAC's float64 refactorisations (``_factor_in_float64``) so far."""
    calls: list[float] = []
    original = MFACEstimator._factor_in_float64

    def spy(self, damping):
        calls.append(damping)
        return original(self, damping)

    monkeypatch.setattr(MFACEstimator, "_factor_in_float64", spy)
    return calls


def _same_batch(steps: int = 4) -> list:
    """One batch repeated (with ``lr=0`` every gradient in the window is the same: ``GGᵀ`` is
    rank one, the worst case for ``mI + GGᵀ/λ``)."""
    gen = torch.Generator().manual_seed(3)
    batch = (
        torch.randn(8, *IN_SHAPE, generator=gen),
        torch.randint(0, CLASSES, (8,), generator=gen),
    )
    return [batch] * steps


def _direction_is_finite(opt, model, damping: float) -> bool:
    grads = {p: p.grad for p in model.parameters()}
    return all(
        bool(torch.isfinite(u).all()) for u in opt.estimator.precondition(grads, damping).values()
    )


def test_mfac_float32_dot_products_with_tiny_damping_are_refactored_in_float64(float64_retries):
    model = tiny_model()
    opt = make_optimizer("mfac", model, damping=TINY, gram_dtype=torch.float32, lr=0.0)
    train(model, opt, _same_batch())
    assert float64_retries, "the float32 factorisation was expected to fail and be retried"
    assert _direction_is_finite(opt, model, TINY)


def _named_damping(message: str) -> float:
    found = re.search(r"use damping >= ([0-9.e+-]+)", message)
    assert found, f"the error names no damping: {message}"
    return float(found.group(1))


@pytest.mark.parametrize("gram_dtype", [torch.float32, torch.float64])
def test_mfac_damping_too_small_even_for_float64_names_one_that_works(gram_dtype, float64_retries):
    model = tiny_model()
    opt = make_optimizer("mfac", model, damping=1e-18, gram_dtype=gram_dtype, lr=0.0)
    with pytest.raises(FloatingPointError, match="not positive definite even in float64") as info:
        train(model, opt, _same_batch())
    assert float64_retries  # the float64 retry came first
    damping = _named_damping(str(info.value))
    # the product is float32 (float32 window): the cancellation floor 1e4·eps·|g|²/k
    assert 1e-18 < damping < 1e5 * torch.finfo(torch.float32).eps

    model = tiny_model()
    opt = make_optimizer("mfac", model, damping=damping, gram_dtype=gram_dtype, lr=0.0)
    train(model, opt, _same_batch())
    assert _direction_is_finite(opt, model, damping)


@pytest.mark.parametrize(
    "dtype, window_dtype, damping",
    [
        (torch.float32, torch.float32, 1e-30),
        (torch.float32, torch.float64, 1e-100),  # the direction is cast to float32
        (torch.float64, torch.float64, 1e-200),
    ],
)
def test_mfac_damping_whose_inverse_square_overflows_names_one_that_works(
    dtype, window_dtype, damping
):
    """``1/λ²`` beyond the arithmetic's range: a ``FloatingPointError`` naming a damping,
    rather than an overflow error from torch, a ZeroDivisionError or Inf/NaN parameters."""
    data = [(x.to(dtype), y) for x, y in batches(4)]
    model = tiny_model().to(dtype)
    opt = make_optimizer("mfac", model, damping=damping, window_dtype=window_dtype)
    with pytest.raises(FloatingPointError, match=r"too small for float(32|64) arithmetic") as info:
        train(model, opt, data)
    assert all_finite(model)
    workable = _named_damping(str(info.value))
    # at least the overflow floor 10/sqrt(finfo.max) of the product's dtype, and no more
    # than the cancellation floor 1e4·eps·|g|²/k asks for (|g|² is about 1.5 here)
    product_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert 10.0 * torch.finfo(product_dtype).max ** -0.5 < workable
    assert damping < workable < 1e5 * torch.finfo(product_dtype).eps
    model = tiny_model().to(dtype)
    opt = make_optimizer("mfac", model, damping=workable, window_dtype=window_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train(model, opt, data)
    assert opt.skipped_steps == 0 and all_finite(model)
