"""The dense float64 oracle: S (P x K) and Sigma (P x P) rebuilt from a covariance's storage.

Written from the maths in DESIGN.md §1, independently of structcov's own reshape and
block logic: the layout (names, shapes, flat offsets) is derived here from the mean
arrays, the stored arrays are read as float64 NumPy, and every flat index is mapped to
its meaning explicitly.

- Factorized / low-rank: row p of S is ``factor[name][idx, :]`` where ``(name, idx)`` is
  flat index p (names in insertion order, ``idx`` in row-major order of the mean).
- Diagonal: S = diag(s) with s[p] = ``scale[name][idx]``; Sigma = diag(s^2).
- Low rank plus diagonal: S = [U, diag(d)] (U read as for factorized, d as for
  diagonal); Sigma = U U^T + diag(d^2).
- Kronecker: flat index p of ``weight[o, *j]`` sits at (o, i) of the augmented matrix
  W~ = [W.reshape(d_out, d_in) | b] with i the row-major rank of ``j`` in ``in_shape``;
  ``bias[o]`` sits at (o, d_in). Then
  Sigma[p, q] = sample_scale^2 * C_out[o_p, o_q] * C_in[i_p, i_q] and, for column
  k = a * r_in + c (z reshaped row-major to (r_out, r_in)),
  S[p, k] = sample_scale * S_out[o_p, a] * S_in[i_p, c].
  Sigma is filled from C_out and C_in directly, never from S, so the two cross-check.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

import structcov as sc

__all__ = ["Dense", "dense_oracle", "flat_layout", "join", "split", "standard_deviations"]


@dataclass(frozen=True)
class FlatLayout:
    """Names (insertion order, ``None`` entries dropped), shapes and flat slots."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def slots(self) -> dict[str, slice]:
        out, start = {}, 0
        for name, size in zip(self.names, self.sizes, strict=True):
            out[name] = slice(start, start + size)
            start += size
        return out

    @property
    def num_params(self) -> int:
        return sum(self.sizes)


def flat_layout(mean: Any) -> FlatLayout:
    """The layout of ``mean``: a mapping name -> array/shape/None, or one bare array."""
    if not isinstance(mean, Mapping):
        mean = {"mean": mean}
    names, shapes = [], []
    for name, value in mean.items():
        if value is None:
            continue
        shape = value if isinstance(value, tuple) else tuple(int(d) for d in value.shape)
        names.append(name)
        shapes.append(shape)
    return FlatLayout(tuple(names), tuple(shapes))


