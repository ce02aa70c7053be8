"""Full and low-rank factorised covariances: Sigma = S S^T with S stored per name."""

from __future__ import annotations

import math
from typing import Any

from .. import _linalg
from .._array_api import Array, Layout
from ._base import Slot, StructuredCovariance, check_rank, total

__all__ = ["FactorizedCovariance", "LowRankCovariance"]


def _row_norms(xp: Any, factor: Array) -> Array:
    """Squared row norms of a 2-D ``factor``, shape (rows,).

    Not ``xp.vecdot``: array-api-compat's torch version moves axes, which has no
    ``vmap`` batching rule.
    """
    return xp.sum(factor * factor, axis=-1)


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
    structcov is a ``FactorizedCovariance``.
    """

    _dict_attributes: tuple[str, ...] = ("factor",)
    factor: dict[str, Array]
    #: Whether the noise z has one column per parameter after its first few (S ends in
    #: a diagonal block): sampling then draws it split like the means (JAX sharding).
    _noise_per_parameter: bool = False

    def __init__(self, rank: int | None = None) -> None:
        super().__init__()
        self._requested_rank = check_rank(rank, "rank", optional=True)
        self._rank: int | None = None

    @property
    def rank(self) -> int | None:
        """Columns of S (after initialization: clamped to P; ``None`` before, if unset)."""
        return self._rank if self._rank is not None else self._requested_rank

    @property
    def num_factor_columns(self) -> int:
        """K = rank, the columns of S."""
        return self._initialized_rank

    @property
    def _initialized_rank(self) -> int:
        self.layout  # noqa: B018 -- raises the "not initialized" error
        assert self._rank is not None
        return self._rank

    def _setup(self, layout: Layout) -> None:
        requested = self._requested_rank
        self._rank = layout.num_params if requested is None else min(requested, layout.num_params)

    def _slots(self) -> tuple[Slot, ...]:
        layout, rank = self.layout, self.num_factor_columns
        return tuple(
            Slot("factor", name, (*shape, rank), 1.0 / rank, 1.0 / math.sqrt(rank), name)
            for name, shape in zip(layout.names, layout.shapes, strict=True)
        )

    def _blocks(self, xp: Any, z: Array) -> list[Array]:
        rank = self.num_factor_columns
        return [
            # (B, K) @ (K, n): the stored (n, K) block read transposed, no copy.
            xp.matmul(z, xp.matrix_transpose(xp.reshape(self.factor[name], (size, rank))))
            for name, size in zip(self.layout.names, self.layout.sizes, strict=True)
        ]

    @property
    def is_singular(self) -> bool:
        """True when rank < P (S has fewer columns than rows)."""
        return self.num_factor_columns < self.num_params

    def _factor_2d(self, xp: Any, name: str, size: int) -> Array:
        return xp.reshape(self.factor[name], (size, self._initialized_rank))

    def _rblocks(self, xp: Any, x: list[Array]) -> Array:
        layout = self.layout
        return total(
            _linalg.matmul(xp, block, self._factor_2d(xp, name, size))  # (B, n) @ (n, K)
            for name, size, block in zip(layout.names, layout.sizes, x, strict=True)
        )

    def _diagonal_blocks(self, xp: Any) -> list[Array]:
        return [
            _row_norms(xp, self._factor_2d(xp, name, size))
            for name, size in zip(self.layout.names, self.layout.sizes, strict=True)
        ]

    def _square_factor(self, xp: Any) -> Array:
        layout = self.layout
        blocks = [
            self._factor_2d(xp, n, size) for n, size in zip(layout.names, layout.sizes, strict=True)
        ]
        return blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=0)

    def _logdet(self, xp: Any) -> Array:
        # log det(S S^T) = 2 log|det S| for a square S: no S S^T, so no squared condition number.
        return 2.0 * _linalg.logabsdet(xp, self._square_factor(xp))

    def _solve_blocks(self, xp: Any, x: list[Array]) -> list[Array]:
        factor = self._square_factor(xp)
        rhs = xp.matrix_transpose(xp.concat(x, axis=1) if len(x) > 1 else x[0])  # (P, B)
        inner = _linalg.solve(xp, factor, rhs)  # S^-1 x
        out = xp.matrix_transpose(_linalg.solve(xp, xp.matrix_transpose(factor), inner))
        layout = self.layout
        return [
            out[:, offset : offset + size]
            for offset, size in zip(layout.offsets, layout.sizes, strict=True)
        ]


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
