"""Pictures of the factors and of the loss landscape (matplotlib, written as PNG files).

Every function takes what :mod:`secondorder.analysis.factors` and
:mod:`secondorder.analysis.landscape` return, writes one PNG and returns its path. Factor
figures have one row per layer and two columns, ``A`` (input factor) and ``G`` (output
factor). matplotlib is imported when a picture is drawn (``ImportError`` naming it if it is
missing), with the ``Agg`` backend: no display is needed.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .factors import FactorPair
from .spectra import diagonal_dominance, eigenvalues, frequency_field, gershgorin_discs

__all__ = [
    "plot_dominance",
    "plot_factor_heatmaps",
    "plot_frequency_fields",
    "plot_gershgorin",
    "plot_landscape",
    "plot_spectra",
]

_FACTOR_NAMES = ("A", "G")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "secondorder.analysis pictures need matplotlib: pip install matplotlib"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig: Any, path: str | os.PathLike[str], title: str, dpi: int) -> Path:
    """Title, lay out and save a figure (every factor picture ends this way)."""
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path, dpi)


def _save(fig: Any, path: str | os.PathLike[str], dpi: int) -> Path:
    """Lay out (``tight_layout``) and save as a PNG with a 256-colour palette (a third of the
    size of a true-colour PNG of these pictures, no visible difference)."""
    # the layout measures every text at the figure's dpi and the PNG draws it at ``dpi``:
    # at one dpi, the drawing reuses the layout's text extents and mathtext parses
    fig.set_dpi(dpi)
    fig.tight_layout()
    # tight_layout leaves a placeholder layout engine, for which savefig would draw the whole
    # figure once more before drawing it for real: the layout is done, drop the engine
    fig.set_layout_engine(None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    buffer.seek(0)
    try:
        from PIL import Image
    except ImportError:  # matplotlib depends on Pillow, but keep the plain PNG if it is gone
        path.write_bytes(buffer.getvalue())
        return path
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=256).save(path, format="PNG", optimize=True)
    return path


def _grid(plt: Any, rows: int, size: tuple[float, float]) -> tuple[Any, Any]:
    fig, axes = plt.subplots(rows, 2, figsize=(size[0] * 2, size[1] * rows), squeeze=False)
    return fig, axes


def _colorbar(fig: Any, image: Any, ax: Any, ticks: Sequence[float] | None = None) -> Any:
    """A slim colour bar beside ``ax``, its tick labels small, without minor ticks (a log
    scale's eight per decade cost layout time and show nothing without labels)."""
    cbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, ticks=ticks)
    cbar.minorticks_off()
    cbar.ax.tick_params(labelsize=6)
    return cbar


def _symlog_ticks(top: int) -> list[float]:
    """Colour-bar ticks of a symmetric-log scale whose largest decade is ``10**top`` and whose
    linear part ends three decades below: 0 and ``±10**top``, ``±10**(top - 2)``: five labels,
    where a tick per decade crowds the linear part's ``±10**(top - 3)`` onto 0."""
    return [-(10.0**top), -(10.0 ** (top - 2)), 0.0, 10.0 ** (top - 2), 10.0**top]


def _tick_texts(values: Sequence[float]) -> list[str]:
    """Labels that each carry their whole number: ``%.3g`` where the largest magnitude is in
    ``[1e-3, 1e4)``, else all in scientific notation (``-8e-5``, ``0``, ``1.6e-4``)."""
    big = max((abs(v) for v in values), default=0.0)
    if big == 0 or 1e-3 <= big < 1e4:
        return [f"{v:.3g}" for v in values]
    return [
        "0" if v == 0 else np.format_float_scientific(v, precision=2, trim="-", exp_digits=1)
        for v in values
    ]


