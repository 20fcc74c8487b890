"""Curvature estimators, one file per method."""

from .adafisher import AdaFisher, AdaFisherConfig, AdaFisherEstimator, AdaFisherW
from .adahessian import AdaHessian, AdaHessianConfig, AdaHessianEstimator
from .base import CurvatureEstimator
from .ekfac import EKFAC, EKFACConfig, EKFACEstimator
from .kfac import KFAC, KFACConfig, KFACEstimator
from .mfac import MFAC, MFACConfig, MFACEstimator
from .shampoo import Shampoo, ShampooConfig, ShampooEstimator
from .soap import SOAP, SOAPConfig, SOAPEstimator
from .twolevel import TwoLevelKFAC, TwoLevelKFACConfig, TwoLevelKFACEstimator

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
    "AdaHessianEstimator",
    "CurvatureEstimator",
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
]
