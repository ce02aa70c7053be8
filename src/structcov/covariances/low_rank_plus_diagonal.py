"""Low rank plus diagonal covariance: Sigma = U U^T + diag(d^2)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, final

from .. import _linalg
from .._array_api import Array, namespace
from .._layout import Layout
from ._base import register_covariance
from ._kl import finish, ratio_excess, register_kl
from ._structure import (
    Slot,
    Storage,
    Structure,
    add_into,
    check_rank,
    check_scale_transform,
    eye,
    logdet_of,
    positive,
    require_parameters,
    row_norms,
    split_flat,
    total,
)
from .diagonal import Diagonal
from .factorized import FactorizedCovariance

__all__ = ["LowRankPlusDiagonal", "LowRankPlusDiagonalCovariance", "LowRankPlusDiagonalState"]


@final
@dataclass(frozen=True, repr=False)
class LowRankPlusDiagonal(Structure):
    """Sigma = U U^T + diag(d^2); ``factor.<name>`` holds U's rows, ``scale.<name>`` d
    through ``scale_transform`` (d = softplus(rho) by default; see `Diagonal`).

    S = [U, diag(d)] (K = rank + P, low-rank columns first). ``prepare`` computes the
    r x r capacitance C = I + U^T D^-1 U once (O(P r^2)); ``logdet`` = log det C +
    2 sum log|d| (determinant lemma), ``solve`` = Woodbury through C.
    """

    rank: int
    scale_transform: str = "softplus"
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
    def build(
        cls, layout: Layout, /, *, rank: int, scale_transform: str = "softplus"
    ) -> LowRankPlusDiagonal:
        """``rank`` (required) is clamped to P."""
        requested = check_rank(rank, "rank", optional=False)
        assert requested is not None
        require_parameters(layout, "LowRankPlusDiagonalCovariance")
        transform = check_scale_transform(scale_transform)
        return cls(layout, min(requested, layout.num_params), transform)

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank, "scale_transform": self.scale_transform}

    def _make_slots(self) -> tuple[Slot, ...]:
        layout, rank = self.layout, self.rank
        factors = tuple(
            Slot("factor", name, (*shape, rank), 1.0 / rank, 1.0 / math.sqrt(rank), name)
            for name, shape in zip(layout.names, layout.shapes, strict=True)
        )
        scales = tuple(
            Slot("scale", name, shape, 1.0, 1.0, name, random=False, transform=self.scale_transform)
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
        """d for the scale at ``path``, flat (n,) (through the scale transform)."""
        return positive(xp, xp.reshape(storage[path], (size,)), self.scale_transform)

    def standard_deviation(self, xp: Any, storage: Storage, name: str) -> Array:
        """d for the mean ``name``, shaped like the mean (through the scale transform)."""
        return positive(xp, storage[f"scale.{name}"], self.scale_transform)

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

    # ------------------------------------------------------------ whitened form
    # Sigma = D (I + W W^T) D with D = diag(d), W = D^-1 U (P x r). Everything below
    # works on U and d directly (W is only formed for the capacitance's Gram): no
    # d^2 (it underflows in float32 at d = 1e-23), no P x P, no copy of U.

    def _d_safe(self, xp: Any, storage: Storage, path: str, size: int) -> Array:
        """d with exact zeros read as 1, so that nothing divides 0 by 0; the zeros
        themselves are handled on values by `_degenerate` (jit-safe)."""
        d = self._d(xp, storage, path, size)
        return xp.where(d == 0, xp.ones_like(d), d)

    def capacitance(self, xp: Any, storage: Storage) -> Array:
        """C = I_r + U^T D^-2 U = I_r + W^T W, shape (rank, rank). O(P r^2).

        Entries of d equal to 0 are read as 1 here (see `logdet` for what they mean).
        """
        # W^T W with W = D^-1 U (one scaled temporary): NumPy sends a product of an
        # array with its own transpose to SYRK, half the flops of the general GEMM.
        grams = []
        for factor, scale, _, size in self._names:
            scaled = self._u(xp, storage, factor, size) / xp.expand_dims(
                self._d_safe(xp, storage, scale, size), axis=1
            )
            grams.append(_linalg.matmul(xp, xp.matrix_transpose(scaled), scaled))
        return total(grams) + eye(xp, self.rank, storage[self._names[0][0]])

    def prepare(self, xp: Any, storage: Storage) -> LowRankPlusDiagonalState:
        """The capacitance C (r x r) and its lower Cholesky factor, shared by ``logdet``,
        ``solve`` and ``quadratic``. O(P r^2 + r^3), memory O(P r) (one scaled copy of U
        while the Gram is formed, then r x r)."""
        capacitance = self.capacitance(xp, storage)
        return LowRankPlusDiagonalState(capacitance, _linalg.cholesky(xp, capacitance))

    def _log_abs_d(self, xp: Any, storage: Storage) -> Array:
        """sum log|d_i| over the non-zero d_i (2 log|d|, never log(d^2))."""
        return total(
            xp.sum(xp.log(xp.abs(self._d_safe(xp, storage, scale, size))))
            for _, scale, _, size in self._names
        )

    def _degenerate(self, xp: Any, storage: Storage) -> tuple[Array, Array]:
        """(singular, partial), two 0-D bools read from the values of d and U.

        ``singular``: Sigma is singular for certain: more than ``rank`` entries of d
        are 0 (the rows of Sigma there span at most ``rank`` dimensions), or a row of
        Sigma is all zero (d_i = 0 and U's row i = 0; e.g. the never-reset storage).
        ``partial``: some d_i = 0 but not certainly singular; the determinant lemma
        and Woodbury do not apply then.
        """
        zeros, dead = [], []
        for factor, scale, _, size in self._names:
            zero = self._d(xp, storage, scale, size) == 0
            empty = row_norms(xp, self._u(xp, storage, factor, size)) == 0
            zeros.append(xp.sum(xp.astype(zero, storage[scale].dtype)))
            dead.append(xp.any(zero & empty))
        count = total(zeros)
        any_dead = dead[0]
        for flag in dead[1:]:
            any_dead = any_dead | flag
        return any_dead | (count > self.rank), count > 0

    def logdet(self, xp: Any, storage: Storage, state: LowRankPlusDiagonalState) -> Array:
        """log det C + 2 sum log|d| (determinant lemma), 2 sum log L_ii for C = L L^T.

        ``-inf`` where Sigma is certainly singular (e.g. all zero); NaN where 1..rank
        entries of d are exactly 0 and Sigma may still be regular (not computed).
        """
        value = 2.0 * xp.sum(xp.log(xp.linalg.diagonal(state.cholesky))) + 2.0 * self._log_abs_d(
            xp, storage
        )
        singular, partial = self._degenerate(xp, storage)
        value = xp.where(partial, xp.full_like(value, math.nan), value)
        return xp.where(singular, xp.full_like(value, -math.inf), value)

    def _coefficients(
        self, xp: Any, storage: Storage, state: LowRankPlusDiagonalState, x: list[Array]
    ) -> tuple[Array, list[Array]]:
        """(a, residuals): a = C^-1 W^T D^-1 x = C^-1 U^T D^-2 x, shape (B, r), and D^-1 (x - U a).

        a minimises |D^-1 (x - U a)|^2 + |a|^2, whose minimum is x^T Sigma^-1 x. One step
        of iterative refinement, a += C^-1 (W^T r - a) with the residual r = D^-1 (x - U a):
        the gradient is computed from the small residual rather than from the Gram C
        (rounded at |W|^2 eps), which brings a from eps cond(C) to about eps cond(W)
        relative error. Cost: 4 GEMMs of (B, n) x (n, r) per name.
        """
        scales = [self._d_safe(xp, storage, scale, size) for _, scale, _, size in self._names]
        factors = [self._u(xp, storage, factor, size) for factor, _, _, size in self._names]

        def project(blocks: list[Array]) -> Array:  # W^T D^-1 blocks = U^T D^-2 blocks, (B, r)
            return total(
                _linalg.matmul(xp, (block / d) / d, u)
                for block, d, u in zip(blocks, scales, factors, strict=True)
            )

        def residuals(a: Array) -> list[Array]:  # D^-1 (x - U a), per name
            return [
                (block - xp.matmul(a, xp.matrix_transpose(u))) / d
                for block, d, u in zip(x, scales, factors, strict=True)
            ]

        def solve(t: Array) -> Array:
            return xp.matrix_transpose(_linalg.solve(xp, state.capacitance, xp.matrix_transpose(t)))

        a = solve(project(x))
        r = residuals(a)
        # W^T r = U^T D^-1 r: r is already divided by d once.
        gradient = total(
            _linalg.matmul(xp, block / d, u) for block, d, u in zip(r, scales, factors, strict=True)
        )
        a = a + solve(gradient - a)
        return a, residuals(a)

    def solve_blocks(
        self, xp: Any, storage: Storage, state: LowRankPlusDiagonalState, x: list[Array]
    ) -> list[Array]:
        # Woodbury, whitened: Sigma^-1 x = D^-1 (I + W W^T)^-1 D^-1 x = D^-1 (y - W a)
        # with y = D^-1 x, a = C^-1 W^T y: (x - U a) / d / d, never divided by d^2.
        _, residuals = self._coefficients(xp, storage, state, x)
        return [
            r / self._d_safe(xp, storage, scale, size)
            for (_, scale, _, size), r in zip(self._names, residuals, strict=True)
        ]

    def quadratic(
        self, xp: Any, storage: Storage, state: LowRankPlusDiagonalState, x: list[Array]
    ) -> Array:
        """x^T Sigma^-1 x per row of the (B, n) blocks, shape (B,). O(B P r), memory O(B P).

        Ridge identity: x^T Sigma^-1 x = min_a |D^-1 (x - U a)|^2 + |a|^2, attained at
        a = C^-1 U^T D^-2 x. A sum of two non-negative terms, and the value is stationary
        in a, so an error in a enters only to second order; the Woodbury difference
        |D^-1 x|^2 - |C^-1/2 W^T D^-1 x|^2 cancels catastrophically in float32 instead.
        """
        a, residuals = self._coefficients(xp, storage, state, x)
        return total(xp.sum(r * r, axis=-1) for r in residuals) + xp.sum(a * a, axis=-1)


class LowRankPlusDiagonalState(NamedTuple):
    """`LowRankPlusDiagonal.prepare`'s state: r x r arrays only (never P-sized)."""

    capacitance: Array  #: C = I_r + W^T W, W = D^-1 U (d = 0 read as 1)
    cholesky: Array  #: lower L, L L^T = C


def _inverse(xp: Any, a: Array) -> Array:
    return _linalg.solve(xp, a, eye(xp, a.shape[-1], a))


def _trace_product(xp: Any, a: Array, b: Array) -> Array:
    """tr(a b) for two r x r arrays, without the product: sum(a * b^T)."""
    return xp.sum(a * xp.matrix_transpose(b))


def _log_det_capacitance(xp: Any, state: LowRankPlusDiagonalState) -> Array:
    return 2.0 * xp.sum(xp.log(xp.linalg.diagonal(state.cholesky)))


def _p_terms(
    xp: Any,
    p: LowRankPlusDiagonal,
    p_storage: Storage,
    p_state: LowRankPlusDiagonalState,
    eta: list[Array],
) -> Array:
    """tr(C_p^-1 W_p^T diag(eta) W_p), W_p = D_p^-1 U_p; O(P r^2)."""
    grams = []
    for (factor, scale, _, size), e in zip(p._names, eta, strict=True):
        w = p._u(xp, p_storage, factor, size) / xp.expand_dims(
            p._d_safe(xp, p_storage, scale, size), axis=1
        )
        grams.append(_linalg.matmul(xp, xp.matrix_transpose(w * xp.expand_dims(e, axis=1)), w))
    return _trace_product(xp, _inverse(xp, p_state.capacitance), total(grams))


def _p_edges(
    xp: Any,
    p: LowRankPlusDiagonal,
    p_storage: Storage,
    q_diagonal: list[Array],
    difference: Array,
) -> tuple[Array, Array]:
    """(infinite, undefined) from p's zero d: ``+inf`` where a row of Sigma_p is zero
    while q has mass there (diag(Sigma_q)_i > 0 or a mean difference); undefined
    (NaN) for any other zero d_p (not computed)."""
    bad, zero_any = [], []
    for (factor, scale, offset, size), diag_q in zip(p._names, q_diagonal, strict=True):
        zero = p._d(xp, p_storage, scale, size) == 0
        dead = zero & (row_norms(xp, p._u(xp, p_storage, factor, size)) == 0)
        d = difference[offset : offset + size]
        bad.append(xp.any(dead & ((diag_q > 0) | (d != 0))))
        zero_any.append(xp.any(zero))
    return _or(bad), _or(zero_any)


def _or(flags: list[Array]) -> Array:
    out = flags[0]
    for flag in flags[1:]:
        out = out | flag
    return out


def _mahalanobis(
    xp: Any,
    p: LowRankPlusDiagonal,
    p_storage: Storage,
    p_state: LowRankPlusDiagonalState,
    difference: Array,
) -> Array:
    d = xp.reshape(difference, (1, difference.shape[0]))
    return xp.sum(p.quadratic(xp, p_storage, p_state, split_flat(p, d)))


def _columns(xp: Any, blocks: list[Array]) -> list[Array]:
    """Per-name (n, r) blocks of a P x r matrix as (r, n) row blocks (its columns)."""
    return [xp.matrix_transpose(block) for block in blocks]


@register_kl(LowRankPlusDiagonal, LowRankPlusDiagonal)
def _kl_lrpd_lrpd(
    xp: Any,
    q: LowRankPlusDiagonal,
    q_storage: Storage,
    p: LowRankPlusDiagonal,
    p_storage: Storage,
    difference: Array,
) -> Array:
    """Two low rank plus diagonals, whitened by p's diagonal; never P x P. O(P r^2 + r^3).

    With D_p = diag(d_p), W_p = D_p^-1 U_p, V = D_p^-1 U_q, rho = (d_q / d_p)^2,
    B = I + W_p W_p^T (so Sigma_p = D_p B D_p), C_p = I + W_p^T W_p, C_q = I + W_q^T W_q:

        2 KL = sum(rho - 1 - log rho)                            (>= 0 termwise)
             + tr(V^T B^-1 V) - tr(C_p^-1 W_p^T diag(rho) W_p)   (= tr(Sigma_p^-1 Sigma_q)
                                                                     - sum rho)
             - (log det C_q - log det C_p)                       (determinant lemma)
             + m^T Sigma_p^-1 m.

    Equal ranks: with E = V - W_p = D_p^-1 (U_q - U_p) and eta = rho - 1 (push-through
    B^-1 W_p = W_p C_p^-1), the middle line is
    2 tr(C_p^-1 W_p^T E) + tr(E^T B^-1 E) - tr(C_p^-1 W_p^T diag(eta) W_p): every
    term is a product of the difference between q and p, so KL(q || q) and KL(q || copy)
    are exactly 0 rather than a difference of numbers of size |W|^2 (1e15 at d = 1e-6).
    tr(X^T B^-1 X) and the Mahalanobis term are p's `quadratic` (ridge form, sums of
    non-negative terms). Memory O(P r): a few P x r temporaries, r x r otherwise.

    Edges: +inf for a singular q (see `LowRankPlusDiagonal.logdet`) or a zero row of
    Sigma_p where q has mass; NaN where a d is 0 otherwise (not computed).
    """
    p_state = p.prepare(xp, p_storage)
    q_state = q.prepare(xp, q_storage)
    excess_parts, eta = [], []
    for (_, q_scale, _, size), (_, p_scale, _, _) in zip(q._names, p._names, strict=True):
        excess, minus_one = ratio_excess(
            xp, q._d(xp, q_storage, q_scale, size), p._d(xp, p_storage, p_scale, size)
        )
        excess_parts.append(xp.sum(excess))
        eta.append(minus_one)
    q_blocks = [q._u(xp, q_storage, f, size) for f, _, _, size in q._names]
    p_blocks = [p._u(xp, p_storage, f, size) for f, _, _, size in p._names]
    if q.rank == p.rank:
        delta = [u_q - u_p for u_q, u_p in zip(q_blocks, p_blocks, strict=True)]  # (n, r)
        cross = total(
            _linalg.matmul(
                xp,
                xp.matrix_transpose((u_p / xp.expand_dims(d, axis=1)) / xp.expand_dims(d, axis=1)),
                e,
            )
            for u_p, e, d in zip(
                p_blocks,
                delta,
                [p._d_safe(xp, p_storage, scale, size) for _, scale, _, size in p._names],
                strict=True,
            )
        )  # W_p^T E = U_p^T D_p^-2 (U_q - U_p), r x r
        middle = (
            2.0 * _trace_product(xp, _inverse(xp, p_state.capacitance), cross)
            + xp.sum(p.quadratic(xp, p_storage, p_state, _columns(xp, delta)))
            - _p_terms(xp, p, p_storage, p_state, eta)
        )
    else:
        rho = [e + 1.0 for e in eta]
        middle = xp.sum(p.quadratic(xp, p_storage, p_state, _columns(xp, q_blocks))) - _p_terms(
            xp, p, p_storage, p_state, rho
        )
    value = 0.5 * (
        total(excess_parts)
        + middle
        - (_log_det_capacitance(xp, q_state) - _log_det_capacitance(xp, p_state))
        + _mahalanobis(xp, p, p_storage, p_state, difference)
    )
    p_infinite, p_undefined = _p_edges(
        xp, p, p_storage, q.diagonal_blocks(xp, q_storage), difference
    )
    q_singular, q_partial = q._degenerate(xp, q_storage)
    value = finish(xp, value, q_singular, q_partial)
    return finish(xp, value, p_infinite, p_undefined)


@register_kl(Diagonal, LowRankPlusDiagonal)
def _kl_diagonal_lrpd(
    xp: Any,
    q: Diagonal,
    q_storage: Storage,
    p: LowRankPlusDiagonal,
    p_storage: Storage,
    difference: Array,
) -> Array:
    """A diagonal q = diag(s^2) against low rank plus diagonal p. O(P r^2 + r^3), memory O(P r).

    The LRPD pair's identity with no low-rank part in q (rho = (s / d_p)^2):
    2 KL = sum(rho - 1 - log rho) - tr(C_p^-1 W_p^T diag(rho) W_p) + log det C_p
    + m^T Sigma_p^-1 m, W_p = D_p^-1 U_p, C_p = I + W_p^T W_p. Never P x P (the generic
    pair builds the P columns of S_q = diag(s)).

    Edges: +inf where s = 0 (q singular) or where a zero row of Sigma_p meets q's mass;
    NaN where a d_p is 0 otherwise.
    """
    p_state = p.prepare(xp, p_storage)
    excess_parts, rho = [], []
    for s_q, (_, p_scale, _, size) in zip(q._s(xp, q_storage), p._names, strict=True):
        excess, minus_one = ratio_excess(xp, s_q, p._d(xp, p_storage, p_scale, size))
        excess_parts.append(xp.sum(excess))
        rho.append(minus_one + 1.0)
    value = 0.5 * (
        total(excess_parts)
        - _p_terms(xp, p, p_storage, p_state, rho)
        + _log_det_capacitance(xp, p_state)
        + _mahalanobis(xp, p, p_storage, p_state, difference)
    )
    q_zero = _or([xp.any(s == 0) for s in q._s(xp, q_storage)])
    p_infinite, p_undefined = _p_edges(
        xp, p, p_storage, q.diagonal_blocks(xp, q_storage), difference
    )
    value = finish(xp, value, q_zero)
    return finish(xp, value, p_infinite, p_undefined)


@register_kl(LowRankPlusDiagonal, Diagonal)
def _kl_lrpd_diagonal(
    xp: Any,
    q: LowRankPlusDiagonal,
    q_storage: Storage,
    p: Diagonal,
    p_storage: Storage,
    difference: Array,
) -> Array:
    """Low rank plus diagonal against a diagonal s_p^2: well-scaled terms (float32). O(P r^2).

    With rho = (d / s_p)^2: 0.5 [sum(rho - 1 - log rho) + sum(rowsum(U^2) / s_p^2)
    + sum((m / s_p)^2) - log det C], the determinant lemma splitting log det Sigma_q;
    log rho = 2 (log|d| - log|s_p|) and every division by s_p is done twice, never by s_p^2.

    Edges: +inf for a singular q or where s_p = 0 meets q's mass; NaN where s_p = 0
    otherwise, or where 1..rank entries of d are 0 (not computed).
    """
    parts, bad, p_zero = [], [], []
    for (factor, scale, offset, size), s_p in zip(q._names, p._s(xp, p_storage), strict=True):
        excess, _ = ratio_excess(xp, q._d(xp, q_storage, scale, size), s_p)
        zero = s_p == 0
        safe = xp.where(zero, xp.ones_like(s_p), s_p)
        norms = row_norms(xp, q._u(xp, q_storage, factor, size))
        d = difference[offset : offset + size]
        parts.append(xp.sum(excess + (norms / safe) / safe + (d / safe) ** 2))
        diag_q = norms + q._d(xp, q_storage, scale, size) ** 2
        bad.append(xp.any(zero & ((diag_q > 0) | (d != 0))))
        p_zero.append(xp.any(zero))
    q_state = q.prepare(xp, q_storage)
    value = 0.5 * (total(parts) - _log_det_capacitance(xp, q_state))
    q_singular, q_partial = q._degenerate(xp, q_storage)
    value = finish(xp, value, q_singular, q_partial)
    return finish(xp, value, _or(bad), _or(p_zero))


@register_kl(Structure, LowRankPlusDiagonal)
def _kl_to_lrpd(
    xp: Any,
    q: Structure,
    q_storage: Storage,
    p: LowRankPlusDiagonal,
    p_storage: Storage,
    difference: Array,
) -> Array:
    """Any q against low rank plus diagonal p, from diag(Sigma_q) and r products S_q^T v.

    With D = diag(d_p), W = D^-1 U_p, Sigma_p = D (I + W W^T) D, C = I + W^T W (p's
    capacitance) and Woodbury (I + W W^T)^-1 = I - W C^-1 W^T:

        tr(Sigma_p^-1 Sigma_q) = sum(diag(Sigma_q) / d / d) - tr(C^-1 Z Z^T),
        Z = V^T S_q (r x K_q),  V = D^-1 W = U_p / d / d  (P x r),

    so q is touched through ``q.diagonal_blocks`` and ``q.rblocks`` on the r columns of
    V (dividing by d twice, never by d^2); the Mahalanobis term is p's ridge
    `LowRankPlusDiagonal.quadratic` and log det Sigma_p the determinant lemma. Cost
    O(P r^2 + r^3) for p, q's diagonal (O(P) Kronecker, O(P K) dense factor), r products
    S_q^T v (O(r P K) dense, O(r P (r_in + r_out)) Kronecker) and O(r^2 K_q). Memory
    O(r (P + K_q)): a few P x r and r x K_q arrays, never P x P.

    Both terms of the trace are >= 0 (Z Z^T is a Gram matrix, formed r x r so that
    nothing r x K_q is solved); their difference loses about eps |W|^2 relative to the
    trace where q's mass lies along p's low-rank directions and |W| >> 1 (the diagonal
    and low rank plus diagonal q have their own pairs, which do not cancel and give
    KL(q || q) = 0).

    Edges (values, jit-safe): ``+inf`` for a singular q (log det Sigma_q = -inf) or a
    zero row of Sigma_p where q has mass; NaN where a d_p is 0 otherwise (not computed).
    """
    p_state = p.prepare(xp, p_storage)
    scales = [p._d_safe(xp, p_storage, scale, size) for _, scale, _, size in p._names]
    # V^T as per-name (r, n) row blocks: U_p / d / d, transposed.
    v_rows = [
        xp.matrix_transpose(
            (p._u(xp, p_storage, factor, size) / xp.expand_dims(d, axis=1))
            / xp.expand_dims(d, axis=1)
        )
        for (factor, _, _, size), d in zip(p._names, scales, strict=True)
    ]
    z = q.rblocks(xp, q_storage, v_rows)  # (V^T S_q) = (S_q^T V)^T, (r, K_q)
    gram = _linalg.matmul(xp, z, xp.matrix_transpose(z))  # Z Z^T = V^T Sigma_q V, r x r
    q_diagonal = q.diagonal_blocks(xp, q_storage)
    diagonal_trace = total(
        xp.sum((diag_q / d) / d) for diag_q, d in zip(q_diagonal, scales, strict=True)
    )
    value = 0.5 * (
        diagonal_trace
        - _trace_product(xp, _inverse(xp, p_state.capacitance), gram)
        + _mahalanobis(xp, p, p_storage, p_state, difference)
        - q.num_params
        + p.logdet(xp, p_storage, p_state)
        - logdet_of(xp, q, q_storage)
    )
    p_infinite, p_undefined = _p_edges(xp, p, p_storage, q_diagonal, difference)
    return finish(xp, value, p_infinite, p_undefined)


@register_covariance
class LowRankPlusDiagonalCovariance(FactorizedCovariance):
    r"""Covariance Sigma = U U^T + diag(d^2): a rank-r correction of a diagonal.

    Stored: ``factor[name]`` of shape ``(*mean.shape, rank)`` (the rows of U) and
    ``scale[name]`` of shape ``mean.shape`` (d through ``scale_transform``:
    ``"softplus"``, the default, d = log(1 + e^scale); ``"exp"``; or ``"identity"``,
    the seed's raw scale — see `DiagonalCovariance`). The sampling factor is
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
    _arguments: ClassVar[tuple[str, ...]] = ("rank", "scale_transform")

    def __init__(self, rank: int, *, scale_transform: str = "softplus") -> None:
        check_rank(rank, "rank", optional=False)
        super().__init__(rank)
        self._requested_scale_transform = check_scale_transform(scale_transform)

    @property
    def scale_transform(self) -> str:
        """How ``scale`` maps to the diagonal d (see the class docstring)."""
        transform: str = self._requested_scale_transform
        return transform

    def capacitance(self) -> Array:
        """C = I_r + U^T D^-1 U, shape (rank, rank). O(P r^2); the only r x r object needed."""
        storage = self._ops_storage()
        structure = self.structure
        assert isinstance(structure, LowRankPlusDiagonal)
        return structure.capacitance(namespace(storage[structure.slots[0].path]), storage)
