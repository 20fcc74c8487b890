"""The benchmark scripts on tiny settings: they check their own methods against each other
(and exit non-zero when they disagree), and print the tables benchmarks/RESULTS.md quotes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_conv_factor_methods_agree_and_report_memory():
    out = _run("bench_conv_factor.py", "--batch", "4", "--layers", "stem,layer4",
               "--repeats", "1", "--threads", "1")  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| stem") or "layer4" in line]
    assert [r.split("|")[3].strip() for r in rows] == ["unfold", "rows", "lean"] * 2
    for row in rows:
        ms, peak = (float(v) for v in row.split("|")[4:6])
        assert ms > 0 and peak >= 0


def test_conv_factor_rejects_unknown_layers():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_conv_factor.py"), "--layers", "layer9"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0 and "--layers: choose from" in proc.stderr


def test_mfac_bandwidth_against_the_roofline():
    out = _run("bench_mfac.py", "--m", "64", "--d", "20000", "--repeats", "2", "--budget", "0.5")
    line = out.strip().splitlines()[-1].split()
    ihvp_gbs, read_gbs, roofline = float(line[5]), float(line[6]), float(line[7].rstrip("%"))
    assert ihvp_gbs > 0 and read_gbs > 0
    # the printed GB/s are rounded to 0.05: the roofline column lies within that rounding
    low = 100 * max(ihvp_gbs - 0.05, 0) / (read_gbs + 0.05)
    high = 100 * (ihvp_gbs + 0.05) / max(read_gbs - 0.05, 1e-9)
    assert low - 1 <= roofline <= high + 1


def test_refresh_times_the_per_layer_and_the_batched_refresh():
    out = _run("bench_refresh.py", "--model", "mlp", "--method", "eigen,cholesky",
               "--repeats", "1", "--warmup", "0", "--threads", "1")  # fmt: skip
    calls = {}
    for line in out.splitlines():
        label, _, rest = line.strip().partition(": ")
        if label in ("per-layer", "batched") and rest.endswith(" solver calls"):
            calls.setdefault(label, []).append(int(rest.split(", ")[1].split()[0]))
    # at least one call per matrix factor (74), against one per factor size (4), fallbacks
    # (if any) aside
    assert len(calls["per-layer"]) == len(calls["batched"]) == 2
    for per_layer, batched in zip(calls["per-layer"], calls["batched"], strict=True):
        assert per_layer >= 74 and batched < per_layer


def test_subsample_reports_steps_and_capture_time():
    root = BENCH.parent
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_subsample.py"), "--rows", "none", "0.5", "--seeds",
         "0", "--epochs", "1", "--rounds", "1", "--timing-steps", "2", "--timing-batches", "16",
         "--threads", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines if line.strip().startswith(("None ", "0.5 "))] == [
        "None",
        "0.5",
        "None",
        "0.5",
    ]  # the training table, then the timing table
    assert "capture time per step, batch 16" in proc.stdout


def test_bench_shampoo_prints_ratios_against_adamw():
    out = _run("bench_shampoo.py", "gpt", "--rounds", "1", "--warmup", "1", "--window", "2",
               "--opt", "adamw,shampoo,soap")  # fmt: skip
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in ("adamw", "shampoo", "soap")}  # fmt: skip
    assert set(rows) == {"adamw", "shampoo", "soap"}
    assert float(rows["adamw"][4]) == 1.0 and float(rows["adamw"][5]) == 1.0
    for row in rows.values():
        assert float(row[1]) > 0 and float(row[6]) > 0  # iteration ms, state MiB


def _run_here(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
        timeout=300, env={**os.environ, "PYTHONPATH": str(BENCH.parent)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_bench_blocking_reports_every_block_size():
    out = _run_here("bench_blocking.py", "--blocks", "none", "8", "--seeds", "0", "--epochs",
                    "1", "--width", "16", "--eval-every", "5")  # fmt: skip
    rows = [
        line for line in out.splitlines() if line.startswith("| None") or line.startswith("| 8")
    ]
    assert [r.split("|")[1].strip() for r in rows] == ["None", "8"]
    assert "2 blocks of 8" in out and "full 16" in out  # the 16-wide G: whole, then blocked
    for row in rows:
        loss = float(row.split("|")[-3].split("±")[0])
        assert 0 < loss < 10


def test_bench_graft_times_every_graft_and_the_old_module():
    grafting = BENCH.parent / "secondorder" / "grafting.py"
    out = _run_here("bench_graft.py", "--model", "resnet8", "--grafts", "none,adam", "--old",
                    str(grafting), "--rounds", "1", "--steps", "1")  # fmt: skip
    names = [line.split(" ms")[0].rsplit(None, 1)[0].strip() for line in out.splitlines()
             if line.startswith("  graft=")]  # fmt: skip
    assert names == ["graft=None", "graft=adam", "graft=adam (old)"]
