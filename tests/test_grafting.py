"""Grafting (``graft=``): the preconditioned direction with a first-order method's step norm.

Pinned: with the curvature off, ``graft="adam"`` *is* ``torch.optim.Adam`` / ``AdamW`` (the
same code path: bit for bit); with the curvature on, each parameter's step has the grafted
method's norm (a float64 reference of that method) and the preconditioned direction; the
grafted method's state resumes exactly; bad arguments name the argument.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secondorder as so
from secondorder.estimators.base import NonFiniteStatistics
from secondorder.grafting import GRAFTS

from .helpers import assert_close, assert_resume_is_exact, mlp, train_steps


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen))
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    ("kwargs", "reference"),
    [
        ({}, lambda p, b: torch.optim.Adam(p, lr=3e-3, betas=b)),
        (
            {"weight_decay": 0.1},
            lambda p, b: torch.optim.Adam(p, lr=3e-3, betas=b, weight_decay=0.1),
        ),
        (
            {"weight_decay": 0.1, "decoupled_weight_decay": True},
            lambda p, b: torch.optim.AdamW(p, lr=3e-3, betas=b, weight_decay=0.1),
        ),
        (
            {"graft_betas": (0.7, 0.99), "graft_eps": 1e-6},
            lambda p, b: torch.optim.Adam(p, lr=3e-3, betas=(0.7, 0.99), eps=1e-6),
        ),
    ],
)
@pytest.mark.parametrize("cls", [so.KFAC, so.EKFAC, so.MFAC], ids=lambda c: c.__name__)
def test_adam_graft_with_the_curvature_off_is_adam_bit_for_bit(cls, kwargs, reference):
    torch.manual_seed(0)
    model = mlp([5, 7, 3])
    twin = copy.deepcopy(model)
    base = {"base": "sgd"} if cls is so.MFAC else {}  # graft needs it; M-FAC's default is adam
    opt = cls(model, lr=3e-3, graft="adam", precondition=False, **base, **kwargs)
    # the method's own default betas (β₁ 0.8 in the K-FAC family and M-FAC)
    ref = reference(twin.parameters(), opt.config.graft_betas)
    for batch in _batches(6):
        train_steps(model, opt, [batch])
        train_steps(twin, ref, [batch])
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)  # the same arithmetic: adam_update is torch's, op for op


def test_adam_graft_is_adam_at_steps_where_use_curvature_is_off():
    torch.manual_seed(0)
    model = mlp([5, 7, 3])
    twin = copy.deepcopy(model)
    opt = so.KFAC(model, lr=3e-3, graft="adam", use_curvature=[(100, None)])
    ref = torch.optim.Adam(twin.parameters(), lr=3e-3, betas=(0.8, 0.999))  # K-FAC's graft
    for batch in _batches(4):
        train_steps(model, opt, [batch])
        train_steps(twin, ref, [batch])
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def _reference_steps(graft: str, grads: list[torch.Tensor], betas=(0.9, 0.999), eps=1e-8):
    """The grafted method's step at each of the given gradients, in float64."""
    beta1, beta2 = betas
    m = v = s = torch.zeros_like(grads[0], dtype=torch.float64)
    steps = []
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if graft == "sgd":
            steps.append(g)
        elif graft == "adagrad":
            s = s + g * g
            steps.append(g / (s.sqrt() + eps))
        elif graft == "rmsprop":
            v = beta2 * v + (1 - beta2) * g * g
            steps.append(g / (v.sqrt() + eps))
        else:
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            steps.append((m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps))
    return steps


def _reference_moment(grads: list[torch.Tensor], beta1: float = 0.9) -> torch.Tensor:
    """Adam's bias-corrected first moment ``m̂`` after the given gradients, in float64."""
    m = torch.zeros_like(grads[0], dtype=torch.float64)
    for g in grads:
        m = beta1 * m + (1 - beta1) * g.double()
    return m / (1 - beta1 ** len(grads))


