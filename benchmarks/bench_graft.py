"""The cost of grafting in a plain K-FAC step: ``opt.step()`` alone (no forward, backward,
statistics or refresh) on fixed gradients, K-FAC with ``graft=None`` against ``"adam"``
(and the other grafts with ``--grafts``), optionally against the grafting module of another
checkout (``--old PATH/secondorder/grafting.py``: the per-parameter loop before it became
multi-tensor). One process, settings interleaved round by round, fastest round kept.

    PYTHONPATH=. python benchmarks/bench_graft.py --model resnet20 --rounds 20
    PYTHONPATH=. python benchmarks/bench_graft.py --old /work/main/secondorder/grafting.py
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch
import torch.nn.functional as F

import secondorder.optimizer as optimizer_module
from secondorder import KFAC
from secondorder.bench.models import cifar_resnet


def _old_graft(path: str):
    spec = importlib.util.spec_from_file_location("secondorder._old_grafting", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.graft_directions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20", help="resnetN (CIFAR ResNet)")
    parser.add_argument("--grafts", default="none,adam")
    parser.add_argument("--old", default=None, help="another grafting.py to time as well")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load "
          f"{os.getloadavg()}", flush=True)  # fmt: skip
    new = optimizer_module.graft_directions
    old = _old_graft(args.old) if args.old else None
    settings = []
    for graft in [None if g == "none" else g for g in args.grafts.split(",")]:
        settings.append((f"graft={graft}", graft, new))
        if graft is not None and old is not None:
            settings.append((f"graft={graft} (old)", graft, old))
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    runs = {}
    for name, graft, fn in settings:
        torch.manual_seed(0)
        model = cifar_resnet(int(args.model.removeprefix("resnet")), 10)
        opt = KFAC(model, lr=0.01, graft=graft, curvature_every=10**6, inverse_every=10**6)
        F.cross_entropy(model(x), y).backward()
        optimizer_module.graft_directions = fn
        opt.step()  # records and refreshes; the following steps are plain
        opt.step()
        runs[name] = (opt, fn)
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.rounds):
        for name, (opt, fn) in runs.items():
            optimizer_module.graft_directions = fn
            start = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            best[name] = min(best[name], (time.perf_counter() - start) / args.steps)
    optimizer_module.graft_directions = new
    print(f"{args.model}, plain K-FAC step (opt.step() alone), fastest of {args.rounds} rounds "
          f"of {args.steps} steps; load {os.getloadavg()}")  # fmt: skip
    base = best["graft=None"] if "graft=None" in best else None
    for name, t in best.items():
        ratio = f" ({t / base:.2f}x graft=None)" if base else ""
        print(f"  {name:24} {t * 1e3:8.2f} ms{ratio}")


if __name__ == "__main__":
    main()
