"""Tiny models, optimizers and training loops shared by the robustness tests.

Importable by a fresh interpreter (``python -c "from tests.robustness._common import ..."``
from the repository root), so the checkpoint test can rebuild the same model and optimizer
in another process.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import secondorder as so

from ..helpers import assert_close

IN_SHAPE = (1, 4, 4)
CLASSES = 3
#: rows a statistic of tiny_model sums per step and batch example: the convolution's 16
#: output positions (the Linear layers have one row per example)
ROWS_PER_EXAMPLE = 16


def tiny_model(width: int = 10, depth: int = 1, seed: int = 0) -> nn.Sequential:
    """Conv2d -> Linear -> LayerNorm -> (Linear)* -> Linear on ``(n, 1, 4, 4)`` inputs:
    a convolution, Linear layers and a normalisation layer ("blocks" helper) in 400 or so
    parameters. ``width`` changes layer shapes, ``depth`` the number of hidden Linear layers."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [
        nn.Conv2d(1, 2, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 16, width),
        nn.LayerNorm(width),
        nn.Tanh(),
    ]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, CLASSES))
    return nn.Sequential(*layers)


def batches(n: int, batch: int = 8, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    """``n`` fixed mini-batches (a seeded generator: the same in every process)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, *IN_SHAPE, generator=gen),
            torch.randint(0, CLASSES, (batch,), generator=gen),
        )
        for _ in range(n)
    ]


# Hyperparameters for these tiny models, after the bench registry's (secondorder/bench/
# optimizers.py), with short intervals so that a few steps see updates, refreshes and the
# steps between them.
_KFAC_LIKE = {"lr": 0.05, "damping": 0.1, "curvature_every": 1, "inverse_every": 3}
SPECS: dict[str, tuple[Callable[..., torch.optim.Optimizer], dict[str, Any]]] = {
    "kfac": (so.KFAC, dict(_KFAC_LIKE)),
    "ekfac": (so.EKFAC, {**_KFAC_LIKE, "scale_every": 1}),
    "twolevel": (so.TwoLevelKFAC, {**_KFAC_LIKE, "coarse_damping": 1.0}),
    "mfac": (so.MFAC, {"lr": 0.02, "base": "sgd", "momentum": 0.9, "ngrads": 8, "damping": 0.05}),
    "adafisher": (so.AdaFisher, {"lr": 0.01, "curvature_every": 2, "weight_decay": 5e-4}),
    "adafisherw": (so.AdaFisherW, {"lr": 0.01, "curvature_every": 2, "weight_decay": 5e-4}),
    "adahessian": (so.AdaHessian, {"lr": 0.05, "hessian_every": 2}),
    "shampoo": (so.Shampoo, {"lr": 1e-2, "damping": 1e-4, "inverse_every": 3}),
    "soap": (so.SOAP, {"lr": 1e-2, "inverse_every": 3}),
}
ALL = list(SPECS)
#: optimizers whose statistics come from capture hooks on the model's layers
HOOKED = ["kfac", "ekfac", "twolevel", "adafisher", "adafisherw"]
#: K-FAC and its variants (Kronecker factors, ``damping`` is the Tikhonov term)
KFAC_FAMILY = ["kfac", "ekfac", "twolevel"]
#: extra base-update variants for the checkpoint test (Adam moments in the state)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "kfac-adam": ("kfac", {"base": "adam", "lr": 1e-2, "kl_clip": None}),
    "mfac-adam": ("mfac", {"base": "adam", "lr": 3e-3, "momentum": None}),
}


def make_optimizer(name: str, model: nn.Module, **overrides: Any) -> torch.optim.Optimizer:
    """Optimizer ``name`` (a key of :data:`SPECS` or :data:`VARIANTS`) for ``model``;
    ``overrides`` replace the defaults (a value of None removes the key)."""
    if name in VARIANTS:
        base_name, extra = VARIANTS[name]
        overrides = {**extra, **overrides}
        name = base_name
    cls, defaults = SPECS[name]
    kwargs = {k: v for k, v in {**defaults, **overrides}.items() if v is not None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no curvature estimate for ..." is expected
        return cls(model, **kwargs)


def needs_graph(opt: torch.optim.Optimizer) -> bool:
    return bool(getattr(opt, "needs_hessian", False))


def backward(opt: torch.optim.Optimizer, loss: Tensor) -> None:
    """``loss.backward()``, keeping the graph when AdaHessian's next step needs it."""
    with warnings.catch_warnings():
        # AdaHessian's documented reference cycle (its step() breaks it)
        warnings.filterwarnings("ignore", "Using backward\\(\\) with create_graph=True")
        loss.backward(create_graph=needs_graph(opt))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[Tensor, Tensor]) -> None:
    x, y = batch
    opt.zero_grad()
    backward(opt, F.cross_entropy(model(x), y))
    opt.step()


def train(
    model: nn.Module, opt: torch.optim.Optimizer, data: Iterable[tuple[Tensor, Tensor]]
) -> None:
    for batch in data:
        train_step(model, opt, batch)


def params_of(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def curvature_state(opt: torch.optim.Optimizer) -> Any:
    """What the optimizer keeps beyond the per-parameter base state: the estimator's state
    (AdaHessian's probe generator; its Hessian estimate is per-parameter state)."""
    return opt.state_dict()["curvature"]["estimator"]


def updates_of(opt: torch.optim.Optimizer) -> int:
    """Number of curvature updates so far (hooked optimizers)."""
    return int(opt.state_dict()["curvature"]["updates"])


def tensors_in(obj: Any) -> Iterable[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value)


def assert_close_runs(
    actual: Iterable[Tensor],
    expected: Iterable[Tensor],
    start: Iterable[Tensor],
    *,
    dtype: torch.dtype,
    n: int,
) -> None:
    """Parameters of two training runs from ``start`` that reach the same mathematics by
    different code paths (a compiled model, a scaled loss, data-parallel ranks): the rule of
    tests/helpers.py applied to the update of the run, ``expected − start``, the size of
    which the round-off of the steps is relative to (not that of the weights).

    ``n`` counts the roundings accumulating into an entry of the statistics and gradients
    over the run: steps x the rows a statistic sums per step. cond is 1: a damped inverse
    multiplies an error by up to its condition number only when the error lies along its
    smallest eigenvectors, which rounding errors do not favour; the margin of the worst case
    ``n·eps`` of an n-term sum over what rounding reaches (about √n times) covers that,
    where a cond factor on top would leave a tolerance of the order of the update itself,
    blind to a step taken without its statistics.
    """
    actual, expected, start = list(actual), list(expected), list(start)
    pairs = list(zip(expected, start, strict=True))
    scale = max(float((e.double() - s.double()).abs().max()) for e, s in pairs)
    for i, (a, e, s) in enumerate(zip(actual, expected, start, strict=True)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"parameter {i}"
        a_step, e_step = a.double() - s.double(), e.double() - s.double()
        assert_close(a_step, e_step, dtype=dtype, n=n, scale=scale)


def assert_same(a: Any, b: Any, path: str = "state") -> None:
    """Deep equality of nested state, for the same code path run twice on the same inputs
    (a resumed run and an uninterrupted one): tensors bit for bit (same dtype and shape),
    the rest with ``==`` (floats: NaN equals NaN)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        assert isinstance(a, Tensor) and isinstance(b, Tensor), f"{path}: {type(a)} vs {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)}"
        assert torch.equal(a, b) or (
            a.is_floating_point()
            and torch.equal(a.isnan(), b.isnan())
            and bool((a == b)[~a.isnan()].all())
        ), f"{path}: tensors differ (max |diff| {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        assert math.isnan(b), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"
