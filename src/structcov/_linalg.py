"""Small dense linear algebra (r x r capacitance matrices, square factors).

Every call of ``xp.linalg`` in the core goes through here, so a backend whose
linalg differs is fixed in one place, by capability rather than by name:

- no ``linalg.slogdet`` (dask): log|det a| from the standard ``linalg.qr``;
- ``linalg.cholesky`` returning the upper triangle (dask through array-api-compat):
  `cholesky` is correct whichever triangle comes back;
- linalg that needs a matrix in one chunk (dask: ``solve`` needs square chunks,
  ``qr`` a single column chunk): the small matrix is put in one chunk first, with
  the namespace's own ``rechunk`` (the standard has no notion of chunks).

Everything stays lazy on lazy backends: nothing here computes a value.

Split arrays (JAX with explicit sharding) need two things said that the standard
cannot say; an adapter says them with `register_override` (structcov.jax does):

- ``"matmul"``: `matmul` contracts an axis that may be split (the parameter axis);
  JAX's explicit mode then asks for the output's sharding;
- ``"one_piece"``: the matrix of a dense factorisation must be whole on each device
  (JAX's explicit mode refuses an LU of a split matrix), as dask needs one chunk.

Without an override (every backend, and JAX without explicit sharding) these are
the ``@`` operator and the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._array_api import Array, backend_name

__all__ = [
    "cholesky",
    "eigh",
    "logabsdet",
    "matmul",
    "qr",
    "register_override",
    "solve",
    "svd",
    "svdvals",
]

#: (backend name, "matmul" | "one_piece") -> replacement; filled by adapters only.
_OVERRIDES: dict[tuple[str, str], Callable[..., Array]] = {}


def register_override(backend: str, name: str, function: Callable[..., Array]) -> None:
    """Install ``function`` as ``name`` ("matmul" or "one_piece") for arrays of ``backend``.

    For adapters (structcov.jax): ``matmul(a, b)`` replaces ``a @ b`` in `matmul`;
    ``one_piece(a, axes)`` returns ``a`` with ``axes`` whole on each device.
    """
    if name not in ("matmul", "one_piece"):
        raise ValueError(f"`name` must be 'matmul' or 'one_piece', got {name!r}")
    _OVERRIDES[backend, name] = function


def _override(xp: Any, name: str) -> Callable[..., Array] | None:
    return _OVERRIDES.get((backend_name(xp), name)) if _OVERRIDES else None


def matmul(xp: Any, a: Array, b: Array) -> Array:
    """``a @ b`` where the contracted axis may be the parameter axis (split under JAX).

    The core's contractions over P (``S^T x``, ``U^T D^-1 U``, ``S_out^T X``) go
    through here; contractions over a rank axis call ``xp.matmul``.
    """
    override = _override(xp, "matmul")
    # the standard operator: no namespace wrapper's promotion checks (same dtypes here)
    return a @ b if override is None else override(a, b)


def _one_chunk(xp: Any, a: Array, axes: tuple[int, ...]) -> Array:
    """``a`` with ``axes`` each in a single chunk, where the namespace has chunked arrays.

    Only a namespace with a ``rechunk`` function (dask) has chunks; elsewhere this is
    the ``"one_piece"`` override where one is registered (JAX: the matrix made whole on
    every device, as explicit sharding requires for an LU), else the identity.
    dask's ``linalg.solve`` (an LU) needs square chunks and its triangular solves
    need the right-hand side's rows chunked like the matrix; its ``qr`` needs one
    column chunk. The matrices here are small (r x r, or a square factor), so one
    chunk is the simple choice; a no-op when already so.
    """
    rechunk = getattr(xp, "rechunk", None)
    if rechunk is not None:
        return rechunk(a, {axis % a.ndim: -1 for axis in axes})
    override = _override(xp, "one_piece")
    return a if override is None else override(a, tuple(axis % a.ndim for axis in axes))


def _chunked_like(xp: Any, x: Array, like: Array) -> Array:
    """``x`` split like ``like`` (same shape) where the namespace has chunks, else ``x``.

    A solution takes the chunks of its right-hand side back, so a P-sized result
    is not left in the one chunk the solve needed.
    """
    rechunk = getattr(xp, "rechunk", None)
    chunked: Any = like  # only a namespace with ``rechunk`` (dask) gets here with chunks
    return x if rechunk is None else rechunk(x, chunked.chunks)


def logabsdet(xp: Any, a: Array) -> Array:
    """log |det a| for a square ``a`` of shape (..., n, n). O(n^3) (LU, or QR without slogdet).

    Without ``linalg.slogdet`` (dask): a = QR with Q orthogonal, so
    log|det a| = sum_i log|R_ii| (a zero R_ii gives -inf, as slogdet does). dask's
    ``qr`` takes 2-D matrices only, which is all the core passes.
    """
    slogdet = getattr(xp.linalg, "slogdet", None)
    if slogdet is not None:
        return slogdet(_one_chunk(xp, a, (-2, -1)))[1]
    r = xp.linalg.qr(_one_chunk(xp, a, (-2, -1)))[1]
    return xp.sum(xp.log(xp.abs(xp.linalg.diagonal(r))), axis=-1)


def solve(xp: Any, a: Array, b: Array) -> Array:
    """a^-1 b for ``a`` of shape (..., n, n) and a *matrix* ``b`` of shape (..., n, m).

    Vectors must be passed as (..., n, 1): ``xp.linalg.solve`` reads a 2-D ``b``
    as a matrix on every backend.
    """
    x = xp.linalg.solve(_one_chunk(xp, a, (-2, -1)), _one_chunk(xp, b, (-2,)))
    return _chunked_like(xp, x, b)


def cholesky(xp: Any, a: Array) -> Array:
    """The lower Cholesky factor L (a = L L^T) of a symmetric positive definite ``a``.

    Correct whichever triangle the backend returns (dask's, through array-api-compat,
    is the upper R = L^T): tril(C) + triu(C, 1)^T is C when C is lower, and C^T
    when C is upper. No branch on values, O(n^2) extra.
    """
    c = xp.linalg.cholesky(_one_chunk(xp, a, (-2, -1)))
    return xp.tril(c) + xp.matrix_transpose(xp.triu(c, k=1))


def eigh(xp: Any, a: Array) -> tuple[Array, Array]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric ``a``.

    Raises ``TypeError`` naming the namespace when it has no ``linalg.eigh`` (dask).
    """
    function = getattr(xp.linalg, "eigh", None)
    if function is None:
        raise TypeError(
            f"this needs linalg.eigh (`from_dense` onto a rank-truncated structure), which the "
            f"array namespace {xp.__name__} does not have: pass NumPy arrays instead (for dask, "
            "the computed covariance)"
        )
    values, vectors = function(a)
    return values, vectors


def qr(xp: Any, a: Array) -> tuple[Array, Array]:
    """The reduced QR of an (n, k) ``a``: Q (n, min(n, k)) with orthonormal columns and
    R (min(n, k), k) upper triangular. O(n k^2). dask needs one column chunk (its TSQR
    splits rows only), which is all this asks for: Q keeps ``a``'s row chunks."""
    q, r = xp.linalg.qr(_one_chunk(xp, a, (-1,)))
    return q, r


def svd(xp: Any, a: Array) -> tuple[Array, Array, Array]:
    """The reduced SVD ``(U, s, V^T)`` of a small (m, k) matrix (an R factor, a whitened
    r x r block), s descending. O(m k min(m, k)); the matrix is put in one piece."""
    u, s, vt = xp.linalg.svd(_one_chunk(xp, a, (-2, -1)), full_matrices=False)
    return u, s, vt


def svdvals(xp: Any, a: Array) -> Array:
    """The singular values of a small (m, k) matrix, descending. O(m k min(m, k)).

    From the reduced `svd`: dask's ``svdvals`` (array-api-compat) asks for the full one,
    which dask refuses."""
    return svd(xp, a)[1]
