"""K-FAC refresh: one layer at a time against batched (one solver call per factor size).

Builds the factors of a model from one random batch (one optimizer step), then times the
refresh one layer at a time (``tests.helpers.per_layer_refresh``, one solver call per
matrix) and the batched ``estimator.refresh``, interleaved, ``--repeats`` times each, and
prints the distinct factor sizes (batching groups the factors of one size).

    python benchmarks/bench_refresh.py --model resnet18 --threads 2 --warmup 0
    python benchmarks/bench_refresh.py --model resnet18 --max-factor 1024 --repeats 10
    python benchmarks/bench_refresh.py --model mlp --method eigen,cholesky --repeats 20

``resnet18``: torchvision's ResNet-18 with 10 classes on 8 x 3 x 32 x 32 inputs (its
4608-wide layer4 factors dominate the refresh); ``mlp``: 24 Linear(128, 128) + LayerNorm
blocks on 64 x 128 inputs (many small factors of one size, where batching saves calls).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import secondorder.linalg
from secondorder import KFAC

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import per_layer_refresh  # the per-layer reference the tests use


def _model(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if name == "resnet18":
        import torchvision

        model = torchvision.models.resnet18(num_classes=10)
        x = torch.randn(8, 3, 32, 32, generator=gen)
        return model, x, torch.randint(0, 10, (8,), generator=gen)
    if name == "mlp":
        blocks = [m for _ in range(24) for m in (nn.Linear(128, 128), nn.LayerNorm(128), nn.GELU())]
        model = nn.Sequential(*blocks, nn.Linear(128, 10))
        x = torch.randn(64, 128, generator=gen)
        return model, x, torch.randint(0, 10, (64,), generator=gen)
    raise ValueError(f"unknown model {name!r}")


def _estimator(model_name: str, method: str, device: torch.device):
    torch.manual_seed(0)
    model, x, y = _model(model_name)
    model = model.to(device)
    kw = {"damping_mode": "factored", "inverse_method": "cholesky"} if method == "cholesky" else {}
    opt = KFAC(model, lr=0.01, damping=1e-3, curvature_every=1, inverse_every=10**9, **kw)
    est = opt.estimator
    est.refresh = lambda damping: None  # the step's own refresh (step 0) is not timed
    opt.zero_grad()
    F.cross_entropy(model(x.to(device)), y.to(device)).backward()
    opt.step()  # the factors
    del est.refresh
    return est


def _sizes(est) -> Counter:
    """How many matrices of each size a refresh decomposes (a factor of ``groups``
    blocks counts ``groups`` times)."""
    sizes: Counter = Counter()
    for state in est._state.values():
        for f in (state.a_factor, state.g_factor):
            if f is not None and f.dim() == 3:
                sizes[f.shape[-1]] += f.shape[0]
    return sizes


_SOLVERS = ("eigh", "cholesky_ex", "cholesky")


def _time(est, batched: bool, device: torch.device) -> tuple[float, int]:
    """The time of one refresh, and how many solver calls it made (fallbacks included)."""
    refresh = est.refresh if batched else partial(per_layer_refresh, est)
    calls = [0]
    real = {name: getattr(torch.linalg, name) for name in _SOLVERS}

    def counted(name):
        def call(*args, **kwargs):
            calls[0] += 1
            return real[name](*args, **kwargs)

        return call

    for name in _SOLVERS:
        setattr(torch.linalg, name, counted(name))
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        refresh(1e-3)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, calls[0]
    finally:
        for name in _SOLVERS:
            setattr(torch.linalg, name, real[name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "mlp"])
    parser.add_argument("--method", default="eigen,cholesky", help="eigen, cholesky or both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed refreshes first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--eigh-batch-max",
        type=int,
        default=None,
        help="largest n stacked into one eigh call (default: linalg.EIGH_BATCH_MAX_SIZE)",
    )
    parser.add_argument(
        "--max-factor",
        type=int,
        default=None,
        help="leave out the layers with a factor wider than this (ResNet-18's 1152- to "
        "4608-wide factors are decomposed one at a time either way and take minutes)",
    )
    args = parser.parse_args()
    if args.eigh_batch_max is not None:
        secondorder.linalg.EIGH_BATCH_MAX_SIZE = args.eigh_batch_max
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, {args.threads} threads, device {device}, eigh stacked "
        f"up to n = {secondorder.linalg.EIGH_BATCH_MAX_SIZE}"
    )
    for method in args.method.split(","):
        est = _estimator(args.model, method, device)
        if args.max_factor is not None:
            for state in est._state.values():
                widths = [f.shape[-1] for f in (state.a_factor, state.g_factor) if f is not None]
                if max(widths) > args.max_factor:
                    state.a_factor = state.g_factor = None  # not refreshed
        sizes = _sizes(est)
        factors = sum(
            1
            for st in est._state.values()
            for f in (st.a_factor, st.g_factor)
            if f is not None and f.dim() == 3
        )
        print(
            f"\n{args.model} / {method}: {len(est._state)} layers, {factors} factors to "
            f"decompose ({sum(sizes.values())} matrices), {len(sizes)} distinct sizes"
        )
        print("  size x count: " + ", ".join(f"{n}x{c}" for n, c in sorted(sizes.items())))
        for _ in range(args.warmup):
            _time(est, True, device)
        times: dict[bool, list[float]] = {False: [], True: []}
        calls: dict[bool, int] = {}
        for _ in range(args.repeats):
            for batched in (False, True):
                elapsed, calls[batched] = _time(est, batched, device)
                times[batched].append(elapsed)
                label = "batched" if batched else "per-layer"
                print(f"    {label}: {elapsed:.3f} s, {calls[batched]} solver calls", flush=True)
        for batched, label in ((False, "per-layer"), (True, "batched")):
            t = times[batched]
            print(
                f"  {label:9s}: median {statistics.median(t) * 1e3:9.1f} ms, "
                f"min {min(t) * 1e3:9.1f} ms  ({len(t)} runs, {calls[batched]} solver calls "
                "in the last, fallbacks included)"
            )
        ratio = statistics.median(times[False]) / statistics.median(times[True])
        print(f"  per-layer / batched (medians): {ratio:.2f}x")


if __name__ == "__main__":
    main()
