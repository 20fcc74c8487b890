"""M-FAC's window size against its memory budget: the m chosen when ngrads is not given, the
message that says so, the error for an explicit ngrads over the budget, and resuming."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder import MFAC, MFACConfig
from secondorder.estimators import mfac as mfac_module
from secondorder.estimators.mfac import largest_window, window_bytes

from ..helpers import mlp

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


def _by_hand(m: int, d: int, window_itemsize: int = 4, blocks: int = 1) -> int:
    """Bytes of m gradients of d coordinates (in ``blocks`` blocks of d / blocks) plus the
    float64 m x m dot-product matrix of each block."""
    return m * d * window_itemsize + blocks * m * m * 8


def _param(d: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(d))


# ---- the arithmetic ---------------------------------------------------------------------
def test_window_bytes_counts_the_window_and_the_dot_products():
    assert window_bytes(512, 1, 1000, F32, F64) == _by_hand(512, 1000)
    assert window_bytes(512, 1, 1000, BF16, F64) == _by_hand(512, 1000, 2)
    assert window_bytes(512, 1, 1000, F64, F32) == 512 * 1000 * 8 + 512 * 512 * 4
    assert window_bytes(7, 4, 250, F32, F64) == _by_hand(7, 1000, blocks=4)


def test_resnet18_gets_22_gradients_in_one_gibibyte():
    """ResNet-18 (d = 11,689,512): m = 512 would take 22.3 GiB; 1 GiB holds 22 float32
    gradients (22 · 46,758,048 + 22² · 8 = 1,028,680,928 <= 2³⁰ < the bytes of 23), and
    twice as many in bfloat16."""
    d = 11_689_512
    assert _by_hand(512, d) > 22 * 2**30
    assert largest_window(2**30, 1, d, F32, F64) == 22
    assert _by_hand(22, d) <= 2**30 < _by_hand(23, d)
    assert largest_window(2**30, 1, d, BF16, F64) == 45
    assert _by_hand(45, d, 2) <= 2**30 < _by_hand(46, d, 2)


@pytest.mark.parametrize("d", [1, 37, 1000, 123_457])
@pytest.mark.parametrize("budget", [1, 500, 10_000, 2**20, 2**26])
def test_largest_window_is_the_largest_that_fits(d, budget):
    m = largest_window(budget, 1, d, F32, F64)
    assert 0 <= m <= 512
    assert m == 0 or _by_hand(m, d) <= budget
    assert m == 512 or _by_hand(m + 1, d) > budget


# ---- the optimizer's choice ----------------------------------------------------------------
def test_default_keeps_512_when_the_budget_allows_it_and_says_nothing_loud():
    d = 1020
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = MFAC(mlp([50, 20]))
    est = opt.estimator
    assert est.config.ngrads == 512
    assert est.window.shape == (1, 512, d)
    assert est.window_bytes == _by_hand(512, d) == est.window.nbytes + est.gram.nbytes


def test_a_smaller_budget_chooses_fewer_gradients_and_warns_once_with_m_d_and_bytes():
    d = 1020
    budget = _by_hand(37, d) + _by_hand(1, d) - 1  # just short of 38
    with pytest.warns(UserWarning) as record:
        opt = MFAC(mlp([50, 20]), window_memory=budget)
    assert len(record) == 1
    message = str(record[0].message)
    assert "m=37" in message and "37 x 1,020 float32" in message
    assert "window_memory=" in message and "m=512 would need" in message
    est = opt.estimator
    assert est.config.ngrads == 37
    assert est.window.shape == (1, 37, d) and est.gram.shape == (1, 37, 37)
    assert est.window.nbytes + est.gram.nbytes == _by_hand(37, d) <= budget


def test_bfloat16_window_and_blocks_are_counted():
    d = 1020
    budget = _by_hand(100, d)  # float32: 100 gradients
    with pytest.warns(UserWarning, match="m=100"):
        assert MFAC([_param(d)], window_memory=budget).estimator.config.ngrads == 100
    with pytest.warns(UserWarning):
        est = MFAC([_param(d)], window_memory=budget, window_dtype=BF16).estimator
    m = est.config.ngrads
    assert _by_hand(m, d, 2) <= budget < _by_hand(m + 1, d, 2) and m > 100
    with pytest.warns(UserWarning, match="in 4 blocks"):
        est = MFAC([_param(d)], window_memory=budget, block_size=255).estimator
    assert est.window_bytes == est.window.nbytes + est.gram.nbytes <= budget
    assert est.config.ngrads == largest_window(budget, 4, 255, F32, F64)


def test_no_limit_and_a_fraction_of_the_available_memory(monkeypatch):
    d = 1020
    assert MFAC([_param(d)], window_memory=None).estimator.config.ngrads == 512
    monkeypatch.setattr(mfac_module, "available_memory", lambda device: 4 * _by_hand(10, d))
    with pytest.warns(UserWarning, match=r"window_memory=0\.25"):
        assert MFAC([_param(d)], window_memory=0.25).estimator.config.ngrads == 10
    monkeypatch.setattr(mfac_module, "available_memory", lambda device: None)
    with pytest.raises(ValueError, match="give window_memory in bytes"):
        MFAC([_param(d)], window_memory=0.25)


def test_available_memory_reads_the_machine():
    free = mfac_module.available_memory(torch.device("cpu"))
    assert free is None or free > 0


# ---- an explicit ngrads ------------------------------------------------------------------------
def test_explicit_ngrads_within_the_budget_is_honoured():
    d = 1020
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = MFAC([_param(d)], ngrads=64, window_memory=_by_hand(64, d)).estimator
    assert est.config.ngrads == 64 and est.window.shape == (1, 64, d)


def test_explicit_ngrads_over_the_budget_names_the_bytes_and_the_ways_out():
    d = 1020
    budget = _by_hand(63, d)
    with pytest.raises(ValueError) as info:
        MFAC([_param(d)], ngrads=64, window_memory=budget)
    message = str(info.value)
    assert message.startswith("M-FAC: ngrads=64 needs")
    assert f"window_memory={_by_hand(64, d)} " in message  # the bytes needed
    assert "over the budget window_memory=" in message
    assert "ngrads=63 or fewer" in message
    assert "window_dtype=torch.bfloat16" in message
    # the way out it names works
    assert MFAC([_param(d)], ngrads=64, window_memory=_by_hand(64, d)).estimator.config.ngrads == 64


def test_the_default_budget_applies_to_an_explicit_ngrads():
    """A 600,000-coordinate float32 window of 512 gradients is 1.15 GiB: over 1 GiB."""
    with pytest.raises(ValueError, match=re.escape("over the budget window_memory=1 GiB")):
        MFAC([_param(600_000)], ngrads=512)


def test_a_budget_that_holds_no_gradient_raises():
    with pytest.raises(ValueError, match="holds no gradient"):
        MFAC([_param(1020)], window_memory=1000)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window_memory=0), "window_memory must be"),
        (dict(window_memory=-1.0), "window_memory must be"),
        (dict(window_memory=float("inf")), "window_memory must be"),
        (dict(window_memory=True), "window_memory must be"),
        (dict(window_memory="1GB"), "window_memory must be"),
        (dict(ngrads=0), "ngrads must be a positive int or None"),
    ],
)
def test_bad_budgets_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MFACConfig(**kwargs)


# ---- resuming ------------------------------------------------------------------------------------
def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_a_budget_chosen_window_resumes_the_same_trajectory():
    """m = 5 chosen by the budget; the ring wraps before the checkpoint. The resumed run
    equals the uninterrupted one bit for bit (the same code path)."""
    torch.manual_seed(0)
    model = mlp([6, 8, 3])
    d = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(10, 6, generator=gen), torch.randint(0, 3, (10,), generator=gen))]
    batches *= 12
    kwargs = dict(lr=0.05, base="sgd", momentum=0.9, damping=1e-2, window_memory=_by_hand(5, d))

    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="m=5"):
        ref_opt = MFAC(reference, **kwargs)
    _train(reference, ref_opt, batches)

    with pytest.warns(UserWarning, match="m=5"):
        opt = MFAC(model, **kwargs)
    _train(model, opt, batches[:7])
    saved = copy.deepcopy(opt.state_dict())
    resumed_model = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="m=5"):
        resumed = MFAC(resumed_model, **kwargs)
    resumed.load_state_dict(saved)
    _train(resumed_model, resumed, batches[7:])
    for a, b in zip(reference.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)

    # another budget chooses another m: the error says which ngrads resumes the checkpoint
    with pytest.raises(ValueError, match=r"pass ngrads=5 to resume it"):
        MFAC(copy.deepcopy(model), lr=0.05, base="sgd", momentum=0.9, damping=1e-2).load_state_dict(
            saved
        )
    explicit = MFAC(copy.deepcopy(model), lr=0.05, base="sgd", momentum=0.9, damping=1e-2, ngrads=5)
    explicit.load_state_dict(saved)
    assert explicit.estimator.count == 5
