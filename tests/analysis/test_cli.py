"""``python -m secondorder.analysis``: a tiny run writes its PNGs and summary; bad values fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from secondorder.analysis.__main__ import main
from secondorder.bench import TASKS

from ..helpers import tolerance

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("analysis")
    code = main(
        [
            "--task", "digits-cnn",
            "--opt", "kfac,adafisher",
            "--epochs", "1",
            "--record-every", "4",
            "--factor-batches", "2",
            "--grid", "5",
            "--landscape-examples", "256",
            "--out", str(out),
            "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    return out


def test_pngs_are_written_and_not_empty(tiny_run: Path) -> None:
    names = [
        f"{opt}_{kind}.png"
        for opt in ("kfac", "adafisher")
        for kind in ("heatmaps", "spectra", "gershgorin", "frequency")
    ] + ["dominance.png", "landscape.png"]
    for name in names:
        data = (tiny_run / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, name
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert sorted(summary["files"].values()) == sorted(names)


def test_summary_json(tiny_run: Path) -> None:
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["config"]["task"] == "digits-cnn"
    assert summary["config"]["factor_examples"] == 128
    assert list(summary["runs"]) == ["initial", "kfac", "adafisher"]
    # float64 factors summed over 128 examples x 64 positions (the first conv's rows)
    rows = 128 * 64
    for run in ("initial", "kfac", "adafisher"):
        layers = summary["runs"][run]["layers"]
        assert list(layers) == ["0", "2", "5"]  # conv, conv, linear
        for entry in layers.values():
            for factor in ("A", "G"):
                figures = entry[factor]
                assert figures["gershgorin_contains"]
                low, high = figures["gershgorin"]
                # computed eigenvalues are within dim·eps of ‖M‖ <= max(|low|, |high|)
                slack = tolerance(torch.float64, n=figures["dim"]) * max(abs(low), abs(high))
                assert low - slack <= figures["eig_min"] <= figures["eig_max"] <= high + slack
                assert 0 < figures["diagonal_dominance"] < 1
            # the same two numbers multiplied (JSON floats round-trip exactly)
            assert entry["kron_dominance"] == (
                entry["A"]["diagonal_dominance"] * entry["G"]["diagonal_dominance"]
            )
        # AdaFisher's diagonals against the K-FAC factors': two float64 sums of squares
        tol = tolerance(torch.float64, n=rows)
        for check in summary["runs"][run]["diagonal_check"].values():
            assert check["max_rel_diff_A"] <= tol and check["max_rel_diff_G"] <= tol
    # layer 0's A is the covariance of the input patches: the same at any weights
    a0 = [summary["runs"][r]["layers"]["0"]["A"]["eig_max"] for r in ("initial", "kfac")]
    assert a0[0] == pytest.approx(a0[1], rel=tolerance(torch.float64, n=rows))
    assert summary["runs"]["kfac"]["steps"] == 23
    assert summary["runs"]["kfac"]["recorded_steps"] == [0, 4, 8, 12, 16, 20, 23]
    landscape = summary["landscape"]
    assert landscape["directions"] == "pca" and landscape["center"] == "kfac"
    # the explained shares: squared singular values over the float64 sum of all of them,
    # itself a sum over every parameter's offsets
    n = sum(p.numel() for p in TASKS["digits-cnn"].build_model(0).parameters())
    tol = tolerance(torch.float64, n=n)
    assert len(landscape["alphas"]) == 5 and 0 < sum(landscape["explained"]) <= 1 + tol
    # the grid spans every trajectory (their starts at the initial weights included) but need
    # not pass through the centre (its range is padded unevenly): the trained centre lies
    # below the grid's worst point, not necessarily above its best
    assert landscape["loss_min"] <= landscape["loss_max"]
    assert landscape["loss_at_center"] < landscape["loss_max"]
    # the centre is kfac's last record: its offset is 0, its coordinates 0 (up to the
    # round-off of the projection, relative to the coordinates of the start)
    kfac = landscape["trajectories"]["kfac"]
    size = max(abs(v) for v in kfac["start"])
    assert kfac["end"] == pytest.approx([0.0, 0.0], abs=tol * size)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--opt", "kfac,nope"], "unknown optimizer 'nope'"),
        (["--task", "nope"], "unknown task 'nope'"),
        (["--grid", "0"], "positive integer"),
        (["--span", "-1"], "finite number > 0"),
        (["--directions", "sideways"], "invalid choice"),
        (["--opt", "kfac", "--center", "sgd"], "center 'sgd' is not among"),
        (["--opt", "kfac", "--set", "sgd.lr=1"], "overrides given for sgd"),
        (["--opt", "kfac", "--set", "kfac.bogus=1"], "kfac: TypeError"),
    ],
)
def test_bad_values_give_one_line_errors(argv, message, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path), "--quiet"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last and last.startswith("python -m secondorder.analysis: error:"), last


def test_help_explains_the_options() -> None:
    text = subprocess.run(
        [sys.executable, "-m", "secondorder.analysis", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in ("--directions", "--factor-batches", "--center", "--span", "--init", "--max-dim"):
        assert flag in text
    assert "diagonal dominance" in text


def test_random_directions_without_pictures(tmp_path) -> None:
    argv = ["--task", "digits-mlp", "--opt", "sgd,kfac", "--epochs", "1", "--grid", "3"]
    argv += ["--directions", "random", "--span", "0.5", "--factor-batches", "1", "--no-pictures"]
    assert main([*argv, "--center", "kfac", "--out", str(tmp_path), "--quiet"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["files"] == {} and not list(tmp_path.glob("*.png"))
    landscape = summary["landscape"]
    assert landscape["directions"] == "random" and landscape["explained"] is None
    assert landscape["alphas"] == [-0.5, 0.0, 0.5] and landscape["center"] == "kfac"
    assert landscape["loss_min"] <= landscape["loss_at_center"] <= landscape["loss_max"]
    assert list(summary["runs"]["kfac"]["layers"]) == ["0", "2", "4"]
