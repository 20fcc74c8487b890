"""E-KFAC against dense float64 references: the exact Fisher of one datum, the K-FAC
products at a refresh, and the projected per-example gradients from autograd."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from secondorder import EKFAC, KFAC, CurvatureOptimizer, EKFACEstimator
from secondorder.estimators.ekfac import EKFACConfig

from ..helpers import (
    DIGITS_PAPERS,
    assert_close,
    kron_precondition,
    layer_grad_matrix,
    mlp,
    small_cnn,
    tolerance,
    train_digits,
    update_matrix,
)

dampings = st.floats(1e-4, 10.0).map(float)
F64 = dict(factor_dtype=torch.float64, inverse_dtype=torch.float64)


def _ekfac(model, **kwargs):
    """EKFAC with plain steps (no momentum, no clipping) in float64, refreshed on the fixed
    schedule (no warm-up refreshes: the tests count the refreshes and the scalings' resets)."""
    base = {"lr": 1.0, "momentum": 0.0, "kl_clip": None, "inverse_warmup": False, **F64}
    return EKFAC(model, **{**base, **kwargs}, graft=None)


def _make_layer(kind, in_dim, out_dim, batch, seq, bias, groups=1):
    if kind == "linear":
        layer = nn.Linear(in_dim, out_dim, bias=bias).double()
        shape = (batch, in_dim) if seq is None else (batch, seq, in_dim)
    else:
        layer = nn.Conv2d(
            2 * groups, out_dim * groups, 2, padding=1, groups=groups, bias=bias
        ).double()
        shape = (batch, 2 * groups, 3, 3)
    return layer, (lambda: torch.randn(shape, dtype=torch.float64))


def _loss(out):
    """A mean over the batch of per-example losses ``_loss(out[n:n+1])``."""
    return (out.tanh() ** 2 + out.sin()).mean()


def _backward(layer, x):
    layer.zero_grad()
    _loss(layer(x)).backward()


def _take_step(opt, layer, x, lr):
    """One optimizer step on ``x`` at learning rate ``lr``; returns (∇, ∆ as a matrix)."""
    for group in opt.param_groups:
        group["lr"] = lr
    _backward(layer, x)
    groups = getattr(layer, "groups", 1)
    grad = layer_grad_matrix(layer, groups)
    before = [p.detach().clone() for p in layer.parameters()]
    opt.step()
    delta = [b - p.detach() for b, p in zip(before, layer.parameters(), strict=True)]
    return grad, update_matrix(delta, layer)


def _per_example_grads(layer, x):
    """``∇_n`` of each example's loss by autograd on a hook-free twin: ``(n, groups, g, a)``."""
    twin = copy.deepcopy(layer)
    twin._forward_hooks.clear()  # the capture's hooks must not see these passes
    twin._forward_pre_hooks.clear()
    groups = getattr(layer, "groups", 1)
    grads = []
    for n in range(x.shape[0]):
        _backward(twin, x[n : n + 1])
        grads.append(layer_grad_matrix(twin, groups))
    return torch.stack(grads)


def _projected_mean_square(grads, q_a, q_g):
    """``mean_n (Q_Gᵀ ∇_n Q_A)²`` per group: the correct transpose, densely."""
    return (q_g.transpose(-1, -2) @ grads @ q_a).square().mean(0)


def _read_back(layer, expected) -> float:
    """The scale of a step read back as ``w − w'``: the size of the weights, to which
    ``w'`` is rounded, plus the step's own."""
    return max(float(p.detach().abs().max()) for p in layer.parameters()) + float(
        expected.abs().max()
    )


def _damped_cond(a, g, damping):
    """``cond(A ⊗ G + λI)`` (worst group), from the eigenvalues of the factors; ``A`` may
    be a diagonal ``(groups, a_dim)``, and ``g`` None for a blocks layer (``a`` holds the
    ``(C, k, k)`` blocks): what a solve with the damped curvature amplifies errors by."""
    if g is None:
        eig = torch.linalg.eigvalsh(a.double()).flatten()
    else:
        d_a = a.double() if a.dim() == 2 else torch.linalg.eigvalsh(a.double())
        eig = (torch.linalg.eigvalsh(g.double())[:, :, None] * d_a[:, None, :]).flatten()
    eig = eig.clamp_min(0)
    return float((eig.max() + damping) / (eig.min() + damping))


@given(
    in_dim=st.integers(1, 6),
    out_dim=st.integers(1, 5),
    bias=st.booleans(),
    damping=dampings,
    seed=st.integers(0, 2**16),
)
def test_one_datum_direction_is_the_exact_damped_fisher_solve(in_dim, out_dim, bias, damping, seed):
    """One example: the eigenbases of ããᵀ and ggᵀ contain ã and g, so ∇ = g ãᵀ is one
    coordinate of the Kronecker eigenbasis and diag(S) there is the whole Fisher."""
    torch.manual_seed(seed)
    layer, data = _make_layer("linear", in_dim, out_dim, 1, None, bias)
    x = data()
    opt = _ekfac(
        layer,
        damping=damping,
        curvature_every=100,
        inverse_every=100,
        scale_every=1,
        scale_decay=0.0,
    )
    _take_step(opt, layer, x, lr=0.0)  # factors and eigenbasis from x
    grad, delta = _take_step(opt, layer, x, lr=1.0)  # scalings from x, then the step
    assert opt.estimator.state_dict()["scalings"][""]["updates"] == 2  # the reset, then x
    vec = grad[0].T.reshape(-1)  # column-major, as kron(A, G) is laid out
    fisher = torch.outer(vec, vec) + damping * torch.eye(vec.numel(), dtype=torch.float64)
    expected = torch.linalg.solve(fisher, vec).reshape(grad.shape[2], grad.shape[1]).T
    # one row, eigendecompositions of sizes out_dim and in_dim (+ bias), a damped solve
    n = 1 + grad.shape[1] + grad.shape[2]
    cond = float(torch.linalg.cond(fisher))
    assert_close(delta[0], expected, n=n, cond=cond, scale=_read_back(layer, expected))


@given(
    kind=st.sampled_from(["linear", "conv"]),
    in_dim=st.integers(1, 5),
    out_dim=st.integers(1, 4),
    batch=st.integers(1, 6),
    seq=st.sampled_from([None, 3]),
    bias=st.booleans(),
    damping=dampings,
    seed=st.integers(0, 2**16),
)
def test_right_after_a_refresh_scalings_are_the_kfac_products_and_the_step_is_kfacs(
    kind, in_dim, out_dim, batch, seq, bias, damping, seed
):
    torch.manual_seed(seed)
    layer, data = _make_layer(kind, in_dim, out_dim, batch, seq, bias)
    opt = _ekfac(layer, damping=damping, curvature_every=1, inverse_every=3, scale_every=1)
    est = opt.estimator
    for _ in range(3):  # a refresh, then two scale updates in its basis
        _take_step(opt, layer, data(), lr=0.0)
    assert est.state_dict()["scalings"][""]["updates"] == 3
    grad, delta = _take_step(opt, layer, data(), lr=1.0)  # step 3 refreshes
    a, g = est.factors("")
    products = torch.outer(torch.linalg.eigvalsh(g[0]), torch.linalg.eigvalsh(a[0]))[None]
    # the same factors, decomposed by another solver call: eigenvalues are accurate to
    # eps·(size)·‖factor‖, so each product to about eps·(a_dim + g_dim)·max |product|
    n = a.shape[-1] + g.shape[-1]
    assert_close(est.scalings(""), products, n=n)
    expected = kron_precondition(a[0], g[0], grad[0], damping)
    cond = _damped_cond(a, g, damping)
    assert_close(delta[0], expected, n=n, cond=cond, scale=_read_back(layer, expected))


def test_a_warmup_refresh_resets_the_scalings_as_a_scheduled_one():
    """With ``inverse_warmup`` the refreshes at steps 1, 2 and 4 (``curvature_every=1``)
    reset the scalings to the K-FAC products and skip that step's scaling statistics, as
    the refresh at a multiple of ``inverse_every`` does; step 3 updates them in the basis."""
    torch.manual_seed(0)
    layer, data = _make_layer("linear", 4, 3, 5, None, True)
    opt = _ekfac(layer, damping=0.1, curvature_every=1, inverse_every=100, inverse_warmup=True)
    est = opt.estimator
    projections, project = [], est._projected_squares

    def counting(*args):
        projections.append(opt._step)
        return project(*args)

    est._projected_squares = counting
    updates = []
    for _ in range(5):  # steps 0 .. 4
        _take_step(opt, layer, data(), lr=0.0)
        updates.append(est.state_dict()["scalings"][""]["updates"])
    assert updates == [1, 1, 1, 2, 1]  # each refresh resets (one update), step 3 adds one
    assert projections == [3]  # scaling statistics only where no refresh follows
    a, g = est.factors("")
    products = torch.outer(torch.linalg.eigvalsh(g[0]), torch.linalg.eigvalsh(a[0]))[None]
    assert_close(est.scalings(""), products, n=a.shape[-1] + g.shape[-1])


@given(
    in_dim=st.integers(1, 6),
    out_dim=st.integers(1, 5),
    batches=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    seq=st.sampled_from([None, 3]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_scalings_are_the_mean_square_of_projected_per_example_gradients(
    in_dim, out_dim, batches, seq, bias, seed
):
    """S = mean_n (Q_Gᵀ ∇_n Q_A)² with ∇_n from autograd; shapes (g, a) are rectangular,
    so the transposed projection Q_G ∇ Q_Aᵀ of the reference code would not fit."""
    torch.manual_seed(seed)
    layer, _ = _make_layer("linear", in_dim, out_dim, 1, seq, bias)
    data = [_make_layer("linear", in_dim, out_dim, b, seq, bias)[1] for b in batches]
    _check_scalings_against_autograd(layer, *data)


@given(
    groups=st.sampled_from([1, 2]),
    out_dim=st.integers(1, 3),
    batches=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv2d_scalings_sum_each_examples_gradient_over_positions(
    groups, out_dim, batches, bias, seed
):
    torch.manual_seed(seed)
    layer, _ = _make_layer("conv", 0, out_dim, 1, None, bias, groups)
    data = [_make_layer("conv", 0, out_dim, b, None, bias, groups)[1] for b in batches]
    _check_scalings_against_autograd(layer, *data)


def _check_scalings_against_autograd(layer, first_data, second_data):
    opt = _ekfac(
        layer, damping=1e-3, curvature_every=100, inverse_every=100, scale_every=1, scale_decay=0.0
    )
    est = opt.estimator
    x0, x1 = first_data(), second_data()
    _take_step(opt, layer, x0, lr=0.0)  # factors and basis from x0
    q_a, q_g = est.eigenbasis("")
    a, g = est.factors("")
    for basis, factor in ((q_a, a), (q_g, g)):  # an eigenbasis of the factors
        rotated = basis.transpose(-1, -2) @ factor @ basis
        off = rotated - torch.diag_embed(rotated.diagonal(dim1=-2, dim2=-1))
        # the decomposition's backward error and two products, each of size n
        bound = tolerance(torch.float64, n=3 * factor.shape[-1]) * factor.abs().max()
        assert off.abs().max() <= bound
    expected = _projected_mean_square(_per_example_grads(layer, x1), q_a, q_g)
    _take_step(opt, layer, x1, lr=0.0)  # scalings from x1 (decay 0: x1 only)
    got = est.scalings("")
    assert got.shape == layer_grad_matrix(layer, getattr(layer, "groups", 1)).shape
    # each example's gradient sums its rows, then projections of sizes g_dim and a_dim,
    # then the mean over the examples
    n = est.layers[0].rows_count(x1) + a.shape[-1] + g.shape[-1] + x1.shape[0]
    assert_close(got, expected, n=n)


def test_scalings_differ_from_the_kfac_products_and_so_do_the_steps():
    """The refresh test above is not vacuous: per-example scalings are not d_G d_Aᵀ."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 3).double()
    x0, x1 = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    opt = _ekfac(layer, damping=1e-3, curvature_every=100, inverse_every=100, scale_decay=0.0)
    _take_step(opt, layer, x0, lr=0.0)
    products = opt.estimator.scalings("").clone()
    grad, delta = _take_step(opt, layer, x1, lr=1.0)
    s = opt.estimator.scalings("")
    assert (s - products).abs().max() > 0.1 * products.abs().max()
    a, g = opt.estimator.factors("")
    kfac = kron_precondition(a[0], g[0], grad[0], 1e-3)
    assert (delta[0] - kfac).abs().max() > 0.1 * kfac.abs().max()


def test_scalings_ramp_from_the_reset_then_decay():
    """The reset counts as the first sample in a new basis: the k-th statistics after it
    enter with weight 1 - min(1 - 1/(k+1), scale_decay)."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    decay = 0.6
    opt = _ekfac(layer, curvature_every=100, inverse_every=100, scale_decay=decay)
    est = opt.estimator
    _take_step(opt, layer, torch.randn(5, 4, dtype=torch.float64), lr=0.0)
    q_a, q_g = est.eigenbasis("")
    expected = est.scalings("").clone()
    for k in range(1, 5):
        x = torch.randn(5, 4, dtype=torch.float64)
        fresh = _projected_mean_square(_per_example_grads(layer, x), q_a, q_g)
        expected = torch.lerp(fresh, expected, min(1 - 1 / (k + 1), decay))
        _take_step(opt, layer, x, lr=0.0)
        # 5 rows, projections of sizes 3 and 5 (4 + bias), the mean and the lerp
        assert_close(est.scalings(""), expected, n=5 + 3 + 5 + 2)


def test_each_step_records_only_the_statistics_it_uses():
    """Factors at factor steps; scalings at scale steps, but not at refresh steps (the reset
    overwrites them) nor before the first eigenbasis; nothing at all at other steps."""
    torch.manual_seed(0)
    model = mlp([4, 5, 3])
    opt = EKFAC(model, curvature_every=3, inverse_every=4, scale_every=2, graft=None)
    seen = {}
    accumulate = opt.capture.accumulate

    def spy(layer, inputs, grad_output, acc):
        acc = accumulate(layer, inputs, grad_output, acc)
        seen.setdefault(opt.steps, set()).update(
            {"factors"} if acc.kfac is not None else set(),
            {"scalings"} if acc.scale_sum is not None else set(),
        )
        return acc

    opt.capture.accumulate = spy
    recording = []
    for _ in range(13):
        recording.append(opt.capture.recording)
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(6, 4)), torch.randint(0, 3, (6,))).backward()
        opt.step()
    expected = {}
    for k in range(13):
        want = ({"factors"} if k % 3 == 0 else set()) | (
            {"scalings"} if k % 2 == 0 and k % 4 != 0 else set()
        )
        if want:
            expected[k] = want
    assert seen == expected
    assert recording == [k in expected for k in range(13)]


def test_eigenbasis_layers_and_kfac_path_layers_together():
    """Embedding (diagonal A) and LayerNorm (blocks) take the K-FAC path: their steps are
    K-FAC's, while the Linear layers' steps differ once scalings are updated."""

    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Embedding(7, 4),
            nn.LayerNorm(4),
            nn.Flatten(),
            nn.Linear(12, 5),
            nn.Tanh(),
            nn.Linear(5, 3),
        ).double()

    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randint(0, 7, (6, 3), generator=gen), torch.randint(0, 3, (6,), generator=gen))
        for _ in range(2)
    ]
    deltas = []
    for make in (
        lambda m: _ekfac(m, lr=0.1, damping=1e-2, curvature_every=1, inverse_every=10),
        lambda m: KFAC(
            m,
            lr=0.1,
            momentum=0.0,
            damping=1e-2,
            curvature_every=1,
            inverse_every=10,
            inverse_warmup=False,  # as _ekfac's
            kl_clip=None,
            **F64,
            graft=None,
        ),
    ):
        model = build()
        opt = make(model)
        for x, y in batches:
            before = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        deltas.append([b - p.detach() for b, p in zip(before, model.parameters(), strict=True)])
        if isinstance(opt, EKFAC):
            est = opt.estimator
            assert est.eigen_layers == ["3", "5"]
            assert est.scalings("0") is None and est.scalings("3") is not None
        else:
            kfac_estimator = opt.estimator
    ekfac, kfac = deltas
    # The second step's gradients come through the Linear layers, whose first steps (the
    # same direction, computed in the eigenbasis or by K-FAC) agree to round-off: every
    # solve on the way amplifies it at most by the worst damped condition number; the
    # factors sum 18 token rows and have at most 12 + 1 columns. (Steps read back as
    # w − w': resolved to the size of the weights.)
    cond = max(_damped_cond(*kfac_estimator.factors(name), 1e-2) for name in ("0", "1", "3", "5"))
    weights = list(model.parameters())
    for i in range(3):  # embedding, layer-norm weight and bias
        scale = float(weights[i].detach().abs().max() + kfac[i].abs().max())
        assert_close(ekfac[i], kfac[i], n=18 + 13 + 5, cond=cond, scale=scale)
    assert not torch.allclose(ekfac[3], kfac[3])


