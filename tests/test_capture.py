"""Capture hooks: when statistics are recorded, and that they add up correctly."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder import KFAC
from secondorder.layers import BlockHelper, KroneckerHelper

from .helpers import assert_close, kfac_factors, mlp, small_cnn, with_ones


def _loss(model, x, y, scale=1.0):
    return F.cross_entropy(model(x), y) * scale


def _count_calls(opt):
    calls = []
    original = opt.capture.accumulate

    def counting(layer, inputs, grad_output, acc):
        calls.append(layer.name)
        return original(layer, inputs, grad_output, acc)

    opt.capture.accumulate = counting
    return calls


def test_no_grad_eval_and_forward_only_passes_record_nothing():
    model = mlp([6, 5, 3])
    opt = KFAC(model, curvature_every=1)
    calls = _count_calls(opt)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with torch.no_grad():
        model(x)
    model(x)  # forward with grad but never back-propagated
    model.eval()
    _loss(model, x, y).backward()
    assert calls == []
    model.train()
    _loss(model, x, y).backward()
    assert calls == ["2", "0"]  # backward order


def test_record_in_eval_option():
    model = mlp([6, 3]).eval()
    opt = KFAC(model, curvature_every=1, record_in_eval=True)
    calls = _count_calls(opt)
    _loss(model, torch.randn(4, 6), torch.randint(0, 3, (4,))).backward()
    assert calls == ["0"]


def test_only_passes_before_curvature_steps_are_recorded():
    model = mlp([6, 3])
    opt = KFAC(model, curvature_every=3, inverse_every=3)
    calls = _count_calls(opt)
    recorded = []
    for _ in range(7):
        before = len(calls)
        opt.zero_grad()
        _loss(model, torch.randn(4, 6), torch.randint(0, 3, (4,))).backward()
        recorded.append(len(calls) > before)
        opt.step()
    assert recorded == [True, False, False, True, False, False, True]
    assert opt.estimator._state["0"].updates == 3


def test_gradient_accumulation_gives_full_batch_statistics():
    torch.manual_seed(0)
    full = small_cnn()
    parts = small_cnn()
    parts.load_state_dict(full.state_dict())
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))

    opt_full = KFAC(full, curvature_every=1)
    _loss(full, x, y).backward()
    stats_full = opt_full.capture.collect()

    opt_parts = KFAC(parts, curvature_every=1)
    for chunk in range(2):  # the usual practice: each micro-batch loss divided by 2
        sl = slice(4 * chunk, 4 * chunk + 4)
        _loss(parts, x[sl], y[sl], scale=0.5).backward()
    stats_parts = opt_parts.capture.collect()

    opt_full.estimator.update(stats_full)
    opt_parts.estimator.update(stats_parts)
    # one batch of 8 against two of 4 added up: float32 sums in other orders over at most
    # 8 examples x 64 positions (the first convolution's rows), after forward and backward
    # passes whose products are at most 128 long (the head's input); a factor's entry is a
    # product of two such values
    n = 8 * 64 + 2 * 128
    for name in stats_full:
        a_full, g_full = opt_full.estimator.factors(name)
        a_parts, g_parts = opt_parts.estimator.factors(name)
        assert_close(a_parts, a_full, dtype=torch.float32, n=n)
        assert_close(g_parts, g_full, dtype=torch.float32, n=n)
    for p_full, p_parts in zip(full.parameters(), parts.parameters(), strict=True):
        assert_close(p_parts.grad, p_full.grad, dtype=torch.float32, n=n)


def test_factors_equal_dense_definitions_on_a_batch():
    torch.manual_seed(1)
    model = mlp([5, 4, 3]).double()
    opt = KFAC(model, curvature_every=1, factor_dtype=torch.float64)
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    h = model[0](x)
    h.retain_grad()
    z = model[1](h)
    z.retain_grad()
    out = model[2](z)
    out.retain_grad()
    F.cross_entropy(out, y).backward()
    opt.estimator.update(opt.capture.collect())
    for name, inp, grad in (("0", x, h.grad), ("2", z, out.grad)):
        a_ref, g_ref = kfac_factors(with_ones(inp.detach())[None], grad[None], batch=7)
        a, g = opt.estimator.factors(name)
        # float64 sums over the 7 examples (the inputs and output gradients are the same
        # float64 numbers: one forward and backward pass, read by hooks and retain_grad)
        assert_close(a, a_ref, dtype=torch.float64, n=7)
        assert_close(g, g_ref, dtype=torch.float64, n=7)


def test_a_deepcopy_of_the_model_records_nothing_into_the_originals_optimizer():
    # copy.deepcopy(model) copies the capture's hooks along with the modules
    torch.manual_seed(0)
    model = mlp([6, 5, 3])
    reference = copy.deepcopy(model)  # copied before any hook exists
    opt = KFAC(model, curvature_every=1)
    opt_reference = KFAC(reference, curvature_every=1)
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))

    _loss(twin, x, y).backward()
    assert opt.capture.collect() == {}

    # the original's own pass is recorded, with the copy's pass run inside it
    opt.zero_grad()
    out = model(x[:4])
    _loss(twin, x[4:], y[4:]).backward()
    F.cross_entropy(out, y[:4]).backward()
    opt.step()
    opt_reference.zero_grad()
    _loss(reference, x[:4], y[:4]).backward()
    opt_reference.step()
    for name in ("0", "2"):
        assert opt.estimator._state[name].updates == 1
        # the same computation on the same numbers: float32 sums over 4 examples
        for got, want in zip(
            opt.estimator.factors(name), opt_reference.estimator.factors(name), strict=True
        ):
            assert_close(got, want, dtype=torch.float32, n=4)
    _loss(twin, x, y).backward()  # after a step too: no error, nothing recorded
    assert opt.capture.collect() == {}


def test_frozen_and_skipped_layers_are_not_hooked():
    model = mlp([6, 5, 4, 3])
    model[2].requires_grad_(False)
    opt = KFAC(model, skip_layers=[r"4"])
    assert [layer.name for layer in opt.estimator.layers] == ["0"]
    assert any("requires_grad is False" in line for line in opt.left_out_layers)
    assert any("4: in skip_layers" in line for line in opt.left_out_layers)
    assert opt.uncovered_parameters == ["4.weight", "4.bias"]


def test_timm_resnet_with_inplace_activations_gets_every_layer():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", num_classes=10, pretrained=False)
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every parameter is covered: no warning
        opt = KFAC(model, curvature_every=1)
    assert opt.uncovered_parameters == []
    kron = [layer for layer in opt.estimator.layers if isinstance(layer, KroneckerHelper)]
    norms = [layer for layer in opt.estimator.layers if isinstance(layer, BlockHelper)]
    assert len(kron) == n_layers == 21 and len(norms) == n_norms == 20
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    _loss(model, x, y).backward()
    stats = opt.capture.collect()
    assert sorted(stats) == sorted(layer.name for layer in opt.estimator.layers)
    for layer in norms:
        acc = stats[layer.name]
        assert acc.examples == 2 and torch.isfinite(acc.fisher_sum).all()
    stats = {layer.name: stats[layer.name] for layer in kron}
    for layer in kron:
        acc = stats[layer.name]
        assert acc.rows > 0 and acc.examples == 2
        assert torch.isfinite(acc.a_sum).all() and torch.isfinite(acc.g_sum).all()
    zero = sorted(n for n, acc in stats.items() if acc.g_sum.abs().sum() == 0)
    assert zero == [f"layer{i}.{j}.conv{k}" for i in range(1, 5) for j in range(2) for k in (1, 2)]
