"""What blocking the Kronecker factors (``max_factor_dim``) costs in optimisation.

Trains a digits MLP 64-512-512-10 (tanh; its input factors are 65, 513, 513 wide and its
output factors 512, 512, 10, so a block size of 256 splits four of them and 64 splits five)
with K-FAC at each ``max_factor_dim`` (None: whole factors), from the same initial weights
and batch order per seed, and reports the steps until the full training loss first falls
below each ``--loss-targets`` value (evaluated every ``--eval-every`` steps), the step at
which the test accuracy first reaches ``--target-acc``, and the final training loss and test
accuracy. Hyperparameters: the bench's K-FAC (``secondorder.bench.optimizers``: lr 0.02,
momentum 0.9, damping 0.1, statistics every step, inverses every 10, KL clip 1e-2) unless
``--library-defaults`` (KFAC's own: factors every 10 steps, inverses every 100), with
``--graft`` optionally. Settings run interleaved per seed; one torch thread by default.

    PYTHONPATH=. python benchmarks/bench_blocking.py
    PYTHONPATH=. python benchmarks/bench_blocking.py --blocks none 256 64 --seeds 0 1 2 \\
        --epochs 10 --graft adam
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from secondorder import KFAC
from secondorder.bench.optimizers import OPTIMIZERS
from secondorder.bench.tasks import TASKS, accuracy


def _block(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def wide_mlp(seed: int, width: int = 512) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10)
    )


def train(block: int | None, seed: int, args: argparse.Namespace) -> dict:
    """One run: steps to each loss target and to the accuracy target (None: never)."""
    data = TASKS["digits-mlp"].data()
    model = wide_mlp(seed, args.width)
    hparams = {"lr": args.lr} if args.library_defaults else dict(OPTIMIZERS["kfac"].defaults)
    opt = KFAC(model, max_factor_dim=block, progress=False, **{**hparams, "graft": args.graft})
    order = torch.Generator().manual_seed(seed)
    step = 0
    to_loss: dict[float, int | None] = dict.fromkeys(args.loss_targets)
    to_acc = None
    for _ in range(args.epochs):
        perm = torch.randperm(len(data.x_train), generator=order)
        for start in range(0, len(perm), args.batch_size):
            idx = perm[start : start + args.batch_size]
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
            step += 1
            if step % args.eval_every == 0:
                with torch.no_grad():
                    loss = F.cross_entropy(model(data.x_train), data.y_train).item()
                    acc = accuracy(model(data.x_test), data.y_test)
                for target, reached in to_loss.items():
                    if reached is None and loss <= target:
                        to_loss[target] = step
                if to_acc is None and acc >= args.target_acc:
                    to_acc = step
    with torch.no_grad():
        loss = F.cross_entropy(model(data.x_train), data.y_train).item()
        acc = accuracy(model(data.x_test), data.y_test)
    layouts = [f"{r['a']} / {r['g']}" for r in opt.estimator.describe_layers()]
    return {
        "to_loss": to_loss,
        "to_acc": to_acc,
        "loss": loss,
        "acc": acc,
        "steps": step,
        "layouts": layouts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", nargs="+", type=_block, default=[None, 256, 64])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--loss-targets", nargs="+", type=float, default=[0.1, 0.01])
    parser.add_argument("--target-acc", type=float, default=0.95)
    parser.add_argument("--graft", default=None, help="graft= (e.g. adam); default None")
    parser.add_argument(
        "--library-defaults",
        action="store_true",
        help="KFAC's own defaults (with --lr) instead of the bench's K-FAC hyperparameters",
    )
    parser.add_argument("--lr", type=float, default=0.01, help="with --library-defaults")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load "
        f"{os.getloadavg()}; digits MLP 64-{args.width}-{args.width}-10, batch "
        f"{args.batch_size}, {args.epochs} epochs, graft={args.graft}, "
        + ("KFAC defaults, lr " + str(args.lr) if args.library_defaults else "bench K-FAC"),
        flush=True,
    )
    runs: dict[int | None, list[dict]] = {b: [] for b in args.blocks}
    for seed in args.seeds:
        for block in args.blocks:
            run = train(block, seed, args)
            runs[block].append(run)
            print(
                f"seed {seed} max_factor_dim={block}: loss targets {run['to_loss']}, "
                f"acc {args.target_acc} at {run['to_acc']}, final loss {run['loss']:.5f}, "
                f"test acc {run['acc']:.4f}; layouts {run['layouts']}",
                flush=True,
            )
    print(f"\nload {os.getloadavg()}")
    targets = " | ".join(f"steps to train loss {t}" for t in args.loss_targets)
    print(f"| max_factor_dim | {targets} | steps to test acc {args.target_acc} | "
          "final train loss | final test acc |")  # fmt: skip
    print("|---" * (4 + len(args.loss_targets)) + "|")
    for block, rs in runs.items():
        cells = [", ".join(str(r["to_loss"][t]) for r in rs) for t in args.loss_targets]
        losses, accs = [r["loss"] for r in rs], [r["acc"] for r in rs]
        print(
            f"| {block} | " + " | ".join(cells) + f" | {', '.join(str(r['to_acc']) for r in rs)} | "
            f"{statistics.mean(losses):.5f} ± {statistics.pstdev(losses):.5f} | "
            f"{statistics.mean(accs):.4f} ± {statistics.pstdev(accs):.4f} |"
        )


if __name__ == "__main__":
    main()
