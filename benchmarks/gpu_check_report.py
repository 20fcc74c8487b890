"""The two Python halves of ``benchmarks/gpu_check.sh``: its environment header and its report.

    python benchmarks/gpu_check_report.py env --device cuda       # the header, on stdout
    python benchmarks/gpu_check_report.py report --work W --out O --device cuda \\
        --start EPOCH --deadline 450                              # writes O/gpu_check.md

``report`` reads what the script left in ``W``: ``steps.tsv`` (one row per step: name,
status, exit code, start and end epoch seconds, timeout, command) and ``NAME.log`` (each
step's output, its command on the first line), plus ``pytest_gpu.xml`` and
``step_breakdown.csv`` in ``O``. Standard library only, so that it writes a report even
where torch does not import.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

#: the steps in the script's order, with the title of each in the report
TITLES = {
    "env": "environment",
    "install": "install",
    "pytest": "pytest -m gpu",
    "factor": "bench_factor_kernel.py",
    "conv_factor": "bench_conv_factor.py",
    "mfac_fp32": "bench_mfac.py, float32 window",
    "mfac_bf16": "bench_mfac.py, bfloat16 window",
    "step_breakdown": "step_breakdown.py",
    "seeds": "bench_seeds.py",
}
TAIL = 40  # lines of a failed step's log in the report
REPO = Path(__file__).resolve().parents[1]


def _utc(epoch: float | None = None) -> str:
    epoch = time.time() if epoch is None else epoch
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC"
    )


def _command(*cmd: str) -> str | None:
    """``cmd``'s stdout (run in the repository), or None where it is missing or fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def env(device: str) -> int:
    """Print the environment header; 1 when ``device`` is cuda and torch sees no GPU."""
    print(f"date: {_utc()}")
    query = ("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv")
    print(f"$ {' '.join(query)}\n{_command(*query) or 'nvidia-smi: not available'}")
    print(f"python: {sys.version.split()[0]} ({sys.executable})")
    print(f"host: {platform.platform()}, {os.cpu_count()} CPUs")
    # a copy of the working tree without .git may sit inside another repository
    top = _command("git", "rev-parse", "--show-toplevel")
    commit = _command("git", "rev-parse", "HEAD") if top and Path(top).resolve() == REPO else None
    if commit:
        changed = len((_command("git", "status", "--porcelain") or "").splitlines())
        print(f"git: {commit} ({changed} changed or untracked paths)")
    else:
        print(f"git: {os.environ.get('GPU_CHECK_COMMIT', 'unknown (no .git)')}")
    try:
        import triton

        print(f"triton: {triton.__version__}")
    except ImportError as exc:
        print(f"triton: not importable ({exc})")
    import torch

    cuda = torch.cuda.is_available()
    print(f"torch: {torch.__version__} (CUDA {torch.version.cuda}, available: {cuda})")
    if cuda:
        props = torch.cuda.get_device_properties(0)
        print(
            f"device: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
            f"compute capability {props.major}.{props.minor}, {torch.cuda.device_count()} GPU(s)"
        )
    if device == "cuda" and not cuda:
        print("error: --device cuda but torch sees no CUDA device")
        return 1
    return 0


# ---- the report -------------------------------------------------------------------------------
def _steps(work: Path) -> dict[str, dict[str, str]]:
    rows = {}
    path = work / "steps.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            name, status, rc, t0, t1, limit, command = line.split("\t", 6)
            seconds = f"{float(t1) - float(t0):.1f}"
            rows[name] = dict(status=status, rc=rc, seconds=seconds, limit=limit, command=command)
    return rows


def _log(work: Path, name: str) -> list[str]:
    """The step's output, without the command line the script wrote first."""
    path = work / f"{name}.log"
    return path.read_text(errors="replace").splitlines()[1:] if path.exists() else []


def _block(lines: list[str]) -> list[str]:
    return ["```text", *lines, "```"] if lines else ["(no output)"]


def _pytest(out: Path) -> list[str]:
    """Pass / fail counts from the junit file, per test module, and the failures."""
    xml = out / "pytest_gpu.xml"
    if not xml.exists():
        return ["no junit file (pytest did not finish)"]
    kinds = ("passed", "failed", "errors", "skipped")
    per_module: dict[str, dict[str, int]] = {}
    failures = []
    root = ET.parse(xml).getroot()
    for case in root.iter("testcase"):
        module = case.get("classname") or case.get("name", "?")  # a collection error: no class
        kind = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                kind = "failed" if child.tag == "failure" else "errors"
                message = (child.get("message") or "").splitlines()[:1]
                failures.append(f"- `{module}::{case.get('name')}`: {' '.join(message)}")
            elif child.tag == "skipped":
                kind = "skipped"
        per_module.setdefault(module, dict.fromkeys(kinds, 0))[kind] += 1
    total = {k: sum(c[k] for c in per_module.values()) for k in kinds}
    seconds = sum(float(s.get("time", 0)) for s in root.iter("testsuite"))
    lines = [
        ", ".join(f"{k} **{total[k]}**" for k in kinds) + f" ({seconds:.1f} s; `pytest_gpu.xml`)",
        "",
        "| test module | " + " | ".join(kinds) + " |",
        "| --- |" + " ---: |" * len(kinds),
    ]
    for module, c in per_module.items():
        lines.append(f"| {module} | " + " | ".join(str(c[k]) for k in kinds) + " |")
    return lines + (["", "Failures:", *failures] if failures else [])


