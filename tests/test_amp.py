"""Mixed precision: autocast forward passes, GradScaler loops, half-precision factors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secondorder as so

from .helpers import assert_close, tolerance
from .robustness._common import assert_close_runs

OPTIMIZERS = {
    "kfac": lambda m, **kw: so.KFAC(
        m, lr=0.05, damping=1e-2, curvature_every=1, inverse_every=2, **kw
    ),
    "ekfac": lambda m, **kw: so.EKFAC(
        m, lr=0.05, damping=1e-2, curvature_every=1, inverse_every=2, **kw
    ),
    "adafisher": lambda m, **kw: so.AdaFisher(m, lr=1e-2, curvature_every=1, **kw),
    "mfac": lambda m, **kw: so.MFAC(m, lr=0.05, base="sgd", ngrads=4, damping=0.1, **kw),
    "adahessian": lambda m, **kw: so.AdaHessian(m, lr=0.05, **kw),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 5))


#: roundings into a statistic over a run of _data(): 5 batches of 32 examples x the
#: convolution's 16 output positions
RUN_N = 5 * 32 * 16


def _start() -> list[torch.Tensor]:
    return [p.detach().clone() for p in _model().parameters()]


def _data(steps: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(32, 1, 4, 4, generator=g), torch.randint(0, 5, (32,), generator=g))
        for _ in range(steps)
    ]


def _run(
    name: str,
    scaler: torch.amp.GradScaler | None,
    *,
    skip: set[int] = frozenset(),
    overflow_at: int | None = None,
    clip: bool = False,
    pass_scaler: bool = False,
):
    model = _model()
    opt = OPTIMIZERS[name](model, **({"grad_scaler": scaler} if pass_scaler else {}))
    for step, (x, y) in enumerate(_data()):
        if step in skip:
            continue
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        graph = name == "adahessian"  # Hutchinson's Hessian-vector products
        if scaler is None:
            loss.backward(create_graph=graph)
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            continue
        scaler.scale(loss).backward(create_graph=graph)
        if step == overflow_at:
            model[3].weight.grad[0, 0] = float("inf")
        if clip:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
    return model, opt


def _scaler() -> torch.amp.GradScaler:
    # a power of two: scaling and unscaling are exact, so the runs differ at most by the
    # round-off of the scaled code path's other operations (assert_close_runs)
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)


def _assert_same_run(expected: nn.Module, actual: nn.Module, n: int = RUN_N) -> None:
    assert_close_runs(
        actual.parameters(), expected.parameters(), _start(), dtype=torch.float32, n=n
    )


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grad_scaler_gives_the_unscaled_trajectory(name: str) -> None:
    plain, _ = _run(name, None)
    scaled, opt = _run(name, _scaler())
    _assert_same_run(plain, scaled)
    assert opt.skipped_steps == 0
    if name in ("kfac", "ekfac"):  # the statistics were divided by the scale²
        plain_opt = _run(name, None)[1]
        _a0, g0 = plain_opt.estimator.factors("3")
        _a1, g1 = opt.estimator.factors("3")
        # the factors of the two runs, at weights that agree to the run's round-off
        assert_close(g1, g0, dtype=torch.float32, n=RUN_N)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_overflow_step_is_skipped_without_leftovers(name: str) -> None:
    scaler = _scaler()
    model, opt = _run(name, scaler, overflow_at=2)
    assert opt.skipped_steps == 1
    assert scaler.get_scale() == 2.0**9  # the scaler saw the overflow and backed off
    # the same as never taking step 2: no statistics of the overflow pass survive
    reference, _ = _run(name, None, skip={2})
    _assert_same_run(reference, model)


@pytest.mark.parametrize("name", ["kfac", "adahessian"])
def test_unscale_before_step_needs_the_scaler(name: str) -> None:
    with pytest.raises(RuntimeError, match="grad_scaler=scaler"):
        _run(name, _scaler(), clip=True)
    plain, _ = _run(name, None, clip=True)
    scaler = _scaler()
    clipped, _opt = _run(name, scaler, clip=True, pass_scaler=True)
    # clipping adds, per step, the norm over every gradient entry
    n_params = sum(p.numel() for p in plain.parameters())
    _assert_same_run(plain, clipped, n=RUN_N + 5 * n_params)


def test_grad_scaler_type_is_checked() -> None:
    with pytest.raises(TypeError, match=r"grad_scaler must be a torch\.amp\.GradScaler"):
        so.KFAC(_model(), grad_scaler=object())


@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [so.KFAC, so.EKFAC, so.TwoLevelKFAC])
def test_autocast_bf16_with_half_factors(cls, factor_dtype) -> None:
    model = _model()
    opt = cls(
        model, lr=0.05, damping=1e-2, curvature_every=1, inverse_every=2, factor_dtype=factor_dtype
    )
    x, y = _data(1)[0]
    losses = []
    for _ in range(15):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    a, g = opt.estimator.factors("3")
    assert a.dtype == g.dtype == factor_dtype
    inverse = opt.estimator._state["3"].inverse
    assert inverse["q_a"].dtype == torch.float32  # inverses never in half precision
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_half_factors_stay_close_to_float32() -> None:
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _model()
        opt = so.KFAC(model, curvature_every=1, inverse_every=1, factor_dtype=dtype)
        x, y = _data(1)[0]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        results[dtype] = [f.float() for f in opt.estimator.factors("3")]
    # the float32 statistic rounded once to bfloat16: at most eps/2 of each entry (n = 1,
    # safety 1)
    tol = tolerance(torch.bfloat16, n=1, safety=1)
    for half, full in zip(results[torch.bfloat16], results[torch.float32], strict=True):
        assert ((half - full).abs().max() / full.abs().max()) <= tol


def test_inverse_dtype_cannot_be_half() -> None:
    with pytest.raises(ValueError, match=r"inverse_dtype must be torch\.float32"):
        so.KFAC(_model(), inverse_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="factor_dtype must be"):
        so.KFAC(_model(), factor_dtype=torch.int8)
