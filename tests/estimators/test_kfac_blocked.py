"""K-FAC with blocked and diagonal factors (``max_factor_dim``, ``diagonal_factor_dim``,
``factor_memory``), ``describe()`` and refresh progress, against dense float64 references:
the step is ``(blockdiag(A) ⊗ blockdiag(G) + λI)⁻¹ vec ∇`` built explicitly."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secondorder as so
from secondorder import EKFAC, KFAC, TwoLevelKFAC
from secondorder.estimators import kfac as kfac_module
from secondorder.estimators.factor_layout import FactorLayout, choose_layout

from ..distributed.test_communicator import _digits_like_run, world_of_one  # noqa: F401
from ..helpers import (
    assert_close,
    damped_kron_cond,
    dense_conv_patches,
    grad_rows,
    kfac_factors,
    kron_factored_precondition,
    kron_precondition,
    layer_grad_matrix,
    update_matrix,
    with_ones,
)

FLOAT64 = {"factor_dtype": torch.float64, "inverse_dtype": torch.float64}
NO_LIMITS = {"max_factor_dim": None, "diagonal_factor_dim": None, "factor_memory": None}
MODES = [("eigen", "eigen"), ("eigen", "factored"), ("cholesky", "factored")]


# ---- the layout ---------------------------------------------------------------------------
def test_blocks_are_as_equal_as_possible_and_padding_round_trips():
    layout = FactorLayout.blocked(10, 4)
    assert (layout.kind, layout.blocks, layout.block_size) == ("blocks", 3, 4)
    assert layout.block_sizes() == [4, 3, 3]
    assert layout.describe() == "3 blocks of 4/3"
    assert FactorLayout.blocked(2049, 1024).block_sizes() == [683] * 3
    assert FactorLayout.blocked(8, 8).kind == "full"
    x = torch.randn(2, 5, 10, dtype=torch.float64)
    padded = layout.pad(x)
    assert padded.shape == (2, 5, 12)
    assert torch.equal(padded[..., 7], torch.zeros(2, 5, dtype=torch.float64))  # block 2's pad
    assert torch.equal(layout.unpad(padded), x)
    # the blocks' statistics are the diagonal blocks of the whole Σ x xᵀ
    stats = torch.empty(2, 3, 4, 4, dtype=torch.float64)
    kfac_module._side_update(layout, stats, x, beta=0.0)
    full = x.transpose(1, 2) @ x
    for i, (start, size) in enumerate(((0, 4), (4, 3), (7, 3))):
        assert_close(stats[:, i, :size, :size], full[:, start : start + size, start : start + size])
        assert not stats[:, i, size:].any() and not stats[:, i, :, size:].any()


def test_choose_layout_thresholds_and_budget():
    pick = lambda dim, **kw: choose_layout(dim, 1, 4, **{**NO_LIMITS, **kw})  # noqa: E731
    assert pick(100)[0].kind == "full"
    assert pick(100, max_factor_dim=40)[0].describe() == "3 blocks of 34/33"
    assert pick(100, diagonal_factor_dim=99, max_factor_dim=40)[0].kind == "diagonal"
    # 100² · 4 bytes = 40000 > 20000: the largest blocks that fit, and the change is reported
    layout, changed = pick(100, factor_memory=20000)
    assert changed and layout.kind == "blocks" and layout.numel(1) * 4 <= 20000
    assert layout.block_size >= 40  # not needlessly small: 100·b·4 ≈ 20000 at b = 50
    layout, changed = pick(100, factor_memory=500)  # no block of 2 fits either
    assert changed and layout.kind == "diagonal"


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_factor_dim", 0), ("diagonal_factor_dim", 1.5), ("factor_memory", True), ("progress", 1)],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        so.KFACConfig(**{field: value})


# ---- dense references ---------------------------------------------------------------------
def _blockdiag(f, layout):
    """The dense ``(groups, n, n)`` factor a layout stands for: the diagonal blocks of the
    full factor ``f``, or its diagonal."""
    if layout.kind == "full":
        return f
    if layout.kind == "diagonal":
        return torch.diag_embed(f.diagonal(dim1=-2, dim2=-1))
    mask = torch.block_diag(*[torch.ones(s, s) for s in layout.block_sizes()]).to(f)
    return f * mask


def _one_step(model, layer, x, loss_fn, damping, method, mode, **kw):
    """One K-FAC step with lr=1, no momentum: ``(update as a matrix, output grad, ∇, opt)``."""
    opt = KFAC(
        model, lr=1.0, momentum=0.0, damping=damping, curvature_every=1, inverse_every=1,
        kl_clip=None, graft=None, inverse_method=method, damping_mode=mode, **FLOAT64,
        **{**NO_LIMITS, **kw}
    )  # fmt: skip
    out = layer(x)
    out.retain_grad()
    loss_fn(out).backward()
    groups = getattr(layer, "groups", 1)
    grad = layer_grad_matrix(layer, groups)
    before = [p.detach().clone() for p in layer.parameters()]
    opt.step()
    delta = [b - p.detach() for b, p in zip(before, layer.parameters(), strict=True)]
    return update_matrix(delta, layer), out.grad, grad, opt


def _check(delta, a, g, grad, rows, damping, mode, layer, layouts):
    a_bd, g_bd = _blockdiag(a, layouts[0]), _blockdiag(g, layouts[1])
    fn = kron_precondition if mode == "eigen" else kron_factored_precondition
    expected = torch.stack([fn(a_bd[i], g_bd[i], grad[i], damping) for i in range(a.shape[0])])
    scale = float(expected.abs().max()) + max(
        float(p.detach().abs().max()) for p in layer.parameters()
    )
    n = rows + a.shape[-1] + g.shape[-1]
    cond = damped_kron_cond(a_bd, g_bd, damping, mode)
    assert_close(delta, expected, n=n, cond=cond, scale=scale)


@pytest.mark.parametrize(("method", "mode"), MODES)
@pytest.mark.parametrize(
    ("in_dim", "out_dim", "kinds"),
    [(9, 4, ("blocks", "full")), (3, 10, ("full", "blocks")), (9, 10, ("blocks", "blocks"))],
    ids=["A-only", "G-only", "both"],
)
def test_blocked_linear_step_equals_dense_blockdiag_kronecker_solve(
    in_dim, out_dim, kinds, method, mode
):
    torch.manual_seed(0)
    layer = nn.Linear(in_dim, out_dim).double()
    x = torch.randn(6, in_dim, dtype=torch.float64)
    damping = 0.05
    delta, g_out, grad, opt = _one_step(
        layer, layer, x, lambda o: (o.tanh() ** 2).mean(), damping, method, mode,
        max_factor_dim=4,
    )  # fmt: skip
    layouts = opt.estimator.layouts[""]
    assert tuple(lay.kind for lay in layouts) == kinds
    a, g = kfac_factors(with_ones(x)[None], grad_rows(g_out), 6)
    _check(delta, a, g, grad, 6, damping, mode, layer, layouts)
    # only the blocks are kept: no (a_dim x a_dim) or (g_dim x g_dim) statistics
    a_f, g_f = opt.estimator.factors("")
    for f, lay in ((a_f, layouts[0]), (g_f, layouts[1])):
        assert tuple(f.shape) == lay.shape(1)


@pytest.mark.parametrize(("method", "mode"), MODES)
@pytest.mark.parametrize(("groups", "max_dim"), [(1, 4), (2, 2), (2, 4)])
@pytest.mark.parametrize("chunk", [None, 40])
def test_blocked_conv2d_step_equals_dense_blockdiag_kronecker_solve(
    groups, max_dim, method, mode, chunk, monkeypatch
):
    if chunk is not None:  # the blocked A of a convolution is summed a few examples at a time
        monkeypatch.setattr(kfac_module, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(1)
    layer = nn.Conv2d(3 * groups, 4 * groups, 2, padding=1, groups=groups).double()
    x = torch.randn(3, 3 * groups, 4, 4, dtype=torch.float64)
    damping = 0.1
    delta, g_out, grad, opt = _one_step(
        layer, layer, x, lambda o: (o.sin() ** 2).mean(), damping, method, mode,
        max_factor_dim=max_dim,
    )  # fmt: skip
    layouts = opt.estimator.layouts[""]
    assert layouts[0].kind == "blocks"
    patches = dense_conv_patches(x, layer)
    patches = torch.cat([patches, torch.ones(*patches.shape[:2], 1, dtype=torch.float64)], 2)
    a, g = kfac_factors(patches, grad_rows(g_out, groups), batch=3)
    _check(delta, a, g, grad, patches.shape[1], damping, mode, layer, layouts)


@pytest.mark.parametrize(("method", "mode"), MODES)
def test_diagonal_g_step_equals_dense_kronecker_solve_with_diagonal_g(method, mode):
    torch.manual_seed(2)
    layer = nn.Linear(4, 7).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    delta, g_out, grad, opt = _one_step(
        layer, layer, x, lambda o: o.logsumexp(-1).mean(), 0.05, method, mode,
        diagonal_factor_dim=6,
    )  # fmt: skip
    layouts = opt.estimator.layouts[""]
    assert [lay.kind for lay in layouts] == ["full", "diagonal"]
    assert tuple(opt.estimator.factors("")[1].shape) == (1, 7)  # Σ g² per output only
    a, g = kfac_factors(with_ones(x)[None], grad_rows(g_out), 5)
    _check(delta, a, g, grad, 5, 0.05, mode, layer, layouts)


def test_wide_head_never_allocates_its_g_and_steps_with_diagonal_g():
    """A ``Linear(64, 5000)`` head: at the defaults its G is blocked, never 5000 x 5000;
    with ``diagonal_factor_dim`` below 5000 it is diagonal, and the step is the dense
    ``(A ⊗ diag(G) + λI)⁻¹ vec ∇``, which splits into one ``(g_ii A + λI)`` solve per
    output."""
    torch.manual_seed(3)
    model = nn.Linear(64, 5000).double()
    x = torch.randn(8, 64, dtype=torch.float64)
    y = torch.randint(0, 5000, (8,))
    for kw, g_kind in (({}, "blocks"), ({"diagonal_factor_dim": 4096}, "diagonal")):
        m = copy.deepcopy(model)
        opt = KFAC(m, lr=1.0, momentum=0.0, damping=0.1, curvature_every=1, inverse_every=1,
                   kl_clip=None, **FLOAT64, **kw, graft=None)  # fmt: skip
        out = m(x)
        out.retain_grad()
        F.cross_entropy(out, y).backward()
        grad = layer_grad_matrix(m)[0]
        before = [p.detach().clone() for p in m.parameters()]
        opt.step()
        assert opt.estimator.layouts[""][1].kind == g_kind
        est = opt.estimator
        held = est._layer_tensors("") + list(est.state_dict()["layers"][""].values())
        for t in held:
            if isinstance(t, torch.Tensor):
                assert sum(s >= 5000 for s in t.shape) <= 1, tuple(t.shape)
    delta = [b - p.detach() for b, p in zip(before, m.parameters(), strict=True)]
    delta = torch.cat([delta[0], delta[1][:, None]], 1)
    a, g = kfac_factors(with_ones(x)[None], grad_rows(out.grad), 8)
    g_diag = g[0].diagonal()
    eye = torch.eye(65, dtype=torch.float64)
    expected = torch.linalg.solve(g_diag[:, None, None] * a[0] + 0.1 * eye, grad[:, :, None])[
        ..., 0
    ]
    assert_close(delta, expected, n=8 + 65, cond=float(g_diag.max() * a[0].norm(2) / 0.1 + 1))


# ---- memory budget and describe() ---------------------------------------------------------
def test_memory_budget_warns_once_and_describe_reports_every_layer():
    model = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 20), nn.LayerNorm(20))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # 41² · 4 = 6724 bytes for G of layer 0 and A of layer 2: over 5000
        opt = KFAC(model, factor_memory=5000, graft=None)
    budget = [w for w in caught if "factor_memory" in str(w.message)]
    assert len(budget) == 1
    message = str(budget[0].message)
    assert "0 G" in message and "2 A" in message and "0 A" not in message
    layouts = opt.estimator.layouts
    assert layouts["0"][1].kind == "blocks" and layouts["2"][0].kind == "blocks"
    assert layouts["0"][0].kind == "full"  # 31² · 4 = 3844 bytes: fits
    rows = {r["name"]: r for r in opt.estimator.describe_layers()}
    assert set(rows) == {"0", "2", "3"}
    assert rows["0"]["type"] == "Linear" and rows["0"]["a"] == "full 31"
    assert rows["0"]["g"] == layouts["0"][1].describe()
    assert rows["0"]["factor_bytes"] == 4 * (31 * 31 + layouts["0"][1].numel(1))
    assert all(r["state_bytes"] == 0 for r in rows.values())  # nothing accumulated yet
    text = opt.describe()
    for name in ("0", "2", "3", "Linear", "LayerNorm", layouts["2"][0].describe()):
        assert name in text
    F.mse_loss(model(torch.randn(4, 30)), torch.randn(4, 20)).backward()
    opt.step()  # the first step updates and refreshes
    rows = {r["name"]: r for r in opt.estimator.describe_layers()}
    assert rows["0"]["state_bytes"] >= rows["0"]["factor_bytes"]
    assert "total" in opt.describe()


def test_no_warning_at_the_defaults_for_a_model_that_fits():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KFAC(nn.Sequential(nn.Linear(30, 40), nn.Linear(40, 5)), graft=None)


# ---- resume, E-KFAC, two-level, distributed -----------------------------------------------
def _make(opt_cls, model, **kw):
    return opt_cls(model, lr=0.1, curvature_every=1, inverse_every=2, graft=None, **FLOAT64, **kw)


@pytest.mark.parametrize("opt_cls", [KFAC, EKFAC, TwoLevelKFAC])
def test_state_dict_resume_of_blocked_layers_is_exact(opt_cls):
    torch.manual_seed(4)
    kw = {"max_factor_dim": 4, "diagonal_factor_dim": 8}
    model = nn.Sequential(nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 6)).double()
    whole = copy.deepcopy(model)
    opt = _make(opt_cls, whole, **kw)
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(16, 9, generator=gen, dtype=torch.float64),
                torch.randint(0, 6, (16,), generator=gen)) for _ in range(5)]  # fmt: skip

    def run(o, m, part):
        for x, y in part:
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()

    run(opt, whole, batches)
    first = copy.deepcopy(model)
    opt1 = _make(opt_cls, first, **kw)
    run(opt1, first, batches[:3])  # stops between two refreshes
    state = copy.deepcopy(opt1.state_dict())
    second = copy.deepcopy(first)
    opt2 = _make(opt_cls, second, **kw)
    opt2.load_state_dict(state)
    run(opt2, second, batches[3:])
    assert opt2.estimator.layouts["0"][0].kind == "diagonal"  # a_dim 10 > 8
    assert opt2.estimator.layouts["0"][1].kind == "blocks"
    for p, q in zip(whole.parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q)


def test_loading_a_checkpoint_with_other_blocks_is_refused():
    model = nn.Linear(9, 7).double()
    opt = _make(KFAC, model, max_factor_dim=4)
    F.mse_loss(model(torch.randn(4, 9, dtype=torch.float64)), torch.zeros(4, 7)).backward()
    opt.step()
    other = _make(KFAC, model, max_factor_dim=5)
    with pytest.raises(ValueError, match="max_factor_dim"):
        other.load_state_dict(opt.state_dict())


def _block_diag_q(q):
    """The dense block-diagonal eigenbasis of a ``(1, k, b, b)`` (or ``(1, n, n)``) one."""
    return q[0] if q.dim() == 3 else torch.block_diag(*q[0])


def test_ekfac_on_blocked_layers_equals_the_dense_eigenbasis_reference():
    """Step 0 refreshes (scalings reset to the products), step 1 mixes in the per-example
    statistics with weight 1/2: S = (S_0 + n Σ_n (Q_Gᵀ ∇̂_n Q_A)²) / 2, with the dense
    block-diagonal eigenbases, then the step is Q_G [(Q_Gᵀ ∇ Q_A) / (S + λ)] Q_Aᵀ."""
    torch.manual_seed(6)
    layer = nn.Linear(6, 5).double()  # A 7 -> blocks 4/3 (padded to 8); G 5 -> 3/2 (6)
    opt = EKFAC(layer, lr=1.0, momentum=0.0, damping=0.1, curvature_every=100,
                inverse_every=100, kl_clip=None, graft=None, max_factor_dim=4,
                **FLOAT64)  # fmt: skip
    est = opt.estimator
    a_layout, g_layout = est.layouts[""]
    assert (a_layout.padded_dim, g_layout.padded_dim) == (8, 6)
    x0 = torch.randn(10, 6, dtype=torch.float64)
    (layer(x0).sin() ** 2).mean().backward()
    opt.step()
    s0 = est.scalings("").clone()
    inv = est._state[""].inverse
    assert_close(s0[0], torch.outer(inv["d_g"].flatten(), inv["d_a"].flatten()))
    q_a, q_g = (_block_diag_q(q) for q in est.eigenbasis(""))
    opt.zero_grad()
    x1 = torch.randn(4, 6, dtype=torch.float64)
    out = layer(x1)
    out.retain_grad()
    (out.sin() ** 2).mean().backward()
    grad = layer_grad_matrix(layer)[0]
    before = [p.detach().clone() for p in layer.parameters()]
    opt.step()
    a_rows = a_layout.pad(with_ones(x1))
    g_rows = g_layout.pad(out.grad)
    per_example = torch.einsum("ng,na->nga", g_rows @ q_g, a_rows @ q_a)
    s1 = (s0[0] + 4 * per_example.square().sum(0)) / 2
    assert_close(est.scalings("")[0], s1, n=10)
    v = q_g.T @ a_layout.pad(g_layout.pad(grad, -2)) @ q_a / (s1 + 0.1)
    expected = a_layout.unpad(g_layout.unpad(q_g @ v @ q_a.T, -2))
    delta = [b - p.detach() for b, p in zip(before, layer.parameters(), strict=True)]
    delta = torch.cat([delta[0], delta[1][:, None]], 1)
    assert_close(delta, expected, n=20, cond=float((s1.max() + 0.1) / 0.1))


def test_twolevel_coarse_correction_on_blocked_layers_is_the_unblocked_one():
    """The coarse space uses row sums, not the factors: blocking changes the K-FAC part
    only, so (two-level − K-FAC) is the same per-layer constant with and without blocks."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 6)).double()
    x, y = torch.randn(16, 9, dtype=torch.float64), torch.randint(0, 6, (16,))

    def step(cls, blocks, **kw):
        m = copy.deepcopy(model)
        opt = cls(m, lr=1.0, momentum=0.0, damping=0.1, curvature_every=1, inverse_every=1,
                  kl_clip=None, graft=None, max_factor_dim=blocks, **FLOAT64, **kw)  # fmt: skip
        F.cross_entropy(m(x), y).backward()
        opt.step()
        return [
            p0.detach() - p.detach()
            for p0, p in zip(model.parameters(), m.parameters(), strict=True)
        ]

    coarse = {
        blocks: [
            t - k
            for t, k in zip(
                step(TwoLevelKFAC, blocks, coarse_damping=1.0), step(KFAC, blocks), strict=True
            )
        ]
        for blocks in (None, 4)
    }
    # the output layer's correction vanishes (softmax rows sum to zero): judge every layer
    # against the size of the hidden layer's
    scale = float(coarse[None][0].detach().abs().max())
    assert scale > 0
    for c_full, c_blocked in zip(coarse[None], coarse[4], strict=True):
        assert_close(c_blocked, c_full, n=64, cond=1e3, scale=scale)
        constant = c_blocked.flatten()[0].expand_as(c_blocked)
        assert_close(c_blocked, constant, n=64, cond=1e3, scale=scale)


