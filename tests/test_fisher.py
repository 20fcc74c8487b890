"""Monte-Carlo Fisher: label sampling, the sampled-label loss, and K-FAC statistics from it."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder import KFAC, MFAC
from secondorder.fisher import LIKELIHOODS, sample_targets, sampled_loss

from .helpers import assert_close, digits_data, mlp


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- sampling ---------------------------------------------------------------------------
def test_categorical_sample_frequencies_match_the_softmax():
    draws = 40_000
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0, 1.0], [-0.3, 0.0, 0.3, 3.0, -2.0]])
    outputs = logits.expand(draws, 2, 5)  # (n, positions, C): softmax over the last dim
    labels = sample_targets(outputs, "categorical", _gen())
    assert labels.shape == (draws, 2) and labels.dtype == torch.long
    freq = torch.stack([torch.bincount(labels[:, j], minlength=5) for j in range(2)]) / draws
    # A frequency's standard error is at most sqrt(1/4 / draws) = 0.0025: allow 4 of them.
    bound = 4 * math.sqrt(0.25 / draws)
    assert (freq - torch.softmax(logits, -1)).abs().max() < bound
    # ... a bound tight enough to tell the softmax from a nearby distribution
    assert (freq - torch.softmax(1.1 * logits, -1)).abs().max() > 2 * bound


def test_bernoulli_sample_frequencies_match_the_sigmoid():
    draws = 40_000
    logits = torch.tensor([-2.0, -0.5, 0.0, 0.7, 3.0])
    targets = sample_targets(logits.expand(draws, 5), "bernoulli", _gen(1))
    assert targets.shape == (draws, 5) and targets.dtype == logits.dtype
    assert set(targets.unique().tolist()) <= {0.0, 1.0}
    freq = targets.mean(0)
    bound = 4 * math.sqrt(0.25 / draws)
    assert (freq - torch.sigmoid(logits)).abs().max() < bound
    assert (freq - torch.sigmoid(1.2 * logits)).abs().max() > 2 * bound


@pytest.mark.parametrize("sigma", [1.0, 0.3])
def test_gaussian_samples_have_the_outputs_as_mean_and_sigma_squared_variance(sigma):
    draws = 40_000
    means = torch.tensor([[-1.0, 0.0, 2.5]], dtype=torch.float64)
    samples = sample_targets(means.expand(draws, 3), "gaussian", _gen(2), sigma=sigma)
    assert samples.shape == (draws, 3) and samples.dtype == torch.float64
    # standard errors: sigma / sqrt(draws) for the mean, sigma² sqrt(2 / draws) for the variance
    assert (samples.mean(0) - means[0]).abs().max() < 4 * sigma / math.sqrt(draws)
    assert (samples.var(0) - sigma**2).abs().max() < 4 * sigma**2 * math.sqrt(2 / draws)


def test_sampling_is_reproducible_with_a_generator_and_carries_no_gradient():
    logits = torch.randn(6, 4, requires_grad=True)
    for likelihood in LIKELIHOODS:
        a = sample_targets(logits, likelihood, _gen(5))
        b = sample_targets(logits, likelihood, _gen(5))
        assert torch.equal(a, b) and not a.requires_grad


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_sampled_loss_is_the_per_example_negative_log_likelihood_averaged_over_examples(
    likelihood,
):
    n, positions, dim, sigma = 5, 3, 4, 0.7
    outputs = torch.randn(n, positions, dim, dtype=torch.float64, requires_grad=True)
    loss = sampled_loss(outputs, likelihood, _gen(3), sigma=sigma)
    y = sample_targets(outputs, likelihood, _gen(3), sigma=sigma)  # the same draw
    if likelihood == "categorical":
        per_example = -(torch.log_softmax(outputs, -1).gather(-1, y[..., None])).sum((1, 2))
    elif likelihood == "bernoulli":
        p = torch.sigmoid(outputs)
        per_example = -(y * p.log() + (1 - y) * (1 - p).log()).sum((1, 2))
    else:
        per_example = 0.5 * ((y - outputs) ** 2).sum((1, 2)) / sigma**2
    # float64, two ways to the same sums: over the dim outputs of each position (the
    # softmax's too), the positions, the mean over the n examples
    sums = positions * dim + n
    assert_close(loss, per_example.mean(), dtype=torch.float64, n=sums)
    (grad,) = torch.autograd.grad(loss, outputs)
    (ref,) = torch.autograd.grad(per_example.mean(), outputs)
    assert_close(grad, ref, dtype=torch.float64, n=sums)


def test_bad_likelihood_shape_and_sigma_are_rejected():
    with pytest.raises(ValueError, match="likelihood must be one of"):
        sample_targets(torch.zeros(3, 2), "poisson")
    with pytest.raises(ValueError, match="categorical outputs must have shape"):
        sample_targets(torch.zeros(3), "categorical")
    with pytest.raises(ValueError, match="sigma"):
        sampled_loss(torch.zeros(3, 2), "gaussian", sigma=0.0)
    with pytest.raises(TypeError, match="floating point"):
        sample_targets(torch.zeros(3, 2, dtype=torch.long), "bernoulli")


# ---- the statistics K-FAC gets from sample_fisher -----------------------------------------
def _mc_kfac(model, **kwargs):
    options = dict(
        lr=0.0,
        momentum=0.0,
        curvature_every=1,
        inverse_every=10**6,
        kl_clip=None,
        factor_dtype=torch.float64,
        inverse_dtype=torch.float64,
    )
    return KFAC(model, **{**options, **kwargs}, graft=None)


def _true_loss(likelihood, outputs, targets, sigma=1.0):
    if likelihood == "categorical":
        return F.cross_entropy(outputs, targets)
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(outputs, targets, reduction="sum") / len(outputs)
    return 0.5 * ((outputs - targets) ** 2).sum() / (sigma**2 * len(outputs))


def _exact_output_fisher(likelihood, outputs, sigma=1.0):
    """E_y[G] in closed form, float64, and the variance of one sample of each entry.

    G estimates the per-example Fisher of the likelihood in the layer output,
    averaged over the examples; one example contributes ``X = s sᵀ`` with ``s`` the
    score (``p - e_y``, ``p - y`` or ``(y - mean) / sigma²``). Returns ``(E[X], Var[X])``,
    both averaged over the examples.
    """
    outputs = outputs.detach().double()
    if likelihood == "categorical":
        p = torch.softmax(outputs, -1)
        eye = torch.eye(p.shape[1], dtype=torch.float64)
        scores = p[:, None, :] - eye  # (n, y, C): the score for each label y
        x = scores[:, :, :, None] * scores[:, :, None, :]
        mean = torch.einsum("ny,nyij->nij", p, x)
        var = torch.einsum("ny,nyij->nij", p, x**2) - mean**2
    elif likelihood == "bernoulli":
        p = torch.sigmoid(outputs)
        v = p * (1 - p)  # E[(p - y)²]
        fourth = v * ((1 - p) ** 3 + p**3)  # E[(p - y)⁴]
        mean = torch.diag_embed(v)
        var = v[:, :, None] * v[:, None, :]  # independent coordinates off the diagonal
        var = var - torch.diag_embed(var.diagonal(0, 1, 2)) + torch.diag_embed(fourth - v**2)
    else:
        eye = torch.eye(outputs.shape[1], dtype=torch.float64)
        mean = eye.expand(len(outputs), -1, -1) / sigma**2
        var = (1 + eye).expand(len(outputs), -1, -1) / sigma**4  # Var(ε_i ε_j) / sigma⁴
    return mean.mean(0), var.mean(0)


@pytest.mark.parametrize(
    ("likelihood", "sigma"), [("categorical", None), ("bernoulli", None), ("gaussian", 0.5)]
)
def test_mc_g_factor_averages_to_the_true_fisher_and_the_empirical_one_does_not(likelihood, sigma):
    torch.manual_seed(0)
    distinct, repeats, steps, classes = 8, 500, 10, 4
    model = nn.Sequential(nn.Linear(3, classes)).double()
    with torch.no_grad():
        model[0].weight.mul_(3.0)  # spread the probabilities
    x = torch.randn(distinct, 3, dtype=torch.float64).repeat(repeats, 1)
    if likelihood == "categorical":
        y = torch.zeros(len(x), dtype=torch.long)
    else:
        y = torch.zeros(len(x), classes, dtype=torch.float64)
    s = 1.0 if sigma is None else sigma
    # factor_decay ~ 1: the ramp min(1 - 1/(k+1), decay) makes the factor the plain
    # average of the `steps` statistics; lr = 0 keeps the model (and the true Fisher) fixed.
    # (one model each: two optimizers on one model would both see every backward pass)
    twin = copy.deepcopy(model)
    mc = _mc_kfac(
        model,
        factor_decay=1 - 1e-9,
        fisher_type="mc",
        likelihood=likelihood,
        likelihood_sigma=sigma,
    )
    emp = _mc_kfac(twin, factor_decay=1 - 1e-9)
    gen = _gen(7)
    for _ in range(steps):
        for net, opt in ((model, mc), (twin, emp)):
            opt.zero_grad()
            out = net(x)
            if opt is mc:
                opt.sample_fisher(out, generator=gen)
            _true_loss(likelihood, out, y, s).backward()
            opt.step()
    a_mc, g_mc = mc.estimator.factors("0")
    a_emp, g_emp = emp.estimator.factors("0")
    exact, variance = _exact_output_fisher(likelihood, model(x), s)
    # G is the mean of `steps * n` independent outer products: allow 4 standard errors.
    tol = 4 * (variance / (steps * len(x))).sqrt()
    assert ((g_mc[0] - exact).abs() < tol).all(), (g_mc[0] - exact) / tol
    # ... which is tight enough to reject the empirical Fisher and a 5% error in scale
    assert ((g_emp[0] - exact).abs() > tol).any()
    assert ((1.05 * g_mc[0] - exact).abs() > tol).any()
    # A comes from the forward pass: the same either way (float64 sums of the same rows)
    assert_close(a_mc, a_emp, dtype=torch.float64, n=steps * len(x))


def test_g_statistics_come_from_the_sampled_labels_only():
    """One step: G equals n Σ g gᵀ of the sampled-label loss alone, not of the user's loss."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (7,))
    opt = _mc_kfac(model, fisher_type="mc", likelihood="categorical")
    logits = model(x)
    opt.sample_fisher(logits, generator=_gen(11))
    F.cross_entropy(logits, y).backward()
    opt.step()

    sampled = sample_targets(logits, "categorical", _gen(11))
    hidden = model[1](model[0](x))
    out = model[2](hidden)
    hidden.retain_grad()
    F.cross_entropy(out, sampled).backward()
    n = len(x)
    for name, grad_out in (("0", hidden.grad * (1 - hidden**2)), ("2", None)):
        if grad_out is None:
            grad_out = (torch.softmax(out, -1) - F.one_hot(sampled, 4)) / n
        _, g = opt.estimator.factors(name)
        # float64: sums over the 7 examples of output gradients that the backward pass (6-
        # and 4-wide products) and this formula compute in other orders
        assert_close(g[0], n * grad_out.T @ grad_out, dtype=torch.float64, n=n + 6 + 4)


