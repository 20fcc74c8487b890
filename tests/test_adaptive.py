"""Adaptive damping, learning rate and momentum (secondorder/adaptive.py) against dense
float64 references on losses whose Hessian is known in closed form."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secondorder import KFAC, CurvatureOptimizer
from secondorder.adaptive import levenberg_marquardt, minimise_quadratic_model

from .helpers import assert_close, digits_closure_steps, digits_data, mlp

F64 = {"factor_dtype": torch.float64, "inverse_dtype": torch.float64}
OMEGA = 0.95**5


def _linear_problem(d: int = 3, n: int = 16, seed: int = 0):
    """A bias-free Linear layer with MSE: ``L(θ) = ½θᵀAθ − bᵀθ + c``, ``A = 2XᵀX/n``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=gen, dtype=torch.float64))
    hessian = 2.0 * x.T @ x / n
    return model, x, y, hessian


def _closure(opt, model, x, y, calls=None):
    def closure():
        if calls is not None:
            calls.append(1)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def _loss(model, x, y) -> float:
    with torch.no_grad():
        return F.mse_loss(model(x), y).item()


def _flat_grad(model, x, y) -> Tensor:
    theta = model.weight.detach().reshape(-1)
    return 2.0 * x.T @ (x @ theta - y[:, 0]) / x.shape[0]


def _spy_directions(opt) -> list[Tensor]:
    """Record the preconditioned directions the estimator gives (Δ of each step)."""
    seen = []
    precondition = opt.estimator.precondition

    def spy(grads, damping):
        out = precondition(grads, damping)
        seen.append({p: u.clone() for p, u in out.items()})
        return out

    opt.estimator.precondition = spy
    return seen


# ---- the pure functions --------------------------------------------------------------------
def test_levenberg_marquardt_rule():
    lm = {"min_damping": 1e-8, "max_damping": 10.0}
    assert levenberg_marquardt(1.0, 0.9, 0.5, **lm) == 0.5
    assert levenberg_marquardt(1.0, 0.1, 0.5, **lm) == 2.0
    assert levenberg_marquardt(1.0, 0.5, 0.5, **lm) == 1.0
    assert levenberg_marquardt(1.0, math.nan, 0.5, **lm) == 1.0  # no information
    assert levenberg_marquardt(1.0, -math.inf, 0.5, **lm) == 2.0  # diverged
    assert levenberg_marquardt(8.0, 0.1, 0.5, **lm) == 10.0  # bounds
    assert levenberg_marquardt(1e-8, 0.9, 0.5, **lm) == 1e-8


def test_minimise_quadratic_model_fixed_and_indefinite():
    q = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -1.0], dtype=torch.float64)
    c = minimise_quadratic_model(q, b, [None, None])
    assert_close(c, -torch.linalg.solve(q, b), cond=float(torch.linalg.cond(q)))
    c = minimise_quadratic_model(q, b, [None, 2.0])  # μ held: α = −(b₁ + Q₁₂ μ)/Q₁₁
    assert_close(c, torch.tensor([-(1.0 + 0.5 * 2.0) / 2.0, 2.0], dtype=torch.float64))
    assert minimise_quadratic_model(-q, b, [None, None]) is None


# ---- (a) ρ and the LM rule ---------------------------------------------------------------------
def test_reduction_ratio_closed_form_on_a_quadratic():
    model, x, y, hessian = _linear_problem()
    damping = 1e-2
    opt = KFAC(
        model,
        lr=0.3,
        momentum=0.0,
        kl_clip=None,
        damping=damping,
        curvature_every=1,
        adaptive_damping=True,
        damping_adaptation_interval=1,
        **F64,
    )
    theta0 = model.weight.detach().reshape(-1).clone()
    grad0, loss0 = _flat_grad(model, x, y), _loss(model, x, y)
    opt.step(_closure(opt, model, x, y))
    delta = model.weight.detach().reshape(-1) - theta0
    model_change = 0.5 * delta @ (hessian + damping * torch.eye(3, dtype=torch.float64)) @ delta
    model_change = model_change + grad0 @ delta
    rho = (_loss(model, x, y) - loss0) / model_change
    record = opt.last_adaptation
    cond = float(torch.linalg.cond(hessian))
    assert_close(torch.tensor(record.model_change), model_change, n=9, cond=cond)
    assert_close(torch.tensor(record.rho), rho, n=9, cond=cond)
    # exact curvature on an exact quadratic: the damping makes the model pessimistic, ρ > 1
    assert record.rho > 1.0
    assert record.next_damping == pytest.approx(damping * OMEGA, rel=1e-15)
    assert opt.current_damping() == record.next_damping


