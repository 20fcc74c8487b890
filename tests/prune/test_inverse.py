"""Tests of :class:`secondorder.prune.StaticFisherInverse` against dense float64 references.

The reference is the explicit (block-diagonal) ``F = damping*I + GᵀG/m`` built here and
inverted with ``torch.linalg``; nothing from the library's internals is reused.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from secondorder.prune import StaticFisherInverse

from ..helpers import tolerance


def inverse_tolerance(
    fisher: Tensor, m: int, damping: float, dtype: torch.dtype = torch.float64
) -> float:
    """The tolerance of ``F⁻¹`` (``F = λI + GᵀG/m``, ``d x d``) computed two ways: the
    library's ``m`` rank-one (Woodbury) updates and ``torch.linalg``'s LU of the dense ``F``
    both sum ``n = m + d`` products into an entry. The condition number is ``‖F‖/λ``,
    computed here from the float64 ``F``: the Woodbury form starts from ``x/λ`` and
    subtracts corrections of that size, so its rounding is relative to ``‖x‖/λ``, not to
    ``‖F⁻¹x‖ >= ‖x‖/‖F‖``. It is ``cond(F)`` when a block has fewer gradients than
    coordinates (``λ`` is then an eigenvalue) and more otherwise (up to ~1e8 with damping
    1e-4 and gradients of scale 10)."""
    cond = float(torch.linalg.matrix_norm(fisher, ord=2)) / damping
    return tolerance(dtype, n=m + fisher.shape[0], cond=cond)


def dense_fisher(grads: Tensor, damping: float, block_size: int | None) -> Tensor:
    """The explicit float64 ``d x d`` block-diagonal ``damping*I + G_bᵀG_b/m``."""
    g = grads.to(torch.float64)
    m, d = g.shape
    b = d if block_size is None or block_size >= d else block_size
    f = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, d, b):
        sl = slice(start, min(start + b, d))
        gb = g[:, sl]
        f[sl, sl] = damping * torch.eye(gb.shape[1], dtype=torch.float64) + gb.T @ gb / m
    return f


def dense_inverse(grads: Tensor, damping: float, block_size: int | None) -> Tensor:
    """``torch.linalg.inv`` of :func:`dense_fisher`."""
    return torch.linalg.inv(dense_fisher(grads, damping, block_size))


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """``|actual - expected| / |expected|`` (Frobenius / 2-norm), in float64."""
    a, e = actual.to(torch.float64), expected.to(torch.float64)
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def make_grads(seed: int, m: int, d: int, scale: float, dtype: torch.dtype) -> Tensor:
    """Seeded ``(m, d)`` normal gradients times ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, d, generator=gen, dtype=torch.float64) * scale).to(dtype)


@st.composite
def configs(draw: st.DrawFn) -> dict:
    """A random problem: sizes, blocking, paging, damping and gradients."""
    m = draw(st.integers(1, 12))
    d = draw(st.integers(1, 60))
    block_size = draw(st.none() | st.integers(1, d + 3))
    pages = draw(st.integers(1, 4))
    blocks_per_batch = draw(st.none() | st.integers(1, 5))
    damping = 10 ** draw(st.floats(-4, 2))
    scale = 10 ** draw(st.floats(-2, 1))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(
        grads=make_grads(seed, m, d, scale, torch.float64),
        damping=damping,
        block_size=block_size,
        pages=pages,
        blocks_per_batch=blocks_per_batch,
        seed=seed,
    )


