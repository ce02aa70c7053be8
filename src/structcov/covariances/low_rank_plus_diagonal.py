"""Low rank plus diagonal covariance: Sigma = U U^T + diag(d^2)."""

from __future__ import annotations

import math
from typing import Any

from .. import _linalg
from .._array_api import Array, Layout, device_of
from .._array_api import namespace as namespace_of
from ._base import Slot, add_into, check_rank, total
from .factorized import FactorizedCovariance, _row_norms

__all__ = ["LowRankPlusDiagonalCovariance"]


class LowRankPlusDiagonalCovariance(FactorizedCovariance):
    r"""Covariance Sigma = U U^T + diag(d^2): a rank-r correction of a diagonal.

    Stored: ``factor[name]`` of shape ``(*mean.shape, rank)`` (the rows of U) and
    ``scale[name]`` of shape ``mean.shape`` (d). The sampling factor is
    S = [U, diag(d)] of shape (P, rank + P), low-rank columns first, so
    ``factor_matmul`` takes ``rank + P`` standard normals:
    ``S z = U z[:rank] + d * z[rank:]``. Full rank whenever every d_i != 0.

    The r x r capacitance matrix C = I_r + U^T D^-1 U (D = diag(d^2)) carries
    everything else, and S S^T is never formed:

    - ``logdet`` = log det C + sum log d_i^2 (matrix determinant lemma), O(P r^2 + r^3);
    - ``solve(x)`` = D^-1 x - D^-1 U C^-1 U^T D^-1 x (Woodbury), O(P r^2 + r^3 + B P r);
    - ``matmul`` = U (U^T x) + d^2 x, ``diagonal`` = rowsum(U^2) + d^2, O(B P r), O(P r).

    ``rank`` (required) is clamped to P. ``reset_parameters`` draws U with std
    ``scale / sqrt(rank)`` and sets every d_i to ``scale`` (not drawn: a d_i near
    zero would make Sigma nearly singular); ``lr_scaling`` is
    ``{"factor.<name>": 1 / rank, "scale.<name>": 1.0}``.
    """

    _dict_attributes = ("factor", "scale")
    scale: dict[str, Array]
    _noise_per_parameter = True

    def __init__(self, rank: int) -> None:
        check_rank(rank, "rank", optional=False)
        super().__init__(rank)

    @property
    def num_factor_columns(self) -> int:
        """K = rank + P: the low-rank columns, then one column per parameter."""
        return self._initialized_rank + self.num_params

    def _setup(self, layout: Layout) -> None:
        assert self._requested_rank is not None
        self._rank = min(self._requested_rank, layout.num_params)

    def _slots(self) -> tuple[Slot, ...]:
        layout, rank = self.layout, self._initialized_rank
        factors = tuple(
            Slot("factor", name, (*shape, rank), 1.0 / rank, 1.0 / math.sqrt(rank), name)
            for name, shape in zip(layout.names, layout.shapes, strict=True)
        )
        scales = tuple(
            Slot("scale", name, shape, 1.0, 1.0, name, random=False)
            for name, shape in zip(layout.names, layout.shapes, strict=True)
        )
        return factors + scales

    @property
    def is_singular(self) -> bool:
        """Never by construction (full rank whenever every d_i != 0; values are not checked)."""
        return False

    def _d(self, xp: Any, name: str, size: int) -> Array:
        return xp.reshape(self.scale[name], (size,))

    def _blocks(self, xp: Any, z: Array) -> list[Array]:
        layout, rank = self.layout, self._initialized_rank
        low = z[:, :rank]
        blocks = []
        for name, offset, size in zip(layout.names, layout.offsets, layout.sizes, strict=True):
            block = xp.matmul(low, xp.matrix_transpose(self._factor_2d(xp, name, size)))
            diagonal_part = z[:, rank + offset : rank + offset + size] * self._d(xp, name, size)
            blocks.append(add_into(block, diagonal_part))  # one (B, n) temporary fewer
        return blocks

    def _low_rank_rmatmul(self, xp: Any, x: list[Array]) -> Array:
        """U^T x, shape (B, rank)."""
        layout = self.layout
        return total(
            _linalg.matmul(xp, block, self._factor_2d(xp, name, size))
            for name, size, block in zip(layout.names, layout.sizes, x, strict=True)
        )

    def _rblocks(self, xp: Any, x: list[Array]) -> Array:
        layout = self.layout
        diagonal_part = [
            block * self._d(xp, name, size)
            for name, size, block in zip(layout.names, layout.sizes, x, strict=True)
        ]
        return xp.concat([self._low_rank_rmatmul(xp, x), *diagonal_part], axis=1)

    def matmul(self, x: Array) -> Array:
        """Sigma x = U (U^T x) + d^2 x for ``x`` of shape ``(*batch, P)``. O(B P r)."""
        xp, batch, blocks = self._flat_blocks(x, "x")
        layout = self.layout
        projected = self._low_rank_rmatmul(xp, blocks)  # (B, r)
        out = [
            xp.matmul(projected, xp.matrix_transpose(self._factor_2d(xp, name, size)))
            + block * self._d(xp, name, size) ** 2
            for name, size, block in zip(layout.names, layout.sizes, blocks, strict=True)
        ]
        return self._assemble(xp, out, batch)

    def _diagonal_blocks(self, xp: Any) -> list[Array]:
        layout = self.layout
        return [
            _row_norms(xp, self._factor_2d(xp, name, size)) + self._d(xp, name, size) ** 2
            for name, size in zip(layout.names, layout.sizes, strict=True)
        ]

    def capacitance(self) -> Array:
        """C = I_r + U^T D^-1 U, shape (rank, rank). O(P r^2); the only r x r object needed."""
        reference = self._reference_array()
        return self._capacitance(namespace_of(reference))

    def _capacitance(self, xp: Any) -> Array:
        reference = self._reference_array()
        # W^T W with W = D^-1/2 U (one scaled temporary): NumPy sends a product of an
        # array with its own transpose to SYRK, half the flops of the general GEMM.
        grams = []
        for name, size in zip(self.layout.names, self.layout.sizes, strict=True):
            scaled = self._factor_2d(xp, name, size) / xp.expand_dims(
                xp.abs(self._d(xp, name, size)), axis=1
            )
            grams.append(_linalg.matmul(xp, xp.matrix_transpose(scaled), scaled))
        rank = self._initialized_rank
        return total(grams) + xp.eye(rank, dtype=reference.dtype, device=device_of(reference))

    def _logdet(self, xp: Any) -> Array:
        # Matrix determinant lemma: det(D + U U^T) = det(C) det(D).
        log_d = total(xp.sum(xp.log(xp.abs(self.scale[name]))) for name in self.layout.names)
        return _linalg.logabsdet(xp, self._capacitance(xp)) + 2.0 * log_d

    def _solve_blocks(self, xp: Any, x: list[Array]) -> list[Array]:
        # Woodbury: (D + U U^T)^-1 = D^-1 - D^-1 U C^-1 U^T D^-1.
        layout = self.layout
        variances = [
            self._d(xp, n, size) ** 2 for n, size in zip(layout.names, layout.sizes, strict=True)
        ]
        y = [block / v for block, v in zip(x, variances, strict=True)]
        t = self._low_rank_rmatmul(xp, y)  # (B, r)
        w = xp.matrix_transpose(_linalg.solve(xp, self._capacitance(xp), xp.matrix_transpose(t)))
        return [
            y_n - xp.matmul(w, xp.matrix_transpose(self._factor_2d(xp, name, size))) / v
            for name, size, y_n, v in zip(layout.names, layout.sizes, y, variances, strict=True)
        ]

    def _kl_to_diagonal(self, xp: Any, variances: Array) -> Array:
        # With r = d^2 / v: 0.5 [sum(r - 1 - log r) + sum(rowsum(U^2) / v) - log det C],
        # each part well scaled (the determinant lemma splits log det Sigma).
        layout = self.layout
        parts = []
        for name, offset, size in zip(layout.names, layout.offsets, layout.sizes, strict=True):
            v = variances[offset : offset + size]
            ratio = self._d(xp, name, size) ** 2 / v
            low = _row_norms(xp, self._factor_2d(xp, name, size)) / v
            parts.append(xp.sum(ratio - 1.0 - xp.log(ratio) + low))
        return 0.5 * (total(parts) - _linalg.logabsdet(xp, self._capacitance(xp)))
