"""Where each optimizer's step time goes, stage by stage.

Trains a few steps with every method and times, per iteration:

    forward       the model's forward pass and the loss
    backward      loss.backward(), less the capture time spent inside it
    capture       the capture hooks' statistics (the estimator's accumulate callback)
    update        estimator.update (factor / statistics update)
    refresh       estimator.refresh (eigendecompositions / inverses / Cholesky)
    precondition  estimator.precondition
    hutchinson    AdaHessian's Hessian-diagonal estimate (its ``_estimate``: the
                  Hutchinson Hessian-vector products)
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
    python benchmarks/step_breakdown.py --task resnet18 --opt sgd,adam --steps 20  # slow on CPU

Hyperparameters are the benchmark's (``secondorder.bench.optimizers.OPTIMIZERS``, as in
``python -m secondorder.bench``); ``--curvature-every`` / ``--inverse-every`` override them
where a method has them. Prints a table (ms per step, the mean over the measured steps;
update and refresh are amortised over all of them) and, with ``--csv``, writes one row per
(method, stage): ms per step, share of the iteration, and the method's iteration time over
SGD's (blank when SGD was not run). The ``iteration`` row is the wall time of the whole
training iteration (zero_grad to the end of step()), measured on its own.
"""

from __future__ import annotations

import argparse
import copy
import csv
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from secondorder import CurvatureOptimizer
from secondorder.bench.optimizers import OPTIMIZERS

METHODS = (
    "sgd",
    "adam",
    "kfac",
    "ekfac",
    "twolevel",
    "mfac",
    "adam-mfac",
    "adafisher",
    "adafisherw",
    "adahessian",
)
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
TASKS = ("digits-mlp", "digits-cnn", "resnet18")
#: the interval option ``--curvature-every`` sets, per method
_CURVATURE_KEY = {
    **dict.fromkeys(
        ("kfac", "ekfac", "twolevel", "mfac", "adam-mfac", "adafisher", "adafisherw"),
        "curvature_every",
    ),
    "adahessian": "hessian_every",
}
_HAS_INVERSE_EVERY = ("kfac", "ekfac", "twolevel")
CSV_FIELDS = ("task", "method", "stage", "ms_per_step", "share", "iteration_vs_sgd")


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
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            elapsed = time.perf_counter() - start
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
            setattr(est, stage, timer.wrap(getattr(est, stage), stage))
        if opt.capture is not None:
            opt.capture.accumulate = timer.wrap(opt.capture.accumulate, "capture")
    elif hasattr(opt, "_estimate"):  # AdaHessian: the Hutchinson estimate
        opt._estimate = timer.wrap(opt._estimate, "hutchinson")


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
        import timm

        model = timm.create_model("resnet18", num_classes=10, pretrained=False)
        x = torch.randn(batch, 3, 32, 32)
    else:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    return model.to(device), x.to(device), 10


def build(name: str, model: nn.Module, curvature_every: int | None, inverse_every: int | None):
    """The bench's optimizer ``name`` for ``model``, and whether backward needs a graph."""
    spec = OPTIMIZERS[name]
    hparams = spec.hparams()
    if curvature_every is not None and name in _CURVATURE_KEY:
        hparams[_CURVATURE_KEY[name]] = curvature_every
    if inverse_every is not None and name in _HAS_INVERSE_EVERY:
        hparams["inverse_every"] = inverse_every
    return spec.build(model, **hparams), spec.create_graph


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
) -> dict[str, float]:
    """Mean ms per step of every stage (and ``iteration``) for optimizer ``name``."""
    net = copy.deepcopy(model)
    opt, create_graph = build(name, net, curvature_every, inverse_every)
    timer = StageTimer(device)
    instrument(opt, timer)
    iteration = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            timer.reset()
            iteration = 0.0
        timer.sync()
        t0 = time.perf_counter()
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
        iteration += time.perf_counter() - t0
    means = {stage: timer.totals.get(stage, 0.0) / steps * 1e3 for stage in STAGES}
    means["iteration"] = iteration / steps * 1e3
    return means


def table_rows(task: str, results: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One CSV row per (method, stage), ``iteration`` last for each method."""
    sgd = results.get("sgd", {}).get("iteration")
    rows = []
    for name, means in results.items():
        total = means["iteration"]
        ratio = f"{total / sgd:.4f}" if sgd else ""
        for stage in (*STAGES, "iteration"):
            rows.append(
                {
                    "task": task,
                    "method": name,
                    "stage": stage,
                    "ms_per_step": f"{means[stage]:.5f}",
                    "share": f"{means[stage] / total:.4f}" if total > 0 else "",
                    "iteration_vs_sgd": ratio,
                }
            )
    return rows


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Methods as rows, stages as columns (ms per step)."""
    columns = (*STAGES, "iteration")
    width = max(10, *(len(n) for n in results))
    lines = [f"{'method':<{width}}" + "".join(f"{c:>13}" for c in columns) + f"{'vs sgd':>9}"]
    sgd = results.get("sgd", {}).get("iteration")
    for name, means in results.items():
        ratio = f"{means['iteration'] / sgd:8.2f}x" if sgd else f"{'-':>9}"
        lines.append(f"{name:<{width}}" + "".join(f"{means[c]:13.3f}" for c in columns) + ratio)
    return "\n".join(lines)


def parse_methods(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
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
        "--opt", type=parse_methods, default=list(METHODS), help=f"({','.join(METHODS)})"
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
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default=None, help="write one row per (method, stage) here")
    return parser


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the breakdown; returns ``{method: {stage: ms per step, "iteration": ms}}``."""
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (128 if args.task == "resnet18" else 64)
    torch.manual_seed(args.seed)
    model, x, classes = make_task(args.task, batch, args.device)
    # A pool of batches with random labels: on one fixed batch K-FAC drives the loss to
    # ~1e-7 within a few hundred steps, and the denormal gradients that follow slow the
    # CPU's backward pass several-fold, which would be blamed on the optimizer.
    pool = [
        (x[torch.randperm(len(x))], torch.randint(0, classes, (batch,), device=args.device))
        for _ in range(8)
    ]
    results: dict[str, dict[str, float]] = {}
    for name in args.opt:
        torch.manual_seed(args.seed)
        with warnings.catch_warnings():
            # AdaHessian's backward(create_graph=True); its step() breaks the cycle
            warnings.filterwarnings("ignore", message="Using backward.. with create_graph=True")
            results[name] = measure(
                name,
                model,
                pool,
                steps=args.steps,
                warmup=args.warmup,
                device=args.device,
                curvature_every=args.curvature_every,
                inverse_every=args.inverse_every,
            )

    print(
        f"{args.task}, batch {batch}, {args.steps} steps (+{args.warmup} warm-up), "
        f"{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}: "
        "ms per step (backward excludes capture)"
    )
    print(format_table(results))
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(table_rows(args.task, results))
    return results


if __name__ == "__main__":
    main()
