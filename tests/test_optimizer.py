"""CurvatureOptimizer: the base updates, schedules, errors, state saving (via KFAC)."""

from __future__ import annotations

import copy
import importlib
import inspect
import pkgutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder import KFAC, CurvatureOptimizer

from .helpers import mlp, small_cnn
from .robustness._common import assert_close_runs


def _batches(n_steps: int, in_dim: int = 6, classes: int = 3, batch: int = 8, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, in_dim, generator=gen),
            torch.randint(0, classes, (batch,), generator=gen),
        )
        for _ in range(n_steps)
    ]


def _train(model, opt, batches, scheduler=None):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return [p.detach().clone() for p in model.parameters()]


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    model = mlp([6, 10, 3])
    return model, copy.deepcopy(model)


# ---- curvature off == the torch optimizer ---------------------------------------------
@pytest.mark.parametrize(
    "ours, theirs",
    [
        (dict(momentum=0.9), dict(momentum=0.9)),
        (dict(momentum=0.9, weight_decay=1e-2), dict(momentum=0.9, weight_decay=1e-2)),
        (
            dict(momentum=0.8, nesterov=True, weight_decay=1e-3),
            dict(momentum=0.8, nesterov=True, weight_decay=1e-3),
        ),
        (dict(momentum=0.9, dampening=0.3), dict(momentum=0.9, dampening=0.3)),
        (dict(momentum=0.0), dict(momentum=0.0)),
    ],
)
def test_curvature_off_reproduces_sgd_exactly(ours, theirs):
    model_a, model_b = _pair()
    opt_a = KFAC(model_a, lr=0.1, precondition=False, **ours, graft=None)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1, foreach=False, **theirs)
    batches = _batches(6)
    for pa, pb in zip(
        _train(model_a, opt_a, batches), _train(model_b, opt_b, batches), strict=True
    ):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_curvature_off_adam_base_reproduces_adam_and_adamw(decoupled, weight_decay):
    model_a, model_b = _pair()
    opt_a = KFAC(
        model_a,
        lr=1e-2,
        base="adam",
        betas=(0.8, 0.99),
        eps=1e-7,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled,
        precondition=False,
        graft=None,
    )
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt_b = cls(
        model_b.parameters(),
        lr=1e-2,
        betas=(0.8, 0.99),
        eps=1e-7,
        weight_decay=weight_decay,
        foreach=False,
    )
    batches = _batches(6)
    for pa, pb in zip(
        _train(model_a, opt_a, batches), _train(model_b, opt_b, batches), strict=True
    ):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_decoupled_sgd_is_sgdw():
    model, _ = _pair()
    opt = KFAC(
        model,
        lr=0.1,
        momentum=0.0,
        weight_decay=0.5,
        decoupled_weight_decay=True,
        precondition=False,
        graft=None,
    )
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for b, p in zip(before, model.parameters(), strict=True):
        torch.testing.assert_close(p, b * (1 - 0.1 * 0.5), rtol=0, atol=0)


def test_huge_damping_turns_kfac_into_scaled_sgd():
    """(A⊗G + λI)⁻¹ g → g/λ as λ → ∞: K-FAC with lr·λ matches SGD with lr."""
    model_a, model_b = _pair()
    lam = 1e6
    opt_a = KFAC(
        model_a,
        lr=0.1 * lam,
        momentum=0.9,
        damping=lam,
        kl_clip=None,
        curvature_every=1,
        inverse_every=1,
        graft=None,
    )
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9)
    batches = _batches(4)
    start = [p.detach().clone() for p in model_b.parameters()]
    # (A⊗G + λI)⁻¹ = (1 − A⊗G/λ + ...)/λ: the steps differ from SGD's by ‖A‖‖G‖/λ relative
    # (factors of norm O(1), λ = 1e6), far below the round-off of 4 steps of statistics
    # over 8 examples and float32 inverses of factors of size up to 11
    assert_close_runs(
        _train(model_a, opt_a, batches),
        _train(model_b, opt_b, batches),
        start,
        dtype=torch.float32,
        n=4 * (8 + 11),
    )


