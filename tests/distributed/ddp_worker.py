"""Data-parallel training run for the distributed tests (launched with torchrun, or called
in-process with ``world_size=1`` on the whole batch as the reference).

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/distributed/ddp_worker.py --opt kfac --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

GLOBAL_BATCH = 64  # more examples than any factor's size: full-rank factors, unique eigenbases
STEPS = int(os.environ.get("DDP_STEPS", "6"))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 8),
        nn.LayerNorm(8),
        nn.Tanh(),
        nn.Linear(8, 5),
    )


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(GLOBAL_BATCH, 1, 4, 4, generator=g),
            torch.randint(0, 5, (GLOBAL_BATCH,), generator=g),
        )
        for _ in range(STEPS)
    ]


def make_optimizer(name: str, model: nn.Module):
    import secondorder as so

    common = {"curvature_every": 1, "inverse_every": 2}
    if os.environ.get("DDP_FLOAT64"):
        common.update(factor_dtype=torch.float64, inverse_dtype=torch.float64)
    wide = {"factor_dtype": torch.float64} if os.environ.get("DDP_FLOAT64") else {}
    if name == "kfac":
        return so.KFAC(model, lr=0.1, damping=1e-2, kl_clip=None, **common)
    if name == "kfac-cholesky":
        return so.KFAC(
            model,
            lr=0.1,
            damping=1e-2,
            inverse_method="cholesky",
            damping_mode="factored",
            kl_clip=None,
            **common,
        )
    if name == "ekfac":
        return so.EKFAC(model, lr=0.1, damping=1e-2, kl_clip=None, **common)
    if name == "twolevel":
        return so.TwoLevelKFAC(
            model, lr=0.1, damping=1e-2, coarse_damping=1.0, kl_clip=None, **common
        )
    if name == "adafisher":
        return so.AdaFisher(model, lr=1e-2, **wide)
    if name == "adafisherw":
        return so.AdaFisherW(model, lr=1e-2, **wide)
    if name == "adahessian":  # averages gradients and Hessian estimates itself (no DDP)
        return so.AdaHessian(model, lr=0.05)
    if name == "mfac":
        return so.MFAC(model.parameters(), lr=0.1, base="sgd", ngrads=4, damping=0.1)
    # No hooks: the estimators see DDP's averaged gradients. ε well above the float32
    # round-off of the statistics' near-null directions (1e-12 and 1e-8 would amplify the
    # ranks' other summation order: SOAP's first basis diagonalises G itself). SOAP rotates
    # only the sides of at most 5 (the conv's and the last Linear's rows): the first basis
    # comes from one gradient, and a wider side's statistic is rank-deficient there, its
    # null space's basis set by round-off, which Adam's coordinate-wise step is not
    # invariant to (two processes would rightly differ)
    if name == "shampoo":
        return so.Shampoo(model.parameters(), lr=1e-2, damping=1e-4, inverse_every=2)
    if name == "soap":
        return so.SOAP(
            model.parameters(), lr=1e-2, soap_eps=1e-4, inverse_every=2, max_factor_dim=5
        )
    raise ValueError(name)


class TwoHeads(nn.Module):
    """A body and two heads; ``head`` picks the one a forward pass uses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(16, 8)
        self.a = nn.Linear(8, 5)
        self.b = nn.Linear(8, 5)
        self.head = "a"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x.flatten(1)))
        return (self.a if self.head == "a" else self.b)(h)


def train(name: str, rank: int, world_size: int) -> tuple[nn.Module, object]:
    """Train ``name`` for STEPS steps on this rank's share of each global batch.

    ``kfac-partial``: at odd steps rank 0 runs head ``a`` and the others head ``b``, so
    each head's layer is recorded on some ranks only (in one process: both heads, each on
    half of the batch). ``kfac-amp``: K-FAC in a GradScaler loop (a power-of-two scale,
    exact), which must give K-FAC's parameters."""
    partial = name == "kfac-partial"
    scaler = None
    if name == "kfac-amp":
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10**6)
    model = TwoHeads() if partial else make_model()
    if os.environ.get("DDP_FLOAT64"):
        model = model.double()
    device = torch.device("cpu")
    if world_size > 1 and dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    model = model.to(device)
    net: nn.Module = model
    if world_size > 1 and name != "adahessian":  # DDP cannot run a double backward
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=partial)
    opt = make_optimizer("kfac" if partial or scaler else name, model)
    per_rank = GLOBAL_BATCH // world_size
    dtype = next(model.parameters()).dtype
    for step, (x, y) in enumerate(batches()):
        x, y = x.to(device, dtype), y.to(device)
        opt.zero_grad()
        if partial and step % 2 == 1:
            halves = [
                (x[: GLOBAL_BATCH // 2], y[: GLOBAL_BATCH // 2], "a"),
                (x[GLOBAL_BATCH // 2 :], y[GLOBAL_BATCH // 2 :], "b"),
            ]
            if world_size > 1:
                xs, ys, model.head = halves[min(rank, 1)]
                (F.cross_entropy(net(xs), ys) / world_size).backward()
            else:
                for xs, ys, head in halves:
                    model.head = head
                    (F.cross_entropy(net(xs), ys) / 2).backward()
            model.head = "a"
        else:
            xs = x[rank * per_rank : (rank + 1) * per_rank]
            ys = y[rank * per_rank : (rank + 1) * per_rank]
            loss = F.cross_entropy(net(xs), ys)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                continue
            loss.backward(create_graph=name == "adahessian")
        opt.step()
    return model, opt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--opts", required=True, help="comma-separated names")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    backend = os.environ.get("DDP_BACKEND", "gloo")
    if backend == "nccl":
        # float32 on the GPU as on the CPU reference: no TF32 matmuls or convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    for name in args.opts.split(","):
        model, opt = train(name, rank, world)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save(state, out / f"{name}_rank{rank}.pt")
        comm = getattr(opt, "comm", None)
        info = {
            "world": world,
            "comm": comm is not None,
            "assignment": getattr(comm, "last_assignment", None),
            "dropped": getattr(comm, "dropped_layer_updates", None),
        }
        (out / f"{name}_rank{rank}.json").write_text(json.dumps(info))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