@settings(max_examples=60, deadline=None)
@given(cfg=configs())
def test_matches_dense_block_diagonal_inverse(cfg: dict) -> None:
    """ihvp, diag, column, entry and entries equal the dense block-diagonal inverse."""
    grads: Tensor = cfg["grads"]
    before = grads.clone()
    m, d = grads.shape
    inv = StaticFisherInverse(
        grads,
        cfg["damping"],
        block_size=cfg["block_size"],
        pages=cfg["pages"],
        blocks_per_batch=cfg["blocks_per_batch"],
    )
    fisher = dense_fisher(grads, cfg["damping"], cfg["block_size"])
    ref = torch.linalg.inv(fisher)
    tol = inverse_tolerance(fisher, m, cfg["damping"])
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)

    x = torch.randn(d, generator=gen, dtype=torch.float64)
    y = inv.ihvp(x)
    assert y.shape == (d,) and y.dtype == torch.float64
    assert rel_err(y, ref @ x) < tol

    diag = inv.diag()
    assert diag.shape == (d,) and diag.dtype == torch.float64
    assert rel_err(diag, ref.diagonal()) < tol

    j = int(torch.randint(d, (1,), generator=gen))
    assert rel_err(inv.column(j), ref[:, j]) < tol

    scale = float(ref.abs().max())
    i = int(torch.randint(d, (1,), generator=gen))
    for a, b in [(i, j), (j, i), (j, j), (0, d - 1), (d - 1, 0)]:
        assert abs(inv.entry(a, b) - float(ref[a, b])) <= tol * scale

    rows = torch.randint(d, (3,), generator=gen).tolist()
    cols = torch.randint(d, (4,), generator=gen).tolist()
    sub = inv.entries(rows, cols)
    assert sub.shape == (3, 4) and sub.dtype == torch.float64
    assert float((sub - ref[rows][:, cols]).abs().max()) <= tol * scale

    b = d if cfg["block_size"] is None or cfg["block_size"] >= d else cfg["block_size"]
    assert inv.nbytes == m * -(-d // b) * b * 8
    assert torch.equal(grads, before)


@settings(max_examples=30, deadline=None)
@given(cfg=configs())
def test_entries_across_blocks_are_zero(cfg: dict) -> None:
    """``entry(i, j)`` is exactly 0 for coordinates in different blocks, and so is the column."""
    grads: Tensor = cfg["grads"]
    d = grads.shape[1]
    b = cfg["block_size"]
    if b is None or b >= d:
        b = d
    inv = StaticFisherInverse(grads, cfg["damping"], block_size=b, pages=cfg["pages"])
    for i in range(0, d, max(1, d // 7)):
        for j in range(0, d, max(1, d // 5)):
            if i // b != j // b:
                assert inv.entry(i, j) == 0.0
    col = inv.column(d - 1)
    outside = torch.arange(d) // b != (d - 1) // b
    assert torch.all(col[outside] == 0)


@pytest.mark.parametrize(("m", "d"), [(5, 37), (12, 60), (3, 1), (20, 8)])
@pytest.mark.parametrize("pages", [2, 3, 4, 7])
def test_paged_full_equals_unpaged(m: int, d: int, pages: int) -> None:
    """The full inverse paged in ``pages`` column pages equals the unpaged one to round-off
    (the pages are other matrix shapes for BLAS: another summation order)."""
    grads = make_grads(m * 100 + d, m, d, 1.0, torch.float64)
    x = torch.randn(d, dtype=torch.float64)
    one = StaticFisherInverse(grads, 1e-2, pages=1)
    paged = StaticFisherInverse(grads, 1e-2, pages=pages)
    tol = inverse_tolerance(dense_fisher(grads, 1e-2, None), m, 1e-2)
    assert rel_err(paged.ihvp(x), one.ihvp(x)) <= tol
    assert rel_err(paged.diag(), one.diag()) <= tol
    assert rel_err(paged.column(d // 2), one.column(d // 2)) <= tol
    scale = float(one.diag().abs().max())  # the largest entry of the SPD inverse
    assert math.isclose(
        paged.entry(0, d - 1), one.entry(0, d - 1), rel_tol=tol, abs_tol=tol * scale
    )


@pytest.mark.parametrize("pages", [1, 3])
def test_blocks_per_batch_gives_the_same_inverse(pages: int) -> None:
    """Blocked inverses factored with different ``blocks_per_batch`` agree to round-off
    (batched and one-by-one BLAS calls sum in other orders)."""
    grads = make_grads(7, 9, 53, 0.5, torch.float64)
    x = torch.randn(53, dtype=torch.float64)
    invs = [
        StaticFisherInverse(grads, 0.1, block_size=8, pages=pages, blocks_per_batch=k)
        for k in (None, 1, 2, 3, 5, 7, 100)
    ]
    ref = invs[0]
    tol = inverse_tolerance(dense_fisher(grads, 0.1, 8), 9, 0.1)
    scale = float(ref.diag().abs().max())  # the largest entry of the SPD inverse
    for inv in invs[1:]:
        assert rel_err(inv.ihvp(x), ref.ihvp(x)) <= tol
        assert rel_err(inv.diag(), ref.diag()) <= tol
        assert inv.entries([0, 9, 50], [1, 8, 52]).allclose(
            ref.entries([0, 9, 50], [1, 8, 52]), rtol=tol, atol=tol * scale
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("block_size", [None, 10, 11, 4, 1])
def test_grads_not_modified(dtype: torch.dtype, block_size: int | None) -> None:
    """The caller's gradients are untouched, also when the blocked view could alias them."""
    grads = make_grads(3, 6, 10, 1.0, dtype)
    before = grads.clone()
    inv = StaticFisherInverse(grads, 0.05, block_size=block_size, pages=2)
    inv.ihvp(torch.ones(10, dtype=dtype))
    inv.diag()
    assert torch.equal(grads, before)


@pytest.mark.parametrize("m", [1, 4])
def test_grads_not_modified_views(m: int) -> None:
    """Row-sliced and column-sliced views of a larger tensor are left untouched too."""
    big = make_grads(11, m + 2, 20, 1.0, torch.float64)
    before = big.clone()
    for grads in (big[1 : m + 1], big[:m, :10], big[:m, 5:15], big.T[:10, :m].T):
        StaticFisherInverse(grads, 0.1)
        StaticFisherInverse(grads, 0.1, block_size=grads.shape[1], pages=3)
    assert torch.equal(big, before)


@pytest.mark.parametrize(("m", "d", "block_size"), [(8, 40, None), (8, 40, 7), (30, 12, 12)])
def test_float32_gradients(m: int, d: int, block_size: int | None) -> None:
    """Float32 gradients give a float32 diag and product within float32 round-off of the
    float64 reference."""
    grads = make_grads(5, m, d, 1.0, torch.float32)
    inv = StaticFisherInverse(grads, 0.1, block_size=block_size)
    ref = dense_inverse(grads, 0.1, block_size)
    tol = inverse_tolerance(dense_fisher(grads, 0.1, block_size), m, 0.1, torch.float32)
    diag = inv.diag()
    assert diag.dtype == torch.float32
    assert rel_err(diag, ref.diagonal()) <= tol
    x = torch.randn(d, dtype=torch.float32)
    y = inv.ihvp(x)
    assert y.dtype == torch.float32
    assert rel_err(y, ref @ x.double()) <= tol
    if block_size is None:
        assert inv.nbytes == grads.numel() * 4


@pytest.mark.parametrize(("m", "d"), [(10, 10), (30, 8), (50, 20)])
@pytest.mark.parametrize("block_size", [None, 5])
def test_tiny_damping_approaches_inverse_gram(m: int, d: int, block_size: int | None) -> None:
    """With ``m >= d``, full column rank and damping 1e-8, ``F⁻¹x ≈ (GᵀG/m)⁻¹x`` (per block)."""
    grads = make_grads(m + d, m, d, 1.0, torch.float64)
    assert torch.linalg.matrix_rank(grads) == d
    damping = 1e-8
    inv = StaticFisherInverse(grads, damping, block_size=block_size)
    gram = dense_fisher(grads, 0.0, block_size)  # block-diagonal GᵀG/m, no damping
    x = torch.randn(d, dtype=torch.float64)
    expected = torch.linalg.solve(gram, x)
    # round-off (inverse_tolerance) plus the damping itself: (GᵀG/m + λI)⁻¹ differs from
    # (GᵀG/m)⁻¹ by λ‖(GᵀG/m)⁻¹‖ = λ/λ_min relative, to first order (the diagonal: times
    # cond(GᵀG/m), as its entries can be as small as 1/λ_max)
    eigs = torch.linalg.eigvalsh(gram)
    roundoff = inverse_tolerance(dense_fisher(grads, damping, block_size), m, damping)
    shift = damping / float(eigs[0])
    assert rel_err(inv.ihvp(x), expected) <= roundoff + shift
    diag_shift = shift * float(eigs[-1] / eigs[0])
    assert rel_err(inv.diag(), torch.linalg.inv(gram).diagonal()) <= roundoff + diag_shift


# -- bad inputs -------------------------------------------------------------------------------


GOOD = make_grads(0, 4, 6, 1.0, torch.float64)


@pytest.mark.parametrize(
    "grads",
    [[[1.0, 2.0]], GOOD.numpy(), torch.ones(3, 4, dtype=torch.int64), torch.ones(3, 4) > 0],
)
def test_bad_grads_type(grads: object) -> None:
    """Non-tensor or non-floating gradients raise TypeError naming ``grads``."""
    with pytest.raises(TypeError, match="grads"):
        StaticFisherInverse(grads, 1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "grads",
    [torch.ones(5), torch.ones(0, 3), torch.ones(3, 0), torch.ones(2, 3, 4), torch.tensor(1.0)],
)
def test_bad_grads_shape(grads: Tensor) -> None:
    """Non-2-D or empty gradients raise ValueError naming ``grads``."""
    with pytest.raises(ValueError, match="grads"):
        StaticFisherInverse(grads, 1.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_grads(bad: float) -> None:
    """Gradients with NaN or Inf raise ValueError naming ``grads``."""
    grads = GOOD.clone()
    grads[1, 2] = bad
    with pytest.raises(ValueError, match="grads"):
        StaticFisherInverse(grads, 1.0)


@pytest.mark.parametrize("damping", [0, 0.0, -1.0, -1e-9, math.nan, math.inf, -math.inf])
def test_bad_damping_value(damping: float) -> None:
    """Zero, negative and non-finite damping raise ValueError naming ``damping``."""
    with pytest.raises(ValueError, match="damping"):
        StaticFisherInverse(GOOD, damping)


@pytest.mark.parametrize("damping", ["1", None, True, torch.tensor(1.0)])
def test_bad_damping_type(damping: object) -> None:
    """Non-numeric damping raises TypeError naming ``damping``."""
    with pytest.raises(TypeError, match="damping"):
        StaticFisherInverse(GOOD, damping)  # type: ignore[arg-type]


def test_int_damping_accepted() -> None:
    """An int damping is a valid number and matches the float one."""
    x = torch.randn(6, dtype=torch.float64)
    a = StaticFisherInverse(GOOD, 2).ihvp(x)
    b = StaticFisherInverse(GOOD, 2.0).ihvp(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["block_size", "pages", "blocks_per_batch"])
@pytest.mark.parametrize("value", [0, -3])
def test_bad_count_value(name: str, value: int) -> None:
    """Counts below 1 raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=name):
        StaticFisherInverse(GOOD, 1.0, **{name: value})


@pytest.mark.parametrize("name", ["block_size", "pages", "blocks_per_batch"])
@pytest.mark.parametrize("value", [1.5, 2.0, "2", True])
def test_bad_count_type(name: str, value: object) -> None:
    """Non-int counts raise TypeError naming the argument."""
    with pytest.raises(TypeError, match=name):
        StaticFisherInverse(GOOD, 1.0, **{name: value})


def test_pages_none_rejected() -> None:
    """``pages=None`` is not allowed (only ``block_size`` and ``blocks_per_batch`` may be)."""
    with pytest.raises(TypeError, match="pages"):
        StaticFisherInverse(GOOD, 1.0, pages=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("block_size", [None, 4])
@pytest.mark.parametrize(
    "x", [torch.ones(5), torch.ones(7), torch.ones(6, 1), torch.ones(1, 6), torch.tensor(1.0)]
)
def test_ihvp_bad_shape(block_size: int | None, x: Tensor) -> None:
    """``ihvp`` of a vector of the wrong shape raises ValueError naming ``x``."""
    inv = StaticFisherInverse(GOOD, 1.0, block_size=block_size)
    with pytest.raises(ValueError, match="x must"):
        inv.ihvp(x)


@pytest.mark.parametrize("x", [[1.0] * 6, torch.ones(6, dtype=torch.int64)])
def test_ihvp_bad_type(x: object) -> None:
    """``ihvp`` of a non-floating vector raises TypeError naming ``x``."""
    with pytest.raises(TypeError, match="x must"):
        StaticFisherInverse(GOOD, 1.0).ihvp(x)  # type: ignore[arg-type]


@pytest.mark.parametrize(("i", "j", "name"), [(6, 0, "i"), (0, 6, "j"), (-1, 0, "i"), (0, -1, "j")])
def test_entry_out_of_range(i: int, j: int, name: str) -> None:
    """Out-of-range indices raise ValueError naming the index."""
    inv = StaticFisherInverse(GOOD, 1.0, block_size=4)
    with pytest.raises(ValueError, match=f"{name} must"):
        inv.entry(i, j)
    with pytest.raises(ValueError, match=f"{name} must"):
        inv.entries([i], [j])


@pytest.mark.parametrize("j", [6, -1, 100])
def test_column_out_of_range(j: int) -> None:
    """``column`` with an out-of-range index raises ValueError naming ``j``."""
    with pytest.raises(ValueError, match="j must"):
        StaticFisherInverse(GOOD, 1.0).column(j)


@pytest.mark.parametrize("j", [1.0, "0", True])
def test_index_bad_type(j: object) -> None:
    """Non-int indices raise TypeError naming the index."""
    inv = StaticFisherInverse(GOOD, 1.0)
    with pytest.raises(TypeError, match="j must"):
        inv.column(j)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="j must"):
        inv.entry(0, j)  # type: ignore[arg-type]
