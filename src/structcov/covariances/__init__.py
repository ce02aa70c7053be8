"""Covariance structures, one module each."""

from .diagonal import DiagonalCovariance
from .factorized import FactorizedCovariance, LowRankCovariance
from .kronecker import KroneckerCovariance

__all__ = [
    "DiagonalCovariance",
    "FactorizedCovariance",
    "KroneckerCovariance",
    "LowRankCovariance",
]
