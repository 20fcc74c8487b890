"""``nn.Linear`` over sequences: the ``linear_sequence`` option ("expand" / "reduce")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secondorder import KFAC
from secondorder.layers import LinearHelper

from ..helpers import assert_close, kfac_factors, layer_grad_matrix, tolerance, with_ones


def _empirical_fisher_block(layer: nn.Linear):
    vec = layer_grad_matrix(layer)[0].T.reshape(-1)  # column-major, as torch.kron(A, G)
    return torch.outer(vec, vec)


def _kronecker(helper: LinearHelper, x, g_out, batch: int):
    a, g = kfac_factors(helper.a_rows(x), helper.g_rows(g_out), batch)
    return torch.kron(a[0], g[0])


def _fisher_bound(layer: nn.Linear, x, g_out):
    """A bound on the round-off of the Fisher block's entries: the block of
    ``Σ_tokens |g| |ã|ᵀ`` (the gradient's terms, which may cancel)."""
    a = x[0]
    a = with_ones(a) if layer.bias is not None else a
    terms = (g_out[0].abs().T @ a.abs()).T.reshape(-1)  # column-major, as the Fisher
    return float(torch.outer(terms, terms).max())


def _one_example_pooled(in_dim, out_dim, tokens, bias, seed):
    """One example of ``tokens`` tokens through a Linear, then a mean over tokens:
    every token's output gradient is the same."""
    torch.manual_seed(seed)
    layer = nn.Linear(in_dim, out_dim, bias=bias).double()
    x = torch.randn(1, tokens, in_dim, dtype=torch.float64)
    out = layer(x)
    out.retain_grad()
    F.cross_entropy(out.mean(dim=1), torch.tensor([0])).backward()
    return layer, x, out.grad


@settings(max_examples=25)
@given(
    in_dim=st.integers(1, 5),
    out_dim=st.integers(2, 4),
    tokens=st.integers(1, 6),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_reduce_is_the_exact_fisher_when_tokens_are_pooled_after_the_layer(
    in_dim, out_dim, tokens, bias, seed
):
    layer, x, g_out = _one_example_pooled(in_dim, out_dim, tokens, bias, seed)
    # same gradient per token: the mean's backward hands each token the same value
    assert torch.equal(g_out, g_out[:, :1].expand_as(g_out))
    reduce = LinearHelper(layer, "fc", linear_sequence="reduce")
    # sums over the tokens (the mean input, the summed gradient; autograd's Σ g ãᵀ), then
    # the products of the Kronecker factors / the outer product
    assert_close(
        _kronecker(reduce, x, g_out, batch=1),
        _empirical_fisher_block(layer),
        n=tokens + 4,
        scale=_fisher_bound(layer, x, g_out),
    )


def test_expand_is_not_the_exact_fisher_when_tokens_are_pooled_after_the_layer():
    """The same setting as above: ``expand`` misses the cross-token terms, so the
    exactness test of ``reduce`` is one that a wrong choice fails."""
    layer, x, g_out = _one_example_pooled(in_dim=3, out_dim=3, tokens=4, bias=True, seed=0)
    fisher = _empirical_fisher_block(layer)
    expand = _kronecker(LinearHelper(layer, "fc"), x, g_out, batch=1)
    reduce = _kronecker(LinearHelper(layer, "fc", linear_sequence="reduce"), x, g_out, batch=1)
    assert_close(reduce, fisher, n=4 + 4, scale=_fisher_bound(layer, x, g_out))  # as above
    assert torch.linalg.norm(expand - fisher) > 0.3 * torch.linalg.norm(fisher)


@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=1),
    in_dim=st.integers(1, 4),
    bias=st.booleans(),
)
def test_reduce_equals_expand_without_positions(lead, in_dim, bias):
    layer = nn.Linear(in_dim, 3, bias=bias).double()
    x = torch.randn(*lead, in_dim, dtype=torch.float64)
    g_out = torch.randn(*lead, 3, dtype=torch.float64)
    expand = LinearHelper(layer, "fc")
    reduce = LinearHelper(layer, "fc", linear_sequence="reduce")
    assert torch.equal(reduce.a_rows(x), expand.a_rows(x))
    assert torch.equal(reduce.g_rows(g_out), expand.g_rows(g_out))


