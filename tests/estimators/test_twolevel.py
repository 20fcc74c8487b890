"""Two-level K-FAC against dense float64 references: the cross-layer Kronecker Fisher
assembled block by block, the coarse space R0 written out, pooled row sums by hand."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from secondorder import KFAC, TwoLevelKFAC

from ..helpers import (
    assert_close,
    dense_conv_patches,
    grad_rows,
    mlp,
    small_cnn,
    train_digits,
    with_ones,
)

dampings = st.floats(1e-3, 1.0).map(float)


def _float64_opt(model, **kwargs):
    """One update sets the factors (the ramp), lr 1 and no momentum: the step is -u."""
    options = dict(
        lr=1.0,
        momentum=0.0,
        curvature_every=1,
        inverse_every=1,
        kl_clip=None,
        factor_dtype=torch.float64,
        inverse_dtype=torch.float64,
    )
    return TwoLevelKFAC(model, **{**options, **kwargs}, graft=None)


def _record(layers):
    """Forward hooks keeping each layer's input and (gradient-retaining) output."""
    seen = {}

    def hook(module, args, out):
        out.retain_grad()
        seen[module] = (args[0].detach(), out)

    handles = [layer.register_forward_hook(hook) for layer in layers]
    return seen, handles


def _step_direction(model, opt, loss):
    before = [p.detach().clone() for p in model.parameters()]
    loss.backward()
    opt.step()
    return [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]


def _vec(weight, bias):
    """Column-major vec of ``[W | b]`` (the order of ``A ⊗ G``)."""
    mat = weight if bias is None else torch.cat([weight, bias[:, None]], dim=1)
    return mat.T.reshape(-1)


def _cross_layer_fisher(a, g, batch):
    """The dense Fisher from cross-layer Kronecker blocks ``A_ij ⊗ G_ij``,
    ``A_ij = mean ã_i ã_jᵀ``, ``G_ij = n Σ g_i g_jᵀ`` (rows of every layer, same order)."""
    rows = a[0].shape[0]
    return torch.cat(
        [
            torch.cat(
                [torch.kron(a[i].T @ a[j] / rows, batch * g[i].T @ g[j]) for j in range(len(a))],
                dim=1,
            )
            for i in range(len(a))
        ]
    )


def _unvec(vec, layer):
    cols = layer.in_features + (layer.bias is not None)
    mat = vec.reshape(cols, layer.out_features).T
    return [mat] if layer.bias is None else [mat[:, :-1], mat[:, -1]]


