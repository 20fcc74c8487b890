"""Curvature estimators, one file per method."""

from .base import CurvatureEstimator
from .kfac import KFAC, KFACConfig, KFACEstimator
from .mfac import MFAC, MFACConfig, MFACEstimator

__all__ = [
    "KFAC",
    "MFAC",
    "CurvatureEstimator",
    "KFACConfig",
    "KFACEstimator",
    "MFACConfig",
    "MFACEstimator",
]
