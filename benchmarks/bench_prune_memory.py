"""Peak memory (and time) of the static M-FAC inverse used for pruning,
``secondorder.prune.StaticFisherInverse``: ``F⁻¹`` of ``F = λI + GᵀG/m`` from ``m`` float32
gradients of dimension ``d``.

For every ``(form, m, d)`` one fresh Python process (``subprocess``, so that peaks of earlier
configurations and allocator caches cannot leak into later ones):

1. imports torch, sets the thread count and runs a tiny build + ``ihvp`` + ``diag`` so that
   lazily loaded libraries (LAPACK, ...) are already resident;
2. creates the ``m x d`` float32 gradients (and the vector ``x``);
3. resets the kernel's peak-RSS counter by writing ``5`` to ``/proc/self/clear_refs`` (this
   sets ``VmHWM`` to the current ``VmRSS``) and records ``VmRSS`` as the baseline;
4. builds the inverse, reads ``VmHWM`` (the *build peak*), calls ``ihvp(x)`` and ``diag()``
   once each and reads ``VmHWM`` again (the *peak*).

The peaks are reported as growth over the baseline, i.e. they exclude the gradients
themselves but include the stored factor ``U`` (which has the gradients' size) and every
temporary. If ``/proc/self/clear_refs`` cannot be written, the baseline is ``VmHWM`` after
step 2 instead (a lower bound on the growth; the run says so). Linux only.

Forms: ``blocked`` (``block_size=B``, default 128) on the whole grid; ``full``
(``block_size=None``, the full ``d x d`` inverse in factored form) for ``d <= --full-max-d``;
``dense``: ``torch.linalg.inv`` of the explicit float64 ``d x d`` matrix
``λI + GᵀG/m``, then ``F⁻¹x`` and its diagonal, for the smallest ``d`` of the grid and the
smallest ``m`` only (its memory does not depend on ``m``), where ``8d² < --dense-max-bytes``.

Also printed: the analytic sizes ``4md`` (the float32 gradients, and ``U``) and ``4d²`` (a
float32 dense ``d x d`` inverse), the ratio ``peak / 4md`` and the wall times of the build
(one call) and of ``ihvp`` and ``diag`` (the fastest of ``--repeats`` calls; the
peak is read after the first of each).

    python benchmarks/bench_prune_memory.py                    # m 16,64,256 x d 1e4,1e5,1e6
    python benchmarks/bench_prune_memory.py --m 32 --d 1e5,1e6 --block-size 256 --no-dense
    python benchmarks/bench_prune_memory.py --csv prune_memory.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time

MiB = 1024 * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Set ``VmHWM`` to the current ``VmRSS``; False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") <= _status_kib("VmRSS") + 64


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _worker(spec: dict) -> dict:
    """Run one configuration in this (fresh) process; returns the measurements."""
    import gc

    import torch

    from secondorder.prune import StaticFisherInverse

    torch.set_num_threads(spec["threads"])
    form, m, d, damping = spec["form"], spec["m"], spec["d"], spec["damping"]
    block = spec["block_size"] if form == "blocked" else None

    # warm-up: load the kernels/libraries the measured calls use
    small = torch.randn(4, 300)
    inv = StaticFisherInverse(small, damping, block_size=block if block else None)
    inv.ihvp(torch.randn(300))
    inv.diag()
    if form == "dense":
        torch.linalg.inv(torch.eye(300, dtype=torch.float64) + 1)
    del inv, small

    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(m, d, generator=gen, dtype=torch.float32)
    x = torch.randn(d, generator=gen, dtype=torch.float32)
    gc.collect()

    reset = _reset_peak()
    base = _status_kib("VmRSS") if reset else _status_kib("VmHWM")

    t0 = time.perf_counter()
    if form == "dense":
        g64 = grads.double()
        f = torch.addmm(torch.eye(d, dtype=torch.float64), g64.T, g64, beta=damping, alpha=1.0 / m)
        del g64
        finv = torch.linalg.inv(f)
        del f
    else:
        inv = StaticFisherInverse(grads, damping, block_size=block)
    t_build = time.perf_counter() - t0
    build_peak = _status_kib("VmHWM")

    def ihvp():
        return finv @ x.double() if form == "dense" else inv.ihvp(x)

    def diag():
        return finv.diagonal().clone() if form == "dense" else inv.diag()

    t_ihvp, y = _timed(ihvp)
    t_diag, dg = _timed(diag)
    peak = _status_kib("VmHWM")  # the first calls' peak; repeats only re-time
    t_ihvp = min([t_ihvp] + [_timed(ihvp)[0] for _ in range(spec["repeats"] - 1)])
    t_diag = min([t_diag] + [_timed(diag)[0] for _ in range(spec["repeats"] - 1)])
    assert y.shape == (d,) and dg.shape == (d,) and bool(torch.isfinite(dg).all())

    return {
        "form": form,
        "m": m,
        "d": d,
        "block_size": block if block else "-",
        "grads_mib": 4 * m * d / MiB,
        "dense_mib": 4 * d * d / MiB,
        "build_peak_mib": (build_peak - base) / 1024,
        "peak_mib": (peak - base) / 1024,
        "ratio": (peak - base) * 1024 / (4 * m * d),
        "build_s": t_build,
        "ihvp_ms": t_ihvp * 1e3,
        "diag_ms": t_diag * 1e3,
        "peak_reset": reset,
    }


def _run(spec: dict, timeout: float) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise SystemExit(f"worker {spec} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ints(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v]


COLUMNS = [
    ("form", "form", "{}"),
    ("m", "m", "{}"),
    ("d", "d", "{}"),
    ("grads_mib", "4md MiB", "{:.1f}"),
    ("dense_mib", "4d² MiB", "{:.0f}"),
    ("build_peak_mib", "build peak MiB", "{:.1f}"),
    ("peak_mib", "peak MiB", "{:.1f}"),
    ("ratio", "peak / 4md", "{:.2f}"),
    ("build_s", "build s", "{:.3f}"),
    ("ihvp_ms", "ihvp ms", "{:.1f}"),
    ("diag_ms", "diag ms", "{:.1f}"),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--m", default="16,64,256", help="comma-separated gradient counts")
    parser.add_argument("--d", default="1e4,1e5,1e6", help="comma-separated dimensions")
    parser.add_argument("--block-size", type=int, default=128, help="B of the blocked form")
    parser.add_argument("--damping", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    parser.add_argument(
        "--full-max-d", type=float, default=1e5, help="run block_size=None up to this d"
    )
    parser.add_argument(
        "--dense-max-bytes",
        type=float,
        default=2e9,
        help="run the dense d x d inverse (smallest d, smallest m) if 8d² is below this",
    )
    parser.add_argument("--no-dense", action="store_true", help="skip the dense inverse")
    parser.add_argument(
        "--repeats", type=int, default=3, help="ihvp/diag calls per row (the minimum is shown)"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per worker")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return

    import torch

    ms, ds = _ints(args.m), _ints(args.d)
    common = {
        "damping": args.damping,
        "threads": args.threads,
        "block_size": args.block_size,
        "repeats": args.repeats,
    }
    specs = [{"form": "blocked", "m": m, "d": d, **common} for d in ds for m in ms]
    specs += [
        {"form": "full", "m": m, "d": d, **common} for d in ds if d <= args.full_max_d for m in ms
    ]
    if not args.no_dense and 8 * min(ds) ** 2 < args.dense_max_bytes:
        specs.append({"form": "dense", "m": min(ms), "d": min(ds), **common})

    print(
        f"# float32 gradients, damping={args.damping:g}, block_size={args.block_size}, "
        f"torch={torch.__version__}, threads={args.threads}; peaks are VmHWM growth over "
        "the RSS after creating the gradients, one fresh process per row"
    )
    print("| " + " | ".join(h for _, h, _ in COLUMNS) + " |")
    print("|" + "|".join(" ---: " if k != "form" else " --- " for k, _, _ in COLUMNS) + "|")
    start = time.perf_counter()
    rows = []
    for spec in specs:
        row = _run(spec, args.timeout)
        rows.append(row)
        if not row["peak_reset"]:
            print("# /proc/self/clear_refs not writable: baseline is VmHWM (lower bound)")
        cells = [fmt.format(row[k]) for k, _, fmt in COLUMNS]
        print("| " + " | ".join(cells) + " |", flush=True)
    print(f"# total wall time {time.perf_counter() - start:.0f} s")

    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
