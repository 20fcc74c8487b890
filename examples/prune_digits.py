"""Prune a digits MLP with M-FAC Optimal Brain Surgeon, fine-tune with the mask kept exact.

python examples/prune_digits.py                    # 90% one-shot (4 recomputations), 5 epochs
python examples/prune_digits.py --sparsity 0.95    # harder
python examples/prune_digits.py --smoke            # small settings, for tests

Trains a dense 64-128-64-10 MLP, prunes its Linear weights with ``MFACPruner`` (the static
blocked inverse Fisher from 128 gradients) and, for comparison, with ``MagnitudePruner``, then
fine-tunes the M-FAC-pruned model with SGD while ``masks.attach(opt)`` keeps the pruned weights
at zero. Last line: ``result: mfac accuracy X  magnitude accuracy Y  finetuned accuracy Z``.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from secondorder.prune import MagnitudePruner, MFACPruner


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--ngrads", type=int, default=128, help="gradients in the inverse (m)")
    parser.add_argument("--nrecomps", type=int, default=4, help="recomputation steps")
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
    parser.add_argument("--smoke", action="store_true", help="small settings, for tests")
    args = parser.parse_args(argv)
    dense_epochs = 4 if args.smoke else 20
    ngrads, epochs = (32, 1) if args.smoke else (args.ngrads, args.epochs)

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]

    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            return (model(x[test]).argmax(1) == y[test]).float().mean().item()

    def train_epochs(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
        gen = torch.Generator().manual_seed(1)
        for _ in range(n):
            order = train[torch.randperm(len(train), generator=gen)]
            for i in range(0, len(order), 64):
                idx = order[i : i + 64]
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()

    torch.manual_seed(0)
    dense = nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10)
    )
    train_epochs(dense, torch.optim.SGD(dense.parameters(), lr=0.05, momentum=0.9), dense_epochs)
    print(f"dense: test accuracy {accuracy(dense):.3f}")

    # One gradient per mini-batch of 16 training examples, cycled as needed.
    batches = [(x[train[i : i + 16]], y[train[i : i + 16]]) for i in range(0, len(train), 16)]
    model = copy.deepcopy(dense)
    pruner = MFACPruner(model, batches, F.cross_entropy, ngrads=ngrads, damping=1e-5)
    masks = pruner.prune(args.sparsity, nrecomps=args.nrecomps)
    baseline = copy.deepcopy(dense)
    MagnitudePruner(baseline).prune(args.sparsity)
    results = {"mfac": accuracy(model), "magnitude": accuracy(baseline)}
    print(
        f"{masks.sparsity():.0%} sparse: M-FAC OBS accuracy {results['mfac']:.3f}, "
        f"magnitude {results['magnitude']:.3f}"
    )

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    masks.attach(opt)  # the pruned weights are zeroed again after every step
    train_epochs(model, opt, epochs)
    results["finetuned"] = accuracy(model)
    results["sparsity"] = masks.sparsity()
    print(
        f"result: mfac accuracy {results['mfac']:.4f}  magnitude accuracy "
        f"{results['magnitude']:.4f}  finetuned accuracy {results['finetuned']:.4f}"
    )
    return results


if __name__ == "__main__":
    main()
