"""benchmarks/step_breakdown.py: every requested method gets every stage, and the stages
account for the iteration time."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_breakdown.py"


def _load():
    spec = importlib.util.spec_from_file_location("step_breakdown", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def step_breakdown():
    return _load()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_csv_has_every_stage_and_accounts_for_the_iteration(
    step_breakdown, one_thread, tmp_path: Path, capsys
) -> None:
    methods = ["sgd", "kfac", "mfac", "adahessian"]
    out = tmp_path / "breakdown.csv"
    results = step_breakdown.main(
        [
            "--task",
            "digits-mlp",
            "--opt",
            ",".join(methods),
            "--steps",
            "3",
            "--warmup",
            "2",
            "--threads",
            "1",
            "--csv",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert all(f"\n{m} " in printed for m in methods), printed
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert set(rows[0]) == set(step_breakdown.CSV_FIELDS)
    stages = [*step_breakdown.STAGES, "iteration"]
    assert set(stages) >= {
        "forward",
        "backward",
        "capture",
        "update",
        "refresh",
        "precondition",
        "base",
    }
    by_method: dict[str, dict[str, dict[str, str]]] = {}
    for row in rows:
        assert row["task"] == "digits-mlp"
        assert row["stage"] not in by_method.setdefault(row["method"], {}), row
        by_method[row["method"]][row["stage"]] = row
    assert list(by_method) == methods
    for method, by_stage in by_method.items():
        assert list(by_stage) == stages, method
        ms = {stage: float(row["ms_per_step"]) for stage, row in by_stage.items()}
        assert all(value >= 0 for value in ms.values()), (method, ms)
        assert ms["iteration"] > 0
        accounted = sum(ms[s] for s in step_breakdown.STAGES)
        assert accounted == pytest.approx(ms["iteration"], rel=0.3), (method, ms)
        assert float(by_stage["iteration"]["share"]) == pytest.approx(1.0)
        shares = sum(float(by_stage[s]["share"]) for s in step_breakdown.STAGES)
        assert shares == pytest.approx(accounted / ms["iteration"], abs=1e-3)
        ratios = {row["iteration_vs_sgd"] for row in by_stage.values()}
        assert len(ratios) == 1, (method, ratios)
        assert float(ratios.pop()) == pytest.approx(
            ms["iteration"] / results["sgd"]["iteration"], rel=1e-3
        )
        assert results[method]["iteration"] == pytest.approx(ms["iteration"], rel=1e-3)
    assert float(by_method["sgd"]["iteration"]["iteration_vs_sgd"]) == 1.0
    # each method's own stages were timed; the others read zero
    assert all(float(by_method["sgd"][s]["ms_per_step"]) == 0 for s in ("capture", "update"))
    assert float(by_method["kfac"]["capture"]["ms_per_step"]) > 0
    assert float(by_method["kfac"]["precondition"]["ms_per_step"]) > 0
    assert float(by_method["mfac"]["capture"]["ms_per_step"]) == 0  # no hooks
    assert float(by_method["mfac"]["update"]["ms_per_step"]) > 0
    assert float(by_method["adahessian"]["hutchinson"]["ms_per_step"]) > 0
    assert float(by_method["adahessian"]["precondition"]["ms_per_step"]) == 0


def test_nested_sections_are_exclusive(step_breakdown, monkeypatch) -> None:
    """A timed call inside another (M-FAC's precondition calling refresh, the hooks inside
    backward) is charged to its own stage only."""
    clock = iter([0.0, 1.0, 4.0, 10.0, 20.0, 22.0])
    monkeypatch.setattr(step_breakdown, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    timer = step_breakdown.StageTimer("cpu")
    inner = timer.wrap(lambda: "done", "refresh")
    with timer.section("precondition"):  # 0 .. 10
        assert inner() == "done"  # 1 .. 4
    with timer.section("backward"):  # 20 .. 22
        pass
    assert dict(timer.totals) == {"refresh": 3.0, "precondition": 7.0, "backward": 2.0}


def test_unknown_method_is_refused(step_breakdown) -> None:
    with pytest.raises(SystemExit):
        step_breakdown.main(["--opt", "sgd,lbfgs", "--steps", "1"])
