"""Where a curvature optimizer's step time goes, stage by stage.

Wraps the estimator's stages with timers and trains a few steps:

    capture      statistics computed in the backward hooks (estimator.accumulate)
    update       estimator.update (factor EMA)
    refresh      estimator.refresh (eigendecompositions / inverses)
    precondition estimator.precondition
    step_other   the rest of optimizer.step (finiteness check, KL clip, base update)
    forward, backward (backward includes capture)

    python benchmarks/step_breakdown.py --task digits-cnn --steps 200
    python benchmarks/step_breakdown.py --task resnet18 --batch 32 --steps 30 --csv out.csv

Prints a table (ms per step, averaged over the measured steps; refresh and update are
averaged over all steps, so they show their amortised cost) and optionally writes CSV.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from secondorder import KFAC


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable, key: str, totals: dict[str, float], device: str) -> Callable:
    def wrapper(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        _sync(device)
        totals[key] += time.perf_counter() - start
        return out

    return wrapper


def _model_and_batch(task: str, batch: int, device: str) -> tuple[nn.Module, torch.Tensor, int]:
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
        raise ValueError(f"--task must be digits-mlp, digits-cnn or resnet18, got {task!r}")
    return model.to(device), x.to(device), 10


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits-cnn")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--curvature-every", type=int, default=10)
    parser.add_argument("--inverse-every", type=int, default=100)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--csv", default=None, help="write the table to this CSV file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, x, classes = _model_and_batch(args.task, args.batch, args.device)
    # A pool of batches with random labels: on one fixed batch K-FAC drives the loss to
    # ~1e-7 within a few hundred steps, and the denormal gradients that follow slow the
    # CPU's backward pass several-fold, which would be blamed on the optimizer.
    pool = [
        (x[torch.randperm(len(x))], torch.randint(0, classes, (args.batch,), device=args.device))
        for _ in range(8)
    ]

    results: dict[str, dict[str, float]] = {}
    for name in ("sgd", "kfac"):
        totals: dict[str, float] = defaultdict(float)
        net = model if name == "kfac" else _clone(model)
        if name == "sgd":
            opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        else:
            opt = KFAC(
                net, lr=1e-3, curvature_every=args.curvature_every, inverse_every=args.inverse_every
            )
            est = opt.estimator
            for stage in ("update", "refresh", "precondition"):
                setattr(est, stage, _timed(getattr(est, stage), stage, totals, args.device))
            opt.capture.accumulate = _timed(opt.capture.accumulate, "capture", totals, args.device)
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                totals.clear()
            opt.zero_grad()
            _sync(args.device)
            t0 = time.perf_counter()
            xb, yb = pool[i % len(pool)]
            loss = F.cross_entropy(net(xb), yb)
            _sync(args.device)
            t1 = time.perf_counter()
            loss.backward()
            _sync(args.device)
            t2 = time.perf_counter()
            opt.step()
            _sync(args.device)
            t3 = time.perf_counter()
            totals["forward"] += t1 - t0
            totals["backward"] += t2 - t1
            totals["step"] += t3 - t2
        inner = sum(totals[k] for k in ("update", "refresh", "precondition"))
        totals["step_other"] = totals["step"] - inner
        totals["total"] = totals["forward"] + totals["backward"] + totals["step"]
        results[name] = {k: v / args.steps * 1e3 for k, v in totals.items()}

    stages = [
        "forward",
        "backward",
        "capture",
        "update",
        "refresh",
        "precondition",
        "step_other",
        "total",
    ]
    print(
        f"{args.task}, batch {args.batch}, {args.steps} steps, curvature_every "
        f"{args.curvature_every}, inverse_every {args.inverse_every}, {args.device}, "
        f"{torch.get_num_threads()} threads (ms per step; capture is inside backward)"
    )
    print(f"{'stage':>13} {'sgd':>9} {'kfac':>9}")
    for stage in stages:
        row = [results[n].get(stage, 0.0) for n in ("sgd", "kfac")]
        print(f"{stage:>13} {row[0]:9.3f} {row[1]:9.3f}")
    print(f"{'kfac / sgd':>13} {results['kfac']['total'] / results['sgd']['total']:19.2f}x")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["stage", "sgd_ms", "kfac_ms"])
            for stage in stages:
                writer.writerow(
                    [stage] + [f"{results[n].get(stage, 0.0):.4f}" for n in ("sgd", "kfac")]
                )
    return results["kfac"]


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


if __name__ == "__main__":
    main()
