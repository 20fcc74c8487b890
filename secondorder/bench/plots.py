"""Loss curves of a bench run as PNG files: ``loss_vs_step.png`` and ``loss_vs_time.png``.

Both plot the mini-batch training loss the runner records at every step, smoothed with the
same trailing mean the "to target" column uses, one line per optimizer, on a log-scale y axis;
the x axis is the step, or the cumulative training time (zero_grad + forward + backward +
step, without the evaluations). Every optimizer has its own fixed colour and line style
(:data:`STYLES`), the same in every plot and every run: the first-order baselines dashed, the
optimizers with curvature solid. matplotlib is optional: without it nothing is drawn and a
warning says so.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .smoothing import TARGET_WINDOW, trailing_mean

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["STYLES", "LineStyle", "loss_figure", "plot_losses", "style_of"]


@dataclass(frozen=True)
class LineStyle:
    """How one optimizer's line is drawn: matplotlib ``color``, ``linestyle``, ``marker``
    (None: no marker) and ``linewidth``. ``mark_offset`` staggers the markers (a fraction of
    the axes' diagonal, matplotlib's float ``markevery``) so that two lines lying on top of each
    other both show."""

    color: str
    linestyle: str
    marker: str | None = None
    mark_offset: float = 0.0
    linewidth: float = 1.3


_MARK_EVERY = 0.1  # a marker every tenth of the axes' diagonal

_WIDE, _THIN = 2.6, 1.1

STYLES: dict[str, LineStyle] = {
    # First-order baselines: dashed or dotted, in colours no curvature method uses.
    "sgd": LineStyle("black", "--"),
    # Pairs whose curves (nearly) coincide: adam and adamw (a small weight decay apart),
    # kfac and ekfac, adafisher and adafisherw. The first is drawn wide, the second thin with
    # markers on top of it, so the first shows as a band of its colour around the second.
    "adam": LineStyle("tab:gray", "--", "o", linewidth=_WIDE),
    "adamw": LineStyle("tab:olive", ":", "s", _MARK_EVERY / 2, _THIN),
    # With curvature: solid, one colour each.
    "kfac": LineStyle("tab:blue", "-", linewidth=_WIDE),
    "ekfac": LineStyle("tab:cyan", "-", "^", _MARK_EVERY / 2, _THIN),
    "twolevel": LineStyle("tab:purple", "-"),
    "mfac": LineStyle("tab:red", "-"),
    "adam-mfac": LineStyle("tab:orange", "-", "v", _MARK_EVERY / 2),
    "adahessian": LineStyle("tab:brown", "-"),
    "adafisher": LineStyle("tab:green", "-", linewidth=_WIDE),
    "adafisherw": LineStyle("tab:pink", "-", "D", _MARK_EVERY / 2, _THIN),
    "shampoo": LineStyle("darkgoldenrod", "-"),
    "soap": LineStyle("darkslategray", "-"),
}
"""The line style of every registered optimizer, by name."""

# Optimizers registered later than this table: solid lines in colours the table leaves free,
# then the same colours dash-dotted.
_SPARE_COLOURS = ("gold", "navy", "teal", "maroon", "lime", "darkviolet", "salmon", "darkkhaki")


def style_of(name: str, others: list[str] | None = None) -> LineStyle:
    """The :data:`STYLES` entry of ``name``; an optimizer missing from it takes the next spare
    style in the order of the missing names in ``others`` (the names plotted together)."""
    if name in STYLES:
        return STYLES[name]
    missing = [n for n in (others or [name]) if n not in STYLES]
    i = missing.index(name) if name in missing else 0
    colour = _SPARE_COLOURS[i % len(_SPARE_COLOURS)]
    return LineStyle(colour, ("-", "-.")[(i // len(_SPARE_COLOURS)) % 2])


def loss_figure(results: Mapping[str, Any], x: str = "step") -> Figure | None:
    """The figure of ``loss_vs_<x>.png`` (``x``: ``"step"`` or ``"time"``), one line per run
    labelled with the optimizer's name and drawn in its :func:`style_of`, or None where no run
    has a loss to draw. The caller closes it (``matplotlib.pyplot.close``).

    Raises:
        ImportError: matplotlib is not installed.
    """
    if x not in ("step", "time"):
        raise ValueError(f"x must be 'step' or 'time', got {x!r}")
    import matplotlib

    matplotlib.use("Agg")  # no display needed; the bench may run on a headless machine
    import matplotlib.pyplot as plt

    config = results["config"]
    target = config.get("target")
    names = list(results["results"])
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    drawn = False
    for name, run in results["results"].items():
        losses = run.get("steps", {}).get("loss") or []
        if run["summary"].get("error") or not losses:
            continue
        if x == "step":
            xs: list[float] = list(range(1, len(losses) + 1))
        else:
            xs = [ms / 1e3 for ms in itertools.accumulate(run["steps"]["iter_ms"])]
        points = [
            (u, v)
            for u, v in zip(xs, trailing_mean(losses), strict=True)
            if math.isfinite(v) and v > 0
        ]
        if not points:
            continue
        style = style_of(name, names)
        ax.plot(
            *zip(*points, strict=True),
            label=name,
            linewidth=style.linewidth,
            color=style.color,
            linestyle=style.linestyle,
            marker=style.marker,
            markersize=4,
            markevery=(style.mark_offset, _MARK_EVERY) if style.marker else None,
        )
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label="target")
    ax.set_yscale("log")
    ax.set_xlabel("step" if x == "step" else "training time (s)")
    ax.set_ylabel(f"train loss (mean of last {TARGET_WINDOW} mini-batches)")
    ax.set_title(
        f"{config['task']}: loss vs {x} ({config['epochs']} epochs, "
        f"batch {config['batch_size']}, seed {config['seed']}, {config['device']})"
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_losses(results: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``loss_vs_step.png`` and ``loss_vs_time.png`` (:func:`loss_figure`) into
    ``out_dir``.

    Returns ``{"loss_vs_step": path, "loss_vs_time": path}``; ``{}`` where no run has a loss
    to draw (every run failed: no empty plot is written), and ``{}`` with a warning when
    matplotlib is not installed. Failed runs and non-positive or non-finite losses (which a
    log axis cannot show) are left out.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss plots written", stacklevel=2)
        return {}

    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for x in ("step", "time"):
        fig = loss_figure(results, x)
        if fig is None:
            continue
        try:
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"loss_vs_{x}.png"
            fig.savefig(path, dpi=120)
            paths[f"loss_vs_{x}"] = path
        finally:
            plt.close(fig)
    return paths
