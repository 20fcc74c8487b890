"""Batched refresh: the factors of every layer decomposed with one call per size agree with
the layer-by-layer refresh to the backward error of the solver, fallbacks and jitter stay
per matrix, and half-precision factors get float32 inverses.

A batched and a one-by-one eigendecomposition are different solver calls: they agree to
``eps · n · ‖A‖``, not bit for bit (their eigenvectors may even differ in sign, or by a
rotation inside a cluster of equal eigenvalues). Decompositions are therefore compared as
operators, ``Q f(D) Qᵀ``, which neither ambiguity changes (``tests/helpers.py`` has the
tolerance rule)."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from secondorder import EKFAC, KFAC, TwoLevelKFAC
from secondorder.distributed import Communicator
from secondorder.linalg import (
    damped_inverse_cholesky,
    damped_inverse_cholesky_many,
    symmetric_eigh,
    symmetric_eigh_many,
)

from ..helpers import assert_close, per_layer_refresh, use_per_layer_refresh


class _Net(nn.Module):
    """Conv (plain and grouped), linear, embedding and normalisation layers, several of
    them sharing factor sizes: G of conv1, conv2, fc1, fc2 and the embedding are 8 x 8, A
    of fc1, fc2 and fc3 9 x 9, the norm layers' blocks 2 x 2, conv3's factors are
    ``(2, n, n)`` batches."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.gn = nn.GroupNorm(2, 8)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, tokens = batch
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.gn(self.conv3(h))).mean((2, 3))
        h = h + self.emb(tokens).mean(1)
        h = torch.tanh(self.fc1(h))
        h = self.ln(torch.tanh(self.fc2(h)))
        return self.fc3(h)


def _data(steps: int) -> list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (
            (torch.randn(16, 3, 4, 4, generator=gen), torch.randint(0, 12, (16, 5), generator=gen)),
            torch.randint(0, 3, (16,), generator=gen),
        )
        for _ in range(steps)
    ]


DAMPING = 0.03


def _run(opt_cls, steps: int = 3, batched: bool = True, **kwargs):
    torch.manual_seed(0)
    model = _Net()
    opt = opt_cls(
        model,
        **{
            "lr": 0.05,
            "damping": DAMPING,
            "curvature_every": 1,
            "inverse_every": 2,
            "graft": None,  # the papers' update (the trajectory tolerance is derived for it)
            **kwargs,
        },
    )
    if not batched:
        use_per_layer_refresh(opt.estimator)
    for batch, y in _data(steps):
        opt.zero_grad()
        F.cross_entropy(model(batch), y).backward()
        opt.step()
    return model, opt


def _inverses(est) -> dict[str, dict[str, torch.Tensor | None]]:
    return {name: dict(st.inverse) for name, st in est._state.items()}


# The damped spectral function of the eigen comparisons: f(d) = 1/(d + δ) with
# δ = max(d)/100, so the operator Q f(D) Qᵀ has condition number at most 101 and weighs the
# eigenvectors of the small eigenvalues (those a damped inverse depends on most) fully.
EIG_COND = 101.0


