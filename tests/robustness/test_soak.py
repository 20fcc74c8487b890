"""Soak: every optimizer for many steps with a damping near zero and a NaN gradient injected
every 97th step.

The number of steps is ``SECONDORDER_SOAK_STEPS`` (default 200, the short form the default
test run and CI use, about 3 s for all seven optimizers on a 2-core CPU). The full soak::

    SECONDORDER_SOAK_STEPS=2000 python -m pytest -m soak tests/robustness

Damping 1e-8 (AdaHessian: ``eps=1e-8``). AdaFisher runs without its L2 weight decay here:
with ``F̃ ≈ λ`` on its weakest coordinates, coupled decay multiplies those weights by
``1 − lr·κ/λ`` (−499 with the bench's κ = 5e-4) every step, so the weights grow by the
formula itself until they overflow; AdaFisherW's decoupled decay keeps its κ.
"""

from __future__ import annotations

import copy
import io
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from ._common import (
    ALL,
    CLASSES,
    IN_SHAPE,
    all_finite,
    assert_same,
    backward,
    make_optimizer,
    params_of,
    tensors_in,
    tiny_model,
    train_step,
)

STEPS = int(os.environ.get("SECONDORDER_SOAK_STEPS", "200"))
INJECT_EVERY = 97
TINY = 1e-8


def _settings(name: str) -> dict:
    if name == "adahessian":
        return {"eps": TINY}
    if name == "adafisher":
        return {"damping": TINY, "weight_decay": 0.0}
    if name == "soap":  # no damping: Adam's ε in the rotated space
        return {"soap_eps": TINY}
    return {"damping": TINY}


@pytest.mark.soak
@pytest.mark.parametrize("name", ALL)
def test_soak(name):
    gen = torch.Generator().manual_seed(0)
    x_all = torch.randn(64, *IN_SHAPE, generator=gen)
    y_all = torch.randint(0, CLASSES, (64,), generator=gen)
    model = tiny_model()
    opt = make_optimizer(name, model, **_settings(name))
    injected = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for step in range(STEPS):
            idx = torch.randint(0, 64, (16,), generator=gen)
            opt.zero_grad()
            backward(opt, F.cross_entropy(model(x_all[idx]), y_all[idx]))
            if step % INJECT_EVERY == INJECT_EVERY - 1:
                with torch.no_grad():
                    model[3].weight.grad.view(-1)[step % 7] = float("nan")
                injected += 1
            opt.step()
    skipped_warnings = [w for w in caught if "step skipped" in str(w.message)]

    assert injected == STEPS // INJECT_EVERY
    assert all_finite(model), "a parameter became NaN/Inf"
    assert opt.skipped_steps == injected, "a step was skipped that had no injected NaN"
    assert len(skipped_warnings) == injected
    assert opt.steps == STEPS - injected
    state = opt.state_dict()
    for t in tensors_in(state):
        if t.is_floating_point():
            assert torch.isfinite(t).all(), "the optimizer state holds a NaN/Inf"

    # the state survives a save/load round trip into a fresh optimizer, which continues
    # exactly as the original does
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": state}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    fresh_model = tiny_model(seed=1)
    fresh_model.load_state_dict(checkpoint["model"])
    fresh = make_optimizer(name, fresh_model, **_settings(name))
    fresh.load_state_dict(checkpoint["opt"])
    assert_same(copy.deepcopy(opt.state_dict()), fresh.state_dict())
    batch = (x_all[:16], y_all[:16])
    train_step(model, opt, batch)
    train_step(fresh_model, fresh, batch)
    assert_same(params_of(model), params_of(fresh_model))
