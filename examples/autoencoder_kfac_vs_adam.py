"""A deep autoencoder trained with K-FAC and with Adam from the same initial weights.

python examples/autoencoder_kfac_vs_adam.py               # scikit-learn digits, 8x8 pixels
python examples/autoencoder_kfac_vs_adam.py --data DIR    # MNIST in DIR/MNIST/raw (no download)
python examples/autoencoder_kfac_vs_adam.py --smoke       # one epoch on digits, for tests

MNIST: the 784-1000-500-250-30-250-500-1000-784 sigmoid network of Hinton & Salakhutdinov;
digits: a scaled-down 64-32-16-8-16-32-64 tanh one. Code layer linear, logits out, binary
cross-entropy loss. Last line: ``result: kfac test mse X  adam test mse Y``.
Both first sit on the plateau of the mean image (digits test mse 0.0734); at the lrs of the
bench (K-FAC 0.02, Adam 1e-3) neither leaves it in 20 epochs, hence the defaults here.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

from secondorder import KFAC


def autoencoder(sizes: list[int], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if 0 < i + 1 < len(sizes) - 1 and sizes[i + 1] != min(sizes):  # linear code layer
            layers.append(act())
    return nn.Sequential(*layers)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder holding MNIST/raw (torchvision layout)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--kfac-lr", type=float, default=0.1)
    parser.add_argument("--adam-lr", type=float, default=1e-2)
    parser.add_argument("--smoke", action="store_true", help="one epoch only")
    args = parser.parse_args(argv)
    epochs = 1 if args.smoke else args.epochs

    torch.manual_seed(0)
    if args.data:
        from torchvision.datasets import MNIST

        train = MNIST(args.data, train=True, download=False).data.reshape(-1, 784) / 255.0
        test = MNIST(args.data, train=False, download=False).data.reshape(-1, 784) / 255.0
        init = autoencoder([784, 1000, 500, 250, 30, 250, 500, 1000, 784], nn.Sigmoid)
        print(f"data: MNIST from {args.data}, 28x28 ({len(train)} train, {len(test)} test)")
    else:
        from sklearn.datasets import load_digits

        x = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
        train, test = x[:1400], x[1400:]
        init = autoencoder([64, 32, 16, 8, 16, 32, 64], nn.Tanh)
        print("data: scikit-learn digits at their own 8x8 resolution (no --data given)")

    optimizers = {
        "kfac": lambda m: KFAC(
            m, lr=args.kfac_lr, damping=0.01, curvature_every=1, inverse_every=10
        ),
        "adam": lambda m: torch.optim.Adam(m.parameters(), lr=args.adam_lr),
    }
    results = {}
    for name, make in optimizers.items():
        model = copy.deepcopy(init)  # same initial weights and batch order for both
        opt = make(model)
        order_gen = torch.Generator().manual_seed(1)
        for epoch in range(epochs):
            for idx in torch.randperm(len(train), generator=order_gen).split(args.batch):
                opt.zero_grad()
                F.binary_cross_entropy_with_logits(model(train[idx]), train[idx]).backward()
                opt.step()
            with torch.no_grad():
                bce = F.binary_cross_entropy_with_logits(model(train), train).item()
                mse = F.mse_loss(torch.sigmoid(model(test)), test).item()
            print(f"{name} epoch {epoch + 1}: train bce {bce:.4f}  test mse {mse:.5f}")
        results[name] = mse
    print(f"result: kfac test mse {results['kfac']:.5f}  adam test mse {results['adam']:.5f}")
    return results


if __name__ == "__main__":
    main()