def _plain_numbers(axis: Any, bins: int = 4) -> None:
    """At most ``bins`` intervals of ticks, each label its own number (:func:`_tick_texts`):
    no offset or ``1e-6`` multiplier text, which matplotlib puts above a y axis, on the line
    of the panel's title."""
    from matplotlib.ticker import Formatter, MaxNLocator

    class WholeNumbers(Formatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return _tick_texts([x])[0]

        def format_ticks(self, values: Sequence[float]) -> list[str]:
            return _tick_texts(values)

    axis.set_major_locator(MaxNLocator(nbins=bins))
    axis.set_major_formatter(WholeNumbers())


def _eig_text(value: float, floor: float) -> str:
    """An eigenvalue for a title: ``≈0`` at or below the rounding floor (its digits are noise)."""
    return "≈0" if abs(value) <= floor else f"{value:.3g}"


def plot_factor_heatmaps(
    factors: Mapping[str, FactorPair],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    dpi: int = 80,
) -> Path:
    """Heatmaps of every layer's ``A`` and ``G``: a diverging colour map on a symmetric-log
    scale (linear within three decades below the largest magnitude's), so that the diagonal
    and the off-diagonal entries show on one picture; each panel's title gives the diagonal
    dominance."""
    plt = _pyplot()
    from matplotlib.colors import SymLogNorm

    fig, axes = _grid(plt, len(factors), (3.6, 3.1))
    try:
        for row, (name, pair) in enumerate(factors.items()):
            for col, m in enumerate(pair):
                ax = axes[row, col]
                peak = float(m.abs().max()) or 1.0
                top = math.floor(math.log10(peak))
                norm = SymLogNorm(linthresh=10.0 ** (top - 3), vmin=-peak, vmax=peak, base=10)
                image = ax.imshow(m.numpy(), cmap="RdBu_r", norm=norm, interpolation="nearest")
                ax.set_title(
                    f"{name}: {_FACTOR_NAMES[col]} ({m.shape[0]}), "
                    f"dominance {diagonal_dominance(m):.3f}",
                    fontsize=8,
                )
                ax.tick_params(labelsize=6)
                _colorbar(fig, image, ax, _symlog_ticks(top))
        return _finish(fig, path, title, dpi)
    finally:
        plt.close(fig)


def plot_spectra(
    factors: Mapping[str, FactorPair],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    dpi: int = 80,
) -> Path:
    """Eigenvalues of every factor, largest first, on a log scale: one line per layer, ``A``
    on the left panel and ``G`` on the right. Eigenvalues at or below the rounding floor
    ``dim · eps · λ_max`` (zero up to rounding, and all non-positive ones, which a log axis
    cannot show) are left out and counted in the legend as ``≈ 0``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), squeeze=False)
    try:
        for col, factor_name in enumerate(_FACTOR_NAMES):
            ax = axes[0, col]
            for name, pair in factors.items():
                eigs = eigenvalues(pair[col]).flip(0)
                floor = len(eigs) * torch.finfo(torch.float64).eps * max(float(eigs[0]), 0.0)
                positive = eigs[eigs > floor]
                dropped = len(eigs) - len(positive)
                label = f"{name} ({len(eigs)})" + (f", {dropped} ≈ 0" if dropped else "")
                if len(positive):
                    ax.plot(range(1, len(positive) + 1), positive.numpy(), label=label, lw=1.2)
            ax.set_yscale("log")
            ax.set_xscale("log")
            ax.set_xlabel("index (largest first)", fontsize=8)
            ax.set_ylabel(f"eigenvalue of {factor_name}", fontsize=8)
            ax.set_title(f"spectrum of {factor_name}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        return _finish(fig, path, title, dpi)
    finally:
        plt.close(fig)


def plot_gershgorin(
    factors: Mapping[str, FactorPair],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    dpi: int = 80,
) -> Path:
    """Gershgorin discs (centre ``M_ii``, radius ``Σ_{j≠i} |M_ij|``) of every factor in the
    complex plane, the eigenvalues on the real axis (crosses), the union's extent (dashed) and
    ``[λ_min, λ_max]`` (solid). The title gives both intervals; an eigenvalue at or below the
    rounding floor ``dim · eps · λ_max`` is written ``≈0``."""
    plt = _pyplot()
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle

    fig, axes = _grid(plt, len(factors), (3.4, 3.0))
    try:
        for row, (name, pair) in enumerate(factors.items()):
            for col, m in enumerate(pair):
                ax = axes[row, col]
                centres, radii = gershgorin_discs(m)
                eigs = eigenvalues(m)
                discs = [
                    Circle((float(c), 0.0), float(r)) for c, r in zip(centres, radii, strict=True)
                ]
                ax.add_collection(
                    PatchCollection(
                        discs, facecolor="tab:blue", edgecolor="tab:blue", alpha=0.08, lw=0.5
                    )
                )
                low, high = float((centres - radii).min()), float((centres + radii).max())
                reach = float(radii.max())
                ax.plot(eigs.numpy(), [0.0] * len(eigs), "x", color="tab:red", ms=4, mew=0.8)
                for x in (low, high):
                    ax.axvline(x, color="grey", ls="--", lw=0.8)
                for x in (float(eigs[0]), float(eigs[-1])):
                    ax.axvline(x, color="tab:red", lw=0.8)
                pad = 0.05 * (high - low) or 1.0
                ax.set_xlim(low - pad, high + pad)
                ax.set_ylim(-(reach or pad) * 1.1, (reach or pad) * 1.1)
                ax.set_aspect("equal", adjustable="box")  # discs as circles
                floor = len(eigs) * torch.finfo(torch.float64).eps * float(eigs.abs().max())
                ax.set_title(
                    f"{name}: {_FACTOR_NAMES[col]}  discs [{low:.3g}, {high:.3g}], "
                    f"eig [{_eig_text(float(eigs[0]), floor)}, "
                    f"{_eig_text(float(eigs[-1]), floor)}]",
                    fontsize=7,
                )
                _plain_numbers(ax.xaxis)
                _plain_numbers(ax.yaxis)
                ax.tick_params(labelsize=6)
        return _finish(fig, path, title, dpi)
    finally:
        plt.close(fig)


def plot_frequency_fields(
    factors: Mapping[str, FactorPair],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    dpi: int = 80,
) -> Path:
    """``|FFT2(M)|`` of every factor (zero frequency in the centre), log colour scale
    (four decades below the peak)."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    fig, axes = _grid(plt, len(factors), (3.4, 3.0))
    try:
        for row, (name, pair) in enumerate(factors.items()):
            for col, m in enumerate(pair):
                ax = axes[row, col]
                field = frequency_field(m)
                peak = float(field.max()) or 1.0
                n = m.shape[0]
                extent = (-n / 2, n / 2, n / 2, -n / 2)
                image = ax.imshow(
                    field.clamp_min(peak * 1e-4).numpy(),
                    cmap="magma",
                    norm=LogNorm(vmin=peak * 1e-4, vmax=peak),
                    extent=extent,
                    interpolation="nearest",
                )
                ax.set_title(f"{name}: |FFT2({_FACTOR_NAMES[col]})|", fontsize=8)
                ax.tick_params(labelsize=6)
                _colorbar(fig, image, ax)
        return _finish(fig, path, title, dpi)
    finally:
        plt.close(fig)


def plot_dominance(
    dominance: Mapping[str, Mapping[str, tuple[float, float]]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    dpi: int = 80,
) -> Path:
    """Bars of the diagonal dominance of ``A`` and ``G`` per layer, one group of bars per
    run: ``{run: {layer: (dominance A, dominance G)}}``."""
    plt = _pyplot()
    runs = list(dominance)
    layers = list(dict.fromkeys(name for per in dominance.values() for name in per))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), squeeze=False, sharey=True)
    width = 0.8 / max(len(runs), 1)
    try:
        for col, factor_name in enumerate(_FACTOR_NAMES):
            ax = axes[0, col]
            for k, run in enumerate(runs):
                xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(layers))]
                ys = [dominance[run].get(layer, (math.nan, math.nan))[col] for layer in layers]
                ax.bar(xs, ys, width=width, label=run)
            ax.set_xticks(range(len(layers)), layers, fontsize=7)
            ax.set_xlabel("layer", fontsize=8)
            ax.set_title(f"diagonal dominance of {factor_name}", fontsize=9)
            ax.set_ylim(0, 1)
            ax.tick_params(labelsize=7)
            ax.grid(True, axis="y", alpha=0.3)
        axes[0, 0].set_ylabel("‖diag M‖² / ‖M‖²", fontsize=8)
        # outside the panels: inside, it hides the bars of the last layer
        axes[0, 1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        return _finish(fig, path, title, dpi)
    finally:
        plt.close(fig)


def plot_landscape(
    surface: Tensor,
    alphas: Sequence[float] | Tensor,
    betas: Sequence[float] | Tensor,
    trajectories: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    axis_labels: tuple[str, str] = ("direction 1", "direction 2"),
    title: str = "",
    dpi: int = 80,
) -> Path:
    """Filled contours of ``log10(loss)`` on the plane (``surface`` from
    :func:`~secondorder.analysis.landscape.loss_surface`), with every trajectory's projected
    coordinates (``{name: (records, 2)}``) drawn as a line from a circle (start) to a star
    (end); the centre is marked with a black cross."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 5.0))
    try:
        values = surface.clamp_min(1e-12).log10().numpy()
        xs = torch.as_tensor(alphas, dtype=torch.float64).numpy()
        ys = torch.as_tensor(betas, dtype=torch.float64).numpy()
        filled = ax.contourf(xs, ys, values, levels=30, cmap="viridis")
        ax.contour(xs, ys, values, levels=15, colors="white", linewidths=0.4, alpha=0.6)
        cbar = fig.colorbar(filled, ax=ax)
        cbar.set_label("log10 loss", fontsize=8)
        cbar.ax.tick_params(labelsize=7)
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (name, coords) in enumerate(trajectories.items()):
            c = coords.numpy()
            colour = colours[(i + 1) % len(colours)]
            ax.plot(c[:, 0], c[:, 1], "-", color=colour, lw=1.4, label=name)
            ax.plot(c[:, 0], c[:, 1], ".", color=colour, ms=2.5)
            ax.plot(c[0, 0], c[0, 1], "o", color=colour, ms=6, mec="black", mew=0.6)
            ax.plot(c[-1, 0], c[-1, 1], "*", color=colour, ms=11, mec="black", mew=0.6)
        ax.plot(0, 0, "+", color="black", ms=10, mew=1.5)
        ax.set_xlim(xs[0], xs[-1])
        ax.set_ylim(ys[0], ys[-1])
        ax.set_xlabel(axis_labels[0], fontsize=8)
        ax.set_ylabel(axis_labels[1], fontsize=8)
        ax.tick_params(labelsize=7)
        if trajectories:
            ax.legend(fontsize=8, loc="best")
        if title:
            ax.set_title(title, fontsize=9)
        return _save(fig, path, dpi)
    finally:
        plt.close(fig)
