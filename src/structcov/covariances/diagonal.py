"""Diagonal covariance: Sigma = diag(scale^2)."""

from __future__ import annotations

from typing import Any

from .._array_api import Array, Layout
from ._base import Slot
from .factorized import FactorizedCovariance

__all__ = ["DiagonalCovariance"]


class DiagonalCovariance(FactorizedCovariance):
    """Diagonal covariance Sigma = diag(s^2), S = diag(s), K = P.

    Stored: ``scale[name]`` of shape ``mean.shape``, the per-element standard
    deviations (their sign does not matter). ``rank`` is P.

    Costs (B samples): ``factor_matmul`` one elementwise pass, O(B P).
    ``reset_parameters`` draws entries with std ``scale``; ``lr_scaling`` is
    ``{"scale.<name>": 1.0}``.
    """

    _dict_attributes = ("scale",)
    scale: dict[str, Array]

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
