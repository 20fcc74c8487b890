"""K-FAC on scikit-learn's digits in a plain training loop.

python examples/kfac_digits.py            # 10 epochs, prints train loss / test accuracy
python examples/kfac_digits.py --smoke    # 1 epoch, for tests
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from secondorder import KFAC


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="one epoch only")
    args = parser.parse_args(argv)
    epochs = 1 if args.smoke else args.epochs

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    # The whole model, not model.parameters(): hooks attach to its Linear layers.
    opt = KFAC(model, lr=0.02, damping=0.1, curvature_every=1, inverse_every=10)

    for epoch in range(epochs):
        order = train[torch.randperm(len(train))]
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():  # records nothing: no statistics under no_grad
            loss = F.cross_entropy(model(x[train]), y[train]).item()
            acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        print(f"epoch {epoch + 1}: train loss {loss:.4f}  test accuracy {acc:.3f}")
    return loss


if __name__ == "__main__":
    main()
