"""AdaHessian against the exact Hessian (torch.autograd.functional.hessian, float64) and
the update formula written out by hand, and as an optimizer."""

from __future__ import annotations

import copy
import inspect
import math
import time
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from secondorder import AdaHessian, AdaHessianConfig, CurvatureOptimizer
from secondorder.config import config_fields
from secondorder.estimators.adahessian import AdaHessianEstimator, hutchinson_diagonal

from ..helpers import assert_close, digits_data, mlp, tolerance


# ---- a small conv + linear model and its exact Hessian -----------------------------------
def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).double()


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(5, 1, 3, 3, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (5,), generator=gen),
        )
        for _ in range(n)
    ]


def _loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _flat_loss(model: nn.Module, batch):
    """The loss as a function of the flattened parameters (for autograd.functional)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [s.numel() for s in shapes]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(flat, sizes)
        params = {n: t.view(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        return F.cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

    return loss


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _exact_hessian(model: nn.Module, batch) -> torch.Tensor:
    flat = _flat(p.detach() for p in model.parameters())
    return torch.autograd.functional.hessian(_flat_loss(model, batch), flat, vectorize=True)


def _rademacher(shape, gen: torch.Generator) -> torch.Tensor:
    """The probe draw AdaHessian documents: randint(0, 2) * 2 - 1, parameter by parameter."""
    return torch.randint(0, 2, shape, generator=gen, dtype=torch.float64) * 2 - 1


def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [
        t.view_as(p)
        for t, p in zip(torch.split(flat, [p.numel() for p in like]), like, strict=True)
    ]


# ---- Hutchinson ------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors and thousands of Hessian-vector products: intra-op threads only add
    overhead here (and spin badly on a busy machine: 10x slower with 2 threads on 2 cores
    under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_many_probes_converge_to_the_exact_hessian_diagonal():
    """2000 probes: every coordinate within 4 standard errors of diag H, where the variance
    of one probe's coordinate j is Σ_{k≠j} H_jk² (Rademacher: v_j² = 1, v_j v_k ±1)."""
    model, (batch,) = _model(), _batches(1)
    params = list(model.parameters())
    hess = _exact_hessian(model, batch)
    diag = hess.diagonal()
    n = 2000
    grads = torch.autograd.grad(_loss(model, batch), params, create_graph=True)
    est = _flat(hutchinson_diagonal(params, grads, n, torch.Generator().manual_seed(0)))
    se = ((hess**2).sum(1) - diag**2).sqrt() / n**0.5
    # plus round-off: Hessian-vector products of P entries bounded by |H| 1, averaged
    noise = tolerance(torch.float64, n=hess.shape[0] + n) * hess.abs().sum(1)
    assert ((est - diag).abs() <= 4 * se + noise).all(), ((est - diag).abs() / se).max()
    # the bound is tight enough to tell diag H from what a wrong product would give
    assert ((hess.sum(1) - diag).abs() > 4 * se).any()  # H·1 (all probes +1)
    assert (4 * se).max() < 0.2 * diag.abs().max()


def test_one_probe_is_unbiased_with_the_rademacher_variance():
    """The mean of 2000 single-probe estimates is within 4 standard errors of diag H, and
    their sample variance matches Σ_{k≠j} H_jk² (within 15%: the sample variance of 2000
    draws varies by ~3%)."""
    model, (batch,) = _model(), _batches(1)
    params = list(model.parameters())
    hess = _exact_hessian(model, batch)
    diag = hess.diagonal()
    grads = torch.autograd.grad(_loss(model, batch), params, create_graph=True)
    gen = torch.Generator().manual_seed(0)
    n = 2000
    draws = torch.stack(
        [_flat(hutchinson_diagonal(params, grads, 1, gen, retain_graph=True)) for _ in range(n)]
    )
    variance = (hess**2).sum(1) - diag**2
    se = (variance / n).sqrt()
    # plus round-off: Hessian-vector products of P entries bounded by |H| 1, averaged
    noise = tolerance(torch.float64, n=hess.shape[0] + n) * hess.abs().sum(1)
    assert ((draws.mean(0) - diag).abs() <= 4 * se + noise).all()
    # rtol: statistical (above); atol: a coordinate of zero variance scatters by round-off
    atol = float(noise.max()) ** 2
    torch.testing.assert_close(draws.var(0), variance, rtol=0.15, atol=atol)
    # the raw estimate is signed (no |·| yet): single draws scatter on both sides of 0
    assert (draws < 0).any()


