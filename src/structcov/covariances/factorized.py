"""Full and low-rank factorised covariances: Sigma = S S^T with S stored per name."""

from __future__ import annotations

import math
from typing import Any

from .._array_api import Array, Layout
from ._base import Slot, StructuredCovariance, check_rank

__all__ = ["FactorizedCovariance", "LowRankCovariance"]


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

    Costs (B samples): ``factor_matmul`` one (B, K) x (K, n) GEMM per name,
    O(B P K) time, no copy of S; ``to_dense`` O(P^2 K).

    ``reset_parameters`` draws entries with std ``scale / sqrt(rank)``;
    ``lr_scaling`` is ``{"factor.<name>": 1 / rank}``.

    This class is also the public base of every structure: every covariance in
    structcov is a ``FactorizedCovariance``.
    """

    _dict_attributes = ("factor",)
    factor: dict[str, Array]

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


class LowRankCovariance(FactorizedCovariance):
    """Low-rank covariance Sigma = S S^T, S of shape (P, rank), ``rank`` required.

    Same storage, costs and initialization as :class:`FactorizedCovariance`. With
    rank < P the covariance is singular (it only spans rank directions).
    """

    def __init__(self, rank: int) -> None:
        check_rank(rank, "rank", optional=False)
        super().__init__(rank)
