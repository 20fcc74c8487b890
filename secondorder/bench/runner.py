"""Train one model with one optimizer and measure it: losses, accuracy, time and memory.

:func:`train` does one run in the calling process; :func:`train_isolated` does the same run in a
fresh ``spawn`` subprocess, so that the peak resident memory of one optimizer never hides behind
the peak of another (Linux's ``VmHWM`` only ever grows within a process, and the allocator keeps
memory freed by earlier runs). Every run with the same :class:`RunConfig` starts from the same
initial weights and sees the same mini-batches in the same order, whatever the optimizer.

Opt-ins of :class:`RunConfig`: ``init`` starts from the weights of a checkpoint
(:func:`load_initial_weights`), ``curvature_epochs`` switches the curvature of the optimizers
that have one on for some epochs only (:func:`epoch_ranges_to_steps`), and ``record_every``
records the flattened weights along the way (``result["trajectory"]``, for loss-landscape
pictures: :mod:`secondorder.analysis`).
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector
from tqdm.auto import tqdm

from .optimizers import OPTIMIZERS
from .tasks import TASKS, Task

__all__ = [
    "RunConfig",
    "epoch_ranges_to_steps",
    "load_initial_weights",
    "optimizer_state_mb",
    "parse_epoch_ranges",
    "preflight",
    "resolve_optimizers",
    "resolve_task",
    "task_hparams",
    "train",
    "train_isolated",
]

_MB = 2**20


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs besides the optimizer; plain values, so it pickles for ``spawn``.

    Args:
        task: a key of :data:`~secondorder.bench.tasks.TASKS`.
        epochs: passes over the training set (> 0).
        batch_size: mini-batch size (> 0); the last batch of an epoch may be smaller.
        seed: seeds the initial weights, the batch order and the global torch RNG.
        device: ``"cpu"`` or a CUDA device.
        threads: ``torch.set_num_threads`` for the run, or None to leave torch's default.
        quiet: no progress output: neither the bar (shown where stderr is a terminal) nor the
            line per epoch written instead where it is not (a log file, a pipe).
        init: path of a checkpoint whose weights replace the seeded initial weights
            (:func:`load_initial_weights`); None: the seeded weights.
        curvature_epochs: ``(start, stop)`` epoch ranges (0-based, stop exclusive, None for an
            open end) in which optimizers with curvature use it; outside them they take their
            base update (``CurvatureOptimizer.use_curvature``, the ranges converted to steps by
            :func:`epoch_ranges_to_steps`). None: curvature at every step. Optimizers without
            curvature (sgd, adam, adamw, adahessian) ignore it.
        record_every: record the model's parameters, flattened, before the first step, every
            ``record_every`` steps and after the last step (``result["trajectory"]``); None:
            nothing recorded (it costs ``4 · parameters`` bytes per record).
        timing_steps: a timing-only run: stop after this many steps (at most the epochs' steps)
            and evaluate nothing (the losses and metrics of the summary and the curves are
            NaN; the per-step losses and times are recorded). None: a full run.
    """

    task: str
    epochs: int
    batch_size: int
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    quiet: bool = False
    init: str | None = None
    curvature_epochs: tuple[tuple[int, int | None], ...] | None = None
    record_every: int | None = None
    timing_steps: int | None = None


# Printed by torch once per process, through the progress bar, at the first
# backward(create_graph=True) (AdaHessian). The bench owns that graph: zero_grad() sets every
# .grad to None before the next backward, which breaks the parameter <-> gradient reference
# cycle the warning is about.
_CREATE_GRAPH_WARNING = r"Using backward\(\) with create_graph=True"