def test_hutchinson_probes_follow_the_documented_draw():
    model, (batch,) = _model(), _batches(1)
    params = list(model.parameters())
    hess = _exact_hessian(model, batch)
    grads = torch.autograd.grad(_loss(model, batch), params, create_graph=True)
    got = _flat(hutchinson_diagonal(params, grads, 3, torch.Generator().manual_seed(5)))
    gen = torch.Generator().manual_seed(5)
    expected = torch.zeros_like(got)
    for _ in range(3):
        v = _flat(_rademacher(p.shape, gen) for p in params)
        expected += v * (hess @ v) / 3
    # Hessian-vector products of the P parameters: each entry sums P products, bounded by
    # (|H| |v|)_j = (|H| 1)_j, not by the (cancelling) sum itself
    size = hess.shape[0]
    assert_close(got, expected, n=size, scale=float(hess.abs().sum(1).max()))


def test_hutchinson_without_a_graph_is_a_clear_error():
    model, (batch,) = _model(), _batches(1)
    params = list(model.parameters())
    grads = torch.autograd.grad(_loss(model, batch), params)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        hutchinson_diagonal(params, grads)


# ---- the update, by hand -----------------------------------------------------------------
#: the paper's eps and probe count, which _reference uses by default, passed explicitly so
#: that these tests check the paper's update whatever the library's defaults
#: the paper's update (the library grafts Adam's step norm by default)
PAPER = {"eps": 1e-4, "n_probes": 1, "graft": None, "betas": (0.9, 0.999)}


def _reference(
    model: nn.Module,
    batches,
    groups: list[dict],
    *,
    seed: int,
    n_probes: int = 1,
    hessian_every: int = 1,
    betas=(0.9, 0.999),
    eps: float = 1e-4,
    given: dict[int, list[torch.Tensor]] | None = None,
) -> tuple[list[torch.Tensor], float]:
    """AdaHessian written out: exact H, the documented probes, |·|, the conv weight's
    spatial mean, the two moments, bias correction, power and decoupled weight decay.

    ``groups``: ``{"idx": parameter indices, "lr", "hessian_power", "weight_decay"}``.
    ``given``: step -> a signed diagonal per parameter, instead of Hutchinson.

    Returns the parameters and the condition number of the parameters in the Hessian
    estimate: ``D_j = |z_j (Hz)_j|`` carries an absolute round-off of ``eps·P·(|H| 1)_j``
    (P parameters), which moves the denominator ``D^k + ε`` relatively by
    ``k D^(k-1) (|H| 1)_j / (D^k + ε)`` times ``eps·P`` (to first order, ``D`` floored at
    that round-off), and the parameter by that times ``lr·|step_j|``, judged against the
    largest parameter entry.
    """
    model = copy.deepcopy(model)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    b1, b2 = betas
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    d_last: list[torch.Tensor] = []
    d_err: list[torch.Tensor] | None = None  # (|H| 1)_j of the estimate in use, by parameter
    size = sum(p.numel() for p in params)
    cond = 1.0
    for t, batch in enumerate(batches, start=1):
        grads = torch.autograd.grad(_loss(model, batch), params)
        if given is not None and t - 1 in given:
            signed, err = given[t - 1], None  # given exactly, to both
        elif (t - 1) % hessian_every == 0:
            hess = _exact_hessian(model, batch)
            total = torch.zeros(hess.shape[0], dtype=torch.float64)
            for _ in range(n_probes):
                z = _flat(_rademacher(p.shape, gen) for p in params)
                total += z * (hess @ z)
            signed, err = _split(total / n_probes, params), _split(hess.abs().sum(1), params)
        else:
            signed = None
        if signed is not None:
            d_last = [
                s.abs().mean(dim=(2, 3), keepdim=True).expand_as(s) if s.dim() == 4 else s.abs()
                for s in signed
            ]
            d_err = err
        with torch.no_grad():
            for group in groups:
                for i in group["idx"]:
                    m[i] = b1 * m[i] + (1 - b1) * grads[i]
                    v[i] = b2 * v[i] + (1 - b2) * d_last[i] ** 2
                    m_hat = m[i] / (1 - b1**t)
                    v_hat = v[i] / (1 - b2**t)
                    power = group["hessian_power"]
                    denom = v_hat.sqrt() ** power + eps
                    w = params[i]
                    w.copy_(w - group["lr"] * (m_hat / denom + group["weight_decay"] * w))
                    if d_err is not None:
                        e = d_err[i]
                        d = torch.maximum(d_last[i], torch.finfo(e.dtype).eps * size * e)
                        sens = power * d ** (power - 1) * e / denom
                        moved = group["lr"] * (m_hat / denom).abs() * sens
                        cond = max(cond, float(moved.max() / w.abs().max()))
    return [p.detach() for p in model.parameters()], cond