def test_loss_scale_scales_the_g_statistics_by_its_square():
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)

    def factors(*scales):
        opt = _mc_kfac(model, fisher_type="mc", likelihood="categorical")
        logits = model(x)
        for scale in scales:  # the same labels each time: one seed per call
            opt.sample_fisher(logits, generator=_gen(3), loss_scale=scale)
        opt.step()
        opt.remove_hooks()
        return opt.estimator.factors("0")

    a_one, g_one = factors(1.0)
    a_half, g_half = factors(0.5)
    # float64 sums over the 6 examples; the scales are applied in other places (and
    # (2^-1/2)² is not exactly 1/2): round-off of a few more operations
    n = 6 + 2
    assert_close(a_half, a_one, dtype=torch.float64, n=n)
    assert_close(g_half, 0.25 * g_one, dtype=torch.float64, n=n)
    # two calls on one forward with scale 2^-1/2 average the two (here equal) samples
    a_two, g_two = factors(2**-0.5, 2**-0.5)
    assert_close(a_two, a_one, dtype=torch.float64, n=n)
    assert_close(g_two, g_one, dtype=torch.float64, n=n)


def test_sample_fisher_does_nothing_when_no_curvature_step_is_due():
    model = nn.Sequential(nn.Linear(4, 3))
    opt = KFAC(model, fisher_type="mc", likelihood="categorical", curvature_every=2, graft=None)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    backward_passes = []
    for due in (True, False, True):
        opt.zero_grad()
        logits = model(x)
        logits.register_hook(lambda g: backward_passes.append(1))
        opt.sample_fisher(logits)
        assert all(p.grad is None for p in model.parameters())  # .grad untouched
        assert len(backward_passes) == int(due)
        F.cross_entropy(logits, y).backward()
        opt.step()  # a step that is not due needs no sample_fisher: no error either way
        backward_passes.clear()
    assert opt.estimator.factors("0") is not None


