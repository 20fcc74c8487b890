"""Shampoo and SOAP against AdamW: the cost of a training iteration on the CPU (issue 21).

Two models, in one process, methods interleaved round by round, the fastest round kept (the
load average is printed: the machine may be shared):

* ``resnet20``: the CIFAR ResNet-20 of ``secondorder.bench.models.cifar_resnet(20, 10)``,
  batch 128 of 3x32x32 inputs;
* ``gpt``: the bench's ``CharGPT`` with 2 layers (width 128, 4 heads, context 64, vocabulary
  65), batch 32 x 64 characters.

Per method and round: a fresh model (same seed), ``--warmup`` iterations, then ``--window``
whole training iterations (zero_grad, forward, backward, step) timed one by one. With the
refresh every 10 steps (``inverse_every=10``) a window of 10 holds exactly one refresh, so its
mean is the steady-state cost per iteration; ``step`` is the ``optimizer.step()`` share of it.
``vs AdamW`` is the ratio of the fastest iterations. On a shared machine the forward and
backward passes (the same model and batch for every method) can vary by 2x from one method's
window to the next, so ``est. vs AdamW`` gives the ratio with the fastest forward + backward
seen by any method as the common part: ``(fb + step) / (fb + AdamW's step)``.
``--clock cpu`` times with ``time.process_time`` (the CPU time of this process, one torch
thread: time spent waiting for a core on a shared machine is left out, cache contention is
not) instead of the wall clock.
Also printed: the optimizer state (bytes of every tensor an optimizer keeps, the
preconditioner's statistics and roots included) against AdamW's.

Methods: ``adamw``; ``shampoo`` / ``soap`` (``secondorder.Shampoo`` / ``secondorder.SOAP``,
``inverse_every=10``, their other defaults); ``shampoo-t128`` (Shampoo with
``max_factor_dim=128``: tiles of at most 128 x 128); ``shampoo-split`` (Shampoo with
``merge_dims=False``: one factor per dimension of a conv weight); ``soap-merged`` (SOAP with
``merge_dims=True``: a conv weight as one matrix); and, if ``pytorch_optimizer`` is installed,
``po-shampoo`` (its ``Shampoo``, ``preconditioning_compute_steps=10``), ``po-scalable``
(``ScalableShampoo``, ``preconditioning_compute_steps=10``, ``start_preconditioning_step=1``)
and ``po-soap`` (``SOAP``, ``precondition_frequency=10``).

Usage::

    python benchmarks/bench_shampoo.py [resnet20] [gpt] [--rounds 2] [--window 10]
        [--opt adamw,shampoo,soap,shampoo-split,soap-merged,shampoo-t128,po-shampoo,po-scalable,
               po-soap]
        [--clock cpu]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from secondorder import SOAP, Shampoo
from secondorder.bench.models import CharGPT, cifar_resnet

_VOCAB, _CONTEXT = 65, 64


def _resnet20() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    torch.manual_seed(0)
    model = cifar_resnet(20, 10)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)
    return model, lambda m: F.cross_entropy(m(x), y)


def _gpt() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    torch.manual_seed(0)
    model = CharGPT(_VOCAB, context=_CONTEXT, dim=128, layers=2, heads=4)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, _VOCAB, (32, _CONTEXT + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    return model, lambda m: F.cross_entropy(m(x).flatten(0, 1), y.flatten())


MODELS = {"resnet20": _resnet20, "gpt": _gpt}


def _factories() -> dict[str, Callable[[nn.Module], torch.optim.Optimizer]]:
    out: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
        "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
        "shampoo": lambda m: Shampoo(m.parameters(), lr=1e-3, inverse_every=10),
        "soap": lambda m: SOAP(m.parameters(), lr=3e-3, inverse_every=10),
        # a conv weight as one matrix (out, in·k·k), as before per-dimension factors
        "soap-merged": lambda m: SOAP(m.parameters(), lr=3e-3, inverse_every=10, merge_dims=True),
        # one factor per dimension of a conv weight (64, 64, 3, 3), as the SOAP default
        "shampoo-split": lambda m: Shampoo(
            m.parameters(), lr=1e-3, inverse_every=10, merge_dims=False
        ),
        # tiles of at most 128 rows and columns: cheaper statistics, roots and refresh
        "shampoo-t128": lambda m: Shampoo(
            m.parameters(), lr=1e-3, inverse_every=10, max_factor_dim=128
        ),
    }
    try:
        import pytorch_optimizer as po
    except ImportError:
        return out
    out["po-shampoo"] = lambda m: po.Shampoo(
        m.parameters(), lr=1e-3, preconditioning_compute_steps=10
    )
    out["po-scalable"] = lambda m: po.ScalableShampoo(
        m.parameters(), lr=1e-3, preconditioning_compute_steps=10, start_preconditioning_step=1
    )
    out["po-soap"] = lambda m: po.SOAP(m.parameters(), lr=3e-3, precondition_frequency=10)
    return out


def _tensors(obj, seen: set[int], depth: int = 0):
    """Every tensor reachable from ``obj`` through dicts, lists, tuples and ``__slots__`` /
    ``__dict__`` attributes (a few levels deep)."""
    if depth > 6 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, torch.Tensor):
                yield from _tensors(k, seen, depth + 1)
            yield from _tensors(v, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _tensors(v, seen, depth + 1)
    elif isinstance(obj, (int, float, str, bool, type(None), nn.Module, nn.Parameter)):
        return
    else:
        names = list(getattr(obj, "__slots__", ())) + list(getattr(obj, "__dict__", {}))
        for name in names:
            if hasattr(obj, name):
                yield from _tensors(getattr(obj, name), seen, depth + 1)


def state_bytes(opt: torch.optim.Optimizer, model: nn.Module) -> int:
    """Bytes of the tensors the optimizer keeps (its ``state`` and, for secondorder's, its
    estimator), the parameters and their gradients excluded; shared storages counted once."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    roots = [dict(opt.state)]
    if getattr(opt, "estimator", None) is not None:
        roots.append(opt.estimator)
    seen: set[int] = set()
    storages = {}
    for root in roots:
        for t in _tensors(root, seen):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip:
                storages[ptr] = t.untyped_storage().nbytes()
    return sum(storages.values())


