"""Covered layers whose forward hooks never run.

``F.multi_head_attention_forward`` multiplies by ``out_proj.weight`` without calling
``out_proj``, and a model may use any layer's weight through ``F.linear``: such a layer
gets a gradient but no statistics. At the first curvature step the optimizer moves it to
the base update, names it in one warning and keeps the list in its state. The optimizer
then runs as if the layer had been in ``skip_layers`` from the start: same trajectory, bit
for bit (the same code path), for every optimizer that records statistics with hooks.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from .robustness._common import HOOKED, assert_same, batches, make_optimizer, params_of

STEPS = 3


class Attention(nn.Module):
    """nn.MultiheadAttention alone (its out_proj is its only covered layer)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 4, 4)
        return self.attn(x, x, x)[0].mean(1)[:, :3]


class Encoder(nn.Module):
    """An nn.TransformerEncoder (out_proj, linear1, linear2, norms) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x.reshape(x.shape[0], 4, 4)).flatten(1))


class Functional(nn.Module):
    """``shared`` is never called: its weight and bias are used through ``F.linear``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(16, 8)
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x.flatten(1)))
        h = torch.tanh(F.linear(h, self.shared.weight, self.shared.bias))
        return self.head(h)


ENCODER_OUT_PROJ = [f"encoder.layers.{i}.self_attn.out_proj" for i in range(2)]
CASES = {
    "mha": (Attention, ["attn.out_proj"]),
    "encoder": (Encoder, ENCODER_OUT_PROJ),
    "functional": (Functional, ["shared"]),
}


def _train(model, opt, data) -> list[warnings.WarningMessage]:
    """Train on ``data``; the warnings the steps raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return [w for w in caught if "never ran" in str(w.message)]


def _moved_params(model, names: list[str]) -> list[str]:
    return [n for n, _ in model.named_parameters() if any(n.startswith(f"{m}.") for m in names)]


@pytest.mark.parametrize("name", HOOKED)
@pytest.mark.parametrize("case", ["encoder", "functional"])
def test_a_layer_whose_hooks_never_run_is_moved_to_the_base_update(name, case):
    """One warning at the first step names the layers and their parameters; from then on
    the run is the run with those layers in ``skip_layers``."""
    make_model, unhooked = CASES[case]
    model = make_model()
    opt = make_optimizer(name, model, curvature_every=1)
    caught = _train(model, opt, batches(STEPS))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert all(layer in message for layer in unhooked)
    assert all(p in message for p in _moved_params(model, unhooked))
    assert caught[0].filename == __file__  # points at the user's opt.step()
    assert opt.unhooked_layers == unhooked
    assert all(any(line.startswith(f"{n}: ") for line in opt.left_out_layers) for n in unhooked)
    assert set(_moved_params(model, unhooked)) <= set(opt.uncovered_parameters)
    covered = [layer.name for layer in opt.estimator.layers]
    assert covered and not set(covered) & set(unhooked)
    assert opt.state_dict()["curvature"]["updates"] == STEPS

    skipped_model = make_model()
    skipped = make_optimizer(name, skipped_model, curvature_every=1, skip_layers=unhooked)
    assert _train(skipped_model, skipped, batches(STEPS)) == []
    assert [layer.name for layer in skipped.estimator.layers] == covered
    assert skipped.uncovered_parameters == opt.uncovered_parameters
    assert_same(params_of(skipped_model), params_of(model))
    assert_same(
        skipped.state_dict()["curvature"]["estimator"], opt.state_dict()["curvature"]["estimator"]
    )


@pytest.mark.parametrize("name", HOOKED)
def test_attention_alone_gets_the_base_update_and_no_compile_error(name):
    """With out_proj its only covered layer no hook runs at all: that is not blamed on
    torch.compile (the model was never compiled); the run is the precondition=False run."""
    model = Attention()
    opt = make_optimizer(name, model, curvature_every=1)
    caught = _train(model, opt, batches(STEPS))
    assert len(caught) == 1 and "attn.out_proj" in str(caught[0].message)
    assert opt.unhooked_layers == ["attn.out_proj"]
    assert opt.estimator.layers == []
    assert opt.uncovered_parameters == [n for n, _ in model.named_parameters()]

    plain_model = Attention()
    plain = make_optimizer(name, plain_model, precondition=False)
    _train(plain_model, plain, batches(STEPS))
    assert_same(params_of(plain_model), params_of(model))


def test_a_layer_that_sits_out_a_step_with_a_zero_gradient_is_not_moved():
    """``zero_grad(set_to_none=False)`` leaves a zero gradient on a layer the step did not
    use: no evidence that its weight is used without its hooks."""
    model = Functional()
    model.shared.weight.grad = torch.zeros_like(model.shared.weight)
    opt = make_optimizer("kfac", model, curvature_every=1)
    x, y = batches(1)[0]
    opt.zero_grad(set_to_none=False)
    F.cross_entropy(model.head(torch.tanh(model.inner(x.flatten(1)))), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert opt.unhooked_layers == []
    assert "shared" in [layer.name for layer in opt.estimator.layers]


def _saved(opt) -> dict:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("name", HOOKED)
def test_a_resumed_run_leaves_the_same_layers_to_the_base_update(name):
    """The state lists the moved layers; an optimizer that loads it moves them too (one
    warning, at the load) and continues the saved run's trajectory bit for bit."""
    data = batches(2 * STEPS)
    model = Encoder()
    opt = make_optimizer(name, model, curvature_every=1)
    _train(model, opt, data[:STEPS])
    state, weights = _saved(opt), copy.deepcopy(model.state_dict())
    assert state["curvature"]["unhooked_layers"] == ENCODER_OUT_PROJ
    _train(model, opt, data[STEPS:])

    resumed_model = Encoder()
    resumed_model.load_state_dict(weights)
    resumed = make_optimizer(name, resumed_model, curvature_every=1)
    with pytest.warns(UserWarning, match="loaded state says") as record:
        resumed.load_state_dict(state)
    assert sum("never ran" in str(w.message) for w in record) == 1
    assert resumed.unhooked_layers == ENCODER_OUT_PROJ
    assert resumed.uncovered_parameters == opt.uncovered_parameters
    assert _train(resumed_model, resumed, data[STEPS:]) == []  # nothing new to move
    assert_same(params_of(model), params_of(resumed_model))
    assert_same(opt.state_dict(), resumed.state_dict())


def test_a_state_naming_a_layer_the_model_lacks_is_rejected_and_changes_nothing():
    model = Encoder()
    opt = make_optimizer("twolevel", model, curvature_every=1)
    _train(model, opt, batches(1))
    state = opt.state_dict()
    state["curvature"]["unhooked_layers"] = [*ENCODER_OUT_PROJ, "no.such.layer"]
    fresh = make_optimizer("twolevel", Encoder(), curvature_every=1)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"no\.such\.layer"):
        fresh.load_state_dict(state)
    assert fresh.unhooked_layers == []
    assert_same(before, fresh.state_dict())
    assert "encoder.layers.0.self_attn.out_proj" in [layer.name for layer in fresh.estimator.layers]