def _eig_operator(d: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``Q (D + δ)⁻¹ Qᵀ`` in float64 (per member of a batch), δ = max(d) / 100."""
    d, q = d.double(), q.double()
    delta = d.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny) / 100
    return (q * (1.0 / (d + delta))[..., None, :]) @ q.transpose(-1, -2)


def assert_same_decomposition(d, q, d_ref, q_ref, msg=None) -> None:
    """Two eigendecompositions of the same matrix agree: the eigenvalues to
    ``eps · n · max|d|`` and the damped operators ``Q f(D) Qᵀ`` to ``eps · n · 101``."""
    assert d.dtype == d_ref.dtype and q.dtype == q_ref.dtype, msg
    assert d.shape == d_ref.shape and q.shape == q_ref.shape, msg
    n = q.shape[-1]
    assert_close(d, d_ref, n=n, msg=msg)
    assert_close(
        _eig_operator(d, q), _eig_operator(d_ref, q_ref), dtype=q.dtype, n=n, cond=EIG_COND, msg=msg
    )


def assert_same_inverse(inv, inv_ref, msg=None) -> None:
    """Two damped inverses of the same matrix (Cholesky) agree to ``eps · n · cond``."""
    assert inv.dtype == inv_ref.dtype and inv.shape == inv_ref.shape, msg
    ref = inv_ref.double()
    cond = float(torch.linalg.cond(ref).max()) if ref.dim() >= 2 else 1.0
    assert_close(inv, inv_ref, n=inv.shape[-1], cond=cond, msg=msg)


_EIGEN_PAIRS = {"d_a": "q_a", "d_g": "q_g", "block_d": "block_q"}


def _assert_same_inverses(got, want) -> None:
    """The same layers and keys, in the same order, and every inverse the same up to the
    solver's backward error (see the module docstring)."""
    assert list(got) == list(want)
    for name in want:
        assert list(got[name]) == list(want[name]), name  # the same keys, in the same order
        for key, ref in want[name].items():
            value = got[name][key]
            if ref is None:
                assert value is None, (name, key)
                continue
            assert value.dtype == ref.dtype and value.shape == ref.shape, (name, key)
            if key in _EIGEN_PAIRS.values():
                continue  # compared with its eigenvalues
            if key in _EIGEN_PAIRS and want[name][_EIGEN_PAIRS[key]] is not None:
                q_key = _EIGEN_PAIRS[key]
                assert_same_decomposition(
                    value, got[name][q_key], ref, want[name][q_key], msg=f"{name} {key}"
                )
            elif key in ("a_inv", "g_inv", "block_inv"):
                assert_same_inverse(value, ref, msg=f"{name} {key}")
            else:  # diagonals and π: elementwise from the same factor (π: a trace ratio)
                assert_close(value, ref, n=max(ref.shape[-1:], default=1), msg=f"{name} {key}")


def _trajectory_tolerance(opt) -> dict[str, float]:
    """``n`` and ``cond`` for comparing two training runs whose refreshes differ by the
    solver's round-off: the largest factor, and the largest condition number of a damped
    Kronecker product ``(‖A‖‖G‖ + λ) / λ`` among the layers (each step's direction is
    that product's inverse applied to the gradient)."""
    est = opt.estimator
    damping = DAMPING
    n, cond = 1, 1.0
    for state in est._state.values():
        norms = []
        for f in (state.a_factor, state.g_factor):
            if f is None:
                continue
            n = max(n, f.shape[-1])
            f = f.double()
            norms.append(
                float(torch.linalg.matrix_norm(f, ord=2).max()) if f.dim() == 3 else float(f.max())
            )
        cond = max(cond, (math.prod(norms) + damping) / damping)
    return {"n": n, "cond": cond}


def _assert_same_trajectory(model_a, model_b, opt) -> None:
    """The two runs moved every parameter by the same displacement (from ``_run``'s seeded
    initial weights), to the tolerance of ``_trajectory_tolerance``."""
    torch.manual_seed(0)
    start = _Net()
    for (name, a), b, p0 in zip(
        model_a.named_parameters(), model_b.parameters(), start.parameters(), strict=True
    ):
        assert_close(a - p0, b - p0, **_trajectory_tolerance(opt), msg=name)


CONFIGS = {
    "eigen": {},
    "factored": {"damping_mode": "factored"},
    "cholesky": {"damping_mode": "factored", "inverse_method": "cholesky"},
    "eigen-diagonal-blocks": {"layer_options": {"norm_blocks": "diagonal"}},
    "cholesky-float64": {
        "damping_mode": "factored",
        "inverse_method": "cholesky",
        "inverse_dtype": torch.float64,
    },
    "eigen-bfloat16": {"factor_dtype": torch.bfloat16},
    "cholesky-float16": {
        "damping_mode": "factored",
        "inverse_method": "cholesky",
        "factor_dtype": torch.float16,
    },
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_batched_refresh_equals_per_layer_refresh(config) -> None:
    _, opt = _run(KFAC, **CONFIGS[config])
    est = opt.estimator
    est.refresh(0.07)
    batched = _inverses(est)
    assert all(batched.values()), "every layer has factors"
    per_layer_refresh(est, 0.07)
    _assert_same_inverses(batched, _inverses(est))


@pytest.mark.parametrize("config", ["eigen", "factored", "cholesky", "eigen-bfloat16"])
def test_training_runs_agree(config) -> None:
    batched, opt = _run(KFAC, steps=5, **CONFIGS[config])
    per_layer, _ = _run(KFAC, steps=5, batched=False, **CONFIGS[config])
    _assert_same_trajectory(batched, per_layer, opt)


def test_ekfac_batched_refresh_equals_per_layer() -> None:
    _, opt = _run(EKFAC)
    est = opt.estimator
    est.refresh(0.07)
    batched = _inverses(est)
    scalings = {name: est.scalings(name).clone() for name in est.eigen_layers}
    use_per_layer_refresh(est)
    est.refresh(0.07)
    _assert_same_inverses(batched, _inverses(est))
    for name, s in scalings.items():
        # (Qᵀ g)² summed over the examples: products of n-vectors in the two eigenbases
        assert_close(
            est.scalings(name),
            s,
            n=max(est._state[name].a_factor.shape[-1], 2),
            cond=EIG_COND,
            msg=name,
        )
    model_b, opt_b = _run(EKFAC, steps=5)
    model_p, _ = _run(EKFAC, steps=5, batched=False)
    _assert_same_trajectory(model_b, model_p, opt_b)


def test_two_level_batched_refresh_equals_per_layer() -> None:
    _, opt = _run(TwoLevelKFAC, coarse_damping=1.0)
    est = opt.estimator
    est.refresh(0.07)
    batched, coarse = _inverses(est), est._coarse_inverse.clone()
    use_per_layer_refresh(est)
    est.refresh(0.07)
    _assert_same_inverses(batched, _inverses(est))
    # the coarse matrix is built from the fine inverses: their error times its condition
    tol = _trajectory_tolerance(opt)
    coarse_cond = float(torch.linalg.cond(coarse.double()))
    assert_close(est._coarse_inverse, coarse, n=tol["n"], cond=tol["cond"] * coarse_cond)
    model_b, _ = _run(TwoLevelKFAC, steps=5, coarse_damping=1.0)
    model_p, _ = _run(TwoLevelKFAC, steps=5, batched=False, coarse_damping=1.0)
    _assert_same_trajectory(model_b, model_p, opt)


def _decomposed_sizes(est) -> tuple[list[int], int]:
    """The distinct sizes of the matrix factors to decompose, and how many factors."""
    factors = [
        f
        for st in est._state.values()
        for f in (st.a_factor, st.g_factor)
        if f is not None and f.dim() == 3
    ]
    return sorted({f.shape[-1] for f in factors}), len(factors)


@pytest.mark.parametrize("config", ["eigen", "cholesky"])
def test_one_solver_call_per_factor_size(config, monkeypatch) -> None:
    _, opt = _run(KFAC, **CONFIGS[config])
    est = opt.estimator
    sizes, count = _decomposed_sizes(est)
    assert len(sizes) < count  # the model has layers that share sizes
    name = "eigh" if config == "eigen" else "cholesky_ex"
    real = getattr(torch.linalg, name)
    calls: list[tuple[int, ...]] = []

    def counting(a, *args, **kwargs):
        calls.append(tuple(a.shape))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, name, counting)
    est.refresh(0.07)
    assert sorted(shape[-1] for shape in calls) == sizes
    # the 8 x 8 group: G of conv1, conv2, fc1, fc2 and the embedding
    assert (5, 8, 8) in calls
    calls.clear()
    use_per_layer_refresh(est)  # what the per-layer runs here use: one call per matrix
    est.refresh(0.07)
    assert len(calls) == count


def _psd_part(factor: torch.Tensor) -> torch.Tensor:
    """The float64 reference of a refreshed factor: its symmetric part with the negative
    eigenvalues (round-off: a bfloat16 factor of a PSD matrix has some) set to zero."""
    f = factor.double()
    d, q = torch.linalg.eigh((f + f.transpose(-1, -2)) * 0.5)
    return (q * d.clamp_min(0)[..., None, :]) @ q.transpose(-1, -2)


def test_half_precision_factors_give_float32_inverses() -> None:
    _, opt = _run(KFAC, **CONFIGS["eigen-bfloat16"], damping_mode="factored")
    est = opt.estimator
    est.refresh(0.07)
    for name, state in est._state.items():
        assert state.a_factor.dtype == torch.bfloat16, name
        for key, value in state.inverse.items():
            assert value is None or value.dtype == torch.float32, (name, key)
        inv = state.inverse
        if state.g_factor is None:
            if "block_q" in inv:
                rec = (inv["block_q"] * inv["block_d"][..., None, :]) @ inv["block_q"].transpose(
                    -1, -2
                )
                ref = _psd_part(state.a_factor)
                scale = ref.abs().amax()
                assert ((rec.double() - ref).abs().amax() / scale) < 1e-5, name
            continue
        for factor, d, q in ((state.a_factor, "d_a", "q_a"), (state.g_factor, "d_g", "q_g")):
            if inv[q] is None:
                continue
            rec = (inv[q].double() * inv[d].double()[..., None, :]) @ inv[q].double().transpose(
                -1, -2
            )
            ref = _psd_part(factor)
            assert ((rec - ref).abs().amax() / ref.abs().amax()) < 1e-5, (name, d)
        # π from the float64 traces of the bfloat16 factors, in float32
        a, g = state.a_factor.double(), state.g_factor.double()
        ta = a.mean(-1) if a.dim() < g.dim() else a.diagonal(dim1=-2, dim2=-1).mean(-1)
        pi = (ta / g.diagonal(dim1=-2, dim2=-1).mean(-1)).sqrt()
        torch.testing.assert_close(inv["pi"].double(), pi, rtol=1e-6, atol=0)


def test_half_precision_matrix_is_symmetrised_in_the_inverse_dtype() -> None:
    """Two bfloat16 triangles an ulp apart: their mean is exact in float32 (in bfloat16 it
    would round by half an ulp, 0.2 %)."""
    m = _psd(4, 6, seed=3).to(torch.bfloat16)
    m.view(torch.int16)[0, 1] += 1  # the next bfloat16 after m[1, 0]
    assert m[0, 1] != m[1, 0] and m[0, 1].float() + m[1, 0].float() != (m[0, 1] + m[1, 0]).float()
    ((d, q),) = symmetric_eigh_many([m], torch.float32)
    torch.testing.assert_close(
        ((q.double() * d.double()[None, :]) @ q.double().T), _psd_part(m), rtol=0, atol=1e-6
    )


# ---- per-member fallbacks -----------------------------------------------------------------
def _psd(n: int, rank: int, seed: int, batch: tuple[int, ...] = ()) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, rank, n, generator=gen, dtype=torch.float64)
    return (x.transpose(-1, -2) @ x / rank).float()


