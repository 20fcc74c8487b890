"""``statistics_rows``: statistics from a random subset of each pass's examples.

Unbiasedness is checked exactly: for a tiny batch the expectation over the sampler's draws
is the average over every subset of ``k`` of the ``n`` examples (each equally likely), which
must equal the full batch's statistics up to float64 round-off.
"""

from __future__ import annotations

import copy
import itertools
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder import EKFAC, KFAC, MFAC, AdaFisher, AdaHessian, TwoLevelKFAC
from secondorder.capture import ModelCapture, find_layers
from secondorder.estimators.adafisher import AdaFisherConfig, AdaFisherEstimator
from secondorder.estimators.kfac import KFACConfig, KFACEstimator
from secondorder.subsample import ExampleSampler
from tests.helpers import assert_close, digits_data, kfac_factors, mlp, small_cnn


class _FixedSampler(ExampleSampler):
    """Draws the permutation it is given (so a test can enumerate the subsets)."""

    def __init__(self, statistics_rows: int | float, order: list[int]) -> None:
        super().__init__(statistics_rows)
        self.order = torch.tensor(order)

    def draw(self, batch: int) -> torch.Tensor:
        return self.order


def _subsets(n: int, k: int) -> list[list[int]]:
    """Every k-subset of range(n), as a permutation whose prefix it is."""
    return [
        list(kept) + [i for i in range(n) if i not in kept]
        for kept in itertools.combinations(range(n), k)
    ]


def _stats(model, x, y, loss_fn, accumulate_of, sampler):
    """One forward/backward of ``model`` through a capture with ``sampler``: the stats."""
    estimator = accumulate_of(find_layers(model)[0])
    capture = ModelCapture(estimator.layers, estimator.accumulate, model=model, sampler=sampler)
    model.zero_grad()
    loss_fn(model(x), y).backward()
    stats = capture.collect()
    capture.remove()
    return estimator, stats


def _expected_and_full(model, x, y, loss_fn, make_estimator, read, rows, k):
    """``(mean over every k-subset of read(stats), read(full-batch stats))``."""
    n = x.shape[0]
    draws = []
    for order in _subsets(n, k):
        est, stats = _stats(model, x, y, loss_fn, make_estimator, _FixedSampler(rows, order))
        draws.append(read(est, stats))
    est, stats = _stats(model, x, y, loss_fn, make_estimator, None)
    full = read(est, stats)
    mean = {key: torch.stack([d[key] for d in draws]).mean(0) for key in full}
    return mean, full, len(draws)


def _kfac_read(est, stats):
    fresh = est._fresh_statistics(stats)
    out = {}
    for name, (a, g) in fresh.items():
        out[f"{name}.a"] = a
        if g is not None:
            out[f"{name}.g"] = g
    return out


def _kfac(layers):
    return KFACEstimator(layers, KFACConfig(factor_dtype=torch.float64))


def _assert_unbiased(mean, full, count):
    for key in full:
        assert_close(mean[key], full[key], dtype=torch.float64, n=count * 16, msg=key)


def _mse(out, y):
    return F.mse_loss(out, y)


# ---- (b), (e): unbiasedness on every helper family ------------------------------------------
@pytest.mark.parametrize("rows", [2, 0.4])
def test_kfac_linear_statistics_are_unbiased(rows) -> None:
    torch.manual_seed(0)
    model = mlp([3, 4, 2]).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    mean, full, count = _expected_and_full(model, x, y, _mse, _kfac, _kfac_read, rows, 2)
    assert count == 10
    _assert_unbiased(mean, full, count)
    # and the full statistics are the dense reference's (the subset ones are not)
    model.zero_grad()
    inputs, grads = {}, {}
    model[0].register_forward_hook(lambda m, a, o: inputs.__setitem__(0, a[0]))

    def keep_grad(module, args, output):
        output.register_hook(partial(grads.__setitem__, 0))

    model[0].register_forward_hook(keep_grad)
    _mse(model(x), y).backward()
    a_ref, g_ref = kfac_factors(
        torch.cat([inputs[0], torch.ones(5, 1, dtype=torch.float64)], 1)[None], grads[0][None], 5
    )
    assert_close(full["0.a"], a_ref, n=5)
    assert_close(full["0.g"], g_ref, n=5)


def test_kfac_sequence_and_conv_statistics_are_unbiased() -> None:
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(4, 3, 3, dtype=torch.float64), torch.randn(4, 3, 2, dtype=torch.float64)
    # an int counts rows: 3 tokens per example, 6 rows are 2 examples
    mean, full, count = _expected_and_full(seq, x, y, _mse, _kfac, _kfac_read, 6, 2)
    assert count == 6
    _assert_unbiased(mean, full, count)

    cnn = small_cnn(channels=2, classes=3).double()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    mean, full, count = _expected_and_full(cnn, x, y, F.cross_entropy, _kfac, _kfac_read, 0.5, 2)
    assert any(key.startswith("0.") for key in full)  # the convolution is covered
    _assert_unbiased(mean, full, count)


