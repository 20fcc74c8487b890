"""Layer helpers: rows, factors and gradient matrices against independent references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from secondorder.layers import Conv2dHelper, LinearHelper, helper_class_for, register_layer_helper

from ..helpers import assert_close, dense_conv_patches, grad_rows, layer_grad_matrix, with_ones


def _check_gradient(g, a, layer, groups=1):
    """Σ_rows g ãᵀ against autograd's gradient: sums over the rows, whose round-off is
    bounded by Σ_rows |g| |ã|ᵀ (the entries may cancel)."""
    bound = (g.abs().transpose(1, 2) @ a.abs()).max()
    assert_close(
        g.transpose(1, 2) @ a, layer_grad_matrix(layer, groups), n=a.shape[1], scale=float(bound)
    )


def _output_grad(layer, x):
    out = layer(x)
    out.retain_grad()
    (out.sin().sum()).backward()
    return out.grad


@given(
    in_dim=st.integers(1, 7),
    out_dim=st.integers(1, 6),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    bias=st.booleans(),
)
def test_linear_rows_reproduce_the_weight_gradient(in_dim, out_dim, lead, bias):
    """Σ_rows g ãᵀ is the autograd gradient [∇W | ∇b], for inputs of any rank."""
    layer = nn.Linear(in_dim, out_dim, bias=bias).double()
    x = torch.randn(*lead, in_dim, dtype=torch.float64)
    g_out = _output_grad(layer, x)
    helper = LinearHelper(layer, "fc")
    a = helper.a_rows(x)
    g = helper.g_rows(g_out)
    expected_a = with_ones(x.reshape(-1, in_dim)) if bias else x.reshape(-1, in_dim)
    # the rows are the inputs and output gradients moved around: copies, exact
    assert torch.equal(a[0], expected_a)
    assert torch.equal(g, grad_rows(g_out))
    _check_gradient(g, a, layer)
    assert helper.a_dim == in_dim + int(bias) and helper.g_dim == out_dim
    assert helper.batch_size(x) == (lead[0] if lead else 1)


conv_configs = st.fixed_dictionaries(
    {
        "groups": st.sampled_from([1, 2]),
        "kernel": st.sampled_from([(1, 1), (3, 3), (2, 3)]),
        "stride": st.sampled_from([1, 2]),
        "padding": st.sampled_from([0, 1, (1, 2)]),
        "dilation": st.sampled_from([1, 2]),
        "bias": st.booleans(),
        "padding_mode": st.sampled_from(["zeros", "reflect", "circular"]),
    }
)


@given(cfg=conv_configs, batch=st.integers(1, 2), size=st.integers(5, 7))
def test_conv_patches_match_explicit_loops_and_reproduce_the_gradient(cfg, batch, size):
    groups = cfg["groups"]
    layer = nn.Conv2d(
        2 * groups,
        2 * groups,
        cfg["kernel"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        dilation=cfg["dilation"],
        groups=groups,
        bias=cfg["bias"],
        padding_mode=cfg["padding_mode"],
    ).double()
    x = torch.randn(batch, 2 * groups, size, size, dtype=torch.float64)
    g_out = _output_grad(layer, x)
    helper = Conv2dHelper(layer, "conv")
    a = helper.a_rows(x)
    patches = dense_conv_patches(x, layer)
    if cfg["bias"]:
        patches = torch.cat([patches, torch.ones(*patches.shape[:2], 1, dtype=torch.float64)], 2)
    assert torch.equal(a, patches)  # padding and unfolding copy: exact
    g = helper.g_rows(g_out)
    assert torch.equal(g, grad_rows(g_out, groups))
    _check_gradient(g, a, layer, groups)
    assert helper.batch_size(x) == batch


def test_conv_same_padding_and_unbatched_input():
    layer = nn.Conv2d(2, 3, (3, 2), padding="same").double()
    x = torch.randn(2, 5, 5, dtype=torch.float64)  # unbatched
    g_out = _output_grad(layer, x)
    helper = Conv2dHelper(layer, "conv")
    a, g = helper.a_rows(x), helper.g_rows(g_out)
    _check_gradient(g, a, layer)
    assert helper.batch_size(x) == 1


def test_grad_matrix_round_trip():
    layer = nn.Conv2d(4, 6, 3, groups=2)
    for p in layer.parameters():
        p.grad = torch.randn_like(p)
    helper = Conv2dHelper(layer, "c")
    grads = {p: p.grad for p in layer.parameters()}
    mat = helper.grad_matrix(grads)
    assert mat.shape == (2, 3, 2 * 9 + 1)
    back = helper.split_matrix(mat)
    for p in layer.parameters():
        assert torch.equal(back[p], p.grad)


def test_frozen_bias_is_not_folded_in():
    layer = nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    helper = LinearHelper(layer, "fc")
    assert not helper.has_bias and helper.a_dim == 3 and helper.params == [layer.weight]
    with pytest.raises(ValueError, match="no trainable bias"):
        LinearHelper(layer, "fc", include_bias=True)


def test_registry_resolves_subclasses_and_accepts_new_helpers():
    class MyLinear(nn.Linear):
        pass

    assert helper_class_for(MyLinear(2, 2)) is LinearHelper
    assert helper_class_for(nn.PReLU()) is None
    with pytest.raises(TypeError, match="LayerHelper subclass"):
        register_layer_helper(nn.PReLU, object)

    class Bilinear(LinearHelper):
        pass

    register_layer_helper(MyLinear, Bilinear)
    try:
        assert helper_class_for(MyLinear(2, 2)) is Bilinear
    finally:
        from secondorder.layers import _REGISTRY

        del _REGISTRY[MyLinear]
