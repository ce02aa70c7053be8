"""Map a known dense Gaussian onto a covariance structure (closed-form posteriors).

Core code: written against the array API only, so it runs on every backend.
``structcov.numpy.posterior_to_structure`` is this function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from . import _linalg
from ._array_api import Array, device_of, namespace
from .covariances import (
    Diagonal,
    Factorized,
    FactorizedCovariance,
    Kronecker,
    LowRankPlusDiagonal,
    Structure,
)
from .covariances._base import COVARIANCES
from .covariances._structure import inverse_positive_array
from .gaussian import GaussianParameter

__all__ = ["from_dense"]

#: (xp, structure, sym(Sigma)) -> storage, per structure type
FromDense = Callable[[Any, Any, Array], dict[str, Array]]
_FROM_DENSE: dict[type[Structure], FromDense] = {}


def register_from_dense(structure_type: type[Structure]) -> Callable[[FromDense], FromDense]:
    """Register the decorated function as `from_dense` for structures of this exact type."""

    def decorate(function: FromDense) -> FromDense:
        _FROM_DENSE[structure_type] = function
        return function

    return decorate


def _psd_factor(xp: Any, c: Array, rank: int, *, cholesky: bool = True) -> Array:
    """S of shape (n, rank) with S S^T = c (rank = n: Cholesky) or its best rank-``rank`` part.

    Otherwise (rank < n, or ``cholesky=False``): S = V_r diag(sqrt(lambda_r)), the
    top eigenpairs (Eckart-Young), eigenvalues clipped at zero, columns in
    decreasing eigenvalue order.
    """
    n = c.shape[0]
    if cholesky and rank >= n:
        return _linalg.cholesky(xp, c)  # the lower factor whichever triangle comes back
    values, vectors = _linalg.eigh(xp, c)  # ascending
    top = xp.flip(values[n - rank :], axis=0)
    top = xp.where(top > 0, top, xp.zeros_like(top))
    return xp.flip(vectors[:, n - rank :], axis=1) * xp.sqrt(top)


def _symmetric(xp: Any, a: Array) -> Array:
    return (a + xp.matrix_transpose(a)) / 2


def _split_rows(
    xp: Any, structure: Structure, flat: Array, trailing: tuple[int, ...]
) -> dict[str, Array]:
    """Rows of ``flat`` (P, *trailing) split per name and shaped ``(*mean.shape, *trailing)``."""
    layout = structure.layout
    return {
        name: xp.reshape(flat[offset : offset + size, ...], (*shape, *trailing))
        for name, shape, offset, size in zip(
            layout.names, layout.shapes, layout.offsets, layout.sizes, strict=True
        )
    }


@register_from_dense(Kronecker)
def _kronecker_storage(xp: Any, cov: Kronecker, sigma: Array) -> dict[str, Array]:
    """Van Loan-Pitsianis nearest Kronecker product, then factors of C_out and C_in."""
    layout = cov.layout
    weight_shape = layout.shape_of("weight")
    d_out, d_in = weight_shape[0], math.prod(weight_shape[1:])
    has_bias = "bias" in layout.names
    d_aug = d_in + int(has_bias)
    offsets = dict(zip(layout.names, layout.offsets, strict=True))
    # perm[o * d_aug + i] = flat index of W~[o, i] (bias = input column d_in).
    perm = [
        offsets["weight"] + o * d_in + i if i < d_in else offsets["bias"] + o
        for o in range(d_out)
        for i in range(d_aug)
    ]
    index = xp.asarray(perm, dtype=xp.int64, device=device_of(sigma))
    augmented = xp.take(xp.take(sigma, index, axis=0), index, axis=1)
    # Van Loan-Pitsianis: R[(o, o'), (i, i')] = Sigma~[(o, i), (o', i')] is rank one,
    # vec(C_out) vec(C_in)^T, exactly when Sigma~ = C_out ⊗ C_in.
    rearranged = xp.reshape(
        xp.permute_dims(xp.reshape(augmented, (d_out, d_aug, d_out, d_aug)), (0, 2, 1, 3)),
        (d_out * d_out, d_aug * d_aug),
    )
    u, s, vh = xp.linalg.svd(rearranged, full_matrices=False)
    root = xp.sqrt(s[0])
    c_out = xp.reshape(u[:, 0] * root, (d_out, d_out))
    c_in = xp.reshape(vh[0, :] * root, (d_aug, d_aug))
    # The singular vectors' joint sign is arbitrary: make C_out's trace positive.
    trace = xp.sum(xp.linalg.diagonal(c_out))
    sign = xp.where(trace < 0, -xp.ones_like(trace), xp.ones_like(trace))
    c_out, c_in = _symmetric(xp, c_out * sign), _symmetric(xp, c_in * sign)
    s_out = _psd_factor(xp, c_out, cov.output_rank)
    s_in = _psd_factor(xp, c_in, cov.input_rank)
    if cov.sample_scale != 1.0:
        s_out = s_out / cov.sample_scale
    storage = {"output_factor": s_out}
    for name in layout.names:
        if name == "weight":
            storage["input_factor.weight"] = xp.reshape(
                s_in[:d_in, ...], (*weight_shape[1:], cov.input_rank)
            )
        else:
            storage["input_factor.bias"] = s_in[d_in:, ...]
    return storage


def from_dense(
    mean: Array | Mapping[str, Array | None],
    cov_dense: Array,
    structure: FactorizedCovariance,
) -> GaussianParameter:
    """Map a known Gaussian N(mean, cov_dense) onto a covariance structure.

    Useful on every backend, and the way for NumPy/CuPy users (no autograd) to get a
    structured posterior:
    compute a posterior in closed form (conjugate models, Laplace with a known
    Hessian) and store it in a structure. ``cov_dense`` (P x P) is in the flat
    parameter order (names in insertion order, each row-major).

    What each structure receives (``sym`` = (A + A^T) / 2 is applied first):

    - ``DiagonalCovariance``: ``scale = sqrt(diag(Sigma))``, the marginal
      variances (moment matching). Exact when Sigma is diagonal. O(P).
    - ``FactorizedCovariance`` full rank: the Cholesky factor S = L in the flat
      order, exact. O(P^3). With rank k < P (also ``LowRankCovariance(k)``):
      the top-k eigenpairs, S = V_k Lambda_k^(1/2), the best rank-k approximation
      (Eckart-Young). O(P^3).
    - ``LowRankPlusDiagonalCovariance(r)``: U = V_r Lambda_r^(1/2) (rank-r
      eigen-truncation) and the residual diagonal kept, d^2 = diag(Sigma) -
      diag(U U^T), clipped below at eps * max diag(Sigma); diag is then exact
      (unless clipped) and the top-r eigenpairs are those of Sigma up to
      O(max d^2). O(P^3).
    - ``KroneckerCovariance``: for a layer with weight (d_out, *in_shape) and an
      optional bias, Sigma is rearranged into the augmented K-FAC order of
      W~ = [W | b] and the nearest Kronecker product C_out ⊗ C_in in the
      Frobenius norm is found by the Van Loan-Pitsianis rearrangement
      R[(o, o'), (i, i')] = Sigma~[(o, i), (o', i')] and a rank-1 SVD of R
      (sign fixed so tr C_out > 0); then S_out, S_in are Cholesky factors (or
      eigen-truncations for lower ranks), divided by ``sample_scale``. Exact
      when Sigma is exactly C_out ⊗ C_in in that convention; otherwise the
      Frobenius-nearest Kronecker product (which may lose PSD-ness if Sigma
      is far from Kronecker: the Cholesky then raises). SVD of a
      d_out^2 x d_aug^2 matrix: O(P^2 min(d_out, d_aug)^2).

    Cost: the input is dense P x P, so this is for small P only (P up to a few
    thousand); the results are the structured objects, with the usual costs.

    Parameters
    ----------
    mean
        A mapping name -> array (or ``None``), or a bare array; becomes the
        parameter's mean as is.
    cov_dense
        Shape (P, P), symmetric positive (semi)definite, the same library and
        dtype as the means.
    structure
        A fresh instance of a structcov structure (it is initialized here).

    Returns
    -------
    GaussianParameter
        ``GaussianParameter(mean, structure)`` with the storage filled.

    Raises
    ------
    ValueError
        ``cov_dense`` of the wrong shape, or not positive definite where a
        Cholesky factor is needed (NumPy; CuPy may return NaN instead).
    TypeError
        A structure other than structcov's own, or a dtype/library mismatch.
    """
    if COVARIANCES.get(type(structure).__name__) is not type(structure):
        raise TypeError(
            f"`structure` must be one of {sorted(COVARIANCES)} (a fresh instance), got "
            f"{type(structure).__module__}.{type(structure).__qualname__}"
        )
    param = GaussianParameter(mean, structure)
    reference: Array = param.mean[param.names[0]]
    xp = namespace(reference, cov_dense, argument="`cov_dense` and the means")
    num_params = param.num_params
    if tuple(cov_dense.shape) != (num_params, num_params):
        raise ValueError(
            f"`cov_dense` must have shape ({num_params}, {num_params}) (P x P), got "
            f"{tuple(cov_dense.shape)}"
        )
    if cov_dense.dtype != reference.dtype:
        raise TypeError(
            f"`cov_dense` must have the means' dtype {reference.dtype}, got {cov_dense.dtype} "
            "(cast one of them)"
        )
    sigma = _symmetric(xp, cov_dense)
    cov = param.cov
    frozen = cov.structure
    project = _FROM_DENSE.get(type(frozen))
    if project is None:
        raise TypeError(f"no from_dense is registered for the structure {type(frozen).__name__}")
    try:
        storage = project(xp, frozen, sigma)
    except Exception as error:
        # numpy.linalg.LinAlgError, torch.linalg.LinAlgError, ...: named alike, no common base.
        if not type(error).__name__.endswith("LinAlgError"):
            raise
        raise ValueError(
            f"`cov_dense` must be positive definite for the Cholesky factor of {cov!r}: {error}"
        ) from None
    cov.load_storage(storage)
    return param


@register_from_dense(Diagonal)
def _diagonal_storage(xp: Any, structure: Diagonal, sigma: Array) -> dict[str, Array]:
    """Moment matching: s = sqrt(diag(Sigma)), stored through the scale transform."""
    s = xp.sqrt(xp.linalg.diagonal(sigma))
    rows = _split_rows(xp, structure, inverse_positive_array(xp, s, structure.scale_transform), ())
    return {f"scale.{name}": value for name, value in rows.items()}


@register_from_dense(LowRankPlusDiagonal)
def _low_rank_plus_diagonal_storage(
    xp: Any, structure: LowRankPlusDiagonal, sigma: Array
) -> dict[str, Array]:
    """Rank-r eigen-truncation for U, the residual diagonal (clipped at eps max diag) for d."""
    rank = structure.rank
    u = _psd_factor(xp, sigma, rank, cholesky=False)
    diagonal = xp.linalg.diagonal(sigma)
    floor = xp.finfo(sigma.dtype).eps * xp.max(diagonal)
    residual = diagonal - xp.vecdot(u, u, axis=-1)
    residual = xp.where(residual > floor, residual, floor * xp.ones_like(residual))
    d = inverse_positive_array(xp, xp.sqrt(residual), structure.scale_transform)
    return {
        **{f"factor.{n}": v for n, v in _split_rows(xp, structure, u, (rank,)).items()},
        **{f"scale.{n}": v for n, v in _split_rows(xp, structure, d, ()).items()},
    }


@register_from_dense(Factorized)
def _factorized_storage(xp: Any, structure: Factorized, sigma: Array) -> dict[str, Array]:
    """The Cholesky factor at full rank, else the top-rank eigenpairs (Eckart-Young)."""
    rank = structure.rank
    factor = _psd_factor(xp, sigma, rank)
    return {f"factor.{n}": v for n, v in _split_rows(xp, structure, factor, (rank,)).items()}