def test_embedding_and_layernorm_statistics_are_unbiased() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(7, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    x = torch.randint(0, 7, (5, 3))
    y = torch.randn(5, 3, 2, dtype=torch.float64)
    mean, full, count = _expected_and_full(model, x, y, _mse, _kfac, _kfac_read, 0.6, 3)
    assert {"0.a", "0.g", "1.a", "2.a", "2.g"} <= set(full)  # Embedding, LayerNorm, Linear
    _assert_unbiased(mean, full, count)


def test_adafisher_diagonals_are_unbiased() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.GroupNorm(1, 2), nn.Flatten())
    model.append(nn.Linear(2 * 16, 3))
    model = model.double()
    x, y = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,))

    def make(layers):
        return AdaFisherEstimator(layers, AdaFisherConfig(factor_dtype=torch.float64))

    def read(est, stats):
        out = {}
        for name, (first, second) in est.raw_diagonals(stats).items():
            out[f"{name}.first"] = first
            if second is not None:
                out[f"{name}.second"] = second
        return out

    mean, full, count = _expected_and_full(model, x, y, F.cross_entropy, make, read, 0.4, 2)
    assert {"0.first", "0.second", "1.first", "3.first"} <= set(full)
    _assert_unbiased(mean, full, count)


def test_ekfac_scalings_are_unbiased() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(5, 2, 2, dtype=torch.float64)
    opt = EKFAC(
        model, lr=0.1, curvature_every=1, inverse_every=1,
        factor_dtype=torch.float64, inverse_dtype=torch.float64,
    )  # fmt: skip
    opt.zero_grad()
    _mse(model(x), y).backward()
    opt.step()  # an eigenbasis to project on
    opt.remove_hooks()
    est = opt.estimator
    est._plan = None  # no optimizer schedule: the passes produce factors and scalings

    def make(layers):
        return est

    def read(_, stats):
        out = {}
        for name, acc in stats.items():
            assert acc.scale_sum is not None
            out[f"{name}.scale"] = acc.scale_sum * acc.examples
            out[f"{name}.a"] = acc.kfac.a_sum / acc.kfac.rows
            out[f"{name}.g"] = acc.kfac.g_sum * acc.examples
        return out

    mean, full, count = _expected_and_full(model, x, y, _mse, make, read, 0.4, 2)
    _assert_unbiased(mean, full, count)


def test_batchnorm_is_never_subsampled() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    _, full = _stats(model, x, y, _mse, _kfac, None)
    _, part = _stats(model, x, y, _mse, _kfac, ExampleSampler(2))
    assert torch.equal(part["1"].fisher_sum, full["1"].fisher_sum)
    assert part["0"].rows == 2 and full["0"].rows == 6
    assert part["0"].examples == full["0"].examples == 6


# ---- (c): one draw per pass, shared by A and G and by the layers; resumed identically ----
def test_a_and_g_and_every_layer_see_the_same_examples() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)).double()
    n, k = 8, 2
    scale = math.sqrt(n / k)
    # example i carries i in its first input, and the loss weighs its output by i + 1: the
    # output gradient of layer 1 is (i + 1) √(n/k), that of layer 0 (i + 1) √(n/k) W₁
    x = torch.zeros(n, 2, dtype=torch.float64)
    x[:, 0] = torch.arange(n)
    seen: dict[str, list] = {"0": [], "1": []}

    def record(layer, inputs, grad_output, acc):
        seen[layer.name].append((inputs, grad_output))
        return acc

    layers, _ = find_layers(model)
    capture = ModelCapture(layers, record, model=model, sampler=ExampleSampler(k / n))
    for _ in range(4):  # four passes, four draws
        (model(x).squeeze(1) * torch.arange(1, n + 1)).sum().backward()
    capture.collect()
    w1 = model[1].weight.detach()[0]
    draws = []
    for (in0, go0), (_, go1) in zip(seen["0"], seen["1"], strict=True):
        from_inputs = in0[:, 0]
        from_grads_0 = (go0 / (scale * w1)).mean(1) - 1
        from_grads_1 = go1[:, 0] / scale - 1
        assert from_inputs.shape == (k,)
        assert_close(from_grads_0, from_inputs, n=4)  # A and G of a layer: same examples
        assert_close(from_grads_1, from_inputs, n=4)  # and every layer of the pass
        draws.append(tuple(from_inputs.tolist()))
    assert len(set(draws)) > 1  # each pass draws anew