def _mfac(work: Path) -> list[str]:
    """The roofline table: one row per (window dtype, m, d) the two mfac steps printed."""
    rows = []
    for name, dtype in (("mfac_fp32", "float32"), ("mfac_bf16", "bfloat16")):
        for line in _log(work, name):
            cols = line.split()  # m d coeff ihvp kernels ihvp-GB/s read-GB/s roofline ...
            if len(cols) >= 8 and cols[0].isdigit() and cols[1].isdigit() and cols[7][-1] == "%":
                m, d, _, ihvp_ms, _, ihvp_gbs, read_gbs, share = cols[:8]
                rows.append(
                    f"| {dtype} | {m} | {d} | {ihvp_ms} | {ihvp_gbs} | {read_gbs} | {share} |"
                )
    if not rows:
        return []
    return [
        "| window | m | d | ihvp ms | ihvp GB/s | read GB/s | IHVP / streaming read |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ]


def _breakdown(out: Path) -> list[str]:
    """Each method's iteration time and its ratios to SGD and Adam, from the CSV."""
    path = out / "step_breakdown.csv"
    rows = []
    if path.exists():
        with path.open() as fh:
            rows = [r for r in csv.DictReader(fh) if r["stage"] == "iteration"]
    if not rows:
        return []
    lines = [
        f"Task `{rows[0]['task']}`, ms per training iteration (steady state):",
        "",
        "| method | ms per step | vs SGD | vs Adam |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratios = [
            f"{float(r[k]):.2f}x" if r[k] else "-"
            for k in ("iteration_vs_sgd", "iteration_vs_adam")
        ]
        lines.append(f"| {r['method']} | {float(r['ms_per_step']):.2f} | {' | '.join(ratios)} |")
    return lines


def _section(
    steps: dict,
    work: Path,
    name: str,
    summary: list[str] | None = None,
    output: list[str] | None = None,
) -> list[str]:
    """The step's command and status, ``summary``, then ``output`` (default: its whole log)
    where it passed; a failed step's log tail is under *Failed steps*."""
    if name not in steps:
        return ["not run (left out by GPU_CHECK_ONLY)."]
    step = steps[name]
    lines = [f"`{step['command']}`: {step['status']}, {step['seconds']} s", ""]
    if summary:
        lines += [*summary, ""]
    if step["status"] in ("ok", "skipped"):
        return lines + _block(_log(work, name) if output is None else output)
    return [*lines, f"**{step['status']}** (exit {step['rc']}): see *Failed steps* below."]


def report(work: Path, out: Path, device: str, start: float, deadline: int) -> None:
    """Write ``out/gpu_check.md`` (the script, not this, turns failed steps into its exit code)."""
    steps = _steps(work)
    failed = [n for n, s in steps.items() if s["status"] not in ("ok", "skipped")]
    total = time.time() - start
    verdict = (
        f"**{len(failed)} of {len(steps)} steps failed: {', '.join(failed)}**"
        if failed
        else f"**all {len(steps)} steps passed**"
    )
    md = [
        "# GPU check",
        "",
        f"Device `{device}` (`GPU_CHECK_DEVICE`); started {_utc(start)}; "
        f"{total:.0f} s of the {deadline} s deadline; {verdict}.",
        "",
        "## Steps",
        "",
        "| step | what | status | seconds | timeout s |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    for name, s in steps.items():
        md.append(
            f"| {name} | {TITLES.get(name, name)} | {s['status']} | {s['seconds']} | {s['limit']} |"
        )
    pytest_log = _log(work, "pytest")
    pytest_output = [ln for ln in pytest_log if ln.startswith("SKIPPED")] + pytest_log[-1:]
    md += ["", "## 1. Environment", "", *_section(steps, work, "env")]
    md += [
        "",
        "## 2. Install",
        "",
        *_section(steps, work, "install", output=_log(work, "install")[-4:]),
    ]
    md += ["", "## 3. Triton kernels against their references: `pytest -m gpu`", ""]
    md += _section(steps, work, "pytest", _pytest(out) if "pytest" in steps else [], pytest_output)
    md += ["", "## 4. Kernel benchmarks", "", "### Symmetric factor update", ""]
    md += _section(steps, work, "factor")
    md += [
        "",
        "### Conv2d input factor (implicit im2col)",
        "",
        *_section(steps, work, "conv_factor"),
    ]
    md += ["", "### M-FAC IHVP against the HBM streaming-read bandwidth", "", *_mfac(work), ""]
    md += [*_section(steps, work, "mfac_fp32"), "", *_section(steps, work, "mfac_bf16")]
    md += ["", "## 5. Step time by stage: `step_breakdown.py`", ""]
    md += _section(steps, work, "step_breakdown", _breakdown(out))
    md += ["", "## 6. Seed comparison: `bench_seeds.py`", "", *_section(steps, work, "seeds")]
    if failed:
        md += ["", "## Failed steps"]
    for name in failed:
        s = steps[name]
        why = f"timed out after {s['limit']} s" if s["status"] == "timeout" else f"exit {s['rc']}"
        md += [
            "",
            f"### {name}: {s['status']} ({why}, {s['seconds']} s)",
            "",
            f"`{s['command']}`",
            "",
        ]
        md += _block(_log(work, name)[-TAIL:])
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_env = sub.add_parser("env", help="print the environment header")
    p_env.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p_report = sub.add_parser("report", help="write OUT/gpu_check.md")
    p_report.add_argument("--work", type=Path, required=True)
    p_report.add_argument("--out", type=Path, required=True)
    p_report.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p_report.add_argument("--start", type=float, required=True, help="epoch seconds")
    p_report.add_argument("--deadline", type=int, required=True, help="seconds")
    args = parser.parse_args(argv)
    if args.command == "env":
        return env(args.device)
    report(args.work, args.out, args.device, args.start, args.deadline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
