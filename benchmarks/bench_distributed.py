"""Data-parallel K-FAC / AdaFisher: step time per rank and what the ranks exchange.

Trains the same CNN on random CIFAR-sized data (3x32x32, 10 classes) with a fixed global
batch, once in one process and once in ``--world`` gloo processes (spawned here, one CPU
thread each unless ``--threads``), and reports per optimizer:

* ``step ms``: mean wall time of a step (forward, backward, step) on rank 0, and of the
  steps that refresh the inverses (``refresh ms``);
* ``reduce KiB``: the statistics one curvature step reduces (the all_reduce payload per
  rank), with symmetric factors as their upper triangle, and what full matrices would be;
* ``refresh share``: the largest fraction of the refresh cost (``Σ n³``) one rank gets.

    python benchmarks/bench_distributed.py                     # kfac,adafisher, 2 ranks
    python benchmarks/bench_distributed.py --opt kfac --world 2 --batch 128 --steps 30

On a machine with fewer cores than ranks the processes share cores: compare the payload
and the refresh share there, and step times only on a machine with a core per rank.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import secondorder as so
from secondorder.distributed import _tensor_fields


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def make_optimizer(name: str, model: nn.Module) -> so.CurvatureOptimizer:
    if name == "kfac":
        return so.KFAC(model, lr=0.01, curvature_every=1, inverse_every=10)
    if name == "adafisher":
        return so.AdaFisher(model, lr=1e-3, curvature_every=1)
    raise SystemExit(f"--opt: unknown optimizer {name!r} (kfac, adafisher)")


def payload(opt: so.CurvatureOptimizer) -> tuple[int, int]:
    """Bytes of one curvature step's statistics: packed as sent, and as full matrices."""
    stats = opt.capture.collect()
    packed = full = 0
    for s in stats.values():
        for owner, field, _, symmetric in _tensor_fields(s):
            t = getattr(owner, field)
            full += t.numel() * t.element_size()
            if symmetric and t.dim() >= 3:
                k = t.shape[-1]
                packed += t[..., 0, 0].numel() * k * (k + 1) // 2 * t.element_size()
            else:
                packed += t.numel() * t.element_size()
    return packed, full


def run(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    g = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(args.batch, 3, 32, 32, generator=g),
            torch.randint(0, 10, (args.batch,), generator=g),
        )
        for _ in range(4)
    ]
    share = args.batch // world
    for name in args.opt.split(","):
        model = make_model()
        net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
        opt = make_optimizer(name, model)
        times, refresh = [], []
        for step in range(args.steps):
            x, y = data[step % len(data)]
            x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
            start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            if step == 0 and world == 1:
                packed, full = payload(opt)  # measure, then record again for the step
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
            opt.step()
            elapsed = (time.perf_counter() - start) * 1e3
            if step >= 2:  # warm-up
                (refresh if step % 10 == 0 and name == "kfac" else times).append(elapsed)
        if rank == 0:
            comm = opt.comm
            costs = {}
            if name == "kfac" and comm is not None:
                for layer, owner in comm.last_assignment.items():
                    st = opt.estimator._state[layer]
                    costs[owner] = costs.get(owner, 0.0) + opt.estimator._refresh_cost(st)
            sizes = (packed, full) if world == 1 else out[(name, 1)]["bytes"]
            out[(name, world)] = {
                "step_ms": statistics.mean(times),
                "refresh_ms": statistics.mean(refresh) if refresh else float("nan"),
                "bytes": sizes,  # the same statistics on every rank, whatever the batch
                "packed_kib": sizes[0] / 1024,
                "full_kib": sizes[1] / 1024,
                "share": max(costs.values()) / sum(costs.values()) if costs else 1.0,
            }
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--opt", default="kfac,adafisher", help="kfac and/or adafisher")
    parser.add_argument("--world", type=int, default=2, help="ranks of the parallel run")
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--steps", type=int, default=22)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args(argv)
    if args.world < 2 or args.batch % args.world:
        raise SystemExit("--world must be >= 2 and divide --batch")
    if args.steps < 12:
        raise SystemExit("--steps must be >= 12 (2 warm-up steps, refreshes every 10)")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    manager = mp.Manager()
    out = manager.dict()
    run(0, 1, 0, args, out)
    mp.spawn(run, args=(args.world, _free_port(), args, out), nprocs=args.world, join=True)
    print(f"global batch {args.batch}, {args.threads} thread(s) per process, {args.steps} steps")
    print(
        "| optimizer | ranks | step ms | refresh ms | reduce KiB (packed) | full KiB "
        "| refresh share |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.opt.split(","):
        for world in (1, args.world):
            r = out[(name, world)]
            share = f"{r['share']:.2f}" if name == "kfac" else "-"
            refresh = f"{r['refresh_ms']:.1f}" if name == "kfac" else "-"
            print(
                f"| {name} | {world} | {r['step_ms']:.1f} | {refresh} | "
                f"{r['packed_kib']:.1f} | {r['full_kib']:.1f} | {share} |"
            )


if __name__ == "__main__":
    main()