def test_sample_fisher_inside_a_closure():
    model = nn.Sequential(nn.Linear(4, 3))
    opt = KFAC(model, fisher_type="mc", likelihood="categorical", curvature_every=1, graft=None)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))

    def closure():
        opt.zero_grad()
        logits = model(x)
        opt.sample_fisher(logits)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    assert opt.steps == 2


def test_curvature_off_makes_sample_fisher_a_no_op():
    model = nn.Sequential(nn.Linear(4, 3))
    ref = nn.Sequential(nn.Linear(4, 3))
    ref.load_state_dict(model.state_dict())
    opt = KFAC(
        model, lr=0.1, fisher_type="mc", likelihood="categorical", precondition=False, graft=None
    )
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    for _ in range(3):
        for m, o in ((model, opt), (ref, sgd)):
            o.zero_grad()
            logits = m(x)
            if o is opt:
                opt.sample_fisher(logits)
            F.cross_entropy(logits, y).backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)


# ---- training -------------------------------------------------------------------------------
def test_mc_kfac_trains_digits_faster_than_sgd_and_updates_with_the_users_gradient():
    x_train, y_train, _, _ = digits_data(n_train=600)
    lr, epochs = 0.02, 2

    def train(make_opt, mc):
        torch.manual_seed(0)
        model = mlp([64, 64, 10])
        opt = make_opt(model)
        order, labels = _gen(0), _gen(1)
        for _ in range(epochs):
            perm = torch.randperm(len(x_train), generator=order)
            for i in range(0, len(x_train), 64):
                idx = perm[i : i + 64]
                opt.zero_grad()
                logits = model(x_train[idx])
                loss = F.cross_entropy(logits, y_train[idx])
                if mc:
                    params = list(model.parameters())
                    alone = torch.autograd.grad(loss, params, retain_graph=True)
                    opt.sample_fisher(logits, generator=labels)
                    assert all(p.grad is None for p in params)
                    loss.backward()
                    for p, g in zip(params, alone, strict=True):
                        assert torch.equal(p.grad, g)
                else:
                    loss.backward()
                opt.step()
        with torch.no_grad():
            return F.cross_entropy(model(x_train), y_train).item()

    sgd = train(lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), mc=False)
    kfac = train(
        lambda m: KFAC(
            m,
            lr=lr,
            damping=1e-2,
            curvature_every=1,
            inverse_every=10,
            fisher_type="mc",
            likelihood="categorical",
            graft=None,
        ),
        mc=True,
    )
    print(f"digits train loss after {epochs} epochs at lr={lr}: SGD {sgd:.4f}  MC K-FAC {kfac:.4f}")
    assert kfac < 0.5 * sgd