def _unit_norms(t: torch.Tensor, unit: str) -> torch.Tensor:
    """Norms per parameter or per row (a 1-D tensor whole), shaped to broadcast."""
    if unit == "parameter" or t.dim() < 2:
        return t.norm()
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


@pytest.mark.parametrize(
    ("graft", "moment", "unit"),
    [(g, True, "parameter") for g in GRAFTS]
    + [("adam", False, "parameter"), ("adam", True, "row"), ("rmsprop", True, "row")],
    ids=str,
)
def test_the_grafted_step_has_the_grafted_norm_and_the_preconditioned_direction(
    graft, moment, unit
):
    """lr 1, momentum 0, no decay: Δw = (‖a‖/‖u‖) u per parameter (or per row of a weight,
    ``graft_norm="row"``), with ``a`` the grafted
    method's step (float64 reference over the same gradients) and ``u`` the K-FAC direction
    (asked of the estimator after the step, whose inverses did not change since) of the
    gradient, or with ``graft="adam"`` and ``graft_moment`` (the default) of Adam's
    bias-corrected first moment."""
    torch.manual_seed(0)
    model = mlp([5, 7, 3])
    opt = so.KFAC(
        model,
        lr=1.0,
        momentum=0.0,
        damping=0.1,
        curvature_every=1,
        inverse_every=1,
        kl_clip=None,
        graft=graft,
        graft_moment=moment,
        graft_norm=unit,
    )
    history: dict[torch.Tensor, list[torch.Tensor]] = {p: [] for p in model.parameters()}
    for batch in _batches(4):
        before = {p: p.detach().clone() for p in model.parameters()}
        x, y = batch
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = {p: p.grad.detach().clone() for p in model.parameters()}
        for p, g in grads.items():
            history[p].append(g)
        opt.step()
        if graft == "adam" and moment:
            beta1 = opt.config.graft_betas[0]
            targets = {p: _reference_moment(history[p], beta1).float() for p in grads}
        else:
            targets = grads
        directions = opt.estimator.precondition(targets, opt.current_damping())
        assert set(directions) == set(grads)  # every parameter is covered
        for p, u in directions.items():
            moved = (before[p] - p.detach()).double()
            a = _reference_steps(graft, history[p], betas=opt.config.graft_betas)[-1]
            u64 = u.double()
            want = u64 * (_unit_norms(a, unit) / _unit_norms(u64, unit))
            # a handful of roundings per entry in float32, relative to the step's size or to
            # the weights' (``moved`` is a difference of float32 weights)
            size = max(float(want.abs().max()), float(before[p].abs().max()))
            assert_close(moved, want, dtype=torch.float32, n=16, scale=size)
            assert_close(
                _unit_norms(moved, unit),
                _unit_norms(a, unit),
                dtype=torch.float32,
                n=16 * moved.numel(),
            )


