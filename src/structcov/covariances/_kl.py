"""KL divergence between two structured Gaussians, registered per (type of q, type of p).

KL(q || p) = 0.5 [tr(Sigma_p^-1 Sigma_q) + d^T Sigma_p^-1 d - P
                  + log det Sigma_p - log det Sigma_q],   d = m_p - m_q.

Each structure module registers the pairs it can do better than the generic form
(`register_kl`, as a decorator); `kl_function` picks the most specific
registration along both classes' method resolution orders, q's first. The generic
pair (Structure, Structure) registered here is exact for every pair. Registered
functions take ``(xp, q, q_storage, p, p_storage, difference)`` with ``difference``
the flat (P,) vector m_p - m_q and return the KL as a 0-D array; ``p`` is never
singular there (the caller raises first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .._array_api import Array
from ._structure import (
    Storage,
    Structure,
    assemble,
    eye,
    logdet_of,
    split_flat,
)

__all__ = ["KLFunction", "kl_function", "register_kl"]

KLFunction = Callable[[Any, Any, Storage, Any, Storage, Array], Array]
_F = TypeVar("_F", bound=KLFunction)

#: (type of q, type of p) -> KL function
_REGISTRY: dict[tuple[type, type], KLFunction] = {}


def register_kl(q_type: type, p_type: type) -> Callable[[_F], _F]:
    """Register the decorated function as KL(q || p) for structures of these types.

    The function's docstring should state the identity it uses and its cost.
    """

    def decorate(function: _F) -> _F:
        _REGISTRY[q_type, p_type] = function
        return function

    return decorate


def kl_function(q_type: type, p_type: type) -> KLFunction:
    """The most specific registered KL for the pair (q's class first, then p's)."""
    for q_class in q_type.__mro__:
        for p_class in p_type.__mro__:
            found = _REGISTRY.get((q_class, p_class))
            if found is not None:
                return found
    raise NotImplementedError(
        f"no KL divergence is registered for the pair ({q_type.__name__}, {p_type.__name__}); "
        "register one with structcov.covariances._kl.register_kl"
    )


def mahalanobis(
    xp: Any, p: Structure, p_storage: Storage, p_state: Any, difference: Array
) -> Array:
    """d^T Sigma_p^-1 d for a flat (P,) ``d``."""
    d = xp.reshape(difference, (1, difference.shape[0]))
    solved = assemble(xp, p.solve_blocks(xp, p_storage, p_state, split_flat(p, d)))
    return xp.sum(d * solved)


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
    return 0.5 * (
        trace
        + mahalanobis(xp, p, p_storage, p_state, difference)
        - q.num_params
        + p.logdet(xp, p_storage, p_state)
        - logdet_of(xp, q, q_storage)
    )
