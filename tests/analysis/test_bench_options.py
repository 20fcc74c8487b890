"""The bench's opt-ins used by the analysis: --init, --curvature-epochs, --record-every."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from secondorder.bench import TASKS, run_bench
from secondorder.bench.__main__ import main as bench_main
from secondorder.bench.runner import (
    epoch_ranges_to_steps,
    load_initial_weights,
    parse_epoch_ranges,
)
from secondorder.prune import Masks, save_checkpoint

from ..helpers import tolerance

STEPS_PER_EPOCH = math.ceil(1437 / 64)


def test_epoch_ranges() -> None:
    assert parse_epoch_ranges("0:2,5:") == ((0, 2), (5, None))
    assert parse_epoch_ranges(":3") == ((0, 3),)
    assert epoch_ranges_to_steps(((1, 3), (5, None)), 10) == ((10, 30), (50, None))
    for bad in ("3", "2:1", "a:b", "-1:2", ""):
        with pytest.raises(ValueError, match="START"):
            parse_epoch_ranges(bad)
    with pytest.raises(ValueError, match=">= 1"):
        epoch_ranges_to_steps(((0, 1),), 0)


def test_load_initial_weights_formats_and_errors(tmp_path) -> None:
    task = TASKS["digits-mlp"]
    source, target = task.build_model(5), task.build_model(0)
    plain = tmp_path / "plain.pt"
    torch.save(source.state_dict(), plain)
    load_initial_weights(target, plain)
    assert torch.equal(
        parameters_to_vector(target.parameters()), parameters_to_vector(source.parameters())
    )

    pruned = tmp_path / "pruned.pt"
    weight = source[0].weight
    save_checkpoint(pruned, source, Masks({"0.weight": weight}, {"0.weight": weight.abs() > 0.05}))
    fresh = task.build_model(0)
    load_initial_weights(fresh, pruned)
    assert torch.equal(fresh[0].weight, source[0].weight)

    with pytest.raises(ValueError, match="does not fit the model: missing keys"):
        load_initial_weights(TASKS["digits-cnn"].build_model(0), plain)
    wrong = task.build_model(0)
    state = wrong.state_dict()
    state["0.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"0.weight \(3, 3\) where the model has \(128, 64\)"):
        load_initial_weights(wrong, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="does not exist"):
        load_initial_weights(wrong, tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a model state_dict"):
        load_initial_weights(wrong, tmp_path / "list.pt")


def test_record_init_and_curvature_epochs(tmp_path) -> None:
    task = TASKS["digits-mlp"]
    ckpt = tmp_path / "init.pt"
    start = task.build_model(7)
    torch.save(start.state_dict(), ckpt)
    out = tmp_path / "run"
    results = run_bench(
        ["sgd", "kfac"],
        epochs=2,
        out=out,
        quiet=True,
        isolate=False,
        plots=False,
        init=ckpt,
        curvature_epochs="1:",
        record_every=10,
        overrides={"sgd": {"lr": 0.02}},  # kfac's base: lr 0.02, momentum 0.9
    )
    runs = results["results"]
    steps = 2 * STEPS_PER_EPOCH
    # recording: before training, every 10 steps, after the last step
    for run in runs.values():
        traj = run["trajectory"]
        assert traj["step"] == [0, *range(10, steps, 10), steps]
        assert traj["weights"].shape == (
            len(traj["step"]),
            sum(p.numel() for p in start.parameters()),
        )
        assert torch.equal(traj["weights"][0], parameters_to_vector(start.parameters()).detach())
    # --init: both start from the checkpoint, not the seeded weights
    with torch.no_grad():
        x, y = task.data().x_train, task.data().y_train
        initial_loss = task.loss_fn(start(x), y).item()
    # the bench's evaluation pass against one float32 forward of the whole training set
    # here: the MLP's 64-, 128- and 64-long products, the 10-class softmax, the mean
    rel = tolerance(torch.float32, n=64 + 128 + 64 + 10 + len(y))
    assert runs["sgd"]["curves"]["train_loss"][0] == pytest.approx(initial_loss, rel=rel)
    # curvature off in epoch 0: kfac's first epoch is sgd's, step for step
    kfac, sgd = runs["kfac"], runs["sgd"]
    assert kfac["summary"]["curvature_steps"] == [[STEPS_PER_EPOCH, None]]
    assert sgd["summary"]["curvature_steps"] is None
    spe = STEPS_PER_EPOCH
    assert kfac["steps"]["loss"][:spe] == sgd["steps"]["loss"][:spe]
    assert kfac["steps"]["loss"][spe + 1 :] != sgd["steps"]["loss"][spe + 1 :]
    assert torch.equal(kfac["trajectory"]["weights"][2], sgd["trajectory"]["weights"][2])
    # the weights go to trajectories.pt, not to the JSON
    saved = torch.load(out / "trajectories.pt", weights_only=True)
    assert torch.equal(saved["kfac"]["weights"], kfac["trajectory"]["weights"])
    written = json.loads((out / "results.json").read_text())
    assert "trajectory" not in written["results"]["kfac"]
    assert written["config"]["curvature_epochs"] == [[1, None]]
    assert written["config"]["init"] == str(ckpt)


def test_bench_cli_rejects_bad_options(tmp_path, capsys) -> None:
    ckpt = tmp_path / "cnn.pt"
    torch.save(TASKS["digits-cnn"].build_model(0).state_dict(), ckpt)
    cases = [
        (["--opt", "kfac", "--init", str(ckpt)], "does not fit the model"),
        (["--opt", "kfac", "--curvature-epochs", "3:1"], "0 <= START < STOP"),
        (["--opt", "sgd", "--curvature-epochs", "1:"], "none of sgd has curvature"),
        (["--opt", "kfac", "--record-every", "0"], "positive integer"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            bench_main([*argv, "--out", str(tmp_path / "x"), "--quiet"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1], err