def test_the_adam_graft_preconditions_the_moment_and_a_skipped_step_keeps_it():
    """``graft_moment`` changes the direction (the two settings part after the first step,
    where ``m̂`` is the gradient), and a step skipped for non-finite statistics (raised after
    the moments were computed) leaves Adam's moments as they were: the run then equals one
    without that attempt."""
    torch.manual_seed(0)
    batches = _batches(4)

    def run(moment: bool, bad_at: int | None = None):
        torch.manual_seed(1)
        model = mlp([5, 7, 3])
        opt = so.KFAC(model, lr=1e-2, curvature_every=1, inverse_every=1, graft_moment=moment)
        for i, (x, y) in enumerate(batches):
            if i == bad_at:
                update = opt.estimator.update

                def refuse(stats):
                    raise NonFiniteStatistics("factors", list(model.parameters()))

                opt.estimator.update = refuse
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                with pytest.warns(RuntimeWarning, match="non-finite gradient or factors"):
                    opt.step()
                opt.estimator.update = update
            train_steps(model, opt, [(x, y)])
        return [p.detach().clone() for p in model.parameters()], opt

    with_moment, opt = run(True)
    assert all("graft_exp_avg" in opt.state[p] for p in opt.state)
    without, _ = run(False)
    assert max(float((a - b).abs().max()) for a, b in zip(with_moment, without, strict=True)) > 1e-4
    skipped, opt = run(True, bad_at=2)
    assert opt.skipped_steps == 1
    for a, b in zip(skipped, with_moment, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("moment", [False, True])
def test_a_head_without_gradient_but_with_adams_momentum_stays_finite(moment):
    """Alternate two heads: the idle head's gradient is zero while Adam's first moment is
    not. With the raw gradient preconditioned its direction is zero and its graft ratio
    ‖a‖/‖u‖ overflows (it once made the step NaN and every later step was skipped); the head
    stays where it was. With the moment preconditioned it keeps moving on its momentum."""
    torch.manual_seed(0)
    body, head_a, head_b = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 40)
    model = nn.ModuleDict({"body": body, "a": head_a, "b": head_b})
    opt = so.KFAC(model, graft_moment=moment, curvature_every=1, inverse_every=1)
    gen = torch.Generator().manual_seed(0)
    for i in range(5):
        x = torch.randn(32, 8, generator=gen)
        head, classes = (head_b, 40) if i == 1 else (head_a, 4)
        before = head_b.weight.detach().clone()
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(
            head(torch.tanh(body(x))), torch.randint(0, classes, (32,), generator=gen)
        ).backward()
        opt.step()
        if i >= 2:  # head b idle, with momentum from step 1
            assert torch.equal(head_b.weight, before) != moment
    assert opt.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_graft_moment_must_be_a_bool_and_graft_norm_a_known_unit():
    with pytest.raises(TypeError, match="graft_moment must be a bool, got str"):
        so.KFAC(mlp([2, 2]), graft_moment="yes")
    with pytest.raises(ValueError, match=r"graft_norm must be one of \('parameter', 'row'\)"):
        so.KFAC(mlp([2, 2]), graft_norm="block")


def test_graft_state_resumes_exactly():
    torch.manual_seed(0)
    batches = _batches(6)
    kwargs = dict(lr=1e-2, graft="rmsprop", curvature_every=1, inverse_every=2)
    saved = assert_resume_is_exact(lambda m: so.KFAC(m, **kwargs), mlp([5, 7, 3]), batches, 3)
    assert any(k.startswith("graft_") for st in saved["state"].values() for k in st)