# ---- the preconditioner against the explicit formula -------------------------------------
@given(
    sizes=st.lists(st.integers(1, 5), min_size=3, max_size=4),
    batch=st.integers(1, 7),
    seq=st.sampled_from([None, 3]),
    bias=st.booleans(),
    damping=dampings,
    coarse_damping=st.one_of(st.none(), dampings),
    w1=st.sampled_from([1.0, 0.5]),
    w2=st.sampled_from([1.0, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_mlp_direction_equals_dense_two_level_formula(
    sizes, batch, seq, bias, damping, coarse_damping, w1, w2, seed
):
    """One row per example (or every example a sequence of 3 tokens, all layers sharing
    them): the coarse matrix is exactly R0 F R0ᵀ."""
    torch.manual_seed(seed)
    model = mlp(sizes, bias=bias).double()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    opt = _float64_opt(model, damping=damping, coarse_damping=coarse_damping, w1=w1, w2=w2)
    seen, _ = _record(linears)
    shape = (batch, sizes[0]) if seq is None else (batch, seq, sizes[0])
    x = torch.randn(shape, dtype=torch.float64)
    direction = _step_direction(model, opt, (model(x).tanh() ** 2).sum() / batch)

    # cross-layer Kronecker blocks A_ij ⊗ G_ij, A_ij = mean ã_i ã_jᵀ, G_ij = n Σ g_i g_jᵀ
    a = [seen[m][0].reshape(-1, m.in_features) for m in linears]
    a = [with_ones(rows) if bias else rows for rows in a]
    g = [seen[m][1].grad.reshape(-1, m.out_features) for m in linears]
    rows = a[0].shape[0]
    fisher = _cross_layer_fisher(a, g, batch)
    grads = [_vec(m.weight.grad, None if m.bias is None else m.bias.grad) for m in linears]
    dims = [v.numel() for v in grads]
    r0 = torch.block_diag(*[torch.ones(1, d, dtype=torch.float64) for d in dims])
    coarse = r0 @ fisher @ r0.T
    lam_c = damping if coarse_damping is None else coarse_damping
    correction = r0.T @ torch.linalg.solve(
        coarse + lam_c * torch.eye(len(dims), dtype=torch.float64), r0 @ torch.cat(grads)
    )
    offsets = [0, *torch.tensor(dims).cumsum(0).tolist()]
    # the size of the two terms of w1·fine + w2·correction, which may cancel: the
    # correction's right-hand side sums every gradient entry, so its round-off is bounded
    # through |ρ⁻¹| R0 |∇| (ρ the damped coarse matrix)
    inverse = torch.linalg.inv(coarse + lam_c * torch.eye(len(dims), dtype=torch.float64))
    correction_bound = r0.T @ (inverse.abs() @ (r0 @ torch.cat(grads).abs()))
    expected, scales = [], []
    for i, m in enumerate(linears):
        lo, hi = offsets[i], offsets[i + 1]
        block = fisher[lo:hi, lo:hi]
        fine = torch.linalg.solve(
            block + damping * torch.eye(dims[i], dtype=torch.float64), grads[i]
        )
        expected += _unvec(w1 * fine + w2 * correction[lo:hi], m)
        terms = w1 * fine.abs().max() + w2 * correction_bound[lo:hi].max()
        scales += [float(terms)] * (2 if bias else 1)

    # Each coarse entry sums rows x the products of two layers' row sums: its round-off is
    # bounded by the same sum of |terms|, the coarse matrix of |ã| and |g|.
    bound = r0 @ _cross_layer_fisher([t.abs() for t in a], [t.abs() for t in g], batch) @ r0.T
    n = rows + max(dims)
    assert_close(opt.estimator.coarse_matrix(), coarse, n=n, scale=float(bound.max()))

    # the fine solves (factors of rows rows, blocks of size up to max(dims)) and the coarse
    # solve amplify by their damped condition numbers
    def damped_cond(matrix, lam):
        return float(torch.linalg.cond(matrix + lam * torch.eye(len(matrix), dtype=matrix.dtype)))

    cond = max(
        damped_cond(coarse, lam_c),
        *(damped_cond(fisher[lo:hi, lo:hi], damping) for lo, hi in itertools.pairwise(offsets)),
    )
    # steps read back as w − w': resolved to the size of the weights
    weights = max(float(p.detach().abs().max()) for p in model.parameters())
    for got, want, scale in zip(direction, expected, scales, strict=True):
        assert_close(got, want, n=n, cond=cond, scale=scale + weights)


# ---- the pooled coarse matrix by hand -----------------------------------------------------
def _pooled_row_sums(conv, x, grad_out, target, pooling, absolute=False):
    """Per-example row sums of ``conv`` pooled to ``target``: ``(n, groups, P)`` each
    (of ``|ã|`` and ``|g|`` with ``absolute``: a bound on the round-off of the sums)."""
    groups = conv.groups
    patches = dense_conv_patches(x, conv)
    if conv.bias is not None:
        patches = torch.cat([patches, torch.ones(*patches.shape[:2], 1, dtype=x.dtype)], 2)
    g_rows = grad_rows(grad_out, groups)
    if absolute:
        patches, g_rows = patches.abs(), g_rows.abs()
    n, (h, w) = x.shape[0], grad_out.shape[2:]
    sums_a = patches.sum(-1).reshape(groups, n, h, w).transpose(0, 1)
    sums_g = g_rows.sum(-1).reshape(groups, n, h, w).transpose(0, 1)

    def pool(t):
        t = t.reshape(n * groups, 1, h, w)
        if pooling == "area":
            t = F.adaptive_avg_pool2d(t, target)
        else:
            t = F.interpolate(t, size=target, mode="nearest")
        return t.reshape(n, groups, -1)

    scale = h * w / math.prod(target)
    return pool(sums_a), pool(sums_g) * scale


def _coarse_by_hand(units_a, units_g, owners, n_layers):
    """``Σ_{u∈i, v∈j} E_rows[s^a_u s^a_v] · n Σ_rows s^g_u s^g_v`` over pooled rows."""
    sa = torch.cat(units_a, dim=1)  # (n, units, P)
    sg = torch.cat(units_g, dim=1)
    n, _, positions = sa.shape
    a_c = torch.einsum("nup,nvp->uv", sa, sa) / (n * positions)
    g_c = n * torch.einsum("nup,nvp->uv", sg, sg)
    r0 = F.one_hot(torch.tensor(owners), n_layers).double()
    return r0.T @ (a_c * g_c) @ r0


class _ConvNet(nn.Module):
    """Convolutions with output grids 6x6, 3x3 and 2x2 (5x5, 3x3, 2x2 with ``odd``: cells
    that overlap), the last one grouped, and optionally a Linear head (grid 1)."""

    def __init__(self, odd: bool, head: bool, bias: bool):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, bias=bias)
        self.c2 = nn.Conv2d(4, 4, 3, stride=1 if odd else 2, padding=0 if odd else 1, bias=bias)
        self.c3 = nn.Conv2d(4, 4, 2, groups=2, bias=True)
        self.head = nn.Linear(16, 3, bias=bias) if head else None

    def forward(self, x):
        y = self.c3(torch.tanh(self.c2(torch.tanh(self.c1(x)))))
        if self.head is not None:
            y = self.head(torch.tanh(y).flatten(1)[:, :16])
        return y


@pytest.mark.parametrize("pooling", ["area", "nearest"])
@pytest.mark.parametrize(("odd", "head"), [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_coarse_matrix_equals_the_pooled_formula(pooling, odd, head, bias):
    torch.manual_seed(1)
    model = _ConvNet(odd, head, bias).double()
    convs = [model.c1, model.c2, model.c3]
    opt = _float64_opt(model, coarse_pooling=pooling)
    seen, _ = _record([*convs, *([model.head] if head else [])])
    n = 3
    x = torch.randn(n, 2, 5 if odd else 6, 5 if odd else 6, dtype=torch.float64)
    out = model(x)
    (out.sin() ** 2).sum().backward()
    opt.step()

    grids = [tuple(seen[c][1].shape[2:]) for c in convs]
    assert grids == ([(5, 5), (3, 3), (2, 2)] if odd else [(6, 6), (3, 3), (2, 2)])
    target = (1, 1) if head else grids[-1]

    def coarse(absolute):
        units_a, units_g, owners = [], [], []
        for i, conv in enumerate(convs):
            inputs, grads = seen[conv][0], seen[conv][1].grad
            sa, sg = _pooled_row_sums(conv, inputs, grads, target, pooling, absolute)
            units_a.append(sa)
            units_g.append(sg)
            owners += [i] * conv.groups
        if head:
            a = seen[model.head][0]
            a, g = (with_ones(a) if bias else a), seen[model.head][1].grad
            if absolute:
                a, g = a.abs(), g.abs()
            units_a.append(a.sum(-1)[:, None, None])
            units_g.append(g.sum(-1)[:, None, None])
            owners.append(len(convs))
        return _coarse_by_hand(units_a, units_g, owners, len(convs) + head)

    expected = coarse(absolute=False)
    got = opt.estimator.coarse_matrix()
    assert [layer.name for layer in opt.estimator.coarse_layers] == [
        "c1",
        "c2",
        "c3",
        *(["head"] if head else []),
    ]
    # row sums of up to 4·9 + 1 patch entries, pooled, and products summed over the
    # 3 x 36 positions: bounded by the same sums of |terms|
    bound = coarse(absolute=True)
    assert_close(got, expected, n=37 + 3 * 36, scale=float(bound.max()))


def test_same_grid_convs_coarse_matrix_is_exact_r0_f_r0t():
    """Two convolutions with the same output grid: no pooling, and the coarse matrix is
    R0 F R0ᵀ with F assembled from dense cross-layer Kronecker blocks."""
    torch.manual_seed(2)
    c1, c2 = nn.Conv2d(2, 3, 3, padding=1).double(), nn.Conv2d(3, 2, 1).double()
    model = nn.Sequential(c1, nn.Tanh(), c2)
    opt = _float64_opt(model)
    seen, _ = _record([c1, c2])
    n = 2
    x = torch.randn(n, 2, 4, 4, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    opt.step()
    a, g = [], []
    for conv in (c1, c2):
        patches = dense_conv_patches(seen[conv][0], conv)[0]
        a.append(with_ones(patches))
        g.append(grad_rows(seen[conv][1].grad)[0])
    rows = a[0].shape[0]
    fisher = _cross_layer_fisher(a, g, n)
    dims = [a[i].shape[1] * g[i].shape[1] for i in (0, 1)]
    r0 = torch.block_diag(*[torch.ones(1, d, dtype=torch.float64) for d in dims])
    # sums over the rows of products of row sums (of at most 2·9 + 1 entries), bounded by
    # the same sums of |terms|
    bound = r0 @ _cross_layer_fisher([t.abs() for t in a], [t.abs() for t in g], n) @ r0.T
    coarse = opt.estimator.coarse_matrix()
    assert_close(coarse, r0 @ fisher @ r0.T, n=rows + max(dims), scale=float(bound.max()))


@pytest.mark.parametrize(
    ("size_in", "size_out"), [((6, 6), (2, 2)), ((5, 7), (3, 2)), ((4, 3), (4, 1))]
)
def test_generic_pooling_paths_match_torch(size_in, size_out):
    """Grids of rank > 3 take the per-dimension path; nearest uses index arithmetic."""
    from secondorder.estimators.twolevel import _pool

    sums = torch.randn(3, 2, math.prod(size_in), dtype=torch.float64)
    images = sums.reshape(3, 2, *size_in)
    area = F.adaptive_avg_pool2d(images, size_out).reshape(3, 2, -1)
    nearest = F.interpolate(images, size=size_out, mode="nearest").reshape(3, 2, -1)
    # a mean over a cell of at most ceil(in/out) + 1 entries per dimension, bounded by the
    # largest entry; nearest picks entries: exact
    cell = math.prod(-(-i // o) + 1 for i, o in zip(size_in, size_out, strict=True))
    for grid, target in ((size_in, size_out), ((1, 1, *size_in), (1, 1, *size_out))):
        got = _pool(sums, grid, target, "area")
        assert_close(got, area, n=cell, scale=float(sums.abs().max()))
        assert torch.equal(_pool(sums, grid, target, "nearest"), nearest)


def test_coarse_matrix_is_an_ema_with_the_kfac_ramp():
    torch.manual_seed(5)
    model = mlp([3, 4, 2]).double()
    batches = [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]

    def one_step(opt, x):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        return opt.estimator.coarse_matrix()

    fresh = [one_step(_float64_opt(model, lr=0.0), x) for x in batches]
    opt = _float64_opt(model, lr=0.0, factor_decay=0.6)
    got = [one_step(opt, x) for x in batches]
    assert torch.equal(got[0], fresh[0])  # the first update is the statistics: same code
    # an EMA step (lerp) against a·x + b·y: a few roundings relative to the larger term
    terms = float(max(f.abs().max() for f in fresh))
    assert_close(got[1], 0.5 * fresh[1] + 0.5 * fresh[0], n=3, scale=terms)
    assert_close(got[2], 0.4 * fresh[2] + 0.6 * got[1], n=3, scale=terms)


# ---- statistics: passes, exclusions -------------------------------------------------------
def test_gradient_accumulation_pairs_passes_and_sums_their_products():
    torch.manual_seed(3)
    model = mlp([3, 4, 2]).double()
    linears = [model[0], model[2]]
    opt = _float64_opt(model)
    seen, _ = _record(linears)
    units = {0: ([], []), 1: ([], [])}
    for batch in (2, 5):
        model(torch.randn(batch, 3, dtype=torch.float64)).pow(2).sum().backward()
        for i, m in enumerate(linears):
            units[i][0].append(with_ones(seen[m][0]))
            units[i][1].append(seen[m][1].grad)
    opt.step()

    def coarse(f=lambda t: t):
        # rows of all passes together; n = 7 examples in all
        sa = torch.stack([torch.cat([f(t) for t in units[i][0]]).sum(-1) for i in (0, 1)], 1)
        sg = torch.stack([torch.cat([f(t) for t in units[i][1]]).sum(-1) for i in (0, 1)], 1)
        return _coarse_by_hand([sa[..., None]], [sg[..., None]], [0, 1], 2)

    # 7 rows of products of row sums (at most 4 + 1 entries): bounded by the |terms|
    bound = coarse(torch.abs)
    assert_close(opt.estimator.coarse_matrix(), coarse(), n=7 + 5, scale=float(bound.max()))


def test_layer_run_twice_per_forward_is_left_out_of_the_coarse_update():
    torch.manual_seed(4)
    shared = nn.Linear(3, 3).double()
    head = nn.Linear(3, 2).double()

    class Net(nn.Module):
        def forward(self, x):
            return head(torch.tanh(shared(torch.tanh(shared(x)))))

    net = Net()
    net.shared, net.head = shared, head
    opt = _float64_opt(net)
    net(torch.randn(4, 3, dtype=torch.float64)).pow(2).sum().backward()
    opt.step()
    est = opt.estimator
    names = [layer.name for layer in est.coarse_layers]
    assert names == ["shared", "head"]
    matrix = est.coarse_matrix()
    assert matrix[0].abs().sum() == 0 and matrix[:, 0].abs().sum() == 0
    assert matrix[1, 1] > 0
    assert est._coarse_active == [1]  # the coarse space of the refresh: the head only


def test_layers_without_a_full_input_factor_have_no_coarse_row():
    """The coarse space holds the Kronecker layers with a full A, in module order."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    est = TwoLevelKFAC(model, graft=None).estimator
    assert [layer.name for layer in est.coarse_layers] == ["0", "2"]
    assert TwoLevelKFAC(model, w2=0.0, graft=None).estimator.coarse_layers == []


def test_layers_outside_the_coarse_space_get_w1_times_kfac():
    """Embedding (diagonal A) and LayerNorm (blocks) get ω1 times their K-FAC direction;
    the Linear layers get it plus one coarse value each."""
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Embedding(10, 4),
        nn.LayerNorm(4),
        nn.Flatten(),
        nn.Linear(12, 3),
        nn.Tanh(),
        nn.Linear(3, 3),
    ).double()
    kwargs = dict(damping=0.1, factor_dtype=torch.float64, inverse_dtype=torch.float64)
    opts = [
        TwoLevelKFAC(model, w1=0.5, **kwargs, graft=None),
        KFAC(model, **kwargs, graft=None),
    ]  # one backward feeds both
    x, y = torch.randint(0, 10, (5, 3)), torch.randint(0, 3, (5,))
    F.cross_entropy(model(x), y).backward()
    grads = {p: p.grad for p in model.parameters()}
    two_level, kfac = [opt.estimator for opt in opts]
    for opt in opts:
        opt.estimator.update(opt.capture.collect())
        opt.estimator.refresh(0.1)
    assert [layer.name for layer in two_level.coarse_layers] == ["3", "5"]
    got, fine = two_level.precondition(grads, 0.1), kfac.precondition(grads, 0.1)
    assert set(got) == set(fine) == set(model.parameters())
    # the fine directions are K-FAC's own code (KFACEstimator.precondition) run twice on
    # factors from the same backward; 0.5·u is exact
    for module in (model[0], model[1]):
        for p in module.parameters():
            assert torch.equal(got[p], 0.5 * fine[p])
    for module in (model[3], model[5]):
        # (0.5 u + c) − 0.5 u: two roundings relative to the larger term
        terms = float(got[module.weight].abs().max() + fine[module.weight].abs().max())
        shift = got[module.weight] - 0.5 * fine[module.weight]
        assert_close(shift, torch.full_like(shift, float(shift.flatten()[0])), n=2, scale=terms)
        bias_shift = got[module.bias] - 0.5 * fine[module.bias]
        terms = float(got[module.bias].abs().max() + fine[module.bias].abs().max())
        assert_close(bias_shift, shift[:, 0], n=2, scale=terms)


# ---- degenerate weights -------------------------------------------------------------------
def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _cnn_batches(count, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 1, 8, 8, generator=gen), torch.randint(0, 10, (6,), generator=gen))
        for _ in range(count)
    ]


def test_w2_zero_is_kfac_exactly():
    """w2 = 0 leaves no coarse space and w1 = 1 no scaling: K-FAC's code runs unchanged."""
    kwargs = dict(lr=0.05, damping=1e-2, curvature_every=1, inverse_every=2)
    torch.manual_seed(0)
    model = small_cnn()
    reference = copy.deepcopy(model)
    batches = _cnn_batches(5)
    ours = _train(model, TwoLevelKFAC(model, w2=0.0, **kwargs, graft=None), batches)
    theirs = _train(reference, KFAC(reference, **kwargs, graft=None), batches)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_w1_zero_gives_one_value_per_layer():
    torch.manual_seed(0)
    model = small_cnn()
    opt = TwoLevelKFAC(model, w1=0.0, damping=1e-2, curvature_every=1, inverse_every=1, graft=None)
    x, y = _cnn_batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    grads = {p: p.grad.clone() for p in model.parameters()}
    opt.step()
    directions = opt.estimator.precondition(grads, 1e-2)
    values = []
    for layer in (m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))):
        value = directions[layer.weight].flatten()[0]
        assert torch.all(directions[layer.weight] == value)
        assert torch.all(directions[layer.bias] == value)
        values.append(float(value))
    assert all(v != 0 for v in values)


# ---- persistence and arguments ------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(curvature_every=2, inverse_every=3),
        dict(curvature_every=1, inverse_every=4, coarse_pooling="nearest", coarse_damping=0.05),
        dict(curvature_every=1, inverse_every=3, base="adam", lr=1e-3, w1=0.5, w2=2.0),
    ],
)
@pytest.mark.parametrize("split", [4, 7])
def test_state_dict_round_trip_resumes_the_same_trajectory(kwargs, split):
    torch.manual_seed(0)
    model = small_cnn()
    reference = copy.deepcopy(model)
    kwargs = {"lr": 0.02, "damping": 0.1, **kwargs}
    batches = _cnn_batches(11)
    straight = _train(reference, TwoLevelKFAC(reference, **kwargs, graft=None), batches)

    opt = TwoLevelKFAC(model, **kwargs, graft=None)
    _train(model, opt, batches[:split])
    saved = copy.deepcopy(opt.state_dict())
    assert saved["curvature"]["estimator"]["coarse"]["matrix"].shape == (3, 3)
    model_state = copy.deepcopy(model.state_dict())

    torch.manual_seed(123)
    fresh_model = small_cnn()
    fresh_model.load_state_dict(model_state)
    fresh = TwoLevelKFAC(fresh_model, **kwargs, graft=None)
    fresh.load_state_dict(saved)
    resumed = _train(fresh_model, fresh, batches[split:])
    for a, b in zip(straight, resumed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_state_dict_with_other_coarse_layers_is_rejected():
    model = mlp([4, 5, 3])
    opt = TwoLevelKFAC(model, curvature_every=1, graft=None)
    _train(model, opt, [(torch.randn(3, 4), torch.tensor([0, 1, 2]))])
    with pytest.warns(UserWarning, match="no curvature estimate"):
        other = TwoLevelKFAC(model, skip_layers=["0"], graft=None)
    with pytest.raises(ValueError, match="coarse layers"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(w1=-1.0), ValueError, "w1 must be"),
        (dict(w1=float("inf")), ValueError, "w1 must be"),
        (dict(w2="1"), TypeError, "w2 must be a real number"),
        (dict(w2=-0.5), ValueError, "w2 must be"),
        (dict(w1=0.0, w2=0.0), ValueError, "w1 and w2 must not both be 0"),
        (dict(coarse_damping=0.0), ValueError, "coarse_damping must be"),
        (dict(coarse_damping=True), TypeError, "coarse_damping must be a real number"),
        (dict(coarse_pooling="max"), ValueError, "coarse_pooling must be one of"),
        (dict(factor_decay=1.0), ValueError, "factor_decay must be"),
        (dict(damping=0.0), ValueError, "damping must be"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, error, match):
    with pytest.raises(error, match=match):
        TwoLevelKFAC(mlp([4, 5, 3]), **kwargs, graft=None)


def test_passing_parameters_raises_type_error_naming_the_fix():
    with pytest.raises(TypeError, match=r"TwoLevelKFAC\(model, \.\.\.\)"):
        TwoLevelKFAC(mlp([4, 3]).parameters(), graft=None)


# ---- training -----------------------------------------------------------------------------
@pytest.mark.parametrize("lr", [0.02, 0.05])
def test_two_level_kfac_trains_digits_faster_than_sgd_at_the_same_learning_rate(lr):
    epochs = 4
    sgd = train_digits(lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), epochs)
    two_level = train_digits(
        lambda m: TwoLevelKFAC(
            m,
            lr=lr,
            momentum=0.9,
            damping=0.1,
            curvature_every=1,
            inverse_every=10,
            kl_clip=1e-2,
            graft=None,
        ),
        epochs,
    )
    print(f"digits loss after {epochs} epochs at lr={lr}: SGD {sgd:.4f}  two-level {two_level:.4f}")
    assert two_level < 0.5 * sgd
