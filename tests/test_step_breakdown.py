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
    methods = ["sgd", "adam", "kfac", "mfac", "adahessian"]
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
        for base in ("sgd", "adam"):
            ratios = {row[f"iteration_vs_{base}"] for row in by_stage.values()}
            assert len(ratios) == 1, (method, base, ratios)
            assert float(ratios.pop()) == pytest.approx(
                ms["iteration"] / results[base]["iteration"], rel=1e-3
            )
        assert results[method]["iteration"] == pytest.approx(ms["iteration"], rel=1e-3)
    assert float(by_method["sgd"]["iteration"]["iteration_vs_sgd"]) == 1.0
    assert float(by_method["adam"]["iteration"]["iteration_vs_adam"]) == 1.0
    header = next(line for line in printed.splitlines() if line.startswith("method"))
    assert header.split()[-4:] == ["vs", "sgd", "vs", "adam"]
    # the bench's K-FAC refreshes every 10 steps: none among measured steps 2..4, so one
    # was timed after the run and amortised over 10
    kfac = by_method["kfac"]["refresh"]
    assert kfac["refresh_timing"] == "separate"
    assert kfac["refresh_amortised_over"] == "10"
    assert float(kfac["ms_per_step"]) == pytest.approx(
        float(kfac["refresh_ms_each"]) / 10, rel=1e-3
    )
    assert "kfac: one refresh" in printed and "inverse_every=10" in printed
    for method in ("sgd", "adam", "mfac", "adahessian"):  # no inverse_every
        assert by_method[method]["refresh"]["refresh_amortised_over"] == "", method
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


def test_steady_state_weights_curvature_steps_and_amortises_the_refresh(step_breakdown) -> None:
    """Curvature steps count 1/k, the others 1 - 1/k, and the window's refreshes are
    replaced by one refresh / inverse_every, whatever the window."""

    def rec(iteration: float, update: float = 0.0, refresh: float = 0.0) -> dict[str, float]:
        stages = dict.fromkeys(step_breakdown.STAGES, 0.0)
        stages.update(forward=1.0, update=update, refresh=refresh)
        return {**stages, "iteration": iteration}

    # steps 7..13 with curvature_every 5: steps 10 is a curvature step (update 4 s), and it
    # also ran a 30 s refresh; the others take 2 s
    records = [rec(2.0) for _ in range(7)]
    records[3] = rec(2.0 + 4.0 + 30.0, update=4.0, refresh=30.0)
    means, notes = step_breakdown.steady_state(
        records, first_step=7, curvature_every=5, refresh_each=30.0, inverse_every=100
    )
    assert notes == []
    assert means["iteration"] == pytest.approx((6.0 / 5 + 2.0 * 4 / 5 + 30.0 / 100) * 1e3)
    assert means["update"] == pytest.approx(4.0 / 5 * 1e3)
    assert means["refresh"] == pytest.approx(0.3 * 1e3)
    assert means["forward"] == pytest.approx(1e3)
    # a plain mean of the same window would have been (6*2 + 36) / 7 s
    assert means["iteration"] != pytest.approx((6 * 2 + 36) / 7 * 1e3, rel=0.05)

    # a window that is a whole number of periods gives the plain mean
    window = [rec(2.0 if j % 5 else 6.0, update=0.0 if j % 5 else 4.0) for j in range(10)]
    means, _ = step_breakdown.steady_state(window, first_step=0, curvature_every=5)
    assert means["iteration"] == pytest.approx(sum(r["iteration"] for r in window) / 10 * 1e3)

    # a window without a curvature step says so
    _, notes = step_breakdown.steady_state(window[1:5], first_step=1, curvature_every=5)
    assert len(notes) == 1 and "no curvature step" in notes[0]


