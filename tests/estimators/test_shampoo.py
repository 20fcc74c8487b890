"""Shampoo against dense float64 matrix roots, and as an optimizer.

Pinned: the direction of every tile is ``L^{e_L} G R^{e_R}`` with the roots taken on the
eigenvalues plus ε of the dense statistics (a Linear and a Conv2d weight, one tile and
several, sums and EMAs, two-sided and one-sided); curvature off with the default Adam graft
is ``torch.optim.Adam`` bit for bit; a resumed run is the uninterrupted one bit for bit; bad
arguments raise ``ValueError`` naming the argument.

Tolerances: the roots come from an eigendecomposition (``n`` = the tile's size) whose
eigenvector error is amplified by the conditioning of the damped statistic: ``cond`` is
``(λ_max + ε)/(λ_min + ε)`` of the worst statistic, a bound on the root's too.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secondorder as so
from secondorder.estimators.shampoo import ShampooConfig, ShampooEstimator

from ..helpers import assert_close, assert_resume_is_exact, mlp, train_steps


def _dense_root(stat: torch.Tensor, damping: float, exponent: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(stat.double())
    values = values.clamp_min(0)
    return vectors @ torch.diag((values + damping) ** exponent) @ vectors.T


def _cond(stat: torch.Tensor, damping: float) -> float:
    values = torch.linalg.eigvalsh(stat.double()).clamp_min(0)
    return float((values.max() + damping) / (values.min() + damping))


def _ranges(dim: int, block: int | None) -> list[slice]:
    if block is None:
        return [slice(0, dim)]
    return [slice(i, min(i + block, dim)) for i in range(0, dim, block)]


def _reference(grads, final, damping, beta2, exponents, block):
    """The dense direction of ``final`` (a matrix) after statistics of ``grads``, and the
    largest tile size and condition number seen."""
    m, n = final.shape
    out = torch.zeros_like(final, dtype=torch.float64)
    size, cond = 1, 1.0
    for rows in _ranges(m, block):
        for cols in _ranges(n, block):
            left = torch.zeros(rows.stop - rows.start, rows.stop - rows.start, dtype=torch.float64)
            right = torch.zeros(cols.stop - cols.start, cols.stop - cols.start, dtype=torch.float64)
            for g in grads:
                b = g.double()[rows, cols]
                w = 1.0 if beta2 == 1 else 1 - beta2
                keep = 1.0 if beta2 == 1 else beta2
                left = keep * left + w * b @ b.T
                right = keep * right + w * b.T @ b
            u = final.double()[rows, cols]
            if exponents[0] != 0:
                u = _dense_root(left, damping, exponents[0]) @ u
                cond = max(cond, _cond(left, damping))
            if exponents[1] != 0:
                u = u @ _dense_root(right, damping, exponents[1])
                cond = max(cond, _cond(right, damping))
            out[rows, cols] = u
            size = max(size, left.shape[0], right.shape[0])
    return out, size, cond


@pytest.mark.parametrize("shape", [(6, 10), (5, 3, 3, 3)], ids=["linear", "conv"])
@pytest.mark.parametrize("block", [None, 4], ids=["one-tile", "blocked"])
@pytest.mark.parametrize(
    ("beta2", "exponent"),
    [(1.0, -0.25), (0.9, -0.25), (1.0, (-0.5, 0.0)), (0.95, (0.0, -0.5)), (1.0, (-0.3, -0.1))],
)
def test_direction_equals_the_dense_matrix_roots(shape, block, beta2, exponent):
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(shape, dtype=torch.float64, generator=gen))
    bias = nn.Parameter(torch.randn(shape[0], dtype=torch.float64, generator=gen))
    damping = 1e-3
    cfg = ShampooConfig(beta2=beta2, exponent=exponent, max_factor_dim=block)
    est = ShampooEstimator([p, bias], cfg)
    grads = [torch.randn(shape, dtype=torch.float64, generator=gen) for _ in range(4)]
    for g in grads:
        est.update({p: g, bias: g[:, 0, ...].reshape(-1) if len(shape) > 2 else g[:, 0]})
    est.refresh(damping)
    final = torch.randn(shape, dtype=torch.float64, generator=gen)
    out = est.precondition({p: final, bias: torch.ones(shape[0], dtype=torch.float64)}, damping)
    assert set(out) == {p}  # the 1-D parameter has no Shampoo direction
    pair = exponent if isinstance(exponent, tuple) else (exponent, exponent)
    want, size, cond = _reference(
        [g.reshape(shape[0], -1) for g in grads], final.reshape(shape[0], -1), damping, beta2,
        pair, block,
    )  # fmt: skip
    assert out[p].shape == p.shape
    assert_close(out[p].reshape(shape[0], -1), want, n=size, cond=cond)


def test_tiles_of_one_shape_are_batched_and_match_the_per_tile_path():
    """Two weights of one shape and a third of another, blocked: the tiles of one shape
    share one stacked statistic (one ``baddbmm`` / ``bmm`` / batched eigh), and the batched
    directions equal the dense per-tile references, and the per-tile fallback the estimator
    takes when some parameters of a group have no gradient, to round-off."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 10), (6, 10), (5, 3, 2, 2)]
    params = [nn.Parameter(torch.randn(s, dtype=torch.float64, generator=gen)) for s in shapes]
    damping, block = 1e-3, 4
    est = ShampooEstimator(params, ShampooConfig(beta2=0.9, max_factor_dim=block))
    tiles = sum(len(t) for t in est.tiles.values())
    # (6, 10): tiles 4x4, 4x4, 4x2, 2x4, 2x4, 2x2, twice; (5, 12): 4x4 x3, 1x4 x3; groups
    # 4x4 (7 tiles), 2x4 (4), 1x4 (3), 4x2 (2), 2x2 (2)
    assert tiles == 18 and len(est.groups) == 5
    assert sorted(len(g.members) for g in est.groups) == [2, 2, 3, 4, 7]
    history = {p: [] for p in params}
    for step in range(4):
        grads = {p: torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in params}
        if step == 2:  # the first weight has no gradient: the others' per-tile update
            del grads[params[0]]
        est.update(grads)
        for p, g in grads.items():
            history[p].append(g.reshape(p.shape[0], -1))
    est.refresh(damping)
    final = {p: torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in params}
    batched = est.precondition(final, damping)
    alone = est.precondition({params[1]: final[params[1]]}, damping)  # per-tile fallback
    for p in params:
        fm = final[p].reshape(p.shape[0], -1)
        want, size, cond = _reference(history[p], fm, damping, 0.9, (-0.25, -0.25), block)
        assert_close(batched[p].reshape(fm.shape), want, n=size, cond=cond)
    want, size, cond = _reference(
        history[params[1]], final[params[1]], damping, 0.9, (-0.25, -0.25), block
    )
    assert set(alone) == {params[1]}
    assert_close(alone[params[1]], want, n=size, cond=cond)
    assert_close(alone[params[1]], batched[params[1]], n=size, cond=cond)


