"""What a person running the bench sees: progress as it starts, no stray warnings, a vs-sgd
column with numbers, distinct plot lines, and one line when a task's data is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from secondorder.bench import OPTIMIZERS
from secondorder.bench.__main__ import main
from secondorder.bench.plots import STYLES, loss_figure, plot_losses, style_of
from secondorder.bench.report import add_overheads, format_table
from secondorder.bench.tasks import DATA_ENV

FIRST_ORDER = ("sgd", "adam", "adamw")


def _bench_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "secondorder.bench", *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_missing_data_is_one_line_before_anything_runs(tmp_path: Path) -> None:
    empty, out = tmp_path / "data", tmp_path / "out"
    empty.mkdir()
    argv = ["--task", "cifar10-resnet20", "--opt", "sgd,kfac", "--epochs", "1"]
    done = _bench_cli(*argv, "--data", str(empty), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("python -m secondorder.bench: error: cifar10-resnet20 needs")
    assert str(empty / "cifar-10-batches-py") in lines[0]
    assert "data_batch_1" in lines[0] and "test_batch" in lines[0] and "--data" in lines[0]
    assert done.stdout == ""
    assert not out.exists()  # no results, no empty plots
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nor a bench-results/


def test_missing_data_with_a_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_ENV, "unused")  # main's --data sets it; restored after the test
    config = tmp_path / "exp.yaml"
    config.write_text("task: char-gpt\noptimizers: [sgd]\nepochs: 1\n")
    out = tmp_path / "out"
    argv = ["--config", str(config), "--data", str(tmp_path / "nowhere"), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "nowhere" / "input.txt") in err[0]
    assert "does not exist" in err[0]
    assert not out.exists()


@pytest.fixture(scope="module")
def adahessian_cli(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], dict]:
    """adahessian alone (no sgd), one epoch of 3 batches, not quiet, in one process (spawning a
    child per run costs 20 s on a loaded 2-core machine); a fresh interpreter, so torch's
    once-per-process create_graph warning has not been used up by another test."""
    tmp = tmp_path_factory.mktemp("adahessian")
    argv = ["--opt", "adahessian", "--epochs", "1", "--batch-size", "512", "--threads", "1"]
    done = _bench_cli(*argv, "--no-isolate", "--out", str(tmp / "out"), cwd=tmp)
    assert done.returncode == 0, done.stderr
    return done, json.loads((tmp / "out" / "results.json").read_text())


def test_start_line_for_every_run(
    adahessian_cli: tuple[subprocess.CompletedProcess[str], dict],
) -> None:
    done, _ = adahessian_cli
    lines = done.stderr.splitlines()
    starts = [line for line in lines if line.endswith("starting in this process")]
    assert starts == [
        "secondorder.bench: [1/2] sgd: timing-only baseline of the vs sgd column "
        "(at most 200 steps), starting in this process",
        "secondorder.bench: [2/2] adahessian: starting in this process",
    ]
    # stderr is a pipe here, so no bar: a line per epoch instead, after the start line
    epoch = [i for i, line in enumerate(lines) if line.startswith("  adahessian epoch 1/1:")]
    assert len(epoch) == 1 and epoch[0] > lines.index(starts[1])
    assert any(line.startswith("secondorder.bench: [2/2] adahessian: done in") for line in lines)


def test_adahessian_create_graph_warning_does_not_leak(
    adahessian_cli: tuple[subprocess.CompletedProcess[str], dict],
) -> None:
    done, results = adahessian_cli
    assert results["results"]["adahessian"]["summary"]["steps"] == 3  # it did run backward
    assert "create_graph" not in done.stderr
    assert "Warning" not in done.stderr, done.stderr


def test_vs_sgd_has_numbers_without_sgd(
    adahessian_cli: tuple[subprocess.CompletedProcess[str], dict],
) -> None:
    done, results = adahessian_cli
    assert list(results["results"]) == ["adahessian"]  # the baseline is not a row
    baseline = results["config"]["baseline"]
    assert baseline["optimizer"] == "sgd" and baseline["steps"] == 3
    assert baseline["hparams"] == dict(OPTIMIZERS["sgd"].defaults)
    summary = results["results"]["adahessian"]["summary"]
    assert summary["overhead_vs_sgd"] == summary["mean_iter_ms"] / baseline["mean_iter_ms"]
    assert summary["overhead_vs_sgd"] > 0
    header, row = done.stdout.splitlines()[:2]
    cell = row[: header.index("vs sgd") + len("vs sgd")].split()[-1]  # cells are right-aligned
    assert cell == f"{summary['overhead_vs_sgd']:.2f}x"
    legend = " ".join(done.stdout.split())
    assert "timed in a separate timing-only run of 3 steps" in legend


def test_vs_sgd_prefers_the_sgd_row_and_says_when_sgd_was_not_timed() -> None:
    def results(names: list[str], baseline: dict | None) -> dict:
        summary = {"final_train_loss": 1.0, "test_accuracy": 0.5, "mean_step_ms": 1.0}
        summary |= {"peak_mb": 1.0, "state_mb": 0.1}
        runs = {n: {"summary": {**summary, "mean_iter_ms": 2.0 + i}} for i, n in enumerate(names)}
        config = {"task": "t", "metric": "test_accuracy", "epochs": 1, "batch_size": 8}
        config |= {"seed": 0, "device": "cpu", "target": None, "baseline": baseline}
        return {"config": config, "results": runs}

    with_row = results(["sgd", "kfac"], {"mean_iter_ms": 100.0, "steps": 5})
    add_overheads(with_row)
    assert with_row["results"]["kfac"]["summary"]["overhead_vs_sgd"] == 3.0 / 2.0
    untimed = results(["kfac"], None)
    add_overheads(untimed)
    assert untimed["results"]["kfac"]["summary"]["overhead_vs_sgd"] is None
    assert "- where sgd was not timed" in " ".join(format_table(untimed).split())


def _fake_results(names: list[str]) -> dict:
    """Results whose loss curves all coincide (the worst case for telling lines apart)."""
    losses = [2.0 * 0.97**i for i in range(60)]
    runs = {
        name: {
            "summary": {"error": None},
            "steps": {"loss": losses, "iter_ms": [1.0 + i] * len(losses)},
        }
        for i, name in enumerate(names)
    }
    config = {"task": "digits-mlp", "epochs": 1, "batch_size": 64, "seed": 0, "device": "cpu"}
    return {"config": {**config, "target": 0.1}, "results": runs}


def _drawn_styles(results: dict, x: str) -> dict[str, tuple[str, str, str]]:
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    fig = loss_figure(results, x)
    assert fig is not None
    try:
        (ax,) = fig.axes
        return {
            line.get_label(): (to_hex(line.get_color()), line.get_linestyle(), line.get_marker())
            for line in ax.get_lines()
            if line.get_label() != "target"
        }
    finally:
        plt.close(fig)


def test_every_optimizer_has_a_distinct_stable_style() -> None:
    from matplotlib.colors import to_hex

    names = list(OPTIMIZERS)
    assert len(names) == 13 and set(STYLES) == set(names)
    colours = {to_hex(style.color) for style in STYLES.values()}
    assert len(colours) == len(names)  # distinct colours, not only distinct (colour, style)
    for name, style in STYLES.items():
        dashed = style.linestyle in ("--", ":", "-.")
        assert dashed == (name in FIRST_ORDER), name

    everything = _fake_results(names)
    step = _drawn_styles(everything, "step")
    assert list(step) == names
    assert len(set(step.values())) == len(names)
    assert _drawn_styles(everything, "time") == step
    for name, (colour, linestyle, marker) in step.items():
        style = STYLES[name]
        assert (colour, linestyle) == (to_hex(style.color), style.linestyle), name
        assert marker == (style.marker or "None"), name

    # the colour belongs to the optimizer, not to its position: adafisherw alone with sgd is
    # drawn as in the full plot (a 10-colour cycle gave it sgd's colour at position 11)
    pair = _drawn_styles(_fake_results(["adafisherw", "sgd"]), "step")
    assert pair == {name: step[name] for name in ("adafisherw", "sgd")}
    assert pair["adafisherw"][0] != pair["sgd"][0]


def test_unregistered_names_get_distinct_spare_styles() -> None:
    others = ["sgd", "mine", "yours"]
    mine, yours = style_of("mine", others), style_of("yours", others)
    registered = {(s.color, s.linestyle) for s in STYLES.values()}
    assert (mine.color, mine.linestyle) != (yours.color, yours.linestyle)
    assert {(mine.color, mine.linestyle), (yours.color, yours.linestyle)}.isdisjoint(registered)


def test_no_empty_plots(tmp_path: Path) -> None:
    results = _fake_results(["sgd", "kfac"])
    for run in results["results"].values():
        run["summary"]["error"] = "RuntimeError: boom"
    assert plot_losses(results, tmp_path / "out") == {}
    assert not (tmp_path / "out").exists()
    results["results"]["kfac"]["summary"]["error"] = None
    paths = plot_losses(results, tmp_path / "out")
    assert sorted(paths) == ["loss_vs_step", "loss_vs_time"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths.values())
