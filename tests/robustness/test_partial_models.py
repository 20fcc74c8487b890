"""Layers without a gradient in a step (an unused head, a frozen layer) and models switched
between train and eval mode.

* A head that takes no part in a step (its ``.grad`` stays None) keeps its parameters, its
  base state and its curvature exactly; with ``zero_grad(set_to_none=False)`` (a zero
  gradient) and zero momentum the block-diagonal methods leave it in place as well. The
  methods that couple layers (M-FAC's full window, two-level K-FAC's coarse correction)
  do move a layer whose gradient is zero but present: that is ``F⁻¹g`` with a non
  block-diagonal ``F``, so that case is not asserted for them.
* A frozen layer (``requires_grad=False`` before construction) is left out and never moves.
* Eval-mode forward + backward passes record nothing unless ``record_in_eval=True``; with it
  (and no mode-dependent layers) alternating train/eval steps are the all-train run.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ._common import (
    ALL,
    HOOKED,
    all_finite,
    assert_same,
    backward,
    batches,
    make_optimizer,
    params_of,
    tiny_model,
    train,
    updates_of,
)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh())
        self.head_a = nn.Linear(8, 3)
        self.head_b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, head: str = "a") -> torch.Tensor:
        h = self.trunk(x)
        return self.head_a(h) if head == "a" else self.head_b(h)


# Statistics and refreshes at every step (a refresh recomputes the inverses of every layer
# from its factors, so the state of a layer without new statistics stays the same);
# AdaHessian estimates the Hessian at every step, since a head's first gradient may arrive
# at any step and needs the graph then (its documented rule).
_EVERY_STEP = {
    **{name: {"curvature_every": 1, "inverse_every": 1} for name in ("kfac", "ekfac", "twolevel")},
    **{name: {"curvature_every": 1} for name in ("adafisher", "adafisherw")},
    "adahessian": {"hessian_every": 1},
}


def _step(model, opt, batch, head: str, set_to_none: bool = True) -> None:
    x, y = batch
    opt.zero_grad(set_to_none=set_to_none)
    backward(opt, F.cross_entropy(model(x, head), y))
    opt.step()


def _head_state(opt, model: TwoHeads) -> dict:
    """Everything the optimizer keeps about head_b: its parameters' base state and, for
    the estimators that keep per-layer curvature, that layer's (and its coarse row)."""
    ids = [id(p) for p in model.parameters()]
    head = [ids.index(id(p)) for p in model.head_b.parameters()]
    state = copy.deepcopy(opt.state_dict())
    out: dict = {"base": {i: state["state"].get(i) for i in head}}
    curvature = state.get("curvature", {}).get("estimator") or {}
    if "layers" in curvature:  # K-FAC family, AdaFisher
        out["layer"] = curvature["layers"].get("head_b")
        out["scalings"] = curvature.get("scalings", {}).get("head_b")
    coarse = curvature.get("coarse")
    if coarse is not None and coarse["matrix"] is not None:
        i = coarse["layers"].index("head_b")
        out["coarse"] = (coarse["matrix"][i], coarse["matrix"][:, i], coarse["updates"][i])
    return out


@pytest.mark.parametrize("name", ALL)
def test_an_unused_head_keeps_its_parameters_and_curvature(name):
    model = TwoHeads()
    opt = make_optimizer(name, model, **_EVERY_STEP.get(name, {}))
    data = batches(8)
    for i in range(3):
        _step(model, opt, data[i], "ab"[i % 2])  # both heads have state now
    for i in range(3, 8):  # head_a only: head_b.grad stays None
        before, head_b = _head_state(opt, model), params_of(model.head_b)
        trunk = params_of(model.trunk)
        _step(model, opt, data[i], "a")
        assert model.head_b.weight.grad is None
        assert_same(head_b, params_of(model.head_b))
        assert_same(before, _head_state(opt, model))
        assert any(
            not torch.equal(a, b) for a, b in zip(trunk, model.trunk.parameters(), strict=True)
        )
    assert opt.skipped_steps == 0 and all_finite(model)