def test_the_optimizer_step_is_the_dense_direction():
    """graft None, lr 1, momentum 0: the first step is ``w ← w − u`` (statistics of the
    first gradient, roots refreshed after the first update); the bias takes SGD's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 16, 4)).double()
    before = [p.detach().clone() for p in model.parameters()]
    damping = 1e-2
    opt = so.Shampoo(model.parameters(), lr=1.0, graft=None, momentum=0.0, damping=damping)
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3, 0])).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, w, g in zip(model.parameters(), before, grads, strict=True):
        if p.dim() < 2:
            assert torch.equal(p.detach(), w - g)
            continue
        gm = g.reshape(g.shape[0], -1)
        want, size, cond = _reference([gm], gm, damping, 1.0, (-0.25, -0.25), 1024)
        assert_close((w - p.detach()).reshape(gm.shape), want, n=size, cond=cond)


@pytest.mark.parametrize(
    ("kwargs", "reference"),
    [
        ({}, lambda p: torch.optim.Adam(p, lr=3e-3)),
        ({"weight_decay": 0.1}, lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=0.1)),
        (
            {"weight_decay": 0.1, "decoupled_weight_decay": True},
            lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1),
        ),
    ],
)
def test_curvature_off_is_adam_bit_for_bit(kwargs, reference):
    torch.manual_seed(0)
    model = mlp([5, 7, 3])
    twin = copy.deepcopy(model)
    opt = so.Shampoo(model.parameters(), lr=3e-3, precondition=False, **kwargs)
    assert opt.config.graft == "adam" and opt.config.momentum == 0.0
    ref = reference(twin.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        for m, o in ((model, opt), (twin, ref)):
            train_steps(m, o, [(x, y)])
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_one_dimensional_parameters_take_adams_step():
    """With the curvature on, a bias (no Shampoo direction) takes torch.optim.Adam's step:
    compared at the first step (after it the weights, hence the biases' gradients, differ)."""
    torch.manual_seed(0)
    model = mlp([5, 7, 3])
    twin = copy.deepcopy(model)
    opt = so.Shampoo(model.parameters(), lr=3e-3)
    ref = torch.optim.Adam(twin.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    for m, o in ((model, opt), (twin, ref)):
        train_steps(m, o, [(x, y)])
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        if p.dim() == 1:
            assert torch.equal(p, q)
        else:  # grafted: Adam's norm, Shampoo's direction
            assert not torch.equal(p, q)


@pytest.mark.parametrize("merge", [True, False])
def test_resume_is_exact(merge):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 16, 4))
    kwargs = {"lr": 1e-2, "inverse_every": 3, "beta2": 0.9, "max_factor_dim": 20,
              "merge_dims": merge}  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(5, 2, 6, 6, generator=gen), torch.randint(0, 4, (5,), generator=gen))
        for _ in range(7)
    ]

    assert_resume_is_exact(lambda m: so.Shampoo(m.parameters(), **kwargs), model, batches, 4)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("beta2", 0.0),
        ("beta2", 1.5),
        ("beta2", float("nan")),
        ("exponent", 0.25),
        ("exponent", 0.0),
        ("exponent", (0.0, 0.0)),
        ("exponent", (-0.25,)),
        ("exponent", "quarter"),
        ("max_factor_dim", 0),
        ("max_factor_dim", 2.5),
        ("damping", 0.0),
    ],
)
def test_bad_arguments_name_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        so.Shampoo(mlp([3, 2]).parameters(), **{name: value})


