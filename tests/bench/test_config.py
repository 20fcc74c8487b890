"""Experiment files and optimizer presets (``python -m secondorder.bench --config``)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from secondorder.bench import TASKS
from secondorder.bench.config import ConfigError, load_experiment, load_preset, run_experiment
from secondorder.bench.optimizers import OPTIMIZERS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted((CONFIGS / "optimizers").glob("*.yaml"))


def test_every_optimizer_has_a_preset() -> None:
    assert sorted(p.stem for p in PRESETS) == sorted(OPTIMIZERS)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_builds_its_optimizer(path: Path) -> None:
    preset = load_preset(path)
    assert preset.optimizer == path.stem and preset.source.strip()
    spec = OPTIMIZERS[preset.optimizer]
    spec.build(TASKS["digits-mlp"].build_model(0), **spec.hparams(preset.hparams))


@pytest.mark.parametrize("name", ["mfac_window_grid.yaml", "digits_all.yaml"])
def test_experiment_files_load(name: str) -> None:
    experiment = load_experiment(CONFIGS / name)
    assert experiment.task == "digits-mlp" and experiment.settings()


def test_preset_then_set_then_grid(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    path.write_text(
        f"task: digits-mlp\noptimizers: [mfac]\npresets: [{CONFIGS / 'optimizers/mfac.yaml'}]\n"
        "set: {mfac.damping: 0.05}\ngrid: {mfac.ngrads: [16, 32]}\n"
    )
    rows = load_experiment(path).settings()
    assert [dict(r.overrides) for r in rows] == [
        {
            "lr": 1e-3,
            "base": "sgd",
            "graft": None,
            "momentum": 0.0,
            "ngrads": n,
            "damping": 0.05,
            "weight_decay": 3e-3,
        }
        for n in (16, 32)
    ]


def test_mfac_window_grid(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(
        "task: digits-mlp\nepochs: 3\nseeds: [0, 1]\noptimizers: [sgd, mfac]\n"
        "set:\n  mfac.damping: 0.05\ngrid:\n  mfac.ngrads: [8, 16]\n"
    )
    out = tmp_path / "out"
    grid = run_experiment(load_experiment(path), epochs=1, out=out, isolate=False, quiet=True)
    rows = grid["rows"]
    assert [r["label"] for r in rows] == ["sgd", "mfac ngrads=8", "mfac ngrads=16"]
    assert grid["config"]["epochs"] == 1
    for row in rows:
        assert row["n_seeds"] == 2 and row["n_failed"] == 0
        for key in ("final_train_loss", "test_accuracy", "mean_step_ms"):
            assert math.isfinite(row[f"{key}_mean"]) and math.isfinite(row[f"{key}_std"]), key
            assert row[f"{key}_std"] >= 0
        assert 0 <= row["reached_target"] <= 2
    assert rows[1]["hparams"]["damping"] == 0.05 and rows[2]["hparams"]["ngrads"] == 16
    assert json.loads((out / "grid.json").read_text())["rows"][0]["label"] == "sgd"
    with open(out / "grid.csv", newline="") as f:
        assert [r["label"] for r in csv.DictReader(f)] == [r["label"] for r in rows]
    assert (out / "runs" / "mfac_ngrads=8" / "seed1" / "results.json").is_file()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("task: digits-mlp\noptimizers: [sgd]\nepoch: 3\n", "unknown key 'epoch'"),
        ("task: digits-mlp\noptimizers: [sgd, nosuch]\n", "optimizers: unknown optimizer"),
        ("task: nosuch\noptimizers: [sgd]\n", "task: unknown task"),
        ("task: digits-mlp\noptimizers: [mfac]\ngrid: {mfac.ngrads: 16}\n", "grid.mfac.ngrads"),
        ("task: digits-mlp\noptimizers: [sgd]\ngrid: {mfac.ngrads: [16]}\n", "grid.mfac.ngrads"),
        ("task: digits-mlp\noptimizers: [sgd]\nset: {lr: 1}\n", "set.lr"),
        ("task: digits-mlp\noptimizers: [sgd]\nseeds: [a]\n", "seeds"),
        (
            f"task: digits-mlp\noptimizers: [sgd]\npresets: [{CONFIGS}/optimizers/mfac.yaml]\n",
            "presets",
        ),
    ],
)
def test_bad_experiment(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle) as info:
        load_experiment(path)
    assert "\n" not in str(info.value)


def test_bad_preset(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("optimizer: sgd\nsource: x\nhparams: {lr: 1}\nextra: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'extra'"):
        load_preset(path)
