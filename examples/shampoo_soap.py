"""Shampoo and SOAP against Adam on scikit-learn's digits, each with its library defaults.

python examples/shampoo_soap.py                    # 10 epochs each, about 10 s on one core
python examples/shampoo_soap.py --opt soap,adam    # a subset
python examples/shampoo_soap.py --smoke            # one epoch, for tests

The same MLP (64-64-10, tanh), the same initial weights and the same batches for every
optimizer; only ``lr`` is set for Adam (``torch.optim.Adam``'s default 1e-3 is slow here),
Shampoo and SOAP take their library defaults (``secondorder.Shampoo(params)``: Adam-grafted
``L^-1/4 G R^-1/4``, roots every step; ``secondorder.SOAP(params)``: Adam in the eigenbasis of
Shampoo's statistics, basis every 10 steps). Printed per epoch: the train loss and the test
accuracy; at the end, for each optimizer, the step at which the mean of the last 10 batch
losses first fell below 0.1 (the bench's digits target), the time per step and the final
train loss.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from secondorder import SOAP, Shampoo

OPTIMIZERS = {
    "shampoo": lambda params: Shampoo(params),
    "soap": lambda params: SOAP(params),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
}
TARGET = 0.1


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--opt", default=",".join(OPTIMIZERS), help="comma-separated")
    parser.add_argument("--smoke", action="store_true", help="one epoch only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.opt.split(",") if n.strip()]
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown or not names:
        parser.error(f"--opt takes names among {sorted(OPTIMIZERS)}, got {args.opt!r}")
    epochs = 1 if args.smoke else args.epochs
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # small matrices: more threads only contend
    try:
        return _compare(names, epochs)
    finally:
        torch.set_num_threads(threads)


def _compare(names: list[str], epochs: int) -> dict[str, float]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    order = torch.Generator().manual_seed(1)
    batches = [train[torch.randperm(len(train), generator=order)].split(64) for _ in range(epochs)]

    finals: dict[str, float] = {}
    summary = []
    for name in names:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
        opt = OPTIMIZERS[name](model.parameters())
        losses: list[float] = []
        reached = None
        elapsed = 0.0
        for epoch in range(epochs):
            for idx in batches[epoch]:
                start = time.perf_counter()
                opt.zero_grad()
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                elapsed += time.perf_counter() - start
                losses.append(loss.item())
                if reached is None and len(losses) >= 10 and sum(losses[-10:]) / 10 <= TARGET:
                    reached = len(losses)
            with torch.no_grad():
                train_loss = F.cross_entropy(model(x[train]), y[train]).item()
                acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
            print(f"{name} epoch {epoch + 1}: train loss {train_loss:.4f}  test accuracy {acc:.3f}")
        finals[name] = train_loss
        steps = "never" if reached is None else f"at step {reached}"
        summary.append(
            f"{name}: target {TARGET} {steps}, {elapsed / len(losses) * 1e3:.2f} ms/step, "
            f"train loss {train_loss:.4f}, test accuracy {acc:.3f}"
        )
    print("\n".join(summary))
    print("final train loss: " + ", ".join(f"{n} {v:.4f}" for n, v in finals.items()))
    return finals


if __name__ == "__main__":
    main()
