"""K-FAC at scale on the CPU: blocked factors (``max_factor_dim``) and the diagonal fallback.

Two measurements, in one process, methods interleaved round by round, the fastest round
kept (the load average is printed: the machine may be shared):

* ``mlp``: the width-2048 MLP 784-2048-2048-10, batch 128. Per value of ``max_factor_dim``
  (None = whole factors): a plain step (forward, backward, preconditioned step), a step
  that also updates the factors, and a refresh (the eigendecompositions); the cost per
  iteration at K-FAC's defaults (factors every 10 steps, refresh every 100) is
  ``(9 plain + 1 update) / 10 + refresh / 100``, against ``torch.optim.SGD``'s step; with
  ``--grafts none,adam`` each block size also with ``graft="adam"``.
* ``lm``: a 32000-token language model (embedding 256, one MLP block 256-1024-256, untied
  head ``Linear(256, 32000)``), batch 8 x 64 tokens: the time of K-FAC's first 3 steps at
  its defaults (the first one updates and refreshes) and the optimizer state in bytes
  against AdamW's.

Usage::

    python benchmarks/bench_scale.py [mlp] [lm] [--rounds 2] [--blocks none,256,512,1024] \
        [--grafts none,adam] [--threads 1] [--set inverse_method=cholesky ...] [--clock cpu]

``--clock cpu`` times with the process's CPU time (``time.process_time``) instead of the
wall clock: on a CPU shared with other jobs it leaves out the time spent waiting for a core.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from secondorder import KFAC
from secondorder.bench.optimizers import parse_value


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)
    )


#: the clock: wall time, or with ``--clock cpu`` the process's CPU time
#: (``time.process_time``: on a shared machine, the time this process ran)
CLOCK = [time.perf_counter]


def _timed(fn, *args) -> float:
    start = CLOCK[0]()
    fn(*args)
    return CLOCK[0]() - start


def _train_step(model, opt, x, y) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def bench_mlp(
    blocks: list[int | None],
    rounds: int,
    grafts: list[str | None] = (None,),
    extra: dict | None = None,
) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)
    best: dict[str, dict[str, float]] = {}

    def keep(name: str, key: str, value: float) -> None:
        slot = best.setdefault(name, {})
        slot[key] = min(value, slot.get(key, float("inf")))

    for r in range(rounds):
        model = _mlp()
        sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        _train_step(model, sgd, x, y)
        keep("sgd", "step", min(_timed(_train_step, model, sgd, x, y) for _ in range(5)))
        for b, graft in [(b, gr) for b in blocks for gr in grafts]:
            name = f"B={b}" + (f", graft={graft}" if graft else "")
            model = _mlp()
            opt = KFAC(
                model, lr=0.01, max_factor_dim=b, graft=graft, progress=False, **(extra or {})
            )
            first = _timed(_train_step, model, opt, x, y)  # update + refresh
            plain = min(_timed(_train_step, model, opt, x, y) for _ in range(9))
            update = _timed(_train_step, model, opt, x, y)  # step 10: factors due
            refresh = _timed(opt.estimator.refresh, opt.current_damping())
            keep(name, "first step", first)
            keep(name, "plain step", plain)
            keep(name, "update step", update)
            keep(name, "refresh", refresh)
            a = [row["a"] for row in opt.estimator.describe_layers()]
            g_ = [row["g"] for row in opt.estimator.describe_layers()]
            print(
                f"round {r} {name}: first {first:.2f} s, plain {plain:.3f} s, update "
                f"{update:.3f} s, refresh {refresh:.2f} s; A {a}; G {g_}",
                flush=True,
            )
        load = os.getloadavg()
        print(f"round {r} sgd step {best['sgd']['step']:.3f} s; load {load}", flush=True)
    sgd_step = best["sgd"]["step"]
    clock = "CPU time" if CLOCK[0] is time.process_time else "wall time"
    print(f"\nMLP 784-2048-2048-10, batch 128, fastest of {rounds} rounds, {clock}")
    print(f"{'':28} {'plain':>8} {'update':>8} {'refresh':>8} {'per iter':>9} {'vs SGD':>7}")
    print(f"{'torch.optim.SGD':28} {sgd_step:8.3f} {'':8} {'':8} {sgd_step:9.3f} {1.0:7.2f}")
    for b, graft in [(b, gr) for b in blocks for gr in grafts]:
        name = f"B={b}" + (f", graft={graft}" if graft else "")
        t = best[name]
        per_iter = (9 * t["plain step"] + t["update step"]) / 10 + t["refresh"] / 100
        print(f"{'K-FAC ' + name:28} {t['plain step']:8.3f} {t['update step']:8.3f} "
              f"{t['refresh']:8.2f} {per_iter:9.3f} {per_iter / sgd_step:7.2f}")  # fmt: skip


class _LM(nn.Module):
    def __init__(self, vocab: int = 32000, width: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.block = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.head(self.norm(h + self.block(h)))


def _state_bytes(opt) -> int:
    tensors = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    est = getattr(opt, "estimator", None)
    if est is not None:
        tensors += [t for layer in est.layers for t in est._layer_tensors(layer.name)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def bench_lm(rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32000, (8, 65), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def lm_step(model, opt):
        opt.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()

    for r in range(rounds):
        torch.manual_seed(0)
        model = _LM()
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
        t_adamw = sum(_timed(lm_step, model, adamw) for _ in range(3))
        torch.manual_seed(0)
        model = _LM()
        opt = KFAC(model, lr=1e-2, progress=False)
        times = [_timed(lm_step, model, opt) for _ in range(3)]
        k_bytes, a_bytes = _state_bytes(opt), _state_bytes(adamw)
        params = sum(p.numel() for p in model.parameters())
        print(f"round {r}: LM ({params} parameters), 3 steps: K-FAC {sum(times):.1f} s "
              f"({', '.join(f'{t:.2f}' for t in times)}), AdamW {t_adamw:.2f} s; state K-FAC "
              f"{k_bytes / 2**20:.1f} MiB, AdamW {a_bytes / 2**20:.1f} MiB "
              f"({k_bytes / a_bytes:.2f}x); load {os.getloadavg()}", flush=True)  # fmt: skip
    print(opt.describe())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", nargs="*", default=["mlp", "lm"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--blocks", default="none,256,512,1024")
    parser.add_argument("--grafts", default="none", help="graft= values, e.g. none,adam")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another KFAC keyword for the mlp runs, e.g. inverse_method=cholesky (repeatable)",
    )
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    args = parser.parse_args()
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    extra = {}
    for item in args.extra:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            parser.error(f"--set {item!r}: want KEY=VALUE, e.g. inverse_method=cholesky")
        extra[key] = parse_value(raw)
    torch.set_num_threads(args.threads)
    blocks = [None if b == "none" else int(b) for b in args.blocks.split(",")]
    grafts = [None if g == "none" else g for g in args.grafts.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()}", flush=True)  # fmt: skip
    if "lm" in args.what:
        bench_lm(args.rounds)
    if "mlp" in args.what:
        bench_mlp(blocks, args.rounds, grafts, extra)


if __name__ == "__main__":
    main()
