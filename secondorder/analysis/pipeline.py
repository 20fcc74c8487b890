"""The analysis of ``python -m secondorder.analysis`` as a function: :func:`run_analysis`.

For each optimizer: train the task's model from the same initial weights on the same
mini-batches, recording the weights; then, at its final weights, a fresh K-FAC factor pass and a
fresh AdaFisher diagonal pass over the same fixed batches
(:mod:`secondorder.analysis.factors`), their figures (:func:`analyze_factors`,
:func:`compare_diagonals`) and pictures; the same figures at the initial weights; finally the
loss landscape around one run's final weights with every trajectory drawn on it.

**Everything runs in float64**, the training included: the model, the data, and every float32
dtype option of the optimizers (K-FAC's ``factor_dtype`` and ``inverse_dtype``, ...). The
figures are taken at the end of a training run, and a float32 run is not reproducible across
CPUs: the last-bit differences between CPU kernels (vector width, FMA, summation order) grow
through K-FAC's preconditioned steps until the final weights differ in their second digit (the
diagonal dominance of the last layer's ``G`` after K-FAC: 0.662 on one machine, 0.629 on
another). In float64 they start about 1e-16 and the default run's final weights (after 460
steps) agree to about 1e-8, its figures to 1e-7 or better: the printed digits are the same on
every CPU and thread count (``tests/analysis/test_reproducible.py``).
"""

from __future__ import annotations

import inspect
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import vector_to_parameters
from tqdm.auto import tqdm

from ..bench.optimizers import OPTIMIZERS, OptimizerSpec
from ..bench.report import machine_info
from ..bench.runner import (
    load_initial_weights,
    preflight,
    resolve_optimizers,
    resolve_task,
    task_hparams,
)
from ..bench.tasks import Task, TaskData
from .factors import (
    analyze_factors,
    compare_diagonals,
    fresh_adafisher_diagonals,
    fresh_kfac_factors,
)
from .landscape import flat_weights, loss_surface, pca_directions, project, random_directions

__all__ = ["DEFAULT_GRID", "DEFAULT_OPTIMIZERS", "DEFAULT_TASK", "DIRECTIONS", "run_analysis"]

