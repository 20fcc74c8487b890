"""benchmarks/lr_sensitivity.py: the smoke run end to end, the aggregation of records into
"good lrs", and the refusal of a constructor keyword an optimizer does not take."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "lr_sensitivity.py"


def _load():
    spec = importlib.util.spec_from_file_location("lr_sensitivity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lr_sensitivity():
    return _load()


def _run(*args: str) -> subprocess.CompletedProcess:
    # The script's folder, not the checkout, is first on the child's sys.path: put the checkout
    # there, so that it runs this tree's secondorder whatever is installed.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_smoke_run_writes_one_record_per_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run("--smoke", "--opt", "adam,kfac", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    tasks, lrs, seeds = config["tasks"], config["lrs"], config["seeds"]
    assert len(tasks) == 2 and len(lrs) == 2 and seeds == [0]
    assert set(config["epochs"].values()) == {1}
    keys = [(r["task"], r["optimizer"], r["lr"], r["seed"]) for r in results["records"]]
    expected = {(t, o, lr, s) for t in tasks for o in ("adam", "kfac") for lr in lrs for s in seeds}
    assert sorted(keys) == sorted(expected)  # exactly one record each
    for r in results["records"]:
        assert r["error"] is None
        assert r["final_train_loss"] is not None and math.isfinite(r["final_train_loss"])
        assert r["wall_time_s"] > 0
        assert set(r["hparams"]) == {"lr"}  # the library defaults: lr only
    table = (out / "table.md").read_text()
    for name in ("adam", "kfac"):
        assert f"| {name} |" in table
    assert (out / "heatmap.png").stat().st_size > 0
    # one progress line per (task, optimizer)
    assert sum(line.startswith("[") for line in proc.stderr.splitlines()) == 4


def test_unknown_set_key_exits_nonzero_naming_it(tmp_path: Path) -> None:
    proc = _run(
        "--smoke",
        "--opt",
        "sgd,kfac",
        "--set",
        "kfac.no_such_key=1",
        "--out",
        str(tmp_path / "out"),
    )
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr and "kfac" in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def _record(task, opt, lr, seed, reached, loss):
    return {
        "task": task,
        "optimizer": opt,
        "lr": lr,
        "seed": seed,
        "reached_target": reached,
        "final_train_loss": loss,
    }


def test_aggregate_lists_exactly_the_lrs_every_seed_reaches(lr_sensitivity) -> None:
    lrs = (0.1, 0.01, 0.001)
    records = []
    for seed in range(3):
        # kfac reaches at 0.1 and 0.01 with every seed, at 0.001 with one seed only
        records.append(_record("t", "kfac", 0.1, seed, True, 0.05))
        records.append(_record("t", "kfac", 0.01, seed, True, 0.02 + 0.01 * seed))
        records.append(_record("t", "kfac", 0.001, seed, seed == 0, 0.5))
        # sgd diverges at 0.1 in one seed and never reaches
        records.append(_record("t", "sgd", 0.1, seed, False, None if seed == 1 else 9.0))
        records.append(_record("t", "sgd", 0.01, seed, False, 1.0))
        records.append(_record("t", "sgd", 0.001, seed, False, 2.0))
    summary = lr_sensitivity.aggregate(records)
    kfac, sgd = summary["t"]["kfac"], summary["t"]["sgd"]
    assert kfac["lrs"] == list(lrs)
    assert kfac["good_lrs"] == [0.1, 0.01]
    assert kfac["reached"] == {0.1: 1.0, 0.01: 1.0, 0.001: pytest.approx(1 / 3)}
    assert kfac["best_lr"] == 0.01 and kfac["best_final_loss"] == pytest.approx(0.03)
    assert sgd["good_lrs"] == []
    assert sgd["mean_final_loss"][0.1] is None  # a diverged seed: no mean
    assert sgd["best_lr"] == 0.01 and sgd["best_final_loss"] == pytest.approx(1.0)

    table = lr_sensitivity.markdown_table(summary, {"t": 0.1}, seeds=3)
    assert "| kfac | 0.1, 0.01 | 3 3 1 | 0.03 (0.01) |" in table
    assert "| sgd | none | 0 0 0 | 1 (0.01) |" in table
    assert "| kfac | 2/3 |" in table and "| sgd | 0/3 |" in table
    assert "at adam's best lr" not in table  # no adam in this run: no such column or note

    # with adam in the run, every row also gives its mean final loss at adam's best lr
    for seed in range(3):
        records.append(_record("t", "adam", 0.1, seed, True, 0.2))
        records.append(_record("t", "adam", 0.01, seed, True, 0.1))
        records.append(_record("t", "adam", 0.001, seed, False, 0.4))
    table = lr_sensitivity.markdown_table(lr_sensitivity.aggregate(records), {"t": 0.1}, 3)
    assert "final train loss at adam's best lr (0.01) |" in table
    assert "| kfac | 0.1, 0.01 | 3 3 1 | 0.03 (0.01) | 0.03 |" in table
    assert "| sgd | none | 0 0 0 | 1 (0.01) | 1 |" in table


def test_library_hparams_are_lr_only_but_for_the_baselines(lr_sensitivity) -> None:
    from secondorder.bench.tasks import TASKS

    task = TASKS["digits-ae"]
    assert lr_sensitivity.library_hparams("kfac", 0.1, task) == {"lr": 0.1}
    assert lr_sensitivity.library_hparams("sgd", 0.1, task) == {"lr": 0.1, "momentum": 0.9}
    mc = lr_sensitivity.library_hparams("kfac", 0.1, task, {"fisher_type": "mc"})
    assert mc["likelihood"] == "bernoulli"


def test_every_default_task_has_a_target(lr_sensitivity) -> None:
    from secondorder.bench.tasks import TASKS

    for name in lr_sensitivity.DEFAULT_TASKS:
        value, _ = lr_sensitivity.task_target(TASKS[name])
        assert value > 0
        TASKS[name].check_data()  # offline: no data folder needed
