"""Dense float64 references, tolerances and tiny models shared by the tests.

Nothing here imports the library's internals: these are independent oracles. The one
exception is the per-layer K-FAC refresh (``per_layer_refresh``), which runs the library's
own solvers (``secondorder.linalg``) one matrix at a time: the reference that the batched
refresh is compared with.

The tolerance rule (``tolerance`` / ``assert_close``): a result computed in a dtype with
machine epsilon ``eps`` is compared with a float64 reference, or with another code path in
the same dtype, at ``rtol = safety · eps · n · cond`` and ``atol = rtol · scale``, where

- ``n`` is the number of rounded operations that accumulate into one entry (the inner
  dimension of a product, the size of a factorised matrix, the number of steps of a
  recurrence): the worst-case bound of a length-``n`` sum is ``n·eps`` (Higham's ``γ_n``);
  the order in which a CPU's kernels add (vector width, blocking, threads) moves the result
  anywhere inside it;
- ``cond`` is the condition number of the problem (a solve or an inverse multiplies the
  relative error of its input by it; 1 for products and sums);
- ``scale`` is the size of the reference as a whole (its largest entry by default): the
  error of an entry of a product is bounded by ``eps·n·|A||B|``, not by the entry itself,
  so entries near zero are judged against the whole result.

Bit-equality (``torch.equal``) is kept only where the same code path runs twice on the
same inputs: a resumed run against an uninterrupted one, curvature switched off against
``torch.optim``, the same function called twice. Two different solver calls (a batched and
a one-by-one eigendecomposition, a Triton kernel and its reference, one rank and one
process) never agree bit for bit on every CPU.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secondorder.linalg import damped_inverse_cholesky, factored_damping, symmetric_eigh

#: keywords of a K-FAC-family optimizer whose every ``step()`` is one exact step of the
#: papers' update on that batch: no momentum, statistics and inverses every step, no KL
#: clip and no graft (the library's default grafts Adam); tests add ``lr`` and ``damping``
EXACT_STEP: dict[str, Any] = {
    "momentum": 0.0,
    "curvature_every": 1,
    "inverse_every": 1,
    "kl_clip": None,
    "graft": None,
}

#: the papers' K-FAC-family update at the settings the digits training tests use (SGD
#: momentum, KL clip, statistics every step and inverses every 10, no graft)
DIGITS_PAPERS: dict[str, Any] = {
    "momentum": 0.9,
    "damping": 1e-2,
    "curvature_every": 1,
    "inverse_every": 10,
    "kl_clip": 1e-2,
    "graft": None,
    "inverse_warmup": False,
}


def tolerance(dtype: torch.dtype, *, n: int = 1, cond: float = 1.0, safety: float = 8.0) -> float:
    """Relative tolerance ``safety · eps(dtype) · n · cond`` (the module docstring gives the
    model). ``dtype`` is the lowest precision the compared computation used."""
    if n < 1 or cond < 1.0:
        raise ValueError(f"tolerance needs n >= 1 and cond >= 1, got n={n}, cond={cond}")
    return safety * torch.finfo(dtype).eps * n * cond


def assert_close(
    actual: Tensor,
    expected: Tensor,
    *,
    dtype: torch.dtype | None = None,
    n: int = 1,
    cond: float = 1.0,
    safety: float = 8.0,
    scale: float | None = None,
    msg: str | None = None,
) -> None:
    """``torch.testing.assert_close`` at the tolerance of ``tolerance(dtype, n, cond)``:
    ``rtol`` from it, ``atol = rtol · scale`` (``scale`` defaults to ``max |expected|``).

    ``dtype`` defaults to the lower precision of the two tensors; pass the dtype the
    computation ran in when both were cast (a float32 path compared in float64). The
    values are compared in float64, so dtypes may differ.
    """
    if dtype is None:
        dtype = min(actual.dtype, expected.dtype, key=lambda d: torch.finfo(d).bits)
    rtol = tolerance(dtype, n=n, cond=cond, safety=safety)
    want = expected.detach().double()
    if scale is None:
        scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(
        actual.detach().double(), want, rtol=rtol, atol=rtol * scale, msg=msg
    )


def with_ones(rows: Tensor) -> Tensor:
    """Append the homogeneous column of ones."""
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)


def dense_conv_patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Receptive-field patches of ``conv`` by explicit loops (no F.unfold).

    Returns ``(groups, B*Ho*Wo, C/groups*kh*kw)``, rows ordered (example, y, x) and
    columns (channel, ky, kx) as in the weight.
    """
    pad = conv._reversed_padding_repeated_twice
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, pad, mode=mode) if any(pad) else x
    b, c, h, w = xp.shape
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    ho = (h - dh * (kh - 1) - 1) // sh + 1
    wo = (w - dw * (kw - 1) - 1) // sw + 1
    cg = c // conv.groups
    out = torch.empty(conv.groups, b * ho * wo, cg * kh * kw, dtype=x.dtype)
    for n in range(b):
        for i in range(ho):
            for j in range(wo):
                row = (n * ho + i) * wo + j
                patch = xp[
                    n,
                    :,
                    i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                    j * sw : j * sw + dw * (kw - 1) + 1 : dw,
                ]
                for grp in range(conv.groups):
                    out[grp, row] = patch[grp * cg : (grp + 1) * cg].reshape(-1)
    return out


