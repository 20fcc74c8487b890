"""MFACPruner (OBS) and MagnitudePruner against float64 closed forms; masks, schedules, files."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secondorder import MFAC
from secondorder.prune import (
    GradualSchedule,
    MagnitudePruner,
    Masks,
    MFACPruner,
    default_prunable,
    geometric_densities,
    load_checkpoint,
    save_checkpoint,
)
from secondorder.prune.__main__ import main

from ..helpers import assert_close


def _problem(seed: int, d_in: int, d_out: int, m: int, batch: int = 3):
    """A float64 two-layer model and ``m`` fixed mini-batches (a list: re-iterated the same)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Linear(d_out, 3)).double()
    batches = [
        (
            torch.randn(batch, d_in, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (batch,), generator=gen),
        )
        for _ in range(m)
    ]
    return model, batches


def _dense_inverse(model, batches, damping: float, block: int | None, keep=None):
    """Dense float64 block-diagonal ``(λI + GᵀG/m)⁻¹`` over the flattened Linear weights."""
    params = list(default_prunable(model).values())
    rows = []
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    g = torch.stack(rows)
    if keep is not None:
        g = g * keep
    m, d = g.shape
    b = d if block is None else block
    f = torch.zeros(d, d, dtype=torch.float64)
    for s in range(0, d, b):
        gb = g[:, s : s + b]
        f[s : s + b, s : s + b] = damping * torch.eye(gb.shape[1], dtype=torch.float64)
        f[s : s + b, s : s + b] += gb.T @ gb / m
    return torch.linalg.inv(f)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in default_prunable(model).values()])


def _assert_obs_close(got, expected, w, finv, m: int, damping: float) -> None:
    """The pruner's weights against the closed form, both float64: the pruner's static
    M-FAC inverse is a Woodbury recursion of ``m`` rank-one updates (its rounding relative
    to ``‖x‖/λ``, so cond = ``‖F‖/λ``, ``‖F‖ = 1/λ_min(F⁻¹)``), the reference an LU of the
    ``d x d`` ``F``: n = m + d; an entry's error is relative to the weights and the OBS
    correction, ``max|w| + max|w − expected|``."""
    cond = 1.0 / (damping * float(torch.linalg.eigvalsh(finv)[0]))
    scale = float(w.abs().max() + (w - expected).abs().max())
    assert_close(got, expected, dtype=torch.float64, n=m + w.numel(), cond=cond, scale=scale)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    m=st.integers(1, 8),
    block=st.one_of(st.none(), st.integers(1, 20)),
    damping=st.floats(1e-3, 10.0),
)
def test_obs_one_weight_equals_closed_form(seed, d_in, d_out, m, block, damping) -> None:
    """Dropping one weight: it is the argmin of w_j² / (2 [F⁻¹]_jj) and the others move by
    −w_j / [F⁻¹]_jj · F⁻¹ e_j (F block-diagonal as the pruner's)."""
    model, batches = _problem(seed, d_in, d_out, m)
    finv = _dense_inverse(model, batches, damping, block)
    w = _flat(model)
    n = w.numel()
    saliency = w.square() / (2 * finv.diagonal())
    j = int(saliency.argmin())
    expected = w - w[j] / finv[j, j] * finv[:, j]
    expected[j] = 0.0

    pruner = MFACPruner(
        model, batches, F.cross_entropy, ngrads=m, damping=damping, block_size=block, progress=False
    )
    masks = pruner.prune(1.0 / n + 1e-9)  # round(sparsity * n) == 1
    assert int((~masks.flat()).sum()) == 1 and not bool(masks.flat()[j])
    _assert_obs_close(_flat(model), expected, w, finv, m, damping)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), m=st.integers(2, 10), frac=st.floats(0.1, 0.8))
