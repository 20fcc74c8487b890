"""Experiment files and optimizer presets for the bench: ``python -m secondorder.bench --config``.

An experiment file (YAML) names a task, the optimizers, the seeds, fixed hyperparameters and a
grid of hyperparameters to sweep::

    task: digits-mlp          # any task name
    epochs: 3                 # optional: the task's default otherwise
    seeds: [0, 1]             # runs per setting; results aggregated over them
    optimizers: [sgd, mfac]
    presets: [configs/optimizers/mfac.yaml]   # optional, applied before `set`
    set:                      # fixed overrides, like --set
      mfac.damping: 0.05
    grid:                     # cartesian product per optimizer; each combination is one row
      mfac.ngrads: [16, 32]

Optional keys besides: ``batch_size`` and ``target`` (the train loss to reach). A grid key
applies to the optimizer named before its dot; an optimizer without grid keys is one row. The
hyperparameters of a row are the registry's defaults, then the presets, then ``set``, then the
row's grid values. An optimizer preset file names one optimizer, where its values come from,
and the hyperparameters::

    optimizer: mfac
    source: "Frantar et al. 2021 (M-FAC), README example"
    hparams: {lr: 1e-3, ngrads: 512, damping: 1e-5}

String values are read as the command line reads ``--set`` values (so PyYAML's string
``1e-3`` is the float 0.001), and lists inside ``hparams`` / ``set`` become tuples (``betas``).
Every problem in a file is a :class:`ConfigError` whose one-line message names the file and the
key.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .optimizers import OPTIMIZERS, parse_value
from .tasks import TASKS

__all__ = [
    "ConfigError",
    "Experiment",
    "Preset",
    "Setting",
    "format_grid_table",
    "load_experiment",
    "load_preset",
    "run_experiment",
    "write_grid",
]

_EXPERIMENT_KEYS = ("task", "epochs", "seeds", "optimizers", "set", "grid", "presets")
_OPTIONAL_KEYS = ("batch_size", "target")
_PRESET_KEYS = ("optimizer", "source", "hparams")


class ConfigError(ValueError):
    """A bad experiment or preset file; the message is one line naming the file and the key."""


@dataclass(frozen=True)
class Preset:
    """One optimizer preset file: the optimizer, where its values come from, and the values."""

    optimizer: str
    source: str
    hparams: Mapping[str, Any]
    path: Path | None = None


@dataclass(frozen=True)
class Setting:
    """One row of an experiment: an optimizer and its full hyperparameters.

    Args:
        optimizer: a key of :data:`~secondorder.bench.optimizers.OPTIMIZERS`.
        grid: this row's grid values (``{}`` for an optimizer without grid keys).
        overrides: everything merged over the registry's defaults (presets, ``set``, grid).
    """

    optimizer: str
    grid: Mapping[str, Any]
    overrides: Mapping[str, Any]

    @property
    def label(self) -> str:
        """``"mfac ngrads=16"``: the optimizer and its grid values."""
        return " ".join([self.optimizer, *(f"{k}={v}" for k, v in self.grid.items())])


@dataclass(frozen=True)
class Experiment:
    """A parsed experiment file (see the module docstring)."""

    task: str
    optimizers: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    epochs: int | None = None
    batch_size: int | None = None
    target: float | None = None
    fixed: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    grid: Mapping[str, Mapping[str, tuple[Any, ...]]] = field(default_factory=dict)
    presets: tuple[Preset, ...] = ()
    path: Path | None = None

    def settings(self) -> list[Setting]:
        """The rows, in optimizer order, each grid's combinations in the order of its values."""
        rows = []
        for name in self.optimizers:
            base: dict[str, Any] = {}
            for preset in self.presets:
                if preset.optimizer == name:
                    base.update(preset.hparams)
            base.update(self.fixed.get(name, {}))
            axes = self.grid.get(name, {})
            for values in itertools.product(*axes.values()):
                point = dict(zip(axes, values, strict=True))
                rows.append(Setting(name, point, {**base, **point}))
        return rows


