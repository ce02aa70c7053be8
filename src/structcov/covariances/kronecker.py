"""Kronecker-factored covariance of a layer's weight (and bias), K-FAC convention."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, final

from .. import _linalg
from .._array_api import Array, device_of, to_device
from .._layout import Layout
from ._base import register_covariance
from ._kl import (
    finish,
    kl_from_trace,
    off_support,
    register_kl,
    register_kl_singular,
    support,
    top_excess,
    whiten,
)
from ._structure import (
    Slot,
    Storage,
    Structure,
    add_into,
    check_rank,
    eye,
    logdet_of,
    row_norms,
    split_flat,
    total,
)
from .diagonal import Diagonal
from .factorized import Factorized, FactorizedCovariance
from .low_rank_plus_diagonal import LowRankPlusDiagonal

__all__ = ["Kronecker", "KroneckerCovariance", "KroneckerInverse", "check_sample_scale"]


def check_sample_scale(value: Any) -> float:
    """Validate ``sample_scale``: a finite real number >= 0 (0 makes Sigma singular)."""
    if isinstance(value, (bool, str)):
        number = math.nan
    else:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"`sample_scale` must be a finite float >= 0, got {value!r}")
    return number


@final
@dataclass(frozen=True, repr=False)
class Kronecker(Structure):
    """Sigma = sample_scale^2 (C_out ⊗ C_in) over W~ = [W | b] (K-FAC convention).

    Storage: ``input_factor.weight`` (*in_shape, r_in), ``input_factor.bias``
    (1, r_in) (S_in's last row) and ``output_factor`` (d_out, r_out). ``prepare``
    stacks the square S_in once for ``logdet`` and ``solve``.
    """

    input_rank: int
    output_rank: int
    sample_scale: float = 1.0
    d_out: int = field(init=False, repr=False, compare=False)
    d_in: int = field(init=False, repr=False, compare=False)
    has_bias: bool = field(init=False, repr=False, compare=False)

    dict_attributes = ("input_factor",)
    array_attributes = ("output_factor",)
    singular_advice = (
        "use full Kronecker ranks (input_rank=None, output_rank=None) or "
        "LowRankPlusDiagonalCovariance"
    )

    def __post_init__(self) -> None:
        layout = self.layout
        weight_shape = layout.shape_of("weight")
        object.__setattr__(self, "d_out", weight_shape[0])
        object.__setattr__(self, "d_in", math.prod(weight_shape[1:]))
        object.__setattr__(self, "has_bias", "bias" in layout.names)
        super().__post_init__()

    @classmethod
    def build(
        cls,
        layout: Layout,
        /,
        *,
        input_rank: int | None = None,
        output_rank: int | None = None,
        sample_scale: float = 1.0,
    ) -> Kronecker:
        """Validate the layer layout (``weight`` (d_out, *in_shape), optional ``bias``
        (d_out,)); ``None`` ranks are full, larger ones clamped."""
        requested_in = check_rank(input_rank, "input_rank", optional=True)
        requested_out = check_rank(output_rank, "output_rank", optional=True)
        scale = check_sample_scale(sample_scale)
        unknown = [name for name in layout.names if name not in ("weight", "bias")]
        if unknown or "weight" not in layout.names:
            raise ValueError(
                "KroneckerCovariance needs a `weight` entry and at most a `bias` entry, got "
                f"{list(layout.names)}"
            )
        weight_shape = layout.shape_of("weight")
        if len(weight_shape) < 2:
            raise ValueError(
                "KroneckerCovariance needs `weight` of shape (d_out, *in_shape) with at least "
                f"2 dimensions, got shape {weight_shape}"
            )
        d_out = weight_shape[0]
        has_bias = "bias" in layout.names
        if has_bias and layout.shape_of("bias") != (d_out,):
            raise ValueError(
                f"KroneckerCovariance needs `bias` of shape ({d_out},) (d_out), got "
                f"{layout.shape_of('bias')}"
            )
        d_aug = math.prod(weight_shape[1:]) + int(has_bias)
        if d_out == 0 or d_aug == 0:
            raise ValueError(
                "KroneckerCovariance needs d_out >= 1 and d_in + has_bias >= 1, got `weight` of "
                f"shape {weight_shape}" + (" and a bias" if has_bias else " and no bias")
            )
        r_in = d_aug if requested_in is None else min(requested_in, d_aug)
        r_out = d_out if requested_out is None else min(requested_out, d_out)
        return cls(layout, r_in, r_out, scale)

    def config(self) -> dict[str, Any]:
        return {
            "input_rank": self.input_rank,
            "output_rank": self.output_rank,
            "sample_scale": self.sample_scale,
        }

    def _make_slots(self) -> tuple[Slot, ...]:
        layout, r_in, r_out = self.layout, self.input_rank, self.output_rank
        slots = [
            Slot(
                "input_factor",
                name,
                (*layout.shape_of(name)[1:], r_in) if name == "weight" else (1, r_in),
                1.0 / r_in,
                1.0 / math.sqrt(r_in),
                name,
            )
            for name in layout.names
        ]
        slots.append(
            Slot(
                "output_factor",
                None,
                (self.d_out, r_out),
                1.0 / r_out,
                1.0 / math.sqrt(r_out),
                None,
            )
        )
        return tuple(slots)

    def initial_storage(self, xp: Any, zeros: dict[str, Array]) -> dict[str, Array]:
        """Truncated identities: S_out = I[:, :r_out], S_in = I[:, :r_in] (so Sigma = I at
        full ranks). Not zeros: with both factors zero, the gradient of any sampled loss
        with respect to each factor is a product with the other, so training never starts.
        Added to ``zeros`` to keep their layout (chunks, sharding)."""
        ref = zeros["output_factor"]
        dtype, device = ref.dtype, device_of(ref)
        # Made on the default device, then moved only if that is not where `zeros` lies:
        # `device=` would commit a JAX array, and a committed leaf next to uncommitted
        # means makes a jitted step compile a second time on its own output.
        eye_in = to_device(xp.eye(self.d_aug, self.input_rank, dtype=dtype), device)
        eye_out = to_device(xp.eye(self.d_out, self.output_rank, dtype=dtype), device)
        out = dict(zeros)
        weight = zeros["input_factor.weight"]
        out["input_factor.weight"] = weight + xp.reshape(eye_in[: self.d_in, :], weight.shape)
        if self.has_bias:
            out["input_factor.bias"] = zeros["input_factor.bias"] + eye_in[self.d_in :, :]
        out["output_factor"] = ref + eye_out
        return out

    @property
    def num_factor_columns(self) -> int:
        return self.input_rank * self.output_rank

    @property
    def rank(self) -> int:
        """K = input_rank * output_rank."""
        return self.input_rank * self.output_rank

    @property
    def d_aug(self) -> int:
        """d_in + has_bias: the columns of W~."""
        return self.d_in + int(self.has_bias)

    def singular_reason(self) -> str:
        if not self.sample_scale:
            return "sample_scale is 0"
        return (
            f"input_rank {self.input_rank} of d_in + has_bias = {self.d_aug}, output_rank "
            f"{self.output_rank} of d_out = {self.d_out}"
        )

    @property
    def is_singular(self) -> bool:
        """True when a factor is low rank or ``sample_scale`` is 0."""
        return (
            self.input_rank < self.d_aug or self.output_rank < self.d_out or not self.sample_scale
        )

    # ------------------------------------------------------------ products
    def _input_weight(self, xp: Any, storage: Storage) -> Array:
        return xp.reshape(storage["input_factor.weight"], (self.d_in, self.input_rank))

    def square_input_factor(self, xp: Any, storage: Storage) -> Array:
        """S_in of shape (d_aug, r_in): weight rows, then the bias row (augmented order)."""
        weight = self._input_weight(xp, storage)
        if not self.has_bias:
            return weight
        return xp.concat([weight, storage["input_factor.bias"]], axis=0)

    def blocks(self, xp: Any, storage: Storage, z: Array) -> list[Array]:
        return self._factor_blocks(xp, storage, [z])

    def sample_blocks(self, xp: Any, storage: Storage, noise: list[Array]) -> list[Array]:
        """`blocks` for a z that is handed over (``noise``, a one-element list, emptied).

        z is released after the first product (S_out Z or Z S_in^T), before the
        output is allocated: the peak is max(z + T, T + output) for the intermediate
        T, about output + z at full ranks, where `blocks` (whose caller keeps z)
        holds z + T + output. Same values.
        """
        return self._factor_blocks(xp, storage, noise)

    def _factor_blocks(self, xp: Any, storage: Storage, noise: list[Array]) -> list[Array]:
        """S vec_r(Z) = vec_r(S_out Z S_in^T) per name for the z in ``noise`` (emptied)."""
        r_in, r_out, d_out, d_in = self.input_rank, self.output_rank, self.d_out, self.d_in
        batch = noise[0].shape[0]
        s_out = storage["output_factor"]
        if self.sample_scale != 1.0:
            s_out = s_out * self.sample_scale
        s_in = {
            "weight": self._input_weight(xp, storage),
            "bias": storage.get("input_factor.bias"),
        }
        zz = xp.reshape(noise.pop(), (batch, r_out, r_in))
        # Associate S_out Z S_in^T the cheaper way (static shapes decide).
        left_first = d_out * r_out * r_in + d_out * r_in * self.d_aug
        right_first = r_out * r_in * self.d_aug + d_out * r_out * self.d_aug
        blocks = {}
        if left_first <= right_first:
            t = xp.matmul(s_out, zz)  # (B, d_out, r_in)
            del zz  # z's last reference where it was handed over
            for name in self.layout.names:
                blocks[name] = xp.matmul(t, xp.matrix_transpose(s_in[name]))
        else:
            u = {name: xp.matmul(zz, xp.matrix_transpose(s_in[name])) for name in self.layout.names}
            del zz  # (B, r_out, d_name) each
            for name in self.layout.names:
                blocks[name] = xp.matmul(s_out, u.pop(name))
        # weight: (B, d_out, d_in) row-major = vec_r; bias: (B, d_out, 1).
        return [
            xp.reshape(blocks[name], (batch, d_out * (d_in if name == "weight" else 1)))
            for name in self.layout.names
        ]

    def _split_augmented(self, xp: Any, x: list[Array]) -> tuple[Array, Array | None]:
        """Per-name blocks -> weight (B, d_out, d_in) and bias (B, d_out) or None."""
        blocks = dict(zip(self.layout.names, x, strict=True))
        weight = xp.reshape(blocks["weight"], (blocks["weight"].shape[0], self.d_out, self.d_in))
        return weight, blocks.get("bias")

    def rblocks(self, xp: Any, storage: Storage, x: list[Array]) -> Array:
        # S^T x = vec_r(S_out^T X~ S_in) with X~ = [X_W | x_b]; X~ is never concatenated.
        weight, bias = self._split_augmented(xp, x)
        t = xp.matmul(weight, self._input_weight(xp, storage))  # (B, d_out, r_in)
        if bias is not None:
            t = t + xp.expand_dims(bias, axis=-1) * storage["input_factor.bias"]
        v = _linalg.matmul(xp, xp.matrix_transpose(storage["output_factor"]), t)  # (B, r_out, r_in)
        if self.sample_scale != 1.0:
            v = v * self.sample_scale
        return xp.reshape(v, (v.shape[0], self.num_factor_columns))

    def _matmul_costs(self, batch: int, grams_given: bool = False) -> tuple[int, int]:
        """Multiply-adds of Sigma x for ``batch`` vectors: (roots S (S^T x), Grams C).

        Roots: `rblocks` then `blocks` (its cheaper association). Grams: C_out = S_out
        S_out^T and C_in = S_in S_in^T formed once per call (not counted when
        ``grams_given``: `prepare_matmul` formed them), then C_out X~ C_in.
        Static shapes only (jit-safe); the Grams win unless the ranks are small.
        """
        r_in, r_out, d_out, d_aug = self.input_rank, self.output_rank, self.d_out, self.d_aug
        roots = batch * (
            d_out * d_aug * r_in
            + r_out * d_out * r_in
            + min(
                d_out * r_out * r_in + d_out * r_in * d_aug,
                r_out * r_in * d_aug + d_out * r_out * d_aug,
            )
        )
        forming = 0 if grams_given else d_out * d_out * r_out + d_aug * d_aug * r_in
        return roots, forming + batch * d_out * d_aug * (d_out + d_aug)

    def prepare_matmul(self, xp: Any, storage: Storage) -> KroneckerGrams | None:
        """The two factor Grams (`_grams`) for `matmul_blocks` on this exact storage, or
        ``None`` where S (S^T x) is cheaper even with them given (small ranks): once the
        Grams are given both costs scale with the batch, so that holds for every batch."""
        roots, grams = self._matmul_costs(1, grams_given=True)
        return None if roots <= grams else KroneckerGrams(*self._grams(xp, storage))

    def matmul_blocks(
        self, xp: Any, storage: Storage, x: list[Array], state: Any = None
    ) -> list[Array]:
        if state is not None and not isinstance(state, KroneckerGrams):
            raise TypeError(
                "`state` of a Kronecker matmul must come from `prepare_matmul` (its factor "
                f"Grams), got {type(state).__name__}"
            )
        roots, grams = self._matmul_costs(x[0].shape[0], state is not None)
        if roots <= grams:
            return self.blocks(xp, storage, self.rblocks(xp, storage, x))
        # Sigma vec_r(X~) = vec_r(C_out X~ C_in) (mixed-product rule), C = S S^T per factor.
        # Forming C rounds like the products S (S^T x) do (eps |S| |S|^T), so the result
        # is as accurate as the root path; nothing is solved with C.
        weight, bias = self._split_augmented(xp, x)
        left, right = self._grams(xp, storage) if state is None else state
        return self._join(xp, *self._kronecker_product(xp, left, right, weight, bias))

    def _grams(self, xp: Any, storage: Storage) -> tuple[Array, Array]:
        """sample_scale^2 C_out = sample_scale^2 S_out S_out^T (d_out x d_out) and
        C_in = S_in S_in^T (d_aug x d_aug): two GEMMs, O(d_out^2 r_out + d_aug^2 r_in)."""
        s_out = storage["output_factor"]
        c_out = xp.matmul(s_out, xp.matrix_transpose(s_out))
        if self.sample_scale != 1.0:
            c_out = c_out * (self.sample_scale**2)
        s_in = self.square_input_factor(xp, storage)
        return c_out, xp.matmul(s_in, xp.matrix_transpose(s_in))

    def _augment(self, xp: Any, x: list[Array]) -> Array:
        """Per-name blocks -> X~ = [X_W | x_b] of shape (B, d_out, d_aug): one copy with a bias."""
        weight, bias = self._split_augmented(xp, x)
        if bias is None:
            return weight
        return xp.concat([weight, xp.expand_dims(bias, axis=-1)], axis=2)

    def _join(self, xp: Any, weight: Array, bias: Array | None) -> list[Array]:
        """(B, d_out, d_in) and (B, d_out) from `_kronecker_product` -> per-name blocks.

        The weight block is already vec_r of the weight (a view where it is contiguous,
        which `_kronecker_product`'s output is).
        """
        blocks = {
            "weight": xp.reshape(weight, (weight.shape[0], self.d_out * self.d_in)),
            "bias": bias,
        }
        return [blocks[name] for name in self.layout.names]

    def _kronecker_product(
        self, xp: Any, left: Array, right: Array, weight: Array, bias: Array | None
    ) -> tuple[Array, Array | None]:
        """(left ⊗ right) vec_r(X~) = vec_r(left X~ right^T) for ``left`` (d_out, d_out),
        ``right`` (d_aug, d_aug) and X~ = [X_W | x_b] given as its blocks: ``weight``
        (B, d_out, d_in) (a view of the flat input) and ``bias`` (B, d_out) or ``None``.
        Returns the same two blocks of the result.

        left X~ first: T_W = left X_W (a batched GEMM over d_out) and t_b = x_b left^T,
        joined into T~ = [T_W | t_b] (B, d_out, d_aug) (one copy of that size, cheaper
        than a rank-one update of the result); then Y_W = T~ R[:, :d_in] and
        y_b = T~ R[:, d_in] with R = right^T (one GEMM folding the batch into its rows,
        one GEMV pass). The input is read in place (never concatenated) and nothing is
        transposed in memory: the weight block comes out contiguous, in vec_r order.
        Two GEMMs of B P (d_out + d_aug) multiply-adds in all, plus O(B P).
        """
        d_in = self.d_in
        rt = xp.matrix_transpose(right)
        t = _linalg.matmul(xp, left, weight)  # left X_W, (B, d_out, d_in): contracts d_out
        if bias is None:
            return xp.matmul(t, rt), None
        t_bias = _linalg.matmul(xp, bias, xp.matrix_transpose(left))  # x_b left^T, (B, d_out)
        t = xp.concat([t, xp.expand_dims(t_bias, axis=-1)], axis=-1)  # T~, (B, d_out, d_aug)
        # y_b with a 1-D right operand: one matrix-vector pass, no (B, d_out, 1) result.
        return xp.matmul(t, rt[:, :d_in]), xp.matmul(t, rt[:, d_in])

    def _diagonal_factors(self, xp: Any, storage: Storage) -> tuple[Array, Array, Array | None]:
        """diag(C_out) * sample_scale^2, diag(C_in) weight rows, and the bias row's entry."""
        out = row_norms(xp, storage["output_factor"]) * (self.sample_scale**2)
        weight = row_norms(xp, self._input_weight(xp, storage))
        bias = xp.sum(storage["input_factor.bias"] ** 2) if self.has_bias else None
        return out, weight, bias

    def diagonal_blocks(self, xp: Any, storage: Storage) -> list[Array]:
        out, weight, bias = self._diagonal_factors(xp, storage)
        blocks = {
            "weight": xp.reshape(
                xp.expand_dims(out, axis=1) * xp.expand_dims(weight, axis=0), (-1,)
            ),
            "bias": None if bias is None else out * bias,
        }
        return [blocks[name] for name in self.layout.names]

    def trace(self, xp: Any, storage: Storage) -> Array:
        """tr Sigma = tr(C_out) tr(C_in) (mixed-product rule), tr(S S^T) = |S|_F^2: one
        full reduction per stored factor. O(factor sizes)."""
        # sum(S * S), not a 1-D dot: the backends sum pairwise (error ~ eps log n), a
        # BLAS dot accumulates in one float32 (~ eps n: 7e-5 at n = 4e6), and the KL
        # multiplies the trace's relative error by P
        squares = {path: xp.sum(storage[path] * storage[path]) for path in self.paths}
        s_out = squares.pop("output_factor")
        value = s_out * total(squares.values())
        return value if self.sample_scale == 1.0 else value * (self.sample_scale**2)

    # ------------------------------------------------------------ full rank
    def prepare(self, xp: Any, storage: Storage) -> Array:
        """The square S_in (d_aug x d_aug), stacked once."""
        return self.square_input_factor(xp, storage)

    def logdet(self, xp: Any, storage: Storage, state: Array) -> Array:
        # det(A ⊗ B) = det(A)^m det(B)^n (A n x n, B m x m); log det(S S^T) = 2 log|det S|.
        log_out = _linalg.logabsdet(xp, storage["output_factor"])
        log_in = _linalg.logabsdet(xp, state)
        value = 2.0 * (self.d_aug * log_out + self.d_out * log_in)
        if self.sample_scale == 1.0:  # static: no scalar op to add 0
            return value
        return value + self.num_params * math.log(self.sample_scale**2)

    def solve_blocks(self, xp: Any, storage: Storage, state: Array, x: list[Array]) -> list[Array]:
        """Sigma^-1 x per name: vec_r(C_out^-1 X~ C_in^-1) / sample_scale^2 (full ranks).

        C^-1 = S^-T S^-1 per factor, from the inverse of the square root S
        (`inverse_factors`: one LU each, solved against the identity) and one d x d GEMM;
        then GEMMs with X~ (`_kronecker_product`), and one step of iterative refinement
        y += Sigma^-1 (x - Sigma y), its Sigma y with the Grams C = S S^T (which only
        multiply). Cost O(d_out^3 + d_aug^3 + B P (d_out + d_aug)): six GEMMs of
        B P (d_out or d_aug) multiply-adds where LU solves of the B P right-hand sides
        would run eight triangular solves of that size, and on CPU a GEMM runs several
        times faster than a triangular solve (benchmarks/kronecker_peers.py).

        Accuracy, the trade-off: S is inverted, never C = S S^T (a Cholesky of S S^T
        fails in float32 once cond(S)^2 ~ 1/eps; NaN under JAX). Without refinement a
        product with a computed inverse is not backward stable: for x in the span of
        Sigma's large eigenvalues its residual reaches eps cond(S)^2 |Sigma| |x^| (2e4
        eps measured at cond(Sigma) = 1e6 in float32). The refinement step brings the
        residual |Sigma x^ - b| back to a few eps P |Sigma| |x^| (backward stable, as
        tests/test_conditioning.py asserts), so the forward error is within the usual
        eps cond(Sigma) of any backward-stable solve. It is near eps cond(S) for a
        typical right-hand side, as with the former LU solves with S, but the LU
        solves did better than eps cond(Sigma) on the span of the large eigenvalues
        (float32, cond(Sigma) = 1e6: relative error 1e-2 here, 5e-6 to 6e-3 there,
        the same order as a Cholesky solve of S S^T).
        """
        inverse = self.inverse_factors(xp, storage, state)
        g_out = xp.matmul(xp.matrix_transpose(inverse.output), inverse.output)  # C_out^-1
        g_in = xp.matmul(xp.matrix_transpose(inverse.input), inverse.input)  # C_in^-1
        if self.sample_scale != 1.0:
            g_out = g_out / (self.sample_scale**2)
        weight, bias = self._split_augmented(xp, x)
        y_weight, y_bias = self._kronecker_product(xp, g_out, g_in, weight, bias)
        # One step of iterative refinement: y += Sigma^-1 (x - Sigma y).
        p_weight, p_bias = self._kronecker_product(xp, *self._grams(xp, storage), y_weight, y_bias)
        r_weight = weight - p_weight
        r_bias = None if bias is None or p_bias is None else bias - p_bias
        del p_weight, p_bias
        d_weight, d_bias = self._kronecker_product(xp, g_out, g_in, r_weight, r_bias)
        y_weight = add_into(y_weight, d_weight)
        if y_bias is not None and d_bias is not None:
            y_bias = add_into(y_bias, d_bias)
        return self._join(xp, y_weight, y_bias)

    def quadratic(self, xp: Any, storage: Storage, state: Array, x: list[Array]) -> Array:
        """x^T Sigma^-1 x per row, shape (B,): |S^-1 x|^2 (`whitened_quadratic`), a sum of
        squares, never sum(x * solve(x)) (which cancels in float32). O(d_out^3 + d_aug^3
        + B P (d_out + d_aug)); ``state`` from `prepare`."""
        return self.whitened_quadratic(xp, self.inverse_factors(xp, storage, state), x)

    # ------------------------------------------------------------ inverse, for KL pairs
    def inverse_factors(self, xp: Any, storage: Storage, state: Array) -> KroneckerInverse:
        """S_out^-1 (d_out x d_out) and S_in^-1 (d_aug x d_aug) for full ranks (two LU
        solves against the identity, O(d_out^3 + d_aug^3)); ``state`` from `prepare`.

        Shared by `inverse_diagonal_roots` and `whitened_quadratic`: with them, the
        P-sized work is float32 GEMMs (NumPy's ``solve`` runs in float64 with copies).
        """
        out_factor = storage["output_factor"]
        return KroneckerInverse(
            _linalg.solve(xp, out_factor, eye(xp, self.d_out, out_factor)),
            _linalg.solve(xp, state, eye(xp, self.d_aug, state)),
        )

    def inverse_diagonal_roots(self, xp: Any, inverse: KroneckerInverse) -> list[Array]:
        """sqrt(diag(Sigma^-1)) per name, each (n,), from `inverse_factors`. O(P + d^2).

        Sigma^-1 = sample_scale^-2 (C_out^-1 ⊗ C_in^-1) over W~, and (C^-1)_jj = |S^-1 e_j|^2
        (C^-1 = S^-T S^-1), so the entry of W~[o, i] is |S_out^-1 e_o| |S_in^-1 e_i| /
        sample_scale: weight (o, i < d_in) row-major, bias (o, d_in). Roots rather than
        squares, so a caller's (s * root)^2 never squares s alone (s^2 underflows in
        float32 at 1e-23).
        """
        # Column norms of S^-1: the square roots of diag(C^-1).
        out = xp.sqrt(xp.sum(inverse.output * inverse.output, axis=0)) / self.sample_scale
        inner = xp.sqrt(xp.sum(inverse.input * inverse.input, axis=0))
        blocks = {
            "weight": xp.reshape(
                xp.expand_dims(out, axis=1) * xp.expand_dims(inner[: self.d_in], axis=0), (-1,)
            ),
            "bias": out * inner[self.d_in] if self.has_bias else None,
        }
        return [blocks[name] for name in self.layout.names]

    def inverse_diagonal_blocks(self, xp: Any, storage: Storage, state: Array) -> list[Array]:
        """diag(Sigma^-1) per name, each (n,), for full ranks: sample_scale^-2
        kron(diag(C_out^-1), diag(C_in^-1)) over W~ (weight row-major, then the bias
        column). O(d_out^3 + d_aug^3 + P); ``state`` from `prepare`."""
        inverse = self.inverse_factors(xp, storage, state)
        return [root * root for root in self.inverse_diagonal_roots(xp, inverse)]

    def whitened_quadratic(self, xp: Any, inverse: KroneckerInverse, x: list[Array]) -> Array:
        """x^T Sigma^-1 x per row, shape (B,), as the sum of squares |S^-1 x|^2 (full ranks).

        S^-1 vec_r(X~) = vec_r(S_out^-1 X~ S_in^-T) / sample_scale with the inverses of
        `inverse_factors`: two batched GEMMs, O(B P (d_out + d_aug)), non-negative terms
        only; memory three (B, P) arrays (X~, then one product at a time).
        """
        x_aug = self._augment(xp, x)
        left = _linalg.matmul(xp, inverse.output, x_aug)  # S_out^-1 X~, (B, d_out, d_aug)
        del x_aug  # one (B, P) array fewer alive during the second product
        right = _linalg.matmul(xp, left, xp.matrix_transpose(inverse.input))  # ... S_in^-T
        del left
        return xp.sum(right * right, axis=(1, 2)) / (self.sample_scale**2)


class KroneckerGrams(NamedTuple):
    """`Kronecker.prepare_matmul`: the factor Grams (d x d arrays only)."""

    output: Array  #: sample_scale^2 S_out S_out^T, (d_out, d_out)
    input: Array  #: S_in S_in^T, (d_aug, d_aug), weight rows then the bias row


class KroneckerInverse(NamedTuple):
    """`Kronecker.inverse_factors`: the inverse square factors (d x d arrays only)."""

    output: Array  #: S_out^-1, (d_out, d_out)
    input: Array  #: S_in^-1, (d_aug, d_aug), weight rows then the bias row


@register_kl(Kronecker, Kronecker)
def _kl_kronecker_kronecker(
    xp: Any, q: Kronecker, q_storage: Storage, p: Kronecker, p_storage: Storage, difference: Array
) -> Array:
    """Two Kronecker structures: tr((C_out^p ⊗ C_in^p)^-1 (C_out^q ⊗ C_in^q)) =
    ||S_out^p^-1 S_out^q||_F^2 ||S_in^p^-1 S_in^q||_F^2 (mixed-product rule).

    O(d_out^3 + d_aug^3) for the factor solves; the Mahalanobis term is one solve with p.
    """
    p_state = p.prepare(xp, p_storage)
    factors = (
        (p_storage["output_factor"], q_storage["output_factor"]),
        (p_state, q.square_input_factor(xp, q_storage)),
    )
    ratios = [xp.sum(_linalg.solve(xp, s_p, s_q) ** 2) for s_p, s_q in factors]
    trace = ratios[0] * ratios[1] * (q.sample_scale / p.sample_scale) ** 2
    return kl_from_trace(xp, trace, q, q_storage, p, p_storage, p_state, difference)


@register_kl_singular(Kronecker, Kronecker)
def _kl_kronecker_singular(
    xp: Any,
    q: Kronecker,
    q_storage: Storage,
    p: Kronecker,
    p_storage: Storage,
    difference: Array,
    mean_size: Array,
) -> Array:
    """Two Kronecker structures singular by construction: KL on the common support.

    range(Sigma) = range(A_out) ⊗ range(A_in) (A_out = sample_scale S_out, A_in = S_in),
    so with the `Support` of each factor (QR + SVD of d x r matrices, O(d_out r_out^2 +
    d_aug r_in^2)) the supports coincide <=> rank_out^q rank_in^q = rank_out^p rank_in^p
    and, when that is not 0, both factor subspaces coincide (principal angles within
    max(d, r) eps (cond_q + cond_p) per factor) and the mean difference D~ (d_out x d_aug)
    has no part outside (|D~ - P_out D~ P_in|_F <= max(P, K) eps cond_out cond_in
    (|m_q| + |m_p|)); otherwise +inf. On the support, with sigma_i / tau_j the singular
    values of q's factors whitened by p's (T_out = diag(1 / s_out) U_out^T A_out^q), the
    whitened covariance is diag(sigma^2) ⊗ diag(tau^2) in a rotated basis (mixed-product
    rule), so

        2 KL = sum_ij ((sigma_i tau_j)^2 - 1 - 2 log(sigma_i tau_j))
               + |diag(1 / s_out) U_out^T D~ U_in diag(1 / s_in)|_F^2,

    every term >= 0 (0 for KL(q || q)). O(d_out^3 + d_aug^3 + P (d_out + d_aug)),
    memory O(P + d_out^2 + d_aug^2): never the Kronecker product.
    """

    def factors(k: Kronecker, storage: Storage) -> tuple[Array, Array]:
        out = storage["output_factor"] * k.sample_scale  # 0 for sample_scale 0: rank 0
        return out, k.square_input_factor(xp, storage)

    q_out, q_in = factors(q, q_storage)
    p_out, p_in = factors(p, p_storage)
    found = [support(xp, a) for a in (q_out, q_in, p_out, p_in)]
    fq_out, fq_in, fp_out, fp_in = found
    eps = float(xp.finfo(q_out.dtype).eps)
    rank_q, rank_p = fq_out.rank * fq_in.rank, fp_out.rank * fp_in.rank

    def angle_apart(fq: Any, fp: Any, size: int, columns: int) -> Array:
        tol = max(size, columns) * eps * (fq.cond + fp.cond)
        return off_support(xp, fp, fq.basis, fq.kept) > tol

    apart_factors = angle_apart(fq_out, fp_out, p.d_out, max(q.output_rank, p.output_rank))
    apart_factors = apart_factors | angle_apart(
        fq_in, fp_in, p.d_aug, max(q.input_rank, p.input_rank)
    )
    rows = split_flat(p, xp.reshape(difference, (1, difference.shape[0])))
    tilde = p._augment(xp, rows)[0, ...]  # D~, (d_out, d_aug)
    # P_out D~ P_in: D~ projected on both factor supports, then what is left.
    kept_out = fp_out.basis * xp.astype(fp_out.kept, tilde.dtype)
    kept_in = fp_in.basis * xp.astype(fp_in.kept, tilde.dtype)
    inner = xp.matmul(xp.matmul(xp.matrix_transpose(kept_out), tilde), kept_in)
    residual = tilde - xp.matmul(xp.matmul(kept_out, inner), xp.matrix_transpose(kept_in))
    tol = max(p.num_params, q.num_factor_columns, p.num_factor_columns) * eps
    mean_apart = xp.sqrt(xp.sum(residual * residual)) > (tol * fp_out.cond * fp_in.cond * mean_size)
    apart = (rank_q != rank_p) | ((rank_p > 0) & apart_factors) | mean_apart

    sigma = _linalg.svdvals(xp, whiten(xp, fp_out, q_out))
    tau = _linalg.svdvals(xp, whiten(xp, fp_in, q_in))
    # Excess of each product sigma_i tau_j over the first rank_out x rank_in pairs.
    index_out = xp.astype(xp.arange(sigma.shape[0], device=device_of(sigma)), sigma.dtype)
    index_in = xp.astype(xp.arange(tau.shape[0], device=device_of(tau)), tau.dtype)
    inside = xp.expand_dims(index_out < fp_out.rank, axis=1) & xp.expand_dims(
        index_in < fp_in.rank, axis=0
    )
    products = xp.reshape(xp.expand_dims(sigma, axis=1) * xp.expand_dims(tau, axis=0), (-1,))
    flat_inside = xp.reshape(inside, (-1,))
    excess = top_excess(
        xp,
        xp.where(flat_inside, products, xp.ones_like(products)),
        xp.asarray(float(products.shape[0]), dtype=products.dtype, device=device_of(products)),
    )
    # (diag(1 / s_in) U_in^T (diag(1 / s_out) U_out^T D~)^T)^T: both sides whitened.
    whitened = whiten(xp, fp_in, xp.matrix_transpose(whiten(xp, fp_out, tilde)))
    value = 0.5 * (excess + xp.sum(whitened * whitened))
    return finish(xp, value, apart)


def _kl_whitened(
    xp: Any,
    q: Structure,
    q_storage: Storage,
    p: Kronecker,
    p_storage: Storage,
    p_state: Array,
    inverse: KroneckerInverse,
    diagonal_trace: Array | None,
    columns: list[Array] | None,
    difference: Array,
) -> Array:
    """0.5 [diagonal_trace + sum_k |S_p^-1 c_k|^2 + |S_p^-1 d|^2 - P + log det Sigma_p
    - log det Sigma_q] for q's columns ``c_k`` (per-name (K, n) blocks, or None) and
    ``d`` = m_p - m_q, whitened in one `Kronecker.whitened_quadratic` call (d as the last row).
    """
    rows = split_flat(p, xp.reshape(difference, (1, difference.shape[0])))
    if columns is not None:
        rows = [xp.concat([c, row], axis=0) for c, row in zip(columns, rows, strict=True)]
    quadratic = p.whitened_quadratic(xp, inverse, rows)  # (K + 1,)
    trace = xp.sum(quadratic[:-1]) if columns is not None else xp.zeros_like(quadratic[0])
    if diagonal_trace is not None:
        trace = trace + diagonal_trace
    return 0.5 * (
        trace
        + quadratic[-1]
        - q.num_params
        + p.logdet(xp, p_storage, p_state)
        - logdet_of(xp, q, q_storage)
    )


def _weighted_inverse_trace(
    xp: Any, p: Kronecker, inverse: KroneckerInverse, scales: list[Array]
) -> Array:
    """sum_i s_i^2 (Sigma_p^-1)_ii = sum((s * sqrt(diag(Sigma_p^-1)))^2), never s^2 alone."""
    roots = p.inverse_diagonal_roots(xp, inverse)
    return total(xp.sum((s * root) ** 2) for s, root in zip(scales, roots, strict=True))


@register_kl(Diagonal, Kronecker)
def _kl_diagonal_kronecker(
    xp: Any, q: Diagonal, q_storage: Storage, p: Kronecker, p_storage: Storage, difference: Array
) -> Array:
    """A diagonal q = diag(s^2) against a full-rank Kronecker p, never P x P.

    tr(Sigma_p^-1 diag(s^2)) = sum_i (s_i r_i)^2 with r = sqrt(diag(Sigma_p^-1)) =
    kron(|S_out^-1 e_o|, |S_in^-1 e_i|) / sample_scale over W~ (weight, then the bias
    column; `Kronecker.inverse_diagonal_roots`); d^T Sigma_p^-1 d = |S_p^-1 d|^2
    (`Kronecker.whitened_quadratic`); log det Sigma_q = 2 sum log|s|.
    Cost O(d_out^3 + d_aug^3 + P (d_out + d_aug)); memory the two d x d inverses and
    O(P) vectors.

    Edges: ``+inf`` where some s = 0 (log det Sigma_q = -inf). A p singular by its
    values (a singular factor) is not detected (as for every Kronecker p).
    """
    p_state = p.prepare(xp, p_storage)
    inverse = p.inverse_factors(xp, p_storage, p_state)
    diagonal_trace = _weighted_inverse_trace(xp, p, inverse, q._s(xp, q_storage))
    return _kl_whitened(
        xp, q, q_storage, p, p_storage, p_state, inverse, diagonal_trace, None, difference
    )


@register_kl(LowRankPlusDiagonal, Kronecker)
def _kl_lrpd_kronecker(
    xp: Any,
    q: LowRankPlusDiagonal,
    q_storage: Storage,
    p: Kronecker,
    p_storage: Storage,
    difference: Array,
) -> Array:
    """Low rank plus diagonal q = U U^T + diag(d^2) against a full-rank Kronecker p.

    tr(Sigma_p^-1 Sigma_q) = sum_i (d_i r_i)^2 + sum_k |S_p^-1 u_k|^2, with
    r = sqrt(diag(Sigma_p^-1)) (`Kronecker.inverse_diagonal_roots`) and the rank
    columns u_k of U whitened together with the mean difference in one
    `Kronecker.whitened_quadratic` (sums of squares, no cancellation in the trace);
    log det Sigma_q by the determinant lemma. Cost O(d_out^3 + d_aug^3 + P r^2 + r^3
    + (r + 1) P (d_out + d_aug)); memory a few (r + 1) x P arrays (q's storage is P (r + 1)).

    Edges: those of `LowRankPlusDiagonal.logdet` for q (``+inf`` when certainly
    singular, NaN where 1..rank entries of d are 0); a p singular by its values is
    not detected.
    """
    p_state = p.prepare(xp, p_storage)
    inverse = p.inverse_factors(xp, p_storage, p_state)
    scales = [q._d(xp, q_storage, scale, size) for _, scale, _, size in q._names]
    diagonal_trace = _weighted_inverse_trace(xp, p, inverse, scales)
    columns = [xp.matrix_transpose(q._u(xp, q_storage, f, size)) for f, _, _, size in q._names]
    return _kl_whitened(
        xp, q, q_storage, p, p_storage, p_state, inverse, diagonal_trace, columns, difference
    )


@register_kl(Factorized, Kronecker)
def _kl_factorized_kronecker(
    xp: Any, q: Factorized, q_storage: Storage, p: Kronecker, p_storage: Storage, difference: Array
) -> Array:
    """A dense factor q = S_q S_q^T (any rank K) against a full-rank Kronecker p.

    tr(Sigma_p^-1 S_q S_q^T) = sum_k |S_p^-1 s_k|^2 over the K columns of S_q (read
    from q's storage, transposed views), whitened with the mean difference in one
    `Kronecker.whitened_quadratic` (sums of squares; two batched GEMMs with the inverse
    factors). Cost O(d_out^3 + d_aug^3 + K P (d_out + d_aug)); memory a few (K + 1) x P
    arrays: the size of q's own storage (P x K), never more.

    Edges: ``+inf`` for K < P or a singular S_q (log det Sigma_q = -inf).
    """
    p_state = p.prepare(xp, p_storage)
    columns = [
        xp.matrix_transpose(q._factor_2d(xp, q_storage, path, size)) for path, size in q._factors
    ]
    inverse = p.inverse_factors(xp, p_storage, p_state)
    return _kl_whitened(xp, q, q_storage, p, p_storage, p_state, inverse, None, columns, difference)


@register_covariance
class KroneckerCovariance(FactorizedCovariance):
    r"""Kronecker covariance of a layer: Cov(W~[o, i], W~[o', i']) = C_out[o, o'] C_in[i, i'].

    For a weight W of shape ``(d_out, *in_shape)`` and an optional bias b of shape
    ``(d_out,)``, W~ = [W.reshape(d_out, d_in) | b] is the augmented
    (d_out, d_in + 1) matrix (the bias is one extra input column). With
    C_out = S_out S_out^T and C_in = S_in S_in^T,

        Sigma = sample_scale^2 * (C_out ⊗ C_in)      (row-major order of W~),
        S     = sample_scale   * (S_out ⊗ S_in),
        S vec_r(Z) = sample_scale * vec_r(S_out Z S_in^T),   Z of shape (r_out, r_in).

    In the flat parameter order (weight row-major, then bias, or as inserted),
    Sigma_W = C_out ⊗ C_in[:d_in, :d_in] and Cov(W[o, i], b[o']) = C_out[o, o'] C_in[i, d_in].

    Stored: ``input_factor["weight"]`` of shape ``(*in_shape, input_rank)``,
    ``input_factor["bias"]`` of shape ``(1, input_rank)`` (the last row of S_in),
    ``output_factor`` of shape ``(d_out, output_rank)``. K = input_rank * output_rank.

    Parameters
    ----------
    input_rank, output_rank
        Columns of S_in and S_out; ``None`` means full (d_in + has_bias, d_out);
        larger values are clamped.

    Notes
    -----
    Costs (B vectors): ``factor_matmul`` two batched GEMMs,
    O(B (d_out r_out r_in + d_out r_in d_in)) in the cheaper association order;
    ``matmul`` = S (S^T x), the same order of cost, or, where the static shapes say
    it is cheaper (high ranks, several vectors), vec(C_out X~ C_in) with the small
    C = S S^T formed once per call: O(d_out^2 r_out + d_aug^2 r_in + B P (d_out + d_aug)).
    No Kronecker product is ever formed. ``diagonal`` = diag(C_out) ⊗ diag(C_in) and
    ``trace`` = tr(C_out) tr(C_in) (mixed-product rule), O(d_out r_out + d_in r_in).
    With square full-rank factors (input_rank = d_in + has_bias, output_rank = d_out):
    ``logdet = 2 (d_aug log|det S_out| + d_out log|det S_in|) + P log sample_scale^2``
    (d_aug = d_in + has_bias); ``solve`` = vec(C_out^-1 X~ C_in^-1) with
    C^-1 = S^-T S^-1 from one LU of each square factor (S, never S S^T, is factorised),
    then GEMMs and one step of iterative refinement,
    O(d_out^3 + d_aug^3 + B P (d_out + d_aug)); ``log_prob``'s quadratic form is
    |S^-1 x|^2, a sum of squares. Lower ranks are singular: ``logdet`` is ``-inf``
    and ``solve`` raises.

    ``reset_parameters`` draws the input factors with std ``scale / sqrt(input_rank)``
    and the output factor with std ``1 / sqrt(output_rank)``; ``lr_scaling`` is
    ``1 / input_rank`` for ``input_factor.<name>`` and ``1 / output_rank`` for
    ``output_factor``.

    Attributes
    ----------
    sample_scale
        A float >= 0 (default 1.0) multiplying the sampling factor S; Sigma scales
        with its square. Static (not a learned array); validated when set.
    """

    _structure_type: ClassVar[type[Structure]] = Kronecker
    _arguments: ClassVar[tuple[str, ...]] = ("input_rank", "output_rank")
    _settings: ClassVar[tuple[str, ...]] = ("sample_scale",)

    def __init__(self, input_rank: int | None = None, output_rank: int | None = None) -> None:
        FactorizedCovariance.__init__(self, rank=None)
        self._requested_input_rank = check_rank(input_rank, "input_rank", optional=True)
        self._requested_output_rank = check_rank(output_rank, "output_rank", optional=True)
        self._requested_sample_scale = 1.0

    @property
    def sample_scale(self) -> float:
        """The float multiplying S (Sigma scales with its square); validated when set."""
        return float(self._requested_sample_scale)

    @sample_scale.setter
    def sample_scale(self, value: float) -> None:
        scale = check_sample_scale(value)
        structure = self._structure
        if structure is not None:
            assert isinstance(structure, Kronecker)
            self._set_structure(
                Kronecker(structure.layout, structure.input_rank, structure.output_rank, scale)
            )
        object.__setattr__(self, "_requested_sample_scale", scale)

    def _kronecker(self) -> Kronecker | None:
        structure = self._structure
        assert structure is None or isinstance(structure, Kronecker)
        return structure

    @property
    def input_rank(self) -> int | None:
        """Columns of S_in (clamped to d_in + has_bias after initialization)."""
        structure = self._kronecker()
        return self._requested_input_rank if structure is None else structure.input_rank

    @property
    def output_rank(self) -> int | None:
        """Columns of S_out (clamped to d_out after initialization)."""
        structure = self._kronecker()
        return self._requested_output_rank if structure is None else structure.output_rank

    @property
    def rank(self) -> int | None:
        """K = input_rank * output_rank (``None`` before initialization)."""
        structure = self._kronecker()
        return None if structure is None else structure.rank
