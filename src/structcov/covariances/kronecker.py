"""Kronecker-factored covariance of a layer's weight (and bias), K-FAC convention."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, final

from .. import _linalg
from .._array_api import Array
from .._layout import Layout
from ._base import register_covariance
from ._kl import kl_from_trace, register_kl
from ._structure import Slot, Storage, Structure, check_rank, row_norms
from .factorized import FactorizedCovariance

__all__ = ["Kronecker", "KroneckerCovariance", "check_sample_scale"]


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
        r_in, r_out, d_out, d_in = self.input_rank, self.output_rank, self.d_out, self.d_in
        batch = z.shape[0]
        s_out = storage["output_factor"]
        if self.sample_scale != 1.0:
            s_out = s_out * self.sample_scale
        s_in = {
            "weight": self._input_weight(xp, storage),
            "bias": storage.get("input_factor.bias"),
        }
        zz = xp.reshape(z, (batch, r_out, r_in))
        # Associate S_out Z S_in^T the cheaper way (static shapes decide).
        left_first = d_out * r_out * r_in + d_out * r_in * self.d_aug
        right_first = r_out * r_in * self.d_aug + d_out * r_out * self.d_aug
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

    def matmul_blocks(self, xp: Any, storage: Storage, x: list[Array]) -> list[Array]:
        return self.blocks(xp, storage, self.rblocks(xp, storage, x))

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
        """tr Sigma = tr(C_out) tr(C_in) (mixed-product rule). O(factor sizes)."""
        out, weight, bias = self._diagonal_factors(xp, storage)
        trace_in = xp.sum(weight) if bias is None else xp.sum(weight) + bias
        return xp.sum(out) * trace_in

    # ------------------------------------------------------------ full rank
    def prepare(self, xp: Any, storage: Storage) -> Array:
        """The square S_in (d_aug x d_aug), stacked once."""
        return self.square_input_factor(xp, storage)

    def logdet(self, xp: Any, storage: Storage, state: Array) -> Array:
        # det(A ⊗ B) = det(A)^m det(B)^n (A n x n, B m x m); log det(S S^T) = 2 log|det S|.
        log_out = _linalg.logabsdet(xp, storage["output_factor"])
        log_in = _linalg.logabsdet(xp, state)
        scale_term = self.num_params * math.log(self.sample_scale**2)
        return 2.0 * (self.d_aug * log_out + self.d_out * log_in) + scale_term

    def solve_blocks(self, xp: Any, storage: Storage, state: Array, x: list[Array]) -> list[Array]:
        # (C_out ⊗ C_in)^-1 vec_r(X~) = vec_r(C_out^-1 X~ C_in^-1), C^-1 = S^-T S^-1.
        weight, bias = self._split_augmented(xp, x)
        batch, d_out, d_in = weight.shape[0], self.d_out, self.d_in
        x_aug = (
            weight if bias is None else xp.concat([weight, xp.expand_dims(bias, axis=-1)], axis=2)
        )
        d_aug = x_aug.shape[2]

        def inverse_gram(factor: Array, rhs: Array) -> Array:
            inner = _linalg.solve(xp, factor, rhs)
            return _linalg.solve(xp, xp.matrix_transpose(factor), inner)

        # The batch goes into the right-hand side's columns: one LU per factor, not one per vector.
        left = xp.reshape(xp.permute_dims(x_aug, (1, 0, 2)), (d_out, batch * d_aug))
        left = xp.reshape(inverse_gram(storage["output_factor"], left), (d_out, batch, d_aug))
        right = xp.reshape(xp.permute_dims(left, (2, 1, 0)), (d_aug, batch * d_out))
        right = inverse_gram(state, right)
        y = xp.permute_dims(
            xp.reshape(right, (d_aug, batch, d_out)), (1, 2, 0)
        )  # (B, d_out, d_aug)
        y = y / (self.sample_scale**2)
        blocks = {
            "weight": xp.reshape(y[:, :, :d_in], (batch, d_out * d_in)),
            "bias": y[:, :, d_in] if bias is not None else None,
        }
        return [blocks[name] for name in self.layout.names]


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
