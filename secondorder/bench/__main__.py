"""Command line of the benchmark: ``python -m secondorder.bench --help``."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._cli import as_type, finite_float, positive_int
from . import run_bench
from .config import format_grid_table, load_experiment, run_experiment
from .optimizers import OPTIMIZERS, parse_override
from .report import format_table
from .runner import parse_epoch_ranges, resolve_optimizers, resolve_task
from .tasks import DEFAULT_TASK, TASKS, DataNotFoundError, set_data_dir


def _catalogue() -> str:
    tasks = "\n".join(
        f"  {name:<12} {task.description}" + ("  [default]" if name == DEFAULT_TASK else "")
        for name, task in TASKS.items()
    )
    indent = " " * 15
    opts = "\n".join(
        f"  {name:<12} {spec.description}\n"
        + textwrap.fill(
            "defaults: " + ", ".join(f"{k}={v}" for k, v in spec.defaults.items()),
            width=90,
            initial_indent=indent,
            subsequent_indent=indent + "  ",
        )
        for name, spec in OPTIMIZERS.items()
    )
    return (
        f"tasks:\n{tasks}\n\noptimizers:\n{opts}\n\n"
        "examples:\n"
        "  python -m secondorder.bench\n"
        "  python -m secondorder.bench --opt sgd,kfac --task digits-cnn --epochs 10\n"
        "  python -m secondorder.bench --opt kfac --set kfac.damping=1e-2 --set kfac.lr=0.1\n"
        "  python -m secondorder.bench --config configs/mfac_window_grid.yaml --epochs 1\n"
        "  python -m secondorder.bench --opt sgd,kfac --curvature-epochs 5: --init ckpt.pt\n"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m secondorder.bench`` argument parser."""
    default_task = TASKS[DEFAULT_TASK]
    parser = argparse.ArgumentParser(
        prog="python -m secondorder.bench",
        description=textwrap.fill(
            "Train one model with several optimizers from the same initial weights on the same "
            "mini-batches, then print a table (final train loss, test accuracy, step and "
            "iteration time, overhead vs sgd, steps to the target loss, peak memory, optimizer "
            "state size) and write results.json, results.csv, loss_vs_step.png and "
            "loss_vs_time.png. With --config, run an experiment file (seeds, a hyperparameter "
            "grid, optimizer presets) and write grid.json and grid.csv (mean and std over seeds).",
            width=90,
            break_on_hyphens=False,
        ),
        epilog=_catalogue(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--opt",
        type=as_type(resolve_optimizers),
        default=None,
        metavar="NAMES",
        help=f"comma-separated optimizers to run, in order (default: {','.join(OPTIMIZERS)})",
    )
    parser.add_argument(
        "--task",
        type=as_type(lambda name: resolve_task(name).name),
        default=None,
        metavar="NAME",
        help=f"one of {', '.join(TASKS)} (default: the --config file's, else {DEFAULT_TASK}: "
        f"{default_task.description})",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder with the real tasks' data (CIFAR-10/100 in torchvision's layout, "
        "MNIST/raw, input.txt for char-gpt); never downloaded "
        "(default: $SECONDORDER_DATA or ./data)",
    )
    parser.add_argument(
        "--epochs",
        type=as_type(positive_int),
        metavar="N",
        help=f"passes over the training set (default: the --config file's, else the task's; "
        f"{default_task.epochs} for {DEFAULT_TASK})",
    )
    parser.add_argument(
        "--batch-size",
        type=as_type(positive_int),
        metavar="B",
        help=f"mini-batch size (default: the --config file's, else the task's; "
        f"{default_task.batch_size} for {DEFAULT_TASK})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the initial weights and of the batch order, shared by all optimizers "
        "(default: 0; not with --config, whose seeds: list sets them)",
    )
    parser.add_argument(
        "--target",
        type=as_type(finite_float),
        metavar="LOSS",
        help="train loss whose first step and epoch are reported in the 'to target' column "
        f"(default: the --config file's, else the task's; {default_task.target} for "
        f"{DEFAULT_TASK}; none for tasks without one)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE.yaml",
        help="run an experiment file: task, epochs, seeds, optimizers, presets (optimizer "
        "preset files, e.g. configs/optimizers/mfac.yaml), set (fixed NAME.KEY: value) and grid "
        "(NAME.KEY: [values], one row per combination); writes grid.json and grid.csv. "
        "--task, --epochs, --batch-size and --target given here override the file's; --opt, "
        "--set and --seed cannot be combined with it. See configs/ for examples",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        type=as_type(parse_override),
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="override one hyperparameter, e.g. kfac.lr=0.1 or kfac.kl_clip=none; repeatable. "
        "VALUE is read as int, float, true/false, none, a Python literal when it starts with "
        '[, ( or { (e.g. \'{"conv_positions": "reduce"}\'), else a string; a KEY the optimizer '
        "does not take reaches its constructor, which rejects it; NAME must be among --opt",
    )
    parser.add_argument(
        "--init",
        type=Path,
        metavar="CKPT",
        help="start every run from the weights in this checkpoint instead of the seeded initial "
        "weights: a torch.save'd state_dict of the task's model, or a secondorder.prune "
        "checkpoint ({'model': state_dict, 'masks': ...}; the masks are not applied). A "
        "checkpoint that does not fit the model is an error naming the keys and shapes",
    )
    parser.add_argument(
        "--curvature-epochs",
        type=as_type(parse_epoch_ranges),
        metavar="RANGES",
        help="epochs in which the optimizers with curvature (kfac, ekfac, twolevel, mfac, "
        "adam-mfac, adafisher, adafisherw) use it, as comma-separated START:STOP ranges, 0-based "
        "with STOP exclusive like Python slices, either end may be empty: '0:5' the first five "
        "epochs, '5:' from the sixth on, '0:2,6:' two ranges. Outside them they take their "
        "first-order base update on the raw gradient (AdaFisher: F̃ = 1 + λ) "
        "and record no statistics (CurvatureOptimizer.use_curvature, in steps: epoch e is "
        "steps [e*S, (e+1)*S) with S steps per epoch). Default: every epoch",
    )
    parser.add_argument(
        "--record-every",
        type=as_type(positive_int),
        metavar="K",
        help="record each run's flattened weights before training, every K steps and after the "
        "last step, saved to trajectories.pt (for loss-landscape pictures, see python -m "
        "secondorder.analysis); costs 4 bytes x parameters per record (default: off)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="folder for results.json, results.csv and the two loss plots, or with --config "
        "for grid.json, grid.csv and runs/<row>/seed<N>/results.json "
        "(default: bench-results/<timestamp>)",
    )
    parser.add_argument(
        "--threads",
        type=as_type(positive_int),
        metavar="T",
        help="torch.set_num_threads for every run (default: torch's own choice)",
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where to train (default: cpu)"
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress on stderr (a line as each optimizer's run starts and ends, and its "
        "bar, or a line per epoch where stderr is not a terminal); the table is still printed",
    )
    parser.add_argument(
        "--no-isolate",
        dest="isolate",
        action="store_false",
        help="run every optimizer in this process instead of one spawned subprocess each: "
        "starts faster, but the peak-RSS figure of later runs is less trustworthy",
    )
    return parser


def _default_out() -> Path:
    base = Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    out, n = base, 1
    while out.exists():
        out, n = base.with_name(f"{base.name}-{n}"), n + 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (1 if any optimizer's run failed, 2 if the task's
    data is missing)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data is not None:
        set_data_dir(args.data)
    try:
        if args.config is not None:
            return _main_config(parser, args)
        return _main_bench(parser, args)
    except DataNotFoundError as exc:
        # One line, without the usage: the fix is in the message (where the files go, --data).
        print(f"{parser.prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def _main_bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    overrides: dict[str, dict[str, Any]] = {}
    for name, key, value in args.overrides:
        overrides.setdefault(name, {})[key] = value
    out = args.out if args.out is not None else _default_out()

    started = time.perf_counter()
    try:
        results = run_bench(
            args.opt if args.opt is not None else list(OPTIMIZERS),
            args.task or DEFAULT_TASK,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed or 0,
            target=args.target,
            overrides=overrides,
            out=out,
            threads=args.threads,
            device=args.device,
            quiet=args.quiet,
            isolate=args.isolate,
            init=args.init,
            curvature_epochs=args.curvature_epochs,
            record_every=args.record_every,
        )
    except ValueError as exc:
        parser.error(" ".join(str(exc).split()))
    wall = time.perf_counter() - started

    print(format_table(results))
    plots = [out / f"loss_vs_{x}.png" for x in ("step", "time")]
    written = [out / "results.json", out / "results.csv", *(p for p in plots if p.exists())]
    print(f"\nwall time {wall:.1f} s; wrote {', '.join(map(str, written))}")
    failed = [name for name, run in results["results"].items() if run["summary"].get("error")]
    return 1 if failed else 0


def _main_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    clashing = [
        flag
        for flag, value in (
            ("--opt", args.opt),
            ("--set", args.overrides or None),
            ("--seed", args.seed),
            ("--init", args.init),
            ("--curvature-epochs", args.curvature_epochs),
            ("--record-every", args.record_every),
        )
        if value is not None
    ]
    if clashing:
        parser.error(f"{', '.join(clashing)} cannot be combined with --config (set it in the file)")
    out = args.out if args.out is not None else _default_out()
    started = time.perf_counter()
    try:
        grid = run_experiment(
            load_experiment(args.config),
            task=args.task,
            epochs=args.epochs,
            batch_size=args.batch_size,
            target=args.target,
            out=out,
            threads=args.threads,
            device=args.device,
            quiet=args.quiet,
            isolate=args.isolate,
        )
    except ValueError as exc:
        parser.error(" ".join(str(exc).split()))
    wall = time.perf_counter() - started
    print(format_grid_table(grid))
    print(f"\nwall time {wall:.1f} s; wrote {out / 'grid.json'} and {out / 'grid.csv'}")
    return 1 if any(row["n_failed"] for row in grid["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