def grad_rows(grad_output: Tensor, groups: int = 1) -> Tensor:
    """Output-gradient rows ``(groups, rows, out/groups)`` for Linear or Conv2d outputs."""
    if grad_output.dim() == 4:
        c = grad_output.shape[1]
        g = grad_output.permute(0, 2, 3, 1).reshape(-1, c)
    else:
        g = grad_output.reshape(-1, grad_output.shape[-1])
    return g.reshape(g.shape[0], groups, -1).transpose(0, 1)


def kfac_factors(a_rows: Tensor, g_rows: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """The K-FAC definitions: A = mean ã ãᵀ, G = batch · Σ g gᵀ (per group), float64."""
    a = a_rows.double()
    g = g_rows.double()
    return a.transpose(1, 2) @ a / a.shape[1], batch * (g.transpose(1, 2) @ g)


def kron_precondition(a: Tensor, g: Tensor, grad: Tensor, damping: float) -> Tensor:
    """``(A ⊗ G + λ I)⁻¹ vec(∇)`` with an explicit Kronecker product (column-major vec)."""
    big = torch.kron(a.double(), g.double())
    big = big + damping * torch.eye(big.shape[0], dtype=torch.float64)
    vec = grad.double().T.reshape(-1)  # column-major vec of (g_dim, a_dim)
    sol = torch.linalg.solve(big, vec)
    return sol.reshape(grad.shape[1], grad.shape[0]).T


def damped_kron_cond(a: Tensor, g: Tensor, damping: float, mode: str = "eigen") -> float:
    """The condition number of the damped matrix a K-FAC reference solves, worst group of
    the ``(groups, n, n)`` factors: ``A ⊗ G + λI`` ("eigen") or
    ``(A + π√λ I) ⊗ (G + √λ/π I)`` ("factored"), in float64."""
    conds = []
    for a_i, g_i in zip(a.double(), g.double(), strict=True):
        eye_a, eye_g = (torch.eye(f.shape[0], dtype=torch.float64) for f in (a_i, g_i))
        if mode == "eigen":
            big = torch.kron(a_i, g_i) + damping * torch.kron(eye_a, eye_g)
        else:
            pi = ((torch.trace(a_i) / a_i.shape[0]) / (torch.trace(g_i) / g_i.shape[0])).sqrt()
            root = damping**0.5
            big = torch.kron(a_i + pi * root * eye_a, g_i + root / pi * eye_g)
        conds.append(float(torch.linalg.cond(big)))
    return max(conds)


def kron_factored_precondition(a: Tensor, g: Tensor, grad: Tensor, damping: float) -> Tensor:
    """``((A + π√λ I) ⊗ (G + √λ/π I))⁻¹ vec(∇)``, π from the traces, explicit Kronecker."""
    a, g = a.double(), g.double()
    pi = ((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0])).sqrt()
    root = damping**0.5
    a_d = a + pi * root * torch.eye(a.shape[0], dtype=torch.float64)
    g_d = g + root / pi * torch.eye(g.shape[0], dtype=torch.float64)
    big = torch.kron(a_d, g_d)
    vec = grad.double().T.reshape(-1)
    return torch.linalg.solve(big, vec).reshape(grad.shape[1], grad.shape[0]).T


