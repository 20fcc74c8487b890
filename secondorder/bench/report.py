"""Turn bench results into a printed table, ``results.json`` and ``results.csv``.

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

__all__ = [
    "BASELINE",
    "add_overheads",
    "format_table",
    "machine_info",
    "write_results",
]

BASELINE = "sgd"
"""The optimizer whose mean iteration time the ``vs sgd`` overhead is measured against."""

# Summary keys written to results.csv after the train loss and the metric, in column order.
_CSV_KEYS = (
    "mean_step_ms",
    "mean_iter_ms",
    "median_step_ms",
    "median_iter_ms",
    "overhead_vs_sgd",
    "train_time_s",
    "steps",
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
    exactly 1.0), or None where sgd was not run or a run has no timings.
    """
    runs = results["results"]
    base = runs.get(BASELINE, {}).get("summary", {}).get("mean_iter_ms")
    for run in runs.values():
        mine = run["summary"].get("mean_iter_ms")
        ok = base is not None and mine is not None and base > 0 and math.isfinite(mine)
        run["summary"]["overhead_vs_sgd"] = mine / base if ok else None


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec) + suffix


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
    legend = (
        f"{config['task']}, {config['epochs']} epochs, batch {config['batch_size']}, "
        f"seed {config['seed']}, {config['device']}. step ms: mean optimizer.step(); "
        f"iter ms: mean zero_grad+forward+backward+step; vs sgd: iter time over sgd's; "
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


def write_results(results: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``results.json`` (everything) and ``results.csv`` (one summary row per optimizer).

    Creates ``out_dir`` if needed and returns ``{"json": path, "csv": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    return {"json": json_path, "csv": csv_path}
