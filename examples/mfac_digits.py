"""M-FAC (SGD-MFAC or Adam-MFAC) on scikit-learn's digits, with an optional sparse model.

python examples/mfac_digits.py                   # SGD-MFAC, window of 32 gradients
python examples/mfac_digits.py --base adam       # Adam-MFAC
python examples/mfac_digits.py --sparsity 0.5    # half the weights zeroed, kept zero
python examples/mfac_digits.py --smoke           # one epoch, for tests
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from secondorder import MFAC


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--base", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--ngrads", type=int, default=32, help="window size m")
    parser.add_argument("--sparsity", type=float, default=0.0, help="fraction of weights zeroed")
    parser.add_argument("--smoke", action="store_true", help="one epoch only")
    args = parser.parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        parser.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    epochs = 1 if args.smoke else args.epochs

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    if args.sparsity:
        with torch.no_grad():  # a crude magnitude pruning, to show sparse mode
            for layer in (model[0], model[2]):
                w = layer.weight
                w.mul_(w.abs() > w.abs().flatten().quantile(args.sparsity))
    if args.base == "sgd":
        opt = MFAC(
            model,
            lr=0.02,
            base="sgd",
            momentum=0.9,
            ngrads=args.ngrads,
            damping=0.05,
            sparse=args.sparsity > 0,
        )
    else:
        opt = MFAC(
            model, lr=3e-3, base="adam", ngrads=args.ngrads, damping=0.2, sparse=args.sparsity > 0
        )

    for epoch in range(epochs):
        order = train[torch.randperm(len(train))]
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            loss = F.cross_entropy(model(x[train]), y[train]).item()
            acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
            zeros = float((model[0].weight == 0).float().mean())
        print(
            f"epoch {epoch + 1}: train loss {loss:.4f}  test accuracy {acc:.3f}  "
            f"zeros in layer 0 {zeros:.2f}"
        )
    return loss


if __name__ == "__main__":
    main()
