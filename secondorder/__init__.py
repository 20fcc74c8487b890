"""secondorder: second-order optimizers for PyTorch behind one base class.

Public names::

    from secondorder import KFAC, MFAC, CurvatureOptimizer
"""

from .estimators import (
    KFAC,
    MFAC,
    CurvatureEstimator,
    KFACConfig,
    KFACEstimator,
    MFACConfig,
    MFACEstimator,
)
from .optimizer import CurvatureOptimizer

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "MFAC",
    "CurvatureEstimator",
    "CurvatureOptimizer",
    "KFACConfig",
    "KFACEstimator",
    "MFACConfig",
    "MFACEstimator",
    "__version__",
]
