"""Diagonal covariance: Sigma = diag(scale^2)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, final

from .._array_api import Array, device_of
from .._layout import Layout
from ._base import StructuredCovariance, register_covariance
from ._kl import finish, mean_term, register_kl, register_kl_to_normal
from ._structure import (
    Slot,
    Storage,
    Structure,
    check_scale_transform,
    logdet_of,
    positive,
    total,
)
from .factorized import FactorizedCovariance

__all__ = ["Diagonal", "DiagonalCovariance"]


@final
@dataclass(frozen=True, repr=False)
class Diagonal(Structure):
    """Sigma = diag(s^2), S = diag(s), K = P; stored as ``scale.<name>`` (mean-shaped).

    The stored ``rho`` maps to s through ``scale_transform`` (`SCALE_TRANSFORMS`):
    s = softplus(rho) (default), e^rho, or rho itself (``"identity"``, the seed's raw
    scale; its sign does not matter). Every operation is one elementwise pass: O(B P)
    for products and solves, O(P) for the diagonal, trace and ``logdet = 2 sum log|s|``.
    ``prepare`` has nothing to set up.
    """

    scale_transform: str = "softplus"
    _scales: tuple[tuple[str, int, int], ...] = field(init=False, repr=False, compare=False)

    dict_attributes = ("scale",)
    noise_per_parameter = True

    def __post_init__(self) -> None:
        super().__post_init__()
        layout = self.layout
        scales = tuple(
            (f"scale.{name}", offset, size)
            for name, offset, size in zip(layout.names, layout.offsets, layout.sizes, strict=True)
        )
        object.__setattr__(self, "_scales", scales)

    @classmethod
    def build(cls, layout: Layout, /, *, scale_transform: str = "softplus") -> Diagonal:
        return cls(layout, check_scale_transform(scale_transform))

    def config(self) -> dict[str, Any]:
        return {"scale_transform": self.scale_transform}

    def _make_slots(self) -> tuple[Slot, ...]:
        # Set to the scale, not drawn: a drawn s near zero starts training at a huge
        # gradient of the KL (and at a sign flip under the identity transform).
        return tuple(
            Slot("scale", name, shape, 1.0, 1.0, name, random=False, transform=self.scale_transform)
            for name, shape in zip(self.layout.names, self.layout.shapes, strict=True)
        )

    @property
    def num_factor_columns(self) -> int:
        return self.layout.num_params

    @property
    def rank(self) -> int:
        return self.layout.num_params

    @property
    def is_singular(self) -> bool:
        """Never by construction (a zero entry of ``scale`` is not detected)."""
        return False

    def _s(self, xp: Any, storage: Storage) -> list[Array]:
        """The standard deviations per name, flat (n,) (through the scale transform)."""
        return [
            positive(xp, xp.reshape(storage[path], (size,)), self.scale_transform)
            for path, _, size in self._scales
        ]

    def standard_deviation(self, xp: Any, storage: Storage, name: str) -> Array:
        """s for the mean ``name``, shaped like the mean (through the scale transform)."""
        return positive(xp, storage[f"scale.{name}"], self.scale_transform)

    def blocks(self, xp: Any, storage: Storage, z: Array) -> list[Array]:
        return [
            z[:, offset : offset + size] * s
            for (_, offset, size), s in zip(self._scales, self._s(xp, storage), strict=True)
        ]

    def rblocks(self, xp: Any, storage: Storage, x: list[Array]) -> Array:
        parts = [block * s for block, s in zip(x, self._s(xp, storage), strict=True)]
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)

    def matmul_blocks(
        self, xp: Any, storage: Storage, x: list[Array], state: Any = None
    ) -> list[Array]:
        return [b * v for b, v in zip(x, self.diagonal_blocks(xp, storage), strict=True)]

    def diagonal_blocks(self, xp: Any, storage: Storage) -> list[Array]:
        return [s**2 for s in self._s(xp, storage)]

    def trace(self, xp: Any, storage: Storage) -> Array:
        return total(xp.sum(block) for block in self.diagonal_blocks(xp, storage))

    def prepare(self, xp: Any, storage: Storage) -> None:
        return None

    def logdet(self, xp: Any, storage: Storage, state: None) -> Array:
        # 2 log|s|, never log(s^2): s^2 underflows in float32 long before s does. A zero
        # s gives -inf on values (where), without taking log(0).
        parts, zeros = [], []
        for s in self._s(xp, storage):
            zero = s == 0
            parts.append(xp.sum(xp.log(xp.abs(xp.where(zero, xp.ones_like(s), s)))))
            zeros.append(xp.any(zero))
        value = 2.0 * total(parts)
        return xp.where(_any(zeros), xp.full_like(value, -math.inf), value)

    def solve_blocks(self, xp: Any, storage: Storage, state: None, x: list[Array]) -> list[Array]:
        # (x / s) / s, never x / s^2: s^2 underflows in float32 (s = 1e-23) long before s does.
        return [(b / s) / s for b, s in zip(x, self._s(xp, storage), strict=True)]

    def quadratic(self, xp: Any, storage: Storage, state: None, x: list[Array]) -> Array:
        """x^T Sigma^-1 x = sum((x / s)^2) per row of the (B, n) blocks: shape (B,). O(B P).

        A sum of non-negative terms, no cancellation.
        """
        return total(
            xp.sum((b / s) ** 2, axis=-1) for b, s in zip(x, self._s(xp, storage), strict=True)
        )


@register_kl(Structure, Diagonal)
def _kl_to_diagonal(
    xp: Any, q: Structure, q_storage: Storage, p: Diagonal, p_storage: Storage, difference: Array
) -> Array:
    """Any q against a diagonal p = diag(s^2): tr = sum(diag(Sigma_q) / s^2), O(P K_q), no P x P.

    0.5 [sum(diag(Sigma_q) / s^2) - P + 2 sum log|s| - log det Sigma_q + sum((d / s)^2)],
    dividing by s twice (s^2 underflows in float32). Memory O(P) besides q's diagonal.

    Edges (values, jit-safe): ``+inf`` where some s_i = 0 while q has mass there
    (diag(Sigma_q)_i > 0 or d_i != 0), and for a singular q (log det Sigma_q = -inf);
    NaN where s_i = 0 and q is a point mass at p's mean there (KL over the other
    coordinates; not computed).
    """
    parts = []
    p_bad, p_zero = [], []
    for s_p, diag_q, (_, offset, size) in zip(
        p._s(xp, p_storage), q.diagonal_blocks(xp, q_storage), p._scales, strict=True
    ):
        zero = s_p == 0
        safe = xp.where(zero, xp.ones_like(s_p), s_p)
        d = difference[offset : offset + size]
        parts.append(xp.sum((diag_q / safe) / safe) + xp.sum((d / safe) ** 2))
        p_bad.append(xp.any(zero & ((diag_q > 0) | (d != 0))))
        p_zero.append(xp.any(zero))
    p_logdet = 2.0 * total(
        xp.sum(xp.log(xp.abs(xp.where(s == 0, xp.ones_like(s), s)))) for s in p._s(xp, p_storage)
    )
    value = 0.5 * (total(parts) - q.num_params + p_logdet - logdet_of(xp, q, q_storage))
    return finish(xp, value, _any(p_bad), _any(p_zero))


def _any(flags: list[Array]) -> Array:
    out = flags[0]
    for flag in flags[1:]:
        out = out | flag
    return out


@register_kl(Diagonal, Diagonal)
def _kl_diagonal_diagonal(
    xp: Any, q: Diagonal, q_storage: Storage, p: Diagonal, p_storage: Storage, difference: Array
) -> Array:
    """Two diagonals: 0.5 sum(rho - 1 - log rho + (d / s_p)^2), rho = (s_q / s_p)^2. O(P).

    Every term is >= 0 (no cancellation of large sums in float32). With r = s_q / s_p
    (one rounding): rho - 1 = (r - 1)(r + 1) and log rho = 2 log|r|, both exact
    functions of the rounded r and log accurate to its result's last bit, so near
    rho = 1 the difference keeps full accuracy (r - 1 is exact there) and KL(q || q) is
    exactly 0; standard deviations, never variances (s^2 underflows in float32 at
    1e-23, r only below 1e-45). This is every VI step's KL to the prior, so it is
    written for few elementwise passes: zeros of s are replaced by 1 (two ``where`` s,
    slow on CPU torch) and the exact edges are decided on the sums, not per element:
    a coordinate where exactly one of s_q, s_p is 0, or s_p = 0 and d != 0, or r
    overflows, makes the KL ``+inf``; one where s_q = s_p = 0 and d = 0 (two equal point masses)
    contributes exactly 0 (r = 1 there). jit-safe: ``where`` on values only.
    """
    parts, infinite = [], []
    one = None
    for s_q, s_p, (_, offset, size) in zip(
        q._s(xp, q_storage), p._s(xp, p_storage), p._scales, strict=True
    ):
        if one is None:
            one = xp.ones((), dtype=s_q.dtype, device=device_of(s_q))
        q_zero, p_zero = s_q == 0, s_p == 0
        p_safe = xp.where(p_zero, one, s_p)
        ratio = xp.where(q_zero, one, s_q) / p_safe
        d = difference[offset : offset + size]
        size_ratio = xp.abs(ratio)
        excess = (ratio - 1.0) * (ratio + 1.0) - 2.0 * xp.log(size_ratio)
        parts.append(xp.sum(excess + (d / p_safe) ** 2))
        # r overflowing (|s_q / s_p| > 3e38 in float32) is +inf too, not inf - inf
        edge = (q_zero != p_zero) | (p_zero & (d != 0)) | (size_ratio == math.inf)
        infinite.append(xp.any(edge))
    flag = infinite[0]
    for more in infinite[1:]:
        flag = flag | more
    return finish(xp, 0.5 * total(parts), flag)


@register_kl_to_normal(Diagonal)
def _kl_diagonal_to_normal(
    xp: Any, q: Diagonal, q_storage: Storage, means: list[Array], scale: float
) -> Array:
    """KL(diag(s^2) || N(0, scale^2 I)) = 0.5 sum(r^2 - 1 - 2 log|r| + (m / scale)^2),
    r = s / scale. O(P): per name, r and two sums; one sum of squares per mean
    (`mean_term`).

    The VI step's KL to its prior, written for few elementwise operations (each costs
    a fixed overhead on CPU torch; per name rather than over a concatenation, which
    costs a copy and, under ``jax.jit`` on CPU, about 1.4x the fused KL's time against
    1.2x). Every term is >= 0 and summed as one: r^2 - 1 - 2 log r per element, r^2 - 1
    as (r - 1)(r + 1) (exact near r = 1). Two separate sums of r^2 - 1 and 2 log r would
    save a pass but add eps log P times their size, not the difference's: 3-12x the
    error at r ~ 1 +- 1e-4 (q near its prior). |m|^2 is summed pairwise
    (`mean_term`); standard deviations, never variances (s^2 underflows in float32
    long before s).

    Exact edges without per-element compares or ``where`` s (each costs several
    multiplies' worth on CPU torch): r = 0 gives ``-2 log 0 = +inf`` by itself, and
    r = inf (an ``inf - inf`` term, NaN) is decided on sum(r^2 - 1) being ``+inf`` (it
    is at least -P otherwise; one reduction, no backward); both are ``+inf`` (NumPy
    warns of the ``log(0)`` or the ``inf - inf``); their gradient is NaN (the loss is
    infinite either way). NaN propagates: a NaN r makes that sum NaN too, on every
    backend (XLA's ``max`` would drop it).
    """
    terms, spreads = [], []
    for r in q._s(xp, q_storage):
        if q.scale_transform == "identity":  # static: a raw scale may be negative
            r = xp.abs(r)
        if scale != 1.0:  # static: a Python float
            r = r / scale
        square_minus_one = (r - 1.0) * (r + 1.0)
        terms.append(xp.sum(square_minus_one - 2.0 * xp.log(r)))
        spreads.append(xp.sum(square_minus_one))  # for the edge test only: no gradient
    value = 0.5 * (total(terms) + mean_term(xp, means, scale))
    return finish(xp, value, total(spreads) == math.inf)


@register_covariance
class DiagonalCovariance(FactorizedCovariance):
    """Diagonal covariance Sigma = diag(s^2), S = diag(s), K = P.

    Stored: ``scale[name]`` of shape ``mean.shape``, the standard deviations through
    ``scale_transform``. ``rank`` is P.

    Parameters
    ----------
    scale_transform
        How the stored ``scale`` maps to the standard deviations s:
        ``"softplus"`` (default) s = log(1 + e^scale), ``"exp"`` s = e^scale, or
        ``"identity"`` s = |scale| (the seed library's raw scale). Under softplus and
        exp no optimiser step can take s through zero.

    Notes
    -----
    Costs (B vectors): ``factor_matmul``, ``matmul`` and ``solve`` one
    elementwise pass, O(B P); ``diagonal``, ``trace``, ``logdet`` = 2 sum log|s|,
    O(P). Full rank unless an entry of ``scale`` is zero (then ``logdet`` is
    ``-inf`` and ``solve`` divides by zero: the values are not checked).
    ``reset_parameters`` sets every standard deviation to ``scale`` (not drawn: the
    seed drew N(0, scale^2), which starts some near zero); ``lr_scaling`` is
    ``{"scale.<name>": 1.0}``.
    """

    _structure_type: ClassVar[type[Structure]] = Diagonal
    _arguments: ClassVar[tuple[str, ...]] = ("scale_transform",)

    def __init__(self, *, scale_transform: str = "softplus") -> None:
        StructuredCovariance.__init__(self)
        self._requested_scale_transform = check_scale_transform(scale_transform)

    @property
    def scale_transform(self) -> str:
        """How ``scale`` maps to standard deviations (see the class docstring)."""
        transform: str = self._requested_scale_transform
        return transform

    @property
    def rank(self) -> int | None:
        """P after initialization (``None`` before)."""
        return None if self._structure is None else self._structure.rank
