"""structcov: structured covariances for Gaussian-distributed parameters.

Written once against the Python array API standard; runs on NumPy, CuPy,
PyTorch and JAX. Importing this package imports no array backend.
"""

from . import functional, parametrizations
from .convolution import conv
from .covariances import (
    DiagonalCovariance,
    FactorizedCovariance,
    KroneckerCovariance,
    LowRankCovariance,
    LowRankPlusDiagonalCovariance,
)
from .gaussian import BNNParameter, GaussianParameter, kl_divergence, normal_prior
from .layers import linear
from .projection import from_dense

__version__ = "0.1.0"

__all__ = [
    "BNNParameter",
    "DiagonalCovariance",
    "FactorizedCovariance",
    "GaussianParameter",
    "KroneckerCovariance",
    "LowRankCovariance",
    "LowRankPlusDiagonalCovariance",
    "__version__",
    "conv",
    "from_dense",
    "functional",
    "kl_divergence",
    "linear",
    "normal_prior",
    "parametrizations",
]