@pytest.mark.parametrize("name", ["kfac", "ekfac", "adafisher", "adafisherw", "adahessian"])
def test_a_zero_gradient_with_zero_momentum_leaves_a_head_in_place(name):
    zero_momentum = {
        "adafisher": {"beta": 0.0, "weight_decay": 0.0},
        "adafisherw": {"beta": 0.0, "weight_decay": 0.0},
        "adahessian": {"betas": (0.0, 0.999)},
        # the Adam graft's first moment is the momentum (and what K-FAC preconditions)
    }.get(name, {"momentum": 0.0, "graft_betas": (0.0, 0.999)})
    model = TwoHeads()
    opt = make_optimizer(name, model, **zero_momentum, **_EVERY_STEP.get(name, {}))
    data = batches(6)
    for i in range(2):
        _step(model, opt, data[i], "ab"[i % 2], set_to_none=False)
    for i in range(2, 6):
        head_b = params_of(model.head_b)
        _step(model, opt, data[i], "a", set_to_none=False)
        assert torch.count_nonzero(model.head_b.weight.grad) == 0
        assert_same(head_b, params_of(model.head_b))
    assert all_finite(model)


@pytest.mark.parametrize("name", ALL)
def test_a_frozen_layer_is_left_out_and_never_moves(name):
    model = tiny_model()
    for p in model[3].parameters():
        p.requires_grad_(False)
    opt = make_optimizer(name, model)
    frozen = params_of(model[3])
    others = params_of(model[6])
    train(model, opt, batches(5))
    assert_same(frozen, params_of(model[3]))
    assert any(not torch.equal(a, b) for a, b in zip(others, model[6].parameters(), strict=True))
    assert all(p.grad is None for p in model[3].parameters())
    if name in HOOKED:
        assert "3" not in [layer.name for layer in opt.estimator.layers]
        assert any(line.startswith("3:") for line in opt.left_out_layers)
    assert opt.skipped_steps == 0 and all_finite(model)


# ---- train / eval ------------------------------------------------------------------------
@pytest.mark.parametrize("record_in_eval", [False, True])
@pytest.mark.parametrize("name", HOOKED)
def test_an_eval_mode_backward_records_nothing_unless_asked(name, record_in_eval):
    model = tiny_model()
    opt = make_optimizer(name, model, curvature_every=1, record_in_eval=record_in_eval)
    data = batches(4)
    train(model, opt, data[:2])
    curvature = copy.deepcopy(opt.state_dict()["curvature"])
    params = params_of(model)
    model.eval()
    train(model, opt, data[2:3])
    model.train()
    after = opt.state_dict()["curvature"]
    assert opt.steps == 3
    assert any(
        not torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True)
    )  # a step
    if record_in_eval:
        assert after["updates"] == curvature["updates"] + 1
        with pytest.raises(AssertionError):
            assert_same(curvature["estimator"]["layers"], after["estimator"]["layers"])
    else:
        assert after["updates"] == curvature["updates"]
        assert_same(curvature["estimator"]["layers"], after["estimator"]["layers"])


@pytest.mark.parametrize("name", ALL)
def test_alternating_train_and_eval_steps(name):
    """No mode-dependent layer in the model: with ``record_in_eval=True`` (or no hooks at
    all) alternating modes is the all-train run bit for bit; without it the eval steps add
    no statistics."""
    data = batches(6)
    hooked = name in HOOKED
    extra = {"curvature_every": 1, "record_in_eval": True} if hooked else {}

    def run(alternate: bool, **kwargs) -> tuple:
        model = tiny_model()
        opt = make_optimizer(name, model, **kwargs)
        for i, batch in enumerate(data):
            model.train(not (alternate and i % 2))
            train(model, opt, [batch])
        return params_of(model), opt

    straight, _ = run(False, **extra)
    alternating, _ = run(True, **extra)
    assert_same(straight, alternating)
    if hooked:
        _, opt = run(True, curvature_every=1)
        assert updates_of(opt) == 3  # the train-mode steps only
        assert opt.steps == 6