@given(
    positions=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    batch=st.integers(1, 3),
    bias=st.booleans(),
)
def test_reduce_rows_are_per_example_means_of_inputs_and_sums_of_gradients(positions, batch, bias):
    layer = nn.Linear(4, 3, bias=bias).double()
    x = torch.randn(batch, *positions, 4, dtype=torch.float64)
    g_out = torch.randn(batch, *positions, 3, dtype=torch.float64)
    helper = LinearHelper(layer, "fc", linear_sequence="reduce")
    a, g = helper.a_rows(x), helper.g_rows(g_out)
    tilde = with_ones(x.reshape(-1, 4)) if bias else x.reshape(-1, 4)
    per_example = tilde.reshape(batch, -1, tilde.shape[-1])
    expected_a = torch.stack([per_example[i].mean(dim=0) for i in range(batch)])
    expected_g = torch.stack([g_out[i].reshape(-1, 3).sum(dim=0) for i in range(batch)])
    # means and sums over the positions, bounded by the largest summand
    count = per_example.shape[1]
    assert_close(a, expected_a[None], n=count, scale=float(tilde.abs().max()))
    assert_close(g, expected_g[None], n=count, scale=count * float(g_out.abs().max()))
    assert helper.rows_count(x) == batch and helper.batch_size(x) == batch


def test_bad_linear_sequence_value_is_rejected():
    with pytest.raises(ValueError, match=r"linear_sequence.*'expand', 'reduce'.*'mean'"):
        LinearHelper(nn.Linear(2, 2), "fc", linear_sequence="mean")


def test_kfac_layer_option_reduce_builds_the_reduce_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    seen = {}

    def keep(module, args, output):
        output.retain_grad()
        seen[module] = (args[0].detach(), output)

    for layer in (model[0], model[2]):
        layer.register_forward_hook(keep)
    opt = KFAC(
        model,
        curvature_every=1,
        factor_dtype=torch.float64,
        layer_options={"linear_sequence": "reduce"},
    )
    assert [h.linear_sequence for h in opt.estimator.layers] == ["reduce", "reduce"]
    batch = 3
    x = torch.randn(batch, 6, 4, dtype=torch.float64)
    F.cross_entropy(model(x).mean(dim=1), torch.tensor([0, 1, 2])).backward()
    opt.step()
    for name, layer in (("0", model[0]), ("2", model[2])):
        inputs, out = seen[layer]
        a_reduce, g_reduce = opt.estimator.factors(name)
        for mode in ("reduce", "expand"):
            helper = LinearHelper(layer, name, linear_sequence=mode)
            rows_a, rows_g = helper.a_rows(inputs), helper.g_rows(out.grad)
            a, g = kfac_factors(rows_a, rows_g, batch)
            # the factors of the same rows, summed by the library and by matmul: round-off
            # bounded by |rows|ᵀ |rows| over the 3 (reduce) or 18 (expand) rows
            bounds = kfac_factors(rows_a.abs(), rows_g.abs(), batch)
            rtol = tolerance(torch.float64, n=rows_a.shape[1])
            same = all(
                torch.allclose(got, want, rtol=rtol, atol=rtol * float(bound.max()))
                for got, want, bound in zip((a_reduce, g_reduce), (a, g), bounds, strict=True)
            )
            assert same == (mode == "reduce"), (name, mode)


def test_unknown_layer_option_is_rejected():
    with pytest.raises(ValueError, match=r"unknown option.*linear_sequense"):
        KFAC(nn.Linear(2, 2), layer_options={"linear_sequense": "reduce"})