# ---- param groups and schedulers ------------------------------------------------------
def test_param_groups_and_lr_scheduler_match_torch():
    model_a, model_b = _pair()

    def groups(model):
        return [
            {"params": [model[0].weight, model[0].bias], "lr": 0.05},
            {"params": [model[2].weight, model[2].bias], "weight_decay": 1e-2},
        ]

    opt_a = KFAC(
        model_a, lr=0.1, momentum=0.9, params=groups(model_a), precondition=False, graft=None
    )
    opt_b = torch.optim.SGD(groups(model_b), lr=0.1, momentum=0.9, foreach=False)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=2, gamma=0.5)
    batches = _batches(6)
    out_a = _train(model_a, opt_a, batches, sched_a)
    out_b = _train(model_b, opt_b, batches, sched_b)
    for pa, pb in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert opt_a.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**3)


def test_params_subset_limits_coverage():
    model, _ = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything given is covered: nothing to warn about
        opt = KFAC(model, params=[model[0].weight, model[2].weight, model[2].bias], graft=None)
    # layer 0's bias is not optimised at all, so layer 0 has no homogeneous column
    assert opt.uncovered_parameters == []
    assert [layer.name for layer in opt.estimator.layers] == ["0", "2"]
    assert not opt.estimator.layers[0].has_bias
    with pytest.raises(ValueError, match="does not belong to the model"):
        KFAC(model, params=[nn.Parameter(torch.zeros(3))], graft=None)