def _check_params(model, expected, *, steps, cond):
    """The parameters after ``steps`` updates against the reference's: each step's Hessian
    diagonal sums P products (P parameters), the steps compound, and ``cond`` (from
    :func:`_reference`) is what the updates amplify the Hessian's round-off by."""
    size = sum(p.numel() for p in model.parameters())
    for got, want in zip(model.parameters(), expected, strict=True):
        assert_close(got.detach(), want, n=size * steps, cond=cond)


def _train(model, opt, batches, *, create_graph=None):
    for batch in batches:
        opt.zero_grad()
        cg = opt.needs_hessian if create_graph is None else create_graph
        _loss(model, batch).backward(create_graph=cg)
        opt.step()


@pytest.mark.parametrize(("hessian_power", "n_probes"), [(1.0, 1), (0.5, 1), (0.5, 3)])
def test_three_steps_equal_the_formula(hessian_power, n_probes):
    """Two param groups: the conv layer (spatially averaged weight) with the chosen power
    and weight decay 0.1, the linear layer with power 1, another lr and weight decay 0.02."""
    model, batches = _model(), _batches(3)
    groups = [
        {"idx": [0, 1], "lr": 0.05, "hessian_power": hessian_power, "weight_decay": 0.1},
        {"idx": [2, 3], "lr": 0.02, "hessian_power": 1.0, "weight_decay": 0.02},
    ]
    expected, cond = _reference(model, batches, groups, seed=7, n_probes=n_probes)

    params = list(model.parameters())
    opt = AdaHessian(
        [
            {"params": params[:2], "hessian_power": hessian_power, "weight_decay": 0.1},
            {"params": params[2:], "lr": 0.02, "weight_decay": 0.02},
        ],
        lr=0.05,
        n_probes=n_probes,
        eps=1e-4,  # the paper's, as _reference
        betas=(0.9, 0.999),
        graft=None,
        seed=7,
    )
    _train(model, opt, batches)
    _check_params(model, expected, steps=3, cond=cond)
    assert opt.steps == 3
    # the conv weight's estimate is stored averaged over (kh, kw)
    assert opt.state[params[0]]["hessian_diag"].shape == (2, 1, 1, 1)
    assert opt.state[params[2]]["hessian_diag"].shape == params[2].shape


def test_hessian_every_two_reuses_the_estimate_without_create_graph():
    """Steps 0 and 2 estimate the Hessian; step 1 reuses D (v still absorbs D²) after a plain
    backward(), and draws no probes."""
    model, batches = _model(), _batches(3)
    groups = [{"idx": [0, 1, 2, 3], "lr": 0.05, "hessian_power": 1.0, "weight_decay": 0.0}]
    expected, cond = _reference(model, batches, groups, seed=3, hessian_every=2)
    opt = AdaHessian(model, lr=0.05, hessian_every=2, seed=3, **PAPER)
    flags = []
    for batch in batches:
        flags.append(opt.needs_hessian)
        opt.zero_grad()
        _loss(model, batch).backward(create_graph=flags[-1])
        opt.step()
    assert flags == [True, False, True]
    _check_params(model, expected, steps=3, cond=cond)