def update_matrix(delta: Sequence[Tensor], layer: nn.Module) -> Tensor:
    """A layer's parameter change (weight, then bias if any) in :func:`layer_grad_matrix`'s
    layout: ``(groups, out / groups, in [+ 1])``."""
    groups = getattr(layer, "groups", 1)
    w = delta[0].reshape(groups, delta[0].shape[0] // groups, -1)
    return w if len(delta) == 1 else torch.cat([w, delta[1].reshape(groups, -1, 1)], 2)


def layer_grad_matrix(layer: nn.Module, groups: int = 1) -> Tensor:
    """``[∇W | ∇b]`` of a Linear/Conv2d layer as ``(groups, out/groups, cols)``."""
    w = layer.weight.grad.reshape(groups, layer.weight.shape[0] // groups, -1)
    if layer.bias is None:
        return w
    return torch.cat([w, layer.bias.grad.reshape(groups, -1, 1)], dim=2)


def per_layer_inverse(config: Any, a: Tensor, g: Tensor | None, damping: float) -> dict:
    """The inverse a K-FAC refresh stores for one layer with factors ``a`` and ``g``, from
    one solver call per matrix (the same keys, in the same order, as the batched refresh).
    ``g`` None: a blocks layer whose Fisher blocks are ``a`` (``(C, k)`` in diagonal mode); a
    diagonal ``A`` (``a`` one dimension short of ``g``) has the identity as eigenbasis,
    ``q_a`` None. ``config`` is the estimator's ``KFACConfig``."""
    dtype = config.inverse_dtype
    eigen = config.inverse_method == "eigen"
    if g is None:
        if a.dim() == 2:
            return {"block_diag": a.to(dtype).clamp_min(0)}
        if eigen:
            d, q = symmetric_eigh(a, dtype)
            return {"block_d": d, "block_q": q}
        return {"block_inv": damped_inverse_cholesky(a, damping, dtype)}
    diagonal_a = a.dim() < g.dim()
    if eigen:
        d_a, q_a = (a.clamp_min(0).to(dtype), None) if diagonal_a else symmetric_eigh(a, dtype)
        d_g, q_g = symmetric_eigh(g, dtype)
        inverse = {"d_a": d_a, "q_a": q_a, "d_g": d_g, "q_g": q_g}
        if config.damping_mode == "factored":
            inverse["pi"] = factored_damping(a, g, 1.0)[0].to(dtype)  # λ applied per step
        return inverse
    a_damp, g_damp = factored_damping(a, g, damping)
    if diagonal_a:
        inverse = {"a_inv_diag": 1.0 / (a.to(dtype).clamp_min(0) + a_damp.to(dtype)[:, None])}
    else:
        inverse = {"a_inv": damped_inverse_cholesky(a, a_damp, dtype)}
    inverse["g_inv"] = damped_inverse_cholesky(g, g_damp, dtype)
    return inverse


def _fill_per_layer(estimator: Any, items: Sequence[tuple]) -> None:
    """What ``KFACEstimator._compute_inverses`` does for ``(name, state, a, g, damping)``
    items, one layer at a time with :func:`per_layer_inverse`."""
    for _, state, a, g, damping in items:
        state.inverse = per_layer_inverse(estimator.config, a, g, damping)
        state.source = (a, g)
        state.refresh_damping = float(damping)


def per_layer_refresh(estimator: Any, damping: float) -> None:
    """Fill the inverse of every layer of a K-FAC estimator (or a subclass's) that has
    factors, one layer at a time: K-FAC's part of ``estimator.refresh(damping)`` without
    the batching (an E-KFAC's scalings and a two-level coarse inverse are left alone)."""
    ready = [(n, st) for n, st in estimator._state.items() if st.a_factor is not None]
    _fill_per_layer(estimator, [(n, st, st.a_factor, st.g_factor, damping) for n, st in ready])


def use_per_layer_refresh(estimator: Any) -> None:
    """From now on, every refresh of ``estimator`` (``refresh``, distributed or not, and
    ``load_state_dict``) computes the K-FAC inverses one layer at a time, as
    :func:`per_layer_refresh` does; the rest of the refresh (E-KFAC's scalings, the coarse
    inverse) is the estimator's own."""
    estimator._compute_inverses = partial(_fill_per_layer, estimator)


def mlp(sizes: list[int], act: type[nn.Module] = nn.Tanh, bias: bool = True) -> nn.Sequential:
    """A small MLP with ``act`` between Linear layers."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def small_cnn(channels: int = 4, classes: int = 10) -> nn.Sequential:
    """A tiny CNN for 1x8x8 inputs (digits-sized)."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 2 * 16, classes),
    )


def digits_data(n_train: int = 1200) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits, scaled to [0, 1], a fixed shuffled split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def digits_closure_steps(make_opt, steps: int, seed: int = 0):
    """Train ``mlp([64, 64, 10])`` on digits with ``make_opt(model)`` through
    ``opt.step(closure)`` (full batches of 64, seeded init and batch order) for ``steps``
    steps. Yields ``(model, step)``: ``(model, 0)`` once built, then after every step."""
    x_train, y_train, _, _ = digits_data()
    torch.manual_seed(seed)
    model = mlp([64, 64, 10])
    opt = make_opt(model)
    gen = torch.Generator().manual_seed(seed)
    yield model, 0
    done = 0
    while done < steps:
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(x_train) - 63, 64):
            idx = perm[i : i + 64]

            def closure(idx=idx):
                opt.zero_grad()
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                loss.backward()
                return loss

            opt.step(closure)
            done += 1
            yield model, done
            if done == steps:
                return


