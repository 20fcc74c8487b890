"""``torch.compile`` and the optimizers' names and state; what compiling costs the capture.

* Names are the uncompiled model's: ``torch.compile(model)`` registers the model as
  ``_orig_mod``, which the optimizers drop, so layer and parameter names, ``skip_layers``
  and saved state are the same with and without compile, and a state saved through one
  loads into the other.
* While Dynamo traces, the capture's forward hooks route the layer outputs through the
  ``secondorder::tap`` operator instead of registering tensor hooks (which break the graph
  at every layer): the model compiles to one graph per value of the recording switch, and
  a model with more than ``recompile_limit`` (8) hooked layers of different shapes does not
  hit the limit.
* A ``copy.deepcopy`` of the model carries copies of the hooks, which record nothing; code
  compiled for the copy is not reused for the original (the hooks test the module's id,
  which Dynamo guards on).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ..test_hook_coverage import Attention
from ._common import (
    HOOKED,
    assert_close_runs,
    assert_same,
    batches,
    make_optimizer,
    params_of,
    tiny_model,
    train,
    updates_of,
)
from .test_compile import _dynamo_available

pytestmark = pytest.mark.skipif(not _dynamo_available(), reason="torch.compile is unavailable")
STEPS = 2


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Compiled code is cached per code object across models (see test_compile.py)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(model: nn.Module) -> nn.Module:
    return torch.compile(model, backend="eager")


@pytest.mark.parametrize("name", HOOKED)
def test_names_are_the_uncompiled_models(name):
    plain = make_optimizer(name, tiny_model(), skip_layers=["3"])
    compiled = make_optimizer(name, _compiled(tiny_model()), skip_layers=["3"])
    names = [layer.name for layer in plain.estimator.layers]
    assert names == [layer.name for layer in compiled.estimator.layers] == ["0", "4", "6"]
    assert compiled.uncovered_parameters == plain.uncovered_parameters == ["3.weight", "3.bias"]
    assert compiled.left_out_layers == plain.left_out_layers


@pytest.mark.parametrize("name", HOOKED)
def test_state_saved_through_compile_loads_without_it(name):
    """The saving optimizer (built on the compiled model) and the loading one (on an
    uncompiled copy) continue on the same path, the uncompiled model's calls: bit for bit."""
    data = batches(2 * STEPS)
    model = tiny_model()
    compiled = _compiled(model)
    opt = make_optimizer(name, compiled)
    train(compiled, opt, data[:STEPS])
    state, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    assert "_orig_mod" not in repr(state["curvature"])
    train(model, opt, data[STEPS:])  # the hooks also run on the uncompiled model's calls

    loaded_model = tiny_model()
    loaded_model.load_state_dict(weights)
    loaded = make_optimizer(name, loaded_model)
    loaded.load_state_dict(state)
    train(loaded_model, loaded, data[STEPS:])
    assert updates_of(loaded) == updates_of(opt) > 0
    assert_same(params_of(model), params_of(loaded_model))
    assert_same(opt.state_dict(), loaded.state_dict())


@pytest.mark.parametrize("name", HOOKED)
def test_state_saved_without_compile_loads_through_it(name):
    """Saved from an optimizer of the uncompiled model, loaded into one of the compiled
    copy; the reference continues the saving optimizer through its own model compiled
    (after its hooks were attached): the same compiled path, bit for bit."""
    data = batches(2 * STEPS)
    model = tiny_model()
    opt = make_optimizer(name, model)
    train(model, opt, data[:STEPS])
    state, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    train(_compiled(model), opt, data[STEPS:])
    torch._dynamo.reset()  # the compiled code above calls the first optimizer's taps

    loaded_model = tiny_model()
    loaded_model.load_state_dict(weights)
    compiled = _compiled(loaded_model)
    loaded = make_optimizer(name, compiled)
    loaded.load_state_dict(state)
    train(compiled, loaded, data[STEPS:])
    assert updates_of(loaded) == updates_of(opt) > 0
    assert_same(params_of(model), params_of(loaded_model))
    assert_same(opt.state_dict(), loaded.state_dict())


def _many_shapes() -> nn.Sequential:
    """13 hooked Linear layers, each of another shape: 13 weight shapes that a frame per
    layer (what a graph break in each layer's hook leaves) is recompiled for, where
    recompile_limit is 8."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(12):
        layers += [nn.Linear(16 + i, 17 + i), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(28, 3))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_many_hooked_layers_compile_to_one_graph_without_hitting_the_recompile_limit():
    from torch._dynamo.utils import counters

    steps = 10
    data = batches(steps)
    start = _many_shapes()
    model = copy.deepcopy(start)
    records = _Records()
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(records)
    counters.clear()
    try:
        compiled = _compiled(model)
        opt = make_optimizer("kfac", compiled, curvature_every=2, inverse_every=2)
        train(compiled, opt, data)
    finally:
        logger.removeHandler(records)
    assert not [m for m in records.messages if "recompile_limit" in m]
    # one graph for the passes that are recorded, one for those that are not
    assert counters["stats"]["unique_graphs"] == 2
    assert sum(counters["graph_break"].values()) == 0

    plain_model = copy.deepcopy(start)
    plain = make_optimizer("kfac", plain_model, curvature_every=2, inverse_every=2)
    train(plain_model, plain, data)
    assert updates_of(opt) == updates_of(plain) == steps // 2
    # the statistics went through the taps: the run is the uncompiled run up to round-off
    # (n: steps x the 8 rows of a batch that a statistic sums)
    assert_close_runs(
        params_of(model), params_of(plain_model), params_of(start), dtype=torch.float32, n=8 * steps
    )


def test_attention_compiled_after_the_optimizer_is_not_blamed_on_compile():
    """No hook runs (out_proj is the only covered layer, used without being called), but
    no code was compiled before the hooks: out_proj goes to the base update, no error."""
    model = Attention()
    compiled = _compiled(model)
    opt = make_optimizer("kfac", compiled, curvature_every=1)
    with pytest.warns(UserWarning, match=r"hooks of \['attn\.out_proj'\] never ran"):
        train(compiled, opt, batches(STEPS))
    assert opt.unhooked_layers == ["attn.out_proj"]
    assert opt.estimator.layers == []
    assert opt.steps == STEPS


def test_a_compiled_copy_of_the_model_records_nothing_and_its_code_is_not_the_originals():
    model = tiny_model()
    opt = make_optimizer("kfac", model, curvature_every=1)
    twin = _compiled(copy.deepcopy(model))
    x, y = batches(1)[0]
    F.cross_entropy(twin(x), y).backward()
    assert opt.capture.collect() == {}
    # the original compiled after its copy, whose code (with the hooks traced as no-ops)
    # Dynamo would reuse if it did not guard on the module
    compiled = _compiled(model)
    F.cross_entropy(compiled(x), y).backward()
    assert sorted(opt.capture.collect()) == sorted(layer.name for layer in opt.estimator.layers)