def test_monte_carlo_fisher_feeds_factors_and_scalings_on_their_schedule():
    """With fisher_type='mc' the sampled-label pass is the one recorded, on EKFAC's
    schedule (sample_fisher runs only at steps that record)."""
    torch.manual_seed(0)
    model = mlp([4, 5, 3])
    opt = EKFAC(
        model,
        fisher_type="mc",
        likelihood="categorical",
        curvature_every=2,
        inverse_every=4,
        scale_every=1,
        graft=None,
    )
    for _ in range(8):
        opt.zero_grad()
        out = model(torch.randn(6, 4))
        opt.sample_fisher(out)
        F.cross_entropy(out, torch.randint(0, 3, (6,))).backward()
        opt.step()
    # refreshed at step 4, then scale updates at steps 5, 6 and 7
    assert opt.estimator.state_dict()["scalings"]["0"]["updates"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- state_dict and arguments ---------------------------------------------------------
def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(curvature_every=2, inverse_every=3, scale_every=1),
        dict(curvature_every=1, inverse_every=5, scale_every=2, scale_decay=0.5),
        dict(curvature_every=3, inverse_every=4, scale_every=1, base="adam", lr=1e-3),
    ],
)
@pytest.mark.parametrize("split", [4, 7])
def test_state_dict_round_trip_resumes_the_same_trajectory(kwargs, split):
    torch.manual_seed(0)
    model = small_cnn()
    reference = copy.deepcopy(model)
    kwargs = {"lr": 0.05, **kwargs}
    gen = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(6, 1, 8, 8, generator=gen), torch.randint(0, 10, (6,), generator=gen))
        for _ in range(11)
    ]
    straight = _train(reference, EKFAC(reference, **kwargs, graft=None), batches)

    opt = EKFAC(model, **kwargs, graft=None)
    _train(model, opt, batches[:split])
    saved = copy.deepcopy(opt.state_dict())
    assert saved["curvature"]["estimator"]["scalings"]
    model_state = copy.deepcopy(model.state_dict())

    torch.manual_seed(123)
    fresh_model = small_cnn()
    fresh_model.load_state_dict(model_state)
    fresh = EKFAC(fresh_model, **kwargs, graft=None)
    fresh.load_state_dict(saved)
    resumed = _train(fresh_model, fresh, batches[split:])
    for a, b in zip(straight, resumed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_state_dict_from_another_model_is_rejected():
    model = mlp([6, 8, 3])
    opt = EKFAC(model, curvature_every=1, graft=None)
    _train(model, opt, [(torch.randn(4, 6), torch.randint(0, 3, (4,)))])
    with pytest.raises(ValueError, match="different model"):
        EKFAC(mlp([6, 9, 3]), graft=None).load_state_dict(opt.state_dict())
    state = copy.deepcopy(opt.state_dict())
    state["curvature"]["estimator"]["scalings"]["0"]["scalings"] = torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match="scalings of shape"):
        EKFAC(mlp([6, 8, 3]), graft=None).load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        (dict(scale_every=0), ValueError, "scale_every"),
        (dict(scale_every=1.5), ValueError, "scale_every"),
        (dict(curvature_every=0), ValueError, "curvature_every"),
        (dict(inverse_every=-1), ValueError, "inverse_every"),
        (dict(scale_decay=1.0), ValueError, "scale_decay"),
        (dict(scale_decay=-0.1), ValueError, "scale_decay"),
        (dict(scale_decay="0.9"), ValueError, "scale_decay"),
        (dict(factor_decay=1.5), ValueError, "factor_decay"),
        (dict(damping=0.0), ValueError, "damping"),
        (dict(kl_clip=-1.0), ValueError, "kl_clip"),
        (dict(factor_dtype=torch.int32), ValueError, "factor_dtype"),
        (dict(base="rmsprop"), ValueError, "base"),
        # EKFACConfig's message, not a generic unexpected-keyword one
        (dict(inverse_method="cholesky"), ValueError, "eigenbasis: inverse_method"),
        (dict(damping_mode="factored"), ValueError, "eigenbasis: inverse_method"),
        (dict(scal_every=2), TypeError, "Did you mean 'scale_every'"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        EKFAC(mlp([4, 3]), **kwargs, graft=None)


def test_needs_the_model_not_its_parameters():
    with pytest.raises(TypeError, match="model itself"):
        EKFAC(mlp([4, 3]).parameters(), graft=None)


def test_scalings_before_the_first_basis_and_plain_estimator_use():
    """Used on its own (no plan), the estimator records factors at every pass and
    scalings once it has a basis; its config must stay in the eigenbasis."""
    torch.manual_seed(0)
    model = mlp([4, 3])
    opt = CurvatureOptimizer(
        model, lambda layers, params: EKFACEstimator(layers), lr=0.1, inverse_every=10
    )
    est = opt.estimator
    assert est.scalings("0") is None and est.eigenbasis("0") is None
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    _train(model, opt, [(x, y)] * 3)
    assert est.state_dict()["scalings"]["0"]["updates"] == 3  # the reset, then steps 1 and 2
    with pytest.raises(TypeError, match="EKFACConfig"):
        EKFACEstimator(est.layers, config=KFAC(mlp([4, 3]), graft=None).estimator.config)
    with pytest.raises(ValueError, match="inverse_method"):
        EKFACConfig(inverse_method="cholesky", damping_mode="factored")


# ---- training -------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """A 64-wide MLP runs faster on one thread than on several (and far faster on a loaded
    machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("lr", [0.02, 0.05])
def test_ekfac_trains_digits_faster_than_sgd_at_the_same_learning_rate(lr, one_thread):
    """Summed over 8 seeds, E-KFAC's final train loss is below 0.6 of SGD's.

    One seed is not a measurement here: with the default float32 factors and
    eigendecompositions the E-KFAC trajectory is chaotic in the CPU's rounding. At
    lr = 0.05 one seed's ratio E-KFAC / SGD moved between 0.13 and 0.97 across kernels
    (ATEN_CPU_CAPABILITY, MKL_CBWR, threads) while SGD's loss stayed the same to 4 digits
    (and E-KFAC's with float64 factors and eigendecompositions moved by a few percent).
    Over 6 such configurations x 10 seeds the ratio averaged 0.40 with a standard
    deviation of 0.15, so an 8-seed mean has a standard error of 0.05, and 0.6 is 4 of
    them above the average (the worst configuration's 8-seed mean was 0.44). At
    lr = 0.02 the ratio is about 0.05."""
    epochs, seeds = 4, range(8)
    sgd = [
        train_digits(lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), epochs, seed)
        for seed in seeds
    ]
    ekfac = [
        train_digits(
            lambda m: EKFAC(m, lr=lr, **DIGITS_PAPERS),
            epochs,
            seed,
        )
        for seed in seeds
    ]
    print(
        f"digits train loss after {epochs} epochs at lr={lr}, seeds {list(seeds)}: "
        f"SGD {[round(v, 4) for v in sgd]}  E-KFAC {[round(v, 4) for v in ekfac]}  "
        f"ratio of the sums {sum(ekfac) / sum(sgd):.3f}"
    )
    assert sum(ekfac) < 0.6 * sum(sgd)
