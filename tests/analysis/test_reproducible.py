"""``python -m secondorder.analysis`` prints the same numbers on every CPU; its pictures' texts
do not overlap; its ``--help`` states the cost that its docs page states.

The figures are taken at the end of training, where a float32 run carries the last-bit
differences of CPU kernels into the second digit (K-FAC at 3 epochs: ``G`` dominance 0.700 with
``ATEN_CPU_CAPABILITY=default``, 0.710 with the AVX2 kernels). The analysis runs in float64, so
two processes with different kernels and thread counts print the same table, digit for digit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from secondorder.analysis import plots
from secondorder.analysis.__main__ import DEFAULT_RUN_CPU_S, build_parser

DOCS_PAGE = Path(__file__).resolve().parents[2] / "secondorder" / "docs" / "analysis.md"

# K-FAC (the optimizer whose float32 runs part ways) long enough for float32 to differ in
# the printed digits, small enough for two processes in a few seconds each
SMALL_RUN = [
    "--task", "digits-cnn",
    "--opt", "kfac,sgd",
    "--epochs", "3",
    "--factor-batches", "2",
    "--grid", "3",
    "--landscape-examples", "256",
    "--no-pictures",
    "--quiet",
]  # fmt: skip


def _printed_numbers(stdout: str) -> list[str]:
    """The table and the landscape line: every line but the last (wall time, files)."""
    return [line for line in stdout.splitlines() if line and not line.startswith("wall time")]


def test_two_simulated_machines_print_the_same_numbers(tmp_path: Path) -> None:
    # one process with PyTorch's portable kernels, MKL's code path for other CPUs and one
    # thread; one with this CPU's own kernels (AVX2 or AVX-512) and two threads, the idle one
    # asleep rather than spinning (on a busy machine a spinning thread triples the CPU time):
    # what differs between two machines
    portable = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
    configs = {
        "portable": (portable, ["--threads", "1"]),
        "native": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["--threads", "2"]),
    }
    procs = {}
    for name, (env, argv) in configs.items():
        environ = {k: v for k, v in os.environ.items() if k not in portable}
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "secondorder.analysis", *SMALL_RUN, *argv],
            env={**environ, **env},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # --out left to its default: a timestamped folder under tmp_path
    printed = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        printed[name] = _printed_numbers(stdout)
    assert len(printed["native"]) == 2 + 3 * 3 + 1  # header, 3 runs x 3 layers, landscape
    assert printed["portable"] == printed["native"]


def test_help_states_the_measured_cost_as_the_docs_do() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "half a minute" not in text  # the old estimate; the default run took 134 s
    claim = f"about {DEFAULT_RUN_CPU_S} s of CPU time"
    assert claim in text
    page = " ".join(DOCS_PAGE.read_text(encoding="utf-8").split())
    section = page[page.index("## Command line") :]
    assert claim in section[: section.index("## ", 3)]


# --- pictures ---------------------------------------------------------------------------------


def _psd(n: int, scale: float, seed: int, rank: int | None = None) -> torch.Tensor:
    """``scale · X Xᵀ / k`` with ``X`` Gaussian ``(n, k)``, ``k = rank`` (singular) or ``3n``."""
    gen = torch.Generator().manual_seed(seed)
    k = 3 * n if rank is None else rank
    x = torch.randn(n, k, generator=gen, dtype=torch.float64)
    return scale * (x @ x.T) / k


@pytest.fixture(scope="module")
def factors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    # digits-cnn's factors after K-FAC: A about 1 to 1e3, G 1e-7 to 1e-4 (where matplotlib
    # writes a 1e-6 multiplier above the y axis), peaks that are not powers of 10, singular
    # ones (dead channels) whose λ_min is rounding noise, once written out in the title
    return {
        "0": (_psd(10, 2.3, 0), _psd(16, 7.8e-6, 1, rank=12)),
        "2": (_psd(40, 11.4, 2, rank=30), _psd(32, 5.9e-7, 3, rank=31)),
        "5": (_psd(60, 394.0, 4, rank=50), _psd(10, 1.95e-7, 5, rank=9)),
    }


@pytest.fixture
def drawn_texts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, Any]]:
    """Every text the Agg renderer draws from now on: ``(string, box in pixels, Text)``."""
    from matplotlib.backends.backend_agg import RendererAgg

    drawn: list[tuple[str, Any, Any]] = []
    draw_text = RendererAgg.draw_text

    def spy(self, gc, x, y, s, prop, angle, ismath=False, mtext=None):
        if mtext is not None and s.strip():
            drawn.append((s, mtext.get_window_extent(self), mtext))
        return draw_text(self, gc, x, y, s, prop, angle, ismath=ismath, mtext=mtext)

    monkeypatch.setattr(RendererAgg, "draw_text", spy)
    return drawn


def _overlaps(drawn: list[tuple[str, Any, Any]]) -> list[tuple[str, str]]:
    """Pairs of texts drawn on one figure whose boxes overlap by more than half a pixel each
    way."""
    out = []
    for i, (a, box_a, text_a) in enumerate(drawn):
        for b, box_b, text_b in drawn[i + 1 :]:
            if text_a.figure is not text_b.figure:
                continue
            width = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
            height = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
            if width > 0.5 and height > 0.5:
                out.append((a, b))
    return out


@pytest.mark.parametrize(
    "draw",
    [
        plots.plot_factor_heatmaps,
        plots.plot_gershgorin,
        plots.plot_frequency_fields,
        plots.plot_spectra,
    ],
)
def test_factor_pictures_have_no_overlapping_text(draw, factors, drawn_texts, tmp_path) -> None:
    draw(factors, tmp_path / "picture.png", title="digits-cnn, kfac: factors", dpi=80)
    titles = [t for _, _, t in drawn_texts if t.axes is not None and t is t.axes.title]
    assert len(titles) == (2 if draw is plots.plot_spectra else 6)
    assert _overlaps(drawn_texts) == []


def test_gershgorin_ticks_carry_their_exponent(factors, drawn_texts, tmp_path) -> None:
    # no "1e-6" multiplier above the axes (on the title's line): each tick says its number
    plots.plot_gershgorin(factors, tmp_path / "gershgorin.png", dpi=80)
    axes = {t.axes for _, _, t in drawn_texts if t.axes is not None}
    offsets = {id(a.xaxis.get_offset_text()) for a in axes} | {
        id(a.yaxis.get_offset_text()) for a in axes
    }
    assert [s for s, _, t in drawn_texts if id(t) in offsets] == []
    assert any(s.endswith("e-7") for s, _, _ in drawn_texts)  # G of layer 5, about 1e-7


def test_colour_bars_have_at_most_five_labels(factors, drawn_texts, tmp_path) -> None:
    for draw in (plots.plot_factor_heatmaps, plots.plot_frequency_fields):
        drawn_texts.clear()
        draw(factors, tmp_path / "picture.png", dpi=80)
        figure = drawn_texts[0][2].figure
        bars = [ax for ax in figure.axes if hasattr(ax, "_colorbar")]
        bar_of = {
            id(label): k
            for k, ax in enumerate(bars)
            for tick in ax.yaxis.get_major_ticks()
            for label in (tick.label1, tick.label2)
        }
        per_bar = Counter(bar_of[id(t)] for _, _, t in drawn_texts if id(t) in bar_of)
        assert len(bars) == 6 and len(per_bar) == 6, draw.__name__
        assert max(per_bar.values()) <= 5, (draw.__name__, per_bar)


def test_summary_pictures_have_no_overlapping_text(drawn_texts, tmp_path) -> None:
    dominance = {
        run: {layer: (0.1 + 0.2 * k, 0.9 - 0.1 * k) for k, layer in enumerate(("0", "2", "5"))}
        for run in ("initial", "kfac", "adafisher", "sgd")
    }
    plots.plot_dominance(dominance, tmp_path / "dominance.png", title="digits-cnn", dpi=80)
    alphas = torch.linspace(-3, 23, 9, dtype=torch.float64)
    betas = torch.linspace(-29, 13, 9, dtype=torch.float64)
    surface = 1e-4 + (alphas[None, :] / 10) ** 2 + (betas[:, None] / 10) ** 2
    steps = torch.linspace(0, 1, 20, dtype=torch.float64)[:, None]
    trajectories = {
        "kfac": torch.tensor([[12.0, 8.0]]) * (1 - steps),
        "adafisher": torch.tensor([[12.0, 8.0]]) + torch.tensor([[2.0, -30.0]]) * steps,
    }
    plots.plot_landscape(
        surface,
        alphas,
        betas,
        trajectories,
        tmp_path / "landscape.png",
        axis_labels=("PC1 (58.4% of the offsets)", "PC2 (21.4% of the offsets)"),
        title="digits-cnn: train loss around the final weights of kfac",
        dpi=80,
    )
    assert len(drawn_texts) > 20
    assert _overlaps(drawn_texts) == []