def test_the_preset_and_the_bench_know_shampoo():
    from secondorder.bench.optimizers import OPTIMIZERS

    spec = OPTIMIZERS["shampoo"]
    assert spec.config_class is ShampooConfig
    model = mlp([3, 4, 2])
    opt = spec.factory(model, **spec.defaults)
    assert isinstance(opt, so.Shampoo)


def test_the_adam_graft_gives_adams_norm_and_shampoos_direction():
    """lr 1, first step: Δw = (‖a‖/‖u‖) u per weight, with ``a`` Adam's first step
    ``g/(|g| + ε)`` (float64 reference) and ``u`` the dense Shampoo direction."""
    torch.manual_seed(0)
    model = mlp([5, 7, 3]).double()
    before = [p.detach().clone() for p in model.parameters()]
    damping = 1e-3
    opt = so.Shampoo(model.parameters(), lr=1.0, damping=damping)
    x = torch.randn(8, 5, dtype=torch.float64)
    F.cross_entropy(model(x), torch.randint(0, 3, (8,))).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, w, g in zip(model.parameters(), before, grads, strict=True):
        if p.dim() < 2:
            continue
        adam = g / (g.abs() + 1e-8)
        u, size, cond = _reference([g], g, damping, 1.0, (-0.25, -0.25), 1024)
        want = u * (adam.norm() / u.norm())
        assert_close(w - p.detach(), want, n=size, cond=cond)


# ---- one statistic per tensor dimension (merge_dims=False) ----------------------------------
def _mode_product(x: torch.Tensor, m: torch.Tensor, d: int) -> torch.Tensor:
    """``m`` (symmetric) applied along dimension ``d`` of ``x``."""
    return torch.tensordot(x, m, dims=([d], [0])).movedim(-1, d)


