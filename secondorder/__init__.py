"""secondorder: second-order optimizers for PyTorch behind one base class.

Public names::

    from secondorder import CurvatureOptimizer, KFAC
"""

from .estimators import KFAC, CurvatureEstimator, KFACConfig, KFACEstimator
from .optimizer import CurvatureOptimizer

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "CurvatureEstimator",
    "CurvatureOptimizer",
    "KFACConfig",
    "KFACEstimator",
    "__version__",
]