def _write_above_bar(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    # warnings.showwarning while a progress bar is shown: print the warning above the bar
    # instead of through it.
    text = warnings.formatwarning(message, category, filename, lineno, line)
    tqdm.write(text.rstrip("\n"), file=sys.stderr)


def parse_epoch_ranges(text: str) -> tuple[tuple[int, int | None], ...]:
    """Read ``"0:2,5:"`` as ``((0, 2), (5, None))``: comma-separated ``start:stop`` epoch ranges,
    0-based with ``stop`` exclusive (as Python slices); an empty ``start`` is 0, an empty
    ``stop`` an open end.

    Raises:
        ValueError: a malformed range, a negative start or ``stop <= start`` (the message
            quotes the range and shows the form).
    """
    ranges = []
    for item in text.split(","):
        start_text, colon, stop_text = item.strip().partition(":")
        try:
            if not colon:
                raise ValueError
            start = int(start_text) if start_text.strip() else 0
            stop = int(stop_text) if stop_text.strip() else None
        except ValueError:
            raise ValueError(
                f"malformed epoch range {item.strip()!r}: expected START:STOP (0-based, STOP "
                "exclusive, either may be empty), e.g. 0:2,5:"
            ) from None
        if start < 0 or (stop is not None and stop <= start):
            raise ValueError(
                f"epoch range {item.strip()!r} needs 0 <= START < STOP (STOP exclusive)"
            )
        ranges.append((start, stop))
    return tuple(ranges)


def epoch_ranges_to_steps(
    ranges: Iterable[tuple[int, int | None]], steps_per_epoch: int
) -> tuple[tuple[int, int | None], ...]:
    """Epoch ranges as step ranges: epoch ``e`` is steps ``[e·s, (e + 1)·s)`` with ``s`` steps
    per epoch, so ``(start, stop)`` becomes ``(start·s, stop·s)`` (None stays an open end), the
    form ``CurvatureOptimizer(use_curvature=...)`` takes."""
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int):
        raise TypeError(f"steps_per_epoch must be an int, got {steps_per_epoch!r}")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return tuple(
        (start * steps_per_epoch, None if stop is None else stop * steps_per_epoch)
        for start, stop in ranges
    )


def load_initial_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load the weights of checkpoint ``path`` into ``model``.

    ``path`` holds what ``torch.save(model.state_dict(), path)`` writes, or a
    :func:`secondorder.prune.save_checkpoint` file (``{"model": state_dict, "masks": ...,
    ...}``: its weights are loaded, its masks are not applied). Read with
    ``weights_only=True``.

    Raises:
        ValueError: the file is missing or unreadable, or its state does not fit ``model``
            (the message names the missing and unexpected keys and the shape mismatches).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {os.fspath(path)!r} does not exist") from None
    except Exception as exc:
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} cannot be read: {type(exc).__name__}: {exc}"
        ) from None
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]  # secondorder.prune.save_checkpoint's format
    if not (isinstance(state, Mapping) and all(isinstance(v, Tensor) for v in state.values())):
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} is not a model state_dict (name -> tensor) nor a "
            "secondorder.prune checkpoint ({'model': state_dict, ...})"
        )
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} where the model has {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        problems = [
            f"{label} {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches:", shapes),
            )
            if items
        ]
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} does not fit the model: {'; '.join(problems)}"
        )
    model.load_state_dict(state)


def resolve_task(name: str) -> Task:
    """The registered task called ``name``.

    Raises:
        ValueError: no such task (the message lists the allowed names).
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(TASKS)}") from None


def resolve_optimizers(names: str | Iterable[str]) -> list[str]:
    """Normalise ``"sgd,adam"`` or ``["sgd", "adam"]`` to a list of registered names, in order.

    Raises:
        ValueError: an unknown or repeated name, or none at all (the message lists the allowed
            names).
    """
    if isinstance(names, str):
        names = names.split(",")
    out = [n.strip() for n in names if n.strip()]
    allowed = ", ".join(OPTIMIZERS)
    if not out:
        raise ValueError(f"no optimizer given; allowed: {allowed}")
    for name in out:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; allowed: {allowed}")
        if out.count(name) > 1:
            raise ValueError(f"optimizer {name!r} given more than once")
    return out


def task_hparams(
    task: Task, name: str, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Optimizer ``name``'s defaults with ``overrides`` merged over them, for ``task``.

    With ``fisher_type="mc"`` (the Monte-Carlo Fisher, which samples targets from the model's
    predictive distribution) and no ``likelihood`` given, the task's likelihood is filled in:
    ``"categorical"`` for the classifiers, ``"bernoulli"`` for the autoencoders on pixels in
    [0, 1], ``"gaussian"`` for regression.
    """
    hparams = OPTIMIZERS[name].hparams(overrides)
    if hparams.get("fisher_type") == "mc" and hparams.get("likelihood") is None:
        hparams["likelihood"] = task.likelihood
    return hparams