def _poisoned_eigh(monkeypatch, poison: torch.Tensor, how: str) -> list[tuple]:
    """Replace ``torch.linalg.eigh``: in float32, a batch holding ``poison`` raises
    (``how="raise"``; ``"raise-indexed"``: naming the member as torch does) or gives NaN
    for that member (``how="nan"``). Returns the calls' ``(batch size, dtype)``."""
    real = torch.linalg.eigh
    calls: list[tuple] = []

    def flaky(a, *args, **kwargs):
        calls.append((a.shape[0], a.dtype))
        hit = [i for i in range(a.shape[0]) if torch.equal(a[i], poison)]
        if a.dtype != torch.float32 or not hit:
            return real(a, *args, **kwargs)
        if how == "raise":
            raise torch.linalg.LinAlgError("failed to converge (simulated)")
        if how == "raise-indexed":
            raise torch.linalg.LinAlgError(
                f"linalg.eigh: (Batch element {hit[0]}): The algorithm failed to converge"
            )
        d, q = real(a, *args, **kwargs)
        d[hit[0], 0] = float("nan")
        return d, q

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    return calls


@pytest.mark.parametrize("how", ["raise", "raise-indexed", "nan"])
def test_only_the_failing_member_takes_the_fallback(how, monkeypatch) -> None:
    batch = _psd(6, 3, seed=0, batch=(5,))  # rank 3: repeated zero eigenvalues
    want_d, want_q = symmetric_eigh(batch)
    ref_d, ref_q = torch.linalg.eigh(batch[2:3].double())
    calls = _poisoned_eigh(monkeypatch, batch[2], how)
    d, q = symmetric_eigh(batch)
    # the others keep their float32 results (decomposed again in other batches)
    assert d.dtype == q.dtype == torch.float32
    for i in (0, 1, 3, 4):
        assert_same_decomposition(d[i], q[i], want_d[i], want_q[i], msg=i)
    # member 2 alone went to float64 (the same solver call on the same matrix as ref)
    assert torch.equal(d[2], ref_d[0].clamp_min(0).float())
    assert torch.equal(q[2], ref_q[0].float())
    assert [c for c in calls if c[1] == torch.float64] == [(1, torch.float64)]
    if how == "raise":  # the batch, then each member alone to find the failing one
        assert calls[:6] == [(5, torch.float32)] + [(1, torch.float32)] * 5
    elif how == "raise-indexed":  # the batch, then the members after and before member 2
        f32, f64 = torch.float32, torch.float64
        assert calls == [(5, f32), (2, f32), (2, f32), (1, f64)]
    else:
        assert calls[0] == (5, torch.float32) and len(calls) == 2