def test_step_releases_the_gradient_graph():
    """After backward(create_graph=True) the activations live on through p.grad's graph;
    step() frees them (no gc needed), also at a step that reuses D and computes no Hv (it
    only detaches the gradients)."""
    model, batches = _model(), _batches(2)
    opt = AdaHessian(model, hessian_every=2)
    for x, y in batches:
        hidden = model[1](model[0](x))  # the tanh output, saved for the backward passes
        alive = weakref.ref(hidden)
        opt.zero_grad()
        F.cross_entropy(model[3](model[2](hidden)), y).backward(create_graph=True)
        del hidden
        assert alive() is not None and all(p.grad.requires_grad for p in model.parameters())
        opt.step()
        assert alive() is None
        assert all(not p.grad.requires_grad for p in model.parameters())
    assert opt.steps == 2 and opt.needs_hessian


def test_a_step_that_needs_the_hessian_without_a_graph_says_what_to_do():
    model, (batch,) = _model(), _batches(1)
    before = [p.detach().clone() for p in model.parameters()]
    opt = AdaHessian(model)
    assert opt.needs_hessian
    _loss(model, batch).backward()
    with pytest.raises(RuntimeError) as info:
        opt.step()
    message = str(info.value)
    for needle in ("loss.backward(create_graph=True)", "needs_hessian", "set_hessian_diagonal"):
        assert needle in message
    assert opt.steps == 0 and not opt.state
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_set_hessian_diagonal_replaces_hutchinson():
    """Exact signed Hessian diagonals (of batches 0 and 1 at the initial weights) given at
    steps 0 and 1 (no create_graph, no probes drawn), Hutchinson at step 2: the update is
    the formula with |given| (the conv weight's averaged over its kernel)."""
    model, batches = _model(), _batches(3)
    params = list(model.parameters())
    groups = [{"idx": [0, 1, 2, 3], "lr": 0.05, "hessian_power": 1.0, "weight_decay": 0.01}]
    given = {
        k: _split(_exact_hessian(model, batches[k]).diagonal().clone(), params) for k in (0, 1)
    }
    expected, cond = _reference(model, batches, groups, seed=0, given=given)

    opt = AdaHessian(model, lr=0.05, weight_decay=0.01, seed=0, **PAPER)
    for k, batch in enumerate(batches):
        if k in given:
            opt.set_hessian_diagonal(dict(zip(params, given[k], strict=True)))
            assert not opt.needs_hessian
        else:
            assert opt.needs_hessian
        opt.zero_grad()
        _loss(model, batch).backward(create_graph=opt.needs_hessian)
        opt.step()
    _check_params(model, expected, steps=3, cond=cond)


