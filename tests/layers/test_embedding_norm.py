"""Embedding (diagonal A), normalisation layers (per-channel blocks) and tied weights,
against float64 dense references."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secondorder import KFAC

from ..helpers import assert_close, exact_kfac, kron_precondition, with_ones


def _read_back(weight, expected) -> float:
    """The scale of a step read back as ``w − w'``: the size of the weights, to which
    ``w'`` is rounded, plus the step's own."""
    return float(weight.detach().abs().max() + expected.abs().max())


def _kron_cond(a, g, damping):
    """cond(A ⊗ G + λI): what the damped Kronecker solve amplifies round-off by."""
    big = torch.kron(a, g)
    return float(torch.linalg.cond(big + damping * torch.eye(big.shape[0], dtype=big.dtype)))


def _delta(model, opt, loss_fn):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt.zero_grad()
    loss_fn().backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    opt.step()
    return {n: before[n] - p.detach() for n, p in params.items()}, grads


# ---- Embedding ---------------------------------------------------------------------------
def test_one_token_embedding_kronecker_block_is_the_exact_fisher():
    torch.manual_seed(0)
    emb = nn.Embedding(7, 3).double()
    opt = exact_kfac(emb)
    tokens = torch.tensor([4])
    (emb(tokens) ** 3).sum().backward()
    opt.estimator.update(opt.capture.collect())
    a, g = opt.estimator.factors("")
    assert a.shape == (1, 7)  # the diagonal, never a 7 x 7 matrix
    vec = emb.weight.grad.reshape(-1)  # column-major vec of the (D, V) view = rows of W
    fisher = torch.outer(vec, vec)
    # one token: A = 1, g gᵀ and the gradient row are single products, then kron / outer
    assert_close(torch.kron(torch.diag(a[0]), g[0]), fisher, n=4)


@settings(max_examples=15, deadline=None)
@given(
    vocab=st.integers(2, 9),
    dim=st.integers(1, 4),
    batch=st.integers(1, 3),
    length=st.integers(1, 4),
    padding=st.booleans(),
    damping=st.sampled_from([1e-3, 1e-1, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_embedding_direction_is_the_dense_kronecker_solve(
    vocab, dim, batch, length, padding, damping, seed
):
    torch.manual_seed(seed)
    emb = nn.Embedding(vocab, dim, padding_idx=0 if padding else None).double()
    head = nn.Linear(dim, 2).double().requires_grad_(False)
    model = nn.Sequential(emb, head)
    tokens = torch.randint(0, vocab, (batch, length))
    y = torch.randint(0, 2, (batch,))

    def loss():
        return F.cross_entropy(model(tokens).mean(1), y)

    # the statistics, by hand: A = token counts / rows (padding not counted), G = n Σ g gᵀ
    out = emb(tokens)
    out.retain_grad()
    F.cross_entropy(head(out).mean(1), y).backward()
    ids = tokens.reshape(-1)
    counts = torch.bincount(ids[ids != 0] if padding else ids, minlength=vocab).double()
    a = torch.diag(counts / ids.numel())
    g_rows = out.grad.reshape(-1, dim)
    g = batch * g_rows.T @ g_rows
    emb.zero_grad()

    opt = exact_kfac(model, damping=damping)  # after the pass above, which it must not see
    delta, grads = _delta(model, opt, loss)
    expected = kron_precondition(a, g, grads["0.weight"].T, damping).T
    # G sums the token rows; factors of sizes vocab and dim; a damped solve
    n = ids.numel() + vocab + dim
    scale = _read_back(emb.weight, expected)
    assert_close(delta["0.weight"], expected, n=n, cond=_kron_cond(a, g, damping), scale=scale)


# ---- normalisation layers ----------------------------------------------------------------
def _per_example_grads(model, norm, x, loss_fn):
    """Each example's gradient of (loss_n / n) for the norm's (weight, bias): (n, C, 2)."""
    rows = []
    n = x.shape[0]
    for i in range(n):
        model.zero_grad()
        (loss_fn(model(x[i : i + 1]), i) / n).backward()
        rows.append(torch.stack([norm.weight.grad.reshape(-1), norm.bias.grad.reshape(-1)], -1))
    model.zero_grad()
    return torch.stack(rows)


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 4),
    tokens=st.integers(1, 3),
    width=st.integers(1, 5),
    damping=st.sampled_from([1e-3, 1e-1]),
    mode=st.sampled_from(["full", "diagonal"]),
    seed=st.integers(0, 2**16),
)
def test_layernorm_blocks_are_the_exact_per_channel_fisher(
    batch, tokens, width, damping, mode, seed
):
    """LayerNorm acts per example, so its per-channel empirical Fisher blocks are exact:
    F_c = n Σ_n d_nc d_ncᵀ (d_n: example n's gradient of the batch-mean loss) and the
    direction is (F_c + λI)⁻¹ ∇_c."""
    torch.manual_seed(seed)
    norm = nn.LayerNorm(width).double()
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    head = nn.Linear(width, 3).double().requires_grad_(False)
    model = nn.Sequential(norm, head)
    x = torch.randn(batch, tokens, width, dtype=torch.float64)
    y = torch.randint(0, 3, (batch,))

    def loss_of(out, i=None):
        target = y if i is None else y[i : i + 1]
        return F.cross_entropy(out.mean(1), target)

    d = _per_example_grads(model, norm, x, loss_of)
    fisher = batch * torch.einsum("nci,ncj->cij", d, d)
    if mode == "diagonal":
        fisher = torch.diag_embed(torch.diagonal(fisher, dim1=1, dim2=2))
    opt = exact_kfac(model, damping=damping, layer_options={"norm_blocks": mode})
    delta, grads = _delta(model, opt, lambda: loss_of(model(x)))
    grad = torch.stack([grads["0.weight"], grads["0.bias"]], -1)
    # sums over the examples' tokens, bounded by the sum of their sizes
    rows = batch * tokens
    assert_close(grad, d.sum(0), n=rows, scale=float(d.abs().sum(0).max()))
    eye = torch.eye(2, dtype=torch.float64)
    expected = torch.linalg.solve(fisher + damping * eye, grad.unsqueeze(-1)).squeeze(-1)
    got = torch.stack([delta["0.weight"], delta["0.bias"]], -1)
    # Per-example gradients summed over tokens, blocks summed over examples, 2 x 2 solves
    # amplifying by their condition numbers; x̂ = (x − μ)/√(σ² + ε) cancels, so the library's
    # x̂ and autograd's differ by eps·|x|/√(σ² + ε) (width 1: x̂ is pure round-off). The
    # step is read back as w − w' (resolved to the size of the weights).
    cond = float(torch.linalg.cond(fisher + damping * eye).max())
    spread = (x.var(-1, unbiased=False) + norm.eps).sqrt()
    cond *= max(1.0, float((x.abs().amax(-1) / spread).max()))
    weights = max(float(p.detach().abs().max()) for p in norm.parameters())
    scale = float(expected.abs().max()) + weights
    assert_close(got, expected, n=rows + 2, cond=cond, scale=scale)


@pytest.mark.parametrize("kind", ["batchnorm1d", "batchnorm2d", "groupnorm"])
def test_one_example_norm_block_is_the_exact_fisher(kind):
    """With one example the block is d dᵀ with d the layer's gradient (scale, shift)."""
    torch.manual_seed(0)
    if kind == "batchnorm1d":
        norm, x = nn.BatchNorm1d(3), torch.randn(1, 3, 5)
    elif kind == "batchnorm2d":
        norm, x = nn.BatchNorm2d(3), torch.randn(1, 3, 4, 4)
    else:
        norm, x = nn.GroupNorm(1, 3), torch.randn(1, 3, 4, 4)
    norm = norm.double()
    nn.init.normal_(norm.weight)
    x = x.double()
    opt = exact_kfac(norm)
    (norm(x).sin() * torch.arange(x[0].numel()).reshape(x.shape[1:])).sum().backward()
    opt.estimator.update(opt.capture.collect())
    fisher, none = opt.estimator.factors("")
    assert none is None
    d = torch.stack([norm.weight.grad, norm.bias.grad], -1)
    # d sums the channel's positions (in another order than autograd), then products
    n = x[0].numel() // x.shape[1] + 2
    assert_close(fisher, torch.einsum("ci,cj->cij", d, d), n=n)


def test_batchnorm_per_example_contributions_sum_to_the_gradient():
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(4).double()
    nn.init.normal_(norm.weight)
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    opt = exact_kfac(norm)
    out = norm(x)
    (out.sin() * torch.randn_like(out)).sum().backward()
    layer = opt.estimator.layers[0]
    acc = opt.capture.collect()[""]
    assert acc.examples == 5
    # recompute the per-example contributions from the helper and check their sum
    norm.eval()  # the running stats changed; rebuild x̂ with the batch stats by hand
    x_hat = (x - x.mean((0, 2, 3), keepdim=True)) / (
        x.var((0, 2, 3), unbiased=False, keepdim=True) + norm.eps
    ).sqrt()
    norm.train()
    # means and variances over 5 x 3 x 3 entries per channel
    assert_close(layer.normalized(x), x_hat, n=45)


def test_norm_blocks_option_is_checked():
    with pytest.raises(ValueError, match="norm_blocks must be one of"):
        KFAC(
            nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)),
            layer_options={"norm_blocks": "x"},
            graft=None,
        )
    with pytest.raises(ValueError, match="layer_options: unknown option"):
        KFAC(nn.Linear(2, 2), layer_options={"nope": 1}, graft=None)