@pytest.mark.parametrize("block", [None, 2], ids=["one-tile", "blocked"])
@pytest.mark.parametrize(("beta2", "exponent"), [(1.0, -0.25), (0.9, -0.5)])
def test_per_dimension_direction_equals_the_dense_tensor_roots(block, beta2, exponent):
    """A ``(4, 3, 3, 2)`` weight with ``merge_dims=False``: every tile's direction is
    ``G ×_1 L_1^{e'} ×_2 … ×_4 L_4^{e'}``, ``L_d`` the sum (EMA) of the mode-``d``
    unfoldings' ``G_(d) G_(d)ᵀ`` and ``e' = 2e/4`` (the paper's ``-1/8`` at ``e = -1/4``),
    against dense float64 roots; a matrix is unchanged (``L G R``)."""
    gen = torch.Generator().manual_seed(0)
    shape = (4, 3, 3, 2)
    p = nn.Parameter(torch.randn(shape, dtype=torch.float64, generator=gen))
    q = nn.Parameter(torch.randn(5, 3, dtype=torch.float64, generator=gen))
    damping = 1e-3
    cfg = ShampooConfig(beta2=beta2, exponent=exponent, max_factor_dim=block, merge_dims=False)
    est = ShampooEstimator([p, q], cfg)
    grads = [
        {p: torch.randn(shape, dtype=torch.float64, generator=gen),
         q: torch.randn(5, 3, dtype=torch.float64, generator=gen)}
        for _ in range(4)
    ]  # fmt: skip
    for g in grads:
        est.update(g)
    est.refresh(damping)
    final = {p: torch.randn(shape, dtype=torch.float64, generator=gen),
             q: torch.randn(5, 3, dtype=torch.float64, generator=gen)}  # fmt: skip
    out = est.precondition(final, damping)
    ranges = [_ranges(n, block) for n in shape]
    want = torch.zeros(shape, dtype=torch.float64)
    size, cond = 1, 1.0
    for index in itertools.product(*ranges):
        u = final[p][index]
        for d in range(4):
            n = u.shape[d]
            stat = torch.zeros(n, n, dtype=torch.float64)
            for g in grads:
                unfolded = g[p][index].movedim(d, 0).reshape(n, -1)
                stat = (1.0 if beta2 == 1 else beta2) * stat + (
                    1.0 if beta2 == 1 else 1 - beta2
                ) * unfolded @ unfolded.T
            u = _mode_product(u, _dense_root(stat, damping, exponent / 2), d)
            size, cond = max(size, n), max(cond, _cond(stat, damping))
        want[index] = u
    assert_close(out[p], want, n=size, cond=cond)
    matrix, size, cond = _reference(
        [g[q] for g in grads], final[q], damping, beta2, (exponent, exponent), block
    )
    assert_close(out[q], matrix, n=size, cond=cond)
    assert len(est.tiles[p]) == (1 if block is None else 2 * 2 * 2 * 1)


def test_per_dimension_factors_are_the_tensor_dimensions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 16, 4))
    opt = so.Shampoo(model.parameters(), merge_dims=False)
    sizes = [s.shape[-1] for t in opt.estimator.tiles[model[0].weight] for s in t.stats]
    assert sizes == [3, 2, 3, 3]  # merged: 3 and 18
    merged = so.Shampoo(model.parameters())
    assert [s.shape[-1] for s in merged.estimator.tiles[model[0].weight][0].stats] == [3, 18]


def test_a_state_of_the_left_right_format_loads_and_another_layout_is_refused():
    """A state saved before the per-dimension format (``left``, ``right``, ``left_root``,
    ``right_root`` per tile) loads and gives the same directions; one saved with
    ``merge_dims=False`` does not load into a merged optimizer (its message names it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 16, 4))
    opt = so.Shampoo(model.parameters(), inverse_every=1)
    batches = [(torch.randn(5, 2, 6, 6), torch.randint(0, 4, (5,))) for _ in range(3)]
    train_steps(model, opt, batches)
    state = opt.estimator.state_dict()
    old = {
        "params": [
            [
                {"left": t["stats"][0], "right": t["stats"][1],
                 "left_root": t["roots"][0], "right_root": t["roots"][1]}
                for t in tiles
            ]
            for tiles in state["params"]
        ],
        "refreshed": state["refreshed"],
    }  # fmt: skip
    again = so.Shampoo(model.parameters(), inverse_every=1)
    again.estimator.load_state_dict(old)
    grads = {p: torch.randn_like(p) for p in model.parameters()}
    want = opt.estimator.precondition(grads, 1e-12)
    got = again.estimator.precondition(grads, 1e-12)
    assert set(got) == set(want)
    for p in want:
        assert torch.equal(got[p], want[p])
    split = so.Shampoo(model.parameters(), merge_dims=False)
    with pytest.raises(ValueError, match="merge_dims"):
        again.estimator.load_state_dict(split.estimator.state_dict())


def test_merge_dims_is_checked():
    with pytest.raises(TypeError, match="merge_dims must be a bool"):
        so.Shampoo(mlp([3, 2]).parameters(), merge_dims="no")
    with pytest.raises(ValueError, match=r"exponent=.*merge_dims=False"):
        so.Shampoo(mlp([3, 2]).parameters(), merge_dims=False, exponent=(-0.5, 0.0))
