"""Curvature on/off schedules: ``CurvatureOptimizer(use_curvature=...)``.

Off steps must be exactly the base optimizer (torch.optim.SGD / Adam), nothing recorded; the
first step of an on-range records the first statistics if there are none (whatever
``curvature_every`` says) and refreshes the inverses before they are used.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from secondorder import EKFAC, KFAC, MFAC, AdaFisher

from ..helpers import assert_close, mlp


def _batches(n_steps: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
        for _ in range(n_steps)
    ]


def _step(model, opt, batch) -> None:
    x, y = batch
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    model = mlp([6, 10, 3])
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("k", [1, 4])
def test_off_steps_equal_sgd_exactly_then_kfac_preconditions(k: int) -> None:
    model, reference = _pair()
    opt = KFAC(
        model,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-3,
        curvature_every=1,
        inverse_every=1,
        use_curvature=[(k, None)],
        graft=None,
    )
    sgd = torch.optim.SGD(
        reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=False
    )
    batches = _batches(k + 1)
    for batch in batches[:k]:
        _step(model, opt, batch)
        _step(reference, sgd, batch)
        assert opt.estimator.factors("0") is None  # nothing recorded while off
        assert not opt.capture.recording or opt.curvature_on()
    for pa, pb in zip(_params(model), _params(reference), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    _step(model, opt, batches[k])
    _step(reference, sgd, batches[k])
    assert opt.estimator.factors("0") is not None
    assert any(
        not torch.equal(pa, pb) for pa, pb in zip(_params(model), _params(reference), strict=True)
    )


def test_the_first_on_step_is_the_first_step_of_a_fresh_kfac() -> None:
    """Without momentum, step k of a run switched on at k equals the first step of a new
    KFAC started at step k's weights: statistics of that batch, refresh, precondition."""
    model, _ = _pair()
    kwargs = dict(lr=0.1, momentum=0.0, curvature_every=10, inverse_every=100, kl_clip=None)
    opt = KFAC(model, use_curvature=[(3, None)], **kwargs, graft=None)
    batches = _batches(4)
    for batch in batches[:3]:
        _step(model, opt, batch)
    fresh_model = copy.deepcopy(model)
    fresh = KFAC(fresh_model, **kwargs, graft=None)
    _step(model, opt, batches[3])  # step 3: not a multiple of curvature_every=10
    _step(fresh_model, fresh, batches[3])
    for pa, pb in zip(_params(model), _params(fresh_model), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert opt.state_dict()["curvature"]["refreshes"] == 1


def test_resuming_refreshes_from_the_factors_before_using_them() -> None:
    model, _ = _pair()
    opt = KFAC(
        model,
        lr=0.05,
        curvature_every=1,
        inverse_every=100,
        inverse_warmup=False,  # the fixed schedule: refreshes only where this test says
        use_curvature=[(0, 2), (4, None)],
        graft=None,
    )
    batches = _batches(6)
    for batch in batches[:2]:
        _step(model, opt, batch)
    assert opt.state_dict()["curvature"]["refreshes"] == 1  # step 0 only (inverse_every=100)
    factors = [t.clone() for t in opt.estimator.factors("0")]
    for batch in batches[2:4]:  # off
        _step(model, opt, batch)
        assert all(
            torch.equal(a, b) for a, b in zip(opt.estimator.factors("0"), factors, strict=True)
        )
    assert opt.state_dict()["curvature"]["updates"] == 2
    _step(model, opt, batches[4])  # on again: update (curvature_every=1) and refresh
    curvature = opt.state_dict()["curvature"]
    assert curvature["updates"] == 3 and curvature["refreshes"] == 2
    _step(model, opt, batches[5])
    assert opt.state_dict()["curvature"]["refreshes"] == 2  # then the schedule as usual


def test_adam_base_and_mfac_off_are_adam_and_sgd() -> None:
    model, reference = _pair()
    opt = KFAC(model, lr=1e-2, base="adam", use_curvature=lambda step: step >= 5, graft=None)
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2, foreach=False)
    for batch in _batches(5):
        _step(model, opt, batch)
        _step(reference, adam, batch)
    for pa, pb in zip(_params(model), _params(reference), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)

    # M-FAC adds L2 decay before preconditioning: while off it is SGD's own decay
    model, reference = _pair(1)
    opt = MFAC(
        model,
        lr=0.1,
        base="sgd",
        graft=None,
        momentum=0.9,
        weight_decay=1e-2,
        ngrads=4,
        damping=0.1,
        use_curvature=[(3, None)],
    )
    sgd = torch.optim.SGD(
        reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=False
    )
    batches = _batches(4)
    for batch in batches[:3]:
        _step(model, opt, batch)
        _step(reference, sgd, batch)
    for pa, pb in zip(_params(model), _params(reference), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert opt.state_dict()["curvature"]["updates"] == 0  # the window saw nothing
    _step(model, opt, batches[3])
    assert opt.state_dict()["curvature"]["updates"] == 1


def test_adafisher_off_from_the_start_is_its_precondition_false_update() -> None:
    model, reference = _pair()
    opt = AdaFisher(model, lr=0.05, curvature_every=1, use_curvature=[(3, None)])
    plain = AdaFisher(reference, lr=0.05, precondition=False)
    batches = _batches(4)
    for batch in batches[:3]:
        _step(model, opt, batch)
        _step(reference, plain, batch)
    for pa, pb in zip(_params(model), _params(reference), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    _step(model, opt, batches[3])
    assert opt.estimator.last_raw_diagonals("0") is not None


def test_ekfac_and_a_callable_schedule() -> None:
    model, reference = _pair()
    opt = EKFAC(
        model,
        lr=0.1,
        momentum=0.9,
        curvature_every=1,
        use_curvature=lambda s: s % 4 >= 2,
        graft=None,
    )
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, foreach=False)
    batches = _batches(3)
    for batch in batches[:2]:
        _step(model, opt, batch)
        _step(reference, sgd, batch)
    for pa, pb in zip(_params(model), _params(reference), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert [opt.curvature_on(s) for s in range(6)] == [False, False, True, True, False, False]
    _step(model, opt, batches[2])
    assert opt.estimator.factors("0") is not None


def test_checkpoint_resume_follows_the_schedule() -> None:
    model, other = _pair()
    kwargs = dict(lr=0.05, curvature_every=2, inverse_every=3, use_curvature=[(1, 3), (5, None)])
    opt = KFAC(model, **kwargs, graft=None)
    batches = _batches(8)
    for batch in batches:
        _step(model, opt, batch)
    opt_b = KFAC(other, **kwargs, graft=None)
    for batch in batches[:4]:
        _step(other, opt_b, batch)
    state = copy.deepcopy(opt_b.state_dict())
    opt_c = KFAC(other, **kwargs, graft=None)
    opt_c.load_state_dict(state)
    for batch in batches[4:]:
        _step(other, opt_c, batch)
    for pa, pb in zip(_params(model), _params(other), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("0:5", TypeError, "use_curvature must be"),
        (5, TypeError, "use_curvature must be"),
        ([(0, 5, 6)], TypeError, r"\(start, stop\) pair"),
        ([(0.5, 3)], TypeError, "start must be an int"),
        ([(True, 3)], TypeError, "start must be an int"),
        ([(-1, 3)], ValueError, "start must be >= 0"),
        ([(3, 3)], ValueError, "stop must be > start"),
        ([], ValueError, "empty list"),
    ],
)
def test_bad_schedules_are_rejected(value, error, match) -> None:
    model, _ = _pair()
    with pytest.raises(error, match=match):
        KFAC(model, use_curvature=value, graft=None)
    opt = KFAC(model, graft=None)
    with pytest.raises(error, match=match):
        opt.use_curvature = value
    assert opt.use_curvature is None  # unchanged


def test_schedule_needs_curvature_and_a_bool() -> None:
    model, _ = _pair()
    with pytest.raises(ValueError, match="needs curvature"):
        KFAC(model, precondition=False, use_curvature=[(0, 1)], graft=None)
    opt = KFAC(model, use_curvature=[[0, 2], (4, None)], graft=None)
    assert opt.use_curvature == ((0, 2), (4, None))
    assert [opt.curvature_on(s) for s in range(6)] == [True, True, False, False, True, True]
    with pytest.raises(TypeError, match=r"use_curvature\(0\) must return a bool"):
        opt.use_curvature = lambda step: 1
    assert opt.use_curvature == ((0, 2), (4, None))  # unchanged
    with pytest.raises(TypeError, match=r"use_curvature\(0\) must return a bool"):
        KFAC(model, use_curvature=lambda step: None, graft=None)


def test_adafisher_off_after_statistics_takes_the_one_plus_damping_update() -> None:
    """Once its diagonals are learnt, an off step of AdaFisher is still its base update:
    bias-corrected momentum over F̃ = 1 + λ, not the learnt diagonals."""
    model, _ = _pair()
    lr, damping, beta = 0.05, 1e-3, 0.9
    opt = AdaFisher(model, lr=lr, damping=damping, beta=beta, curvature_every=1, graft=None,
                    use_curvature=[(0, 2)])  # fmt: skip
    batches = _batches(3)
    for batch in batches[:2]:
        _step(model, opt, batch)
    assert opt.estimator.last_raw_diagonals("0") is not None
    before = _params(model)
    _step(model, opt, batches[2])
    for p, old in zip(model.parameters(), before, strict=True):
        state = opt.state[p]
        m_hat = state["exp_avg"] / (1 - beta ** state["step"].item())
        # the formula in float32 here and in the optimizer's update: m / bias correction,
        # F̃ = 1·1 + λ (2), / F̃, lr·, w − : n = 6 roundings
        assert_close(p.detach(), old - lr * m_hat / (1 + damping), dtype=torch.float32, n=6)
