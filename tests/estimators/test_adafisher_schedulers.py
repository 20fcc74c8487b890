"""Schedulers that cycle the momentum (OneCycleLR, CyclicLR with cycle_momentum=True) with
every public optimizer, and AdaFisher's first-moment decay exposed as ``betas = (beta,)``:
the β a scheduler writes is the β of the update, step by step, and state dicts from before
``betas`` existed still load."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import CyclicLR, OneCycleLR

from secondorder import EKFAC, KFAC, MFAC, AdaFisher, AdaFisherW, AdaHessian, TwoLevelKFAC

from ..helpers import assert_close, mlp


def _batches(n: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 4, generator=gen, dtype=dtype), torch.randint(0, 3, (8,), generator=gen))
        for _ in range(n)
    ]


def _model(dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    return mlp([4, 6, 3]).to(dtype)


def _step(model, opt, batch) -> None:
    x, y = batch
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward(create_graph=isinstance(opt, AdaHessian) and opt.needs_hessian)
    opt.step()


# Every public optimizer, built with its first-moment decay set to ``b``.
_OPTIMIZERS = {
    "kfac": lambda m, b: KFAC(m, lr=0.05, momentum=b, damping=0.1),
    "kfac-adam": lambda m, b: KFAC(m, lr=0.01, base="adam", betas=(b, 0.999), damping=0.1),
    "ekfac": lambda m, b: EKFAC(m, lr=0.05, momentum=b, damping=0.1),
    "twolevel": lambda m, b: TwoLevelKFAC(m, lr=0.05, momentum=b, damping=0.1),
    "mfac": lambda m, b: MFAC(m, lr=0.05, base="sgd", momentum=b, ngrads=4, damping=0.1),
    "mfac-adam": lambda m, b: MFAC(m, lr=0.01, base="adam", betas=(b, 0.999), ngrads=4),
    "adafisher": lambda m, b: AdaFisher(m, lr=0.01, beta=b, curvature_every=1),
    "adafisherw": lambda m, b: AdaFisherW(m, lr=0.01, beta=b, curvature_every=1, weight_decay=0.1),
    "adahessian": lambda m, b: AdaHessian(m, lr=0.05, betas=(b, 0.999)),
}


def _first_moment_decay(group) -> float:
    return group["betas"][0] if "betas" in group else group["momentum"]


@pytest.mark.parametrize("name", sorted(_OPTIMIZERS))
def test_one_cycle_lr_sets_the_decay_every_optimizer_uses(name):
    """OneCycleLR(cycle_momentum=True) holding the decay at 0.5 trains exactly as the
    optimizer built with 0.5 under the same learning-rate cycle (the same code path), and
    unlike the optimizer left at 0.9."""
    make = _OPTIMIZERS[name]
    batches = _batches(4)
    finals = {}
    for label, built_with, cycle in (
        ("cycled", 0.9, True),
        ("fixed", 0.5, False),
        ("0.9", 0.9, False),
    ):
        model = _model()
        opt = make(model, built_with)
        sched = OneCycleLR(
            opt,
            max_lr=0.05,
            total_steps=len(batches),
            cycle_momentum=cycle,
            base_momentum=0.5,
            max_momentum=0.5,
        )
        for batch in batches:
            _step(model, opt, batch)
            if cycle:
                assert _first_moment_decay(opt.param_groups[0]) == 0.5
            sched.step()
        finals[label] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(finals["cycled"], finals["fixed"])
    assert not torch.allclose(finals["cycled"], finals["0.9"])


@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
def test_adafisher_follows_a_cycling_beta_step_by_step(cls):
    """precondition=False (F̃ = 1 + λ): the update written out by hand in float64 with the lr
    and β that OneCycleLR set before each step, m ← βm + (1−β)(g + κw) (AdaFisher) or
    m ← βm + (1−β)g and w ← w − lr·κw (AdaFisherW), w ← w − lr·m/(1−βᵗ)/(1 + λ)."""
    model = _model(torch.float64)
    damping, wd = 1e-3, 0.1
    opt = cls(model, lr=0.01, damping=damping, weight_decay=wd, precondition=False, graft=None)
    sched = OneCycleLR(opt, max_lr=0.05, total_steps=6, base_momentum=0.6, max_momentum=0.95)
    params = list(model.parameters())
    want = [p.detach().clone() for p in params]
    moments = [torch.zeros_like(p) for p in params]
    betas_used = []
    for t, (x, y) in enumerate(_batches(5, torch.float64), start=1):
        group = opt.param_groups[0]
        lr, beta = group["lr"], group["betas"][0]
        betas_used.append(beta)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = [p.grad.detach().clone() for p in params]
        opt.step()
        assert group["beta"] == beta  # the alias follows
        sched.step()
        for i, g in enumerate(grads):
            w = want[i]
            moments[i] = beta * moments[i] + (1 - beta) * (
                g if opt.decoupled_weight_decay else g + wd * w
            )
            step = moments[i] / (1 - beta**t) / (1 + damping)
            want[i] = w - lr * (step + wd * w) if opt.decoupled_weight_decay else w - lr * step
    assert len(set(betas_used)) == len(betas_used)  # the scheduler did change β every step
    for p, w in zip(params, want, strict=True):
        assert_close(p, w, n=5 * len(betas_used))


def test_cyclic_lr_cycles_adafisher_beta():
    model = _model()
    opt = AdaFisher(model, lr=0.01)
    sched = CyclicLR(opt, base_lr=0.001, max_lr=0.01, step_size_up=2, base_momentum=0.8)
    seen = []
    for batch in _batches(4):
        _step(model, opt, batch)
        seen.append(opt.param_groups[0]["beta"])
        sched.step()
    assert len(set(seen)) > 1 and min(seen) >= 0.8


# ---- the legacy key and param groups ---------------------------------------------------------
def _run(opt_factory, edit=None, steps: int = 3):
    model = _model()
    opt = opt_factory(model)
    if edit is not None:
        edit(opt)
    for batch in _batches(steps):
        _step(model, opt, batch)
    return model, opt


def test_writing_beta_still_takes_effect_and_updates_betas():
    model_a, opt_a = _run(
        lambda m: AdaFisher(m, curvature_every=1),
        edit=lambda o: o.param_groups[0].__setitem__("beta", 0.5),
    )
    model_b, _ = _run(lambda m: AdaFisher(m, beta=0.5, curvature_every=1))
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt_a.param_groups[0]["betas"] == (0.5,)


def test_changing_beta_and_betas_to_different_values_raises():
    model = _model()
    opt = AdaFisher(model)
    opt.param_groups[0]["beta"] = 0.5
    opt.param_groups[0]["betas"] = (0.6,)
    with pytest.raises(ValueError, match="set one of them"):
        _step(model, opt, _batches(1)[0])


def test_param_groups_may_set_betas_instead_of_beta():
    model = _model()
    opt = AdaFisher(
        model,
        params=[
            {"params": list(model[0].parameters()), "betas": (0.5,)},
            {"params": list(model[2].parameters()), "beta": 0.7},
        ],
    )
    assert [(g["beta"], g["betas"]) for g in opt.param_groups] == [(0.5, (0.5,)), (0.7, (0.7,))]
    assert opt.defaults["betas"] == (0.9,)


@pytest.mark.parametrize(
    "group, match",
    [
        ({"betas": (0.9, 0.999)}, r"betas must be \(beta,\)"),
        ({"betas": (1.0,)}, r"betas\[0\] must be in \[0, 1\)"),
        ({"beta": 0.5, "betas": (0.6,)}, "set one of them"),
    ],
)
def test_bad_betas_in_a_param_group_name_the_argument(group, match):
    model = _model()
    with pytest.raises(ValueError, match=match):
        AdaFisher(model, params=[{"params": list(model.parameters()), **group}])


# ---- state dicts ----------------------------------------------------------------------------
def test_a_state_dict_saved_before_betas_existed_loads_and_resumes():
    batches = _batches(6)
    reference = _model()
    ref_opt = AdaFisher(reference, beta=0.8, curvature_every=2)
    for batch in batches:
        _step(reference, ref_opt, batch)

    model = _model()
    opt = AdaFisher(model, beta=0.8, curvature_every=2)
    for batch in batches[:3]:
        _step(model, opt, batch)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        del group["betas"]  # as saved before AdaFisher exposed it
    resumed_model = copy.deepcopy(model)
    resumed = AdaFisher(resumed_model, curvature_every=2)
    resumed.load_state_dict(old)
    assert resumed.param_groups[0]["betas"] == (0.8,)
    for batch in batches[3:]:
        _step(resumed_model, resumed, batch)
    for a, b in zip(reference.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_between_scheduler_and_step_resumes_the_same_trajectory():
    """Saved after ``sched.step()`` wrote a new β and before the next step read it: the state
    dict carries it, and the resumed run (optimizer and scheduler) equals the uninterrupted."""
    batches = _batches(6)

    def make(model):
        opt = AdaFisherW(model, lr=0.01, curvature_every=1)
        return opt, OneCycleLR(opt, max_lr=0.05, total_steps=len(batches))

    reference = _model()
    ref_opt, ref_sched = make(reference)
    for batch in batches:
        _step(reference, ref_opt, batch)
        ref_sched.step()

    model = _model()
    opt, sched = make(model)
    for batch in batches[:3]:
        _step(model, opt, batch)
        sched.step()
    saved_opt, saved_sched = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
    group = saved_opt["param_groups"][0]
    assert group["beta"] == group["betas"][0] == opt.param_groups[0]["betas"][0]
    resumed_model = copy.deepcopy(model)
    resumed, resumed_sched = make(resumed_model)
    resumed.load_state_dict(saved_opt)
    resumed_sched.load_state_dict(saved_sched)
    for batch in batches[3:]:
        _step(resumed_model, resumed, batch)
        resumed_sched.step()
    for a, b in zip(reference.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
