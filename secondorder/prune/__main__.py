"""``python -m secondorder.prune``: one-shot and gradual pruning, M-FAC OBS against magnitude.

Runs on any bench task (``--task``, default digits-mlp: scikit-learn's digits, no data
needed). Starts from ``--checkpoint`` (a model ``state_dict`` or a pruning checkpoint) or
trains the dense model first (SGD, ``--pretrain-epochs``). Prints a table and writes
``results.json`` and one checkpoint (model + masks) per run into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..bench.runner import resolve_task
from ..bench.tasks import DEFAULT_TASK, TASKS, Task, TaskData, set_data_dir
from .pruner import GradualSchedule, MagnitudePruner, Masks, MFACPruner, save_checkpoint

METHODS = ("mfac", "magnitude")
OPTIMS = ("sgd", "adam", "mfac")


def _list(kind: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {text!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {what}")
        return values

    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0 <= value < 1):
        raise ValueError(text)
    return value


def _method(text: str) -> str:
    if text not in METHODS:
        raise ValueError(text)
    return text


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or (isinstance(value, float) and math.isinf(value)):
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def _block_size(text: str) -> int | None:
    if text == "full":
        return None
    return _positive(int)(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m secondorder.prune",
        description="Prune a model with M-FAC Optimal Brain Surgeon (static inverse Fisher from "
        "--ngrads gradients) and/or magnitude pruning, one-shot or gradually, and report the "
        "test metric per sparsity. Writes results.json and a checkpoint (model + masks) per run.",
        epilog="examples:\n"
        "  python -m secondorder.prune                       # one-shot 50/75/90%, both methods\n"
        "  python -m secondorder.prune --mode gradual --sparsities 0.5,0.75,0.9 "
        "--prune-every 2 --prune-lrs 0.05,0.005 --epochs 8\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tasks = ", ".join(TASKS)
    p.add_argument(
        "--task", default=DEFAULT_TASK, help=f"bench task: {tasks} (default: %(default)s)"
    )
    p.add_argument("--data", type=Path, help="data folder for the real-data tasks")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="start from this model state_dict or pruning checkpoint (default: train the dense "
        "model first)",
    )
    p.add_argument(
        "--pretrain-epochs",
        type=_positive(int),
        help="dense SGD epochs when no --checkpoint is given (default: the task's)",
    )
    p.add_argument(
        "--method",
        type=_list(_method, f"methods ({', '.join(METHODS)})"),
        default=list(METHODS),
        help="comma-separated pruners (default: mfac,magnitude)",
    )
    p.add_argument(
        "--sparsities",
        type=_list(_fraction, "fractions in [0, 1)"),
        default=[0.5, 0.75, 0.9],
        help="one-shot: each target from the dense model; gradual: the increasing steps "
        "(default: 0.5,0.75,0.9)",
    )
    p.add_argument("--mode", choices=("oneshot", "gradual"), default="oneshot")
    p.add_argument(
        "--nrecomps",
        type=_positive(int),
        default=4,
        help="M-FAC recomputation steps per pruning step, densities interpolated "
        "geometrically (default: %(default)s)",
    )
    p.add_argument("--ngrads", type=_positive(int), default=128, help="m (default: %(default)s)")
    p.add_argument(
        "--grad-batch-size",
        type=_positive(int),
        default=16,
        help="examples per gradient (default: %(default)s)",
    )
    p.add_argument(
        "--block-size",
        type=_block_size,
        default=128,
        help="B of the blocked inverse, or 'full' (default: %(default)s)",
    )
    p.add_argument(
        "--damping", type=_positive(float), default=1e-5, help="λ (default: %(default)s)"
    )
    p.add_argument("--pages", type=_positive(int), default=1, help="column pages (default: 1)")
    p.add_argument(
        "--scope",
        choices=("global", "layer"),
        default="global",
        help="one threshold over all layers, or the same sparsity per layer (default: global)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=0,
        help="fine-tuning epochs after one-shot pruning; gradual: total epochs (at least "
        "len(sparsities) * prune-every) (default: %(default)s)",
    )
    p.add_argument(
        "--prune-every", type=_positive(int), default=2, help="gradual: epochs between steps"
    )
    p.add_argument(
        "--prune-lrs",
        type=_list(_positive(float), "learning rates"),
        help="gradual: learning rate of each epoch between two steps (prune-every values)",
    )
    p.add_argument("--optim", choices=OPTIMS, default="sgd", help="fine-tuning optimizer")
    p.add_argument("--lr", type=_positive(float), default=0.05, help="fine-tuning learning rate")
    p.add_argument(
        "--batch-size", type=_positive(int), help="training batch size (default: the task's)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the inverse is computed (default: cpu)")
    p.add_argument("--out", type=Path, help="output folder (default: prune-results/<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _batches(data: TaskData, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    n = len(data.x_train)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield data.x_train[idx], data.y_train[idx]


def _evaluate(model: nn.Module, task: Task, data: TaskData) -> dict[str, float]:
    model.eval()
    try:
        with torch.no_grad():
            train = task.loss_fn(model(data.x_train), data.y_train).item()
            out = model(data.x_test)
            return {"train_loss": train, task.metric_name: task.metric(out, data.y_test)}
    finally:
        model.train()


def _train_epoch(
    model: nn.Module,
    task: Task,
    data: TaskData,
    opt: torch.optim.Optimizer,
    batch_size: int,
    gen: torch.Generator,
) -> None:
    model.train()
    n = len(data.x_train)
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch_size):
        idx = perm[i : i + batch_size]
        opt.zero_grad()
        task.loss_fn(model(data.x_train[idx]), data.y_train[idx]).backward()
        opt.step()


def _optimizer(
    name: str, model: nn.Module, lr: float, masks: Masks | None
) -> torch.optim.Optimizer:
    if name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    elif name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        from .. import MFAC

        opt = MFAC(
            model,
            lr=lr,
            base="sgd",  # SGD-MFAC, as the sgd fine-tuning it is compared with
            ngrads=32,
            window_memory=None,  # m = 32 at any size (1.3 GiB on the CIFAR ResNet-18)
            damping=0.05,
            masks=masks.by_parameter() if masks else None,
        )
    if masks is not None:
        masks.attach(opt)  # exact zeros after every step, whatever the optimizer does
    return opt


def _pruner(
    method: str,
    model: nn.Module,
    args: argparse.Namespace,
    task: Task,
    data: TaskData,
    masks: Masks | None,
):
    if method == "magnitude":
        return MagnitudePruner(model, scope=args.scope, masks=masks)
    return MFACPruner(
        model,
        _batches(data, args.grad_batch_size, args.seed + 1),
        task.loss_fn,
        ngrads=args.ngrads,
        damping=args.damping,
        block_size=args.block_size,
        pages=args.pages,
        device=args.device,
        scope=args.scope,
        masks=masks,
        progress=not args.quiet,
    )


def _prune(pruner, sparsity: float, nrecomps: int) -> Masks:
    if isinstance(pruner, MFACPruner):
        return pruner.prune(sparsity, nrecomps=nrecomps)
    return pruner.prune(sparsity)


def _dense_model(
    args: argparse.Namespace, task: Task, data: TaskData, out: Path, bs: int
) -> nn.Module:
    model = task.build_model(args.seed)
    if args.checkpoint is not None:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"] if "model" in state else state)
        return model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(args.seed)
    epochs = args.pretrain_epochs or task.epochs
    for _ in tqdm(range(epochs), desc="dense training", leave=False, disable=args.quiet or None):
        _train_epoch(model, task, data, opt, bs, gen)
    torch.save(model.state_dict(), out / "dense.pt")
    return model


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the experiment the parsed ``args`` describe; returns what ``results.json`` holds."""
    if args.data is not None:
        set_data_dir(args.data)
    task = resolve_task(args.task)
    data = task.data()
    bs = args.batch_size or task.batch_size
    out = args.out or Path("prune-results") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    schedule = None
    if args.mode == "gradual":
        schedule = GradualSchedule(tuple(args.sparsities), args.prune_every, args.prune_lrs)
    elif args.prune_lrs is not None:
        raise ValueError("--prune-lrs is for --mode gradual")
    if args.epochs < 0:
        raise ValueError(f"--epochs must be >= 0, got {args.epochs}")

    dense = _dense_model(args, task, data, out, bs)
    rows: list[dict[str, Any]] = [
        {"method": "dense", "sparsity": 0.0, **_evaluate(dense, task, data)}
    ]
    for method in args.method:
        if schedule is None:
            for sparsity in args.sparsities:
                model = copy.deepcopy(dense)
                started = time.perf_counter()
                masks = _prune(
                    _pruner(method, model, args, task, data, None), sparsity, args.nrecomps
                )
                row = {
                    "method": method,
                    "sparsity": masks.sparsity(),
                    "prune_s": time.perf_counter() - started,
                    **_evaluate(model, task, data),
                }
                if args.epochs:
                    opt = _optimizer(args.optim, model, args.lr, masks)
                    gen = torch.Generator().manual_seed(args.seed)
                    for _ in range(args.epochs):
                        _train_epoch(model, task, data, opt, bs, gen)
                    row["finetuned"] = _evaluate(model, task, data)
                    row["sparsity_after_finetuning"] = masks.sparsity()
                save_checkpoint(out / f"{method}_s{sparsity:g}.pt", model, masks, row=row)
                rows.append(row)
        else:
            model = copy.deepcopy(dense)
            masks = None
            pruner = None
            opt = None
            gen = torch.Generator().manual_seed(args.seed)
            epochs = max(args.epochs, schedule.pruning_epochs)
            for epoch in range(epochs):
                target = schedule.sparsity_at(epoch)
                if target is not None:
                    pruner = pruner or _pruner(method, model, args, task, data, None)
                    masks = _prune(pruner, target, args.nrecomps)
                    rows.append(
                        {
                            "method": method,
                            "epoch": epoch,
                            "sparsity": masks.sparsity(),
                            "stage": "pruned",
                            **_evaluate(model, task, data),
                        }
                    )
                    opt = _optimizer(args.optim, model, args.lr, masks)  # fresh for new masks
                lr = schedule.lr_at(epoch) or args.lr
                for group in opt.param_groups:
                    group["lr"] = lr
                _train_epoch(model, task, data, opt, bs, gen)
            final = {
                "method": method,
                "epoch": epochs,
                "sparsity": masks.sparsity(),
                "stage": "final",
            }
            rows.append({**final, **_evaluate(model, task, data)})
            save_checkpoint(out / f"{method}_gradual.pt", model, masks, row=rows[-1])
    results = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    results["out"] = str(out)
    return results


def format_rows(rows: Sequence[dict[str, Any]], metric: str) -> str:
    """The result rows as an aligned text table."""
    header = f"{'method':<10} {'stage':<9} {'sparsity':>8} {'train loss':>10} {metric:>14}"
    lines = [header]
    for r in rows:
        stage = r.get("stage", "one-shot" if r["method"] != "dense" else "dense")
        lines.append(
            f"{r['method']:<10} {stage:<9} {r['sparsity']:>8.3f} {r['train_loss']:>10.4f} "
            f"{r[metric]:>14.4f}"
        )
        if "finetuned" in r:
            f = r["finetuned"]
            lines.append(
                f"{r['method']:<10} {'finetuned':<9} {r['sparsity_after_finetuning']:>8.3f} "
                f"{f['train_loss']:>10.4f} {f[metric]:>14.4f}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        results = run(args)
    except ValueError as exc:
        parser.error(" ".join(str(exc).split()))
    metric = resolve_task(args.task).metric_name
    print(format_rows(results["rows"], metric))
    print(f"\nwrote {Path(results['out']) / 'results.json'} and the checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
