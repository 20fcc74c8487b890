"""Command line of the curvature analysis: ``python -m secondorder.analysis --help``."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._cli import as_type, positive_float, positive_int
from ..bench.optimizers import OPTIMIZERS, parse_override
from ..bench.runner import resolve_optimizers, resolve_task
from ..bench.tasks import TASKS, set_data_dir
from .pipeline import DEFAULT_GRID, DEFAULT_OPTIMIZERS, DEFAULT_TASK, DIRECTIONS, run_analysis

#: CPU seconds (user + system) of the default run on one thread, measured on a 2-core AMD
#: EPYC with torch 2.14.1: 41.4 and 39.3 s, wall 63 and 57 s at a load average of 4 (the
#: float32 version before it, run in turns with these: 45.7 and 43.1 s, wall 68 and 63 s).
#: That is the wall time on an idle machine; a busy one stretches it (the float32 version took
#: 134 s at a load average of 6 to 8).
DEFAULT_RUN_CPU_S = 40

_DESCRIPTION = (
    "Train a bench task's model with several optimizers from the same initial weights on the "
    "same mini-batches, in float64 so that the figures are the same on every CPU (recording the "
    "weights), then at each run's final weights (and at the initial weights) compute the K-FAC "
    "factors A and G of every layer by a fresh factor pass over a few fixed batches (float64 "
    "statistics, no training, no moving average) and report their eigenvalue range, condition "
    "number, Gershgorin disc interval, diagonal dominance ||diag M||^2/||M||^2 (1 for a "
    "diagonal matrix: the premise of AdaFisher's diagonal Fisher) and FFT magnitude; check "
    "that AdaFisher's diagonals of the same batches are the factors' diagonals; and draw the "
    "loss on a plane around one run's final weights with every trajectory on it. Writes "
    "summary.json and PNGs (per run: <opt>_heatmaps, <opt>_spectra, <opt>_gershgorin, "
    "<opt>_frequency; dominance.png, landscape.png) into "
    f"--out. The defaults take about {DEFAULT_RUN_CPU_S} s of CPU time on one thread (a 2-core "
    "AMD EPYC): that long on an idle machine, longer beside other jobs (60 s at a load average "
    "of 4 on 2 cores)."
)

_EPILOG = """\
examples:
  python -m secondorder.analysis
  python -m secondorder.analysis --task digits-cnn --opt kfac,adafisher --out analysis
  python -m secondorder.analysis --opt sgd,kfac --directions random --span 0.5 --grid 31
  python -m secondorder.analysis --task digits-mlp --epochs 5 --set kfac.damping=1e-2
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m secondorder.analysis`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m secondorder.analysis",
        description=textwrap.fill(_DESCRIPTION, width=90, break_on_hyphens=False),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--task",
        type=as_type(lambda name: resolve_task(name).name),
        default=DEFAULT_TASK,
        metavar="NAME",
        help=f"a bench task: {', '.join(TASKS)} (default: {DEFAULT_TASK})",
    )
    parser.add_argument(
        "--opt",
        type=as_type(resolve_optimizers),
        default=list(DEFAULT_OPTIMIZERS),
        metavar="NAMES",
        help=f"comma-separated bench optimizers, any of {', '.join(OPTIMIZERS)}, with the "
        f"bench's default hyperparameters (default: {','.join(DEFAULT_OPTIMIZERS)})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        type=as_type(parse_override),
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="override one optimizer hyperparameter, as in the bench (e.g. kfac.damping=0.01); "
        "repeatable",
    )
    parser.add_argument(
        "--epochs",
        type=as_type(positive_int),
        metavar="N",
        help="training epochs of every run (default: the task's, 20 for the digits tasks)",
    )
    parser.add_argument(
        "--batch-size",
        type=as_type(positive_int),
        metavar="B",
        help="mini-batch size of training and of the factor batches (default: the task's, 64)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="initial weights, batch order, factor batches, random directions (default: 0)",
    )
    parser.add_argument(
        "--init",
        type=Path,
        metavar="CKPT",
        help="start every run from this checkpoint's weights (a state_dict of the task's model "
        "or a secondorder.prune checkpoint), as the bench's --init (default: seeded weights)",
    )
    parser.add_argument(
        "--record-every",
        type=as_type(positive_int),
        default=5,
        metavar="K",
        help="record the weights every K steps for the trajectories (default: 5)",
    )
    parser.add_argument(
        "--factor-batches",
        type=as_type(positive_int),
        default=8,
        metavar="N",
        help="batches of the fresh factor passes: a fixed seeded draw of N batches of the "
        "training set, the same for every run (default: 8)",
    )
    parser.add_argument(
        "--max-dim",
        type=as_type(positive_int),
        default=1024,
        metavar="D",
        help="leave factors larger than D x D out of the figures and pictures, listed as "
        "'skipped' in summary.json (default: 1024)",
    )
    parser.add_argument(
        "--directions",
        choices=DIRECTIONS,
        default="pca",
        help="the landscape's plane: 'pca', the top two principal directions of all recorded "
        "weights minus the centre (the trajectories lie close to it); or 'random', two "
        "filter-normalised Gaussian directions (Li et al. 2018; biases fixed), onto which the "
        "trajectories are projected by least squares (default: pca)",
    )
    parser.add_argument(
        "--center",
        metavar="NAME",
        help="the run whose final weights are the landscape's centre (default: the first of --opt)",
    )
    parser.add_argument(
        "--grid",
        type=as_type(positive_int),
        default=DEFAULT_GRID,
        metavar="N",
        help=f"landscape grid points per axis, >= 2 (default: {DEFAULT_GRID})",
    )
    parser.add_argument(
        "--span",
        type=as_type(positive_float),
        default=1.0,
        metavar="S",
        help="random directions: the grid covers [-S, S]^2; pca: the extent of the projected "
        "trajectories plus 15%% is multiplied by S (default: 1)",
    )
    parser.add_argument(
        "--landscape-examples",
        type=as_type(positive_int),
        default=2048,
        metavar="N",
        help="training examples the landscape's loss averages over, the first N (default: 2048)",
    )
    parser.add_argument(
        "--no-landscape", action="store_true", help="skip the loss landscape (and its picture)"
    )
    parser.add_argument(
        "--no-pictures", action="store_true", help="write summary.json only, no PNGs"
    )
    parser.add_argument(
        "--dpi",
        type=as_type(positive_int),
        default=80,
        help="resolution of the PNGs (default: 80)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="data folder of the tasks that need one, as in the bench (default: "
        "$SECONDORDER_DATA or ./data)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="output folder (default: analysis-results/<timestamp>)",
    )
    parser.add_argument(
        "--threads",
        type=as_type(positive_int),
        default=1,
        metavar="T",
        help="torch threads (default: 1: the digits models are small, and on a 2-core machine "
        "shared with other jobs the default run took 247 s with 2 threads at a load average of "
        "6, 57-63 s with 1 at a load of 4; the numbers printed are the same)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _default_out() -> Path:
    base = Path("analysis-results") / time.strftime("%Y%m%d-%H%M%S")
    out, n = base, 1
    while out.exists():
        out, n = base.with_name(f"{base.name}-{n}"), n + 1
    return out


def _condition_cell(figures: dict[str, Any]) -> str:
    """The condition number to three digits, or ``singular`` where the factor's numerical rank
    (eigenvalues above ``dim · eps · λ_max``) is below its size: its ``λ_min`` is rounding
    noise, and so would be the digits of ``λ_max / λ_min``."""
    cond = figures["condition_number"]
    if cond is None or figures["rank"] < figures["dim"]:
        return f"{'singular':>9}"
    return f"{cond:9.3g}"


def _print_summary(summary: dict[str, Any]) -> None:
    runs = summary["runs"]
    print("diagonal dominance ||diag M||^2/||M||^2 and condition number of A and G per layer")
    print(
        f"{'run':<12} {'layer':<8} {'dom A':>7} {'dom G':>7} {'dom AxG':>8} "
        f"{'cond A':>9} {'cond G':>9}"
    )
    for run, entry in runs.items():
        for layer, figures in entry["layers"].items():
            cells = [_condition_cell(figures[k]) for k in ("A", "G")]
            print(
                f"{run:<12} {layer:<8} {figures['A']['diagonal_dominance']:7.3f} "
                f"{figures['G']['diagonal_dominance']:7.3f} {figures['kron_dominance']:8.3f} "
                f"{cells[0]} {cells[1]}"
            )
    landscape = summary.get("landscape")
    if landscape:
        print(
            f"landscape ({landscape['directions']}, centre {landscape['center']}): loss "
            f"{landscape['loss_min']:.4g} to {landscape['loss_max']:.4g}, at the centre "
            f"{landscape['loss_at_center']:.4g}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data is not None:
        set_data_dir(args.data)
    overrides: dict[str, dict[str, Any]] = {}
    for name, key, value in args.overrides:
        overrides.setdefault(name, {})[key] = value
    out = args.out if args.out is not None else _default_out()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        summary = run_analysis(
            args.opt,
            args.task,
            out=out,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            overrides=overrides,
            init=args.init,
            record_every=args.record_every,
            factor_batches=args.factor_batches,
            directions=args.directions,
            center=args.center,
            grid=args.grid,
            span=args.span,
            landscape_examples=args.landscape_examples,
            max_dim=args.max_dim,
            landscape=not args.no_landscape,
            pictures=not args.no_pictures,
            dpi=args.dpi,
            quiet=args.quiet,
        )
    except ValueError as exc:
        parser.error(" ".join(str(exc).split()))
    finally:
        torch.set_num_threads(previous_threads)
    _print_summary(summary)
    print(
        f"\nwall time {time.perf_counter() - started:.1f} s; wrote {out / 'summary.json'} and "
        f"{len(summary['files'])} PNGs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
