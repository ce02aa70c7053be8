"""Small dense linear algebra (r x r capacitance matrices, square factors).

Every call of ``xp.linalg`` in the core goes through here, so a backend whose
linalg differs (e.g. dask: no ``slogdet``, an upper Cholesky) is fixed in one place.
"""

from __future__ import annotations

from typing import Any

from ._array_api import Array

__all__ = ["logabsdet", "solve"]


def logabsdet(xp: Any, a: Array) -> Array:
    """log |det a| for a square ``a`` of shape (..., n, n). O(n^3) (LU)."""
    return xp.linalg.slogdet(a)[1]


def solve(xp: Any, a: Array, b: Array) -> Array:
    """a^-1 b for ``a`` of shape (..., n, n) and a *matrix* ``b`` of shape (..., n, m).

    Vectors must be passed as (..., n, 1): ``xp.linalg.solve`` reads a 2-D ``b``
    as a matrix on every backend.
    """
    return xp.linalg.solve(a, b)
