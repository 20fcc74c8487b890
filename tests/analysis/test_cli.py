"""``python -m secondorder.analysis``: a tiny run writes its PNGs and summary; bad values fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from secondorder.analysis.__main__ import main

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
    for run in ("initial", "kfac", "adafisher"):
        layers = summary["runs"][run]["layers"]
        assert list(layers) == ["0", "2", "5"]  # conv, conv, linear
        for entry in layers.values():
            for factor in ("A", "G"):
                figures = entry[factor]
                assert figures["gershgorin_contains"]
                low, high = figures["gershgorin"]
                assert low <= figures["eig_min"] <= figures["eig_max"] <= high + 1e-9 * abs(high)
                assert 0 < figures["diagonal_dominance"] < 1
            assert entry["kron_dominance"] == pytest.approx(
                entry["A"]["diagonal_dominance"] * entry["G"]["diagonal_dominance"]
            )
        for check in summary["runs"][run]["diagonal_check"].values():
            assert check["max_rel_diff_A"] < 1e-6 and check["max_rel_diff_G"] < 1e-6
    # layer 0's A is the covariance of the input patches: the same at any weights
    a0 = [summary["runs"][r]["layers"]["0"]["A"]["eig_max"] for r in ("initial", "kfac")]
    assert a0[0] == pytest.approx(a0[1], rel=1e-9)
    assert summary["runs"]["kfac"]["steps"] == 23
    assert summary["runs"]["kfac"]["recorded_steps"] == [0, 4, 8, 12, 16, 20, 23]
    landscape = summary["landscape"]
    assert landscape["directions"] == "pca" and landscape["center"] == "kfac"
    assert len(landscape["alphas"]) == 5 and 0 < sum(landscape["explained"]) <= 1 + 1e-9
    assert landscape["loss_min"] <= landscape["loss_at_center"] <= landscape["loss_max"] * 1.5
    assert landscape["trajectories"]["kfac"]["end"] == pytest.approx([0.0, 0.0], abs=1e-6)


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
