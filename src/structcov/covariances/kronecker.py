"""Kronecker-factored covariance of a layer's weight (and bias), K-FAC convention."""

from __future__ import annotations

import math
from typing import Any

from .. import _linalg
from .._array_api import Array, Layout, namespace
from ._base import Slot, check_rank
from .factorized import FactorizedCovariance, _row_norms

__all__ = ["KroneckerCovariance"]


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
    ``matmul`` = S (S^T x), the same order of cost. No Kronecker product is ever
    formed. ``diagonal`` = diag(C_out) ⊗ diag(C_in) and
    ``trace`` = tr(C_out) tr(C_in) (mixed-product rule), O(d_out r_out + d_in r_in).
    With square full-rank factors (input_rank = d_in + has_bias, output_rank = d_out):
    ``logdet = 2 (d_aug log|det S_out| + d_out log|det S_in|) + P log sample_scale^2``
    (d_aug = d_in + has_bias) and ``solve`` = vec(C_out^-1 X~ C_in^-1), four LU
    solves with the factors, O(d_out^3 + d_aug^3 + B P (d_out + d_aug)).
    Lower ranks are singular: ``logdet`` is ``-inf`` and ``solve`` raises.

    ``reset_parameters`` draws the input factors with std ``scale / sqrt(input_rank)``
    and the output factor with std ``1 / sqrt(output_rank)``; ``lr_scaling`` is
    ``1 / input_rank`` for ``input_factor.<name>`` and ``1 / output_rank`` for
    ``output_factor``.

    Attributes
    ----------
    sample_scale
        A float (default 1.0) multiplying the sampling factor S; Sigma scales
        with its square. Static (not a learned array).
    """

    _dict_attributes = ("input_factor",)
    _array_attributes = ("output_factor",)
    input_factor: dict[str, Array]
    output_factor: Array

    def __init__(self, input_rank: int | None = None, output_rank: int | None = None) -> None:
        super().__init__(rank=None)
        self._requested_input_rank = check_rank(input_rank, "input_rank", optional=True)
        self._requested_output_rank = check_rank(output_rank, "output_rank", optional=True)
        self._input_rank: int | None = None
        self._output_rank: int | None = None
        self.sample_scale: float = 1.0

    @property
    def input_rank(self) -> int | None:
        """Columns of S_in (clamped to d_in + has_bias after initialization)."""
        return self._input_rank if self._input_rank is not None else self._requested_input_rank

    @property
    def output_rank(self) -> int | None:
        """Columns of S_out (clamped to d_out after initialization)."""
        return self._output_rank if self._output_rank is not None else self._requested_output_rank

    @property
    def rank(self) -> int | None:
        """K = input_rank * output_rank (``None`` before initialization)."""
        if self._input_rank is None or self._output_rank is None:
            return None
        return self._input_rank * self._output_rank

    def _setup(self, layout: Layout) -> None:
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
        self._has_bias = "bias" in layout.names
        if self._has_bias and layout.shape_of("bias") != (d_out,):
            raise ValueError(
                f"KroneckerCovariance needs `bias` of shape ({d_out},) (d_out), got "
                f"{layout.shape_of('bias')}"
            )
        self._d_out = d_out
        self._d_in = math.prod(weight_shape[1:])
        d_in_augmented = self._d_in + int(self._has_bias)
        requested_in, requested_out = self._requested_input_rank, self._requested_output_rank
        self._input_rank = (
            d_in_augmented if requested_in is None else min(requested_in, d_in_augmented)
        )
        self._output_rank = d_out if requested_out is None else min(requested_out, d_out)
        self._rank = self._input_rank * self._output_rank

    def _slots(self) -> tuple[Slot, ...]:
        layout = self.layout
        r_in, r_out = self._input_rank, self._output_rank
        assert r_in is not None and r_out is not None
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
                (self._d_out, r_out),
                1.0 / r_out,
                1.0 / math.sqrt(r_out),
                None,
            )
        )
        return tuple(slots)

    def _blocks(self, xp: Any, z: Array) -> list[Array]:
        r_in, r_out = self._input_rank, self._output_rank
        assert r_in is not None and r_out is not None
        d_out, d_in = self._d_out, self._d_in
        batch = z.shape[0]
        s_out = self.output_factor
        if self.sample_scale != 1.0:
            s_out = s_out * self.sample_scale
        s_in = {
            "weight": xp.reshape(self.input_factor["weight"], (d_in, r_in)),
            "bias": self.input_factor.get("bias"),
        }
        zz = xp.reshape(z, (batch, r_out, r_in))
        d_aug = d_in + int(self._has_bias)
        # Associate S_out Z S_in^T the cheaper way (static shapes decide).
        left_first = d_out * r_out * r_in + d_out * r_in * d_aug
        right_first = r_out * r_in * d_aug + d_out * r_out * d_aug
        blocks = {}
        if left_first <= right_first:
            t = xp.matmul(s_out, zz)  # (B, d_out, r_in)
            for name in self.layout.names:
                blocks[name] = xp.matmul(t, xp.matrix_transpose(s_in[name]))
        else:
            for name in self.layout.names:
                u = xp.matmul(zz, xp.matrix_transpose(s_in[name]))  # (B, r_out, d_name)
                blocks[name] = xp.matmul(s_out, u)
        # weight: (B, d_out, d_in) row-major = vec_r; bias: (B, d_out, 1).
        return [
            xp.reshape(blocks[name], (batch, d_out * (d_in if name == "weight" else 1)))
            for name in self.layout.names
        ]

    # ------------------------------------------------------------ algebra
    @property
    def is_singular(self) -> bool:
        """True when a factor is low rank (input_rank < d_in + has_bias or output_rank < d_out)."""
        self.layout  # noqa: B018 -- raises the "not initialized" error
        d_aug = self._d_in + int(self._has_bias)
        assert self._input_rank is not None and self._output_rank is not None
        return self._input_rank < d_aug or self._output_rank < self._d_out or not self.sample_scale

    _singular_advice = (
        "use full Kronecker ranks (input_rank=None, output_rank=None) or "
        "LowRankPlusDiagonalCovariance"
    )

    def _input_weight(self, xp: Any) -> Array:
        return xp.reshape(self.input_factor["weight"], (self._d_in, self._input_rank))

    def _square_input_factor(self, xp: Any) -> Array:
        """S_in of shape (d_aug, r_in): weight rows, then the bias row (augmented order)."""
        weight = self._input_weight(xp)
        return xp.concat([weight, self.input_factor["bias"]], axis=0) if self._has_bias else weight

    def _split_augmented(self, xp: Any, x: list[Array]) -> tuple[Array, Array | None]:
        """Per-name blocks -> weight (B, d_out, d_in) and bias (B, d_out) or None."""
        blocks = dict(zip(self.layout.names, x, strict=True))
        weight = xp.reshape(blocks["weight"], (blocks["weight"].shape[0], self._d_out, self._d_in))
        return weight, blocks.get("bias")

    def _rblocks(self, xp: Any, x: list[Array]) -> Array:
        # S^T x = vec_r(S_out^T X~ S_in) with X~ = [X_W | x_b]; X~ is never concatenated.
        weight, bias = self._split_augmented(xp, x)
        t = xp.matmul(weight, self._input_weight(xp))  # (B, d_out, r_in)
        if bias is not None:
            t = t + xp.expand_dims(bias, axis=-1) * self.input_factor["bias"]
        v = _linalg.matmul(xp, xp.matrix_transpose(self.output_factor), t)  # (B, r_out, r_in)
        if self.sample_scale != 1.0:
            v = v * self.sample_scale
        return xp.reshape(v, (v.shape[0], self.num_factor_columns))

    def _diagonal_factors(self, xp: Any) -> tuple[Array, Array, Array | None]:
        """diag(C_out) * sample_scale^2, diag(C_in) weight rows, and the bias row's entry."""
        out = _row_norms(xp, self.output_factor) * (self.sample_scale**2)
        weight = _row_norms(xp, self._input_weight(xp))
        bias = xp.sum(self.input_factor["bias"] ** 2) if self._has_bias else None
        return out, weight, bias

    def _diagonal_blocks(self, xp: Any) -> list[Array]:
        out, weight, bias = self._diagonal_factors(xp)
        blocks = {
            "weight": xp.reshape(
                xp.expand_dims(out, axis=1) * xp.expand_dims(weight, axis=0), (-1,)
            ),
            "bias": None if bias is None else out * bias,
        }
        return [blocks[name] for name in self.layout.names]

    def trace(self) -> Array:
        """tr Sigma = tr(C_out) tr(C_in) (mixed-product rule), a 0-D array. O(factor sizes)."""
        xp = namespace(self._reference_array())
        out, weight, bias = self._diagonal_factors(xp)
        trace_in = xp.sum(weight) if bias is None else xp.sum(weight) + bias
        return xp.sum(out) * trace_in

    def _logdet(self, xp: Any) -> Array:
        # det(A ⊗ B) = det(A)^m det(B)^n (A n x n, B m x m); log det(S S^T) = 2 log|det S|.
        d_aug, d_out = self._d_in + int(self._has_bias), self._d_out
        log_out = _linalg.logabsdet(xp, self.output_factor)
        log_in = _linalg.logabsdet(xp, self._square_input_factor(xp))
        scale_term = self.num_params * math.log(self.sample_scale**2)
        return 2.0 * (d_aug * log_out + d_out * log_in) + scale_term

    def _solve_blocks(self, xp: Any, x: list[Array]) -> list[Array]:
        # (C_out ⊗ C_in)^-1 vec_r(X~) = vec_r(C_out^-1 X~ C_in^-1), C^-1 = S^-T S^-1.
        weight, bias = self._split_augmented(xp, x)
        batch, d_out, d_in = weight.shape[0], self._d_out, self._d_in
        x_aug = (
            weight if bias is None else xp.concat([weight, xp.expand_dims(bias, axis=-1)], axis=2)
        )
        d_aug = x_aug.shape[2]

        def inverse_gram(factor: Array, rhs: Array) -> Array:
            inner = _linalg.solve(xp, factor, rhs)
            return _linalg.solve(xp, xp.matrix_transpose(factor), inner)

        # The batch goes into the right-hand side's columns: one LU per factor, not one per vector.
        left = xp.reshape(xp.permute_dims(x_aug, (1, 0, 2)), (d_out, batch * d_aug))
        left = xp.reshape(inverse_gram(self.output_factor, left), (d_out, batch, d_aug))
        right = xp.reshape(xp.permute_dims(left, (2, 1, 0)), (d_aug, batch * d_out))
        right = inverse_gram(self._square_input_factor(xp), right)
        y = xp.permute_dims(
            xp.reshape(right, (d_aug, batch, d_out)), (1, 2, 0)
        )  # (B, d_out, d_aug)
        y = y / (self.sample_scale**2)
        blocks = {
            "weight": xp.reshape(y[:, :, :d_in], (batch, d_out * d_in)),
            "bias": y[:, :, d_in] if bias is not None else None,
        }
        return [blocks[name] for name in self.layout.names]
