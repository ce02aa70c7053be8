"""Full and low-rank factorised covariances: Sigma = S S^T with S stored per name."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, final

from .. import _linalg
from .._array_api import Array
from .._layout import Layout
from ._base import StructuredCovariance, register_covariance
from ._kl import register_kl
from ._structure import (
    Slot,
    Storage,
    Structure,
    assemble,
    check_rank,
    eye,
    logdet_of,
    require_parameters,
    row_norms,
    total,
)

__all__ = ["Factorized", "FactorizedCovariance", "LowRankCovariance"]


@final
@dataclass(frozen=True, repr=False)
class Factorized(Structure):
    """Sigma = S S^T with a dense S of shape (P, rank), stored as ``factor.<name>``.

    ``rank`` is clamped to P at `build`. Rank < P is singular. Costs (B vectors):
    ``blocks`` one (B, K) x (K, n) GEMM per name; ``matmul`` S (S^T x), O(B P K);
    diagonal O(P K). At full rank, ``prepare`` stacks the square S (P x P) once and
    ``logdet`` = 2 log|det S| (LU, O(P^3)), ``solve`` = S^-T S^-1 x (two LU solves).
    """

    rank: int
    _factors: tuple[tuple[str, int], ...] = field(init=False, repr=False, compare=False)

    dict_attributes = ("factor",)

    def __post_init__(self) -> None:
        super().__post_init__()
        paths = tuple(
            (f"factor.{name}", size)
            for name, size in zip(self.layout.names, self.layout.sizes, strict=True)
        )
        object.__setattr__(self, "_factors", paths)

    @classmethod
    def build(cls, layout: Layout, /, *, rank: int | None = None) -> Factorized:
        """``rank=None`` is P (full); larger ranks are clamped to P."""
        requested = check_rank(rank, "rank", optional=True)
        require_parameters(layout, "FactorizedCovariance (and LowRankCovariance)")
        return cls(
            layout, layout.num_params if requested is None else min(requested, layout.num_params)
        )

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def _make_slots(self) -> tuple[Slot, ...]:
        rank = self.rank
        return tuple(
            Slot("factor", name, (*shape, rank), 1.0 / rank, 1.0 / math.sqrt(rank), name)
            for name, shape in zip(self.layout.names, self.layout.shapes, strict=True)
        )

    @property
    def num_factor_columns(self) -> int:
        return self.rank

    @property
    def is_singular(self) -> bool:
        """True when rank < P (S has fewer columns than rows)."""
        return self.rank < self.layout.num_params

    def _factor_2d(self, xp: Any, storage: Storage, path: str, size: int) -> Array:
        return xp.reshape(storage[path], (size, self.rank))

    def blocks(self, xp: Any, storage: Storage, z: Array) -> list[Array]:
        return [
            # (B, K) @ (K, n): the stored (n, K) block read transposed, no copy.
            xp.matmul(z, xp.matrix_transpose(self._factor_2d(xp, storage, path, size)))
            for path, size in self._factors
        ]

    def rblocks(self, xp: Any, storage: Storage, x: list[Array]) -> Array:
        return total(
            _linalg.matmul(xp, block, self._factor_2d(xp, storage, path, size))  # (B, n) @ (n, K)
            for (path, size), block in zip(self._factors, x, strict=True)
        )

    def matmul_blocks(
        self, xp: Any, storage: Storage, x: list[Array], state: Any = None
    ) -> list[Array]:
        return self.blocks(xp, storage, self.rblocks(xp, storage, x))

    def diagonal_blocks(self, xp: Any, storage: Storage) -> list[Array]:
        return [row_norms(xp, self._factor_2d(xp, storage, p, size)) for p, size in self._factors]

    def trace(self, xp: Any, storage: Storage) -> Array:
        return total(xp.sum(block) for block in self.diagonal_blocks(xp, storage))

    def prepare(self, xp: Any, storage: Storage) -> Array:
        """The square S (P x P), the per-name blocks stacked once."""
        blocks = [self._factor_2d(xp, storage, p, size) for p, size in self._factors]
        return blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=0)

    def logdet(self, xp: Any, storage: Storage, state: Array) -> Array:
        # log det(S S^T) = 2 log|det S| for a square S: no S S^T, so no squared condition number.
        return 2.0 * _linalg.logabsdet(xp, state)

    def solve_blocks(self, xp: Any, storage: Storage, state: Array, x: list[Array]) -> list[Array]:
        rhs = xp.matrix_transpose(xp.concat(x, axis=1) if len(x) > 1 else x[0])  # (P, B)
        inner = _linalg.solve(xp, state, rhs)  # S^-1 x
        out = xp.matrix_transpose(_linalg.solve(xp, xp.matrix_transpose(state), inner))
        layout = self.layout
        return [
            out[:, offset : offset + size]
            for offset, size in zip(layout.offsets, layout.sizes, strict=True)
        ]


@register_covariance
class FactorizedCovariance(StructuredCovariance):
    r"""Covariance Sigma = S S^T with a dense factor S of shape (P, rank).

    Stored: ``factor[name]`` of shape ``(*mean.shape, rank)`` per mean name; the
    rows of S are the flattened ``factor`` arrays stacked in the flat parameter
    order (they are never stacked in memory).

    Parameters
    ----------
    rank
        Number of columns of S. ``None`` means P (full rank); a rank above P is
        clamped to P; below 1 is a ``ValueError``.

    Notes
    -----
    Costs (B vectors): ``factor_matmul`` one (B, K) x (K, n) GEMM per name,
    O(B P K) time, no copy of S; ``matmul`` = S (S^T x), O(B P K);
    ``diagonal``/``trace`` row sums of squares, O(P K); ``to_dense`` O(P^2 K).

    Rank K < P is singular: ``logdet`` is ``-inf`` and ``solve`` raises. At full
    rank (K = P) the square factor gives ``logdet = 2 log|det S|`` (LU of S,
    O(P^3)) and ``solve`` = S^-T (S^-1 x) (two LU solves, O(P^3 + B P^2)); both
    stack the per-name blocks of S into one P x P array first (S itself is P x P
    here). Nothing forms S S^T.

    ``reset_parameters`` draws entries with std ``scale / sqrt(rank)``;
    ``lr_scaling`` is ``{"factor.<name>": 1 / rank}``.

    This class is also the public base of every structure: every covariance in
    structcov is a ``FactorizedCovariance``. The maths is the frozen structure's
    (``cov.structure``, a `structcov.covariances.Factorized` here).
    """

    _structure_type: ClassVar[type[Structure]] = Factorized
    _arguments: ClassVar[tuple[str, ...]] = ("rank",)

    def __init__(self, rank: int | None = None) -> None:
        super().__init__()
        self._requested_rank = check_rank(rank, "rank", optional=True)

    @property
    def rank(self) -> int | None:
        """Columns of S (after initialization: clamped to P; ``None`` before, if unset)."""
        return self._requested_rank if self._structure is None else self._structure.rank


@register_covariance
class LowRankCovariance(FactorizedCovariance):
    """Low-rank covariance Sigma = S S^T, S of shape (P, rank), ``rank`` required.

    Same storage, costs and initialization as `FactorizedCovariance`. With
    rank < P the covariance is singular (it only spans rank directions): its
    ``logdet`` is ``-inf``, ``solve`` raises, and the KL divergence to any
    full-rank Gaussian is ``+inf``. For variational inference with a low-rank
    correction use [`LowRankPlusDiagonalCovariance`][structcov.LowRankPlusDiagonalCovariance].
    """

    def __init__(self, rank: int) -> None:
        check_rank(rank, "rank", optional=False)
        super().__init__(rank)


@register_kl(Structure, Factorized)
def _kl_to_factorized(
    xp: Any, q: Structure, q_storage: Storage, p: Factorized, p_storage: Storage, difference: Array
) -> Array:
    """Any q against a full-rank dense factor p = S_p S_p^T (S_p square, P x P).

    tr(Sigma_p^-1 S_q S_q^T) = |S_p^-1 S_q|_F^2 and d^T Sigma_p^-1 d = |S_p^-1 d|^2: the
    K_q columns of S_q (``q.blocks`` of the K_q x K_q identity) and d = m_p - m_q solved
    together in one LU of S_p, then summed as squares (no cancellation in the trace; the
    generic pair needs two solves and a signed product). Cost O(P^3 + K_q P^2 + the
    K_q columns of q). Memory: a few K_q x P and P x P arrays (S_q^T, the solve, the
    stacked S_p). P x P here is the size of p's own storage (S_p is P x P), so this is
    a small multiple of the larger storage even for a diagonal or low rank plus diagonal
    q (K_q = P or P + r, their P x P columns the size of S_p).

    Edges: ``+inf`` for a singular q (log det Sigma_q = -inf); a p singular by its values
    (a singular S_p) is not detected (the LU's behaviour: an error or non-finite values).
    """
    ref = q_storage[q.slots[0].path]
    columns = assemble(xp, q.blocks(xp, q_storage, eye(xp, q.num_factor_columns, ref)))  # S_q^T
    rhs = xp.concat([columns, xp.reshape(difference, (1, difference.shape[0]))], axis=0)
    p_state = p.prepare(xp, p_storage)
    whitened = _linalg.solve(xp, p_state, xp.matrix_transpose(rhs))  # S_p^-1 [S_q, d], (P, K_q + 1)
    squares = xp.sum(whitened * whitened, axis=0)
    return 0.5 * (
        xp.sum(squares[:-1])
        + squares[-1]
        - q.num_params
        + p.logdet(xp, p_storage, p_state)
        - logdet_of(xp, q, q_storage)
    )