class _DoubleWell(nn.Module):
    """``L(θ) = (θ² − 1)²`` as a model of no input: ``L'' = 12θ² − 4``."""

    def __init__(self, theta: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([theta], dtype=torch.float64))

    def forward(self) -> Tensor:
        return ((self.theta**2 - 1.0) ** 2).sum()


@pytest.mark.parametrize("lr", [0.2, 0.4])
def test_lm_rule_moves_damping_both_ways(lr):
    """A step toward rising curvature: the model is optimistic for the long step (ρ < 1/4,
    λ/ω) and good for the short one (ρ > 3/4, ωλ); any base update, no curvature."""
    model = _DoubleWell(0.6)
    opt = CurvatureOptimizer(
        model, lr=lr, damping=1e-3, adaptive_damping=True, damping_adaptation_interval=1
    )

    def closure():
        opt.zero_grad()
        loss = model()
        loss.backward()
        return loss

    t = 0.6
    opt.step(closure)
    delta = model.theta.item() - t
    grad, curv = 4 * t * (t * t - 1), 12 * t * t - 4
    model_change = 0.5 * (curv + 1e-3) * delta**2 + grad * delta
    rho = (model().item() - (t * t - 1) ** 2) / model_change
    record = opt.last_adaptation
    assert record.rho == pytest.approx(rho, rel=1e-12)
    expected = 1e-3 * OMEGA if rho > 0.75 else 1e-3 / OMEGA
    assert (rho > 0.75) == (lr == 0.2) and (rho < 0.25) == (lr == 0.4)
    assert record.next_damping == pytest.approx(expected, rel=1e-15)


def test_adaptive_damping_leaves_steps_between_adaptations_unchanged():
    """Measuring δ and modelling it at θ puts the parameters back exactly: before the
    first adaptation, the trajectory is the non-adaptive one bit for bit."""
    runs = []
    for adaptive in (False, True):
        model, x, y, _ = _linear_problem(seed=1)
        opt = KFAC(
            model,
            curvature_every=1,
            damping=1e-3,  # the same start for both (adaptive_damping's default is 0.1)
            adaptive_damping=adaptive,
            damping_adaptation_interval=3,
            **F64,
        )
        for _ in range(3):
            opt.step(_closure(opt, model, x, y))
        runs.append((model.weight.detach().clone(), opt.current_damping()))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[1][1] != runs[0][1]  # adapted after the third step


# ---- (b) α, μ: the 2x2 minimiser --------------------------------------------------------------
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_alpha_mu_are_the_closed_form_minimiser(weight_decay):
    model, x, y, hessian = _linear_problem(d=4, n=24)
    damping = 1e-1
    opt = KFAC(
        model,
        damping=damping,
        curvature_every=1,
        weight_decay=weight_decay,
        adaptive_lr=True,
        adaptive_momentum=True,
        **F64,
    )
    seen = _spy_directions(opt)
    eye = torch.eye(4, dtype=torch.float64)
    curvature = hessian + (damping + weight_decay) * eye
    previous = None
    for _ in range(3):
        theta = model.weight.detach().reshape(-1).clone()
        grad = _flat_grad(model, x, y) + weight_decay * theta
        opt.step(_closure(opt, model, x, y))
        v1 = -(seen[-1][model.weight].reshape(-1) + weight_decay * theta)
        record = opt.last_adaptation
        if previous is None:  # first step: the 1x1 model
            alpha, mu = -(grad @ v1) / (v1 @ curvature @ v1), 0.0
            cond = 1.0
        else:
            v2 = previous
            q11, q12, q22 = v1 @ curvature @ v1, v1 @ curvature @ v2, v2 @ curvature @ v2
            b1, b2 = grad @ v1, grad @ v2
            det = q11 * q22 - q12 * q12
            alpha = -(q22 * b1 - q12 * b2) / det
            mu = -(q11 * b2 - q12 * b1) / det
            q = torch.stack([torch.stack([q11, q12]), torch.stack([q12, q22])])
            cond = float(torch.linalg.cond(q))
        assert_close(torch.tensor(record.alpha), torch.as_tensor(alpha), n=16, cond=cond)
        assert_close(torch.tensor(record.mu), torch.as_tensor(mu), n=16, cond=cond)
        delta = model.weight.detach().reshape(-1) - theta
        expected = alpha * v1 + (mu * previous if previous is not None else 0.0)
        assert_close(delta, expected, n=16, cond=cond)
        previous = delta


