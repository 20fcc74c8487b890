"""Micro-benchmark of one dynamic M-FAC inverse-Fisher product, ``F⁻¹x`` with
``F = λI + (1/m) GᵀG`` for a full window ``G`` of ``m`` gradients of dimension ``d``.

Times per step (the factorisation of the ``m x m`` system is redone every step, as the
estimator does when the window changes):

* ``kernels``: ``mfac_coefficients`` (Cholesky of ``mI + GGᵀ/λ``) + ``mfac_ihvp`` (two
  passes over ``G``); also ``ihvp`` alone and the bandwidth its two window passes reach,
  against the *roofline*: the bandwidth of one streaming read of the window on the same
  device (``window.sum()``), so ``roofline`` is the fraction of it the IHVP achieves;
* ``dense``: ``torch.linalg.solve(λI + GᵀG/m, x)``, forming the ``d x d`` matrix (O(d³):
  skipped above ``--dense-max-d``);
* ``recursion``: the paper's reference scheme, written here from its description in
  ALGORITHMS.md: an unpivoted LU of ``mI + GGᵀ/λ`` by row elimination, the lower-triangular
  coefficients ``B`` built row by row, and the sequential ``q`` recursion -- each a Python
  loop of ``m`` steps of torch vector ops (the reference runs these loops as CUDA
  kernels, so on a GPU this column measures the algorithm, not their code).

``recursion`` is checked against ``kernels`` on the first input before anything is timed.

    python benchmarks/bench_mfac.py                      # CPU, m 32,128,512 x d 1e3,1e4,1e5
    python benchmarks/bench_mfac.py --device cuda --m 1024 --d 100000 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch

from secondorder.kernels.mfac import mfac_coefficients, mfac_ihvp


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: str, repeats: int, budget_s: float) -> float:
    """Mean milliseconds per call: one warm-up, then up to ``repeats`` calls or ``budget_s``."""
    fn()
    _sync(device)
    start = time.perf_counter()
    calls = 0
    while calls < repeats:
        fn()
        calls += 1
        _sync(device)
        if time.perf_counter() - start > budget_s:
            break
    return (time.perf_counter() - start) / calls * 1e3


def recursion_coefficients(gram: torch.Tensor, damping: float) -> tuple[torch.Tensor, ...]:
    """``D``, ``den`` and ``B`` of the reference scheme, for ``K = mI + gram/λ``.

    Unpivoted LU ``K = L̃U`` by Gaussian elimination, one pivot row at a time;
    ``D = triu(U) − mI`` and ``den = m + diag D = diag U`` (so ``L̃[j, i] = D[i, j]/den[i]``).
    ``B = λ⁻¹ L̃⁻¹``, row by row: ``B_ii = λ⁻¹``, ``B[i, :i] = (−D[:i, i]/den[:i])ᵀ B[:i, :i]``.
    """
    m = gram.shape[0]
    u = gram / damping + m * torch.eye(m, dtype=gram.dtype, device=gram.device)
    for i in range(m - 1):
        u[i + 1 :, i:] -= torch.outer(u[i + 1 :, i] / u[i, i], u[i, i:])
    u = u.triu()
    den = u.diagonal().clone()
    d = u - m * torch.eye(m, dtype=gram.dtype, device=gram.device)
    b = torch.zeros_like(gram)
    b[0, 0] = 1.0 / damping
    for i in range(1, m):
        b[i, :i] = (-d[:i, i] / den[:i]) @ b[:i, :i]
        b[i, i] = 1.0 / damping
    return d, den, b


def recursion_ihvp(window, d, den, b, x, damping: float) -> torch.Tensor:
    """``λ⁻¹x − Gᵀ(Bᵀ(q/den))`` with ``q = λ⁻¹Gx`` put through the sequential recursion
    ``q[i:] −= D[i−1, i:] q[i−1]/den[i−1]`` (forward substitution with ``L̃``)."""
    m = window.shape[0]
    q = (window @ x) / damping
    dq = d.to(q.dtype)
    denq = den.to(q.dtype)
    for i in range(1, m):
        q[i:] -= dq[i - 1, i:] * (q[i - 1] / denq[i - 1])
    c = b.to(q.dtype).T @ (q / denq)
    return x / damping - window.T @ c


def _row(m: int, d: int, args: argparse.Namespace, check: bool) -> str:
    """Time the three implementations on one ``(m, d)``; a formatted table row."""
    device, damping = args.device, args.damping
    wdtype = getattr(torch, args.dtype)
    xdtype = torch.float64 if wdtype == torch.float64 else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    window = torch.randn(m, d, generator=gen, device=device).to(wdtype)
    x = torch.randn(d, generator=gen, device=device, dtype=xdtype)
    exact = window.to(xdtype)  # for dense and recursion only
    gram = (exact.double() @ exact.double().T).to(getattr(torch, args.gram_dtype))
    chol = mfac_coefficients(gram, m, damping)

    def coefficients():
        return mfac_coefficients(gram, m, damping)

    def ihvp():
        return mfac_ihvp(window, chol, x, damping, m)

    def kernels():
        return mfac_ihvp(window, mfac_coefficients(gram, m, damping), x, damping, m)

    def dense_solve():
        eye = torch.eye(d, dtype=xdtype, device=device)
        f = torch.addmm(eye, exact.T, exact, beta=damping, alpha=1.0 / m)
        return torch.linalg.solve(f, x)

    def recursion():
        return recursion_ihvp(exact, *recursion_coefficients(gram, damping), x, damping)

    if check:
        err = ((kernels() - recursion()).norm() / (x.norm() / damping)).item()
        if not err < 1e-4:
            raise SystemExit(f"recursion and kernels disagree: relative error {err:.3g}")
        print(f"# recursion agrees with kernels to {err:.2g} relative to |x|/damping (m={m} d={d})")

    t_coeff = _time(coefficients, device, args.repeats, args.budget)
    t_ihvp = _time(ihvp, device, args.repeats, args.budget)
    t_kernels = _time(kernels, device, args.repeats, args.budget)
    gbs = 2 * window.numel() * window.element_size() / (t_ihvp * 1e-3) / 1e9
    # the roofline: what one streaming read of the window achieves on this device (a sum
    # reduction reads every byte once and computes almost nothing)
    t_read = _time(lambda: window.sum(dtype=torch.float32), device, args.repeats, args.budget)
    read_gbs = window.numel() * window.element_size() / (t_read * 1e-3) / 1e9
    dense = "-"
    if d <= args.dense_max_d:
        dense = f"{_time(dense_solve, device, 3, args.budget):.2f}"
    rec = "-"
    if m <= args.recursion_max_m:
        rec = f"{_time(recursion, device, 3, args.budget):.2f}"
    return (
        f"{m:>5} {d:>7} {t_coeff:9.3f} {t_ihvp:9.3f} {t_kernels:10.3f} {gbs:9.1f} "
        f"{read_gbs:9.1f} {100 * gbs / read_gbs:9.0f}% {dense:>9} {rec:>12}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--m", default="32,128,512", help="comma-separated window sizes")
    parser.add_argument("--d", default="1000,10000,100000", help="comma-separated dimensions")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls at most")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per timing at most")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float64"], help="window"
    )
    parser.add_argument("--gram-dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--damping", type=float, default=1e-4)
    parser.add_argument("--dense-max-d", type=int, default=8000)
    parser.add_argument("--recursion-max-m", type=int, default=1024)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads() if args.device == "cpu" else "-"
    print(
        f"device={args.device} window={args.dtype} gram={args.gram_dtype} "
        f"damping={args.damping:g} torch={torch.__version__} threads={threads}"
    )
    print(
        f"{'m':>5} {'d':>7} {'coeff ms':>9} {'ihvp ms':>9} {'kernels ms':>10} "
        f"{'ihvp GB/s':>9} {'read GB/s':>9} {'roofline':>10} {'dense ms':>9} "
        f"{'recursion ms':>12}"
    )
    sizes = [(int(m), int(d)) for m in args.m.split(",") for d in args.d.split(",")]
    for i, (m, d) in enumerate(sizes):
        print(_row(m, d, args, check=i == 0), flush=True)


if __name__ == "__main__":
    main()
