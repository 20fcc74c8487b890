"""Micro-benchmark of the symmetric factor update ``a <- beta a + alpha x^T x``.

Times the torch reference, a naive ``a.mul_(beta).add_(x.T @ x)`` and, on CUDA, the
Triton kernel, for a few (n, d) sizes; prints milliseconds and achieved GFLOP/s
(counting the full 2 n d^2 of x^T x, so the one-triangle kernel can exceed the naive
product's figure).

    python benchmarks/bench_factor_kernel.py                 # CPU: reference vs naive
    python benchmarks/bench_factor_kernel.py --device cuda   # adds the Triton kernel
"""

from __future__ import annotations

import argparse
import time

import torch

from secondorder.kernels import (
    HAS_TRITON,
    symmetric_factor_update_reference,
    symmetric_factor_update_triton,
)


def _time(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (compilation, allocator)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--sizes",
        default="4096x64,4096x256,8192x512,2048x1024",
        help="comma-separated NxD (rows x factor dimension)",
    )
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(f"device={args.device} x dtype={args.dtype} torch={torch.__version__}")
    print(f"{'n x d':>12} {'impl':>10} {'ms':>9} {'GFLOP/s':>9}")
    for size in args.sizes.split(","):
        n, d = (int(v) for v in size.lower().split("x"))
        x = torch.randn(n, d, device=args.device).to(dtype)
        a = torch.zeros(d, d, device=args.device)
        impls = {
            "reference": lambda a=a, x=x: symmetric_factor_update_reference(
                a, x, beta=0.95, alpha=0.05
            ),
            "naive": lambda a=a, x=x: a.mul_(0.95).add_(x.float().T @ x.float(), alpha=0.05),
        }
        if args.device == "cuda" and HAS_TRITON:
            impls["triton"] = lambda a=a, x=x: symmetric_factor_update_triton(
                a, x, beta=0.95, alpha=0.05
            )
        for name, fn in impls.items():
            ms = _time(fn, args.device, args.repeats)
            print(f"{size:>12} {name:>10} {ms:9.3f} {2 * n * d * d / ms / 1e6:9.1f}")


if __name__ == "__main__":
    main()