DEFAULT_TASK = "digits-cnn"
DEFAULT_OPTIMIZERS = ("kfac", "adafisher", "sgd")
DIRECTIONS = ("pca", "random")
#: landscape grid points per axis by default: the landscape's float64 forward passes (over the
#: whole digits training set) cost 40 ms per point on one core: 7 s for 13 x 13
DEFAULT_GRID = 13
#: examples per forward pass of the landscape and the final evaluation: one float64 pass over
#: the whole digits training set allocates 26 MB buffers, which glibc maps and unmaps at every
#: grid point (a third of the landscape's time went to page faults)
EVAL_BATCH = 256
#: the PCA plane covers the projected trajectories with this much margin on each side
PCA_MARGIN = 0.15


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def run_analysis(
    opts: str | Sequence[str] = DEFAULT_OPTIMIZERS,
    task: str = DEFAULT_TASK,
    *,
    out: str | os.PathLike[str],
    epochs: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    init: str | os.PathLike[str] | None = None,
    record_every: int = 5,
    factor_batches: int = 8,
    directions: str = "pca",
    center: str | None = None,
    grid: int = DEFAULT_GRID,
    span: float = 1.0,
    landscape_examples: int = 2048,
    max_dim: int = 1024,
    landscape: bool = True,
    pictures: bool = True,
    dpi: int = 80,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train, analyse and draw; write ``summary.json`` and the PNGs into ``out``.

    Args:
        opts: bench optimizer names (``"sgd,kfac"`` or a list); any of
            :data:`~secondorder.bench.optimizers.OPTIMIZERS`.
        task: a bench task (:data:`~secondorder.bench.tasks.TASKS`).
        out: output folder (created).
        epochs, batch_size: training length and mini-batch size (default: the task's).
        seed: initial weights, batch order, the factor batches and the random directions.
        overrides: ``{optimizer: {hyperparameter: value}}`` over the bench defaults.
        init: start every run from this checkpoint (see the bench's ``--init``).
        record_every: record the weights every this many steps for the trajectories.
        factor_batches: batches (of ``batch_size``, a fixed seeded draw from the training
            set) of the fresh factor passes.
        directions: ``"pca"`` (of the recorded trajectories) or ``"random"`` (filter
            normalised).
        center: the run whose final weights are the landscape's centre (default: the first).
        grid: grid points per axis of the landscape.
        span: with ``"random"`` directions the grid covers ``[-span, span]²``; with ``"pca"``
            it covers the projected trajectories with a 15% margin, times ``span``.
        landscape_examples: training examples the landscape loss is averaged over (the
            first ones of the training set).
        max_dim: factors larger than this are left out of the figures and pictures (their
            names are listed in the summary as ``skipped``).
        landscape: compute and draw the landscape.
        pictures: draw the PNGs (False: the JSON summary only).
        dpi: resolution of the PNGs.
        quiet: no progress bars.

    Everything runs in this process, in float64 (the module docstring says why), with
    torch's current number of threads. The initial weights are the task's seeded draw made in
    float64 (``init``: the checkpoint's weights).

    Returns:
        What ``summary.json`` holds: ``config``, ``runs`` (per run: final train loss and test
        metric, and per layer the figures of ``A`` and ``G``; plus ``initial`` for the
        initial weights), ``landscape`` and ``files`` (the PNGs written).

    Raises:
        ValueError: a bad argument (unknown task, optimizer or direction kind, non-positive
            sizes, a ``center`` not among ``opts``, a checkpoint that does not fit).
    """
    started = time.perf_counter()
    names = resolve_optimizers(opts)
    the_task = resolve_task(task)
    for arg, value in (
        ("record_every", record_every),
        ("factor_batches", factor_batches),
        ("grid", grid),
        ("landscape_examples", landscape_examples),
        ("max_dim", max_dim),
        ("dpi", dpi),
    ):
        _check_positive(arg, value)
    for arg, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value is not None:
            _check_positive(arg, value)
    span = _check_float("span", span)
    if directions not in DIRECTIONS:
        raise ValueError(f"directions must be one of {', '.join(DIRECTIONS)}, got {directions!r}")
    center = names[0] if center is None else center
    if center not in names:
        raise ValueError(f"center {center!r} is not among the optimizers run ({', '.join(names)})")
    if landscape and grid < 2:
        raise ValueError(f"grid must be >= 2 points per axis, got {grid}")
    overrides = dict(overrides or {})
    stray = [name for name in overrides if name not in names]
    if stray:
        raise ValueError(f"overrides given for {', '.join(stray)}, not among {', '.join(names)}")
    if init is not None:
        init = os.fspath(init)
        load_initial_weights(the_task.build_model(seed), init)
    hparams = {name: task_hparams(the_task, name, overrides.get(name)) for name in names}
    preflight(the_task, hparams)
    hparams = {name: _float64_options(the_task, name, hp) | hp for name, hp in hparams.items()}

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    epochs = epochs or the_task.epochs
    bs = batch_size or the_task.batch_size
    data = _float64_data(the_task.data())
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))
    factor_data = [
        (data.x_train[idx], data.y_train[idx]) for idx in order[: factor_batches * bs].split(bs)
    ]
    picture_kinds = ("heatmaps", "spectra", "gershgorin", "frequency")
    stages = 2 * len(names) + 1 + int(landscape)
    stages += pictures * (len(names) * len(picture_kinds) + 1 + int(landscape))
    bar = tqdm(
        total=stages,
        desc="analysis",
        unit="stage",
        file=sys.stderr,
        disable=True if quiet else None,
    )
    files: dict[str, str] = {}
    runs: dict[str, dict[str, Any]] = {}
    factors_of: dict[str, dict] = {}
    trajectories: dict[str, torch.Tensor] = {}
    with bar:

        def stage(text: str) -> None:
            bar.set_postfix_str(text)

        def model_at(flat: torch.Tensor | None) -> torch.nn.Module:
            model = _float64_model(the_task, seed, init)
            if flat is not None:
                vector_to_parameters(flat.double(), model.parameters())
            return model.eval()

        def analyse(run: str, model: torch.nn.Module) -> dict[str, Any]:
            factors = fresh_kfac_factors(model, factor_data, the_task.loss_fn)
            diagonals = fresh_adafisher_diagonals(model, factor_data, the_task.loss_fn)
            kept = {
                k: v for k, v in factors.items() if max(v[0].shape[0], v[1].shape[0]) <= max_dim
            }
            factors_of[run] = kept
            return {
                "layers": analyze_factors(kept),
                "diagonal_check": compare_diagonals(kept, diagonals),
                "skipped": sorted(set(factors) - set(kept)),
            }

        for name in names:
            stage(f"training {name}")
            result = _train(
                the_task,
                name,
                hparams[name],
                _float64_model(the_task, seed, init),
                data,
                epochs=epochs,
                batch_size=bs,
                seed=seed,
                record_every=record_every,
                quiet=quiet,
            )
            trajectories[name] = result.pop("weights")
            runs[name] = {"hparams": hparams[name], **result}
            bar.update()
        stage("factors at the initial weights")
        initial = model_at(None)
        runs_initial = analyse("initial", initial)
        bar.update()
        for name in names:
            stage(f"factors {name}")
            runs[name].update(analyse(name, model_at(trajectories[name][-1])))
            bar.update()

        landscape_summary = None
        if landscape:
            stage("landscape")
            landscape_summary = _landscape(
                the_task,
                model_at(trajectories[center][-1]),
                trajectories,
                data,
                center=center,
                directions=directions,
                grid=grid,
                span=span,
                examples=landscape_examples,
                seed=seed,
                quiet=quiet,
            )
            bar.update()

        if pictures:
            from . import plots

            for name in names:
                factors = factors_of[name]
                if not factors:
                    continue
                title = f"{the_task.name}, {name}: K-FAC factors at the final weights"
                for kind in picture_kinds:
                    stage(f"picture {name} {kind}")
                    draw = {
                        "heatmaps": plots.plot_factor_heatmaps,
                        "spectra": plots.plot_spectra,
                        "gershgorin": plots.plot_gershgorin,
                        "frequency": plots.plot_frequency_fields,
                    }[kind]
                    path = draw(factors, out / f"{name}_{kind}.png", title=title, dpi=dpi)
                    files[f"{name}_{kind}"] = path.name
                    bar.update()
            stage("picture dominance")
            dominance = {
                run: {
                    layer: (entry["A"]["diagonal_dominance"], entry["G"]["diagonal_dominance"])
                    for layer, entry in layers.items()
                }
                for run, layers in [("initial", runs_initial["layers"])]
                + [(n, runs[n]["layers"]) for n in names]
            }
            path = plots.plot_dominance(
                dominance,
                out / "dominance.png",
                title=f"{the_task.name}: share of each factor's mass on its diagonal",
                dpi=dpi,
            )
            files["dominance"] = path.name
            bar.update()
            if landscape_summary is not None:
                stage("picture landscape")
                path = plots.plot_landscape(
                    landscape_summary.pop("_surface"),
                    landscape_summary["alphas"],
                    landscape_summary["betas"],
                    landscape_summary.pop("_coords"),
                    out / "landscape.png",
                    axis_labels=landscape_summary["axis_labels"],
                    title=f"{the_task.name}: train loss around the final weights of {center}",
                    dpi=dpi,
                )
                files["landscape"] = path.name
                bar.update()
        if landscape_summary is not None:
            landscape_summary.pop("_surface", None)
            landscape_summary.pop("_coords", None)

    summary = {
        "config": {
            "task": the_task.name,
            "optimizers": names,
            "epochs": epochs,
            "batch_size": bs,
            "seed": seed,
            "dtype": "float64",
            "init": init,
            "record_every": record_every,
            "factor_batches": len(factor_data),
            "factor_examples": sum(len(y) for _, y in factor_data),
            "max_dim": max_dim,
            "threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "machine": machine_info(),
            "wall_time_s": time.perf_counter() - started,
        },
        "runs": {"initial": runs_initial, **runs},
        "landscape": landscape_summary,
        "files": files,
    }
    _write_json(summary, out / "summary.json")
    return summary


def _float64_model(task: Task, seed: int, init: str | None) -> nn.Module:
    """The task's model in float64: its seeded initial weights drawn in float64 (a float32 draw
    differs in the last bit between CPU kernels, a 6e-8 difference that K-FAC's training
    carries into the second digit of the final weights), or ``init``'s weights."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = task.build_model(seed)
    finally:
        torch.set_default_dtype(previous)
    if init is not None:
        load_initial_weights(model, init)
    return model.double()


def _float64_data(data: TaskData) -> TaskData:
    """``data`` with its floating-point tensors in float64 (token ids and labels as they are)."""
    tensors = (data.x_train, data.y_train, data.x_test, data.y_test)
    return TaskData(*(t.double() if t.is_floating_point() else t for t in tensors))


def _float64_options(task: Task, name: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Optimizer ``name``'s dtype options that default to float32 (K-FAC's ``factor_dtype``
    and ``inverse_dtype``, AdaFisher's ``factor_dtype``, M-FAC's ``window_dtype``, ...: the
    constructor's ``*_dtype`` keywords), set to float64; those ``hparams`` sets are left out."""
    optimizer = OPTIMIZERS[name].build(task.build_model(0), **hparams)
    keywords = inspect.signature(type(optimizer)).parameters.items()
    return {
        key: torch.float64
        for key, param in keywords
        if key.endswith("_dtype") and param.default is torch.float32 and key not in hparams
    }


def _train(
    task: Task,
    name: str,
    hparams: Mapping[str, Any],
    model: nn.Module,
    data: TaskData,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    record_every: int,
    quiet: bool,
) -> dict[str, Any]:
    """Train ``model`` (in place) with optimizer ``name`` as the bench runner does
    (:func:`~secondorder.bench.runner.train`: the same batch order and global seed from
    ``seed``, Monte-Carlo Fisher labels and ``create_graph`` where the optimizer asks, a stop
    at a non-finite loss), in the model's dtype, without timing; the weights (flattened, in the
    model's dtype) are recorded before the first step, every ``record_every`` steps and after
    the last. Returns ``final_train_loss``, the test metric, ``steps``, ``diverged``,
    ``recorded_steps`` and ``weights`` (``(records, parameters)``)."""
    spec: OptimizerSpec = OPTIMIZERS[name]
    optimizer = spec.build(model, **hparams)
    mc_fisher = getattr(optimizer, "fisher_type", None) == "mc"
    torch.manual_seed(seed)  # for optimizers that draw random numbers (probes, sketches)
    batch_order = torch.Generator().manual_seed(seed)
    x_train, y_train = data.x_train, data.y_train
    n = len(x_train)
    records, recorded_steps = [flat_weights(model)], [0]
    steps, diverged = 0, False
    bar = tqdm(
        total=epochs * math.ceil(n / batch_size),
        desc=f"{task.name} {name}",
        unit="step",
        file=sys.stderr,
        leave=False,
        disable=True if quiet else None,
    )
    with bar:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=batch_order)
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                outputs = model(x_train[idx])
                if mc_fisher:
                    optimizer.sample_fisher(outputs)
                loss = task.loss_fn(outputs, y_train[idx])
                loss.backward(create_graph=getattr(optimizer, "needs_hessian", spec.create_graph))
                optimizer.step()
                steps += 1
                bar.update()
                if steps % record_every == 0:
                    records.append(flat_weights(model))
                    recorded_steps.append(steps)
                if not math.isfinite(loss.item()):
                    diverged = True
                    break
            if diverged:
                break
    if recorded_steps[-1] != steps:
        records.append(flat_weights(model))
        recorded_steps.append(steps)
    model.eval()
    try:
        final_train_loss = float(task.loss_fn(_outputs(model, x_train), y_train))
        metric = task.metric(_outputs(model, data.x_test), data.y_test)
    finally:
        model.train()
    return {
        "final_train_loss": final_train_loss,
        task.metric_name: metric,
        "steps": steps,
        "diverged": diverged,
        "recorded_steps": recorded_steps,
        "weights": torch.stack(records),
    }


@torch.no_grad()
def _outputs(model: nn.Module, x: Tensor) -> Tensor:
    return torch.cat([model(chunk) for chunk in x.split(EVAL_BATCH)])


def _landscape(
    task: Any,
    model: torch.nn.Module,
    trajectories: Mapping[str, torch.Tensor],
    data: Any,
    *,
    center: str,
    directions: str,
    grid: int,
    span: float,
    examples: int,
    seed: int,
    quiet: bool,
) -> dict[str, Any]:
    c = trajectories[center][-1]
    if directions == "pca":
        dirs, explained = pca_directions(trajectories.values(), c)
        labels = tuple(
            f"PC{i + 1} ({100 * float(e):.1f}% of the offsets)" for i, e in enumerate(explained)
        )
    else:
        dirs = random_directions(model, c, seed=seed).double()
        explained = None
        labels = ("filter-normalised direction 1", "filter-normalised direction 2")
    coords = {name: project(t, c, dirs) for name, t in trajectories.items()}
    if directions == "pca":
        allc = torch.cat(list(coords.values()))
        low, high = allc.min(0).values, allc.max(0).values
        pad = PCA_MARGIN * (high - low)
        low, high = (low - pad) * span, (high + pad) * span
        low, high = torch.minimum(low, torch.zeros(2)), torch.maximum(high, torch.zeros(2))
    else:
        low, high = (
            torch.full((2,), -span, dtype=torch.float64),
            torch.full((2,), span, dtype=torch.float64),
        )
    # an odd number of points puts the centre on the grid when the range is symmetric; the
    # centre's own loss is computed exactly anyway (loss_at_center)
    alphas = torch.linspace(float(low[0]), float(high[0]), grid, dtype=torch.float64)
    betas = torch.linspace(float(low[1]), float(high[1]), grid, dtype=torch.float64)
    x, y = data.x_train[:examples], data.y_train[:examples]
    batches = list(zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH), strict=True))
    with tqdm(
        total=grid * grid,
        desc="landscape",
        unit="point",
        file=sys.stderr,
        leave=False,
        disable=True if quiet else None,
    ) as bar:
        surface = loss_surface(
            model, task.loss_fn, batches, c, dirs, alphas, betas, progress=bar.update
        )
    at_center = float(loss_surface(model, task.loss_fn, batches, c, dirs, [0.0], [0.0])[0, 0])
    return {
        "directions": directions,
        "center": center,
        "explained": None if explained is None else [float(e) for e in explained],
        "axis_labels": list(labels),
        "alphas": [float(a) for a in alphas],
        "betas": [float(b) for b in betas],
        "examples": len(y),
        "loss_at_center": at_center,
        "loss_min": float(surface.min()),
        "loss_max": float(surface.max()),
        "trajectories": {
            name: {"start": [float(v) for v in xy[0]], "end": [float(v) for v in xy[-1]]}
            for name, xy in coords.items()
        },
        "_surface": surface,
        "_coords": coords,
    }


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _json_safe(obj.tolist())
    if isinstance(obj, torch.dtype):
        return str(obj)
    return obj


def _write_json(summary: Mapping[str, Any], path: Path) -> None:
    import json

    with open(path, "w") as f:
        json.dump(_json_safe(summary), f, indent=1, allow_nan=False)
        f.write("\n")
