"""Covariance structures, one module each: the frozen structure and its seed-API object.

Each module defines a final `Structure` (the maths over explicit storage), the
public covariance class users construct, and its registrations (KL pairs).
"""

from ._base import CovarianceMethods, StructuredCovariance
from ._structure import Slot, Structure
from .diagonal import Diagonal, DiagonalCovariance
from .factorized import Factorized, FactorizedCovariance, LowRankCovariance
from .kronecker import Kronecker, KroneckerCovariance
from .low_rank_plus_diagonal import LowRankPlusDiagonal, LowRankPlusDiagonalCovariance

__all__ = [
    "CovarianceMethods",
    "Diagonal",
    "DiagonalCovariance",
    "Factorized",
    "FactorizedCovariance",
    "Kronecker",
    "KroneckerCovariance",
    "LowRankCovariance",
    "LowRankPlusDiagonal",
    "LowRankPlusDiagonalCovariance",
    "Slot",
    "Structure",
    "StructuredCovariance",
]