def test_obs_several_weights_is_the_sum_of_their_corrections(seed, m, frac) -> None:
    model, batches = _problem(seed, 5, 4, m)
    damping, block = 0.05, 7
    finv = _dense_inverse(model, batches, damping, block)
    w = _flat(model)
    saliency = w.square() / (2 * finv.diagonal())
    k = round(frac * w.numel())
    dropped = torch.topk(saliency, k, largest=False).indices
    z = torch.zeros_like(w)
    z[dropped] = w[dropped] / finv.diagonal()[dropped]
    expected = w - finv @ z
    expected[dropped] = 0.0
    MFACPruner(
        model, batches, F.cross_entropy, ngrads=m, damping=damping, block_size=block, progress=False
    ).prune(frac)
    _assert_obs_close(_flat(model), expected, w, finv, m, damping)


def test_second_step_ignores_pruned_weights() -> None:
    """At a later step the Fisher is taken over the kept weights only: pruned ones stay zero
    and the update equals the closed form with the pruned gradient columns removed."""
    model, batches = _problem(3, 6, 5, 6)
    pruner = MFACPruner(
        model, batches, F.cross_entropy, ngrads=6, damping=0.1, block_size=None, progress=False
    )
    pruner.prune(0.3)
    keep = pruner.masks.flat().double()
    finv = _dense_inverse(model, batches, 0.1, None, keep=keep)
    w = _flat(model)
    saliency = (w.square() / (2 * finv.diagonal())).masked_fill(keep == 0, -math.inf)
    target = round(0.5 * w.numel())
    dropped_all = torch.topk(saliency, target, largest=False).indices
    new = dropped_all[keep[dropped_all] == 1]
    z = torch.zeros_like(w)
    z[new] = w[new] / finv.diagonal()[new]
    expected = (w - finv @ z) * keep
    expected[new] = 0.0
    pruner.prune(0.5)
    _assert_obs_close(_flat(model), expected, w, finv, 6, 0.1)
    assert pruner.masks.sparsity() == pytest.approx(target / w.numel())


def test_magnitude_global_and_layer_scope() -> None:
    model, _ = _problem(0, 8, 6, 1)
    w = _flat(model).abs()
    k = round(0.6 * w.numel())
    expected = torch.ones_like(w, dtype=torch.bool)
    expected[torch.topk(w, k, largest=False).indices] = False
    masks = MagnitudePruner(copy.deepcopy(model)).prune(0.6)
    assert torch.equal(masks.flat(), expected)

    layered = MagnitudePruner(model, scope="layer").prune(0.5)
    for name, frac in layered.layer_sparsity().items():
        n = default_prunable(model)[name].numel()
        assert frac == pytest.approx(round(0.5 * n) / n)
    for name, p in default_prunable(model).items():
        assert torch.all(p[~layered.masks[name]] == 0)


def test_geometric_densities() -> None:
    assert geometric_densities(1.0, 0.1, 1) == [0.1]
    steps = geometric_densities(1.0, 0.125, 3)
    assert steps == pytest.approx([0.5, 0.25, 0.125]) and steps[-1] == 0.125
    with pytest.raises(ValueError, match="steps"):
        geometric_densities(1.0, 0.5, 0)
    with pytest.raises(ValueError, match="end"):
        geometric_densities(0.5, 0.8, 2)


def test_recomputation_steps_reach_the_target() -> None:
    model, batches = _problem(1, 8, 8, 8)
    pruner = MFACPruner(model, batches, F.cross_entropy, ngrads=8, damping=0.01, progress=False)
    masks = pruner.prune(0.75, nrecomps=3)
    n = masks.numel
    assert masks.sparsity() == pytest.approx(round(0.75 * n) / n)
    assert all(torch.all(p[~masks.masks[k]] == 0) for k, p in masks.params.items())
    assert pruner.history[-1]["target"] == 0.75


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "mfac"])
def test_masks_stay_exact_through_training(opt_name: str) -> None:
    model, batches = _problem(2, 6, 6, 4, batch=8)
    model.float()
    batches = [(x.float(), y) for x, y in batches]
    masks = MagnitudePruner(model).prune(0.6)
    before = {k: p.detach().clone() for k, p in masks.params.items()}
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    elif opt_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        opt = MFAC(model, lr=0.1, base="sgd", ngrads=4, damping=0.1, masks=masks.by_parameter())
    masks.attach(opt)
    for _ in range(5):
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for name, p in masks.params.items():
        assert torch.all(p[~masks.masks[name]] == 0), name
        assert not torch.equal(p[masks.masks[name]], before[name][masks.masks[name]]), name


