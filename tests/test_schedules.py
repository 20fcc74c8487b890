"""DampingWarmup: values, validation, pickling, and use as K-FAC's damping."""

from __future__ import annotations

import copy
import itertools
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder import KFAC, DampingWarmup


def test_exponential_warmup_interpolates_geometrically_then_holds_the_target():
    warmup = DampingWarmup(1.0, 1e-4, steps=100)
    assert warmup(0) == 1.0
    assert warmup(50) == pytest.approx(1e-2, rel=1e-12)  # the geometric mean
    assert warmup(25) == pytest.approx(1e-1, rel=1e-12)
    assert warmup(100) == 1e-4
    assert warmup(101) == warmup(10**6) == 1e-4
    values = [warmup(k) for k in range(101)]
    ratios = [b / a for a, b in itertools.pairwise(values)]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)  # a constant factor per step
    assert ratios[0] == pytest.approx(1e-4 ** (1 / 100), rel=1e-12)


def test_linear_warmup_interpolates_linearly_then_holds_the_target():
    warmup = DampingWarmup(1.0, 0.1, steps=10, kind="linear")
    assert warmup(0) == 1.0
    assert warmup(5) == pytest.approx(0.55, rel=1e-12)
    assert warmup(9) == pytest.approx(0.19, rel=1e-12)
    assert warmup(10) == warmup(11) == 0.1


def test_odd_step_counts_and_increasing_ramps():
    warmup = DampingWarmup(0.5, 8.0, steps=3)  # going up works too
    assert [warmup(k) for k in range(5)] == pytest.approx([0.5, 1.25992105, 3.17480210, 8.0, 8.0])


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((0.0, 1e-3, 10), "initial"),
        ((-1.0, 1e-3, 10), "initial"),
        ((math.inf, 1e-3, 10), "initial"),
        ((1.0, 0.0, 10), "target"),
        ((1.0, math.nan, 10), "target"),
        ((1.0, "0.1", 10), "target"),
        ((1.0, 1e-3, 0), "steps"),
        ((1.0, 1e-3, 2.5), "steps"),
        ((1.0, 1e-3, True), "steps"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(args, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        DampingWarmup(*args)


def test_bad_kind_and_negative_step():
    with pytest.raises(ValueError, match=r"kind must be one of \('exponential', 'linear'\)"):
        DampingWarmup(1.0, 1e-3, 10, kind="cosine")
    with pytest.raises(ValueError, match="step must be >= 0"):
        DampingWarmup(1.0, 1e-3, 10)(-1)


def test_pickles_copies_and_reads_back_from_its_repr():
    warmup = DampingWarmup(1.0, 1e-3, steps=20, kind="linear")
    for clone in (pickle.loads(pickle.dumps(warmup)), copy.deepcopy(warmup), eval(repr(warmup))):
        assert clone == warmup
        assert [clone(k) for k in range(25)] == [warmup(k) for k in range(25)]
    assert repr(warmup) == "DampingWarmup(initial=1.0, target=0.001, steps=20, kind='linear')"
    assert warmup != DampingWarmup(1.0, 1e-3, steps=20)


def _kfac_trajectory(damping):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = KFAC(model, lr=0.1, damping=damping, curvature_every=1, inverse_every=2)
    data = torch.Generator().manual_seed(1)
    seen = []
    for _ in range(8):
        x = torch.randn(16, 6, generator=data)
        y = torch.randint(0, 3, (16,), generator=data)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        seen.append(opt.current_damping())
        opt.step()
    return [p.detach().clone() for p in model.parameters()], seen


@pytest.mark.parametrize("kind", ["exponential", "linear"])
def test_as_kfac_damping_it_gives_the_trajectory_of_the_equivalent_lambda(kind):
    initial, target, steps = 1.0, 1e-3, 5
    if kind == "exponential":

        def same(k):
            return initial * (target / initial) ** (k / steps) if k < steps else target
    else:

        def same(k):
            return initial + (target - initial) * (k / steps) if k < steps else target

    params, dampings = _kfac_trajectory(DampingWarmup(initial, target, steps, kind=kind))
    ref_params, ref_dampings = _kfac_trajectory(same)
    assert dampings == ref_dampings
    assert dampings[0] == initial and dampings[-1] == target
    for p, q in zip(params, ref_params, strict=True):
        assert torch.equal(p, q)
    # ... and the schedule matters: a constant damping takes another path
    const_params, _ = _kfac_trajectory(target)
    assert not all(torch.equal(p, q) for p, q in zip(params, const_params, strict=True))
