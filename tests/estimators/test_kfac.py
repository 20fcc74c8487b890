"""K-FAC against dense float64 references (explicit Kronecker products, exact Fisher)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from secondorder import KFAC

from ..helpers import (
    DIGITS_PAPERS,
    EXACT_STEP,
    assert_close,
    damped_kron_cond,
    dense_conv_patches,
    grad_rows,
    kfac_factors,
    kron_factored_precondition,
    kron_precondition,
    layer_grad_matrix,
    tolerance,
    train_digits,
    update_matrix,
    with_ones,
)

dampings = st.floats(1e-4, 10.0).map(float)
modes = st.sampled_from([("eigen", "eigen"), ("eigen", "factored"), ("cholesky", "factored")])


def _one_step_update(model, layer, x, loss_fn, damping, method, mode):
    """Take one K-FAC step with lr=1 and no momentum; return (update, output grad)."""
    opt = KFAC(
        model,
        lr=1.0,
        momentum=0.0,
        damping=damping,
        curvature_every=1,
        inverse_every=1,
        kl_clip=None,
        inverse_method=method,
        damping_mode=mode,
        factor_dtype=torch.float64,
        inverse_dtype=torch.float64,
        graft=None,
    )
    out = layer(x)
    out.retain_grad()
    loss_fn(out).backward()
    before = [p.detach().clone() for p in layer.parameters()]
    grad = layer_grad_matrix(layer, getattr(layer, "groups", 1))
    opt.step()
    delta = [b - p.detach() for b, p in zip(before, layer.parameters(), strict=True)]
    return delta, out.grad, grad


def _reference(a, g, grad, damping, mode):
    fn = kron_precondition if mode == "eigen" else kron_factored_precondition
    return torch.stack([fn(a[i], g[i], grad[i], damping) for i in range(a.shape[0])])


def _check_step(delta, expected, a, g, rows, damping, mode, layer=None):
    """The step against the dense solve: the factors sum ``rows`` rows, then factors of
    sizes ``a_dim`` and ``g_dim`` are decomposed, and the solve amplifies the error by the
    condition number of the damped matrix. A step read back as ``w − w'`` from ``layer``
    is resolved to the size of its weights, which joins the scale."""
    n = rows + a.shape[-1] + g.shape[-1]
    scale = float(expected.abs().max())
    if layer is not None:
        scale += max(float(p.detach().abs().max()) for p in layer.parameters())
    assert_close(delta, expected, n=n, cond=damped_kron_cond(a, g, damping, mode), scale=scale)


@given(
    in_dim=st.integers(1, 6),
    out_dim=st.integers(1, 5),
    batch=st.integers(1, 9),
    seq=st.sampled_from([None, 3]),
    bias=st.booleans(),
    damping=dampings,
    mode=modes,
    seed=st.integers(0, 2**16),
)
def test_linear_preconditioned_gradient_equals_dense_kronecker_solve(
    in_dim, out_dim, batch, seq, bias, damping, mode, seed
):
    torch.manual_seed(seed)
    layer = nn.Linear(in_dim, out_dim, bias=bias).double()
    shape = (batch, in_dim) if seq is None else (batch, seq, in_dim)
    x = torch.randn(shape, dtype=torch.float64)
    delta, g_out, grad = _one_step_update(
        layer, layer, x, lambda out: (out.tanh() ** 2).mean(), damping, *mode
    )
    rows = x.reshape(-1, in_dim)
    a, g = kfac_factors((with_ones(rows) if bias else rows)[None], grad_rows(g_out), batch)
    expected = _reference(a, g, grad, damping, mode[1])
    _check_step(update_matrix(delta, layer), expected, a, g, len(rows), damping, mode[1], layer)


@given(
    groups=st.sampled_from([1, 2]),
    kernel=st.sampled_from([1, 2, 3]),
    stride=st.sampled_from([1, 2]),
    padding=st.sampled_from([0, 1]),
    bias=st.booleans(),
    damping=dampings,
    mode=modes,
    seed=st.integers(0, 2**16),
)
def test_conv2d_preconditioned_gradient_equals_dense_kronecker_solve(
    groups, kernel, stride, padding, bias, damping, mode, seed
):
    torch.manual_seed(seed)
    layer = nn.Conv2d(
        2 * groups, 2 * groups, kernel, stride=stride, padding=padding, groups=groups, bias=bias
    ).double()
    x = torch.randn(2, 2 * groups, 5, 5, dtype=torch.float64)
    delta, g_out, grad = _one_step_update(
        layer, layer, x, lambda out: (out.sin() ** 2).mean(), damping, *mode
    )
    patches = dense_conv_patches(x, layer)
    if bias:
        patches = torch.cat([patches, torch.ones(*patches.shape[:2], 1, dtype=torch.float64)], 2)
    a, g = kfac_factors(patches, grad_rows(g_out, groups), batch=2)
    expected = _reference(a, g, grad, damping, mode[1])
    delta = update_matrix(delta, layer)
    _check_step(delta, expected, a, g, patches.shape[1], damping, mode[1], layer)


def _empirical_fisher_block(layer, groups=1):
    vec = layer_grad_matrix(layer, groups)[0].T.reshape(-1)  # column-major
    return torch.outer(vec, vec)


@given(
    in_dim=st.integers(1, 5),
    hidden=st.integers(1, 4),
    out_dim=st.integers(2, 4),
    seed=st.integers(0, 2**16),
)
def test_one_datum_deep_linear_net_kronecker_block_is_the_exact_fisher(
    in_dim, hidden, out_dim, seed
):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_dim, hidden), nn.Linear(hidden, out_dim)).double()
    opt = KFAC(model, curvature_every=1, factor_dtype=torch.float64, graft=None)
    x = torch.randn(1, in_dim, dtype=torch.float64)
    F.cross_entropy(model(x), torch.tensor([1])).backward()
    opt.estimator.update(opt.capture.collect())
    for name, layer in (("0", model[0]), ("1", model[1])):
        a, g = opt.estimator.factors(name)
        # one row: ã ãᵀ, g gᵀ and g ãᵀ are single products, then kron / outer: 2 roundings
        # on each side
        assert_close(torch.kron(a[0], g[0]), _empirical_fisher_block(layer), n=4)


def test_one_datum_conv_kronecker_block_is_the_exact_fisher():
    """One example, one output position (kernel covers the input): A ⊗ G is exact."""
    layer = nn.Conv2d(2, 3, 3).double()
    opt = KFAC(layer, curvature_every=1, factor_dtype=torch.float64, graft=None)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    (layer(x).sin().sum()).backward()
    opt.estimator.update(opt.capture.collect())
    a, g = opt.estimator.factors("")
    # one row: ã ãᵀ, g gᵀ and g ãᵀ are single products, then kron / outer: 2 roundings a side
    assert_close(torch.kron(a[0], g[0]), _empirical_fisher_block(layer), n=4)


def test_float32_path_is_close_to_the_float64_reference():
    torch.manual_seed(0)
    layer = nn.Linear(8, 5)
    x = torch.randn(16, 8)
    opt = KFAC(layer, lr=1.0, damping=1e-2, **EXACT_STEP)
    out = layer(x)
    out.retain_grad()
    F.cross_entropy(out, torch.randint(0, 5, (16,))).backward()
    grad = layer_grad_matrix(layer)
    pre = opt.estimator
    opt.step()
    a, g = kfac_factors(with_ones(x.double())[None], grad_rows(out.grad), 16)
    expected = kron_precondition(a[0], g[0], grad[0], 1e-2)
    got = pre.layers[0].grad_matrix(pre.precondition({p: p.grad for p in layer.parameters()}, 1e-2))
    # float32 factors (16 rows) and eigendecompositions (9 x 9, 5 x 5); λ = 1e-2 against
    # a G with a null vector (softmax) makes A ⊗ G + λI ill-conditioned (cond ~ 1e2)
    _check_step(got[0], expected, a, g, 16, 1e-2, "eigen")


@pytest.mark.parametrize("kappa", [1e-6, 1e-3, 1e3])
def test_kl_clipping_scales_the_step_onto_the_trust_region(kappa):
    """nu = min(1, sqrt(kappa / (lr^2 <V, g>))): the clipped step satisfies
    lr^2 <nu V, F nu V> = nu^2 lr^2 <V, g> = kappa whenever it clips."""
    lr = 0.5
    deltas, grads, before = [], None, []
    for clip in (None, kappa):
        torch.manual_seed(0)
        layer = nn.Linear(4, 3)
        opt = KFAC(layer, lr=lr, damping=1e-3, **{**EXACT_STEP, "kl_clip": clip})
        F.cross_entropy(layer(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
        grads = [p.grad.clone() for p in layer.parameters()]
        before = [p.detach().clone() for p in layer.parameters()]
        opt.step()
        deltas.append(
            [(b - p.detach()) / lr for b, p in zip(before, layer.parameters(), strict=True)]
        )
    vg = sum(lr**2 * float((v * g).sum()) for v, g in zip(deltas[0], grads, strict=True))
    nu = min(1.0, (kappa / vg) ** 0.5)
    # float32 steps read back as (w - w')/lr: resolved to eps·|w|/lr whatever their size
    # (hence the scale); ν comes from <V, g>, a sum over the 15 parameters
    resolution = max(float(w.abs().max()) for w in before) / lr
    scale = resolution + max(float((nu * v).abs().max()) for v in deltas[0])
    for v, clipped in zip(deltas[0], deltas[1], strict=True):
        assert_close(clipped, nu * v, n=15, scale=scale)
    if nu < 1:  # ν = √(κ/vg), squared, times vg: 4 float64 roundings
        assert nu**2 * vg == pytest.approx(kappa, rel=tolerance(torch.float64, n=4))


def test_damping_schedule_callable_is_used():
    torch.manual_seed(0)
    seen = []

    def damping(step):
        seen.append(step)
        return 1e-2 / (step + 1)

    layer = nn.Linear(4, 3)
    opt = KFAC(layer, damping=damping, curvature_every=1, inverse_every=1, graft=None)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(layer(torch.randn(5, 4)), torch.randint(0, 3, (5,))).backward()
        opt.step()
    assert sorted(set(seen)) == [0, 1, 2]


@pytest.mark.parametrize("lr", [0.02, 0.05])
def test_kfac_trains_digits_faster_than_sgd_at_the_same_learning_rate(lr):
    epochs = 4
    sgd = train_digits(lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), epochs)
    kfac = train_digits(
        lambda m: KFAC(m, lr=lr, **DIGITS_PAPERS),
        epochs,
    )
    print(f"digits train loss after {epochs} epochs at lr={lr}: SGD {sgd:.4f}  K-FAC {kfac:.4f}")
    assert kfac < 0.5 * sgd