@pytest.mark.parametrize("opt_cls", [so.KFAC, so.EKFAC, so.TwoLevelKFAC])
def test_one_rank_distributed_equals_local_with_blocked_factors(world_of_one, opt_cls):  # noqa: F811
    """As ``test_one_rank_distributed_equals_local``, with the conv's A (10) and the
    Linear's A (9) in blocks of at most 4: packed 4-D statistics, refresh costs per block."""
    kw = {"curvature_every": 1, "inverse_every": 2, "max_factor_dim": 4, **FLOAT64}
    if opt_cls is so.TwoLevelKFAC:
        kw["coarse_damping"] = 1.0
    local = _digits_like_run(False, opt_cls, **kw)
    shared = _digits_like_run(True, opt_cls, **kw)
    for a, b in zip(local, shared, strict=True):
        assert_close(a, b, n=32, cond=1e4)


# ---- progress ------------------------------------------------------------------------------
def _refresh_twice(capsys, **kw):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 5))
    opt = KFAC(model, curvature_every=1, inverse_every=1, max_factor_dim=16, **kw, graft=None)
    lines = []
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 20)), torch.randint(0, 5, (8,))).backward()
        opt.step()
        lines.append([ln for ln in capsys.readouterr().err.splitlines() if "refresh" in ln])
    return lines


