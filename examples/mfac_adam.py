"""Adam-MFAC (M-FAC preconditioning under Adam-style moments) against plain Adam on digits.

python examples/mfac_adam.py                # 10 epochs each, from the same initial weights
python examples/mfac_adam.py --ngrads 64    # a longer gradient window
python examples/mfac_adam.py --smoke        # one epoch, for tests

Both use lr 3e-3 (Adam-MFAC's bench setting on digits). Last line:
``result: adam-mfac train loss X  adam train loss Y``.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from secondorder import MFAC


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ngrads", type=int, default=32, help="M-FAC window size m")
    parser.add_argument("--damping", type=float, default=0.2)
    parser.add_argument("--smoke", action="store_true", help="one epoch only")
    args = parser.parse_args(argv)
    epochs = 1 if args.smoke else args.epochs

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]

    torch.manual_seed(0)
    init = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    optimizers = {
        # parameters work too (no hooks needed); the window covers all of them jointly
        "adam-mfac": lambda m: MFAC(
            m.parameters(), lr=args.lr, base="adam", ngrads=args.ngrads, damping=args.damping
        ),
        "adam": lambda m: torch.optim.Adam(m.parameters(), lr=args.lr),
    }
    results = {}
    for name, make in optimizers.items():
        model = copy.deepcopy(init)  # same initial weights, same batch order
        opt = make(model)
        order_gen = torch.Generator().manual_seed(1)
        for epoch in range(epochs):
            order = train[torch.randperm(len(train), generator=order_gen)]
            for i in range(0, len(order), 64):
                idx = order[i : i + 64]
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
            with torch.no_grad():
                loss = F.cross_entropy(model(x[train]), y[train]).item()
                acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
            print(f"{name} epoch {epoch + 1}: train loss {loss:.4f}  test accuracy {acc:.3f}")
        results[name] = loss
    print(
        f"result: adam-mfac train loss {results['adam-mfac']:.4f}  "
        f"adam train loss {results['adam']:.4f}"
    )
    return results


if __name__ == "__main__":
    main()
