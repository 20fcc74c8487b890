"""Turn bench results into a printed table, ``results.json``, ``results.csv`` and loss plots.

The results are the dict :func:`secondorder.bench.run_bench` returns::

    {"config": {...}, "results": {optimizer name: {"hparams", "summary", "curves", "steps"}}}
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .plots import plot_losses
from .smoothing import TARGET_WINDOW, trailing_mean

__all__ = [
    "BASELINE",
    "TARGET_WINDOW",
    "add_overheads",
    "add_targets",
    "format_table",
    "machine_info",
    "steps_to_target",
    "trailing_mean",
    "write_results",
]

BASELINE = "sgd"
"""The optimizer whose mean iteration time the ``vs sgd`` overhead is measured against."""

# Summary keys written to results.csv after the train loss and the metric, in column order.
_CSV_KEYS = (
    "mean_step_ms",
    "mean_iter_ms",
    "steps_to_target",
    "epochs_to_target",
    "median_step_ms",
    "median_iter_ms",
    "overhead_vs_sgd",
    "train_time_s",
    "steps",
    "steps_per_epoch",
    "diverged",
    "peak_mb",
    "peak_kind",
    "state_mb",
    "threads",
    "isolated",
    "error",
)


def machine_info() -> dict[str, Any]:
    """Where the bench ran: OS, CPU, Python, torch, threads, and the GPU if there is one."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def add_overheads(results: Mapping[str, Any]) -> None:
    """Set ``summary["overhead_vs_sgd"]`` on every run, in place.

    The overhead is the run's mean iteration time over sgd's in the same bench (so sgd's is
    exactly 1.0): sgd's row, else the timing-only run ``results["config"]["baseline"]`` (see
    :func:`~secondorder.bench.run_bench`'s ``time_baseline``); None where sgd was timed in
    neither or a run has no timings.
    """
    runs = results["results"]
    if BASELINE in runs:
        base = runs[BASELINE].get("summary", {}).get("mean_iter_ms")
    else:
        base = (results["config"].get("baseline") or {}).get("mean_iter_ms")
    for run in runs.values():
        mine = run["summary"].get("mean_iter_ms")
        ok = base is not None and mine is not None and base > 0 and math.isfinite(mine)
        run["summary"]["overhead_vs_sgd"] = mine / base if ok else None


def steps_to_target(
    step_loss: list[float], target: float, window: int = TARGET_WINDOW
) -> int | None:
    """First step (1-based) at which the :func:`trailing_mean` of the mini-batch loss is at
    most ``target``, or None if never.

    The trailing mean keeps one lucky mini-batch from counting as reaching the target; a
    non-finite loss never counts.
    """
    for step, loss in enumerate(trailing_mean(step_loss, window), start=1):
        if loss <= target:  # NaN compares False
            return step
    return None


def add_targets(results: Mapping[str, Any]) -> None:
    """Set ``summary["steps_to_target"]`` and ``summary["epochs_to_target"]`` on every run, in
    place, for the target train loss ``results["config"]["target"]``.

    Steps are counted from :func:`steps_to_target` over the recorded per-step mini-batch loss;
    epochs are those steps over the steps per epoch (fractional). Both are None where the
    target was never reached, where there is no target, or where the run failed.
    """
    target = results["config"].get("target")
    for run in results["results"].values():
        summary = run["summary"]
        losses = run.get("steps", {}).get("loss")
        steps = None if target is None or not losses else steps_to_target(losses, target)
        summary["steps_to_target"] = steps
        per_epoch = summary.get("steps_per_epoch")
        summary["epochs_to_target"] = steps / per_epoch if steps and per_epoch else None


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec) + suffix


def _to_target_cell(summary: Mapping[str, Any]) -> str:
    steps, epochs = summary.get("steps_to_target"), summary.get("epochs_to_target")
    if steps is None:
        return "-"
    return f"{steps} ({epochs:.2f} ep)" if epochs is not None else str(steps)


