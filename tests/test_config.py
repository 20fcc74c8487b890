"""One config dataclass per method: the single place a hyperparameter is declared.

The optimizers' keyword arguments, ``inspect.signature``, the hyperparameter section of
their docstrings and what the bench knows are generated from the config; these tests pin
that, the checks of ``add_param_group``, and that a new method is one estimator, one config
and a three-line subclass.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import secondorder as so
from secondorder.bench.optimizers import OPTIMIZERS
from secondorder.config import OptimizerConfig, config_fields, fixed_fields, hyperparameter
from secondorder.estimators.base import CurvatureEstimator

from .helpers import assert_close, mlp

CURVATURE = [
    so.KFAC,
    so.EKFAC,
    so.TwoLevelKFAC,
    so.MFAC,
    so.AdaFisher,
    so.AdaFisherW,
    so.AdaHessian,
    so.Shampoo,
    so.SOAP,
]


def _batch(seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    for t in range(steps):
        x, y = _batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward(create_graph=getattr(opt, "needs_hessian", False))
        opt.step()


@pytest.mark.parametrize("cls", CURVATURE, ids=lambda c: c.__name__)
def test_the_signature_and_the_docstring_are_the_configs(cls):
    fields = [f.name for f in config_fields(cls.config_class)]
    params = list(inspect.signature(cls).parameters)
    assert params[:2] == ["model", "lr"]
    assert params[2:4] == ["params", "config"]
    assert sorted([*params[4:], "lr"]) == sorted(fields)
    for f in config_fields(cls.config_class):
        default = inspect.signature(cls).parameters[f.name].default
        assert default == f.default or (f.name == "lr" and default == f.default)
        assert f"        {f.name} (default: {f.default!r})" in cls.__doc__
        assert f.metadata.get("doc"), f"{cls.config_class.__name__}.{f.name} is undocumented"
    for name in fixed_fields(cls.config_class):
        assert name not in params


@pytest.mark.parametrize("cls", CURVATURE, ids=lambda c: c.__name__)
def test_a_config_and_keywords_build_the_same_optimizer(cls):
    """``cls(model, config=cfg, **kw)`` = ``cls(model, **fields of cfg, **kw)``, exactly."""
    torch.manual_seed(0)
    model_a = mlp([4, 6, 3])
    model_b = mlp([4, 6, 3])
    model_b.load_state_dict(model_a.state_dict())
    fields = {f.name for f in config_fields(cls.config_class)}
    candidates = {"lr": 0.05, "damping": 0.02, "curvature_every": 1, "hessian_every": 2}
    keywords = {k: v for k, v in candidates.items() if k in fields}
    config = cls.config_class(**keywords)
    opt_a = cls(model_a, **keywords, weight_decay=0.01)
    opt_b = cls(model_b, config=config, weight_decay=0.01)
    assert opt_b.config == opt_a.config
    assert opt_b.config is not config and config.weight_decay == 0.0  # not mutated
    _train(model_a, opt_a)
    _train(model_b, opt_b)
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)  # the same code path, run twice


def test_a_config_of_another_method_is_refused():
    with pytest.raises(TypeError, match="config must be a KFACConfig, got MFACConfig"):
        so.KFAC(mlp([4, 3]), config=so.MFACConfig(), graft=None)


@pytest.mark.parametrize(
    ("cls", "keyword", "match"),
    [
        (so.MFAC, "inverse_every", "MFAC sets it itself"),
        (so.AdaFisher, "kl_clip", "AdaFisher sets it itself"),
        (so.AdaFisher, "momentum", "AdaFisher sets it itself"),
        (so.AdaFisherW, "decoupled_weight_decay", "AdaFisherW sets it itself"),
        (so.KFAC, "factor_decy", "Did you mean 'factor_decay'"),
        (so.TwoLevelKFAC, "w3", r"TwoLevelKFAC\.__init__\(\) got an unexpected keyword"),
    ],
)
def test_keywords_a_method_does_not_take_raise_type_error(cls, keyword, match):
    with pytest.raises(TypeError, match=match):
        cls(mlp([4, 3]), **{keyword: 1})


def test_the_mfac_docstring_no_longer_offers_inverse_every():
    assert "inverse_every (default" not in so.MFAC.__doc__


def test_a_model_without_trainable_parameters_gets_the_documented_message():
    frozen = mlp([4, 3]).requires_grad_(False)
    for model in (nn.ReLU(), frozen):
        with pytest.raises(ValueError, match="no parameter that requires grad"):
            so.KFAC(model, graft=None)


# ---- add_param_group -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "group", "match"),
    [
        (so.KFAC, {"lr": -5.0}, "lr must be"),
        (so.KFAC, {"momentum": 7.0}, "momentum must be"),
        (so.KFAC, {"nesterov": True, "momentum": 0.0}, "nesterov needs momentum"),
        (so.MFAC, {"weight_decay": -1.0}, "weight_decay must be"),
        (so.AdaFisher, {"beta": 1.0}, "beta must be"),
    ],
)
def test_add_param_group_checks_like_the_constructor(cls, group, match):
    model = mlp([4, 3])
    extra = nn.Parameter(torch.zeros(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls(model)
    before = len(opt.param_groups)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [extra], **group})
    assert len(opt.param_groups) == before  # a refused group is not kept


def test_a_group_added_later_is_reported_uncovered_and_trained_by_the_base():
    torch.manual_seed(0)
    model = mlp([4, 3])
    scale = nn.Parameter(torch.ones(3))
    opt = so.KFAC(model, lr=0.1, curvature_every=1, inverse_every=1, graft=None)
    assert opt.uncovered_parameters == []
    opt.add_param_group({"params": [scale], "lr": 0.5, "momentum": 0.0})
    assert opt.uncovered_parameters == ["param[2]"]
    x, y = _batch()
    opt.zero_grad()
    F.cross_entropy(model(x) * scale, y).backward()
    want = scale.detach() - 0.5 * scale.grad
    opt.step()
    assert torch.equal(scale.detach(), want)  # SGD on the raw gradient, lr of its group


# ---- the bench and the presets read the configs ------------------------------------------
def test_every_preset_sets_only_hyperparameters_its_optimizer_takes():
    from pathlib import Path

    from secondorder.bench.config import load_preset

    presets = sorted((Path(__file__).parents[1] / "configs" / "optimizers").glob("*.yaml"))
    assert presets
    for path in presets:
        preset = load_preset(path)  # raises on a key the optimizer does not take
        assert set(preset.hparams) <= set(OPTIMIZERS[preset.optimizer].hyperparameter_names())


def test_a_preset_with_a_key_the_config_lacks_is_refused(tmp_path):
    from secondorder.bench.config import ConfigError, load_preset

    path = tmp_path / "bad.yaml"
    path.write_text("optimizer: kfac\nsource: test\nhparams:\n  lr: 0.1\n  ngrads: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key hparams\.'ngrads'"):
        load_preset(path)


def test_the_bench_lists_the_config_fields():
    assert OPTIMIZERS["kfac"].config_class is so.KFACConfig
    assert OPTIMIZERS["sgd"].config_class is None
    assert "factor_decay" in OPTIMIZERS["kfac"].hyperparameter_names()
    assert "momentum" in OPTIMIZERS["sgd"].hyperparameter_names()
    assert "inverse_every" not in OPTIMIZERS["mfac"].hyperparameter_names()


# ---- a new method: one estimator, one config, one subclass ---------------------------------
@dataclasses.dataclass(kw_only=True)
class RMSConfig(OptimizerConfig):
    """A toy method: the gradient divided by the root of an EMA of its square."""

    decay: float = hyperparameter(0.9, "EMA decay of the squared gradient, in [0, 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay!r}")


class RMSEstimator(CurvatureEstimator):
    requires_capture = False

    def __init__(self, params: list[nn.Parameter], config: RMSConfig) -> None:
        super().__init__([])
        self._params, self.config = params, config
        self.square = {p: torch.zeros_like(p) for p in params}

    @property
    def params(self) -> list[nn.Parameter]:
        return self._params

    def update(self, stats: Mapping[Tensor, Tensor]) -> None:
        for p, g in stats.items():
            self.square[p].mul_(self.config.decay).addcmul_(g, g, value=1 - self.config.decay)

    def refresh(self, damping: float) -> None:
        pass

    def precondition(self, grads: Mapping[Tensor, Tensor], damping: float) -> dict[Tensor, Tensor]:
        return {p: g / (self.square[p].sqrt() + damping) for p, g in grads.items()}

    def state_dict(self) -> dict:
        return {"square": [self.square[p] for p in self._params]}

    def load_state_dict(self, state: Mapping) -> None:
        self.square = dict(zip(self._params, state["square"], strict=True))


class RMS(so.CurvatureOptimizer):
    """A toy second-moment method, written as a new method would be."""

    config_class = RMSConfig
    requires_model = False

    def build_estimator(self, layers, params):
        return RMSEstimator(params, self.config)


def test_a_new_method_is_an_estimator_a_config_and_a_three_line_subclass():
    torch.manual_seed(0)
    model = mlp([4, 3], bias=False)
    opt = RMS(model.parameters(), lr=0.1, decay=0.5, damping=1e-8)
    assert "decay" in inspect.signature(RMS).parameters
    assert "decay (default: 0.9): EMA decay" in RMS.__doc__
    with pytest.raises(ValueError, match="decay must be"):
        RMS(model.parameters(), decay=1.5)
    with pytest.raises(TypeError, match="Did you mean 'decay'"):
        RMS(model.parameters(), decy=0.5)
    (weight,) = model.parameters()
    x, y = _batch()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = weight.grad.double()
    w0 = weight.detach().double().clone()
    opt.step()
    want = w0 - 0.1 * g / ((0.5 * g * g).sqrt() + 1e-8)
    assert_close(weight.detach(), want, dtype=torch.float32, n=6)