def preflight(task: Task, hparams: Mapping[str, Mapping[str, Any]]) -> None:
    """Build every optimizer once on a throw-away model, so a bad hyperparameter fails in a
    second rather than after the runs before it have finished.

    Args:
        task: the task whose model the optimizers are built for.
        hparams: ``{optimizer name: full hyperparameters}``.

    Raises:
        ValueError: an optimizer could not be built; the message starts with its name and
            carries the constructor's own error.
    """
    for name, hp in hparams.items():
        try:
            OPTIMIZERS[name].build(task.build_model(0), **hp)
        except Exception as exc:
            raise ValueError(f"{name}: {type(exc).__name__}: {exc}") from exc


def optimizer_state_mb(optimizer: torch.optim.Optimizer) -> float:
    """Size in MB of every distinct tensor reachable from ``optimizer.state_dict()``.

    This is what a checkpoint of the optimizer holds; buffers an optimizer recomputes after
    loading (inverses, eigenbases) are not counted.
    """
    seen: set[int] = set()
    total = 0
    stack: list[Any] = [optimizer.state_dict()]
    while stack:
        obj = stack.pop()
        if isinstance(obj, Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                total += obj.nelement() * obj.element_size()
        elif isinstance(obj, Mapping):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
    return total / _MB


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _PeakMemory:
    """Peak memory a run adds over what the process held when the run began, in MB.

    CUDA: ``torch.cuda.max_memory_allocated`` (reset at the start) over the memory allocated at
    the start. CPU: ``VmHWM`` over ``VmRSS`` at the start, from ``/proc/self/status``, less the
    growth of file-backed pages (shared libraries paged in on first use are not the run's
    memory), so a slight underestimate of the heap's peak. Trusted only where the high-water
    mark could be reset or the process is fresh (``None`` otherwise, and off Linux).
    """

    def __init__(self, device: torch.device, fresh_process: bool) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.kind = "cuda_max_allocated"
            self.start = torch.cuda.memory_allocated(device)
            return
        self.kind = "rss_growth"
        reliable = _reset_peak_rss() or fresh_process
        rss, self.file_start = _proc_status_kb("VmRSS"), _proc_status_kb("RssFile")
        self.start = rss if reliable and rss is not None and self.file_start is not None else None

    def peak_mb(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.start) / _MB
        hwm, file_end = _proc_status_kb("VmHWM"), _proc_status_kb("RssFile")
        if self.start is None or hwm is None or file_end is None:
            return None
        file_growth = max(file_end - self.file_start, 0)
        return max(hwm - self.start - file_growth, 0) / 1024  # kB -> MB


@torch.no_grad()
def _evaluate(
    model: nn.Module, task: Task, x: Tensor, y: Tensor, batch_size: int = 4096
) -> tuple[float, float]:
    """``(mean loss, metric)`` of ``model`` on ``(x, y)`` in eval mode; restores train mode."""
    model.eval()
    try:
        logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
        return task.loss_fn(logits, y).item(), task.metric(logits, y)
    finally:
        model.train()


def _mean_ms(seconds: Sequence[float]) -> float:
    return 1e3 * statistics.fmean(seconds) if seconds else math.nan


def _median_ms(seconds: Sequence[float]) -> float:
    return 1e3 * statistics.median(seconds) if seconds else math.nan


def train(
    opt_name: str,
    hparams: Mapping[str, Any],
    config: RunConfig,
    *,
    fresh_process: bool = False,
) -> dict[str, Any]:
    """Train ``config.task``'s model with optimizer ``opt_name`` in this process.

    Args:
        opt_name: a key of :data:`~secondorder.bench.optimizers.OPTIMIZERS`.
        hparams: the optimizer's full hyperparameters (defaults already merged).
        config: task, epochs, batch size, seed, device, threads.
        fresh_process: the caller guarantees nothing else ran in this process (the RSS peak can
            then be trusted even where it cannot be reset).

    Returns:
        ``{"hparams", "summary", "curves", "steps"}`` (and ``"trajectory"`` with
        ``config.record_every``: ``{"step": [0, k, 2k, ..., last], "weights": Tensor of shape
        (records, parameters)}``, the flattened ``model.parameters()`` in float32 on the CPU
        after that many steps): ``summary`` holds the final train loss,
        the final test metric, mean/median ``step()`` and iteration times in ms, the steps run
        (``steps``, ``steps_per_epoch``), training time,
        peak memory and optimizer state in MB; ``curves`` holds per-epoch train loss, test loss,
        test metric and cumulative training time (epoch 0 = before training); ``steps`` holds the
        per-step mini-batch loss and times. A non-finite loss stops the run early with
        ``summary["diverged"] = True``. ``summary["curvature_steps"]`` holds the step ranges
        ``config.curvature_epochs`` became for this optimizer (None: not switched).

    Progress goes to stderr unless ``config.quiet``: a bar where stderr is a terminal, else a
    line per epoch. Warnings raised while the bar is shown are written above it.
    """
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    task = resolve_task(config.task)
    spec = OPTIMIZERS[opt_name]
    device = torch.device(config.device)
    sync: Callable[[], None] = (
        (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    )

    data = task.data().to(device)
    x_train, y_train = data.x_train, data.y_train
    n = len(x_train)
    steps_per_epoch = math.ceil(n / config.batch_size)

    # Build the optimizer once on a throw-away model before measuring anything: the first torch
    # optimizer of a process imports torch._dynamo (about 150 MB of RSS), and a factory may import
    # its own package; neither is the optimizer's cost.
    spec.build(task.build_model(config.seed).to(device), **hparams)
    gc.collect()
    memory = _PeakMemory(device, fresh_process)
    model = task.build_model(config.seed)
    if config.init is not None:
        load_initial_weights(model, config.init)
    model = model.to(device)
    optimizer = spec.build(model, **hparams)
    curvature_steps = None
    if config.curvature_epochs is not None and getattr(optimizer, "estimator", None) is not None:
        curvature_steps = epoch_ranges_to_steps(config.curvature_epochs, steps_per_epoch)
        optimizer.use_curvature = curvature_steps
    mc_fisher = getattr(optimizer, "fisher_type", None) == "mc"
    torch.manual_seed(config.seed)  # for optimizers that draw random numbers (probes, sketches)
    batch_order = torch.Generator().manual_seed(config.seed)

    metric = task.metric_name
    train_loss, test_loss, test_metric = [], [], []
    epochs_done, train_time = [0], [0.0]
    step_loss: list[float] = []
    step_s: list[float] = []
    iter_s: list[float] = []

    total_steps = config.epochs * steps_per_epoch
    if config.timing_steps is not None:
        total_steps = min(total_steps, config.timing_steps)

    def record_epoch() -> None:
        if config.timing_steps is not None:  # a timing-only run evaluates nothing
            for curve in (train_loss, test_loss, test_metric):
                curve.append(math.nan)
            return
        tl, _ = _evaluate(model, task, x_train, y_train)
        vl, vm = _evaluate(model, task, data.x_test, data.y_test)
        train_loss.append(tl)
        test_loss.append(vl)
        test_metric.append(vm)

    record_epoch()
    diverged = False
    every = config.record_every
    records: list[Tensor] = []
    record_steps: list[int] = []

    def record_weights() -> None:
        records.append(parameters_to_vector(model.parameters()).detach().float().cpu())
        record_steps.append(len(iter_s))

    if every is not None:
        record_weights()
    bar = tqdm(
        total=total_steps,
        desc=f"{task.name} {opt_name}",
        unit="step",
        file=sys.stderr,
        leave=False,
        disable=True if config.quiet else None,  # None: off when stderr is not a TTY
    )
    # Where the bar is off but progress is wanted (stderr is a log file or a pipe): a line per
    # epoch, flushed, instead of the bar's carriage returns.
    epoch_lines = bool(bar.disable) and not config.quiet and config.timing_steps is None
    with warnings.catch_warnings(), bar:
        warnings.filterwarnings("ignore", message=_CREATE_GRAPH_WARNING, category=UserWarning)
        if not bar.disable:
            warnings.showwarning = _write_above_bar
        for epoch in range(1, config.epochs + 1):
            perm = torch.randperm(n, generator=batch_order).to(device)
            for start in range(0, n, config.batch_size):
                idx = perm[start : start + config.batch_size]
                xb, yb = x_train[idx], y_train[idx]
                sync()
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)  # also breaks create_graph's cycle
                outputs = model(xb)
                if mc_fisher:  # labels sampled from the model for the curvature statistics
                    optimizer.sample_fisher(outputs)
                loss = task.loss_fn(outputs, yb)
                # An optimizer that knows which steps need the gradient's graph says so.
                loss.backward(create_graph=getattr(optimizer, "needs_hessian", spec.create_graph))
                sync()
                t1 = time.perf_counter()
                optimizer.step()
                sync()
                t2 = time.perf_counter()
                step_s.append(t2 - t1)
                iter_s.append(t2 - t0)
                step_loss.append(loss.item())
                bar.update()
                if every is not None and len(iter_s) % every == 0:
                    record_weights()
                if not math.isfinite(step_loss[-1]):
                    diverged = True
                    break
                if len(iter_s) == total_steps:  # a timing-only run's last step
                    break
            train_time.append(train_time[-1] + sum(iter_s[(epoch - 1) * steps_per_epoch :]))
            epochs_done.append(epoch)
            record_epoch()
            if config.timing_steps is None:
                bar.set_postfix(loss=f"{train_loss[-1]:.4f}", **{metric: f"{test_metric[-1]:.3f}"})
            if epoch_lines:
                print(
                    f"  {opt_name} epoch {epoch}/{config.epochs}: train loss {train_loss[-1]:.4f}, "
                    f"{metric} {test_metric[-1]:.4f}, {train_time[-1]:.1f} s of training",
                    file=sys.stderr,
                    flush=True,
                )
            if diverged or len(iter_s) == total_steps:
                break

    if every is not None and record_steps[-1] != len(iter_s):
        record_weights()
    summary = {
        "final_train_loss": train_loss[-1],
        metric: test_metric[-1],
        "best_" + metric: (max if task.higher_is_better else min)(test_metric),
        "mean_step_ms": _mean_ms(step_s),
        "mean_iter_ms": _mean_ms(iter_s),
        "median_step_ms": _median_ms(step_s),
        "median_iter_ms": _median_ms(iter_s),
        "train_time_s": train_time[-1],
        "steps": len(iter_s),
        "steps_per_epoch": steps_per_epoch,
        "diverged": diverged,
        "peak_mb": memory.peak_mb(),
        "peak_kind": memory.kind,
        "state_mb": optimizer_state_mb(optimizer),
        "threads": torch.get_num_threads(),
        "isolated": fresh_process,
        "curvature_steps": None if curvature_steps is None else [list(r) for r in curvature_steps],
        "error": None,
    }
    result = {
        "hparams": dict(hparams),
        "summary": summary,
        "curves": {
            "epoch": epochs_done,
            "train_loss": train_loss,
            "test_loss": test_loss,
            metric: test_metric,
            "train_time_s": train_time,
        },
        "steps": {
            "loss": step_loss,
            "step_ms": [1e3 * s for s in step_s],
            "iter_ms": [1e3 * s for s in iter_s],
        },
    }
    if every is not None:
        result["trajectory"] = {"step": record_steps, "weights": torch.stack(records)}
    return result


def _train_in_child(opt_name: str, hparams: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    return train(opt_name, hparams, config, fresh_process=True)


def train_isolated(opt_name: str, hparams: Mapping[str, Any], config: RunConfig) -> dict[str, Any]:
    """:func:`train` in a fresh ``spawn`` subprocess; same arguments and result.

    Exceptions raised in the child are re-raised here (with the child's traceback as cause).
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_train_in_child, opt_name, dict(hparams), config).result()