def test_set_hessian_diagonal_checks_its_input():
    model = _model()
    opt = AdaHessian(model)
    weight = model[0].weight
    with pytest.raises(ValueError, match=r"0\.weight has shape \(2, 1, 2, 2\).*got \(8,\)"):
        opt.set_hessian_diagonal({weight: torch.ones(8, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"parameter of shape \(3,\) that this optimizer"):
        opt.set_hessian_diagonal({nn.Parameter(torch.ones(3)): torch.ones(3)})
    with pytest.raises(TypeError, match="must be a tensor"):
        opt.set_hessian_diagonal({weight: 1.0})


@pytest.mark.parametrize(
    ("shape", "stored"),
    [((4, 3, 5), (4, 3, 1)), ((4, 3, 2, 2), (4, 3, 1, 1)), ((2, 2, 2, 3, 3), (2, 2, 1, 1, 1))],
)
def test_spatial_average_covers_every_dim_after_the_first_two(shape, stored):
    weight = nn.Parameter(torch.randn(shape, dtype=torch.float64))
    diag = torch.randn(shape, dtype=torch.float64)
    for average, want in ((True, stored), (False, shape)):
        opt = AdaHessian([weight], spatial_average=average)
        opt.set_hessian_diagonal({weight: diag})
        weight.grad = torch.randn(shape, dtype=torch.float64)
        opt.step()
        got = opt.state[weight]["hessian_diag"]
        assert got.shape == want
        reduced = tuple(range(2, len(shape)))
        expect = diag.abs().mean(dim=reduced, keepdim=True) if average else diag.abs()
        # a mean over the kernel entries (or a copy)
        assert_close(got, expect, n=math.prod(shape[2:]))


# ---- arguments, failures, persistence ------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lr=-1.0), "lr must be"),
        (dict(betas=(1.0, 0.9)), r"betas\[0\] must be in \[0, 1\)"),
        (dict(betas=(0.9,)), "betas must be a pair"),
        (dict(betas=(0.9, "a")), r"betas\[1\] must be a real number"),
        (dict(eps=-1e-4), "eps must be"),
        (dict(weight_decay=-0.1), "weight_decay must be"),
        (dict(hessian_power=1.5), "hessian_power must be a finite number >= 0.0 and <= 1.0"),
        (dict(hessian_power=-0.5), "hessian_power must be"),
        (dict(n_probes=0), "n_probes must be a positive int"),
        (dict(n_probes=1.5), "n_probes must be a positive int"),
        (dict(hessian_every=0), "hessian_every must be a positive int"),
        (dict(spatial_average="yes"), "spatial_average must be a bool"),
        (dict(seed=1.5), "seed must be an int or None"),
        (dict(nonfinite="ignore"), "nonfinite must be one of"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AdaHessian(mlp([4, 3]), **kwargs)


def test_bad_group_values_name_themselves():
    model = mlp([4, 3])
    with pytest.raises(ValueError, match="hessian_power must be"):
        AdaHessian([{"params": model.parameters(), "hessian_power": 2.0}])
    opt = AdaHessian([model[0].weight])
    with pytest.raises(ValueError, match="lr must be"):
        opt.add_param_group({"params": [model[0].bias], "lr": -1.0})
    assert len(opt.param_groups) == 1  # the bad group is not kept


def test_accepts_models_parameters_and_groups_and_schedulers():
    model = mlp([4, 3])
    assert len(AdaHessian(model).param_groups[0]["params"]) == 2
    assert len(AdaHessian(model.parameters()).param_groups[0]["params"]) == 2
    opt = AdaHessian([{"params": [model[0].weight]}, {"params": [model[0].bias], "lr": 0.003}])
    assert [g["lr"] for g in opt.param_groups] == [0.03, 0.003]  # the default lr, then the group's
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = torch.randn(6, 4)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward(create_graph=opt.needs_hessian)
        opt.step()
        scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == [0.03 / 4, 0.003 / 4]
    assert isinstance(opt, torch.optim.Optimizer)


def test_nonfinite_gradient_skips_or_raises():
    model, (batch,) = _model(), _batches(1)
    params = list(model.parameters())
    opt = AdaHessian(model)
    _train(model, opt, [batch])
    saved = copy.deepcopy(opt.state_dict())
    before = [p.detach().clone() for p in params]
    opt.zero_grad()
    _loss(model, batch).backward(create_graph=True)
    params[3].grad[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step()
    assert opt.skipped_steps == 1 and opt.steps == 1 and opt.needs_hessian
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert all(not p.grad.requires_grad for p in params)  # the graph is released anyway
    for key in ("exp_avg", "exp_hessian_diag_sq", "hessian_diag", "step"):
        assert torch.equal(opt.state[params[0]][key], saved["state"][0][key])

    # a non-finite Hessian estimate with finite gradients is skipped as well
    opt.zero_grad()
    _loss(model, batch).backward()
    bad = torch.full_like(params[0], float("inf"))
    opt.set_hessian_diagonal({p: torch.zeros_like(p) for p in params[1:]} | {params[0]: bad})
    with pytest.warns(RuntimeWarning, match="Hessian estimate"):
        opt.step()
    assert opt.skipped_steps == 2

    strict = AdaHessian(model, nonfinite="raise")
    opt.zero_grad()
    _loss(model, batch).backward(create_graph=True)
    params[1].grad[0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"\['0.bias'\]"):
        strict.step()


def test_a_parameter_first_seen_between_hessian_steps_needs_the_graph():
    model = mlp([4, 3])
    opt = AdaHessian(model, hessian_every=2)
    x = torch.randn(6, 4)
    opt.zero_grad()
    model(x).pow(2).mean().backward(create_graph=True)
    model[0].bias.grad = None  # the bias gets no gradient at the Hessian step
    opt.step()
    assert not opt.needs_hessian
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    with pytest.raises(RuntimeError, match=r"\(0\.bias had none yet\)"):
        opt.step()
    opt.zero_grad()
    model(x).pow(2).mean().backward(create_graph=True)
    opt.step()
    assert "hessian_diag" in opt.state[model[0].bias]


@pytest.mark.parametrize("graft", [None, "adam"])
def test_state_dict_round_trip_resumes_bit_identically(graft):
    """Interrupted after 5 steps (between two Hessian steps) and resumed with an optimizer
    built with another seed: the probe generator's state comes back with the rest (and,
    grafted, Adam's moments)."""
    model, batches = _model(), _batches(9, seed=4)
    kwargs = dict(lr=0.05, n_probes=2, hessian_every=2, weight_decay=0.01, graft=graft)
    reference = copy.deepcopy(model)
    _train(reference, AdaHessian(reference, seed=11, **kwargs), batches)

    opt = AdaHessian(model, seed=11, **kwargs)
    _train(model, opt, batches[:5])
    saved = copy.deepcopy(opt.state_dict())
    resumed_model = copy.deepcopy(model)
    resumed = AdaHessian(resumed_model, seed=999, **kwargs)
    resumed.load_state_dict(saved)
    assert resumed.steps == 5 and resumed.needs_hessian is False
    _train(resumed_model, resumed, batches[5:])
    for a, b in zip(reference.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not saved by an AdaHessian"):
        resumed.load_state_dict(torch.optim.Adam(resumed_model.parameters()).state_dict())


# ---- training -------------------------------------------------------------------------------
def test_adahessian_trains_digits_below_adam():
    """Three epochs of the digits MLP: AdaHessian untuned (the paper's defaults, lr 0.15)
    ends with a lower training loss than Adam at lr 1e-3 (torch's default, the bench's) and
    at lr 1e-2: 0.126 against 1.64 and 0.140. Not claimed: Adam tuned for this problem
    (lr 2e-2 to 5e-2) reaches 0.076 to 0.094 here, lower than AdaHessian at any lr in
    {0.1, 0.15, 0.2, 0.3, 0.5} (best 0.126)."""
    x_train, y_train, _, _ = digits_data()
    results, seconds = {}, {}
    for name in ("adam1e-3", "adam1e-2", "adahessian"):
        torch.manual_seed(0)
        model = mlp([64, 64, 10])
        if name == "adahessian":
            opt = AdaHessian(model, lr=0.15, graft=None)  # the paper's update
        else:
            opt = torch.optim.Adam(model.parameters(), lr=float(name[4:]))
        gen = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for _ in range(3):
            perm = torch.randperm(len(x_train), generator=gen)
            for i in range(0, len(x_train), 64):
                idx = perm[i : i + 64]
                opt.zero_grad()
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                loss.backward(create_graph=getattr(opt, "needs_hessian", False))
                opt.step()
        seconds[name] = time.perf_counter() - start
        with torch.no_grad():
            results[name] = F.cross_entropy(model(x_train), y_train).item()
    print("digits train loss after 3 epochs:", results, "seconds:", seconds)
    assert results["adahessian"] < results["adam1e-2"] < results["adam1e-3"]


# ---- one base class ---------------------------------------------------------------------------
def test_adahessian_is_a_curvature_optimizer_built_from_its_config():
    opt = AdaHessian(mlp([4, 3]))
    assert isinstance(opt, CurvatureOptimizer)
    assert isinstance(opt.config, AdaHessianConfig)
    assert isinstance(opt.estimator, AdaHessianEstimator)
    assert opt.estimator.needs_graph and not opt.estimator.requires_capture
    parameters = inspect.signature(AdaHessian).parameters
    for f in config_fields(AdaHessianConfig):
        assert f.name in parameters, f.name
        assert parameters[f.name].default == f.default, f.name
    for name in ("momentum", "kl_clip", "inverse_every", "fisher_type", "damping"):
        assert name not in parameters
        with pytest.raises(TypeError, match="AdaHessian sets it itself"):
            AdaHessian(mlp([4, 3]), **{name: None})


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_without_curvature_it_is_adam_bit_for_bit(weight_decay):
    """``precondition=False``: torch.optim.AdamW's arithmetic (Adam's without weight
    decay), so the same code runs: bit-equal parameters and moments."""
    model, batches = _model(), _batches(4)
    reference = copy.deepcopy(model)
    kwargs = dict(lr=0.05, betas=(0.8, 0.99), eps=1e-8, weight_decay=weight_decay)
    opt = AdaHessian(model, precondition=False, graft=None, **kwargs)  # (grafted: test_grafting)
    assert opt.estimator is None and not opt.needs_hessian
    torch_cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    adam = torch_cls(reference.parameters(), foreach=False, **kwargs)
    for batch in batches:
        for m, o in ((model, opt), (reference, adam)):
            o.zero_grad()
            _loss(m, batch).backward()
            o.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(opt.state[a]["exp_avg_sq"], adam.state[b]["exp_avg_sq"])


def test_a_state_saved_before_it_was_a_curvature_optimizer_resumes():
    """The former layout (an ``"adahessian"`` entry beside the per-parameter state) loads
    and continues the same trajectory, probes included."""
    model, batches = _model(), _batches(6, seed=2)
    kwargs = dict(lr=0.05, hessian_every=2, seed=5)
    reference = copy.deepcopy(model)
    _train(reference, AdaHessian(reference, **kwargs), batches)

    opt = AdaHessian(model, **kwargs)
    _train(model, opt, batches[:3])
    state = copy.deepcopy(opt.state_dict())
    curvature = state.pop("curvature")
    state["adahessian"] = {
        "step": curvature["step"],
        "skipped_steps": curvature["skipped_steps"],
        "generator": curvature["estimator"]["generator"],
        "given": curvature["estimator"]["given"],
    }
    resumed_model = copy.deepcopy(model)
    resumed = AdaHessian(resumed_model, lr=0.05, hessian_every=2, seed=0)
    resumed.load_state_dict(state)
    assert resumed.steps == 3 and resumed.needs_hessian is False
    _train(resumed_model, resumed, batches[3:])
    for a, b in zip(reference.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


# ---- the library's defaults (issue 18) and the paper's preset ---------------------------------
def test_defaults_are_the_papers_with_the_adam_graft():
    """The defaults are the paper's (:data:`PAPER`, configs/optimizers/adahessian.yaml) but
    for the step size and β₁: the issue-18 grid found no setting of the paper's update with
    more good learning rates, and Adam's step norms with β₁ 0.8 reach Adam's counts, lr 3e-2
    every target (docs/adahessian.md)."""
    config = AdaHessianConfig()
    assert (config.eps, config.n_probes) == (PAPER["eps"], PAPER["n_probes"])
    assert (config.graft, config.lr) == ("adam", 3e-2)
    assert (config.betas, config.hessian_power) == ((0.8, 0.999), 1.0)
    assert (config.hessian_every, config.spatial_average) == (1, True)
    opt = AdaHessian(mlp([4, 3]))
    assert opt.param_groups[0]["eps"] == PAPER["eps"]
    assert opt.estimator.n_probes == PAPER["n_probes"]


def test_preset_keeps_the_papers_settings():
    from secondorder.bench.config import load_preset

    root = Path(__file__).resolve().parents[2] / "configs" / "optimizers"
    hparams = load_preset(root / "adahessian.yaml").hparams
    assert (hparams["eps"], hparams["n_probes"]) == (PAPER["eps"], PAPER["n_probes"])