def test_uncovered_parameters_are_trained_and_reported():
    class WithFreeParam(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)
            self.scale = nn.Parameter(torch.ones(3))
            self.norm = nn.LayerNorm(3)

        def forward(self, x):
            return self.norm(self.fc(x) * self.scale)

    model = WithFreeParam()
    with pytest.warns(UserWarning, match="no curvature estimate for 1 parameter"):
        opt = KFAC(model, lr=0.1, curvature_every=1, inverse_every=1, graft=None)
    assert opt.uncovered_parameters == ["scale"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for n, p in model.named_parameters():
        assert not torch.equal(before[n], p), f"{n} was not updated"


# ---- errors ----------------------------------------------------------------------------
def test_passing_parameters_raises_type_error_naming_the_fix():
    model = mlp([4, 3])
    with pytest.raises(
        TypeError, match=r"KFAC\(model, \.\.\.\) rather than KFAC\(model.parameters"
    ):
        KFAC(model.parameters(), graft=None)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        KFAC(list(model.parameters()), graft=None)


def test_model_without_supported_layer_gives_a_message():
    model = nn.Sequential(nn.PReLU(), nn.Dropout())
    with pytest.raises(ValueError, match=r"found no layer it can precondition.*PReLU"):
        KFAC(model, graft=None)
    frozen = mlp([4, 3]).requires_grad_(False)
    frozen[0].bias.requires_grad_(True)
    with pytest.raises(ValueError, match=r"requires_grad is False"):
        KFAC(frozen, graft=None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr must be"),
        (dict(lr=float("nan")), "lr must be"),
        (dict(lr="0.1"), "lr must be a real number"),
        (dict(damping=0.0), "damping must be"),
        (dict(damping=-1e-3), "damping must be"),
        (dict(curvature_every=0), "curvature_every must be a positive int"),
        (dict(inverse_every=2.5), "inverse_every must be a positive int"),
        (dict(momentum=1.5), "momentum must be"),
        (dict(weight_decay=-1.0), "weight_decay must be"),
        (dict(kl_clip=0.0), "kl_clip must be"),
        (dict(factor_decay=1.0), r"factor_decay must be a number in \[0, 1\)"),
        (dict(inverse_method="svd"), "inverse_method must be one of"),
        (dict(damping_mode="other"), "damping_mode must be one of"),
        (dict(inverse_method="cholesky"), "damping_mode='factored'"),
        (dict(factor_dtype=torch.int64), "factor_dtype must be"),
        (dict(base="rmsprop"), "base must be one of"),
        (dict(base="adam", momentum=0.9), "momentum, dampening and nesterov apply to base='sgd'"),
        (dict(betas=(0.9, 0.99)), "betas and eps apply to base='adam'"),
        (dict(base="adam", betas=(0.9, 1.0)), r"betas\[1\] must be in \[0, 1\)"),
        (dict(nesterov=True, momentum=0.0), "nesterov needs momentum"),
        (dict(nonfinite="ignore"), "nonfinite must be one of"),
        (dict(skip_layers=["nosuch"]), "matches no module"),
        (dict(skip_layers=[3]), "skip_layers must hold"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, match):
    model = mlp([4, 5, 3])
    with pytest.raises((ValueError, TypeError), match=match):
        KFAC(model, **kwargs, graft=None)


def test_callable_schedules_are_checked_when_used():
    model = mlp([6, 3])
    opt = KFAC(
        model,
        damping=lambda step: 1e-3 if step < 1 else -1.0,
        curvature_every=1,
        inverse_every=1,
        graft=None,
    )
    x, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.raises(ValueError, match=r"damping\(1\) must be"):
        opt.step()
    with pytest.raises(ValueError, match=r"curvature_every\(0\) must be a positive int"):
        KFAC(model, curvature_every=lambda step: 0, graft=None)


# ---- non-finite gradients -------------------------------------------------------------
def test_nonfinite_gradient_skips_the_step_and_keeps_curvature_intact():
    model = mlp([6, 8, 3])
    opt = KFAC(model, lr=0.1, curvature_every=1, inverse_every=1, graft=None)
    batches = _batches(3)
    _train(model, opt, batches[:2])
    state = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]

    x, y = batches[2]
    opt.zero_grad()
    F.cross_entropy(model(x * float("inf")), y).backward()  # NaN/Inf everywhere
    with pytest.warns(RuntimeWarning, match="non-finite gradient, step skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    assert opt.steps == 2
    for before, p in zip(params, model.parameters(), strict=True):
        assert torch.equal(before, p)
    after = opt.state_dict()
    for name, entry in state["curvature"]["estimator"]["layers"].items():
        now = after["curvature"]["estimator"]["layers"][name]
        assert torch.equal(entry["a_factor"], now["a_factor"])
        assert torch.equal(entry["g_factor"], now["g_factor"])
    # training goes on normally afterwards
    _train(model, opt, batches[:1])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.steps == 3


def test_nonfinite_raise_mode_names_the_parameter():
    model = mlp([6, 3])
    opt = KFAC(model, nonfinite="raise", graft=None)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model[0].bias.grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"\['0.bias'\]"):
        opt.step()


def test_nonfinite_statistics_are_dropped_not_absorbed():
    model = mlp([6, 3])
    opt = KFAC(model, curvature_every=1, inverse_every=1, graft=None)
    est = opt.estimator
    layer = est.layers[0]
    stats = {
        layer.name: est.accumulate(layer, torch.full((2, 6), float("inf")), torch.ones(2, 3), None)
    }
    est.update(stats)
    assert est.factors(layer.name) is None
    assert est.nonfinite_updates == 1


# ---- state_dict ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(curvature_every=2, inverse_every=3),
        dict(curvature_every=1, inverse_every=4, damping_mode="factored"),
        dict(
            curvature_every=2, inverse_every=5, inverse_method="cholesky", damping_mode="factored"
        ),
        dict(
            curvature_every=1,
            inverse_every=3,
            base="adam",
            lr=1e-3,
            kl_clip=None,
            weight_decay=1e-3,
            decoupled_weight_decay=True,
        ),
    ],
)
@pytest.mark.parametrize("split", [4, 7])
def test_state_dict_round_trip_resumes_the_same_trajectory(kwargs, split):
    torch.manual_seed(0)
    model = small_cnn()
    reference = copy.deepcopy(model)
    kwargs = {"lr": 0.05, **kwargs}
    gen = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(6, 1, 8, 8, generator=gen), torch.randint(0, 10, (6,), generator=gen))
        for _ in range(11)
    ]

    straight = _train(reference, KFAC(reference, **kwargs, graft=None), batches)

    opt = KFAC(model, **kwargs, graft=None)
    _train(model, opt, batches[:split])
    saved = copy.deepcopy(opt.state_dict())
    model_state = copy.deepcopy(model.state_dict())

    torch.manual_seed(123)
    fresh_model = small_cnn()
    fresh_model.load_state_dict(model_state)
    fresh = KFAC(fresh_model, **kwargs, graft=None)
    fresh.load_state_dict(saved)
    resumed = _train(fresh_model, fresh, batches[split:])
    for a, b in zip(straight, resumed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_state_dict_from_another_model_is_rejected():
    model = mlp([6, 8, 3])
    opt = KFAC(model, curvature_every=1, graft=None)
    _train(model, opt, _batches(1))
    other = mlp([6, 9, 3])
    other_opt = KFAC(other, graft=None)
    with pytest.raises(ValueError):
        other_opt.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="no 'curvature' entry"):
        other_opt.load_state_dict(torch.optim.SGD(other.parameters(), lr=1).state_dict())