def test_momentum_defaults_to_zero_under_the_adam_graft_only():
    assert so.KFAC(mlp([5, 3]), graft="adam").param_groups[0]["momentum"] == 0.0
    assert so.KFAC(mlp([5, 3]), graft="rmsprop").param_groups[0]["momentum"] == 0.9
    assert so.KFAC(mlp([5, 3]), graft="adam", momentum=0.5).param_groups[0]["momentum"] == 0.5


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (so.KFAC, {"graft": "lion"}, "graft must be None, .auto. or one of"),
        (so.KFAC, {"graft": "adam", "base": "adam"}, "graft applies to base='sgd', 'momentum'"),
        (so.KFAC, {"graft": "adam", "graft_betas": (1.0, 0.9)}, r"betas\[0\] must be in"),
        (so.KFAC, {"graft": "adam", "graft_eps": -1.0}, "graft_eps must be"),
        (so.MFAC, {"graft": "adam", "base": "adam"}, "not to base='adam'"),
    ],
)
def test_bad_graft_arguments_name_the_argument(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(mlp([5, 3]), **kwargs)


@pytest.mark.parametrize("cls", [so.KFAC, so.EKFAC, so.TwoLevelKFAC])
def test_the_k_fac_family_grafts_adam_by_default_and_auto_steps_aside(cls):
    """``graft="auto"`` (the K-FAC family's default) is Adam grafting with base="sgd", and
    None where the step size is chosen otherwise: another base, adaptive lr / momentum."""
    model = mlp([5, 4, 3])
    default = cls(model)
    assert default.config.graft == "adam" and default.config.kl_clip is None
    assert default.param_groups[0]["momentum"] == 0.0 and default.param_groups[0]["lr"] == 0.01
    assert default.config.graft_moment is True
    assert cls(mlp([5, 3]), base="adam").config.graft is None
    assert cls(mlp([5, 3]), adaptive_lr=True).config.graft is None
    assert cls(mlp([5, 3]), adaptive_momentum=True).config.graft is None
    papers = cls(mlp([5, 3]), graft=None)
    assert papers.config.graft is None and papers.param_groups[0]["momentum"] == 0.9

    # the default's step is the explicitly grafted one
    explicit_model = copy.deepcopy(model)
    explicit = cls(
        explicit_model, graft="adam", graft_moment=True, lr=0.01, kl_clip=None, momentum=0.0
    )
    for batch in _batches(3):
        train_steps(model, default, [batch])
        train_steps(explicit_model, explicit, [batch])
    for p, q in zip(model.parameters(), explicit_model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("graft", GRAFTS)
def test_kl_clip_with_a_graft_is_refused_as_a_no_op(graft):
    with pytest.raises(ValueError, match=r"kl_clip \(0.01\) has no effect with graft="):
        so.KFAC(mlp([5, 3]), graft=graft, kl_clip=1e-2)
    assert so.KFAC(mlp([5, 3]), graft=None, kl_clip=1e-2).config.kl_clip == 1e-2


# ---- the bases that read the curvature themselves (AdaFisher, AdaHessian) -------------------
def _curvature_base_steps(cls, batches, **kwargs):
    """Train ``cls`` (lr 1, no decay) and record, per step, each parameter's change, its
    gradient and what the base's own step is made of: AdaFisher's ``D`` (the estimator's
    ``moment_curvature``, as a tensor of the parameter's shape, None where it gives none),
    AdaHessian's ``hessian_diag``."""
    torch.manual_seed(0)
    model = mlp([5, 7, 3])
    opt = cls(model, lr=1.0, **kwargs)
    record = []
    for x, y in batches:
        before = {p: p.detach().clone() for p in model.parameters()}
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward(create_graph=cls is so.AdaHessian)
        grads = {p: p.grad.detach().clone() for p in model.parameters()}
        opt.step()
        curv = {}
        for p in model.parameters():
            if cls is so.AdaHessian:
                curv[p] = opt.state[p]["hessian_diag"].detach().clone()
                continue
            diag = opt.estimator.moment_curvature(p)
            if diag is None:
                curv[p] = None
                continue
            full = (diag.first.unsqueeze(-1) * diag.second.unsqueeze(-2)).double()
            curv[p] = torch.empty_like(p, dtype=torch.float64)
            diag.layout.write(curv[p], full)
        moved = {p: (before[p] - p.detach()).double() for p in model.parameters()}
        record.append((moved, grads, curv))
    return model, opt, record


@pytest.mark.parametrize("unit", ["parameter", "row"])
@pytest.mark.parametrize("cls", [so.AdaFisher, so.AdaHessian], ids=lambda c: c.__name__)
def test_a_curvature_base_grafts_its_own_step(cls, unit):
    """AdaFisher's ``u = m̂ / (D + λ)`` and AdaHessian's ``u = m̂ / (√v̂ + ε)`` (float64
    references from the recorded gradients and curvatures) take the norm of Adam's step per
    parameter or per row: ``Δw = (‖a‖/‖u‖) u`` at lr 1."""
    kwargs = {"graft": "adam", "graft_norm": unit}
    if cls is so.AdaFisher:
        kwargs.update(damping=3e-3, curvature_every=1)
    model, opt, record = _curvature_base_steps(cls, _batches(4), **kwargs)
    # the base's own moments (AdaHessian's default β₁ is 0.8); Adam's graft keeps 0.9
    beta1, beta2 = opt.config.betas if cls is so.AdaHessian else (0.9, 0.999)
    for p in model.parameters():
        grads = [r[1][p] for r in record]
        m = v = torch.zeros_like(p, dtype=torch.float64)
        for t, (moved, g, curv) in enumerate(record, start=1):
            m = beta1 * m + (1 - beta1) * g[p].double()
            m_hat = m / (1 - beta1**t)
            a = _reference_steps("adam", grads[:t])[-1]
            if cls is so.AdaHessian:
                v = beta2 * v + (1 - beta2) * curv[p].double() ** 2
                u = m_hat / ((v / (1 - beta2**t)).sqrt() + opt.param_groups[0]["eps"])
            elif curv[p] is None:
                u = None
            else:
                u = m_hat / (curv[p] + opt.current_damping())
            want = a if u is None else u * (_unit_norms(a, unit) / _unit_norms(u, unit))
            size = max(float(want.abs().max()), float(p.detach().abs().max()))
            assert_close(moved[p], want, dtype=torch.float32, n=16, scale=size)
    covered = [p for p in model.parameters() if record[-1][2][p] is not None]
    assert covered  # the curvature gave directions: the test is not Adam's alone


@pytest.mark.parametrize(
    "cls", [so.AdaFisher, so.AdaFisherW, so.AdaHessian], ids=lambda c: c.__name__
)
def test_a_curvature_base_with_the_adam_graft_and_the_curvature_off_is_adam(cls):
    torch.manual_seed(0)
    model = mlp([5, 7, 3])
    twin = copy.deepcopy(model)
    opt = cls(model, lr=3e-3, graft="adam", precondition=False, weight_decay=0.1)
    ref_cls = torch.optim.AdamW if cls is not so.AdaFisher else torch.optim.Adam
    ref = ref_cls(twin.parameters(), lr=3e-3, weight_decay=0.1)
    for batch in _batches(5):
        train_steps(model, opt, [batch])
        train_steps(twin, ref, [batch])
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_grafted_adafisher_resumes_exactly():
    """(AdaHessian's: tests/estimators/test_adahessian.py, which needs its double backward.)"""
    torch.manual_seed(0)
    kwargs = {"lr": 1e-2, "graft": "adam", "curvature_every": 2}
    saved = assert_resume_is_exact(
        lambda m: so.AdaFisher(m, **kwargs), mlp([5, 7, 3]), _batches(6), 3
    )
    assert any(k.startswith("graft_") for st in saved["state"].values() for k in st)


def test_the_fused_and_the_multi_tensor_adam_graft_agree(monkeypatch):
    """On the CPU the Adam graft's steps come from torch's fused Adam kernel; elsewhere (a
    GPU, half precision) from multi-tensor operations. Both paths, three steps each, give
    the same steps and moments to float32 round-off."""
    from secondorder import grafting

    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (7,), (3, 7)]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    runs = {}
    for fused in (True, False):
        monkeypatch.setattr(grafting, "_fusable", lambda tensors, fused=fused: fused)
        states = [{} for _ in shapes]
        for g in grads:
            steps = grafting._grafted_step("adam", states, g, (0.9, 0.999), 1e-8)
        runs[fused] = (steps, states)
    for a, st_a, b, st_b in zip(*runs[True], *runs[False], strict=True):
        assert_close(a, b, dtype=torch.float32, n=16, scale=float(b.abs().max()))
        for key in ("graft_exp_avg", "graft_exp_avg_sq"):
            assert_close(st_a[key], st_b[key], dtype=torch.float32, n=8)
        assert float(st_a["graft_step"]) == float(st_b["graft_step"]) == 3.0
