"""Covariance structures, one module each."""

from .diagonal import DiagonalCovariance
from .factorized import FactorizedCovariance, LowRankCovariance
from .kronecker import KroneckerCovariance
from .low_rank_plus_diagonal import LowRankPlusDiagonalCovariance

__all__ = [
    "DiagonalCovariance",
    "FactorizedCovariance",
    "KroneckerCovariance",
    "LowRankCovariance",
    "LowRankPlusDiagonalCovariance",
]