# ---- errors ---------------------------------------------------------------------------------
def test_step_without_sample_fisher_on_a_curvature_step_raises():
    model = nn.Sequential(nn.Linear(4, 3))
    opt = KFAC(model, fisher_type="mc", likelihood="categorical", curvature_every=1, graft=None)
    F.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 3, (5,))).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"opt\.sample_fisher\(outputs\)"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert opt.estimator.factors("0") is None  # no silent empirical fallback


def test_sample_fisher_with_the_empirical_fisher_raises():
    model = nn.Sequential(nn.Linear(4, 3))
    opt = KFAC(model, graft=None)
    with pytest.raises(ValueError, match="fisher_type='mc'"):
        opt.sample_fisher(model(torch.randn(5, 4)))


def test_sample_fisher_after_backward_says_to_call_it_before():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3))
    opt = KFAC(model, fisher_type="mc", likelihood="categorical", graft=None)
    logits = model(torch.randn(5, 4))
    F.cross_entropy(logits, torch.randint(0, 3, (5,))).backward()
    with pytest.raises(RuntimeError, match=r"before loss\.backward"):
        opt.sample_fisher(logits)


def test_sample_fisher_argument_errors():
    model = nn.Sequential(nn.Linear(4, 3))
    opt = KFAC(model, fisher_type="mc", graft=None)
    logits = model(torch.randn(5, 4))
    with pytest.raises(ValueError, match="no likelihood"):
        opt.sample_fisher(logits)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        opt.sample_fisher(logits, likelihood="poisson")
    with pytest.raises(ValueError, match="gradient history"):
        opt.sample_fisher(logits.detach(), likelihood="categorical")
    with pytest.raises(ValueError, match="loss_scale"):
        opt.sample_fisher(logits, likelihood="categorical", loss_scale=0.0)
    opt.sample_fisher(logits, likelihood="bernoulli")  # a per-call likelihood is enough


def test_constructor_validates_fisher_type_and_likelihood():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"fisher_type must be one of \('empirical', 'mc'\)"):
        KFAC(model, fisher_type="true", graft=None)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        KFAC(model, fisher_type="mc", likelihood="softmax", graft=None)
    with pytest.raises(ValueError, match="apply to fisher_type='mc'"):
        KFAC(model, likelihood="categorical", graft=None)
    with pytest.raises(ValueError, match="likelihood_sigma applies to likelihood='gaussian'"):
        KFAC(model, fisher_type="mc", likelihood="categorical", likelihood_sigma=2.0, graft=None)
    with pytest.raises(ValueError, match="likelihood_sigma"):
        KFAC(model, fisher_type="mc", likelihood="gaussian", likelihood_sigma=-1.0, graft=None)


def test_mfac_rejects_the_mc_fisher():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="fisher_type='mc'"):
        MFAC(model, ngrads=4, fisher_type="mc", likelihood="categorical")
    with pytest.raises(ValueError, match="fisher_type='mc'"):
        MFAC(model, ngrads=4, fisher_type="mc", precondition=False)
