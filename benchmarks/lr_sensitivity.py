"""Learning-rate sensitivity of every optimizer at its library defaults (issue 18).

Each optimizer is built with only ``lr`` set (``KFAC(model, lr=lr)``, ``torch.optim.Adam(params,
lr=lr)``; SGD gets ``momentum=0.9`` as the usual baseline), not with the bench's tuned defaults of
:mod:`secondorder.bench.optimizers`, and trained over a log grid of learning rates on every
offline bench task, for a few seeds. The training is the bench's own
(:func:`secondorder.bench.runner.train`: same models, data, batch order, AdaHessian's
``create_graph``), in this process, one thread by default.

Per task the report gives, for each optimizer, the learning rates at which every seed reaches
the task's target train loss, and the best final train loss (mean over seeds, at its best lr).
"Reaches the target" is the bench's definition (:func:`secondorder.bench.report.steps_to_target`):
the trailing mean of the last 10 mini-batch losses is at most the target at some step. The
digits classifiers have a target in the bench (:attr:`Task.target`); the others get one here
(:data:`TARGETS`, with how it was chosen).

    python benchmarks/lr_sensitivity.py --out lr-sens
    python benchmarks/lr_sensitivity.py --opt adam,kfac --set kfac.adaptive_damping=true --out x
    python benchmarks/lr_sensitivity.py --smoke --out /tmp/smoke

Writes ``results.json`` (one record per task, optimizer, lr and seed, with its wall time),
``table.md`` and ``heatmap.png`` (optimizer x lr per task; colour: mean final train loss,
text: seeds reaching the target) into ``--out``. Extra keywords for an optimizer
(``--set kfac.damping=0.01``) go to its constructor as they are, so a key it does not take
stops the script before anything trains, with the constructor's own message.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from secondorder._cli import as_type, positive_int
from secondorder.bench.optimizers import OPTIMIZERS, parse_overrides
from secondorder.bench.report import machine_info, steps_to_target
from secondorder.bench.runner import RunConfig, resolve_optimizers, resolve_task, train
from secondorder.bench.tasks import Task

DEFAULT_OPTS = (
    "sgd",
    "adam",
    "kfac",
    "ekfac",
    "twolevel",
    "mfac",
    "adafisher",
    "adafisherw",
    "adahessian",
)
DEFAULT_LRS = (0.3, 0.1, 0.03, 0.01, 0.003, 0.001)

# Epochs per task, kept small so that the default run (9 optimizers x 6 lrs x 3 seeds on the
# six tasks) fits well inside an hour on a 2-core CPU; see benchmarks/RESULTS.md for the time.
EPOCHS = {
    "digits-mlp": 10,
    "digits-cnn": 10,
    "digits-ae": 10,
    "toy-regression": 10,
    "toy-classification": 10,
    "char-gpt-generated": 6,
}
DEFAULT_TASKS = tuple(EPOCHS)

# Target train losses of the tasks the bench gives none, chosen once from a calibration run of
# sgd and adam over DEFAULT_LRS (seed 0, the epochs above; lowest final train loss in brackets):
# about 1.5x the lowest final train loss either reached, rounded, so that the best first-order
# settings reach it with some margin and a poor lr does not: toy-regression 0.05 (0.035, adam
# 0.03), toy-classification 0.35 (0.22, adam 0.03), char-gpt-generated 1.0 nats/char (0.60,
# adam 0.01; the unigram entropy is 3.0). digits-ae's cross-entropy has a floor (the pixels are
# grey levels, not bits) and a plateau at 0.42-0.43 that 10 of the 12 settings ended on
# (reconstructing about the mean digit); 0.4 asks for leaving it (adam 0.03 reached 0.34).
TARGETS = {
    "digits-ae": 0.4,
    "toy-regression": 0.05,
    "toy-classification": 0.35,
    "char-gpt-generated": 1.0,
}

# What each optimizer gets besides lr: nothing, except the baselines' usual settings and the
# registry entries that are a mode of another class.
BASE_KEYWORDS: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.9},
    "adam-mfac": {"base": "adam"},
}

SMOKE_TASKS = ("digits-mlp", "toy-regression")
SMOKE_LRS = (0.1, 0.01)


def task_target(task: Task) -> tuple[float, str]:
    """``(target train loss, where it comes from)``: the bench's, else :data:`TARGETS`."""
    if task.target is not None:
        return float(task.target), "bench"
    if task.name in TARGETS:
        return TARGETS[task.name], "lr_sensitivity.TARGETS"
    raise ValueError(f"task {task.name!r} has no target; add one to TARGETS")


