"""Convolutions of any dimensionality (Conv1d/2d/3d) against dense float64 references."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from secondorder import KFAC
from secondorder.layers import Conv1dHelper, Conv2dHelper, Conv3dHelper, helper_class_for

from ..helpers import (
    assert_close,
    damped_kron_cond,
    kfac_factors,
    kron_factored_precondition,
    kron_precondition,
    layer_grad_matrix,
    update_matrix,
)

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
HELPERS = {1: Conv1dHelper, 2: Conv2dHelper, 3: Conv3dHelper}


# ---- independent references (loops over output positions) -----------------------------
def _padded(x: Tensor, conv: nn.Module) -> Tensor:
    """``x`` padded as the forward pass pads it; asymmetric for ``padding='same'``."""
    if conv.padding == "valid":
        return x
    n = x.dim() - 2
    if conv.padding == "same":
        total = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
        before = [t // 2 for t in total]
        after = [t - b for t, b in zip(total, before, strict=True)]
    else:
        before = after = list(conv.padding)
    pad = [p for i in reversed(range(n)) for p in (before[i], after[i])]
    if conv.padding_mode == "zeros":
        return F.pad(x, pad)
    return F.pad(x, pad, mode=conv.padding_mode)


def dense_patches(x: Tensor, conv: nn.Module) -> Tensor:
    """``(groups, B * positions, C/groups * prod(k))``, rows (example, positions
    row-major), columns (channel, k1, ..., kN) as in the weight."""
    xp = _padded(x, conv)
    n = xp.dim() - 2
    extent = [d * (k - 1) + 1 for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
    sizes = [(xp.shape[2 + i] - extent[i]) // conv.stride[i] + 1 for i in range(n)]
    rows = []
    for b in range(xp.shape[0]):
        for pos in itertools.product(*map(range, sizes)):
            window = tuple(
                slice(p * s, p * s + e, d)
                for p, s, e, d in zip(pos, conv.stride, extent, conv.dilation, strict=True)
            )
            rows.append(xp[(b, slice(None), *window)].reshape(conv.groups, -1))
    return torch.stack(rows, dim=1)


def dense_grad_rows(grad_output: Tensor, groups: int) -> Tensor:
    """``(groups, B * positions, out/groups)`` from a ``(B, C_out, *positions)`` gradient."""
    b, c = grad_output.shape[:2]
    rows = grad_output.reshape(b, c, -1).transpose(1, 2).reshape(-1, groups, c // groups)
    return rows.transpose(0, 1)


def _ones_column(rows: Tensor) -> Tensor:
    return torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)


# ---- strategies ------------------------------------------------------------------------
@st.composite
def conv_cases(draw):
    """A convolution and a batch of inputs large enough for at least one output."""
    n = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2]))
    per_dim = st.lists(st.integers(1, 3), min_size=n, max_size=n)
    kernel = draw(per_dim)
    dilation = draw(st.sampled_from([1, 2]))
    padding = draw(
        st.one_of(
            st.sampled_from([0, 1, "same", "valid"]),
            st.lists(st.integers(0, 2), min_size=n, max_size=n).map(tuple),
        )
    )
    stride = 1 if padding == "same" else draw(st.sampled_from([1, 2]))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    bias = draw(st.booleans())
    # at least the dilated kernel extent (one output position), and at least 3 so that
    # a reflect padding of 2 is possible
    extra = st.integers(0, 1 if n == 3 else 2)
    spatial = [max(dilation * (k - 1) + 1 + draw(extra), 3) for k in kernel]
    conv = CONVS[n](
        2 * groups,
        2 * groups,
        tuple(kernel),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=padding_mode,
    ).double()
    batch = draw(st.integers(1, 2))
    x = torch.randn(batch, 2 * groups, *spatial, dtype=torch.float64)
    return conv, x


def _forward(conv: nn.Module, x: Tensor) -> Tensor:
    with warnings.catch_warnings():
        # padding='same' with an even dilated extent pads one side more: torch warns
        warnings.simplefilter("ignore", UserWarning)
        return conv(x)


def _weight_blocks(conv: nn.Module) -> Tensor:
    """``[W | b]`` as ``(groups, out/groups, cols)``."""
    w = conv.weight.detach().reshape(conv.groups, conv.out_channels // conv.groups, -1)
    if conv.bias is None:
        return w
    return torch.cat([w, conv.bias.detach().reshape(conv.groups, -1, 1)], dim=2)


# ---- rows --------------------------------------------------------------------------------
@settings(max_examples=30)
@given(case=conv_cases(), seed=st.integers(0, 2**16))
def test_rows_match_explicit_loops_and_reproduce_output_and_per_example_gradients(case, seed):
    torch.manual_seed(seed)
    conv, x = case
    groups = conv.groups
    helper = helper_class_for(conv)(conv, "conv")
    assert isinstance(helper, HELPERS[x.dim() - 2])
    out = _forward(conv, x)

    a = helper.a_rows(x)
    patches = dense_patches(x, conv)
    expected_a = _ones_column(patches) if conv.bias is not None else patches
    assert torch.equal(a, expected_a)  # padding and unfolding copy: exact
    assert a.shape == (groups, helper.rows_count(x), helper.a_dim)
    # the patches are what the forward pass multiplied (padding included): products of
    # inner dimension a_dim, bounded by |ã| |W|ᵀ
    weights = _weight_blocks(conv).transpose(1, 2)
    recomputed = (a @ weights).transpose(0, 1)  # (rows, groups, o)
    positions = out.shape[2:]
    recomputed = recomputed.reshape(x.shape[0], math.prod(positions), -1).transpose(1, 2)
    bound = float((a.abs() @ weights.abs()).max())
    assert_close(recomputed.reshape(out.shape), out.detach(), n=helper.a_dim, scale=bound)

    g_out = torch.randn_like(out)
    g = helper.g_rows(g_out)
    assert torch.equal(g, dense_grad_rows(g_out, groups))
    assert helper.batch_size(x) == x.shape[0]

    # example-major rows: each example's share of the rows is its own gradient
    batch = x.shape[0]
    a_ex = a.reshape(groups, batch, -1, helper.a_dim)
    g_ex = g.reshape(groups, batch, -1, helper.g_dim)
    for i in range(batch):
        conv.zero_grad()
        (_forward(conv, x[i : i + 1]) * g_out[i : i + 1]).sum().backward()
        per_example = g_ex[:, i].transpose(1, 2) @ a_ex[:, i]
        # sums over the example's rows, bounded by Σ |g| |ã|ᵀ
        bound = float((g_ex[:, i].abs().transpose(1, 2) @ a_ex[:, i].abs()).max())
        assert_close(per_example, layer_grad_matrix(conv, groups), n=a_ex.shape[2], scale=bound)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_unbatched_input_gives_the_rows_of_a_batch_of_one(n):
    conv = CONVS[n](2, 3, 2, padding=1, padding_mode="reflect").double()
    x = torch.randn(2, *[4] * n, dtype=torch.float64)
    helper = HELPERS[n](conv, "conv")
    g_out = torch.randn_like(conv(x))
    # the same copies of the same data
    assert torch.equal(helper.a_rows(x), helper.a_rows(x[None]))
    assert torch.equal(helper.g_rows(g_out), helper.g_rows(g_out[None]))
    assert helper.batch_size(x) == 1 and helper.batch_size(x[None]) == 1


@pytest.mark.parametrize("n", [1, 3])
def test_conv1d_and_conv3d_are_registered_and_round_trip_gradients(n):
    conv = CONVS[n](4, 6, 3, groups=2)
    helper = helper_class_for(conv)(conv, "c")
    assert type(helper) is HELPERS[n]
    assert helper.unbatched_dims == n + 1
    assert (helper.groups, helper.g_dim, helper.a_dim) == (2, 3, 2 * 3**n + 1)
    grads = {p: torch.randn_like(p) for p in conv.parameters()}
    back = helper.split_matrix(helper.grad_matrix(grads))
    for p in conv.parameters():
        assert torch.equal(back[p], grads[p])


# ---- exactness with one example and one output position --------------------------------
@settings(max_examples=20)
@given(
    n=st.sampled_from([1, 2, 3]),
    groups=st.sampled_from([1, 2]),
    kernel=st.integers(1, 3),
    dilation=st.sampled_from([1, 2]),
    stride=st.sampled_from([1, 2]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_one_position_one_example_kronecker_block_is_the_exact_fisher(
    n, groups, kernel, dilation, stride, bias, seed
):
    """Input extent = dilated kernel, no padding: one output position, and K-FAC's
    ``A ⊗ G`` (A = ã ãᵀ, G = 1·g gᵀ) is vec(∇) vec(∇)ᵀ of each group."""
    torch.manual_seed(seed)
    conv = CONVS[n](
        2 * groups, 3 * groups, kernel, stride=stride, dilation=dilation, groups=groups, bias=bias
    ).double()
    x = torch.randn(1, 2 * groups, *[dilation * (kernel - 1) + 1] * n, dtype=torch.float64)
    opt = KFAC(conv, curvature_every=1, factor_dtype=torch.float64, graft=None)
    out = conv(x)
    assert out.shape[2:].numel() == 1
    out.sin().sum().backward()
    opt.estimator.update(opt.capture.collect())
    a, g = opt.estimator.factors("")
    grad = layer_grad_matrix(conv, groups)
    for grp in range(groups):
        vec = grad[grp].T.reshape(-1)  # column-major vec, as torch.kron(A, G) expects
        # one row: ã ãᵀ, g gᵀ and g ãᵀ are single products, then kron / outer: 2 roundings
        # on each side
        assert_close(torch.kron(a[grp], g[grp]), torch.outer(vec, vec), n=4)


# ---- end-to-end K-FAC step ---------------------------------------------------------------
def _reference(a, g, grad, damping, mode):
    fn = kron_precondition if mode == "eigen" else kron_factored_precondition
    return torch.stack([fn(a[i], g[i], grad[i], damping) for i in range(a.shape[0])])


@settings(max_examples=15)
@given(
    n=st.sampled_from([1, 3]),
    groups=st.sampled_from([1, 2]),
    kernel=st.sampled_from([1, 2, 3]),
    stride=st.sampled_from([1, 2]),
    padding=st.sampled_from([0, 1]),
    bias=st.booleans(),
    damping=st.floats(1e-4, 10.0),
    mode=st.sampled_from([("eigen", "eigen"), ("eigen", "factored"), ("cholesky", "factored")]),
    seed=st.integers(0, 2**16),
)
def test_kfac_step_on_conv1d_and_conv3d_models_equals_dense_kronecker_solve(
    n, groups, kernel, stride, padding, bias, damping, mode, seed
):
    torch.manual_seed(seed)
    conv = CONVS[n]
    model = nn.Sequential(
        conv(2 * groups, 2 * groups, kernel, stride=stride, padding=padding, groups=groups),
        nn.Tanh(),
        conv(2 * groups, 2, 2, padding=1, bias=bias),
    ).double()
    convs = [model[0], model[2]]
    seen = {}

    def keep(module, args, output):
        output.retain_grad()
        seen[module] = (args[0].detach(), output)

    for c in convs:
        c.register_forward_hook(keep)
    opt = KFAC(
        model,
        lr=1.0,
        momentum=0.0,
        damping=damping,
        curvature_every=1,
        inverse_every=1,
        kl_clip=None,
        inverse_method=mode[0],
        damping_mode=mode[1],
        factor_dtype=torch.float64,
        inverse_dtype=torch.float64,
        graft=None,
    )
    batch = 2
    x = torch.randn(batch, 2 * groups, *[4 if n == 1 else 3] * n, dtype=torch.float64)
    (model(x).sin() ** 2).mean().backward()
    grads = [layer_grad_matrix(c, c.groups) for c in convs]
    before = [[p.detach().clone() for p in c.parameters()] for c in convs]
    opt.step()
    for c, grad, old in zip(convs, grads, before, strict=True):
        inputs, out = seen[c]
        patches = dense_patches(inputs, c)
        patches = _ones_column(patches) if c.bias is not None else patches
        a, g = kfac_factors(patches, dense_grad_rows(out.grad, c.groups), batch)
        expected = _reference(a, g, grad, float(damping), mode[1])
        delta = [b - p.detach() for b, p in zip(old, c.parameters(), strict=True)]
        # factors summed over the rows, decomposed (sizes a_dim and g_dim), then a solve
        # that amplifies by the condition number of the damped matrix
        # (the step is read back as w − w': resolved to the size of the weights)
        n = patches.shape[1] + a.shape[-1] + g.shape[-1]
        cond = damped_kron_cond(a, g, float(damping), mode[1])
        scale = float(expected.abs().max()) + max(float(w.abs().max()) for w in old)
        assert_close(update_matrix(delta, c), expected, n=n, cond=cond, scale=scale)
