"""K-FAC on a timm ResNet-18 (convolutions and BatchNorm layers preconditioned), timed per step.

python examples/kfac_timm_resnet.py --data DIR    # CIFAR-10 in DIR/cifar-10-batches-py
python examples/kfac_timm_resnet.py               # random images and labels: timing only
python examples/kfac_timm_resnet.py --smoke       # batch 8, 2 steps, for tests

Statistics every 10 steps, inverses every 100. The default --inverse-method cholesky with
factored damping is for CPUs: the first eigendecompositions of the 4608-wide conv factors
took 128 s on a 2-core CPU (cholesky: 8 s); use --inverse-method eigen on a GPU.
Last line: ``result: loss X  step Y ms (mean after the first)``.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import time

import timm
import torch
import torch.nn.functional as F

from secondorder import KFAC


def batches(args: argparse.Namespace):
    if args.data:
        from torchvision import datasets, transforms

        norm = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        tf = transforms.Compose([transforms.ToTensor(), norm])
        data = datasets.CIFAR10(args.data, train=True, download=False, transform=tf)
        print(f"data: CIFAR-10 from {args.data} ({len(data)} training images)")
        return torch.utils.data.DataLoader(data, args.batch, shuffle=True, num_workers=2)
    print("data: RANDOM 32x32 images with random labels (no --data given): timing only")
    g = torch.Generator().manual_seed(0)
    n = args.batch * (args.steps or 20)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return list(zip(x.split(args.batch), y.split(args.batch), strict=True))


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder holding cifar-10-batches-py (no download)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--inverse-method", choices=["cholesky", "eigen"], default="cholesky")
    parser.add_argument("--smoke", action="store_true", help="batch 8, 2 steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.steps, args.epochs = 8, 2, 1

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, pretrained=False)
    opt = KFAC(
        model,
        lr=args.lr,
        damping=0.01,
        curvature_every=10,
        inverse_every=100,
        inverse_method=args.inverse_method,
        damping_mode="eigen" if args.inverse_method == "eigen" else "factored",
        weight_decay=5e-4,
    )
    kinds = collections.Counter(type(layer.module).__name__ for layer in opt.estimator.layers)
    print(f"covered: {dict(kinds)}; base update only: {opt.uncovered_parameters or 'none'}")

    data, times = batches(args), []
    stream = ((epoch, x, y) for epoch in range(args.epochs) for x, y in data)
    model.train()  # statistics are recorded in train mode only
    for step, (epoch, x, y) in enumerate(itertools.islice(stream, args.steps)):
        start = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        if step % 10 == 0 or args.smoke:
            print(f"epoch {epoch + 1} step {step}: loss {loss.item():.4f}  {times[-1]:.3f} s")
    later = times[1:] or times
    print(f"first step (factors + first inverses): {times[0]:.2f} s")
    print(f"result: loss {loss.item():.4f}  step {1e3 * sum(later) / len(later):.1f} ms")
    return loss.item()


if __name__ == "__main__":
    main()
