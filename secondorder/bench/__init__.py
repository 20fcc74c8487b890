"""The optimizer benchmark: ``python -m secondorder.bench``.

Every requested optimizer trains the same model, from the same initial weights, on the same
mini-batches in the same order; the bench records the loss and the test metric per epoch, the
time of every iteration and of every ``optimizer.step()``, the peak memory of the run and the size
of the optimizer's state, and the step (and epoch) at which the train loss first reached the
task's target, then prints a table and writes ``results.json``, ``results.csv`` and two loss
plots (``loss_vs_step.png``, ``loss_vs_time.png``). :mod:`secondorder.bench.config` runs
experiment files: seeds, hyperparameter grids and optimizer presets.

Extending it:

- a task: add a :class:`~secondorder.bench.tasks.Task` to :data:`~secondorder.bench.tasks.TASKS`;
- an optimizer: add an :class:`~secondorder.bench.optimizers.OptimizerSpec` to
  :data:`~secondorder.bench.optimizers.OPTIMIZERS`.

Both registries feed the CLI's choices, its ``--help`` and the error messages.

Example::

    from secondorder.bench import run_bench

    results = run_bench(["sgd", "adam", "kfac"], "digits-mlp", epochs=5, out="bench-results/try")
    results["results"]["kfac"]["summary"]["test_accuracy"]
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import torch

from ..optimizer import check_use_curvature
from .optimizers import OPTIMIZERS, OptimizerSpec
from .report import (
    BASELINE,
    add_overheads,
    add_targets,
    format_table,
    machine_info,
    write_results,
)
from .runner import (
    RunConfig,
    load_initial_weights,
    parse_epoch_ranges,
    preflight,
    resolve_optimizers,
    resolve_task,
    task_hparams,
    train,
    train_isolated,
)
from .tasks import DEFAULT_TASK, TASKS, Task

__all__ = [
    "DEFAULT_TASK",
    "OPTIMIZERS",
    "TASKS",
    "OptimizerSpec",
    "Task",
    "format_table",
    "run_bench",
]

BASELINE_STEPS = 200
"""Steps of the timing-only run of the ``vs sgd`` baseline where sgd is not among the
optimizers run (fewer where the whole run has fewer)."""


def _say(quiet: bool, text: str) -> None:
    # Progress lines go to stderr (stdout holds the table), flushed: a spawned run is silent
    # for the seconds its interpreter takes to import torch.
    if not quiet:
        print(f"secondorder.bench: {text}", file=sys.stderr, flush=True)


def _positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _epoch_ranges(
    value: str | Sequence[tuple[int, int | None]],
) -> tuple[tuple[int, int | None], ...]:
    if isinstance(value, str):
        return parse_epoch_ranges(value)
    try:
        ranges = check_use_curvature(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc).replace("use_curvature", "curvature_epochs")) from None
    if not isinstance(ranges, tuple):
        raise ValueError("curvature_epochs must be epoch ranges, not a callable")
    return ranges


def run_bench(
    opts: str | Sequence[str],
    task: str = DEFAULT_TASK,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    out: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    device: str = "cpu",
    quiet: bool = False,
    isolate: bool = True,
    target: float | None = None,
    plots: bool = True,
    init: str | os.PathLike[str] | None = None,
    curvature_epochs: str | Sequence[tuple[int, int | None]] | None = None,
    record_every: int | None = None,
    time_baseline: bool = True,
) -> dict[str, Any]:
    """Train ``task``'s model with each optimizer in ``opts`` and return the measurements.

    Args:
        opts: optimizer names, as a sequence or a comma-separated string (e.g. ``"sgd,adam"``).
        task: a key of :data:`TASKS` (default ``"digits-mlp"``).
        epochs: passes over the training set (default: the task's, 20 for the digits tasks).
        batch_size: mini-batch size (default: the task's, 64 for the digits tasks).
        seed: seeds the initial weights, the batch order and torch's global RNG in each run.
        overrides: ``{optimizer name: {hyperparameter: value}}`` merged over the defaults;
            keys the optimizer does not take reach its constructor, which rejects them.
        out: folder for ``results.json``, ``results.csv`` and the loss plots; nothing is
            written if None.
        threads: ``torch.set_num_threads`` for the runs (default: torch's own choice).
        device: ``"cpu"`` or ``"cuda"`` (or ``"cuda:N"``).
        quiet: no progress output (a line on stderr as each run starts and ends, and each
            run's bar or per-epoch lines).
        isolate: run each optimizer in its own ``spawn`` subprocess, so that its peak memory is
            its own; False runs them in this process (faster to start, peak RSS less reliable).
        target: the train loss whose first step and epoch are reported as
            ``summary["steps_to_target"]`` / ``["epochs_to_target"]`` (default: the task's
            ``target``; None where the task has none).
        plots: write ``loss_vs_step.png`` and ``loss_vs_time.png`` into ``out`` (needs
            matplotlib; skipped with a warning without it).
        init: start every run from the weights of this checkpoint (a ``torch.save``'d
            ``state_dict`` of the task's model, or a :func:`secondorder.prune.save_checkpoint`
            file) instead of the seeded initial weights.
        curvature_epochs: epoch ranges in which the optimizers with curvature use it, as
            ``"0:2,5:"`` or ``[(0, 2), (5, None)]`` (0-based, stop exclusive, None / empty for
            an open end); outside them they take their base update (see
            ``CurvatureOptimizer.use_curvature``). Optimizers without curvature ignore it.
        record_every: record every run's flattened weights every this many steps (and before
            the first and after the last step) as ``results[name]["trajectory"]``, saved to
            ``trajectories.pt`` in ``out`` (not to ``results.json``); None: not recorded.
        time_baseline: where sgd is not in ``opts``, time it anyway in a short timing-only
            run (:data:`BASELINE_STEPS` steps at most, nothing evaluated, not a row of the
            results) so that every run's ``overhead_vs_sgd`` has a value; False: None there.

    Returns:
        ``{"config": {...}, "results": {name: {"hparams", "summary", "curves", "steps"}}}``,
        the structure of ``results.json``. ``config`` holds the task, epochs, seed, batch size,
        device, every optimizer's hyperparameters, torch's version, the machine and the
        ``baseline`` the overheads were measured against (``{"optimizer": "sgd", "steps",
        "mean_iter_ms", "median_iter_ms", "hparams"}`` for a timing-only run, None where sgd
        is a row or was not timed). A run that raised has only ``hparams`` and
        ``summary["error"]`` (its traceback goes to stderr) and the others still run.

    Raises:
        DataNotFoundError: the task reads files that are not in the data folder (checked
            first; the message names the folder layout expected and ``--data``).
        ValueError: an unknown task or optimizer, a non-positive epochs / batch size / threads /
            record_every, a checkpoint that does not fit the task's model, bad epoch ranges
            or epoch ranges with no optimizer that has curvature,
            a target that is not a finite number, an override for an optimizer not in ``opts``,
            an unusable device, or an optimizer
            that cannot be built with its hyperparameters (checked before anything trains).
    """
    names = resolve_optimizers(opts)
    the_task: Task = resolve_task(task)
    the_task.check_data()
    for arg, value in (
        ("epochs", epochs),
        ("batch_size", batch_size),
        ("threads", threads),
        ("record_every", record_every),
    ):
        _positive(arg, value)
    if init is not None:
        init = os.fspath(init)
        load_initial_weights(the_task.build_model(seed), init)  # fails here, not mid-run
    if curvature_epochs is not None:
        curvature_epochs = _epoch_ranges(curvature_epochs)
    if target is None:
        target = the_task.target
    elif (
        isinstance(target, bool)
        or not isinstance(target, (int, float))
        or not math.isfinite(target)
    ):
        raise ValueError(f"target must be a finite number, got {target!r}")
    overrides = dict(overrides or {})
    stray = [name for name in overrides if name not in names]
    if stray:
        raise ValueError(
            f"overrides given for {', '.join(stray)}, which is not among the optimizers run "
            f"({', '.join(names)})"
        )
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"bad device {device!r}: {exc}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch.cuda.is_available() is False")

    config = RunConfig(
        task=the_task.name,
        epochs=epochs or the_task.epochs,
        batch_size=batch_size or the_task.batch_size,
        seed=seed,
        device=str(dev),
        threads=threads,
        quiet=quiet,
        init=init,
        curvature_epochs=curvature_epochs,
        record_every=record_every,
    )
    hparams = {name: task_hparams(the_task, name, overrides.get(name)) for name in names}
    preflight(the_task, hparams)
    if curvature_epochs is not None and not any(
        getattr(OPTIMIZERS[name].build(the_task.build_model(0), **hparams[name]), "estimator", None)
        is not None
        for name in names
    ):
        raise ValueError(
            f"curvature epochs given, but none of {', '.join(names)} has curvature to switch"
        )

    jobs = [(name, hparams[name], config) for name in names]
    if time_baseline and BASELINE not in names:
        baseline_config = dataclasses.replace(
            config, timing_steps=BASELINE_STEPS, curvature_epochs=None, record_every=None
        )
        jobs.insert(0, (BASELINE, task_hparams(the_task, BASELINE), baseline_config))

    started = time.perf_counter()
    runs: dict[str, Any] = {}
    baseline: dict[str, Any] | None = None
    previous_threads = torch.get_num_threads()
    try:
        for i, (name, hp, run_config) in enumerate(jobs, start=1):
            timing_only = run_config.timing_steps is not None
            label = f"[{i}/{len(jobs)}] {name}"
            what = (
                f"timing-only baseline of the vs {BASELINE} column (at most "
                f"{BASELINE_STEPS} steps), "
                if timing_only
                else ""
            )
            where = "starting a subprocess" if isolate else "starting in this process"
            _say(quiet, f"{label}: {what}{where}")
            run_started = time.perf_counter()
            try:
                if isolate:
                    run = train_isolated(name, hp, run_config)
                else:
                    run = train(name, hp, run_config)
            except Exception as exc:
                print(f"secondorder.bench: {name} failed:", file=sys.stderr)
                traceback.print_exc(file=sys.stderr)
                if not timing_only:
                    runs[name] = {
                        "hparams": hp,
                        "summary": {"error": f"{type(exc).__name__}: {exc}"},
                    }
                continue
            summary, seconds = run["summary"], time.perf_counter() - run_started
            metric = the_task.metric_name
            if timing_only:
                baseline = {
                    "optimizer": name,
                    "steps": summary["steps"],
                    "mean_iter_ms": summary["mean_iter_ms"],
                    "median_iter_ms": summary["median_iter_ms"],
                    "hparams": hp,
                }
                outcome = f"mean iteration {summary['mean_iter_ms']:.3f} ms"
            else:
                runs[name] = run
                outcome = (
                    f"train loss {summary['final_train_loss']:.4g}, {metric} "
                    f"{summary[metric]:.4f}" + (", diverged" if summary["diverged"] else "")
                )
            _say(quiet, f"{label}: done in {seconds:.1f} s ({outcome})")
    finally:
        torch.set_num_threads(previous_threads)

    results: dict[str, Any] = {
        "config": {
            "task": the_task.name,
            "task_description": the_task.description,
            "metric": the_task.metric_name,
            "epochs": config.epochs,
            "target": None if target is None else float(target),
            "batch_size": config.batch_size,
            "seed": config.seed,
            "device": config.device,
            "threads": threads,
            "isolate": isolate,
            "init": init,
            "curvature_epochs": None
            if curvature_epochs is None
            else [list(r) for r in curvature_epochs],
            "record_every": record_every,
            "optimizers": names,
            "baseline": baseline,
            "hparams": hparams,
            "torch_version": torch.__version__,
            "machine": machine_info(),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": time.perf_counter() - started,
        },
        "results": runs,
    }
    add_overheads(results)
    add_targets(results)
    if out is not None:
        write_results(results, out, plots=plots)
    return results