# ---- (c) one dimension: Newton ------------------------------------------------------------------
def test_adaptive_lr_is_newton_in_one_dimension():
    """α minimises the damped model along any direction: in 1-D the step is
    ``−g / (A + λ)``, damped Newton, whatever the preconditioner's scale; it lands on the
    minimiser up to the damping's relative effect ``λ / (A + λ)`` on the step."""
    model, x, y, hessian = _linear_problem(d=1, n=10, seed=3)
    damping = 1e-12
    opt = KFAC(model, damping=damping, adaptive_lr=True, **F64)
    theta0, grad = model.weight.detach().reshape(()).clone(), _flat_grad(model, x, y)[0]
    opt.step(_closure(opt, model, x, y))
    theta1 = model.weight.detach().reshape(())
    curvature = hessian[0, 0]
    assert_close(theta1, theta0 - grad / (curvature + damping), n=10)
    minimiser = (x[:, 0] @ y[:, 0]) / (x[:, 0] @ x[:, 0])
    damping_effect = damping / curvature * abs(theta0 - minimiser)
    tol = 10 * torch.finfo(torch.float64).eps * abs(minimiser)
    assert abs(theta1 - minimiser) <= damping_effect + tol


# ---- (d) checkpoints ----------------------------------------------------------------------------
def test_state_dict_resumes_exactly():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=gen)
    options = {
        "damping": 0.5,
        "curvature_every": 2,
        "inverse_every": 3,
        "adaptive_damping": True,
        "damping_adaptation_interval": 2,
        "adaptive_lr": True,
        "adaptive_momentum": True,
    }

    def closure_of(opt, model):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        return closure

    torch.manual_seed(0)
    model = mlp([5, 6, 3]).double()
    opt = KFAC(model, **options, **F64)
    for _ in range(5):
        opt.step(closure_of(opt, model))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["curvature"]["adaptive"]["damping"] == opt.current_damping()
    for _ in range(4):
        opt.step(closure_of(opt, model))

    resumed = mlp([5, 6, 3]).double()
    resumed.load_state_dict(saved_model)
    opt2 = KFAC(resumed, **options, **F64)
    opt2.load_state_dict(saved_opt)
    for _ in range(4):
        opt2.step(closure_of(opt2, resumed))
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt2.last_adaptation == opt.last_adaptation
    assert opt2.current_damping() == opt.current_damping()


# ---- (e) errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["adaptive_damping", "adaptive_lr", "adaptive_momentum"])
def test_step_without_closure_names_the_option(option):
    model, x, y, _ = _linear_problem()
    opt = KFAC(model, **{option: True})
    F.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match=f"{option}.*step\\(closure\\)"):
        opt.step()


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"damping_adaptation_interval": 0}, "damping_adaptation_interval"),
        ({"damping_adaptation_decay": 1.0}, "damping_adaptation_decay"),
        ({"damping_adaptation_decay": 0.0}, "damping_adaptation_decay"),
        ({"min_damping": 0.0}, "min_damping"),
        ({"min_damping": 1e-2, "max_damping": 1e-3}, "max_damping"),
        ({"adaptive_damping": True, "damping": lambda k: 1e-2}, "adaptive_damping"),
        ({"adaptive_damping": True, "damping": 1e-9}, "min_damping"),
        ({"adaptive_lr": True, "base": "adam"}, "adaptive_lr"),
        ({"adaptive_momentum": True, "momentum": 0.9}, "adaptive_momentum"),
        ({"adaptive_lr": True, "nesterov": True}, "adaptive_lr"),
        ({"adaptive_lr": True, "decoupled_weight_decay": True}, "adaptive_lr"),
    ],
)
def test_bad_values_raise_value_error_naming_the_option(options, name):
    model, _, _, _ = _linear_problem()
    with pytest.raises(ValueError, match=name):
        KFAC(model, **options)


