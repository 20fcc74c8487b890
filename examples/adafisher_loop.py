"""AdaFisher (or AdaFisherW) in a plain training loop on scikit-learn's digits.

python examples/adafisher_loop.py                 # AdaFisher, L2 weight decay
python examples/adafisher_loop.py --decoupled     # AdaFisherW, decoupled weight decay
python examples/adafisher_loop.py --smoke         # one epoch, for tests

The paper's lr 1e-3 with statistics every 100 steps moves very little on a model this
small; lr 0.03 with statistics every step is the setting the bench uses for digits.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from secondorder import AdaFisher, AdaFisherW


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--decoupled", action="store_true", help="AdaFisherW")
    parser.add_argument("--smoke", action="store_true", help="one epoch only")
    args = parser.parse_args(argv)
    epochs = 1 if args.smoke else args.epochs

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )
    optimizer = AdaFisherW if args.decoupled else AdaFisher
    opt = optimizer(model, lr=args.lr, curvature_every=1, weight_decay=5e-4)

    for epoch in range(epochs):
        model.train()
        order = train[torch.randperm(len(train))]
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            loss = F.cross_entropy(model(x[train]), y[train]).item()
            acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        print(f"epoch {epoch + 1}: train loss {loss:.4f}  test accuracy {acc:.3f}")
    return loss


if __name__ == "__main__":
    main()
