"""KL divergence between two structured Gaussians, registered per (type of q, type of p).

KL(q || p) = 0.5 [tr(Sigma_p^-1 Sigma_q) + d^T Sigma_p^-1 d - P
                  + log det Sigma_p - log det Sigma_q],   d = m_p - m_q.

Each structure module registers the pairs it can do better than the generic form
(`register_kl`, as a decorator); `kl_function` picks the most specific
registration along both classes' method resolution orders, q's first. The generic
pair (Structure, Structure) registered here is exact for every pair. Registered
functions take ``(xp, q, q_storage, p, p_storage, difference)`` with ``difference``
the flat (P,) vector m_p - m_q and return the KL as a 0-D array; ``p`` is never
singular there: when both are singular by construction the caller dispatches to a
second registry (`register_kl_singular`), whose functions decide whether the
supports coincide (`Support`, with a stated tolerance) and compute the KL of the two
densities on that common support.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from .. import _linalg
from .._array_api import Array, device_of
from ._structure import (
    Storage,
    Structure,
    assemble,
    eye,
    logdet_of,
    split_flat,
    total,
)

__all__ = [
    "KLFunction",
    "KLSingularFunction",
    "KLToNormalFunction",
    "Support",
    "finish",
    "kl_function",
    "kl_singular_function",
    "kl_to_normal_function",
    "mahalanobis",
    "ratio_excess",
    "register_kl",
    "register_kl_singular",
    "register_kl_to_normal",
    "support",
]

KLFunction = Callable[[Any, Any, Storage, Any, Storage, Array], Array]
_F = TypeVar("_F", bound=KLFunction)

#: (type of q, type of p) -> KL function
_REGISTRY: dict[tuple[type, type], KLFunction] = {}

#: ``(xp, q, q_storage, means, scale) -> KL(q || N(0, scale^2 I))``, ``means`` the
#: per-name mean arrays in layout order and ``scale`` a Python float > 0.
KLToNormalFunction = Callable[[Any, Any, Storage, list[Array], float], Array]
_G = TypeVar("_G", bound=KLToNormalFunction)
#: type of q -> KL to the isotropic prior
_TO_NORMAL: dict[type, KLToNormalFunction] = {}


def register_kl(q_type: type, p_type: type) -> Callable[[_F], _F]:
    """Register the decorated function as KL(q || p) for structures of these types.

    The function's docstring should state the identity it uses and its cost.
    """

    def decorate(function: _F) -> _F:
        _REGISTRY[q_type, p_type] = function
        return function

    return decorate


_T = TypeVar("_T")


def _most_specific(registry: dict[tuple[type, type], _T], q_type: type, p_type: type) -> _T | None:
    """The registration for the most specific pair along both MROs (q's class first)."""
    for q_class in q_type.__mro__:
        for p_class in p_type.__mro__:
            found = registry.get((q_class, p_class))
            if found is not None:
                return found
    return None


def kl_function(q_type: type, p_type: type) -> KLFunction:
    """The most specific registered KL for the pair (q's class first, then p's)."""
    found = _most_specific(_REGISTRY, q_type, p_type)
    if found is None:
        raise NotImplementedError(
            f"no KL divergence is registered for the pair ({q_type.__name__}, "
            f"{p_type.__name__}); register one with structcov.covariances._kl.register_kl"
        )
    return found


#: ``(xp, q, q_storage, p, p_storage, difference, mean_size) -> KL(q || p)`` for q and p
#: both singular by construction; ``mean_size`` = |m_q| + |m_p| (a 0-D array), the scale
#: below which an off-support mean difference is rounding.
KLSingularFunction = Callable[[Any, Any, Storage, Any, Storage, Array, Array], Array]
_H = TypeVar("_H", bound=KLSingularFunction)
#: (type of q, type of p) -> KL on the common support
_SINGULAR: dict[tuple[type, type], KLSingularFunction] = {}


def register_kl_singular(q_type: type, p_type: type) -> Callable[[_H], _H]:
    """Register the decorated function as KL(q || p) for q and p both singular by
    construction (structures of these types); see `Support` for the decision."""

    def decorate(function: _H) -> _H:
        _SINGULAR[q_type, p_type] = function
        return function

    return decorate


def kl_singular_function(q_type: type, p_type: type) -> KLSingularFunction:
    """The most specific registered KL on a common support (q's class first)."""
    found = _most_specific(_SINGULAR, q_type, p_type)
    if found is None:  # pragma: no cover -- (Structure, Structure) is registered
        raise NotImplementedError(
            f"no KL on a common support is registered for ({q_type.__name__}, {p_type.__name__})"
        )
    return found


def register_kl_to_normal(q_type: type) -> Callable[[_G], _G]:
    """Register the decorated function as KL(q || N(0, scale^2 I)) for structures of
    ``q_type`` (the prior of every VI step, with ``scale`` a known Python float)."""

    def decorate(function: _G) -> _G:
        _TO_NORMAL[q_type] = function
        return function

    return decorate


def kl_to_normal_function(q_type: type) -> KLToNormalFunction:
    """The most specific registered KL to N(0, scale^2 I) along q's MRO."""
    for q_class in q_type.__mro__:
        found = _TO_NORMAL.get(q_class)
        if found is not None:
            return found
    raise NotImplementedError(  # pragma: no cover -- Structure itself is registered below
        f"no KL to N(0, scale^2 I) is registered for {q_type.__name__}"
    )


def mahalanobis(
    xp: Any, p: Structure, p_storage: Storage, p_state: Any, difference: Array
) -> Array:
    """d^T Sigma_p^-1 d for a flat (P,) ``d``, through p's quadratic form."""
    d = xp.reshape(difference, (1, difference.shape[0]))
    return xp.sum(p.quadratic(xp, p_storage, p_state, split_flat(p, d)))


def kl_from_trace(
    xp: Any,
    trace: Array,
    q: Structure,
    q_storage: Storage,
    p: Structure,
    p_storage: Storage,
    p_state: Any,
    difference: Array,
) -> Array:
    """0.5 [trace + d^T Sigma_p^-1 d - P + log det Sigma_p - log det Sigma_q], with
    ``trace`` = tr(Sigma_p^-1 Sigma_q) computed by the caller's identity."""
    return 0.5 * (
        trace
        + mahalanobis(xp, p, p_storage, p_state, difference)
        - q.num_params
        + p.logdet(xp, p_storage, p_state)
        - logdet_of(xp, q, q_storage)
    )


def ratio_excess(xp: Any, s_q: Array, s_p: Array) -> tuple[Array, Array]:
    """``(rho - 1 - log rho, rho - 1)`` elementwise for rho = (s_q / s_p)^2, both >= 0 terms.

    Standard deviations, never variances: s^2 underflows in float32 (1e-23) long before
    s does. log rho is 2 log1p(|s_q/s_p| - 1) where the ratio is within (1/2, 2) (exact
    argument, no cancellation near rho = 1), else 2 (log|s_q| - log|s_p|). Exact at the
    edges: ``+inf`` where exactly one of s_q, s_p is 0, ``0`` where both are (the caller
    decides about the means there); ``rho - 1`` is then read with 1 for a zero s_p.
    jit-safe: ``where`` on values only.
    """
    a_q, a_p = xp.abs(s_q), xp.abs(s_p)
    q_zero, p_zero = a_q == 0, a_p == 0
    q_safe = xp.where(q_zero, xp.ones_like(a_q), a_q)
    p_safe = xp.where(p_zero, xp.ones_like(a_p), a_p)
    ratio = q_safe / p_safe  # |s_q / s_p|
    near = (ratio > 0.5) & (ratio < 2.0)
    near_ratio = xp.where(near, ratio, xp.ones_like(ratio))
    excess_near = (ratio - 1.0) * (ratio + 1.0) - 2.0 * xp.log1p(near_ratio - 1.0)
    excess_far = ratio * ratio - 1.0 - 2.0 * (xp.log(q_safe) - xp.log(p_safe))
    excess = xp.where(near, excess_near, excess_far)
    # exactly one zero: +inf (q has no density w.r.t. p or the converse); both: 0.
    edge = xp.where(q_zero & p_zero, xp.zeros_like(excess), xp.full_like(excess, math.inf))
    excess = xp.where(q_zero | p_zero, edge, excess)
    minus_one = xp.where(q_zero, -xp.ones_like(ratio), (ratio - 1.0) * (ratio + 1.0))
    return excess, minus_one


def finish(xp: Any, value: Array, infinite: Array, undefined: Array | None = None) -> Array:
    """``value`` with ``+inf`` where ``infinite`` (0-D bool), else NaN where ``undefined``.

    For exact infinities (a singular q, a p without mass where q has some): the
    finite-looking ``value`` computed from safe substitutes is replaced on values
    (``where``), never by a Python branch, so it holds under ``jax.jit``.
    """
    # Python scalars in `where` (array API 2024.12): no array to create, value's dtype kept
    if undefined is not None:
        value = xp.where(undefined, math.nan, value)
    return xp.where(infinite, math.inf, value)


@register_kl(Structure, Structure)
def _kl_generic(
    xp: Any, q: Structure, q_storage: Storage, p: Structure, p_storage: Storage, difference: Array
) -> Array:
    """Any pair: tr(Sigma_p^-1 S_q S_q^T) = sum_k s_k^T Sigma_p^-1 s_k over q's K columns.

    Exact; O(K_q P) memory for the columns of S_q (P x P when q is diagonal or has a
    diagonal part), plus one solve with p of K_q + 1 vectors.
    """
    ref = q_storage[q.slots[0].path]
    columns = assemble(xp, q.blocks(xp, q_storage, eye(xp, q.num_factor_columns, ref)))  # S_q^T
    p_state = p.prepare(xp, p_storage)
    solved = assemble(xp, p.solve_blocks(xp, p_storage, p_state, split_flat(p, columns)))
    trace = xp.sum(columns * solved)
    return kl_from_trace(xp, trace, q, q_storage, p, p_storage, p_state, difference)


@register_kl_to_normal(Structure)
def _kl_to_normal_generic(
    xp: Any, q: Structure, q_storage: Storage, means: list[Array], scale: float
) -> Array:
    """KL(q || N(0, c I)), c = scale^2, from q's trace and log-determinant only: O(cost of
    ``trace`` + ``logdet``), no P-sized temporary beyond q's own operations.

    KL = 0.5 [tr/c - P + P log c - log det Sigma_q + |m|^2 / c], evaluated as a sum of
    three non-negative terms so that float32 does not cancel two P-sized sums:
    P (t - 1 - log t) with t = tr / (P c) (the spread of the mean eigenvalue; t - 1 is
    exact near t = 1, where the term is second order), P log(tr / P) - log det Sigma_q
    = P (log t + log c) - log det Sigma_q (>= 0 by the AM-GM inequality on the
    eigenvalues), and |m / scale|^2. About a dozen scalar operations: each costs a fixed
    overhead (forward and backward) on CPU torch, a measurable part of a training step.
    ``+inf`` where exact: a singular q (log det = -inf), a zero or overflowing trace
    (log t = -inf or +inf; the value is then NaN before `finish`, and so is its
    gradient, as at the diagonal KL's edges: the loss is infinite either way).
    """
    num = q.num_params
    t = q.trace(xp, q_storage) / (num * scale * scale)
    log_t = xp.log(t)
    spread = num * ((t - 1.0) - log_t)
    gap = (num * log_t + 2.0 * num * math.log(scale)) - logdet_of(xp, q, q_storage)
    mean = mean_term(xp, means, scale)
    return finish(xp, 0.5 * (spread + gap + mean), xp.isinf(log_t))


def mean_term(xp: Any, means: list[Array], scale: float) -> Array:
    """|m / scale|^2 over every mean, one ``sum(m * m)`` per mean (divided first when
    scale != 1: m^2 overflows in float32 before m / scale does).

    A sum, not a 1-D dot: the backends sum pairwise (error ~ eps log P), a BLAS dot
    accumulates in one float32 (~ eps P: 1e-6 relative at P = 1e6); forward and
    backward cost about the same on CPU torch. array-api-compat's torch ``vecdot`` is
    a slow (1, P) x (P, 1) ``mm``.
    """
    if scale != 1.0:  # static: a Python float
        means = [mean / scale for mean in means]
    return total(xp.sum(mean * mean) for mean in means)


# ---------------------------------------------------------------- singular pairs
# Two covariances singular by construction (a dense factor with K < P, a low-rank
# Kronecker structure): q is absolutely continuous with respect to p exactly when
# both live on the same affine subspace, m_q + range(Sigma_q) = m_p + range(Sigma_p).
# Then KL is that of two densities on the common subspace (pseudo-determinants,
# pseudo-inverse), else +inf. "Same subspace" is decided in floating point with the
# tolerance of `Support`.


class Support(NamedTuple):
    """range(A A^T) of an (n, k) factor A, from A = Q R (QR) and R = U_R diag(s) V^T (SVD).

    ``basis`` Q U_R (n, m), m = min(n, k), orthonormal columns: the left singular
    vectors of A; ``values`` s (m,), descending; ``kept`` (m,) bool, s_i > tol s_1 with
    tol = max(n, k) eps (the rule of numpy.linalg.matrix_rank); ``rank`` sum(kept) and
    ``cond`` s_1 / s_rank (1 when the rank is 0), both 0-D arrays in A's dtype.
    O(n k^2), memory O(n k); jit-safe (masks, no data-dependent shape).
    """

    basis: Array
    values: Array
    kept: Array
    rank: Array
    cond: Array


def support(xp: Any, factor: Array) -> Support:
    """The `Support` of an (n, k) factor (QR first: the SVD of A's small R factor is
    as accurate as A's own, without A^T A squaring its condition number)."""
    n, k = factor.shape
    q, r = _linalg.qr(xp, factor)
    u, s, _ = _linalg.svd(xp, r)
    basis = xp.matmul(q, u)
    del q  # n x m: not held while the caller forms the next one
    eps = float(xp.finfo(factor.dtype).eps)
    top = xp.max(s)
    kept = s > (max(n, k) * eps) * top
    rank = xp.sum(xp.astype(kept, factor.dtype))
    smallest = xp.min(xp.where(kept, s, xp.full_like(s, math.inf)))
    safe = xp.where(rank > 0, smallest, xp.ones_like(smallest))
    cond = xp.where(rank > 0, top / safe, xp.ones_like(top))
    return Support(basis, s, kept, rank, cond)


def off_support(xp: Any, found: Support, x: Array, columns: Array | None = None) -> Array:
    """|(I - U_k U_k^T) x|_F for an (n, c) ``x``: the part of x outside the support, over
    the columns where ``columns`` (a (c,) bool) is true (all by default). O(n m c); the
    masks act on the m x c coordinates and the c column norms, so the only n-sized
    temporary is the residual."""
    coordinates = _linalg.matmul(xp, xp.matrix_transpose(found.basis), x)
    coordinates = xp.where(
        xp.expand_dims(found.kept, axis=1), coordinates, xp.zeros_like(coordinates)
    )
    residual = x - xp.matmul(found.basis, coordinates)
    norms = xp.sum(residual * residual, axis=0)
    if columns is not None:
        norms = xp.where(columns, norms, xp.zeros_like(norms))
    return xp.sqrt(xp.sum(norms))


def whiten(xp: Any, found: Support, x: Array) -> Array:
    """diag(kept / s) U^T x, shape (m, c): x in the support's coordinates, whitened by
    the factor (Sigma^+1/2 x, the pseudo-inverse root); dropped rows are 0."""
    s = found.values
    inverse = xp.where(found.kept, 1.0 / xp.where(found.kept, s, xp.ones_like(s)), xp.zeros_like(s))
    coordinates = _linalg.matmul(xp, xp.matrix_transpose(found.basis), x)
    return coordinates * xp.expand_dims(inverse, axis=1)


def top_excess(xp: Any, values: Array, count: Array) -> Array:
    """sum over the first ``count`` of ``values`` (descending) of sigma^2 - 1 - 2 log sigma,
    each term >= 0 (`ratio_excess`, accurate near sigma = 1; +inf for a zero sigma)."""
    excess, _ = ratio_excess(xp, values, xp.ones_like(values))
    index = xp.astype(xp.arange(values.shape[0], device=device_of(values)), values.dtype)
    return xp.sum(xp.where(index < count, excess, xp.zeros_like(excess)))


@register_kl_singular(Structure, Structure)
def _kl_singular_generic(
    xp: Any,
    q: Structure,
    q_storage: Storage,
    p: Structure,
    p_storage: Storage,
    difference: Array,
    mean_size: Array,
) -> Array:
    """Both singular by construction: KL on the common support, or +inf.

    With S = [columns of S_q S_p] formed (K_q + K_p vectors, O((K_q + K_p) P) memory:
    a dense factor's own storage; r_out r_in P for a low-rank Kronecker structure), and
    `Support` U_q, U_p (QR + SVD, O(P (K_q^2 + K_p^2))):

    - supports equal <=> rank_q = rank_p, |(I - U_p U_p^T) U_q|_F <= tol (cond_q + cond_p)
      and |(I - U_p U_p^T) d|| <= tol cond_p (|m_q| + |m_p|), tol = max(P, K_q, K_p) eps
      (what rounding moves a computed subspace by); otherwise +inf;
    - then, with T = diag(1 / s_p) U_p^T S_q (q whitened by p on the support, k x K_q)
      and sigma_i its k largest singular values, every term >= 0:
      2 KL = sum_i (sigma_i^2 - 1 - 2 log sigma_i) + |diag(1 / s_p) U_p^T d|^2,
      the full-rank formula on the k-dimensional support (tr(Sigma_p^+ Sigma_q) =
      sum sigma_i^2, pdet Sigma_q / pdet Sigma_p = prod sigma_i^2). KL(q || q) is 0 to
      rounding (sigma_i = 1).
    """
    ref = q_storage[q.slots[0].path]
    p_ref = p_storage[p.slots[0].path]
    # One P x K matrix at a time (memory): p's support, then q's factor, its whitened
    # form and its support.
    found_p = support(
        xp,
        xp.matrix_transpose(
            assemble(xp, p.blocks(xp, p_storage, eye(xp, p.num_factor_columns, p_ref)))
        ),
    )
    a_q = xp.matrix_transpose(
        assemble(xp, q.blocks(xp, q_storage, eye(xp, q.num_factor_columns, ref)))
    )  # S_q, (P, K_q)
    values = _linalg.svdvals(xp, whiten(xp, found_p, a_q))
    found_q = support(xp, a_q)
    del a_q
    eps = float(xp.finfo(ref.dtype).eps)
    tol = max(q.num_params, q.num_factor_columns, p.num_factor_columns) * eps
    d = xp.reshape(difference, (difference.shape[0], 1))
    angle = off_support(xp, found_p, found_q.basis, found_q.kept)
    apart = (
        (found_q.rank != found_p.rank)
        | (angle > tol * (found_q.cond + found_p.cond))
        | (off_support(xp, found_p, d) > tol * found_p.cond * mean_size)
    )
    mean = whiten(xp, found_p, d)
    value = 0.5 * (top_excess(xp, values, found_p.rank) + xp.sum(mean * mean))
    return finish(xp, value, apart)