def test_is_a_torch_optimizer():
    model = mlp([6, 3])
    opt = KFAC(model, graft=None)
    assert isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt, CurvatureOptimizer)
    x, y = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_remove_hooks_stops_recording():
    model = mlp([6, 3])
    opt = KFAC(model, curvature_every=1, graft=None)
    opt.remove_hooks()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, opt, _batches(2))
    assert opt.estimator.factors("0") is None


def test_first_statistics_arriving_late_are_used_at_once():
    """If the first passes record nothing (eval mode), the inverse is computed right
    after the first update instead of waiting for the next scheduled refresh."""
    model = mlp([6, 5, 3])
    opt = KFAC(model, lr=0.1, curvature_every=1, inverse_every=100, graft=None)
    batches = _batches(3)
    model.eval()
    _train(model, opt, batches[:1])  # records nothing
    assert opt.estimator.factors("0") is None
    model.train()
    _train(model, opt, batches[1:2])
    assert opt.estimator._state["0"].inverse, "no inverse after the first update"
    assert opt.state_dict()["curvature"]["refreshes"] == 1


def _refresh_steps(opt, model, batches):
    """The steps at which ``opt``'s estimator refreshed, training on ``batches``."""
    steps, refresh = [], opt.estimator.refresh

    def spy(damping):
        steps.append(opt._step)
        return refresh(damping)

    opt.estimator.refresh = spy
    _train(model, opt, batches)
    return steps


@pytest.mark.parametrize(
    ("every", "warmup", "expected"),
    [
        ((10, 100), True, [0, 10, 20, 40, 80, 100, 200]),
        ((10, 100), False, [0, 100, 200]),
        ((1, 10), True, [0, 1, 2, 4, 8, 10, 20]),
        ((3, 40), True, [0, 3, 6, 12, 24, 40]),
    ],
)
def test_inverse_warmup_refreshes_at_the_power_of_two_multiples(every, warmup, expected):
    """``inverse_warmup`` adds refreshes at steps c, 2c, 4c, ... (c = ``curvature_every``)
    before step ``inverse_every``, and none after it."""
    curvature_every, inverse_every = every
    model = mlp([6, 5, 3])
    opt = KFAC(
        model,
        curvature_every=curvature_every,
        inverse_every=inverse_every,
        inverse_warmup=warmup,
    )
    n = expected[-1] + 1
    seen = _refresh_steps(opt, model, _batches(n))
    assert seen == expected


def test_inverse_warmup_resumes_where_it_stopped():
    """The warm-up depends on the step alone: a run resumed at step 15 refreshes at 20, 40
    and 80 as the uninterrupted run does."""
    torch.manual_seed(0)
    model = mlp([6, 5, 3])
    opt = KFAC(model, curvature_every=10, inverse_every=100)
    batches = _batches(101)
    _train(model, opt, batches[:15])
    state, weights = opt.state_dict(), copy.deepcopy(model.state_dict())
    resumed_model = mlp([6, 5, 3])
    resumed_model.load_state_dict(weights)
    resumed = KFAC(resumed_model, curvature_every=10, inverse_every=100)
    resumed.load_state_dict(state)
    assert _refresh_steps(resumed, resumed_model, batches[15:]) == [20, 40, 80, 100]


def test_inverse_warmup_is_checked_and_fixed_where_refreshes_are():
    model = mlp([6, 5, 3])
    with pytest.raises(TypeError, match="inverse_warmup must be a bool"):
        KFAC(model, inverse_warmup=1)
    from secondorder import MFAC, AdaFisher

    for cls in (MFAC, AdaFisher):  # refresh every step: the option would do nothing
        with pytest.raises(TypeError, match="inverse_warmup"):
            cls(mlp([6, 5, 3]), inverse_warmup=True)


