"""Factors for the analysis: fresh passes against dense float64 references, and optimizers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from secondorder import EKFAC, KFAC, MFAC, AdaFisher
from secondorder.analysis import (
    adafisher_diagonals,
    analyze_factors,
    compare_diagonals,
    diagonal_dominance,
    factor_matrix,
    fresh_adafisher_diagonals,
    fresh_kfac_factors,
    kfac_factors,
)

from ..helpers import (
    assert_close,
    dense_conv_patches,
    grad_rows,
    mlp,
    small_cnn,
    tolerance,
    with_ones,
)
from ..helpers import kfac_factors as dense_factors


def _batches(shape: tuple[int, ...], classes: int, k: int = 3, n: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, *shape, generator=gen), torch.randint(0, classes, (n,), generator=gen))
        for _ in range(k)
    ]


def _output_grads(model, layer, x, y):
    """Input and output gradient of ``layer`` for the batch-mean loss on (x, y)."""
    seen = {}

    def hook(module, args, output):
        seen["input"] = args[0].detach()
        output.register_hook(lambda g: seen.__setitem__("grad", g.detach()))

    handle = layer.register_forward_hook(hook)
    try:
        F.cross_entropy(model(x), y).backward()
    finally:
        handle.remove()
    model.zero_grad()
    return seen["input"], seen["grad"]


def test_fresh_factors_of_an_mlp_equal_the_concatenated_batch_reference() -> None:
    torch.manual_seed(0)
    model = mlp([6, 5, 4])
    batches = _batches((6,), 4)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    before = copy.deepcopy(model.state_dict())
    factors = fresh_kfac_factors(model, batches, F.cross_entropy)
    assert list(factors) == ["0", "2"]
    for name in factors:
        layer = dict(model.named_modules())[name]
        inputs, grad = _output_grads(model, layer, x, y)  # one batch of all 24 examples
        a_ref, g_ref = dense_factors(with_ones(inputs)[None], grad[None], batch=len(x))
        a, g = factors[name]
        assert a.dtype == g.dtype == torch.float64
        # float64 sums of float32 activations and output gradients, which the factor pass
        # computes on batches of 8 and this reference on one batch of 24 (other BLAS
        # blockings): 6- and 4-wide products and the tanh/softmax between them, twice in
        # each factor entry (a product of two of them): n = 2 x (6 + 4 + 2)
        assert_close(a, a_ref[0], dtype=torch.float32, n=24)
        assert_close(g, g_ref[0], dtype=torch.float32, n=24)
    # the model is untouched: weights, and no .grad left behind
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(p.grad is None for p in model.parameters())


def test_fresh_factors_of_a_cnn_equal_explicit_patches() -> None:
    torch.manual_seed(0)
    model = small_cnn(channels=2, classes=3)
    ((x, y),) = _batches((1, 8, 8), 3, k=1, n=4)
    factors = fresh_kfac_factors(model, [(x, y)], F.cross_entropy)
    conv = model[2]
    inputs, grad = _output_grads(model, conv, x, y)
    patches = dense_conv_patches(inputs.double(), conv)
    a_ref, g_ref = dense_factors(
        torch.cat([patches, patches.new_ones(*patches.shape[:2], 1)], dim=2), grad_rows(grad), 4
    )
    # float32 activations and output gradients (the first conv's 9-wide products, the
    # head's 3-wide ones going back, relu/softmax), twice in each factor entry; the float64
    # sums over 4 x 16 positions are far finer
    assert_close(factors["2"][0], a_ref[0], dtype=torch.float32, n=2 * (9 + 3 + 2))
    assert_close(factors["2"][1], g_ref[0], dtype=torch.float32, n=2 * (9 + 3 + 2))


def test_adafisher_diagonals_are_the_diagonals_of_the_kfac_factors() -> None:
    torch.manual_seed(0)
    model = small_cnn(channels=3, classes=4)
    batches = _batches((1, 8, 8), 4, k=2)
    factors = fresh_kfac_factors(model, batches, F.cross_entropy)
    diagonals = fresh_adafisher_diagonals(model, batches, F.cross_entropy)
    assert diagonals.keys() == factors.keys()
    # the same float32 passes, then two float64 sums of squares (a Gram matrix's diagonal
    # and AdaFisher's Σ x²) over at most 2 x 8 examples x 64 positions
    rows = 2 * 8 * 64
    for name, (a, g) in factors.items():
        assert_close(diagonals[name][0], torch.diagonal(a), dtype=torch.float64, n=rows)
        assert_close(diagonals[name][1], torch.diagonal(g), dtype=torch.float64, n=rows)
    check = compare_diagonals(factors, diagonals)
    tol = tolerance(torch.float64, n=rows)
    for name, entry in check.items():
        assert entry["max_rel_diff_A"] <= tol and entry["max_rel_diff_G"] <= tol
        assert entry["dominance_A"] == diagonal_dominance(factors[name][0])
        assert 0 < entry["kron_dominance"] < 1
    # a wrong diagonal shows
    bad = {n: (d[0] * 1.1, d[1]) for n, d in diagonals.items()}
    assert all(e["max_rel_diff_A"] > 0.05 for e in compare_diagonals(factors, bad).values())


def test_factors_of_trained_optimizers() -> None:
    torch.manual_seed(0)
    model = mlp([6, 5, 4])
    batches = _batches((6,), 4, k=2)
    opt = KFAC(model, lr=0.1, curvature_every=1, inverse_every=1)
    ekfac = EKFAC(copy.deepcopy(model), lr=0.1, curvature_every=1)
    assert kfac_factors(opt) == {}  # nothing recorded yet
    x, y = batches[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    got = kfac_factors(opt)
    for name, (a, g) in got.items():
        ref_a, ref_g = opt.estimator.factors(name)
        assert torch.equal(a, factor_matrix(ref_a)) and torch.equal(g, factor_matrix(ref_g))
        assert a.dtype == torch.float64
    assert set(got) == {"0", "2"}
    assert kfac_factors(ekfac) == {}
    with pytest.raises(TypeError, match="K-FAC-family"):
        kfac_factors(MFAC(model, lr=0.1))
    with pytest.raises(TypeError, match="AdaFisher"):
        adafisher_diagonals(opt)


def test_adafisher_optimizer_diagonals_equal_a_fresh_pass_at_the_same_weights() -> None:
    torch.manual_seed(0)
    model = mlp([6, 5, 4])
    ((x, y),) = _batches((6,), 4, k=1)
    fresh = fresh_adafisher_diagonals(copy.deepcopy(model), [(x, y)], F.cross_entropy)
    opt = AdaFisher(model, lr=0.1, curvature_every=1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    raw = adafisher_diagonals(opt)
    for name in fresh:  # the optimizer's float32 sums of 8 squares vs the float64 pass
        assert_close(raw[name][0], fresh[name][0], dtype=torch.float32, n=8)
        assert_close(raw[name][1], fresh[name][1], dtype=torch.float32, n=8)
    averaged = adafisher_diagonals(opt, raw=False)
    top = 1.0 + tolerance(torch.float32)  # normalised: one division by the largest entry
    assert all(float(h.max()) <= top for h, _ in averaged.values())


def test_factor_matrix_layouts() -> None:
    blocks = torch.arange(8.0).reshape(2, 2, 2)
    assert torch.equal(factor_matrix(blocks), torch.block_diag(blocks[0], blocks[1]).double())
    assert torch.equal(
        factor_matrix(torch.tensor([[1.0, 2.0]])), torch.diag(torch.tensor([1.0, 2.0])).double()
    )
    with pytest.raises(ValueError):
        factor_matrix(torch.ones(2, 3, 4))


def test_analyze_factors_reports_every_figure() -> None:
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    g = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))
    report = analyze_factors({"fc": (a, g)})["fc"]
    assert report["G"]["diagonal_dominance"] == 1.0
    rel = tolerance(torch.float64, n=4)  # sums of the 4 squared entries
    assert report["A"]["diagonal_dominance"] == pytest.approx(5 / 5.5, rel=rel)
    # dom(A)·dom(G) against the sums over the 36 entries of A ⊗ G
    kron = diagonal_dominance(torch.kron(a, g))
    assert report["kron_dominance"] == pytest.approx(kron, rel=tolerance(torch.float64, n=36))
    # λ_max/λ_min of a 3 x 3 eigendecomposition
    assert report["G"]["condition_number"] == pytest.approx(6.0, rel=tolerance(torch.float64, n=3))
    assert report["A"]["gershgorin"] == [0.5, 2.5]
    assert report["A"]["gershgorin_contains"] and report["G"]["gershgorin_contains"]
