"""Convolutions with ``conv_positions="reduce"`` (K-FAC-reduce): one row per example, the
mean patch and the summed output gradient, against dense float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secondorder import EKFAC, KFAC, AdaFisher, TwoLevelKFAC
from secondorder.layers import Conv2dHelper, helper_class_for

from ..helpers import assert_close, kfac_factors, layer_grad_matrix, tolerance
from .test_conv_nd import _forward, _ones_column, conv_cases, dense_grad_rows, dense_patches


def _reduce(conv: nn.Module):
    return helper_class_for(conv)(conv, "conv", conv_positions="reduce")


@settings(max_examples=30)
@given(case=conv_cases(), seed=st.integers(0, 2**16))
def test_reduce_rows_are_each_examples_mean_patch_and_summed_output_gradient(case, seed):
    torch.manual_seed(seed)
    conv, x = case
    out = _forward(conv, x)
    g_out = torch.randn_like(out)
    helper = _reduce(conv)
    batch, groups = x.shape[0], conv.groups
    # the references: the explicit patches of every position, averaged per example
    patches = dense_patches(x, conv)  # (groups, batch * positions, cols)
    positions = patches.shape[1] // batch
    mean = patches.reshape(groups, batch, positions, -1).mean(dim=2)
    expected_a = _ones_column(mean) if conv.bias is not None else mean
    grads = dense_grad_rows(g_out, groups).reshape(groups, batch, positions, -1).sum(dim=2)
    a, g = helper.a_rows(x), helper.g_rows(g_out)
    assert a.shape == (groups, batch, helper.a_dim) and g.shape == (groups, batch, helper.g_dim)
    # sums over the positions, bounded by the largest summand times their number
    assert_close(a, expected_a, n=positions, scale=float(patches.abs().max()) + 1.0)
    assert_close(g, grads, n=positions, scale=positions * float(g_out.abs().max()))
    assert helper.rows_count(x) == batch
    # the diagonal (AdaFisher, diagonal factors) is the squares of the same rows
    diag, rows = helper.a_square_sum(x)
    assert rows == batch
    assert_close(diag, a.square().sum(1), n=batch, scale=float(a.square().sum(1).max()))


def _one_example_pooled(conv: nn.Conv2d, seed: int):
    """One example through ``conv``, then a global mean pool and a cross-entropy: every
    output position gets the same output gradient."""
    torch.manual_seed(seed)
    x = torch.randn(1, conv.in_channels, 5, 6, dtype=torch.float64)
    out = conv(x)
    out.retain_grad()
    F.cross_entropy(out.mean(dim=(2, 3)), torch.tensor([1])).backward()
    return x, out.grad


def _fisher_and_factors(helper: Conv2dHelper, conv: nn.Conv2d, x, g_out):
    a, g = kfac_factors(helper.a_rows(x), helper.g_rows(g_out), batch=1)
    vec = layer_grad_matrix(conv)[0].T.reshape(-1)  # column-major, as torch.kron(A, G)
    return torch.kron(a[0], g[0]), torch.outer(vec, vec)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("padding", [0, 1])
def test_reduce_is_the_exact_fisher_when_positions_are_pooled_after_the_layer(bias, padding):
    conv = nn.Conv2d(2, 3, 3, padding=padding, bias=bias).double()
    x, g_out = _one_example_pooled(conv, seed=padding)
    positions = g_out[0, 0].numel()
    assert torch.equal(g_out, g_out[:, :, :1, :1].expand_as(g_out))  # the same at every position
    reduce, fisher = _fisher_and_factors(_reduce(conv), conv, x, g_out)
    # sums over the positions of products of entries: the gradient's |terms| bound them
    scale = float(fisher.abs().max()) * positions
    assert_close(reduce, fisher, n=positions + conv.in_channels * 9 + 1, scale=scale)
    expand, _ = _fisher_and_factors(Conv2dHelper(conv, "conv"), conv, x, g_out)
    # the per-position rows miss the cross-position terms: a choice this test can tell apart
    assert torch.linalg.norm(expand - fisher) > 0.3 * torch.linalg.norm(fisher)


def test_bad_conv_positions_value_is_rejected():
    with pytest.raises(ValueError, match=r"conv_positions.*'expand', 'reduce'.*'mean'"):
        Conv2dHelper(nn.Conv2d(2, 2, 3), "conv", conv_positions="mean")
    with pytest.raises(ValueError, match=r"unknown option.*conv_position\b"):
        KFAC(nn.Conv2d(2, 2, 3), layer_options={"conv_position": "reduce"})


def _cnn():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, stride=2, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.LazyLinear(3),
    ).double()


@pytest.mark.parametrize("max_factor_dim", [None, 8])
def test_kfac_with_reduce_keeps_the_factors_of_the_reduce_rows(max_factor_dim):
    """The option reaches every convolution through ``layer_options``, and K-FAC's factors
    (whole, or the diagonal blocks of a blocked ``A``) are those of the reduce rows."""
    torch.manual_seed(0)
    model = _cnn()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    model(x)  # materialise the lazy layer
    seen = {}

    def keep(module, args, output):
        output.retain_grad()
        seen[module] = (args[0].detach(), output)

    for i in (0, 2):
        model[i].register_forward_hook(keep)
    opt = KFAC(
        model,
        curvature_every=1,
        factor_dtype=torch.float64,
        max_factor_dim=max_factor_dim,
        layer_options={"conv_positions": "reduce"},
    )
    convs = [h for h in opt.estimator.layers if isinstance(h, Conv2dHelper)]
    assert [h.conv_positions for h in convs] == ["reduce", "reduce"]
    F.cross_entropy(model(x), torch.tensor([0, 1, 2])).backward()
    opt.step()
    for i in (0, 2):
        inputs, out = seen[model[i]]
        helper = _reduce(model[i])
        rows_a, rows_g = helper.a_rows(inputs), helper.g_rows(out.grad)
        want_a, want_g = kfac_factors(rows_a, rows_g, batch=3)
        got_a, got_g = opt.estimator.factors(str(i))
        layout = opt.estimator.layouts[str(i)][0]
        assert layout.kind == ("full" if max_factor_dim is None else "blocks")
        if layout.kind == "blocks":
            # a blocked A keeps the diagonal blocks: the factors of the rows' blocks
            block_rows = layout.block_rows(rows_a).double()
            want_a = block_rows.transpose(1, 2) @ block_rows / rows_a.shape[1]
            want_a = want_a.reshape(got_a.shape)
            rows_a = block_rows
        rtol = tolerance(torch.float64, n=3)
        bound_a, bound_g = kfac_factors(rows_a.abs(), rows_g.abs(), batch=3)
        assert got_a.shape == want_a.shape and got_g.shape == want_g.shape
        torch.testing.assert_close(got_a, want_a, rtol=rtol, atol=rtol * float(bound_a.max()))
        torch.testing.assert_close(got_g, want_g, rtol=rtol, atol=rtol * float(bound_g.max()))


@pytest.mark.parametrize("make", [KFAC, EKFAC, TwoLevelKFAC, AdaFisher], ids=lambda c: c.__name__)
def test_reduce_equals_expand_with_one_output_position_and_differs_with_several(make):
    """A convolution whose output is one position has one row per example either way: the
    steps agree to round-off; with several positions they do not (the option is used)."""

    def run(mode: str, size: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)
        ).double()
        x = torch.randn(4, 2, size, size, dtype=torch.float64)
        y = torch.tensor([0, 1, 1, 0])
        model(x)
        kwargs = {"curvature_every": 1}
        if make is not AdaFisher:
            kwargs.update(inverse_every=1, factor_dtype=torch.float64)
        opt = make(model, layer_options={"conv_positions": mode}, **kwargs)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run("expand", 3), run("reduce", 3), strict=True):
        assert_close(a, b, dtype=torch.float32, n=64)
    moved = [(a - b).abs().max() for a, b in zip(run("expand", 5), run("reduce", 5), strict=True)]
    assert max(moved) > 1e-4