def test_real_solver_failure_is_set_aside_by_the_member_it_names(monkeypatch) -> None:
    """A NaN member makes LAPACK itself raise "(Batch element 2)": the members around it
    are decomposed as two batches, it alone goes through (and fails) every fallback."""
    batch = _psd(6, 8, seed=0, batch=(6,))
    want_d, want_q = symmetric_eigh(batch[[0, 1, 3, 4, 5]])
    batch[2, 1, 1] = float("nan")
    real = torch.linalg.eigh
    calls: list[tuple] = []

    def counting(a, *args, **kwargs):
        calls.append((a.shape[0], a.dtype))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    with pytest.raises(torch.linalg.LinAlgError, match="1 of the 6 matrices") as info:
        symmetric_eigh(batch)
    assert info.value.failed_members == [2]
    assert calls[:3] == [(6, torch.float32), (3, torch.float32), (2, torch.float32)]
    assert calls[3:] == [(1, torch.float64)] * 4  # float64, then the three shifts
    # the same batch without its NaN member: the others' results, as two batches gave them
    monkeypatch.setattr(torch.linalg, "eigh", real)
    batch[2, 1, 1] = 0.0
    calls.clear()
    d, q = symmetric_eigh(batch)
    for got, i in ((0, 0), (1, 1), (3, 2), (4, 3), (5, 4)):
        assert_same_decomposition(d[got], q[got], want_d[i], want_q[i], msg=got)