def test_construction_warning_points_at_the_callers_line():
    model = nn.Sequential(nn.Linear(3, 3), nn.PReLU())
    with pytest.warns(UserWarning, match="no curvature estimate") as record:
        KFAC(model, graft=None)
    assert record[0].filename == __file__


def test_param_group_given_as_a_generator_is_not_exhausted():
    model = mlp([4, 3, 2])
    opt = KFAC(
        model,
        params=[
            {"params": model[0].parameters(), "lr": 0.1},
            {"params": (p for p in model[2].parameters())},
        ],
        graft=None,
    )
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    assert opt.param_groups[0]["lr"] == 0.1


# ---- keyword arguments the optimizers do not take -----------------------------------------
#: class -> (a misspelt keyword, the keyword meant, a valid value of it)
_MISSPELT = {
    "KFAC": ("dampng", "damping", 0.1),
    "EKFAC": ("scale_evry", "scale_every", 2),
    "TwoLevelKFAC": ("coarse_dampng", "coarse_damping", 1.0),
    "MFAC": ("ngrad", "ngrads", 4),
    "AdaFisher": ("dampng", "damping", 0.1),
    "AdaFisherW": ("weight_decy", "weight_decay", 0.01),
    "AdaHessian": ("hessian_evry", "hessian_every", 2),
}


@pytest.mark.parametrize("name", sorted(_MISSPELT))
def test_a_misspelt_keyword_names_the_class_called_and_the_closest_keyword(name):
    """Not the base class that finally receives the ``**kwargs`` (``CurvatureOptimizer``,
    or ``AdaFisher`` for AdaFisherW)."""
    import secondorder

    cls = getattr(secondorder, name)
    wrong, right, value = _MISSPELT[name]
    with pytest.raises(TypeError) as info:
        cls(mlp([4, 3]), lr=0.1, **{wrong: value})
    assert str(info.value) == (
        f"{name}.__init__() got an unexpected keyword argument '{wrong}'. Did you mean '{right}'?"
    )
    with pytest.raises(TypeError) as info:
        cls(mlp([4, 3]), zzzz=1)
    assert str(info.value) == f"{name}.__init__() got an unexpected keyword argument 'zzzz'"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls(mlp([4, 3]), lr=0.1, **{right: value})  # the keyword meant is taken


def test_the_checked_init_keeps_the_signature_and_forwarded_keywords():
    import inspect

    assert "damping" in inspect.signature(KFAC).parameters
    opt = KFAC(mlp([4, 3]), lr=0.1, weight_decay=0.5, nonfinite="raise", graft=None)  # via **kwargs
    assert opt.param_groups[0]["weight_decay"] == 0.5 and opt.nonfinite == "raise"
    with pytest.raises(TypeError, match=r"^CurvatureOptimizer\.__init__\(\) .* 'dampng'"):
        CurvatureOptimizer(mlp([4, 3]), dampng=0.1)


def test_a_subclass_may_take_keywords_of_its_own_from_its_kwargs():
    """Only an ``__init__`` without ``**kwargs`` checks: the one that would raise anyway."""

    class Mine(KFAC):
        def __init__(self, model, **kwargs):
            self.extra = kwargs.pop("extra")
            super().__init__(model, **kwargs)

    assert Mine(mlp([4, 3]), extra=1, lr=0.1).extra == 1
    with pytest.raises(TypeError) as info:
        Mine(mlp([4, 3]), extra=1, dampng=0.1)
    assert str(info.value) == (
        "Mine.__init__() got an unexpected keyword argument 'dampng'. Did you mean 'damping'?"
    )


def test_no_method_overrides_a_private_method_of_the_base_class():
    """Every method is a CurvatureOptimizer through its public hooks (config_class,
    build_estimator, the estimator protocol): no class under secondorder/estimators/
    redefines a ``_``-prefixed method of CurvatureOptimizer (Python's dunders aside)."""
    import secondorder.estimators as package

    private = {
        name
        for name, _ in inspect.getmembers(CurvatureOptimizer)
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
    }
    assert "_precondition" in private and "_skip_step" in private  # the check sees them
    offenders, seen = [], []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            seen.append(cls.__name__)
            offenders += [f"{cls.__qualname__}.{name}" for name in vars(cls) if name in private]
    assert {"KFAC", "AdaFisher", "AdaHessian", "MFAC"} <= set(seen)
    assert offenders == []