def test_small_models_refresh_silently(capsys):
    assert _refresh_twice(capsys) == [[], []]


def test_long_refreshes_report_progress_once(capsys, monkeypatch):
    monkeypatch.setattr(kfac_module, "PROGRESS_MIN_COST", 1.0)
    first, second = _refresh_twice(capsys)
    # A 21 -> 2 blocks of 11/10 (stored at 11), G 30 -> 2 of 15, A 31 -> 2 of 16, G 5
    assert "7 eigendecompositions" in first[0] and "(2 x 16, 2 x 15, 2 x 11, 1 x 5)" in first[0]
    assert first[-1].startswith("secondorder: K-FAC refresh: 7/7 done")
    assert len(first) == 1 + 4  # the plan, then one line per size
    assert second == []  # automatic: only the first long refresh


def test_progress_option_forces_or_silences(capsys, monkeypatch):
    assert len(_refresh_twice(capsys, progress=True)[1]) == 5
    monkeypatch.setattr(kfac_module, "PROGRESS_MIN_COST", 1.0)
    assert _refresh_twice(capsys, progress=False) == [[], []]


@pytest.mark.parametrize(
    ("conv", "size", "max_dim", "correlation"),
    [
        (nn.Conv2d(6, 4, 3, padding=1), 12, 32, True),  # whole A by correlations: cheaper
        (nn.Conv2d(6, 4, 3, padding=1, groups=2), 12, 16, True),
        (nn.Conv2d(6, 4, 3, stride=2, padding=1), 12, 32, False),  # stride 2: the patches
        (nn.Conv2d(6, 4, 3, padding=1), 3, 16, False),  # small blocks: cheaper from patches
    ],
    ids=["conv", "groups", "stride2", "small"],
)
def test_a_blocked_conv_factor_keeps_the_diagonal_blocks_whichever_path(
    conv, size, max_dim, correlation, monkeypatch
):
    """A blocked ``A`` of a stride-1 convolution comes from the whole factor by correlations
    (its diagonal blocks, padding coordinates zero) when that costs fewer multiply-adds than
    the blocks from the patches; either way it is the blocks of the patch rows."""
    torch.manual_seed(0)
    model = nn.Sequential(conv.double(), nn.Flatten(), nn.LazyLinear(3).double())
    x = torch.randn(4, 6, size, size, dtype=torch.float64)
    model(x)
    seen = []
    opt = KFAC(model, curvature_every=1, max_factor_dim=max_dim, graft=None, **FLOAT64)
    helper = opt.estimator.layers[0]
    real = helper.a_full_if_cheaper
    monkeypatch.setattr(helper, "a_full_if_cheaper", lambda *a: seen.append(r := real(*a)) or r)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    layout = opt.estimator.layouts["0"][0]
    assert layout.kind == "blocks"
    assert len(seen) == 1 and (seen[0] is not None) == correlation
    rows = layout.block_rows(helper.a_rows(x))
    want = (rows.transpose(1, 2) @ rows / helper.a_rows(x).shape[1]).reshape(
        opt.estimator.factors("0")[0].shape
    )
    bound = rows.abs().transpose(1, 2) @ rows.abs() / helper.a_rows(x).shape[1]
    assert_close(opt.estimator.factors("0")[0], want, n=rows.shape[1], scale=float(bound.max()))