def test_digits_mfac_beats_magnitude() -> None:
    """One-shot to 50/75/90% on a trained digits MLP: OBS with the M-FAC inverse keeps a lower
    train loss and at least the test accuracy of magnitude pruning, by far at 90%."""
    from secondorder.bench import TASKS

    task = TASKS["digits-mlp"]
    data = task.data()
    model = task.build_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    n = len(data.x_train)
    for _ in range(10):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
    batch_gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(n, generator=batch_gen)
    batches = [
        (data.x_train[perm[i : i + 16]], data.y_train[perm[i : i + 16]])
        for i in range(0, 16 * 128, 16)
    ]

    def scores(m: nn.Module) -> tuple[float, float]:
        with torch.no_grad():
            loss = F.cross_entropy(m(data.x_train), data.y_train).item()
            acc = (m(data.x_test).argmax(1) == data.y_test).float().mean().item()
        return loss, acc

    dense_acc = scores(model)[1]
    assert dense_acc > 0.93
    for sparsity in (0.5, 0.75, 0.9):
        mag = copy.deepcopy(model)
        MagnitudePruner(mag).prune(sparsity)
        obs = copy.deepcopy(model)
        MFACPruner(obs, batches, F.cross_entropy, ngrads=128, damping=1e-5, progress=False).prune(
            sparsity, nrecomps=4
        )
        (mag_loss, mag_acc), (obs_loss, obs_acc) = scores(mag), scores(obs)
        assert obs_loss < mag_loss, sparsity
        assert obs_acc >= mag_acc, sparsity
        if sparsity == 0.9:
            assert obs_acc > mag_acc + 0.05 and obs_acc > dense_acc - 0.03


def test_gradual_schedule() -> None:
    s = GradualSchedule((0.5, 0.75, 0.875), 2, (0.005, 0.0005))
    assert [s.sparsity_at(e) for e in range(7)] == [0.5, None, 0.75, None, 0.875, None, None]
    assert [s.lr_at(e) for e in range(7)] == [0.005, 0.0005] * 3 + [None]
    assert s.pruning_epochs == 6
    assert GradualSchedule((0.5,), 1).lr_at(0) is None
    with pytest.raises(ValueError, match="increase"):
        GradualSchedule((0.5, 0.5), 1)
    with pytest.raises(ValueError, match="sparsities\\[1\\]"):
        GradualSchedule((0.5, 1.0), 1)
    with pytest.raises(ValueError, match="lrs"):
        GradualSchedule((0.5,), 2, (0.1,))
    with pytest.raises(ValueError, match="prune_every"):
        GradualSchedule((0.5,), 0)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model, _ = _problem(4, 5, 5, 1)
    masks = MagnitudePruner(model).prune(0.5)
    path = save_checkpoint(tmp_path / "c" / "p.pt", model, masks, epoch=3)
    fresh, _ = _problem(5, 5, 5, 1)
    loaded = load_checkpoint(path, fresh)
    assert all(torch.equal(a, b) for a, b in zip(_flat(fresh), _flat(model), strict=True))
    assert torch.equal(loaded.flat(), masks.flat())
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a pruning checkpoint"):
        load_checkpoint(tmp_path / "bad.pt", fresh)


