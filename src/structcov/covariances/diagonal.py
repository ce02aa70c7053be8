"""Diagonal covariance: Sigma = diag(scale^2)."""

from __future__ import annotations

from typing import Any

from .._array_api import Array, Layout
from ._base import Slot, total
from .factorized import FactorizedCovariance

__all__ = ["DiagonalCovariance"]


class DiagonalCovariance(FactorizedCovariance):
    """Diagonal covariance Sigma = diag(s^2), S = diag(s), K = P.

    Stored: ``scale[name]`` of shape ``mean.shape``, the per-element standard
    deviations (their sign does not matter). ``rank`` is P.

    Notes
    -----
    Costs (B vectors): ``factor_matmul``, ``matmul`` and ``solve`` one
    elementwise pass, O(B P); ``diagonal``, ``trace``, ``logdet`` = 2 sum log|s|,
    O(P). Full rank unless an entry of ``scale`` is zero (then ``logdet`` is
    ``-inf`` and ``solve`` divides by zero: the values are not checked).
    ``reset_parameters`` draws entries with std ``scale``; ``lr_scaling`` is
    ``{"scale.<name>": 1.0}``.
    """

    _dict_attributes = ("scale",)
    scale: dict[str, Array]
    _noise_per_parameter = True

    def __init__(self) -> None:
        super().__init__(rank=None)

    def _setup(self, layout: Layout) -> None:
        self._rank = layout.num_params

    def _slots(self) -> tuple[Slot, ...]:
        layout = self.layout
        return tuple(
            Slot("scale", name, shape, 1.0, 1.0, name)
            for name, shape in zip(layout.names, layout.shapes, strict=True)
        )

    def _blocks(self, xp: Any, z: Array) -> list[Array]:
        layout = self.layout
        return [
            z[:, offset : offset + size] * xp.reshape(self.scale[name], (size,))
            for name, offset, size in zip(layout.names, layout.offsets, layout.sizes, strict=True)
        ]

    @property
    def is_singular(self) -> bool:
        """Never by construction (a zero entry of ``scale`` is not detected)."""
        return False

    def _scale_1d(self, xp: Any, name: str, size: int) -> Array:
        return xp.reshape(self.scale[name], (size,))

    def _rblocks(self, xp: Any, x: list[Array]) -> Array:
        layout = self.layout
        parts = [
            block * self._scale_1d(xp, name, size)
            for name, size, block in zip(layout.names, layout.sizes, x, strict=True)
        ]
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)

    def _diagonal_blocks(self, xp: Any) -> list[Array]:
        return [
            self._scale_1d(xp, name, size) ** 2
            for name, size in zip(self.layout.names, self.layout.sizes, strict=True)
        ]

    def matmul(self, x: Array) -> Array:
        """Sigma x = s^2 * x elementwise, ``x`` of shape ``(*batch, P)``. O(B P)."""
        xp, batch, blocks = self._flat_blocks(x, "x")
        variances = self._diagonal_blocks(xp)
        return self._assemble(xp, [b * v for b, v in zip(blocks, variances, strict=True)], batch)

    def _logdet(self, xp: Any) -> Array:
        return 2.0 * total(xp.sum(xp.log(xp.abs(self.scale[n]))) for n in self.layout.names)

    def _solve_blocks(self, xp: Any, x: list[Array]) -> list[Array]:
        return [b / v for b, v in zip(x, self._diagonal_blocks(xp), strict=True)]

    def _kl_to_diagonal(self, xp: Any, variances: Array) -> Array:
        # sum(r - 1 - log r), r = s^2 / v: every term >= 0, no cancellation of large sums.
        ratio = self.diagonal() / variances
        return 0.5 * xp.sum(ratio - 1.0 - xp.log(ratio))
