"""M-FAC pruning: the static blocked / paged inverse Fisher and the Optimal Brain Surgeon pruner.

See :mod:`secondorder.prune.inverse` (the inverse) and :mod:`secondorder.prune.pruner` (OBS,
magnitude pruning, masks, schedules, checkpoints); ``python -m secondorder.prune`` runs
one-shot and gradual pruning experiments.
"""

from .inverse import StaticFisherInverse
from .pruner import (
    GradualSchedule,
    MagnitudePruner,
    Masks,
    MFACPruner,
    collect_gradients,
    default_prunable,
    geometric_densities,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "GradualSchedule",
    "MFACPruner",
    "MagnitudePruner",
    "Masks",
    "StaticFisherInverse",
    "collect_gradients",
    "default_prunable",
    "geometric_densities",
    "load_checkpoint",
    "save_checkpoint",
]
