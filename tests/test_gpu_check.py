"""benchmarks/gpu_check.sh in its CPU mode (``GPU_CHECK_DEVICE=cpu``: every step at tiny
sizes): the report has every section, with numbers in it, and a failed or timed-out step is
reported while the others still run, and makes the script exit non-zero."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
STEPS = [
    "env", "install", "pytest", "factor", "conv_factor", "mfac_fp32", "mfac_bf16",
    "step_breakdown", "seeds",
]  # fmt: skip


def _run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run the script into ``tmp_path/out``; the process and the report."""
    environ = {
        **os.environ,
        "GPU_CHECK_DEVICE": "cpu",
        "GPU_CHECK_PYTHON": sys.executable,
        "GPU_CHECK_SEEDS": str(tmp_path / "no-seeds"),
        **env,
    }
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=environ, capture_output=True, text=True, timeout=900
    )
    return proc, (out / "gpu_check.md").read_text()


def _table(md: str, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after ``heading`` (header rows dropped)."""
    lines = md[md.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _steps(md: str) -> dict[str, list[str]]:
    """step -> [what, status, seconds, timeout]"""
    return {row[0]: row[1:] for row in _table(md, "## Steps")}


@pytest.mark.slow
def test_cpu_run_reports_every_section_with_numbers(tmp_path: Path) -> None:
    proc, md = _run(tmp_path)
    assert proc.returncode == 0, md + proc.stderr
    out = tmp_path / "out"
    files = {p.name for p in out.iterdir()}
    assert len(files) <= 8 and all((out / f).is_file() for f in files)  # flat, few
    assert {"gpu_check.md", "gpu_check.log", "pytest_gpu.xml", "step_breakdown.csv"} <= files

    steps = _steps(md)
    assert list(steps) == STEPS
    for name, (_, status, seconds, timeout) in steps.items():
        assert status == ("skipped" if name == "seeds" else "ok"), name
        assert 0 <= float(seconds) <= int(timeout) + 5 or name == "seeds"
    # the CUDA budget: the step timeouts (4x longer on the CPU) add up to the 450 s deadline
    assert sum(int(row[3]) for row in steps.values()) == 4 * 450
    limits = re.findall(r"^\s*run_step (\w+) (\d+) ", SCRIPT.read_text(), re.M)
    assert [name for name, _ in limits] == STEPS
    assert sum(int(limit) for name, limit in limits if name != "seeds") == 450

    assert re.search(r"^date: \d{4}-\d\d-\d\d ", md, re.M)
    assert re.search(r"^python: 3\.\d+", md, re.M) and re.search(r"^torch: \d+\.\d+", md, re.M)
    assert re.search(r"^install: ", md, re.M)

    counts = re.search(r"passed \*\*(\d+)\*\*, failed \*\*(\d+)\*\*, errors \*\*(\d+)\*\*, "
                       r"skipped \*\*(\d+)\*\*", md)  # fmt: skip
    passed, failed, errors, skipped = map(int, counts.groups())
    assert failed == errors == 0 and passed + skipped > 0
    modules = {row[0] for row in _table(md, "## 3.")}
    for kernel in ("factor", "conv_factor", "mfac", "adafisher"):
        assert f"tests.kernels.test_{kernel}" in modules

    factor = re.findall(r"^\s+(\d+x\d+)\s+(reference|naive)\s+([\d.]+)\s+([\d.]+)$", md, re.M)
    assert len(factor) == 4 and all(float(ms) > 0 for *_, ms, _ in factor)
    conv = _table(md, "### Conv2d")
    assert [row[2] for row in conv] == ["unfold", "rows", "lean"]
    assert all(float(row[3]) > 0 for row in conv)

    mfac = _table(md, "### M-FAC")
    assert [row[0] for row in mfac] == ["float32", "bfloat16"]
    for _, m, d, ms, ihvp_gbs, read_gbs, share in mfac:
        assert int(m) > 0 and int(d) > 0 and float(ms) > 0
        assert float(ihvp_gbs) > 0 and float(read_gbs) > 0 and float(share.rstrip("%")) > 0

    breakdown = {row[0]: row[1:] for row in _table(md, "## 5.")}
    assert list(breakdown) == ["sgd", "adam", "kfac", "ekfac", "mfac", "adafisher"]
    assert all(float(ms) > 0 for ms, *_ in breakdown.values())
    assert breakdown["sgd"][1] == breakdown["adam"][2] == "1.00x"
    assert all(re.fullmatch(r"\d+\.\d\dx", r) for _, *ratios in breakdown.values() for r in ratios)

    assert "skipped: no AdaFisher/, KFAC-Pytorch/ or M-FAC/ under" in md


def test_a_failed_step_is_reported_and_the_others_still_run(tmp_path: Path) -> None:
    proc, md = _run(tmp_path, GPU_CHECK_ONLY="factor,mfac_fp32", GPU_CHECK_FAIL="factor")
    assert proc.returncode != 0
    steps = _steps(md)
    assert steps["factor"][1] == "failed" and steps["mfac_fp32"][1] == "ok"
    assert "1 of 2 steps failed: factor" in md
    failed = md[md.index("## Failed steps") :]
    assert "### factor: failed (exit 3" in failed and "injected failure" in failed
    assert _table(md, "### M-FAC")[0][0] == "float32"  # the next step ran


def test_a_step_past_the_deadline_times_out(tmp_path: Path) -> None:
    proc, md = _run(tmp_path, GPU_CHECK_ONLY="pytest", GPU_CHECK_DEADLINE="1")
    assert proc.returncode != 0
    _, status, _, timeout = _steps(md)["pytest"]
    assert status == "timeout" and timeout == "1"
    assert "### pytest: timeout (timed out after 1 s" in md
