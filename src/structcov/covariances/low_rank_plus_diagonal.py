"""Low rank plus diagonal covariance: Sigma = U U^T + diag(d^2)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, final

from .. import _linalg
from .._array_api import Array, namespace
from .._layout import Layout
from ._base import register_covariance
from ._kl import register_kl
from ._structure import Slot, Storage, Structure, add_into, check_rank, eye, row_norms, total
from .diagonal import Diagonal
from .factorized import FactorizedCovariance

__all__ = ["LowRankPlusDiagonal", "LowRankPlusDiagonalCovariance"]


@final
@dataclass(frozen=True, repr=False)
class LowRankPlusDiagonal(Structure):
    """Sigma = U U^T + diag(d^2); ``factor.<name>`` holds U's rows, ``scale.<name>`` d.

    S = [U, diag(d)] (K = rank + P, low-rank columns first). ``prepare`` computes the
    r x r capacitance C = I + U^T D^-1 U once (O(P r^2)); ``logdet`` = log det C +
    2 sum log|d| (determinant lemma), ``solve`` = Woodbury through C.
    """

    rank: int
    _names: tuple[tuple[str, str, int, int], ...] = field(init=False, repr=False, compare=False)

    dict_attributes = ("factor", "scale")
    noise_per_parameter = True

    def __post_init__(self) -> None:
        super().__post_init__()
        layout = self.layout
        names = tuple(
            (f"factor.{name}", f"scale.{name}", offset, size)
            for name, offset, size in zip(layout.names, layout.offsets, layout.sizes, strict=True)
        )
        object.__setattr__(self, "_names", names)

    @classmethod
    def build(cls, layout: Layout, /, *, rank: int) -> LowRankPlusDiagonal:
        """``rank`` (required) is clamped to P."""
        requested = check_rank(rank, "rank", optional=False)
        assert requested is not None
        return cls(layout, min(requested, layout.num_params))

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def _make_slots(self) -> tuple[Slot, ...]:
        layout, rank = self.layout, self.rank
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
    def num_factor_columns(self) -> int:
        """K = rank + P: the low-rank columns, then one column per parameter."""
        return self.rank + self.layout.num_params

    @property
    def is_singular(self) -> bool:
        """Never by construction (full rank whenever every d_i != 0; values are not checked)."""
        return False

    def _u(self, xp: Any, storage: Storage, path: str, size: int) -> Array:
        return xp.reshape(storage[path], (size, self.rank))

    def _d(self, xp: Any, storage: Storage, path: str, size: int) -> Array:
        return xp.reshape(storage[path], (size,))

    def blocks(self, xp: Any, storage: Storage, z: Array) -> list[Array]:
        rank = self.rank
        low = z[:, :rank]
        out = []
        for factor, scale, offset, size in self._names:
            block = xp.matmul(low, xp.matrix_transpose(self._u(xp, storage, factor, size)))
            diagonal_part = z[:, rank + offset : rank + offset + size] * self._d(
                xp, storage, scale, size
            )
            out.append(add_into(block, diagonal_part))  # one (B, n) temporary fewer
        return out

    def _low_rank_rmatmul(self, xp: Any, storage: Storage, x: list[Array]) -> Array:
        """U^T x, shape (B, rank)."""
        return total(
            _linalg.matmul(xp, block, self._u(xp, storage, factor, size))
            for (factor, _, _, size), block in zip(self._names, x, strict=True)
        )

    def rblocks(self, xp: Any, storage: Storage, x: list[Array]) -> Array:
        diagonal_part = [
            block * self._d(xp, storage, scale, size)
            for (_, scale, _, size), block in zip(self._names, x, strict=True)
        ]
        return xp.concat([self._low_rank_rmatmul(xp, storage, x), *diagonal_part], axis=1)

    def matmul_blocks(self, xp: Any, storage: Storage, x: list[Array]) -> list[Array]:
        # Sigma x = U (U^T x) + d^2 x: O(B P r).
        projected = self._low_rank_rmatmul(xp, storage, x)  # (B, r)
        return [
            xp.matmul(projected, xp.matrix_transpose(self._u(xp, storage, factor, size)))
            + block * self._d(xp, storage, scale, size) ** 2
            for (factor, scale, _, size), block in zip(self._names, x, strict=True)
        ]

    def diagonal_blocks(self, xp: Any, storage: Storage) -> list[Array]:
        return [
            row_norms(xp, self._u(xp, storage, factor, size))
            + self._d(xp, storage, scale, size) ** 2
            for factor, scale, _, size in self._names
        ]

    def trace(self, xp: Any, storage: Storage) -> Array:
        return total(xp.sum(block) for block in self.diagonal_blocks(xp, storage))

    def capacitance(self, xp: Any, storage: Storage) -> Array:
        """C = I_r + U^T D^-1 U, shape (rank, rank). O(P r^2)."""
        # W^T W with W = D^-1/2 U (one scaled temporary): NumPy sends a product of an
        # array with its own transpose to SYRK, half the flops of the general GEMM.
        grams = []
        for factor, scale, _, size in self._names:
            scaled = self._u(xp, storage, factor, size) / xp.expand_dims(
                xp.abs(self._d(xp, storage, scale, size)), axis=1
            )
            grams.append(_linalg.matmul(xp, xp.matrix_transpose(scaled), scaled))
        return total(grams) + eye(xp, self.rank, storage[self._names[0][0]])

    def prepare(self, xp: Any, storage: Storage) -> Array:
        """The capacitance C (r x r), shared by ``logdet`` and ``solve``."""
        return self.capacitance(xp, storage)

    def _log_abs_d(self, xp: Any, storage: Storage) -> Array:
        return total(xp.sum(xp.log(xp.abs(storage[scale]))) for _, scale, _, _ in self._names)

    def logdet(self, xp: Any, storage: Storage, state: Array) -> Array:
        # Matrix determinant lemma: det(D + U U^T) = det(C) det(D).
        return _linalg.logabsdet(xp, state) + 2.0 * self._log_abs_d(xp, storage)

    def solve_blocks(self, xp: Any, storage: Storage, state: Array, x: list[Array]) -> list[Array]:
        # Woodbury: (D + U U^T)^-1 = D^-1 - D^-1 U C^-1 U^T D^-1.
        variances = [self._d(xp, storage, scale, size) ** 2 for _, scale, _, size in self._names]
        y = [block / v for block, v in zip(x, variances, strict=True)]
        t = self._low_rank_rmatmul(xp, storage, y)  # (B, r)
        w = xp.matrix_transpose(_linalg.solve(xp, state, xp.matrix_transpose(t)))
        return [
            y_n - xp.matmul(w, xp.matrix_transpose(self._u(xp, storage, factor, size))) / v
            for (factor, _, _, size), y_n, v in zip(self._names, y, variances, strict=True)
        ]


@register_kl(LowRankPlusDiagonal, Diagonal)
def _kl_lrpd_diagonal(
    xp: Any,
    q: LowRankPlusDiagonal,
    q_storage: Storage,
    p: Diagonal,
    p_storage: Storage,
    difference: Array,
) -> Array:
    """Low rank plus diagonal against a diagonal v: well-scaled terms (float32). O(P r^2).

    With r = d^2 / v: 0.5 [sum(r - 1 - log r) + sum(rowsum(U^2) / v) + sum(m^2 / v)
    - log det C], the determinant lemma splitting log det Sigma_q.
    """
    parts = []
    for (factor, scale, offset, size), s_p in zip(q._names, p._s(xp, p_storage), strict=True):
        v = s_p**2
        ratio = q._d(xp, q_storage, scale, size) ** 2 / v
        low = row_norms(xp, q._u(xp, q_storage, factor, size)) / v
        d = difference[offset : offset + size]
        parts.append(xp.sum(ratio - 1.0 - xp.log(ratio) + low + d**2 / v))
    capacitance = q.capacitance(xp, q_storage)
    return 0.5 * (total(parts) - _linalg.logabsdet(xp, capacitance))


@register_covariance
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

    _structure_type: ClassVar[type[Structure]] = LowRankPlusDiagonal

    def __init__(self, rank: int) -> None:
        check_rank(rank, "rank", optional=False)
        super().__init__(rank)

    def capacitance(self) -> Array:
        """C = I_r + U^T D^-1 U, shape (rank, rank). O(P r^2); the only r x r object needed."""
        storage = self._ops_storage()
        structure = self.structure
        assert isinstance(structure, LowRankPlusDiagonal)
        return structure.capacitance(namespace(storage[structure.slots[0].path]), storage)
