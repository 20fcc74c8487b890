"""Steps to 0.85 test accuracy on scikit-learn digits: K-FAC with adaptive damping, learning
rate and momentum (no lr given) against SGD with momentum 0.9 at its best lr of {0.3, 0.1,
0.03}. MLP 64-64-10 tanh, batch 64, the split of ``tests/helpers.digits_data``; test
accuracy is measured after every step.

    python benchmarks/adaptive_kfac.py [--steps 300] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from secondorder import KFAC
from tests.helpers import digits_closure_steps, digits_data

TARGET = 0.85


def steps_to_target(make_opt, max_steps: int, seed: int) -> tuple[int | None, float]:
    """The first step after which test accuracy reaches TARGET (None: not within
    ``max_steps``), and the seconds taken."""
    _, _, x_test, y_test = digits_data()
    start = time.perf_counter()
    for model, done in digits_closure_steps(make_opt, max_steps, seed):
        if done == 0:  # built: the clock starts with the first step
            start = time.perf_counter()
            continue
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        if accuracy >= TARGET:
            return done, time.perf_counter() - start
    return None, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    adaptive = {"adaptive_damping": True, "adaptive_lr": True, "adaptive_momentum": True}
    runs = {
        "KFAC adaptive, defaults (λ starts at 0.1)": lambda m: KFAC(m, **adaptive),
        "KFAC adaptive, damping 1e-3": lambda m: KFAC(m, damping=1e-3, **adaptive),
        "KFAC adaptive, damping 1": lambda m: KFAC(m, damping=1.0, **adaptive),
    }
    for lr in (0.3, 0.1, 0.03):
        runs[f"SGD momentum 0.9, lr {lr}"] = lambda m, lr=lr: torch.optim.SGD(
            m.parameters(), lr=lr, momentum=0.9
        )
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, 1 thread"
    )
    print(f"steps to {TARGET} test accuracy (max {args.steps}), seeds {args.seeds}")
    for name, make in runs.items():
        results = [steps_to_target(make, args.steps, seed) for seed in args.seeds]
        steps = [s for s, _ in results]
        reached = [s for s in steps if s is not None]
        median = statistics.median(reached) if len(reached) == len(steps) else None
        ms = 1000 * sum(t for _, t in results) / max(1, sum(s or args.steps for s in steps))
        print(f"  {name:40s} steps {steps}  median {median}  {ms:.1f} ms/step")


if __name__ == "__main__":
    main()
