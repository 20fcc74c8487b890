"""SOAP against Adam and against a dense float64 computation.

Pinned: with no rotation (``max_factor_dim=0``) SOAP's step is ``torch.optim.Adam``'s /
``AdamW``'s to round-off (Adam's direction, then ``w ← w − lr·u``: the same operations but
for where ``lr`` multiplies); with the basis forced to the identity the rotated path is the
unrotated one bit for bit (after the first step, which only builds the basis; the step after
it is Adam's first in the basis, against a dense computation); the directions of a run with
refreshes match a dense float64 recurrence, where with ``basis_refresh="eigh"`` the second
moment is carried to the new basis as the diagonal of its second-moment matrix ``Σ v_ij (q_i
⊗ r_j)(q_i ⊗ r_j)ᵀ`` (a Kronecker product of size ``mn``) and with ``"qr"`` (the default)
the bases are the dense power iteration's and ``v`` is permuted by the sorted estimated
eigenvalues; the first moment, kept rotated, is the rotated dense one; a carry between bases
equal up to order and signs is the reference's permutation, exactly; a resumed run is the
uninterrupted one bit for bit; bad arguments raise.

Tolerances: a direction is a few products with orthogonal matrices of size ``n`` and an
elementwise Adam quotient, so ``n`` = the matrix size times the steps of the recurrence,
``cond`` 1 (the quotient's denominator is ≥ ε-free here: gradients are O(1)).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.estimators import soap as soap_module
from secondorder.estimators.soap import SOAPConfig, SOAPEstimator

from ..helpers import assert_close, assert_resume_is_exact, mlp, train_steps


def _batches(n: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 5, generator=gen, dtype=dtype), torch.randint(0, 3, (8,), generator=gen))
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    ("kwargs", "reference"),
    [
        ({}, lambda p: torch.optim.Adam(p, lr=3e-3, betas=(0.95, 0.95))),
        (
            {"weight_decay": 0.1},
            lambda p: torch.optim.AdamW(p, lr=3e-3, betas=(0.95, 0.95), weight_decay=0.1),
        ),
        (
            {"weight_decay": 0.1, "decoupled_weight_decay": False, "soap_betas": (0.9, 0.99)},
            lambda p: torch.optim.Adam(p, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1),
        ),
    ],
)
def test_without_rotation_soap_is_adam(kwargs, reference):
    torch.manual_seed(0)
    model = mlp([5, 7, 3]).double()
    twin = copy.deepcopy(model)
    opt = so.SOAP(model.parameters(), lr=3e-3, max_factor_dim=0, **kwargs)
    ref = reference(twin.parameters())
    steps = 6
    for batch in _batches(steps, torch.float64):
        train_steps(model, opt, [batch])
        train_steps(twin, ref, [batch])
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            # the parameters move by lr·u ~ 3e-3 a step; their round-off is that of p
            assert_close(p, q, n=steps)


def test_identity_basis_is_the_unrotated_path_bit_for_bit(monkeypatch):
    """A run whose bases are forced to the identity is the unrotated run bit for bit, but for
    the first step, which only builds the bases (every parameter here is rotated: no biases)."""
    torch.manual_seed(0)
    model = mlp([5, 7, 3], bias=False)
    twin = copy.deepcopy(model)
    plain = so.SOAP(twin.parameters(), max_factor_dim=0)

    def identity(matrices, dtype, **_):
        return [(torch.zeros(m.shape[-1], dtype=dtype), torch.eye(m.shape[-1], dtype=dtype))
                for m in matrices]  # fmt: skip

    monkeypatch.setattr(soap_module, "symmetric_eigh_many", identity)
    rotated = so.SOAP(model.parameters(), inverse_every=2, basis_refresh="eigh")
    batches = _batches(5)
    train_steps(model, rotated, batches)
    train_steps(twin, plain, batches[1:])
    assert all(
        s.bases[0] is not None for s in rotated.estimator.states.values() if s.stats[0] is not None
    )
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_first_step_only_builds_the_basis_and_adam_starts_at_the_next():
    """The refresh after the first statistics builds the basis from that one gradient, in
    which ``G'`` is diagonal up to round-off: that step leaves the rotated weight where it was
    (the bias takes Adam's step), and the next step is Adam's first in that basis, against a
    dense float64 computation (a square, full-rank gradient: distinct eigenvalues, so the
    direction does not depend on the eigenvectors' signs or order)."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 4).double()
    opt = so.SOAP(layer, lr=1.0, soap_betas=(0.9, 0.95), inverse_every=10)
    x = torch.randn(2, 8, 4, dtype=torch.float64)
    before = [p.detach().clone() for p in layer.parameters()]
    grads = []
    for i in range(2):
        opt.zero_grad()
        layer(x[i]).pow(2).sum().backward()
        grads.append(layer.weight.grad.detach().clone())
        opt.step()
        if i == 0:
            assert torch.equal(layer.weight, before[0])
            assert not torch.equal(layer.bias, before[1])
            state = opt.estimator.states[layer.weight]
            assert state.step == 0 and not state.exp_avg.any() and not state.exp_avg_sq.any()
            assert state.bases[0] is not None and state.bases[1] is not None
    g1, g2 = grads
    beta2 = 0.95  # shampoo_beta defaults to soap_betas[1]
    q_l = torch.linalg.eigh((1 - beta2) * g1 @ g1.T).eigenvectors
    q_r = torch.linalg.eigh((1 - beta2) * g1.T @ g1).eigenvectors
    rotated = q_l.T @ g2 @ q_r
    # Adam's first step in the rotated space: m̂ / (√v̂ + ε) = G' / (|G'| + ε)
    want = q_l @ (rotated / (rotated.abs() + 1e-8)) @ q_r.T
    moved = before[0] - layer.weight.detach()
    assert_close(moved, want, n=16, cond=float(rotated.abs().max() / rotated.abs().min()))


def _kron_carry(v, old_l, old_r, new_l, new_r):
    """The diagonal, in the basis ``new_l ⊗ new_r``, of ``Σ v_ij (q_i ⊗ r_j)(q_i ⊗ r_j)ᵀ``."""
    old = torch.kron(old_l, old_r)  # columns q_i ⊗ r_j, in the row-major order of v
    new = torch.kron(new_l, new_r)
    second = old @ torch.diag(v.reshape(-1)) @ old.T
    return torch.einsum("ka,kl,la->a", new, second, new).reshape(v.shape)


def _power_qr(stat, old, v, dim):
    """The reference's QR refresh of one side, densely: old columns sorted by
    ``diag(oldᵀ L old)`` descending, ``v`` permuted alike, ``qr(L old_sorted)``."""
    order = torch.argsort(torch.diagonal(old.T @ stat @ old), descending=True)
    return torch.linalg.qr(stat @ old[:, order]).Q, v.index_select(dim, order)


@pytest.mark.parametrize("refresh", ["eigh", "qr"])
@pytest.mark.parametrize("shape", [(4, 6), (3, 2, 2, 2)], ids=["linear", "conv"])
def test_directions_and_the_refresh_match_a_dense_recurrence(shape, refresh):
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(shape, dtype=torch.float64, generator=gen))
    cfg = SOAPConfig(
        soap_betas=(0.9, 0.95),
        shampoo_beta=0.8,
        soap_eps=1e-8,
        basis_refresh=refresh,
        merge_dims=True,  # the conv weight as one matrix; per dimension: the test below
    )
    est = SOAPEstimator([p], cfg)
    state = est.states[p]
    m_rows = shape[0]
    n_cols = p[0].numel()
    beta1, beta2, beta = 0.9, 0.95, 0.8
    left = torch.zeros(m_rows, m_rows, dtype=torch.float64)
    right = torch.zeros(n_cols, n_cols, dtype=torch.float64)
    m = torch.zeros(m_rows, n_cols, dtype=torch.float64)  # original space
    v = torch.zeros(m_rows, n_cols, dtype=torch.float64)
    # no basis before the first refresh: the identity. (A refresh at step 1 would give a
    # diagonal G' = Q_Lᵀ G Q_R, whose round-off zeros over ε make the quotient ill-posed.)
    ql = torch.eye(m_rows, dtype=torch.float64)
    qr = torch.eye(n_cols, dtype=torch.float64)
    first = True
    steps = 7
    for t in range(1, steps + 1):
        g = torch.randn(shape, dtype=torch.float64, generator=gen)
        gm = g.reshape(m_rows, -1)
        est.update({p: g})
        left = beta * left + (1 - beta) * gm @ gm.T
        right = beta * right + (1 - beta) * gm.T @ gm
        assert_close(state.stats[0], left, n=t)
        assert_close(state.stats[1], right, n=t)
        if t in (2, 4, 6):  # refreshes (the optimizer's first comes after the first update)
            est.refresh(0.0)
            new_l, new_r = state.bases
            if refresh == "qr" and not first:
                # one power-iteration step from the old basis, v permuted
                want_l, v = _power_qr(left, ql, v, 0)
                want_r, v = _power_qr(right, qr, v, 1)
                cond = max(
                    float(torch.linalg.cond(stat)) for stat in (left, right)
                )  # of L Q: Q's error from QR
                assert_close(new_l, want_l, n=m_rows, cond=cond)
                assert_close(new_r, want_r, n=n_cols, cond=cond)
                assert_close(state.exp_avg_sq, v, n=m_rows * n_cols * t)
            else:
                for basis, stat in ((new_l, left), (new_r, right)):
                    # an orthogonal basis that diagonalises the dense statistic
                    assert_close(basis.T @ basis, torch.eye(basis.shape[0], dtype=torch.float64),
                                 n=basis.shape[0])  # fmt: skip
                    rotated = basis.T @ stat @ basis
                    values = torch.linalg.eigvalsh(stat)
                    assert_close(rotated, torch.diag(torch.diagonal(rotated)), n=basis.shape[0],
                                 scale=float(values.abs().max()))  # fmt: skip
                    assert_close(torch.diagonal(rotated).sort().values, values, n=basis.shape[0])
                # carried from the old basis (the identity at the first refresh)
                v = _kron_carry(v, ql, qr, new_l, new_r)
                assert_close(state.exp_avg_sq, v, n=m_rows * n_cols)
            ql, qr = new_l.clone(), new_r.clone()
            first = False
        u = est.precondition({p: g}, 0.0)[p]
        m = beta1 * m + (1 - beta1) * gm
        rotated_g = ql.T @ gm @ qr
        v = beta2 * v + (1 - beta2) * rotated_g**2
        # the first moment, kept rotated by the estimator, is the rotated dense one
        assert_close(state.exp_avg, ql.T @ m @ qr, n=(m_rows + n_cols) * t)
        inner = (ql.T @ m @ qr / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + 1e-8)
        want = ql @ inner @ qr.T
        assert u.shape == p.shape
        assert_close(u.reshape(m_rows, -1), want, n=(m_rows + n_cols) * t)


def _kron(*ms: torch.Tensor) -> torch.Tensor:
    out = ms[0]
    for m in ms[1:]:
        out = torch.kron(out, m)
    return out


@pytest.mark.parametrize("refresh", ["eigh", "qr"])
def test_per_dimension_factors_match_a_dense_kronecker_recurrence(refresh):
    """``merge_dims=False`` (the default): a 3-D parameter has one statistic per dimension,
    ``L_d = EMA of G_(d) G_(d)ᵀ`` (einsum over the other two), and its rotation is the
    Kronecker product of the bases acting on the row-major ``vec(G)``; v's carry at an eigh
    refresh is ``(⊗_d (P_d∘P_d))ᵀ vec(v)``, at a QR refresh a permutation along each
    dimension; the directions follow, in float64."""
    gen = torch.Generator().manual_seed(0)
    shape = (3, 2, 4)
    p = nn.Parameter(torch.randn(shape, dtype=torch.float64, generator=gen))
    cfg = SOAPConfig(soap_betas=(0.9, 0.95), shampoo_beta=0.8, soap_eps=1e-8, basis_refresh=refresh)
    est = SOAPEstimator([p], cfg)
    state = est.states[p]
    assert [tuple(t.shape) for t in state.stats] == [(3, 3), (2, 2), (4, 4)]
    beta1, beta2, beta = 0.9, 0.95, 0.8
    contractions = ("ijk,ljk->il", "ijk,ilk->jl", "ijk,ijl->kl")
    stats = [torch.zeros(n, n, dtype=torch.float64) for n in shape]
    bases = [torch.eye(n, dtype=torch.float64) for n in shape]
    m = torch.zeros(24, dtype=torch.float64)  # rotated, row-major vec
    v = torch.zeros(24, dtype=torch.float64)
    first = True
    for t in range(1, 6):
        g = torch.randn(shape, dtype=torch.float64, generator=gen)
        est.update({p: g})
        for d, eq in enumerate(contractions):
            stats[d] = beta * stats[d] + (1 - beta) * torch.einsum(eq, g, g)
            assert_close(state.stats[d], stats[d], n=8 * t)
        if t in (2, 4):
            est.refresh(0.0)
            new = [q.clone() for q in state.bases]
            if refresh == "qr" and not first:
                v = v.reshape(shape)
                for d in range(3):
                    order = torch.argsort(
                        torch.diagonal(bases[d].T @ stats[d] @ bases[d]), descending=True
                    )
                    want = torch.linalg.qr(stats[d] @ bases[d][:, order]).Q
                    cond = float(torch.linalg.cond(stats[d]))
                    assert_close(new[d], want, n=shape[d], cond=cond)
                    v = v.index_select(d, order)
                v = v.reshape(-1)
            else:
                for q, stat in zip(new, stats, strict=True):  # orthogonal, diagonalising
                    rotated = q.T @ stat @ q
                    assert_close(rotated, torch.diag(torch.diagonal(rotated)), n=q.shape[0],
                                 scale=float(stat.abs().max()))  # fmt: skip
                carry = _kron(*[(old.T @ q).square() for old, q in zip(bases, new, strict=True)])
                v = carry.T @ v
            change = _kron(*[old.T @ q for old, q in zip(bases, new, strict=True)])
            m = change.T @ m
            bases = new
            first = False
            assert_close(state.exp_avg_sq.reshape(-1), v, n=24 * t)
        u = est.precondition({p: g}, 0.0)[p]  # at t = 1 no basis yet: identities
        q = _kron(*bases)
        rotated_g = q.T @ g.reshape(-1)
        m = beta1 * m + (1 - beta1) * rotated_g
        v = beta2 * v + (1 - beta2) * rotated_g**2
        assert_close(state.exp_avg.reshape(-1), m, n=24 * t)
        steps = state.step
        inner = (m / (1 - beta1**steps)) / ((v / (1 - beta2**steps)).sqrt() + 1e-8)
        assert u.shape == p.shape
        assert_close(u.reshape(-1), q @ inner, n=24 * t)


def test_a_carry_between_bases_equal_up_to_order_and_sign_is_a_permutation(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(4, 5, dtype=torch.float64, generator=gen))
    est = SOAPEstimator([p], SOAPConfig(basis_refresh="eigh"))
    state = est.states[p]
    ql = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=gen)).Q
    qr = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=gen)).Q
    state.bases[:] = [ql, qr]
    v = torch.rand(4, 5, dtype=torch.float64, generator=gen)
    state.exp_avg_sq = v.clone()
    perm_l, perm_r = torch.tensor([2, 0, 3, 1]), torch.tensor([4, 1, 0, 3, 2])
    signs_l = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    new = {4: ql[:, perm_l] * signs_l, 5: qr[:, perm_r]}
    monkeypatch.setattr(
        soap_module,
        "symmetric_eigh_many",
        lambda ms, dtype, **_: [(torch.zeros(x.shape[-1]), new[x.shape[-1]]) for x in ms],
    )
    est.refresh(0.0)
    # to round-off: the squared entries of Q_oldᵀ Q_new are 1 and ~1e-32
    assert_close(state.exp_avg_sq, v[perm_l][:, perm_r], n=5)