def format_table(results: Mapping[str, Any]) -> str:
    """The summary as an aligned text table, one row per optimizer, with a legend below."""
    config = results["config"]
    metric = config["metric"]
    columns: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("train loss", lambda s: _fmt(s["final_train_loss"], ".4g")),
        (metric.replace("_", " ").replace("accuracy", "acc"), lambda s: _fmt(s[metric], ".4f")),
        ("step ms", lambda s: _fmt(s["mean_step_ms"], ".3f")),
        ("iter ms", lambda s: _fmt(s["mean_iter_ms"], ".3f")),
        ("vs sgd", lambda s: _fmt(s.get("overhead_vs_sgd"), ".2f", "x")),
        ("to target", _to_target_cell),
        ("peak MB", lambda s: _fmt(s["peak_mb"], ".1f")),
        ("state MB", lambda s: _fmt(s["state_mb"], ".3f")),
    ]
    header = ["optimizer", *(name for name, _ in columns)]
    rows = []
    for name, run in results["results"].items():
        summary = run["summary"]
        if summary.get("error"):
            rows.append([name, f"failed: {summary['error']}"])
            continue
        row = [name, *(cell(summary) for _, cell in columns)]
        if summary.get("diverged"):
            row[0] += " (diverged)"
        rows.append(row)
    full = [r for r in rows if len(r) == len(header)]
    widths = [max(len(r[i]) for r in [header, *full]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        if len(cells) != len(header):  # a failed run: one free-form cell after the name
            return f"{cells[0]:<{widths[0]}}  {cells[1]}"
        padded = [f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)]
        padded[0] = f"{cells[0]:<{widths[0]}}"
        return "  ".join(padded)

    peak = {"rss_growth": "process RSS peak growth", "cuda_max_allocated": "CUDA peak allocated"}
    kinds = sorted({r["summary"].get("peak_kind", "") for r in results["results"].values()} - {""})
    baseline = config.get("baseline")
    vs = f"vs {BASELINE}: iter time over {BASELINE}'s"
    if baseline is not None and BASELINE not in results["results"]:
        vs += (
            f" ({BASELINE} not a row: timed in a separate timing-only run of "
            f"{baseline['steps']} steps, {baseline['mean_iter_ms']:.3f} ms per iteration)"
        )
    elif BASELINE not in results["results"]:
        vs += f", - where {BASELINE} was not timed"
    target = config.get("target")
    reach = (
        f"to target: first step (epoch) at which the mean mini-batch loss of the last "
        f"{TARGET_WINDOW} steps is <= {target:g}, - if never; "
        if target is not None
        else "to target: no target set (--target); "
    )
    legend = (
        f"{config['task']}, {config['epochs']} epochs, batch {config['batch_size']}, "
        f"seed {config['seed']}, {config['device']}. step ms: mean optimizer.step(); "
        f"iter ms: mean zero_grad+forward+backward+step; {vs}; {reach}"
        f"peak MB: {', '.join(peak.get(k, k) for k in kinds) or 'peak'} during the run; "
        "state MB: tensors in optimizer.state_dict()."
    )
    return "\n".join([line(header), *(line(r) for r in rows), "", textwrap.fill(legend, 100)])


def _json_safe(obj: Any) -> Any:
    # NaN / inf are not JSON; write them as null so that any JSON reader accepts the file.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_results(
    results: Mapping[str, Any], out_dir: str | os.PathLike[str], *, plots: bool = True
) -> dict[str, Path]:
    """Write ``results.json`` (everything), ``results.csv`` (one summary row per optimizer)
    and, if ``plots`` and matplotlib is installed, ``loss_vs_step.png`` and
    ``loss_vs_time.png`` (see :func:`~secondorder.bench.plots.plot_losses`). Runs that
    recorded their weights (``"trajectory"``) have them saved to ``trajectories.pt``
    (``torch.save`` of ``{name: {"step": [...], "weights": Tensor}}``) instead of the JSON.

    Creates ``out_dir`` if needed and returns ``{"json": path, "csv": path}`` plus
    ``"trajectories"``, ``"loss_vs_step"`` and ``"loss_vs_time"`` for the files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Recorded weights (RunConfig.record_every) are tensors: trajectories.pt, not the JSON.
    runs = results["results"]
    trajectories = {name: run["trajectory"] for name, run in runs.items() if "trajectory" in run}
    if trajectories:
        results = {
            **results,
            "results": {
                name: {k: v for k, v in run.items() if k != "trajectory"}
                for name, run in runs.items()
            },
        }
    json_path = out / "results.json"
    with open(json_path, "w") as f:
        json.dump(_json_safe(results), f, indent=1, allow_nan=False)
        f.write("\n")

    metric = results["config"]["metric"]
    fields = ["optimizer", "final_train_loss", metric, "best_" + metric, *_CSV_KEYS, "hparams"]
    csv_path = out / "results.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for name, run in results["results"].items():
            row = {"optimizer": name, **_json_safe(run["summary"])}
            row["hparams"] = json.dumps(_json_safe(run.get("hparams", {})), sort_keys=True)
            writer.writerow(row)
    paths = {"json": json_path, "csv": csv_path}
    if trajectories:
        paths["trajectories"] = out / "trajectories.pt"
        torch.save(trajectories, paths["trajectories"])
    if plots:
        paths.update(plot_losses(results, out))
    return paths
