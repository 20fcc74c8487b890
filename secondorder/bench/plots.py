"""Loss curves of a bench run as PNG files: ``loss_vs_step.png`` and ``loss_vs_time.png``.

Both plot the mini-batch training loss the runner records at every step, smoothed with the
same trailing mean the "to target" column uses, one line per optimizer, on a log-scale y axis;
the x axis is the step, or the cumulative training time (zero_grad + forward + backward +
step, without the evaluations). matplotlib is optional: without it nothing is drawn and a
warning says so.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .report import TARGET_WINDOW, trailing_mean

__all__ = ["plot_losses"]


def plot_losses(results: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``loss_vs_step.png`` and ``loss_vs_time.png`` into ``out_dir``.

    Returns ``{"loss_vs_step": path, "loss_vs_time": path}``, or ``{}`` (with a warning) when
    matplotlib is not installed. Failed runs and non-positive or non-finite losses (which a log
    axis cannot show) are left out.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; the bench may run on a headless machine
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss plots written", stacklevel=2)
        return {}

    config = results["config"]
    target = config.get("target")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for key, xlabel in (("step", "step"), ("time", "training time (s)")):
        fig, ax = plt.subplots(figsize=(8.5, 4.5))
        # Ten colours, then the same colours dashed: eleven optimizers stay distinguishable.
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        try:
            for i, (name, run) in enumerate(results["results"].items()):
                losses = run.get("steps", {}).get("loss") or []
                if run["summary"].get("error") or not losses:
                    continue
                if key == "step":
                    xs: list[float] = list(range(1, len(losses) + 1))
                else:
                    xs = [ms / 1e3 for ms in itertools.accumulate(run["steps"]["iter_ms"])]
                points = [
                    (x, y)
                    for x, y in zip(xs, trailing_mean(losses), strict=True)
                    if math.isfinite(y) and y > 0
                ]
                if points:
                    ax.plot(
                        *zip(*points, strict=True),
                        label=name,
                        linewidth=1.2,
                        color=colours[i % len(colours)],
                        linestyle=("-", "--", ":")[(i // len(colours)) % 3],
                    )
            if target is not None:
                ax.axhline(target, color="grey", linestyle=":", linewidth=1, label="target")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"train loss (mean of last {TARGET_WINDOW} mini-batches)")
            ax.set_title(
                f"{config['task']}: loss vs {key} ({config['epochs']} epochs, "
                f"batch {config['batch_size']}, seed {config['seed']}, {config['device']})"
            )
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
            ax.grid(True, which="both", alpha=0.3)
            fig.tight_layout()
            path = out / f"loss_vs_{key}.png"
            fig.savefig(path, dpi=120)
            paths[f"loss_vs_{key}"] = path
        finally:
            plt.close(fig)
    return paths