def library_hparams(
    name: str, lr: float, task: Task, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The keywords optimizer ``name`` is built with: ``lr``, :data:`BASE_KEYWORDS` and
    ``extra``; with ``fisher_type="mc"`` and no likelihood, the task's (as the bench does)."""
    hparams = {"lr": lr, **BASE_KEYWORDS.get(name, {}), **(extra or {})}
    if hparams.get("fisher_type") == "mc" and hparams.get("likelihood") is None:
        hparams["likelihood"] = task.likelihood
    return hparams


def _finite(value: Any) -> Any:
    """``value``, with a non-finite float as None (results.json stays strict JSON)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def run_one(
    task: Task,
    name: str,
    lr: float,
    seed: int,
    epochs: int,
    target: float,
    extra: Mapping[str, Any] | None = None,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Train once with the bench's runner; the record stored in ``results.json``.

    A run that raises is recorded with its error (and counts as not reaching the target); a
    run whose loss turns non-finite stops there (``diverged``), as in the bench.
    """
    hparams = library_hparams(name, lr, task, extra)
    config = RunConfig(
        task=task.name,
        epochs=epochs,
        batch_size=task.batch_size,
        seed=seed,
        threads=threads,
        quiet=True,
    )
    record: dict[str, Any] = {
        "task": task.name,
        "optimizer": name,
        "lr": lr,
        "seed": seed,
        "epochs": epochs,
        "hparams": hparams,
    }
    started = time.perf_counter()
    try:
        result = train(name, hparams, config)
    except Exception as exc:
        record.update(
            error=f"{type(exc).__name__}: {exc}",
            final_train_loss=None,
            steps_to_target=None,
            reached_target=False,
            diverged=None,
            wall_time_s=time.perf_counter() - started,
        )
        return record
    summary = result["summary"]
    steps = steps_to_target(result["steps"]["loss"], target)
    record.update(
        error=None,
        final_train_loss=_finite(summary["final_train_loss"]),
        metric=task.metric_name,
        metric_value=_finite(summary[task.metric_name]),
        steps=summary["steps"],
        steps_to_target=steps,
        reached_target=steps is not None,
        diverged=summary["diverged"],
        train_time_s=summary["train_time_s"],
        wall_time_s=time.perf_counter() - started,
    )
    return record


def aggregate(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per task, per optimizer: what the table and the heat map show.

    Returns ``{task: {optimizer: {"lrs": [...], "reached": {lr: fraction of seeds},
    "mean_final_loss": {lr: mean over seeds or None}, "good_lrs": [...], "best_lr",
    "best_final_loss"}}}``, lrs in decreasing order. An lr is *good* where every seed reached
    the target. ``mean_final_loss`` is None where a seed diverged or failed (no final loss);
    the best final loss is the lowest such mean (None where every lr has a failed seed).
    """
    grouped: dict[str, dict[str, dict[float, list[Mapping[str, Any]]]]] = {}
    for r in records:
        grouped.setdefault(r["task"], {}).setdefault(r["optimizer"], {}).setdefault(
            r["lr"], []
        ).append(r)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task, by_opt in grouped.items():
        out[task] = {}
        for name, by_lr in by_opt.items():
            lrs = sorted(by_lr, reverse=True)
            reached, mean_loss = {}, {}
            for lr in lrs:
                runs = by_lr[lr]
                reached[lr] = sum(bool(r["reached_target"]) for r in runs) / len(runs)
                losses = [r.get("final_train_loss") for r in runs]
                ok = all(v is not None and math.isfinite(v) for v in losses)
                mean_loss[lr] = statistics.fmean(losses) if ok else None
            finite = {lr: v for lr, v in mean_loss.items() if v is not None}
            best_lr = min(finite, key=finite.__getitem__) if finite else None
            out[task][name] = {
                "lrs": lrs,
                "reached": reached,
                "mean_final_loss": mean_loss,
                "good_lrs": [lr for lr in lrs if reached[lr] == 1.0],
                "best_lr": best_lr,
                "best_final_loss": None if best_lr is None else finite[best_lr],
            }
    return out


#: the optimizer whose best lr every other is also compared at
REFERENCE = "adam"


def _lr(lr: float) -> str:
    return f"{lr:g}"


def markdown_table(
    summary: Mapping[str, Mapping[str, Mapping[str, Any]]],
    targets: Mapping[str, float],
    seeds: int,
) -> str:
    """A table per task (optimizer, good lrs, best final train loss) and one overall table of
    the number of good lrs per optimizer and task."""
    lines: list[str] = []
    tasks = list(summary)
    names = list(dict.fromkeys(n for t in tasks for n in summary[t]))
    lines.append(
        f"Good lrs (every one of {seeds} seed{'s' if seeds > 1 else ''} reaches the target) "
        "per optimizer and task:"
    )
    lines.append("")
    lines.append("| optimizer | " + " | ".join(tasks) + " |")
    lines.append("|---|" + "---:|" * len(tasks))
    for name in names:
        cells = []
        for t in tasks:
            row = summary[t].get(name)
            cells.append("-" if row is None else f"{len(row['good_lrs'])}/{len(row['lrs'])}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for t in tasks:
        lines.append("")
        lines.append(f"**{t}** (target train loss {targets[t]:g})")
        lines.append("")
        ref = summary[t].get(REFERENCE)
        ref_lr = None if ref is None else ref["best_lr"]
        header = "| optimizer | lrs reaching the target | seeds reaching, per lr | "
        header += "best final train loss (lr) |"
        if ref_lr is not None:
            header += f" final train loss at {REFERENCE}'s best lr ({_lr(ref_lr)}) |"
        lines.append(header)
        lines.append("|---|---|---|---|" + ("---|" if ref_lr is not None else ""))
        for name, row in summary[t].items():
            good = ", ".join(_lr(lr) for lr in row["good_lrs"]) or "none"
            per_lr = " ".join(f"{round(row['reached'][lr] * seeds)}" for lr in row["lrs"])
            best = row["best_final_loss"]
            best_cell = "diverged" if best is None else f"{best:.4g} ({_lr(row['best_lr'])})"
            line = f"| {name} | {good} | {per_lr} | {best_cell} |"
            if ref_lr is not None:
                at_ref = row["mean_final_loss"].get(ref_lr)
                line += (
                    " - |"
                    if ref_lr not in row["lrs"]
                    else (" diverged |" if at_ref is None else f" {at_ref:.4g} |")
                )
            lines.append(line)
    lines.append("")
    lrs = next(iter(next(iter(summary.values())).values()))["lrs"] if summary else []
    note = (
        "Seeds reaching, per lr: for lr " + ", ".join(_lr(lr) for lr in lrs) + " in that order. "
        "Best final train loss: the mean over seeds of the train loss after the last epoch, at "
        "the lr where it is lowest (lrs where a seed diverged are left out)."
    )
    if any(summary[t].get(REFERENCE, {}).get("best_lr") is not None for t in tasks):
        note += (
            f" Final train loss at {REFERENCE}'s best lr: the same mean at the lr where "
            f"{REFERENCE}'s is lowest (the issue's second goal compares a grafted method with "
            "Adam there)."
        )
    lines.append(note)
    return "\n".join(lines) + "\n"


def plot_heatmap(
    summary: Mapping[str, Mapping[str, Mapping[str, Any]]],
    targets: Mapping[str, float],
    seeds: int,
    path: str | Path,
) -> bool:
    """One panel per task, optimizer x lr: colour the mean final train loss (log scale, its
    own per panel; grey where a seed diverged), text the seeds that reached the target.
    Returns False (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        from matplotlib.colors import LogNorm
    except ImportError:
        warnings.warn("matplotlib is not installed: no heat map", stacklevel=2)
        return False
    tasks = list(summary)
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.6 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis_r").copy()
    cmap.set_bad("lightgrey")
    for ax, task in zip(axes.flat, tasks, strict=False):
        names = list(summary[task])
        lrs = summary[task][names[0]]["lrs"]
        loss = np.array(
            [[summary[task][n]["mean_final_loss"].get(lr) or np.nan for lr in lrs] for n in names],
            dtype=float,
        )
        masked = np.ma.masked_invalid(loss)
        positive = loss[np.isfinite(loss) & (loss > 0)]
        norm = LogNorm(positive.min(), positive.max()) if positive.size else None
        image = ax.imshow(masked, cmap=cmap, norm=norm, aspect="auto")
        for i, n in enumerate(names):
            for j, lr in enumerate(lrs):
                hits = round(summary[task][n]["reached"][lr] * seeds)
                value = loss[i, j]
                text = f"{value:.2g}" if math.isfinite(value) else "div"
                # white on the dark end of viridis_r (the high losses)
                dark = norm is not None and math.isfinite(value) and norm(value) > 0.6
                ax.text(
                    j,
                    i,
                    f"{text}\n{hits}/{seeds}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    fontweight="bold" if hits == seeds else "normal",
                    color="white" if dark else "black",
                )
        ax.set_xticks(range(len(lrs)), [_lr(lr) for lr in lrs])
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("lr")
        ax.set_title(f"{task} (target {targets[task]:g})", fontsize=10)
        if norm is not None:
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="mean final train loss")
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.suptitle(
        "Library defaults, lr only: mean final train loss (colour) and seeds reaching the "
        "target (bold: all)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"lrs must be positive numbers, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--opt",
        default=None,
        help=f"optimizers, comma-separated (default: {','.join(DEFAULT_OPTS)})",
    )
    parser.add_argument(
        "--tasks", default=None, help=f"tasks, comma-separated (default: {','.join(DEFAULT_TASKS)})"
    )
    parser.add_argument(
        "--lrs",
        type=_floats,
        default=None,
        help=f"learning rates (default: {','.join(map(_lr, DEFAULT_LRS))})",
    )
    parser.add_argument(
        "--seeds", type=as_type(positive_int), default=None, help="seeds 0..N-1 (default 3)"
    )
    parser.add_argument(
        "--epochs",
        type=as_type(positive_int),
        default=None,
        help="epochs for every task (default per task: "
        + ", ".join(f"{t} {e}" for t, e in EPOCHS.items())
        + "; other tasks: the bench's)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="an extra keyword for one optimizer's constructor, e.g. kfac.damping=0.01 "
        "(repeatable)",
    )
    parser.add_argument(
        "--threads", type=as_type(positive_int), default=1, help="torch threads (default 1)"
    )
    parser.add_argument("--out", default="lr-sensitivity", help="output folder")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny run for tests: 1 seed, lrs {','.join(map(_lr, SMOKE_LRS))}, 1 epoch, tasks "
        f"{','.join(SMOKE_TASKS)} (explicit options win)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.tasks = args.tasks or ",".join(SMOKE_TASKS)
        args.lrs = args.lrs or list(SMOKE_LRS)
        args.seeds = args.seeds or 1
        args.epochs = args.epochs or 1
    args.opt = args.opt or ",".join(DEFAULT_OPTS)
    args.tasks = args.tasks or ",".join(DEFAULT_TASKS)
    args.lrs = args.lrs or list(DEFAULT_LRS)
    args.seeds = args.seeds or 3
    return args


def _fail(message: str) -> int:
    print(f"lr_sensitivity: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        names = resolve_optimizers(args.opt)
        tasks = [resolve_task(t.strip()) for t in args.tasks.split(",") if t.strip()]
        extra = parse_overrides(args.overrides, known=names)
        targets = {t.name: task_target(t) for t in tasks}
    except ValueError as exc:
        return _fail(str(exc))
    for task in tasks:
        try:
            task.check_data()
        except FileNotFoundError as exc:
            return _fail(str(exc))
    # Build every optimizer once per task before anything trains, so that a --set key a
    # constructor does not take stops the script here, with the constructor's message.
    for task in tasks:
        for name in names:
            hp = library_hparams(name, args.lrs[0], task, extra.get(name))
            try:
                OPTIMIZERS[name].build(task.build_model(0), **hp)
            except Exception as exc:
                return _fail(f"{name} on {task.name}: {type(exc).__name__}: {exc}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    epochs = {t.name: args.epochs or EPOCHS.get(t.name, t.epochs) for t in tasks}
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    total = len(tasks) * len(names)
    done = 0
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        for task in tasks:
            target = targets[task.name][0]
            for name in names:
                t0 = time.perf_counter()
                mine = [
                    run_one(
                        task,
                        name,
                        lr,
                        seed,
                        epochs[task.name],
                        target,
                        extra.get(name),
                        args.threads,
                    )
                    for lr in args.lrs
                    for seed in seeds
                ]
                records.extend(mine)
                done += 1
                good = aggregate(mine)[task.name][name]["good_lrs"]
                errors = sum(r["error"] is not None for r in mine)
                print(
                    f"[{done}/{total}] {task.name} {name}: {len(mine)} runs in "
                    f"{time.perf_counter() - t0:.1f} s (elapsed {time.perf_counter() - started:.0f}"
                    f" s); target reached by every seed at lr "
                    f"{', '.join(map(_lr, good)) or 'none'}"
                    + (f"; {errors} runs failed" if errors else ""),
                    file=sys.stderr,
                    flush=True,
                )
    wall = time.perf_counter() - started

    summary = aggregate(records)
    target_values = {t: v for t, (v, _) in targets.items()}
    table = markdown_table(summary, target_values, len(seeds))
    results = {
        "config": {
            "command": "python benchmarks/lr_sensitivity.py "
            + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
            "optimizers": names,
            "tasks": [t.name for t in tasks],
            "lrs": args.lrs,
            "seeds": seeds,
            "epochs": epochs,
            "batch_size": {t.name: t.batch_size for t in tasks},
            "targets": {t: {"value": v, "source": s} for t, (v, s) in targets.items()},
            "set": extra,
            "threads": args.threads,
            "torch_version": torch.__version__,
            "machine": machine_info(),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": wall,
        },
        "records": records,
        "summary": {
            t: {
                n: {
                    **row,
                    "reached": {_lr(k): v for k, v in row["reached"].items()},
                    "mean_final_loss": {_lr(k): v for k, v in row["mean_final_loss"].items()},
                }
                for n, row in by_opt.items()
            }
            for t, by_opt in summary.items()
        },
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    (out / "table.md").write_text(table)
    plot_heatmap(summary, target_values, len(seeds), out / "heatmap.png")
    print(table)
    print(
        f"{len(records)} runs in {wall:.0f} s; wrote {out}/results.json, table.md, heatmap.png",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
