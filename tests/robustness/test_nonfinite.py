"""Non-finite values: a NaN/Inf gradient skips the step (``nonfinite="skip"``, the default)
as if it had never been attempted, or raises ``FloatingPointError`` (``"raise"``); a NaN/Inf
that reaches only the curvature *statistics* is dropped by the estimator (counted in
``estimator.nonfinite_updates``) and never enters the curvature state.

M-FAC has no statistics of its own (its curvature is the window of gradients, which the
optimizer has checked before they enter it); AdaHessian's statistic is the Hessian estimate,
and a non-finite estimate skips the step as a non-finite gradient does (its documented rule).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from ._common import (
    ALL,
    HOOKED,
    all_finite,
    assert_same,
    backward,
    batches,
    make_optimizer,
    params_of,
    tensors_in,
    tiny_model,
    train,
)

BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _without_skip_count(state: dict) -> dict:
    state = copy.deepcopy(state)
    state["curvature"]["skipped_steps"] = None
    return state


def _bad_step(model, opt, batch, value: float) -> None:
    """A forward and backward pass (recorded by the hooks), then one bad gradient entry."""
    x, y = batch
    opt.zero_grad()
    backward(opt, F.cross_entropy(model(x), y))
    with torch.no_grad():
        model[3].weight.grad[0, 0] = value


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("name", ALL)
def test_nonfinite_gradient_skips_the_step_as_if_it_never_happened(name, bad):
    data = batches(8)
    model = tiny_model()
    opt = make_optimizer(name, model)
    train(model, opt, data[:4])
    before, params, steps = copy.deepcopy(opt.state_dict()), params_of(model), opt.steps

    _bad_step(model, opt, data[4], BAD[bad])
    with pytest.warns(RuntimeWarning, match=r"non-finite gradient.*step skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    assert opt.steps == steps
    for a, b in zip(params, model.parameters(), strict=True):
        assert torch.equal(a, b)
    # parameters, base state, curvature (and AdaHessian's probe generator) untouched
    assert_same(_without_skip_count(before), _without_skip_count(opt.state_dict()))
    assert opt.state_dict()["curvature"]["skipped_steps"] == 1

    # ... and what was recorded during the bad pass is dropped: the run goes on exactly as
    # a run that never saw that batch
    train(model, opt, data[5:])
    reference = tiny_model()
    reference_opt = make_optimizer(name, reference)
    train(reference, reference_opt, data[:4] + data[5:])
    for a, b in zip(params_of(reference), model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("name", ALL)
def test_nonfinite_gradient_raises_naming_the_parameter(name, bad):
    data = batches(3)
    model = tiny_model()
    opt = make_optimizer(name, model, nonfinite="raise")
    train(model, opt, data[:2])
    before, params = copy.deepcopy(opt.state_dict()), params_of(model)
    _bad_step(model, opt, data[2], BAD[bad])
    with pytest.raises(FloatingPointError, match=r"non-finite .* in \['3\.weight'\]"):
        opt.step()
    assert opt.skipped_steps == 0
    for a, b in zip(params, model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert_same(before, opt.state_dict())


# ---- non-finite statistics, finite gradients ---------------------------------------------
def _layer_state(opt, layer: str) -> dict:
    """Everything the estimator keeps for one layer (factors or diagonals, E-KFAC's
    scalings), from its state dict."""
    state = opt.state_dict()["curvature"]["estimator"]
    return {
        "layer": state["layers"].get(layer),
        "scalings": state.get("scalings", {}).get(layer),
    }


def _check_dropped(opt, model, poisoned: str, healthy: str, step, keys=("layer", "scalings")):
    """Run ``step()`` and check that ``poisoned``'s statistics (its ``keys`` in
    :func:`_layer_state`) were dropped and counted while ``healthy`` was updated, with the
    step itself taken."""
    est = opt.estimator
    dropped, steps = est.nonfinite_updates, opt.steps
    poisoned_before = {k: copy.deepcopy(_layer_state(opt, poisoned)[k]) for k in keys}
    healthy_before = copy.deepcopy(_layer_state(opt, healthy))
    params = params_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # not a skipped step
        step()
    assert opt.skipped_steps == 0 and opt.steps == steps + 1
    assert est.nonfinite_updates > dropped
    assert_same(poisoned_before, {k: _layer_state(opt, poisoned)[k] for k in keys})
    with pytest.raises(AssertionError):
        assert_same(healthy_before, _layer_state(opt, healthy))
    assert any(not torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert all_finite(model)
    state = opt.state_dict()["curvature"]["estimator"]
    assert all(bool(torch.isfinite(t).all()) for t in tensors_in(state) if t.is_floating_point())


@pytest.mark.parametrize("name", HOOKED)
def test_overflowing_input_statistics_with_finite_gradients_are_dropped(name):
    """Inputs of 1e20 at one pixel: the convolution's ``mean ã ãᵀ`` (or ``mean ã²``)
    overflows float32, while its gradient stays finite (the tanh after it saturates, so
    those positions carry a zero output gradient). E-KFAC's scalings of that layer are
    updated: they come from the per-example gradients, which are finite and exact."""
    data = batches(6)
    model = tiny_model()
    opt = make_optimizer(name, model, curvature_every=1)
    train(model, opt, data[:4])  # step 4 is an update step and not a refresh (every 3)
    x, y = data[4]
    x = x.clone()
    x[:, :, 0, 0] = 1e20
    opt.zero_grad()
    backward(opt, F.cross_entropy(model(x), y))
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    _check_dropped(opt, model, poisoned="0", healthy="6", step=opt.step, keys=("layer",))
    train(model, opt, data[5:])
    assert all_finite(model)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", HOOKED)
def test_nan_in_a_captured_statistic_is_dropped(name, value, monkeypatch):
    """The input a layer's hook hands to the estimator gets a NaN/Inf that the forward pass
    never saw (the estimator's ``accumulate`` is wrapped before the optimizer binds it)."""
    estimator_class = type(make_optimizer(name, tiny_model()).estimator)
    original = estimator_class.accumulate
    poison = {"on": False}

    def accumulate(self, layer, inputs, grad_output, acc):
        if poison["on"] and layer.name == "3":
            inputs = inputs.clone()
            inputs.view(-1)[0] = value
        return original(self, layer, inputs, grad_output, acc)

    monkeypatch.setattr(estimator_class, "accumulate", accumulate)
    data = batches(6)
    model = tiny_model()
    opt = make_optimizer(name, model, curvature_every=1)
    train(model, opt, data[:4])
    poison["on"] = True
    x, y = data[4]
    opt.zero_grad()
    backward(opt, F.cross_entropy(model(x), y))
    poison["on"] = False
    _check_dropped(opt, model, poisoned="3", healthy="6", step=opt.step)


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_adahessian_nonfinite_hessian_estimate_skips_or_raises(mode):
    data = batches(4)
    model = tiny_model()
    opt = make_optimizer("adahessian", model, nonfinite=mode)
    train(model, opt, data[:2])
    before, params = copy.deepcopy(opt.state_dict()), params_of(model)
    x, y = data[2]
    opt.zero_grad()
    backward(opt, F.cross_entropy(model(x), y))
    diag = torch.ones_like(model[3].weight)
    diag[1, 2] = float("nan")
    opt.set_hessian_diagonal({model[3].weight: diag})
    if mode == "raise":
        with pytest.raises(FloatingPointError, match=r"Hessian estimate .* in \['3\.weight'\]"):
            opt.step()
    else:
        with pytest.warns(RuntimeWarning, match="non-finite gradient or Hessian estimate"):
            opt.step()
    assert opt.skipped_steps == (mode == "skip")
    for a, b in zip(params, model.parameters(), strict=True):
        assert torch.equal(a, b)
    after = _without_skip_count(opt.state_dict())
    # a skipped step keeps the given diagonals for the next step (documented)
    assert list(after["curvature"]["estimator"].pop("given")) == [2]
    before["curvature"]["estimator"].pop("given")
    assert_same(_without_skip_count(before), after)