def test_a_failing_layer_does_not_move_the_others_to_float64(monkeypatch) -> None:
    _, opt = _run(KFAC)
    est = opt.estimator
    est.refresh(0.07)
    want = _inverses(est)
    g = est._state["fc2"].g_factor
    poison = ((g + g.transpose(-1, -2)) * 0.5)[0]
    ref_d, ref_q = torch.linalg.eigh(poison[None].double())
    calls = _poisoned_eigh(monkeypatch, poison, "raise")
    est.refresh(0.07)
    got = _inverses(est)
    assert [c for c in calls if c[1] == torch.float64] == [(1, torch.float64)]
    assert torch.equal(got["fc2"]["q_g"], ref_q.float())
    assert torch.equal(got["fc2"]["d_g"], ref_d.clamp_min(0).float())
    got["fc2"]["d_g"], got["fc2"]["q_g"] = want["fc2"]["d_g"], want["fc2"]["q_g"]
    _assert_same_inverses(got, want)


def test_a_matrix_that_fails_everything_is_named_and_nothing_is_stored() -> None:
    _, opt = _run(KFAC)
    est = opt.estimator
    before = _inverses(est)
    est._state["fc1"].g_factor = est._state["fc1"].g_factor.clone()
    est._state["fc1"].g_factor[0, 1, 1] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError, match="fc1 \\(G\\)") as info:
        est.refresh(0.07)
    assert "fc2" not in str(info.value) and "failed in every fallback" in str(info.value)
    _assert_same_inverses(_inverses(est), before)


def test_cholesky_jitter_is_per_member() -> None:
    good = _psd(3, 5, seed=1).double()
    indefinite = torch.diag(torch.tensor([1.0, 2.0, -1e-9], dtype=torch.float64))
    hopeless = torch.diag(torch.tensor([1.0, 1.0, -100.0], dtype=torch.float64))
    batch = torch.stack([good, indefinite, good, hopeless])
    inv = damped_inverse_cholesky(batch, 0.0, torch.float64)
    alone = torch.cholesky_inverse(torch.linalg.cholesky(good))
    assert_same_inverse(inv[0], alone)  # no jitter for them
    assert_same_inverse(inv[2], alone)
    for i in (1, 3):
        assert_same_inverse(inv[i], damped_inverse_cholesky(batch[i], 0.0, torch.float64), i)
    # jitter from the member's own mean |diagonal|: 1e-6 * 1 fixes the indefinite one
    torch.testing.assert_close(
        inv[1].diagonal(), torch.tensor([1.0, 0.5, 1e6], dtype=torch.float64), rtol=1e-2, atol=0
    )
    # tenfold up to 1e0 * 34 is not enough for -100; float64 with 10 * 34 is
    torch.testing.assert_close(inv[3][2, 2], torch.tensor(1 / 240.0, dtype=torch.float64))


