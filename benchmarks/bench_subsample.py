"""``statistics_rows``: steps to a target accuracy, and the capture time per step.

Trains the bench's digits-mlp (MLP 64-128-64-10, tanh; batch 64; the bench's K-FAC defaults:
statistics every step, inverses every 10) with each ``statistics_rows`` setting from the same
initial weights and batch order, per seed, and reports the first step whose test accuracy
reaches ``--target-acc`` and the final train loss and test accuracy. Then times the capture:
the seconds spent in the hooks' record path (``ModelCapture._on_grad``: the draw, the slicing
and the estimator's ``accumulate``) per recorded step, for each setting, task
(``--timing-tasks``, e.g. digits-cnn too) and batch size, one process, settings interleaved
within each round, fastest round kept.

    PYTHONPATH=. python benchmarks/bench_subsample.py
    PYTHONPATH=. python benchmarks/bench_subsample.py --rows none 0.5 0.25 16 --threads 2
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

import torch
import torch.nn.functional as F

from secondorder import KFAC
from secondorder.bench.optimizers import OPTIMIZERS
from secondorder.bench.tasks import TASKS, accuracy


def _rows(text: str) -> int | float | None:
    if text.lower() == "none":
        return None
    return float(text) if "." in text else int(text)


def _kfac(model: torch.nn.Module, rows: int | float | None) -> KFAC:
    return KFAC(model, **OPTIMIZERS["kfac"].defaults, statistics_rows=rows)


def train(rows, seed: int, epochs: int, batch: int, target: float) -> dict:
    """One run: the first step at ``target`` test accuracy (None if never), final numbers."""
    task = TASKS["digits-mlp"]
    data = task.data()
    model = task.build_model(seed)
    opt = _kfac(model, rows)
    order = torch.Generator().manual_seed(seed)
    step, reached = 0, None
    for _ in range(epochs):
        perm = torch.randperm(len(data.x_train), generator=order)
        for start in range(0, len(perm), batch):
            idx = perm[start : start + batch]
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
            step += 1
            if reached is None:
                with torch.no_grad():
                    if accuracy(model(data.x_test), data.y_test) >= target:
                        reached = step
    with torch.no_grad():
        loss = F.cross_entropy(model(data.x_train), data.y_train).item()
        acc = accuracy(model(data.x_test), data.y_test)
    return {"steps_to_target": reached, "final_loss": loss, "test_accuracy": acc, "steps": step}


def capture_seconds(task_name: str, settings, batch: int, steps: int, rounds: int) -> dict:
    """Fastest-round mean seconds per step in the record path, per setting (interleaved)."""
    task = TASKS[task_name]
    data = task.data()
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(data.x_train), (batch,), generator=gen)
    x, y = data.x_train[idx], data.y_train[idx]
    runs = {}
    for rows in settings:
        model = task.build_model(0)
        opt = _kfac(model, rows)
        capture = opt.capture
        spent = [0.0]
        record = capture._on_grad  # looked up by the forward hook at every pass

        def timed(*args, record=record, spent=spent):
            start = time.perf_counter()
            record(*args)
            spent[0] += time.perf_counter() - start

        capture._on_grad = timed
        runs[rows] = (model, opt, spent)
    best = {rows: float("inf") for rows in settings}
    for _ in range(rounds):
        for rows in settings:
            model, opt, spent = runs[rows]
            spent[0] = 0.0
            for _ in range(steps):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            best[rows] = min(best[rows], spent[0] / steps)
    return best


def _train_table(args: argparse.Namespace, settings: list) -> None:
    print(
        f"\ndigits-mlp K-FAC ({OPTIMIZERS['kfac'].defaults}), batch {args.batch_size}, "
        f"{args.epochs} epochs; steps to test accuracy {args.target_acc}"
    )
    header = ("statistics_rows", "steps to target (per seed)", "final loss", "test acc")
    print("{:>16} {:>28} {:>16} {:>14}".format(*header))
    for rows in settings:
        runs = [train(rows, s, args.epochs, args.batch_size, args.target_acc) for s in args.seeds]
        reached = [r["steps_to_target"] for r in runs]
        losses = [r["final_loss"] for r in runs]
        accs = [r["test_accuracy"] for r in runs]
        print(
            f"{rows!s:>16} {reached!s:>28} "
            f"{statistics.mean(losses):>9.4f}±{statistics.pstdev(losses):.4f} "
            f"{statistics.mean(accs):>8.4f}±{statistics.pstdev(accs):.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=["none", "0.5", "0.25", "16"])
    parser.add_argument(
        "--seeds", nargs="*", type=int, default=[0, 1, 2], help="none: timings only"
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--target-acc", type=float, default=0.9)
    parser.add_argument("--timing-batches", nargs="+", type=int, default=[64, 1024])
    parser.add_argument("--timing-tasks", nargs="+", default=["digits-mlp"])
    parser.add_argument("--timing-steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [_rows(text) for text in args.rows]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    if args.seeds:
        _train_table(args, settings)
    for task, batch in itertools.product(args.timing_tasks, args.timing_batches):
        load = os.getloadavg()[0]
        best = capture_seconds(task, settings, batch, args.timing_steps, args.rounds)
        print(
            f"\n{task}: capture time per step, batch {batch} "
            f"(fastest of {args.rounds} rounds of {args.timing_steps} steps, load {load:.2f})"
        )
        base = best[settings[0]]
        for rows in settings:
            print(f"{rows!s:>16} {best[rows] * 1e6:>10.0f} µs  ({best[rows] / base:.2f}x)")


if __name__ == "__main__":
    main()