@pytest.mark.parametrize("merge", [False, True])
def test_resume_is_exact(merge):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 16, 4))
    kwargs = {"lr": 1e-2, "inverse_every": 3, "weight_decay": 0.01, "merge_dims": merge}
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(5, 2, 6, 6, generator=gen), torch.randint(0, 4, (5,), generator=gen))
        for _ in range(8)
    ]
    # saved after step 4: a refresh at step 3 carried v; the next comes at 6
    assert_resume_is_exact(lambda m: so.SOAP(m.parameters(), **kwargs), model, batches, 4)


def _trained_soap(**kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 16, 4))
    opt = so.SOAP(model.parameters(), inverse_every=2, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(5, 2, 6, 6, generator=gen), torch.randint(0, 4, (5,), generator=gen)
        train_steps(model, opt, [(x, y)])
    return model, opt


def test_a_state_of_the_matrix_only_format_loads_and_another_layout_is_refused():
    """States saved before the per-dimension factors (keys ``left``/``right``/``…_basis``)
    load into ``merge_dims=True``, where they mean the same; a merged state is refused by a
    per-dimension optimizer with a message naming ``merge_dims``."""
    _, merged = _trained_soap(merge_dims=True)
    state = merged.state_dict()
    old = copy.deepcopy(state)
    for entry in old["curvature"]["estimator"]["states"]:
        stats, bases = entry.pop("stats"), entry.pop("bases")
        del entry["seen"]
        if stats:
            entry["left"], entry["right"] = stats
            entry["left_basis"], entry["right_basis"] = bases
    _, fresh = _trained_soap(merge_dims=True)
    fresh.load_state_dict(old)
    for a, b in zip(fresh.estimator.states.values(), merged.estimator.states.values(), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.stats, b.stats, strict=True))
        assert all(torch.equal(x, y) for x, y in zip(a.bases, b.bases, strict=True))
        assert a.seen == a.step == b.step  # the old format had no skipped first step
    _, per_dim = _trained_soap()
    with pytest.raises(
        ValueError, match=r"exp_avg of shape \(3, 18\) for parameter param\[0\].*merge_dims"
    ):
        per_dim.load_state_dict(state)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("soap_betas", (1.0, 0.9)),
        ("soap_betas", (0.9,)),
        ("soap_betas", (0.9, -0.1)),
        ("soap_eps", -1.0),
        ("shampoo_beta", 0.0),
        ("shampoo_beta", 1.5),
        ("max_factor_dim", -1),
        ("max_factor_dim", 1.5),
    ],
)
def test_bad_arguments_name_the_argument(name, value):
    with pytest.raises(ValueError, match=name.replace("[", r"\[")):
        so.SOAP(mlp([3, 2]).parameters(), **{name: value})
    with pytest.raises(TypeError, match="merge_dims must be a bool, got str"):
        so.SOAP(mlp([3, 2]).parameters(), merge_dims="no")


@pytest.mark.parametrize("name", ["graft", "momentum", "kl_clip", "damping", "precondition"])
def test_what_soap_fixes_is_not_a_keyword(name):
    with pytest.raises(TypeError, match=name):
        so.SOAP(mlp([3, 2]).parameters(), **{name: None})


def test_the_bench_knows_soap():
    from secondorder.bench.optimizers import OPTIMIZERS

    spec = OPTIMIZERS["soap"]
    assert spec.config_class is SOAPConfig
    assert isinstance(spec.factory(mlp([3, 4, 2]), **spec.defaults), so.SOAP)