def test_refresh_inside_the_window_is_used_and_set_overrides(
    step_breakdown, one_thread, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "b.csv"
    results = step_breakdown.main(
        [
            "--opt",
            "sgd,kfac,ekfac",
            "--steps",
            "8",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--curvature-every",
            "2",
            "--inverse-every",
            "50",
            "--set",
            "kfac.inverse_every=4",  # wins over --inverse-every for kfac only
            "--csv",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    with out.open(newline="") as fh:
        rows = {(r["method"], r["stage"]): r for r in csv.DictReader(fh)}
    kfac = rows[("kfac", "refresh")]
    assert kfac["refresh_timing"] == "in-loop"  # steps 4 and 8 refreshed
    assert kfac["refresh_amortised_over"] == "4"
    assert results["kfac"]["refresh"] == pytest.approx(results["kfac"]["refresh_ms_each"] / 4)
    ekfac = rows[("ekfac", "refresh")]
    assert ekfac["refresh_timing"] == "separate" and ekfac["refresh_amortised_over"] == "50"
    assert "mean of the refreshes in the measured window" in printed
    assert "timed separately" in printed


def test_bad_override_is_refused(step_breakdown, capsys) -> None:
    for bad, message in (("kfac.lr", "malformed override"), ("lbfgs.lr=1", "allowed: sgd")):
        with pytest.raises(SystemExit) as exc:
            step_breakdown.main(["--opt", "sgd", "--steps", "1", "--set", bad])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err, bad


def test_resnet18_is_the_cifar_variant(step_breakdown) -> None:
    pytest.importorskip("timm")
    model, x, classes = step_breakdown.make_task("resnet18", 2, "cpu")
    assert x.shape == (2, 3, 32, 32) and classes == 10
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    stem = model.conv1
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    old, _, _ = step_breakdown.make_task("resnet18-imagenet-stem", 2, "cpu")
    assert old.conv1.kernel_size == (7, 7)


def test_rounds_keep_each_methods_fastest_round(step_breakdown, monkeypatch, capsys) -> None:
    """--rounds R runs the methods R times in turn and keeps each one's fastest round."""
    times = {"sgd": iter([5.0, 3.0]), "adam": iter([4.0, 6.0])}
    calls: list[str] = []

    def fake_measure(name, model, pool, **kwargs):
        calls.append(name)
        means = dict.fromkeys(step_breakdown.STAGES, 0.0)
        means.update(iteration=next(times[name]), refresh_ms_each=0.0)
        means.update(refresh_amortised_over=0.0, refresh_timing=0.0)
        return means

    monkeypatch.setattr(step_breakdown, "measure", fake_measure)
    results = step_breakdown.main(["--opt", "sgd,adam", "--steps", "1", "--rounds", "2"])
    assert calls == ["sgd", "adam", "sgd", "adam"]  # in turn, not one method twice
    assert results["sgd"]["iteration"] == 3.0 and results["adam"]["iteration"] == 4.0
    printed = capsys.readouterr().out
    assert "fastest of 2 rounds" in printed and "load average" in printed
    assert "adam (round 2): 6.000 ms" in printed


def test_a_variant_is_a_second_copy_of_a_method_with_its_own_overrides(
    step_breakdown, one_thread, monkeypatch, capsys
) -> None:
    built: dict[str, dict] = {}
    real_build = step_breakdown.build

    def spying_build(name, model, curvature_every, inverse_every, overrides=None):
        opt, graph = real_build(name, model, curvature_every, inverse_every, overrides)
        built[opt.config.graft or "none"] = {"name": name, "graft": opt.config.graft}
        return opt, graph

    monkeypatch.setattr(step_breakdown, "build", spying_build)
    monkeypatch.setattr(step_breakdown, "CPU_CLOCK", [False])  # main sets it
    results = step_breakdown.main(
        ["--opt", "kfac,kfac-adam", "--variant", "kfac-adam=kfac", "--set",
         "kfac-adam.graft=adam", "--set", "kfac-adam.kl_clip=none", "--steps", "2",
         "--warmup", "1", "--threads", "1",
         "--clock", "cpu"]
    )  # fmt: skip
    assert set(results) == {"kfac", "kfac-adam"}
    assert built == {
        "none": {"name": "kfac", "graft": None},
        "adam": {"name": "kfac", "graft": "adam"},
    }
    printed = capsys.readouterr().out
    assert "kfac-adam" in printed and "CPU time" in printed
    assert step_breakdown.CPU_CLOCK[0]
    for bad in ("kfac=sgd", "x=lbfgs", "nolabel"):
        with pytest.raises(SystemExit):
            step_breakdown.main(["--opt", "sgd", "--steps", "1", "--variant", bad])


def test_resnet20_task(step_breakdown) -> None:
    model, x, classes = step_breakdown.make_task("resnet20", 2, "cpu")
    assert x.shape == (2, 3, 32, 32) and classes == 10
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.28e6
