"""Data-parallel K-FAC (or AdaFisher) with DistributedDataParallel on scikit-learn's digits.

torchrun --standalone --nproc_per_node 2 examples/ddp_kfac.py              # gloo, CPU
torchrun --standalone --nproc_per_node 2 examples/ddp_kfac.py --opt adafisher
torchrun --standalone --nproc_per_node 4 examples/ddp_kfac.py --backend nccl  # one GPU per rank
torchrun --standalone --nproc_per_node 2 examples/ddp_kfac.py --smoke     # one epoch, for tests

Each rank trains on its own slice of every global batch; DDP averages the gradients and the
optimizer (distributed by default once torch.distributed is initialised) reduces its layer
statistics across the ranks and shares the eigendecompositions out, so every rank holds the
same curvature and the same weights. Rank 0 prints the progress.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from secondorder import KFAC, AdaFisher


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--opt", choices=("kfac", "adafisher"), default="kfac")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (GPU)")
    parser.add_argument("--smoke", action="store_true", help="one epoch only")
    args = parser.parse_args(argv)
    epochs = 1 if args.smoke else args.epochs

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by {world} ranks")
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8).to(device)
    y = torch.tensor(y).to(device)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).to(device)
    train, test = perm[:1400], perm[1400:]

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    ).to(device)
    ddp = nn.parallel.DistributedDataParallel(model)
    if args.opt == "kfac":
        opt = KFAC(model, lr=0.03, damping=0.03, curvature_every=1, inverse_every=10)
    else:
        opt = AdaFisher(model, lr=0.03, curvature_every=1)

    share = args.batch_size // world
    shuffle = torch.Generator().manual_seed(1)  # the same batch order on every rank
    for epoch in range(epochs):
        order = train[torch.randperm(len(train), generator=shuffle).to(device)]
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
            idx = order[i + rank * share : i + (rank + 1) * share]  # this rank's slice
            opt.zero_grad()
            F.cross_entropy(ddp(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            loss = F.cross_entropy(model(x[train]), y[train]).item()
            acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch + 1}: train loss {loss:.4f}, test accuracy {acc:.3f}", flush=True)
    dist.destroy_process_group()
    return loss


if __name__ == "__main__":
    main()