def test_bad_arguments() -> None:
    model, batches = _problem(0, 3, 3, 2)
    with pytest.raises(ValueError, match="ngrads"):
        MFACPruner(model, batches, F.cross_entropy, ngrads=0)
    with pytest.raises(ValueError, match="damping"):
        MFACPruner(model, batches, F.cross_entropy, damping=0.0)
    with pytest.raises(ValueError, match="block_size"):
        MFACPruner(model, batches, F.cross_entropy, block_size=0)
    with pytest.raises(ValueError, match="scope"):
        MagnitudePruner(model, scope="local")
    with pytest.raises(ValueError, match="not a parameter of the model"):
        MagnitudePruner(model, params={"x": nn.Parameter(torch.ones(2))})
    with pytest.raises(ValueError, match="sparsity"):
        MagnitudePruner(model).prune(1.0)
    with pytest.raises(TypeError, match="sparsity"):
        MagnitudePruner(model).prune("0.5")
    with pytest.raises(ValueError, match="nrecomps"):
        MFACPruner(model, batches, F.cross_entropy).prune(0.5, nrecomps=0)
    with pytest.raises(ValueError, match="missing"):
        Masks(default_prunable(model), {"0.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="yielded nothing"):
        MFACPruner(model, [], F.cross_entropy, progress=False).prune(0.5)


def test_cli_oneshot_and_gradual(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--pretrain-epochs", "3", "--ngrads", "16", "--quiet", "--nrecomps", "2"]
    assert main([*common, "--sparsities", "0.5,0.8", "--out", str(tmp_path / "a")]) == 0
    table = capsys.readouterr().out
    assert "mfac" in table and "magnitude" in table
    rows = json.loads((tmp_path / "a" / "results.json").read_text())["rows"]
    assert [(r["method"], round(r["sparsity"], 2)) for r in rows] == [
        ("dense", 0.0),
        ("mfac", 0.5),
        ("mfac", 0.8),
        ("magnitude", 0.5),
        ("magnitude", 0.8),
    ]
    assert all(0 < r["test_accuracy"] <= 1 for r in rows)

    argv = [
        *common,
        "--checkpoint",
        str(tmp_path / "a" / "dense.pt"),
        "--mode",
        "gradual",
        "--method",
        "mfac",
        "--sparsities",
        "0.5,0.8",
        "--prune-every",
        "1",
        "--epochs",
        "3",
        "--optim",
        "mfac",
        "--out",
        str(tmp_path / "b"),
    ]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "b" / "results.json").read_text())["rows"]
    assert [r.get("stage") for r in rows] == [None, "pruned", "pruned", "final"]
    from secondorder.bench import TASKS

    model = TASKS["digits-mlp"].build_model(0)
    masks = load_checkpoint(tmp_path / "b" / "mfac_gradual.pt", model)
    assert masks.sparsity() == pytest.approx(0.8, abs=1e-3)
    for name, p in masks.params.items():
        assert torch.all(p[~masks.masks[name]] == 0)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--sparsities", "0.5,1.5"], "--sparsities"),
        (["--method", "random"], "--method"),
        (["--ngrads", "0"], "--ngrads"),
        (["--block-size", "x"], "--block-size"),
        (["--prune-lrs", "0.1"], "--prune-lrs"),
    ],
)
def test_cli_rejects_bad_values(argv, needle, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--quiet", "--pretrain-epochs", "1"])
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paged_on_gpu_from_cpu_gradients_equals_cpu() -> None:
    """Gradients in CPU memory, arithmetic on the GPU a page at a time: same inverse."""
    from secondorder.prune import StaticFisherInverse

    g = torch.randn(16, 1000, dtype=torch.float64)
    x = torch.randn(1000, dtype=torch.float64)
    for block in (None, 96):
        cpu = StaticFisherInverse(g, 0.01, block_size=block)
        gpu = StaticFisherInverse(g, 0.01, block_size=block, pages=3, device="cuda")
        assert gpu._u.device.type == "cpu"  # the factor stays where the gradients are
        # float64 on both, other summation orders: n = 16 updates + 1000 coordinates; the
        # Woodbury form's rounding is relative to ‖x‖/λ, cond = ‖F‖/λ (the largest block's
        # λ + σ_max²/16)
        b = block or 1000
        top = max(
            float(torch.linalg.matrix_norm(g[:, i : i + b], ord=2)) ** 2 / 16
            for i in range(0, 1000, b)
        )
        cond = (0.01 + top) / 0.01
        assert_close(gpu.ihvp(x), cpu.ihvp(x), dtype=torch.float64, n=16 + 1000, cond=cond)
        assert_close(gpu.diag(), cpu.diag(), dtype=torch.float64, n=16 + 1000, cond=cond)
