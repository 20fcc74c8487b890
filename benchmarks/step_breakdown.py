"""Where each optimizer's step time goes, stage by stage.

Trains a few steps with every method and times, per iteration:

    forward       the model's forward pass and the loss
    backward      loss.backward(), less the capture time spent inside it
    capture       the capture hooks' statistics (the estimator's accumulate callback)
    update        estimator.update (factor / statistics update)
    refresh       estimator.refresh (eigendecompositions / inverses / Cholesky)
    precondition  estimator.precondition
    hutchinson    AdaHessian's Hessian-diagonal estimate (its estimator's ``update``:
                  the Hutchinson Hessian-vector products)
    base          the rest of optimizer.step(): gradient collection, finiteness check,
                  KL clip, the base (SGD / Adam / AdaFisher / AdaHessian) update

Stages a method does not have read 0. Timings are exclusive: a timed call made inside
another (M-FAC's precondition refactoring through refresh, the hooks inside backward)
is counted in its own stage only, so the stages add up to forward + backward + step().
The timers wrap instance attributes of the optimizer built here (``estimator.update``,
``capture.accumulate``, ...); the library is not modified. On CUDA every timer
synchronises before and after.

    python benchmarks/step_breakdown.py --task digits-cnn --steps 200 --threads 1
    python benchmarks/step_breakdown.py --opt sgd,kfac,mfac --csv out.csv
    # ResNet-18 at CIFAR size, K-FAC statistics every 10 steps and inverses every 100
    # (slow on a CPU: a few seconds a step, see benchmarks/RESULTS.md)
    python benchmarks/step_breakdown.py --task resnet18 --batch 128 --steps 20 \
        --opt sgd,adam,kfac,ekfac,mfac,adafisher,adahessian \
        --curvature-every 10 --inverse-every 100 \
        --set mfac.curvature_every=1 --set adahessian.hessian_every=1

Tasks: ``digits-mlp`` / ``digits-cnn`` (tiny models on 8x8 inputs), ``resnet18`` (the CIFAR
ResNet-18 of ``secondorder.bench.models.resnet18_cifar``: timm's ResNet-18 with a 3x3
stride-1 stem and no max-pool, 11.2M parameters, 3x32x32 inputs, 10 classes) and
``resnet18-imagenet-stem`` (timm's unmodified ResNet-18 on 3x32x32 inputs, feature maps
8/4/2/1 pixels wide: the ``resnet18`` of earlier versions of this script), ``resnet20``
(the CIFAR ResNet-20 of ``secondorder.bench.models.cifar_resnet``, 0.27M parameters).

Hyperparameters are the benchmark's (``secondorder.bench.optimizers.OPTIMIZERS``, as in
``python -m secondorder.bench``); ``--curvature-every`` / ``--inverse-every`` override them
for every method that has them, and ``--set NAME.KEY=VALUE`` for one method (it wins over
both). ``--variant LABEL=NAME`` adds a second copy of method ``NAME`` under ``LABEL``
(to be named in ``--opt`` and given its own ``--set LABEL.KEY=VALUE``), e.g. K-FAC with and
without grafting in one run: ``--opt sgd,kfac,kfac-adam --variant kfac-adam=kfac
--set kfac-adam.graft=adam --set kfac-adam.kl_clip=none`` (the bench's K-FAC clips, which
a graft excludes). Prints a table (ms per step) and, with ``--csv``, writes one
row per (method, stage): ms per step, share of the iteration, and the method's iteration
time over SGD's and over Adam's (blank when that baseline was not run). The ``iteration``
row is the wall time of the whole training iteration (zero_grad to the end of step()),
measured on its own.

Steady state, not a plain mean. Every figure is the expected cost of one step under the
method's schedule:

* Steps that update the curvature (``curvature_every``; AdaHessian's ``hessian_every``)
  and the others are averaged separately and weighted ``1/k`` and ``1 - 1/k`` (``k`` the
  interval), so a window of any length gives the schedule's mix. With ``--steps`` a
  multiple of ``k`` this is the plain mean; a window without a curvature step is
  reported (its statistics cost would be missing).
* For the K-FAC family (``inverse_every``) the refresh (eigendecompositions / inverses)
  is taken out of the window and added back as ``one refresh / inverse_every``. One
  refresh costs the mean of the refreshes that ran in the measured window; when none did
  (``--steps`` shorter than ``inverse_every``, e.g. ResNet-18 on a CPU), one refresh is
  timed separately after the last step, on the statistics of the run (``refresh_timing``
  ``separate`` in the CSV). The per-refresh cost and the interval are printed and written.
  The steady state is timed: ``inverse_warmup`` (the K-FAC family's extra refreshes before
  the first ``inverse_every`` steps) is off unless ``--set`` turns it on.

Other processes on the machine inflate the timings: the header prints the load average
before and after, and ``--rounds R`` runs the methods R times in turn (sgd, adam, ...,
sgd, adam, ...) and keeps each method's fastest round.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from secondorder import CurvatureOptimizer
from secondorder.bench.optimizers import OPTIMIZERS, parse_overrides

#: every bench optimizer (the bench's registry; AdamW's step is Adam's)
METHODS = tuple(name for name in OPTIMIZERS if name != "adamw")
STAGES = (
    "forward",
    "backward",
    "capture",
    "update",
    "refresh",
    "precondition",
    "hutchinson",
    "base",
)
TASKS = ("digits-mlp", "digits-cnn", "resnet18", "resnet20", "resnet18-imagenet-stem")
CSV_FIELDS = (
    "task",
    "method",
    "stage",
    "ms_per_step",
    "share",
    "iteration_vs_sgd",
    "iteration_vs_adam",
    "refresh_ms_each",
    "refresh_amortised_over",
    "refresh_timing",
)
#: the clock of every timing: wall time, or with ``--clock cpu`` the process's CPU time
#: (``time.process_time``: on a machine shared with other jobs it counts the time this
#: process ran, not the time it waited for a core; with one torch thread, and no GPU)
CPU_CLOCK = [False]


def _now() -> float:
    return time.process_time() if CPU_CLOCK[0] else time.perf_counter()


#: where one refresh's cost came from (``measure``'s ``refresh_timing`` code)
REFRESH_TIMING = {0: "", 1: "in-loop", 2: "separate"}


class StageTimer:
    """Exclusive wall-clock time per stage: time spent in a nested timed section is
    charged to the inner stage and taken off the enclosing one."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self._open: list[list[Any]] = []  # [stage, time spent in nested sections]

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    @contextmanager
    def section(self, stage: str) -> Iterator[None]:
        self.sync()
        frame = [stage, 0.0]
        self._open.append(frame)
        start = _now()
        try:
            yield
        finally:
            self.sync()
            elapsed = _now() - start
            self._open.pop()
            self.totals[stage] += elapsed - frame[1]
            if self._open:
                self._open[-1][1] += elapsed

    def wrap(self, fn: Callable, stage: str) -> Callable:
        """``fn`` timed as ``stage``."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.section(stage):
                return fn(*args, **kwargs)

        return timed

    def reset(self) -> None:
        self.totals.clear()


def instrument(opt: torch.optim.Optimizer, timer: StageTimer) -> None:
    """Wrap the stages of ``opt`` with ``timer`` (instance attributes only)."""
    if isinstance(opt, CurvatureOptimizer) and opt.estimator is not None:
        est = opt.estimator
        for stage in ("update", "refresh", "precondition"):
            # AdaHessian's update is the Hutchinson estimate (Hessian-vector products)
            name = "hutchinson" if stage == "update" and est.needs_graph else stage
            setattr(est, stage, timer.wrap(getattr(est, stage), name))
        if opt.capture is not None:
            opt.capture.accumulate = timer.wrap(opt.capture.accumulate, "capture")


def make_task(task: str, batch: int, device: str) -> tuple[nn.Module, torch.Tensor, int]:
    """The model, one batch of inputs and the number of classes."""
    if task == "digits-mlp":
        model = nn.Sequential(
            nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10)
        )
        x = torch.rand(batch, 64)
    elif task == "digits-cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 16, 10),
        )
        x = torch.rand(batch, 1, 8, 8)
    elif task == "resnet18":
        from secondorder.bench.models import resnet18_cifar

        model = resnet18_cifar(10)  # 3x3 stride-1 stem, no max-pool
        x = torch.randn(batch, 3, 32, 32)
    elif task == "resnet20":
        from secondorder.bench.models import cifar_resnet

        model = cifar_resnet(20, 10)  # the CIFAR ResNet-20 of He et al. (0.27M parameters)
        x = torch.randn(batch, 3, 32, 32)
    elif task == "resnet18-imagenet-stem":
        import timm

        model = timm.create_model("resnet18", num_classes=10, pretrained=False)
        x = torch.randn(batch, 3, 32, 32)
    else:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    return model.to(device), x.to(device), 10


def resolve_hparams(
    name: str,
    curvature_every: int | None = None,
    inverse_every: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The hyperparameters ``name`` is built with: the bench's, then the interval options
    (for the methods that have them), then ``overrides`` (``--set``)."""
    spec = OPTIMIZERS[name]
    hparams = spec.hparams()
    key = _statistics_interval(name)
    if curvature_every is not None and key is not None:
        hparams[key] = curvature_every
    if inverse_every is not None and "inverse_every" in spec.hyperparameter_names():
        hparams["inverse_every"] = inverse_every
    if "inverse_warmup" in spec.hyperparameter_names():
        # the steady state: the warm-up's extra refreshes come once, before inverse_every
        hparams["inverse_warmup"] = False
    hparams.update(overrides or {})
    return hparams


