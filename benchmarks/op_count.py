"""Count the aten operations and host synchronisations of one optimizer step.

On a GPU every aten operation is (at least) one kernel launch, so a step that dispatches
thousands of small operations is launch-bound long before it is compute-bound. This script
counts, with a ``TorchDispatchMode``, the aten operations one ``opt.step()`` dispatches —
a *plain* step (no statistics update, no refresh: what most steps are) and a step that
updates the statistics and refreshes — and the host synchronisations (``aten::item``,
``aten::_local_scalar_dense``, copies to the CPU from another device, ``is_nonzero``) among
them.

Usage::

    python benchmarks/op_count.py                       # CIFAR ResNet-20, every optimizer
    python benchmarks/op_count.py --model resnet20 --opt sgd,kfac --json out.json

The model runs on the CPU (the count does not depend on the device, except that on the
CPU a copy to the host is not a synchronisation: the ``.item()``-like calls are counted
either way). Numbers are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from secondorder import base_updates
from secondorder.bench.models import cifar_resnet
from secondorder.bench.optimizers import OPTIMIZERS

#: aten operations that make the host wait for the device
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")
#: aten operations that only make a new view (no kernel runs on a GPU)
VIEW_OPS = frozenset(
    f"aten::{name}"
    for name in (
        "view",
        "_unsafe_view",
        "expand",
        "transpose",
        "t",
        "permute",
        "unsqueeze",
        "squeeze",
        "select",
        "slice",
        "as_strided",
        "alias",
        "detach",
        "split",
        "split_with_sizes",
        "unbind",
        "reshape",
        "_reshape_alias",
        "diagonal",
        "narrow",
    )
)


class OpCounter(TorchDispatchMode):
    """Counts every aten operation dispatched inside it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func._schema.name)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        """The operations that are not views: on a GPU, kernel launches."""
        return sum(n for name, n in self.ops.items() if name not in VIEW_OPS)

    @property
    def syncs(self) -> int:
        return sum(n for name, n in self.ops.items() if name in SYNC_OPS)


def count_step(opt: torch.optim.Optimizer) -> OpCounter:
    """The operations of one ``opt.step()`` (the gradients are already there)."""
    counter = OpCounter()
    with counter:
        opt.step()
    return counter


def _model(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if name.startswith("resnet"):
        depth = int(name.removeprefix("resnet"))
        model = cifar_resnet(depth, 10)
        x = torch.randn(8, 3, 32, 32)
    else:
        raise ValueError(f"--model must be resnetN (CIFAR ResNet of depth N), got {name!r}")
    return model, x, torch.randint(0, 10, (8,))


def measure(name: str, model_name: str, hparams: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plain-step and curvature-step operation counts of optimizer ``name`` (the bench's
    registry) on ``model_name``, with intervals that make step 1 a plain step."""
    model, x, y = _model(model_name)
    spec = OPTIMIZERS[name]
    config = spec.config_class
    kwargs: dict[str, Any] = {"lr": 0.01}
    if config is not None:
        fields = {f for f in spec.hyperparameter_names()}
        interval = config.statistics_interval
        if interval in fields:
            kwargs[interval] = 1000
        if "inverse_every" in fields:
            kwargs["inverse_every"] = 1000
    kwargs.update(hparams or {})
    opt = spec.build(model, **kwargs)
    create_graph = spec.create_graph

    def backward() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward(create_graph=create_graph and getattr(opt, "needs_hessian", False))

    backward()
    first = count_step(opt)  # step 0: statistics and refresh
    backward()
    plain = count_step(opt)  # step 1: neither is due
    return {
        "optimizer": name,
        "model": model_name,
        "plain_ops": plain.total,
        "plain_kernels": plain.kernels,
        "plain_syncs": plain.syncs,
        "curvature_ops": first.total,
        "curvature_kernels": first.kernels,
        "curvature_syncs": first.syncs,
        "top_plain_ops": plain.ops.most_common(8),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20", help="resnetN (default: resnet20)")
    parser.add_argument(
        "--opt",
        default="sgd,adam,kfac,ekfac,twolevel,mfac,adafisher,adahessian",
        help="comma-separated bench optimizers",
    )
    parser.add_argument("--json", default=None, help="write the rows to this file")
    parser.add_argument(
        "--foreach",
        action="store_true",
        help="multi-tensor base updates, as torch chooses them on a GPU (on the CPU torch "
        "loops over the parameters)",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.opt.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; choose from {', '.join(OPTIMIZERS)}")
    if args.foreach:
        base_updates.FOREACH = True
    rows = []
    print(
        "| optimizer | plain step: aten ops | not views | syncs | curvature step: aten ops "
        "| not views | syncs |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in names:
        row = measure(name, args.model, {"ngrads": 8} if "mfac" in name else None)
        rows.append(row)
        print(
            f"| {name} | {row['plain_ops']} | {row['plain_kernels']} | {row['plain_syncs']} | "
            f"{row['curvature_ops']} | {row['curvature_kernels']} | {row['curvature_syncs']} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "model": args.model,
                    "foreach": args.foreach,
                    "torch": torch.__version__,
                    "rows": rows,
                },
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
