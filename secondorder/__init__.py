"""secondorder: second-order optimizers for PyTorch behind one base class.

Public names::

    from secondorder import KFAC, MFAC, CurvatureOptimizer
"""

from .estimators import (
    EKFAC,
    KFAC,
    MFAC,
    SOAP,
    AdaFisher,
    AdaFisherConfig,
    AdaFisherEstimator,
    AdaFisherW,
    AdaHessian,
    AdaHessianConfig,
    CurvatureEstimator,
    EKFACConfig,
    EKFACEstimator,
    KFACConfig,
    KFACEstimator,
    MFACConfig,
    MFACEstimator,
    Shampoo,
    ShampooConfig,
    ShampooEstimator,
    SOAPConfig,
    SOAPEstimator,
    TwoLevelKFAC,
    TwoLevelKFACConfig,
    TwoLevelKFACEstimator,
)
from .optimizer import CurvatureOptimizer
from .schedules import DampingWarmup

__version__ = "0.1.0"

__all__ = [
    "EKFAC",
    "KFAC",
    "MFAC",
    "SOAP",
    "AdaFisher",
    "AdaFisherConfig",
    "AdaFisherEstimator",
    "AdaFisherW",
    "AdaHessian",
    "AdaHessianConfig",
    "CurvatureEstimator",
    "CurvatureOptimizer",
    "DampingWarmup",
    "EKFACConfig",
    "EKFACEstimator",
    "KFACConfig",
    "KFACEstimator",
    "MFACConfig",
    "MFACEstimator",
    "SOAPConfig",
    "SOAPEstimator",
    "Shampoo",
    "ShampooConfig",
    "ShampooEstimator",
    "TwoLevelKFAC",
    "TwoLevelKFACConfig",
    "TwoLevelKFACEstimator",
    "__version__",
]