def _train(opt_factory, steps, state=None, resume_at=None):
    x_train, y_train, _, _ = digits_data(256)
    torch.manual_seed(0)
    model = mlp([64, 16, 10])
    opt = opt_factory(model)
    saved = None
    for step in range(steps):
        if step == resume_at:
            saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        idx = torch.arange(step * 32, step * 32 + 32) % len(x_train)
        opt.zero_grad()
        F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        opt.step()
    return model, opt, saved


@pytest.mark.parametrize("rows", [0.25, 5])
def test_a_resumed_run_draws_the_same_examples(rows) -> None:
    def make(model):
        return KFAC(model, lr=0.1, curvature_every=1, inverse_every=2, statistics_rows=rows)

    model, opt, saved = _train(make, 6, resume_at=3)
    torch.manual_seed(0)
    resumed = mlp([64, 16, 10])
    resumed.load_state_dict(saved[0])
    ropt = make(resumed)
    ropt.load_state_dict(saved[1])
    x_train, y_train, _, _ = digits_data(256)
    for step in range(3, 6):
        idx = torch.arange(step * 32, step * 32 + 32) % len(x_train)
        ropt.zero_grad()
        F.cross_entropy(resumed(x_train[idx]), y_train[idx]).backward()
        ropt.step()
    for name in ("0", "2"):
        for got, want in zip(
            ropt.estimator.factors(name), opt.estimator.factors(name), strict=True
        ):
            assert torch.equal(got, want)
    for p, q in zip(resumed.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
    # a fresh optimizer (generator from the seed) would have drawn other examples
    assert not torch.equal(
        ropt.capture.sampler.generator.get_state(), ExampleSampler(rows).generator.get_state()
    )


# ---- (a): everything kept is today's code path --------------------------------------------
@pytest.mark.parametrize("rows", [1.0, 32, 10**6])
def test_keeping_every_row_is_bit_identical(rows) -> None:
    def run(**kw):
        model, opt, _ = _train(
            lambda m: KFAC(m, lr=0.1, curvature_every=1, inverse_every=2, **kw), 4
        )
        return model, opt

    base_model, base_opt = run()
    assert base_opt.capture.sampler is None
    model, opt = run(statistics_rows=rows)
    for name in ("0", "2"):
        for got, want in zip(
            opt.estimator.factors(name), base_opt.estimator.factors(name), strict=True
        ):
            assert torch.equal(got, want)
    for p, q in zip(model.parameters(), base_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_fewer_than_one_example_keeps_one() -> None:
    sampler = ExampleSampler(0.01)
    layers, _ = find_layers(nn.Sequential(nn.Linear(2, 2)))
    assert sampler.keep(layers[0], 64, torch.zeros(64, 2)) == 1
    assert ExampleSampler(1).keep(layers[0], 64, torch.zeros(64, 2)) == 1
    assert ExampleSampler(0.5).keep(layers[0], 5, torch.zeros(5, 2)) == 2  # round(2.5)
    # an int counts rows: 7 tokens an example, 20 rows are 3 examples
    assert ExampleSampler(20).keep(layers[0], 8, torch.zeros(8, 7, 2)) == 3


# ---- (d): bad values, and the methods that cannot subsample ------------------------------
@pytest.mark.parametrize("value", [0, -3, 0.0, 1.5, float("nan"), float("inf"), "all", True, [4]])
@pytest.mark.parametrize("method", [KFAC, EKFAC, AdaFisher])
def test_bad_statistics_rows_raise(method, value) -> None:
    with pytest.raises(ValueError, match="statistics_rows"):
        method(mlp([3, 2]), statistics_rows=value)


@pytest.mark.parametrize("method", [TwoLevelKFAC, MFAC, AdaHessian])
def test_methods_that_need_every_example_refuse_statistics_rows(method) -> None:
    with pytest.raises(ValueError, match="statistics_rows"):
        method(mlp([3, 2]), statistics_rows=0.5)


# ---- (e): end to end, every method that takes it ------------------------------------------
@pytest.mark.parametrize("method", [KFAC, EKFAC, AdaFisher])
def test_methods_train_with_subsampled_statistics(method) -> None:
    torch.manual_seed(7)
    model = small_cnn(channels=2, classes=3)
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 3, (12,))
    opt = method(model, lr=0.01, curvature_every=1, statistics_rows=0.25)
    for _ in range(4):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert opt.estimator.nonfinite_updates == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = opt.state_dict()["curvature"]["sampler"]["generator"]
    assert not torch.equal(state, ExampleSampler(0.25).generator.get_state())  # it drew
