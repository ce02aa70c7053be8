"""structcov: structured covariances for Gaussian-distributed parameters.

Written once against the Python array API standard; runs on NumPy, CuPy,
PyTorch and JAX. Importing this package imports no array backend.
"""

import os
from typing import Any

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


def save(file: str | os.PathLike[str], obj: Any) -> None:
    """Write structcov parameters or layers to a safetensors file: `structcov.io.save`.

    Imports `structcov.io` (NumPy, safetensors: the ``structcov[io]`` extra) when
    called, so ``import structcov`` stays free of them.
    """
    from . import io

    io.save(file, obj)


def load(
    file: str | os.PathLike[str], *, like: str = "numpy", device: Any = None, module: bool = False
) -> Any:
    """Read a structcov safetensors file into the backend ``like``: `structcov.io.load`.

    Imports `structcov.io` when called (see `save`).
    """
    from . import io

    return io.load(file, like=like, device=device, module=module)


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
    "load",
    "normal_prior",
    "parametrizations",
    "save",
]
