"""Curvature estimators, one file per method."""

from .base import CurvatureEstimator
from .kfac import KFAC, KFACConfig, KFACEstimator

__all__ = ["KFAC", "CurvatureEstimator", "KFACConfig", "KFACEstimator"]