def _read_yaml(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    import yaml

    file = Path(path)
    try:
        content = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{file}: expected a mapping of keys, got {type(content).__name__}")
    return file, content


def _value(value: Any) -> Any:
    if isinstance(value, str):
        return parse_value(value)
    if isinstance(value, list):
        return tuple(_value(v) for v in value)
    return value


def _check_keys(file: Path, where: str, content: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for key in content:
        if key not in allowed:
            raise ConfigError(f"{file}: unknown key {where}{key!r}; allowed: {', '.join(allowed)}")


def _optimizer(file: Path, key: str, name: Any) -> str:
    if name not in OPTIMIZERS:
        raise ConfigError(
            f"{file}: {key}: unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}"
        )
    return name


def _positive(file: Path, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{file}: {key} must be a positive integer, got {value!r}")
    return value


def load_preset(path: str | os.PathLike[str]) -> Preset:
    """Read an optimizer preset file (keys ``optimizer``, ``source``, ``hparams``).

    Raises:
        ConfigError: unreadable file, unknown or missing key, unknown optimizer, ``hparams``
            not a mapping or naming a hyperparameter the optimizer does not take.
    """
    file, content = _read_yaml(path)
    _check_keys(file, "", content, _PRESET_KEYS)
    for key in _PRESET_KEYS:
        if key not in content:
            raise ConfigError(f"{file}: missing key {key!r}")
    name = _optimizer(file, "optimizer", content["optimizer"])
    hparams = content["hparams"] or {}
    if not isinstance(hparams, dict):
        raise ConfigError(f"{file}: hparams must be a mapping, got {type(hparams).__name__}")
    # the optimizer's config (or torch.optim signature) is the list of what it takes
    _check_keys(file, "hparams.", hparams, OPTIMIZERS[name].hyperparameter_names())
    return Preset(name, str(content["source"]), {k: _value(v) for k, v in hparams.items()}, file)


def _find(file: Path, entry: str) -> Path:
    # A preset path is tried from the working directory, then from the experiment file's folder
    # and each folder above it (so that repo-relative paths work from anywhere in the repo).
    candidate = Path(entry).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    for folder in file.resolve().parents:
        if (folder / candidate).exists():
            return folder / candidate
    raise ConfigError(f"{file}: presets: file {entry!r} not found")


def _dotted(file: Path, section: str, key: Any, names: Sequence[str]) -> tuple[str, str]:
    name, dot, hp = str(key).partition(".")
    if not dot or not hp.isidentifier():
        raise ConfigError(f"{file}: {section}.{key}: expected OPTIMIZER.HYPERPARAMETER")
    _optimizer(file, f"{section}.{key}", name)
    if name not in names:
        raise ConfigError(
            f"{file}: {section}.{key}: optimizer {name!r} is not in optimizers ({', '.join(names)})"
        )
    return name, hp


def load_experiment(path: str | os.PathLike[str]) -> Experiment:
    """Read and check an experiment file (see the module docstring).

    Raises:
        ConfigError: unreadable file, an unknown key, an unknown task or optimizer, a grid
            value that is not a non-empty list, a key of ``set`` / ``grid`` not of the form
            ``OPTIMIZER.HYPERPARAMETER`` or naming an optimizer not run, a preset for an
            optimizer not run, or a bad preset file.
    """
    file, content = _read_yaml(path)
    _check_keys(file, "", content, _EXPERIMENT_KEYS + _OPTIONAL_KEYS)
    for key in ("task", "optimizers"):
        if key not in content:
            raise ConfigError(f"{file}: missing key {key!r}")
    task = content["task"]
    if task not in TASKS:
        raise ConfigError(f"{file}: task: unknown task {task!r}; allowed: {', '.join(TASKS)}")

    names = content["optimizers"]
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    if not isinstance(names, list) or not names:
        raise ConfigError(f"{file}: optimizers must be a non-empty list")
    for name in names:
        _optimizer(file, "optimizers", name)
        if names.count(name) > 1:
            raise ConfigError(f"{file}: optimizers: {name!r} given more than once")

    seeds = content.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ConfigError(f"{file}: seeds must be a non-empty list of integers, got {seeds!r}")

    epochs = content.get("epochs")
    epochs = None if epochs is None else _positive(file, "epochs", epochs)
    batch_size = content.get("batch_size")
    batch_size = None if batch_size is None else _positive(file, "batch_size", batch_size)
    target = _value(content.get("target"))
    if target is not None and (
        isinstance(target, bool)
        or not isinstance(target, (int, float))
        or not math.isfinite(target)
    ):
        raise ConfigError(f"{file}: target must be a number, got {content['target']!r}")

    presets = []
    entries = content.get("presets") or []
    if not isinstance(entries, list):
        raise ConfigError(f"{file}: presets must be a list of preset files")
    for entry in entries:
        preset = load_preset(_find(file, str(entry)))
        if preset.optimizer not in names:
            raise ConfigError(
                f"{file}: presets: {entry} is for optimizer {preset.optimizer!r}, which is not "
                f"in optimizers ({', '.join(names)})"
            )
        presets.append(preset)

    fixed: dict[str, dict[str, Any]] = {}
    section = content.get("set") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{file}: set must be a mapping of OPTIMIZER.HYPERPARAMETER: value")
    for key, value in section.items():
        name, hp = _dotted(file, "set", key, names)
        fixed.setdefault(name, {})[hp] = _value(value)

    grid: dict[str, dict[str, tuple[Any, ...]]] = {}
    section = content.get("grid") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{file}: grid must be a mapping of OPTIMIZER.HYPERPARAMETER: [values]")
    for key, values in section.items():
        name, hp = _dotted(file, "grid", key, names)
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"{file}: grid.{key}: expected a non-empty list of values, got {values!r}"
            )
        grid.setdefault(name, {})[hp] = tuple(_value(v) for v in values)

    return Experiment(
        task=task,
        optimizers=tuple(names),
        seeds=tuple(seeds),
        epochs=epochs,
        batch_size=batch_size,
        target=target,
        fixed=fixed,
        grid=grid,
        presets=tuple(presets),
        path=file,
    )


# Summary fields averaged over seeds, as (key in the summary, name in the grid row).
def _aggregated(metric: str) -> tuple[str, ...]:
    return ("final_train_loss", metric, "mean_step_ms", "mean_iter_ms", "train_time_s")


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std


def run_experiment(
    experiment: Experiment,
    *,
    task: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    target: float | None = None,
    out: str | os.PathLike[str] | None = None,
    **bench_kwargs: Any,
) -> dict[str, Any]:
    """Run every row of ``experiment`` once per seed and aggregate over the seeds.

    Args:
        experiment: from :func:`load_experiment`.
        task, epochs, batch_size, target: override the experiment's (None: keep it).
        out: folder for ``grid.json``, ``grid.csv`` and each run's ``results.json`` under
            ``runs/<row>/seed<seed>/``; nothing is written if None.
        bench_kwargs: passed to :func:`~secondorder.bench.run_bench` (``threads``,
            ``device``, ``quiet``, ``isolate``). The grid has no overhead column, so sgd is
            not timed where it is not a row (``time_baseline=False``).

    Returns:
        ``{"config": {...}, "rows": [...]}``, the content of ``grid.json``: one row per
        (optimizer, grid setting) with ``n_seeds``, ``n_failed``, ``<field>_mean`` and
        ``<field>_std`` (sample standard deviation; None with one seed) of the final train
        loss, the test metric, the step and iteration ms and the training time, and
        ``reached_target`` (how many seeds reached the target) with the mean steps and
        epochs to the target over those seeds.

    Raises:
        ValueError: as :func:`~secondorder.bench.run_bench` does, before anything trains.
        DataNotFoundError: the task's data is not in the data folder (before anything trains).
    """
    from . import run_bench
    from .runner import preflight, resolve_task, task_hparams

    the_task = resolve_task(task or experiment.task)
    the_task.check_data()
    settings = experiment.settings()
    for setting in settings:  # a bad hyperparameter fails now, not after hours of runs
        hparams = task_hparams(the_task, setting.optimizer, setting.overrides)
        try:
            preflight(the_task, {setting.optimizer: hparams})
        except ValueError as exc:
            raise ValueError(f"{setting.label}: {exc}") from None
    epochs = epochs or experiment.epochs
    batch_size = batch_size or experiment.batch_size
    target = experiment.target if target is None else target

    rows = []
    config: dict[str, Any] = {}
    for setting in settings:
        runs = []
        for seed in experiment.seeds:
            run_out = None
            if out is not None:
                run_out = Path(out) / "runs" / setting.label.replace(" ", "_") / f"seed{seed}"
            results = run_bench(
                [setting.optimizer],
                the_task.name,
                epochs=epochs,
                batch_size=batch_size,
                seed=seed,
                overrides={setting.optimizer: dict(setting.overrides)},
                out=run_out,
                target=target,
                plots=False,
                time_baseline=False,
                **bench_kwargs,
            )
            config = results["config"]
            runs.append(results["results"][setting.optimizer])
        rows.append(_aggregate(setting, runs, experiment.seeds, config["metric"]))

    grid = {
        "config": {
            "experiment": str(experiment.path) if experiment.path else None,
            "task": the_task.name,
            "metric": config["metric"],
            "epochs": config["epochs"],
            "batch_size": config["batch_size"],
            "target": config["target"],
            "seeds": list(experiment.seeds),
            "optimizers": list(experiment.optimizers),
            "presets": {
                str(p.path): {"optimizer": p.optimizer, "source": p.source}
                for p in experiment.presets
            },
            "device": config["device"],
            "torch_version": config["torch_version"],
            "machine": config["machine"],
        },
        "rows": rows,
    }
    if out is not None:
        write_grid(grid, out)
    return grid


def _aggregate(
    setting: Setting, runs: list[dict[str, Any]], seeds: Sequence[int], metric: str
) -> dict[str, Any]:
    ok = [run["summary"] for run in runs if not run["summary"].get("error")]
    row: dict[str, Any] = {
        "label": setting.label,
        "optimizer": setting.optimizer,
        "grid": dict(setting.grid),
        "hparams": runs[0]["hparams"],
        "n_seeds": len(seeds),
        "n_failed": len(runs) - len(ok),
        "n_diverged": sum(bool(s.get("diverged")) for s in ok),
    }
    for key in _aggregated(metric):
        row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([s.get(key) for s in ok])
    reached = [s for s in ok if s.get("steps_to_target") is not None]
    row["reached_target"] = len(reached)
    row["steps_to_target_mean"] = _mean_std([s["steps_to_target"] for s in reached])[0]
    row["epochs_to_target_mean"] = _mean_std([s["epochs_to_target"] for s in reached])[0]
    row["errors"] = [s["error"] for s in (run["summary"] for run in runs) if s.get("error")]
    return row


def _pm(mean: float | None, std: float | None, spec: str) -> str:
    if mean is None:
        return "-"
    return format(mean, spec) + ("" if std is None else " ± " + format(std, spec))


def format_grid_table(grid: Mapping[str, Any]) -> str:
    """The aggregated rows as an aligned text table (mean ± std over seeds), legend below."""
    config = grid["config"]
    metric = config["metric"]
    header = [
        "setting",
        "train loss",
        metric.replace("_", " ").replace("accuracy", "acc"),
        "step ms",
        "iter ms",
        "reached",
        "steps to target",
    ]
    lines = []
    for row in grid["rows"]:
        name = row["label"] + (f" ({row['n_failed']} failed)" if row["n_failed"] else "")
        lines.append(
            [
                name,
                _pm(row["final_train_loss_mean"], row["final_train_loss_std"], ".4g"),
                _pm(row[f"{metric}_mean"], row[f"{metric}_std"], ".4f"),
                _pm(row["mean_step_ms_mean"], row["mean_step_ms_std"], ".3f"),
                _pm(row["mean_iter_ms_mean"], row["mean_iter_ms_std"], ".3f"),
                f"{row['reached_target']}/{row['n_seeds']}",
                "-"
                if row["steps_to_target_mean"] is None
                else f"{row['steps_to_target_mean']:.0f} ({row['epochs_to_target_mean']:.2f} ep)",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    target = config.get("target")
    legend = (
        f"{config['task']}, {config['epochs']} epochs, batch {config['batch_size']}, seeds "
        f"{', '.join(map(str, config['seeds']))}, {config['device']}: mean ± sample std over "
        "the seeds; reached: seeds whose train loss reached the target "
        + (f"{target:g}" if target is not None else "(none set)")
        + "; steps to target: mean over those seeds."
    )
    return "\n".join([line(header), *map(line, lines), "", legend])


def write_grid(grid: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``grid.json`` (everything) and ``grid.csv`` (one row per setting, hyperparameters
    and grid values as JSON); returns ``{"json": path, "csv": path}``."""
    from .report import _json_safe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "grid.json"
    with open(json_path, "w") as f:
        json.dump(_json_safe(grid), f, indent=1, allow_nan=False)
        f.write("\n")
    rows = [_json_safe(row) for row in grid["rows"]]
    fields = [k for k in rows[0] if k != "errors"] if rows else []
    csv_path = out / "grid.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
                    for k, v in row.items()
                }
            )
    return {"json": json_path, "csv": csv_path}