def exact_kfac(model: nn.Module, **kwargs: Any) -> Any:
    """``KFAC`` whose every step is one exact float64 step of the papers' update
    (:data:`EXACT_STEP`, lr 1, factors without memory); ``kwargs`` override."""
    from secondorder import KFAC

    settings = {
        "lr": 1.0,
        "factor_dtype": torch.float64,
        "inverse_dtype": torch.float64,
        "factor_decay": 0.0,
        **EXACT_STEP,
    }
    return KFAC(model, **{**settings, **kwargs})


def train_steps(model: nn.Module, opt: Any, batches: Sequence[tuple[Tensor, Tensor]]) -> None:
    """One cross-entropy step of ``opt`` per ``(x, y)`` batch."""
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def assert_resume_is_exact(
    make_opt, model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], split: int
) -> dict[str, Any]:
    """Train a copy of ``model`` with ``make_opt(model)`` over every batch, and another over
    ``batches[:split]``, save its state, load it into a fresh optimizer on a copy of that
    model and train on ``batches[split:]``: the two runs end on the same parameters bit for
    bit (the same code path). Returns the saved state, for checks of its contents."""
    whole = copy.deepcopy(model)
    train_steps(whole, make_opt(whole), batches)
    first = copy.deepcopy(model)
    opt = make_opt(first)
    train_steps(first, opt, batches[:split])
    saved = copy.deepcopy(opt.state_dict())
    second = copy.deepcopy(first)
    resumed = make_opt(second)
    resumed.load_state_dict(saved)
    train_steps(second, resumed, batches[split:])
    for p, q in zip(whole.parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q)
    return saved


def train_digits(make_opt, epochs: int = 4, seed: int = 0) -> float:
    """Train ``mlp([64, 64, 10])`` on digits (batch 64, seeded init and batch order) with
    ``make_opt(model)``; returns the final full train loss."""
    x_train, y_train, _, _ = digits_data()
    torch.manual_seed(seed)
    model = mlp([64, 64, 10])
    opt = make_opt(model)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(x_train), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
    with torch.no_grad():
        return F.cross_entropy(model(x_train), y_train).item()