def test_adaptive_damping_works_with_the_adam_base():
    model, x, y, _ = _linear_problem()
    opt = KFAC(model, base="adam", adaptive_damping=True, damping_adaptation_interval=1)
    opt.step(_closure(opt, model, x, y))
    assert opt.last_adaptation.rho is not None


# ---- (f) off: unchanged --------------------------------------------------------------------------
def test_off_calls_the_closure_once_and_saves_nothing_new():
    model, x, y, _ = _linear_problem()
    opt = KFAC(model)
    calls = []
    opt.step(_closure(opt, model, x, y, calls))
    assert calls == [1]
    assert opt.adaptive_state is None and opt.last_adaptation is None
    assert "adaptive" not in opt.state_dict()["curvature"]


def test_extra_closure_calls_leave_grads_and_statistics_alone():
    """With adaptive_lr the closure runs twice (three times at an adaptation step); the
    extra calls record nothing and leave ``.grad`` as the first call set it."""
    model, x, y, _ = _linear_problem()
    opt = KFAC(
        model,
        curvature_every=1,
        adaptive_lr=True,
        adaptive_damping=True,
        damping_adaptation_interval=2,
        **F64,
    )
    calls = []
    opt.step(_closure(opt, model, x, y, calls))
    assert len(calls) == 2
    grad = model.weight.grad.clone()
    opt.step(_closure(opt, model, x, y, calls))
    assert len(calls) == 5
    assert not torch.equal(model.weight.grad, grad)  # the gradient of the second step
    assert opt.estimator.state_dict() is not None


# ---- integration: digits with no lr -------------------------------------------------------------
def _train(make_opt, steps: int) -> float:
    *_, (model, _) = digits_closure_steps(make_opt, steps)  # the model after the last step
    x_train, y_train, _, _ = digits_data()
    with torch.no_grad():
        return F.cross_entropy(model(x_train), y_train).item()


@pytest.mark.parametrize("damping", [None, 1.0])
def test_adaptive_kfac_on_digits_needs_no_lr(damping):
    """No lr, and no damping either: with adaptive_damping the default λ starts at 0.1 (the
    Hessian model needs a first λ of the curvature's order: M&G start at 150, kfac-jax's
    examples at 1; from the plain default 1e-3 the first steps overshoot)."""
    steps = 40
    sgd = _train(lambda m: torch.optim.SGD(m.parameters(), lr=0.01), steps)
    adaptive = {"adaptive_damping": True, "adaptive_lr": True, "adaptive_momentum": True}
    given = {} if damping is None else {"damping": damping}
    kfac = _train(lambda m: KFAC(m, **given, **adaptive), steps)
    assert math.isfinite(kfac) and kfac < 0.5 * sgd


def test_the_default_damping_starts_adaptive_damping_at_0_1_inside_its_bounds():
    model = mlp([4, 3])
    assert KFAC(model).config.damping == 1e-3
    assert KFAC(model, adaptive_damping=True).config.damping == 0.1
    assert KFAC(model, adaptive_damping=True, damping=1e-3).config.damping == 1e-3
    assert KFAC(model, adaptive_damping=True, max_damping=0.05).config.damping == 0.05
    assert KFAC(model, adaptive_damping=True, min_damping=0.5).config.damping == 0.5
    assert KFAC(model, damping=None).config.damping == 1e-3  # None: the default