def _row_major_indices(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """All multi-indices of ``shape`` in row-major (last index fastest) order."""
    return list(itertools.product(*(range(d) for d in shape)))


def split(flat: np.ndarray, layout: FlatLayout, batch: tuple[int, ...] = ()) -> dict:
    """Split a (*batch, P) float64 array into name -> (*batch, *shape), element by element."""
    out = {}
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        start = layout.slots[name].start
        block = np.empty((*batch, *shape))
        for b in _row_major_indices(batch):
            for offset, idx in enumerate(_row_major_indices(shape)):
                block[(*b, *idx)] = flat[(*b, start + offset)]
        out[name] = block
    return out


def join(parts: Mapping[str, np.ndarray], layout: FlatLayout) -> np.ndarray:
    """Concatenate name -> array (shaped like the mean) into the flat (P,) vector."""
    flat = np.empty(layout.num_params)
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        start = layout.slots[name].start
        for offset, idx in enumerate(_row_major_indices(shape)):
            flat[start + offset] = parts[name][idx]
    return flat


@dataclass(frozen=True)
class Dense:
    """Dense float64 oracle of one initialized covariance."""

    layout: FlatLayout
    S: np.ndarray  # (P, K)
    Sigma: np.ndarray  # (P, P)

    @property
    def K(self) -> int:
        return self.S.shape[1]

    @property
    def P(self) -> int:
        return self.S.shape[0]


def _flat_entries(layout: FlatLayout) -> list[tuple[str, tuple[int, ...]]]:
    """Flat index p -> (name, multi-index), in insertion then row-major order."""
    return [
        (name, idx)
        for name, shape in zip(layout.names, layout.shapes, strict=True)
        for idx in _row_major_indices(shape)
    ]


def _factorized(cov: Any, layout: FlatLayout, to_numpy: Any) -> np.ndarray:
    factors = {name: to_numpy(cov.factor[name]) for name in layout.names}
    rank = factors[layout.names[0]].shape[-1]
    rows = []
    for name, idx in _flat_entries(layout):
        block = factors[name]
        assert block.shape == (*layout.shapes[layout.names.index(name)], rank), block.shape
        rows.append(block[idx])  # the trailing rank axis: row p of S
    return np.stack(rows).reshape(layout.num_params, rank)


def standard_deviations(raw: np.ndarray, transform: str) -> np.ndarray:
    """The standard deviations of stored scales ``raw`` (float64) under ``transform``:
    softplus log(1 + e^rho), exp e^rho, identity rho (written here, not imported)."""
    raw = np.asarray(raw, dtype=np.float64)
    if transform == "softplus":
        return np.logaddexp(raw, 0.0)
    if transform == "exp":
        return np.exp(raw)
    assert transform == "identity", transform
    return raw


def _diagonal(cov: Any, layout: FlatLayout, to_numpy: Any) -> np.ndarray:
    transform = cov.structure.scale_transform
    scales = {name: to_numpy(cov.scale[name]) for name in layout.names}
    s = np.array([scales[name][idx] for name, idx in _flat_entries(layout)])
    return np.diag(standard_deviations(s, transform))


def kronecker_positions(layout: FlatLayout) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Flat index p -> (o_p, i_p) in W~ = [W.reshape(d_out, d_in) | b]; also d_out, d_in."""
    weight_shape = layout.shapes[layout.names.index("weight")]
    d_out, in_shape = weight_shape[0], weight_shape[1:]
    in_index = {j: i for i, j in enumerate(_row_major_indices(in_shape))}
    d_in = len(in_index)
    o_idx, i_idx = [], []
    for name, idx in _flat_entries(layout):
        if name == "weight":
            o_idx.append(idx[0])
            i_idx.append(in_index[idx[1:]])
        elif name == "bias":
            o_idx.append(idx[0])
            i_idx.append(d_in)
        else:
            raise AssertionError(f"Kronecker layouts hold only weight and bias, got {name!r}")
    return np.array(o_idx), np.array(i_idx), d_out, d_in


def kronecker_factors(cov: Any, layout: FlatLayout, to_numpy: Any) -> tuple[np.ndarray, np.ndarray]:
    """(S_out, S_in) as float64: S_in has d_in (+1 bias) rows, weight rows row-major."""
    weight_shape = layout.shapes[layout.names.index("weight")]
    in_shape = weight_shape[1:]
    s_out = to_numpy(cov.output_factor)
    w_in = to_numpy(cov.input_factor["weight"])
    r_in = w_in.shape[-1]
    assert w_in.shape == (*in_shape, r_in), w_in.shape
    rows = [w_in[j] for j in _row_major_indices(in_shape)]
    if "bias" in layout.names:
        b_in = to_numpy(cov.input_factor["bias"])
        assert b_in.shape == (1, r_in), b_in.shape
        rows.append(b_in[0])
    s_in = np.stack(rows).reshape(len(rows), r_in)
    return s_out, s_in


def _kronecker(cov: Any, layout: FlatLayout, to_numpy: Any) -> tuple[np.ndarray, np.ndarray]:
    o_idx, i_idx, d_out, _ = kronecker_positions(layout)
    s_out, s_in = kronecker_factors(cov, layout, to_numpy)
    assert s_out.shape[0] == d_out, s_out.shape
    r_out, r_in = s_out.shape[1], s_in.shape[1]
    scale = float(cov.sample_scale)
    k = np.arange(r_out * r_in)
    a, c = k // r_in, k % r_in  # z reshaped row-major to (r_out, r_in)
    S = scale * s_out[o_idx][:, a] * s_in[i_idx][:, c]
    c_out, c_in = s_out @ s_out.T, s_in @ s_in.T
    Sigma = scale**2 * c_out[np.ix_(o_idx, o_idx)] * c_in[np.ix_(i_idx, i_idx)]
    return S, Sigma


def dense_oracle(cov: Any, mean: Any, to_numpy: Any) -> Dense:
    """S and Sigma in float64 from ``cov``'s storage, for the means ``mean``.

    ``to_numpy`` is ``backend.to_numpy``; ``mean`` is the mapping (or bare array)
    the covariance was initialized with (arrays or shapes).
    """
    layout = flat_layout(mean)
    # Exact types: a new subclass (with storage of its own) needs its own oracle.
    kind = type(cov)
    if kind is sc.KroneckerCovariance:
        S, Sigma = _kronecker(cov, layout, to_numpy)
        return Dense(layout, S, Sigma)
    if kind is sc.DiagonalCovariance:
        S = _diagonal(cov, layout, to_numpy)
        return Dense(layout, S, np.diag(np.diag(S) ** 2))
    if kind in (sc.FactorizedCovariance, sc.LowRankCovariance):
        S = _factorized(cov, layout, to_numpy)
        return Dense(layout, S, S @ S.T)
    if kind is sc.LowRankPlusDiagonalCovariance:
        # S = [U, diag(d)]: the low-rank columns first; Sigma = U U^T + diag(d^2).
        U, D = _factorized(cov, layout, to_numpy), _diagonal(cov, layout, to_numpy)
        return Dense(layout, np.concatenate([U, D], axis=1), U @ U.T + np.diag(np.diag(D) ** 2))
    raise TypeError(f"no oracle for {kind.__name__}")
