"""Conv2d K-FAC input factor ``A = Σ_rows ã ãᵀ``: time and peak memory of each way to build it.

Methods, for each conv layer shape (default: the four 3x3 stages of a CIFAR ResNet-18 at
batch 128, plus its 3-channel stem):

* ``unfold``: ``F.unfold`` to the full patch matrix, then one ``x^T x`` (the classic
  implementation, e.g. KFAC-Pytorch's);
* ``rows``: the library's old path, the helper's strided-view patches (``a_rows``) and the
  symmetric factor update (still the whole patch matrix);
* ``lean``: ``secondorder.kernels.conv2d_factor_update`` -- on the CPU the chunked torch
  reference (patches of a few examples at a time), on CUDA the implicit-im2col Triton
  kernel (no patch matrix at all);
* ``triton``: on CUDA, the Triton kernel called directly (same as ``lean`` there).

Each (layer, method) runs in a fresh process: after the input and the factor are created,
the peak is reset (``/proc/self/clear_refs`` on Linux CPUs, ``reset_peak_memory_stats`` on
CUDA) and the peak growth during the first call is the *peak* (what the method allocates
beyond the input and the factor); the time is the median of ``--repeats`` calls. The
results of the methods are checked against each other (float32, 1e-4 relative).

    python benchmarks/bench_conv_factor.py                     # CPU, 2 threads
    python benchmarks/bench_conv_factor.py --device cuda --batch 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

MiB = 1024 * 1024
#: (name, channels, height = width, kernel, stride) of CIFAR ResNet-18's distinct conv shapes
LAYERS = [
    ("stem 3->64", 3, 32, 3, 1),
    ("layer1 64", 64, 32, 3, 1),
    ("layer2 128", 128, 16, 3, 1),
    ("layer3 256", 256, 8, 3, 1),
    ("layer4 512", 512, 4, 3, 1),
]
METHODS = ("unfold", "rows", "lean", "triton")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _worker(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from secondorder.kernels import symmetric_factor_update
    from secondorder.kernels.conv_factor import (
        conv2d_factor_update_triton,
    )
    from secondorder.layers.conv import Conv2dHelper

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    c, hw, k, s = spec["channels"], spec["size"], spec["kernel"], spec["stride"]
    pad = k // 2
    conv = nn.Conv2d(c, c, k, stride=s, padding=pad).to(device)
    helper = Conv2dHelper(conv, "conv")
    torch.manual_seed(0)  # the same input in every worker
    x = torch.randn(spec["batch"], c, hw, hw, device=device)
    a = torch.zeros(1, helper.a_dim, helper.a_dim, device=device)

    def unfold(x: torch.Tensor) -> None:
        cols = F.unfold(x, k, padding=pad, stride=s)  # (B, C k², L)
        rows = cols.transpose(1, 2).reshape(-1, c * k * k)
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        a[0].copy_(rows.T @ rows)

    def rows(x: torch.Tensor) -> None:
        symmetric_factor_update(a, helper.a_rows(x), beta=0.0)

    def lean(x: torch.Tensor) -> None:
        helper.a_factor_update(x, a, beta=0.0)

    def triton(x: torch.Tensor) -> None:
        conv2d_factor_update_triton(a, x, kernel_size=k, stride=s, padding=pad, bias=True, beta=0.0)

    method = {"unfold": unfold, "rows": rows, "lean": lean, "triton": triton}[spec["method"]]
    # warm-up on one example (libraries, compiled kernels), so that the measured call's
    # memory is not already in the allocator's cache
    method(x[:1].clone())

    def fn() -> None:
        method(x)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS") * 1024
    fn()
    sync()
    peak = (
        torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_kib("VmHWM") * 1024
    )
    result = a.clone().cpu()
    times = []
    for _ in range(spec["repeats"]):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    torch.save(result, spec["out"])
    return {
        "peak_mib": (peak - base) / MiB,
        "input_mib": x.numel() * 4 / MiB,
        "ms": statistics.median(times) * 1e3,
    }


def _run(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=spec["timeout"],
    )
    if proc.returncode != 0:
        raise SystemExit(f"worker {spec['method']} {spec['channels']} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    import tempfile
    from pathlib import Path

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (median shown)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per worker")
    parser.add_argument(
        "--layers",
        default="stem,layer1,layer2,layer3,layer4",
        help="comma-separated subset of stem, layer1..layer4",
    )
    args = parser.parse_args(argv)
    known = {name.split()[0]: (name, *rest) for name, *rest in LAYERS}
    chosen = args.layers.split(",")
    if not chosen or any(c not in known for c in chosen):
        raise SystemExit(f"--layers: choose from {', '.join(known)}, got {args.layers!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if args.batch < 1 or args.repeats < 1:
        raise SystemExit("--batch and --repeats must be >= 1")
    methods = [m for m in METHODS if args.device == "cuda" or m != "triton"]
    print(f"device {args.device}, batch {args.batch}, {args.threads} thread(s)")
    print("| layer | input MiB | method | ms | peak MiB | peak vs unfold |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for name, c, hw, k, s in (known[c] for c in chosen):
            results = {}
            for method in methods:
                spec = {
                    "method": method, "channels": c, "size": hw, "kernel": k, "stride": s,
                    "batch": args.batch, "device": args.device, "threads": args.threads,
                    "repeats": args.repeats, "timeout": args.timeout,
                    "out": str(Path(tmp) / f"{method}.pt"),
                }  # fmt: skip
                results[method] = _run(spec)
                results[method]["a"] = torch.load(spec["out"])
            ref = results["unfold"]["a"]
            for method in methods:
                r = results[method]
                err = ((r["a"] - ref).abs().max() / ref.abs().max()).item()
                if err > 1e-4:
                    raise SystemExit(f"{name} {method}: differs from unfold by {err:.2g}")
                ratio = results["unfold"]["peak_mib"] / max(r["peak_mib"], 1e-9)
                print(
                    f"| {name} | {r['input_mib']:.1f} | {method} | {r['ms']:.1f} | "
                    f"{r['peak_mib']:.1f} | {ratio:.1f}x lower |"
                    if method != "unfold"
                    else f"| {name} | {r['input_mib']:.1f} | {method} | {r['ms']:.1f} | "
                    f"{r['peak_mib']:.1f} | 1 |"
                )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
    else:
        main()