# ---- many matrices, against one call per matrix --------------------------------------------
@st.composite
def _matrices(draw):
    count = draw(st.integers(1, 6))
    out, dampings = [], []
    for k in range(count):
        n = draw(st.sampled_from([1, 2, 3, 5]))
        batch = draw(st.sampled_from([(), (1,), (3,), (2, 2)]))
        rank = draw(st.integers(1, 6))
        dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
        out.append(_psd(n, rank, seed=draw(st.integers(0, 2**16)) + k, batch=batch).to(dtype))
        if draw(st.booleans()):
            dampings.append(draw(st.floats(1e-4, 10.0)))
        else:  # one damping per matrix of the batch, as factored damping gives
            gen = torch.Generator().manual_seed(k)
            dampings.append(torch.rand(batch, generator=gen, dtype=torch.float64) + 1e-3)
    return out, dampings


@given(_matrices(), st.sampled_from([torch.float32, torch.float64]))
def test_many_equals_one_call_per_matrix(case, dtype) -> None:
    matrices, dampings = case
    for m, (d, q) in zip(matrices, symmetric_eigh_many(matrices, dtype), strict=True):
        want_d, want_q = symmetric_eigh(m, dtype)
        assert_same_decomposition(d, q, want_d, want_q)
        assert d.dtype == dtype and d.shape == m.shape[:-1] and q.shape == m.shape
    inverses = damped_inverse_cholesky_many(matrices, dampings, dtype)
    for m, damping, inv in zip(matrices, dampings, inverses, strict=True):
        assert_same_inverse(inv, damped_inverse_cholesky(m, damping, dtype))
        assert inv.dtype == dtype and inv.shape == m.shape


def test_large_matrices_are_decomposed_one_at_a_time(monkeypatch) -> None:
    """Above ``max_batched_size`` a failing member would cost its batch's work: no
    stacking there (smaller sizes still are)."""
    matrices = [_psd(5, 6, seed=s) for s in range(3)] + [_psd(2, 3, seed=s) for s in range(2)]
    want = symmetric_eigh_many(matrices)
    real = torch.linalg.eigh
    calls: list[tuple[int, ...]] = []
    monkeypatch.setattr(
        torch.linalg, "eigh", lambda a, *x, **k: calls.append(tuple(a.shape)) or real(a, *x, **k)
    )
    got = symmetric_eigh_many(matrices, max_batched_size=4)
    assert sorted(calls) == [(1, 5, 5)] * 3 + [(2, 2, 2)]
    for (d, q), (d_ref, q_ref) in zip(got, want, strict=True):
        assert_same_decomposition(d, q, d_ref, q_ref)
    calls.clear()
    symmetric_eigh_many(matrices)  # the default limit stacks both sizes
    assert sorted(calls) == [(2, 2, 2), (3, 5, 5)]


# ---- distributed: each rank batches the jobs it owns ---------------------------------------
@pytest.fixture
def world_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_share_runs_compute_many_once(world_of_one) -> None:
    comm = Communicator()
    calls = []

    def compute_many(names):
        calls.append(list(names))
        return {n: {"q": torch.full((2, 2), float(len(n))), "none": None} for n in names}

    results = comm.share({"small": 1.0, "big": 8.0}, compute_many=compute_many)
    assert calls == [["small", "big"]]
    assert torch.equal(results["big"]["q"], torch.full((2, 2), 3.0))
    assert results["small"]["none"] is None
    with pytest.raises(TypeError, match="exactly one"):
        comm.share({"a": 1.0}, lambda n: {}, compute_many=compute_many)
    with pytest.raises(KeyError, match="'b'"):
        comm.share({"a": 1.0, "b": 1.0}, compute_many=lambda names: {"a": {}})


def test_distributed_refresh_batches_each_ranks_layers(world_of_one, monkeypatch) -> None:
    per_layer, _ = _run(KFAC, steps=5, batched=False, distributed=True)
    shared, opt = _run(KFAC, steps=5, distributed=True)
    assert opt.comm is not None
    _assert_same_trajectory(shared, per_layer, opt)
    real = torch.linalg.eigh
    calls = []
    monkeypatch.setattr(
        torch.linalg, "eigh", lambda a, *x, **k: calls.append(a.shape) or real(a, *x, **k)
    )
    opt.estimator.refresh(0.07)
    assert len(calls) == len(_decomposed_sizes(opt.estimator)[0])