# ---- a transformer-ish model -------------------------------------------------------------
class _TokenModel(nn.Module):
    def __init__(self, vocab=11, dim=6, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.out(self.norm(torch.tanh(self.fc(self.emb(tokens))))).mean(1)


def test_embedding_linear_layernorm_linear_every_parameter_is_covered_and_moves():
    torch.manual_seed(0)
    model = _TokenModel()
    opt = KFAC(model, lr=0.1, curvature_every=1, inverse_every=1, graft=None)
    assert opt.uncovered_parameters == []
    assert {layer.kind for layer in opt.estimator.layers} == {"kronecker", "blocks"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens, y = torch.randint(0, 11, (4, 5)), torch.randint(0, 3, (4,))
    F.cross_entropy(model(tokens), y).backward()
    opt.step()
    for name, p in model.named_parameters():
        assert not torch.equal(before[name], p), f"{name} did not move"
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("inverse_method", ["eigen", "cholesky"])
def test_state_dict_round_trip_with_embedding_and_norm_layers(inverse_method):
    torch.manual_seed(0)
    model = _TokenModel()
    kwargs = dict(lr=0.05, curvature_every=1, inverse_every=3, inverse_method=inverse_method)
    if inverse_method == "cholesky":
        kwargs["damping_mode"] = "factored"
    data = [(torch.randint(0, 11, (4, 5)), torch.randint(0, 3, (4,))) for _ in range(8)]

    def run(m, opt, batches):
        for tokens, y in batches:
            opt.zero_grad()
            F.cross_entropy(m(tokens), y).backward()
            opt.step()

    reference = copy.deepcopy(model)
    opt_ref = KFAC(reference, **kwargs, graft=None)
    run(reference, opt_ref, data)

    first = copy.deepcopy(model)
    opt_first = KFAC(first, **kwargs, graft=None)
    run(first, opt_first, data[:4])
    state = copy.deepcopy(opt_first.state_dict())
    second = copy.deepcopy(first)
    opt_second = KFAC(second, **kwargs, graft=None)
    opt_second.load_state_dict(state)
    run(second, opt_second, data[4:])
    for p, q in zip(reference.parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q)


# ---- tied weights ------------------------------------------------------------------------
class _Tied(nn.Module):
    """The same square weight used by two Linear modules, each with its own bias."""

    def __init__(self, width=4, second_bias=True):
        super().__init__()
        self.first = nn.Linear(width, width)
        self.second = nn.Linear(width, width, bias=second_bias)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


@pytest.mark.parametrize("second_bias", [True, False])
def test_tied_weight_pools_statistics_and_is_updated_once(second_bias):
    torch.manual_seed(0)
    model = _Tied(second_bias=second_bias).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    y = torch.randn(3, 4, dtype=torch.float64)
    # the statistics by hand: rows of both modules pooled; the second module's rows get
    # a 0 in the (first module's) bias column
    h_in = x
    h = model.first(h_in)
    h.retain_grad()
    t = torch.tanh(h)
    out = model.second(t)
    out.retain_grad()
    F.mse_loss(out, y).backward()
    a_rows = torch.cat([with_ones(h_in), torch.cat([t, torch.zeros(3, 1).double()], 1)])
    g_rows = torch.cat([h.grad, out.grad])
    a = a_rows.T @ a_rows / a_rows.shape[0]
    g = 3 * g_rows.T @ g_rows  # 3 examples, counted once although two modules saw them
    model.zero_grad()

    opt = exact_kfac(model, damping=1e-2)
    layers = opt.estimator.layers
    assert [layer.name for layer in layers] == ["first"]
    assert [t.name for t in layers[0].tied] == ["second"]
    assert opt.uncovered_parameters == (["second.bias"] if second_bias else [])

    delta, grads = _delta(model, opt, lambda: F.mse_loss(model(x), y))
    grad = torch.cat([grads["first.weight"], grads["first.bias"][:, None]], 1)
    expected = kron_precondition(a, g, grad, 1e-2)
    got = torch.cat([delta["first.weight"], delta["first.bias"][:, None]], 1)
    # factors of 6 pooled rows, sizes 5 and 4, a damped solve
    scale = _read_back(model.first.weight, expected)
    assert_close(got, expected, n=6 + 5 + 4, cond=_kron_cond(a, g, 1e-2), scale=scale)
    if second_bias:  # the second bias gets the plain update (lr 1, no momentum)
        bias, want = model.second.bias, grads["second.bias"]
        assert_close(delta["second.bias"], want, n=2, scale=_read_back(bias, want))


def test_weight_tied_across_module_kinds_is_left_to_the_base_update():
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Linear(3, 3), nn.Tanh(), head)
    with pytest.warns(UserWarning, match="no curvature estimate for 1 parameter"):
        opt = KFAC(model, graft=None)
    assert opt.uncovered_parameters == ["0.weight"]
    assert [layer.name for layer in opt.estimator.layers] == ["1"]
    assert any("tied" in line for line in opt.left_out_layers)


def test_layer_run_twice_in_one_forward_counts_the_batch_once():
    layer = nn.Linear(3, 3)
    model = nn.Sequential(layer, nn.Tanh(), layer)
    opt = KFAC(model, graft=None)
    x = torch.randn(4, 3)
    model(x).sum().backward()  # one forward: 4 examples, 8 rows
    model(x[:2]).sum().backward()  # gradient accumulation: 2 more examples
    acc = opt.capture.collect()["0"]
    assert acc.rows == 12 and acc.examples == 6