def _statistics_interval(name: str) -> str | None:
    """The hyperparameter ``--curvature-every`` sets for ``name`` (its config's
    ``statistics_interval``), None for a first-order optimizer."""
    config = OPTIMIZERS[name].config_class
    return None if config is None else config.statistics_interval


def build(
    name: str,
    model: nn.Module,
    curvature_every: int | None,
    inverse_every: int | None,
    overrides: Mapping[str, Any] | None = None,
):
    """The bench's optimizer ``name`` for ``model``, and whether backward needs a graph."""
    spec = OPTIMIZERS[name]
    hparams = resolve_hparams(name, curvature_every, inverse_every, overrides)
    return spec.build(model, **hparams), spec.create_graph


def _int_interval(value: Any, default: int = 1) -> int | None:
    """An interval hyperparameter as an int; None when it is a callable (a schedule)."""
    if value is None:
        return default
    if callable(value):
        return None
    return int(value)


def steady_state(
    records: list[dict[str, float]],
    first_step: int,
    curvature_every: int | None = 1,
    refresh_each: float | None = None,
    inverse_every: int | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Expected time per step of each stage (and ``iteration``) under the schedule.

    ``records[j]`` holds the seconds of every stage and of the whole ``iteration`` at
    step ``first_step + j``. Curvature steps (multiples of ``curvature_every``) and the
    others are averaged apart and weighted ``1/k``, ``1 - 1/k``. With ``refresh_each``
    (seconds of one refresh) and ``inverse_every``, the window's refresh time is taken out
    of ``refresh`` and ``iteration`` and ``refresh_each / inverse_every`` put back.
    Returns the means in ms and the warnings about the window.
    """
    keys = (*STAGES, "iteration")
    notes: list[str] = []
    rows = []
    for rec in records:
        row = {k: rec.get(k, 0.0) for k in keys}
        if refresh_each is not None:
            row["iteration"] -= row["refresh"]
            row["refresh"] = 0.0
        rows.append(row)

    def mean(group: list[dict[str, float]]) -> dict[str, float]:
        return {k: sum(r[k] for r in group) / len(group) for k in keys}

    k = curvature_every
    if k is None:
        notes.append("curvature interval is a schedule: plain mean over the window")
        out = mean(rows)
    elif k == 1:
        out = mean(rows)
    else:
        curv = [r for j, r in enumerate(rows) if (first_step + j) % k == 0]
        other = [r for j, r in enumerate(rows) if (first_step + j) % k != 0]
        if curv and other:
            mc, mo = mean(curv), mean(other)
            out = {key: mc[key] / k + mo[key] * (1 - 1 / k) for key in keys}
        else:
            out = mean(rows)
            missing = "curvature" if not curv else "non-curvature"
            notes.append(
                f"the measured window has no {missing} step (interval {k}): "
                f"plain mean, biased; use --steps >= {k}"
            )
    if refresh_each is not None and inverse_every:
        share = refresh_each / inverse_every
        out["refresh"] += share
        out["iteration"] += share
    return {key: value * 1e3 for key, value in out.items()}, notes


def measure(
    name: str,
    model: nn.Module,
    pool: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    warmup: int,
    device: str,
    curvature_every: int | None = None,
    inverse_every: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    notes: list[str] | None = None,
    method: str | None = None,
) -> dict[str, float]:
    """Steady-state ms per step of every stage (and ``iteration``) for optimizer ``name``
    (the bench's ``method``, where ``name`` is a ``--variant``'s label).

    Also returns ``refresh_ms_each`` (one refresh, ms; 0 where the method has no
    ``inverse_every``), ``refresh_amortised_over`` (that interval) and ``refresh_timing``
    (a key of :data:`REFRESH_TIMING`). Warnings about the window go to ``notes``.
    """
    base = method or name
    net = copy.deepcopy(model)
    opt, create_graph = build(base, net, curvature_every, inverse_every, overrides)
    timer = StageTimer(device)
    instrument(opt, timer)
    refresh_calls = [0]
    est = getattr(opt, "estimator", None)
    if est is not None:
        timed_refresh = est.refresh

        def counted(*args: Any, **kwargs: Any) -> Any:
            refresh_calls[0] += 1
            return timed_refresh(*args, **kwargs)

        est.refresh = counted
    records: list[dict[str, float]] = []
    for i in range(warmup + steps):
        before = dict(timer.totals)
        calls_before = refresh_calls[0]
        timer.sync()
        t0 = _now()
        opt.zero_grad()
        xb, yb = pool[i % len(pool)]
        with timer.section("forward"):
            loss = F.cross_entropy(net(xb), yb)
        graph = create_graph and getattr(opt, "needs_hessian", True)
        with timer.section("backward"):
            loss.backward(create_graph=graph)
        with timer.section("base"):
            opt.step()
        timer.sync()
        elapsed = _now() - t0
        if i >= warmup:
            rec = {s: timer.totals.get(s, 0.0) - before.get(s, 0.0) for s in STAGES}
            rec["iteration"] = elapsed
            rec["refresh_calls"] = refresh_calls[0] - calls_before
            records.append(rec)

    # the intervals the optimizer was built with (its own defaults where not given)
    key = _statistics_interval(base)
    every = _int_interval(getattr(opt.config, key, None)) if key else 1
    refresh_each, inv, timing = None, None, 0
    if "inverse_every" in OPTIMIZERS[base].hyperparameter_names() and est is not None:
        inv = _int_interval(opt.config.inverse_every)
        if inv is None:
            (notes if notes is not None else []).append(
                f"{name}: inverse_every is a schedule; refresh not amortised"
            )
        else:
            calls = sum(r["refresh_calls"] for r in records)
            if calls:
                refresh_each = sum(r["refresh"] for r in records) / calls
                timing = 1
            else:  # none in the window: time one now, on the run's statistics
                damping = opt.current_damping() if hasattr(opt, "current_damping") else 1e-3
                spent = timer.totals.get("refresh", 0.0)
                est.refresh(damping)
                refresh_each = timer.totals["refresh"] - spent
                timing = 2
    means, window_notes = steady_state(
        records, warmup, every, refresh_each, inv if refresh_each is not None else None
    )
    if notes is not None:
        notes.extend(f"{name}: {n}" for n in window_notes)
    means["refresh_ms_each"] = (refresh_each or 0.0) * 1e3
    means["refresh_amortised_over"] = float(inv or 0) if refresh_each is not None else 0.0
    means["refresh_timing"] = float(timing)
    return means


def warm_up_process(
    model: nn.Module, pool: list[tuple[torch.Tensor, torch.Tensor]], steps: int, device: str
) -> None:
    """``steps`` (at least 2) untimed SGD steps on a copy of ``model``."""
    net = copy.deepcopy(model)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    for i in range(max(2, steps)):
        opt.zero_grad()
        xb, yb = pool[i % len(pool)]
        F.cross_entropy(net(xb), yb).backward()
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()


def _loadavg() -> str:
    """The 1-minute load average (other processes on the machine skew the timings)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def _ratio(value: float, base: float | None, fmt: str) -> str:
    return format(value / base, fmt) if base else ""


def table_rows(task: str, results: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One CSV row per (method, stage), ``iteration`` last for each method."""
    sgd = results.get("sgd", {}).get("iteration")
    adam = results.get("adam", {}).get("iteration")
    rows = []
    for name, means in results.items():
        total = means["iteration"]
        over = int(means.get("refresh_amortised_over", 0))
        timing = REFRESH_TIMING[int(means.get("refresh_timing", 0))]
        for stage in (*STAGES, "iteration"):
            rows.append(
                {
                    "task": task,
                    "method": name,
                    "stage": stage,
                    "ms_per_step": f"{means[stage]:.5f}",
                    "share": f"{means[stage] / total:.4f}" if total > 0 else "",
                    "iteration_vs_sgd": _ratio(total, sgd, ".4f"),
                    "iteration_vs_adam": _ratio(total, adam, ".4f"),
                    "refresh_ms_each": f"{means['refresh_ms_each']:.3f}" if over else "",
                    "refresh_amortised_over": str(over) if over else "",
                    "refresh_timing": timing,
                }
            )
    return rows


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Methods as rows, stages as columns (ms per step), then the ratios to SGD and Adam."""
    columns = (*STAGES, "iteration")
    width = max(10, *(len(n) for n in results))
    lines = [
        f"{'method':<{width}}"
        + "".join(f"{c:>13}" for c in columns)
        + f"{'vs sgd':>9}{'vs adam':>9}"
    ]
    sgd = results.get("sgd", {}).get("iteration")
    adam = results.get("adam", {}).get("iteration")
    for name, means in results.items():
        ratios = "".join(
            f"{means['iteration'] / base:8.2f}x" if base else f"{'-':>9}" for base in (sgd, adam)
        )
        lines.append(f"{name:<{width}}" + "".join(f"{means[c]:13.3f}" for c in columns) + ratios)
    return "\n".join(lines)


def format_refreshes(results: dict[str, dict[str, float]]) -> list[str]:
    """One line per method whose refresh was amortised: how it was timed."""
    lines = []
    for name, means in results.items():
        over = int(means.get("refresh_amortised_over", 0))
        if not over:
            continue
        how = {
            1: "mean of the refreshes in the measured window",
            2: "one refresh timed separately after the run (none in the window)",
        }[int(means["refresh_timing"])]
        lines.append(
            f"{name}: one refresh {means['refresh_ms_each']:.1f} ms ({how}), amortised "
            f"over inverse_every={over}: {means['refresh']:.1f} ms per step"
        )
    return lines


def parse_methods(text: str, extra: tuple[str, ...] = ()) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS and n not in extra]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}"
        )
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--opt", default=",".join(METHODS), help=f"({','.join(METHODS)}, or a --variant)"
    )
    parser.add_argument(
        "--variant",
        dest="variants",
        action="append",
        default=[],
        metavar="LABEL=NAME",
        help="method NAME again under LABEL, for its own --set LABEL.KEY=VALUE (repeatable)",
    )
    parser.add_argument("--task", default="digits-mlp", choices=TASKS)
    parser.add_argument(
        "--batch", type=int, default=None, help="default 64 (digits), 128 (resnet18)"
    )
    parser.add_argument("--steps", type=int, default=100, help="measured steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument(
        "--curvature-every",
        type=int,
        default=None,
        help="override the bench's curvature_every (AdaHessian: hessian_every)",
    )
    parser.add_argument(
        "--inverse-every", type=int, default=None, help="override inverse_every (K-FAC family)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="one method's hyperparameter, e.g. mfac.curvature_every=1 (repeatable; wins "
        "over --curvature-every / --inverse-every)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the methods this many times in turn; each keeps its fastest round",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall time, or the process's CPU time (a CPU shared with other jobs)",
    )
    parser.add_argument("--csv", default=None, help="write one row per (method, stage) here")
    return parser


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the breakdown; returns ``{method: {stage: ms per step, "iteration": ms, ...}}``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        raise SystemExit("--steps and --rounds must be >= 1 and --warmup >= 0")
    variants: dict[str, str] = {}
    for item in args.variants:
        label, _, base = item.partition("=")
        if not label or base not in METHODS or label in METHODS:
            parser.error(
                f"--variant {item!r}: want LABEL=NAME with NAME one of {', '.join(METHODS)} "
                "and LABEL not a method's name"
            )
        variants[label] = base
    try:
        args.opt = parse_methods(args.opt, tuple(variants))
        overrides = parse_overrides(args.overrides, known=(*METHODS, *variants))
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu times the CPU only; use the wall clock on CUDA")
    CPU_CLOCK[0] = args.clock == "cpu"
    start = time.perf_counter()
    batch = args.batch or (64 if args.task.startswith("digits") else 128)
    torch.manual_seed(args.seed)
    model, x, classes = make_task(args.task, batch, args.device)
    # A pool of batches with random labels: on one fixed batch K-FAC drives the loss to
    # ~1e-7 within a few hundred steps, and the denormal gradients that follow slow the
    # CPU's backward pass several-fold, which would be blamed on the optimizer.
    pool = [
        (x[torch.randperm(len(x))], torch.randint(0, classes, (batch,), device=args.device))
        for _ in range(8)
    ]
    # The first training steps of the process pay one-off costs (oneDNN primitives, the
    # allocator's growth) that would land on whichever method runs first: pay them here.
    warm_up_process(model, pool, args.warmup, args.device)
    results: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    load_before = _loadavg()
    for r in range(args.rounds):
        for name in args.opt:
            torch.manual_seed(args.seed)
            round_notes: list[str] = []
            with warnings.catch_warnings():
                # AdaHessian's backward(create_graph=True); its step() breaks the cycle
                warnings.filterwarnings("ignore", message="Using backward.. with create_graph=True")
                means = measure(
                    name,
                    model,
                    pool,
                    steps=args.steps,
                    warmup=args.warmup,
                    device=args.device,
                    curvature_every=args.curvature_every,
                    inverse_every=args.inverse_every,
                    overrides=overrides.get(name),
                    notes=round_notes,
                    method=variants.get(name, name),
                )
            if r == 0:
                notes.extend(round_notes)
            if name not in results or means["iteration"] < results[name]["iteration"]:
                results[name] = means  # the fastest round: the least disturbed
            print(
                f"  {name}"
                + (f" (round {r + 1})" if args.rounds > 1 else "")
                + f": {means['iteration']:.3f} ms per step "
                f"({time.perf_counter() - start:.0f} s so far)",
                flush=True,
            )

    print(
        f"{args.task}, batch {batch}, {args.steps} steps (+{args.warmup} warm-up), "
        f"{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}: "
        "ms per step, steady state (backward excludes capture)"
        + (f", fastest of {args.rounds} rounds" if args.rounds > 1 else "")
        + (", CPU time" if args.clock == "cpu" else "")
        + f"; load average {load_before} before, {_loadavg()} after"
    )
    print(format_table(results))
    for line in format_refreshes(results) + notes:
        print(line)
    print(f"wall time {time.perf_counter() - start:.1f} s")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(table_rows(args.task, results))
    return results


if __name__ == "__main__":
    main()