CLOCK = time.perf_counter  # --clock cpu: time.process_time


def _iteration(model: nn.Module, opt, loss_fn) -> tuple[float, float]:
    start = CLOCK()
    opt.zero_grad()
    loss_fn(model).backward()
    mid = CLOCK()
    opt.step()
    end = CLOCK()
    return end - start, end - mid


def bench(name: str, methods: list[str], rounds: int, warmup: int, window: int) -> None:
    factories = _factories()
    best: dict[str, dict[str, float]] = {}
    fastest_fb = float("inf")
    state: dict[str, int] = {}
    for r in range(rounds):
        for method in methods:
            model, loss_fn = MODELS[name]()
            opt = factories[method](model)
            for _ in range(warmup):
                _iteration(model, opt, loss_fn)
            times = [_iteration(model, opt, loss_fn) for _ in range(window)]
            it = sum(t for t, _ in times) / window
            st = sum(s for _, s in times) / window
            fastest_fb = min(fastest_fb, it - st)
            slot_ = best.setdefault(method + " step", {"step": float("inf")})
            slot_["step"] = min(slot_["step"], st)
            slot = best.setdefault(method, {"iter": float("inf"), "step": float("inf")})
            if it < slot["iter"]:
                slot.update(iter=it, step=st, slowest=max(s for _, s in times))
            state[method] = state_bytes(opt, model)
            print(f"{name} round {r} {method}: iteration {it * 1e3:.1f} ms, step "
                  f"{st * 1e3:.1f} ms (slowest step {max(s for _, s in times) * 1e3:.0f} ms); "
                  f"load {os.getloadavg()}", flush=True)  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    ref = best.get("adamw")
    print(f"\n{name} ({params} parameters): mean of {window} iterations after {warmup}, "
          f"fastest of {rounds} rounds; load {os.getloadavg()}")  # fmt: skip
    print(
        f"forward + backward: fastest mean over a window {fastest_fb * 1e3:.1f} ms; step: "
        "fastest mean over a window of each method"
    )
    print(f"{'':12} {'iter ms':>9} {'step ms':>9} {'max step':>9} {'vs AdamW':>9} "
          f"{'est. vs AdamW':>14} {'state MiB':>10} {'vs AdamW':>9}")  # fmt: skip
    for method in methods:
        t = best[method]
        ratio = t["iter"] / ref["iter"] if ref else float("nan")
        s_ratio = state[method] / state["adamw"] if ref else float("nan")
        step = best[method + " step"]["step"]
        est = (fastest_fb + step) / (fastest_fb + best["adamw step"]["step"]) if ref else ratio
        print(f"{method:12} {t['iter'] * 1e3:9.1f} {step * 1e3:9.1f} "
              f"{t['slowest'] * 1e3:9.0f} {ratio:9.3f} {est:14.3f} {state[method] / 2**20:10.2f} "
              f"{s_ratio:9.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", nargs="*", default=["resnet20", "gpt"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--opt", default=None, help="comma-separated methods (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="cpu: this process's CPU time"
    )
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    methods = args.opt.split(",") if args.opt else list(_factories())
    unknown = set(methods) - set(_factories())
    if unknown:
        parser.error(f"unknown or unavailable methods {sorted(unknown)} (pytorch_optimizer?)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, {args.clock} clock, load {os.getloadavg()}",
          flush=True)  # fmt: skip
    for name in args.what:
        bench(name, methods, args.rounds, args.warmup, args.window)


if __name__ == "__main__":
    main()
