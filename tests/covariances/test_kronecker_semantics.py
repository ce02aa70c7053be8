"""The element-wise Kronecker statement of DESIGN.md §1, against hand-made factors.

For W~ = [W.reshape(d_out, d_in) | b]:  Cov(W~[o, i], W~[o', i']) = C_out[o, o'] C_in[i, i'],
scaled by sample_scale^2. The reference here is built with explicit Python loops from
small integer factors written into the storage by hand, so every expected entry is
exact and a transposed or mis-reshaped Kronecker product shows up entry by entry.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest

import structcov as sc
from conftest import Backend, tolerance


def _ints(rows: int, cols: int, seed: int) -> np.ndarray:
    """A deterministic small-integer matrix (exact in float32 products and sums)."""
    return np.random.default_rng(seed).integers(-3, 4, size=(rows, cols)).astype(np.float64)


@dataclass(frozen=True)
class Layer:
    id: str
    spec: dict[str, tuple[int, ...] | None]  # insertion order matters
    input_rank: int | None
    output_rank: int | None
    s_out: np.ndarray  # (d_out, r_out) after clamping
    s_in: np.ndarray  # (d_in + has_bias, r_in) after clamping; bias row last
    sample_scale: float = 1.0

    @property
    def weight_shape(self) -> tuple[int, ...]:
        shape = self.spec["weight"]
        assert shape is not None
        return shape

    @property
    def d_out(self) -> int:
        return self.weight_shape[0]

    @property
    def d_in(self) -> int:
        return math.prod(self.weight_shape[1:])

    @property
    def has_bias(self) -> bool:
        return self.spec.get("bias") is not None


LAYERS = [
    Layer(
        "dense+bias-handmade",
        {"weight": (2, 3), "bias": (2,)},
        None,
        None,
        np.array([[1.0, 2.0], [0.0, 3.0]]),
        np.array(
            [
                [1.0, 0.0, 0.0, 0.0],
                [2.0, 1.0, 0.0, 0.0],
                [0.0, -1.0, 3.0, 0.0],
                [1.0, 0.0, -2.0, 2.0],  # the bias row
            ]
        ),
    ),
    Layer(
        "dense+bias-nonsquare",
        {"weight": (3, 4), "bias": (3,)},
        None,
        None,
        _ints(3, 3, 1),
        _ints(5, 5, 2),
    ),
    Layer("weight-only", {"weight": (2, 5)}, None, None, _ints(2, 2, 3), _ints(5, 5, 4)),
    Layer(
        "bias-None",
        {"weight": (3, 2), "bias": None},
        None,
        None,
        _ints(3, 3, 5),
        _ints(2, 2, 6),
    ),
    Layer(
        "bias-first",
        {"bias": (2,), "weight": (2, 3)},
        None,
        None,
        np.array([[1.0, -1.0], [2.0, 1.0]]),
        _ints(4, 4, 7),
    ),
    Layer(
        "conv+bias",
        {"weight": (2, 3, 2, 2), "bias": (2,)},
        None,
        None,
        _ints(2, 2, 8),
        _ints(13, 13, 9),
    ),
    Layer(
        "conv-weight-only", {"weight": (3, 2, 1, 2)}, None, None, _ints(3, 3, 10), _ints(4, 4, 11)
    ),
    Layer(
        "conv+bias-low-rank",
        {"weight": (3, 2, 2, 1), "bias": (3,)},
        2,
        1,
        np.array([[1.0], [-2.0], [3.0]]),
        _ints(5, 2, 12),
    ),
    Layer(
        "dense+bias-low-rank-bias-first",
        {"bias": (3,), "weight": (3, 4)},
        3,
        2,
        _ints(3, 2, 13),
        _ints(5, 3, 14),
    ),
    Layer(
        "clamped-ranks",
        {"weight": (2, 3), "bias": (2,)},
        100,
        100,
        _ints(2, 2, 15),
        _ints(4, 4, 16),
    ),
    Layer(
        "sample-scale-half",
        {"weight": (3, 2, 2), "bias": (3,)},
        None,
        2,
        _ints(3, 2, 17),
        _ints(5, 5, 18),
        sample_scale=0.5,
    ),
    Layer(
        "sample-scale-3-bias-first-low-rank",
        {"bias": (2,), "weight": (2, 2, 3)},
        4,
        None,
        _ints(2, 2, 19),
        _ints(7, 4, 20),
        sample_scale=3.0,
    ),
]
LAYER_IDS = [layer.id for layer in LAYERS]


def _in_indices(in_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Input multi-indices j of W[o, *j], row-major: W.reshape(d_out, d_in)[o, i] = W[o, *j_i]."""
    return list(itertools.product(*(range(d) for d in in_shape)))


def _build(layer: Layer, backend: Backend, dtype: str) -> sc.KroneckerCovariance:
    """A KroneckerCovariance for ``layer`` with the hand-made factors written into storage."""
    mean = {
        name: None if shape is None else backend.asarray(np.zeros(shape), dtype)
        for name, shape in layer.spec.items()
    }
    cov = sc.KroneckerCovariance(input_rank=layer.input_rank, output_rank=layer.output_rank)
    sc.GaussianParameter(mean, cov)
    r_out, r_in = layer.s_out.shape[1], layer.s_in.shape[1]
    assert (cov.output_rank, cov.input_rank) == (r_out, r_in), "layer table uses clamped ranks"
    in_shape = layer.weight_shape[1:]
    # Storage convention (seed API): input_factor["weight"][*j, :] is row i of S_in for the
    # i-th input multi-index j in row-major order; input_factor["bias"][0] is row d_in.
    w_in = np.zeros((*in_shape, r_in))
    for i, j in enumerate(_in_indices(in_shape)):
        w_in[j] = layer.s_in[i]
    assert tuple(cov.input_factor["weight"].shape) == w_in.shape
    assert tuple(cov.output_factor.shape) == layer.s_out.shape
    cov.input_factor["weight"] = backend.asarray(w_in, dtype)
    cov.output_factor = backend.asarray(layer.s_out, dtype)
    if layer.has_bias:
        assert tuple(cov.input_factor["bias"].shape) == (1, r_in)
        cov.input_factor["bias"] = backend.asarray(layer.s_in[-1:], dtype)
    else:
        assert "bias" not in cov.input_factor
    cov.sample_scale = layer.sample_scale
    return cov


def _gram(factor: np.ndarray) -> list[list[float]]:
    """C = S S^T by explicit loops."""
    rows, cols = factor.shape
    return [
        [sum(factor[a, k] * factor[b, k] for k in range(cols)) for b in range(rows)]
        for a in range(rows)
    ]


def _positions(layer: Layer) -> list[tuple[str, tuple[int, ...], int, int]]:
    """Flat index p -> (name, multi-index, o, i) of W~, by explicit enumeration.

    Names in insertion order; within a name row-major; ``weight[o, *j]`` -> (o, i_j),
    ``bias[o]`` -> (o, d_in).
    """
    out = []
    for name, shape in layer.spec.items():
        if shape is None:
            continue
        if name == "weight":
            for o in range(shape[0]):
                for i, j in enumerate(_in_indices(shape[1:])):
                    out.append((name, (o, *j), o, i))
        else:
            for o in range(shape[0]):
                out.append((name, (o,), o, layer.d_in))
    return out


def _reference_sigma(layer: Layer) -> np.ndarray:
    c_out, c_in = _gram(layer.s_out), _gram(layer.s_in)
    pos = _positions(layer)
    sigma = np.zeros((len(pos), len(pos)))
    for p, (_, _, o, i) in enumerate(pos):
        for q, (_, _, o2, i2) in enumerate(pos):
            sigma[p, q] = layer.sample_scale**2 * c_out[o][o2] * c_in[i][i2]
    return sigma


def _slot(layer: Layer, name: str) -> slice:
    start = 0
    for other, shape in layer.spec.items():
        if shape is None:
            continue
        size = math.prod(shape)
        if other == name:
            return slice(start, start + size)
        start += size
    raise KeyError(name)


@pytest.mark.parametrize("layer", LAYERS, ids=LAYER_IDS)
def test_to_dense_elementwise(layer: Layer, backend: Backend, dtype: str) -> None:
    """Every entry of to_dense() is sample_scale^2 * C_out[o, o'] * C_in[i, i']."""
    dense = backend.to_numpy(_build(layer, backend, dtype).to_dense())
    expected = _reference_sigma(layer)
    assert dense.shape == expected.shape
    assert np.abs(expected).max() > 0
    tol = tolerance(dtype)
    wrong = ~np.isclose(dense, expected, rtol=tol["rtol"], atol=tol["atol"])
    pos = _positions(layer)
    messages = [
        f"Cov({pos[p][0]}{list(pos[p][1])}, {pos[q][0]}{list(pos[q][1])}) = {dense[p, q]}, "
        f"expected {expected[p, q]}"
        for p, q in zip(*np.nonzero(wrong), strict=True)
    ]
    assert not messages, f"{len(messages)} wrong entries:\n" + "\n".join(messages[:10])


@pytest.mark.parametrize("layer", LAYERS, ids=LAYER_IDS)
def test_weight_block_is_kron_and_cross_block(layer: Layer, backend: Backend, dtype: str) -> None:
    """Sigma_W = C_out ⊗ C_in[:d_in, :d_in]; Cov(W[o, i], b[o']) = C_out[o, o'] C_in[i, d_in]."""
    dense = backend.to_numpy(_build(layer, backend, dtype).to_dense())
    c_out = layer.s_out @ layer.s_out.T
    c_in = layer.s_in @ layer.s_in.T
    scale2 = layer.sample_scale**2
    d_in = layer.d_in
    w = _slot(layer, "weight")
    np.testing.assert_allclose(
        dense[w, w], scale2 * np.kron(c_out, c_in[:d_in, :d_in]), **tolerance(dtype)
    )
    if layer.has_bias:
        b = _slot(layer, "bias")
        np.testing.assert_allclose(
            dense[b, b], scale2 * c_out * c_in[d_in, d_in], **tolerance(dtype)
        )
        cross = np.array(
            [
                [scale2 * c_out[o, o2] * c_in[i, d_in] for o2 in range(layer.d_out)]
                for o in range(layer.d_out)
                for i in range(d_in)
            ]
        )
        np.testing.assert_allclose(dense[w, b], cross, **tolerance(dtype))
        np.testing.assert_allclose(dense[b, w], cross.T, **tolerance(dtype))


@pytest.mark.parametrize("layer", LAYERS, ids=LAYER_IDS)
def test_factor_matmul_is_s_out_z_s_in_t(layer: Layer, backend: Backend, dtype: str) -> None:
    """S vec_r(Z) = sample_scale * vec_r(S_out Z S_in^T): weight part and bias column."""
    cov = _build(layer, backend, dtype)
    r_out, r_in = layer.s_out.shape[1], layer.s_in.shape[1]
    assert cov.rank == cov.num_factor_columns == r_out * r_in
    z_mat = _ints(r_out, r_in, 99)
    z_flat = np.array([z_mat[a, c] for a in range(r_out) for c in range(r_in)])  # vec_r
    out = cov.factor_matmul(backend.asarray(z_flat, dtype))
    product = layer.sample_scale * layer.s_out @ z_mat @ layer.s_in.T  # (d_out, d_in + bias)
    assert list(out) == [n for n, s in layer.spec.items() if s is not None]
    weight = backend.to_numpy(out["weight"])
    assert weight.shape == layer.weight_shape
    for o in range(layer.d_out):
        for i, j in enumerate(_in_indices(layer.weight_shape[1:])):
            np.testing.assert_allclose(
                weight[(o, *j)], product[o, i], **tolerance(dtype), err_msg=f"W[{o}, {j}]"
            )
    if layer.has_bias:
        bias = backend.to_numpy(out["bias"])
        assert bias.shape == (layer.d_out,)
        np.testing.assert_allclose(bias, product[:, layer.d_in], **tolerance(dtype))


@pytest.mark.parametrize("layer", LAYERS, ids=LAYER_IDS)
def test_factor_columns_are_outer_products(layer: Layer, backend: Backend, dtype: str) -> None:
    """Column k = a * r_in + c of S is sample_scale * S_out[:, a] S_in[:, c]^T (row-major)."""
    cov = _build(layer, backend, dtype)
    r_out, r_in = layer.s_out.shape[1], layer.s_in.shape[1]
    columns = cov.factor_matmul(backend.asarray(np.eye(r_out * r_in), dtype))
    weight = backend.to_numpy(columns["weight"])
    bias = backend.to_numpy(columns["bias"]) if layer.has_bias else None
    for a, c in itertools.product(range(r_out), range(r_in)):
        k = a * r_in + c
        outer = layer.sample_scale * np.outer(layer.s_out[:, a], layer.s_in[:, c])
        for o in range(layer.d_out):
            for i, j in enumerate(_in_indices(layer.weight_shape[1:])):
                np.testing.assert_allclose(
                    weight[(k, o, *j)],
                    outer[o, i],
                    **tolerance(dtype),
                    err_msg=f"column {k} (a={a}, c={c}), W[{o}, {j}]",
                )
            if bias is not None:
                np.testing.assert_allclose(
                    bias[k, o],
                    outer[o, layer.d_in],
                    **tolerance(dtype),
                    err_msg=f"column {k} (a={a}, c={c}), b[{o}]",
                )


@pytest.mark.parametrize("bias_first", [False, True], ids=["weight-first", "bias-first"])
def test_output_unit_factor_selects_one_row(backend: Backend, dtype: str, bias_first: bool) -> None:
    """S_out = e_1 (rank 1): only row o = 1 of W~ (W[1, :] and b[1]) has any variance.

    A covariance that treats W as (d_in, d_out), or reshapes instead of transposing,
    spreads the variance over a column of W instead.
    """
    d_out, in_shape = 3, (2, 2)
    spec = {"weight": (d_out, *in_shape), "bias": (d_out,)}
    if bias_first:
        spec = {"bias": spec["bias"], "weight": spec["weight"]}
    s_out = np.array([[0.0], [1.0], [0.0]])
    s_in = np.diag([1.0, 2.0, 3.0, 4.0, 5.0])
    layer = Layer("unit", spec, None, 1, s_out, s_in)
    dense = backend.to_numpy(_build(layer, backend, dtype).to_dense())
    variances = {(name, idx): dense[p, p] for p, (name, idx, _, _) in enumerate(_positions(layer))}
    for (name, idx), var in variances.items():
        if idx[0] != 1:
            assert var == 0.0, (name, idx)
    # W[1, j] has variance C_in[i, i] = (i + 1)^2, b[1] has 25.
    for i, j in enumerate(_in_indices(in_shape)):
        np.testing.assert_allclose(
            variances[("weight", (1, *j))], (i + 1.0) ** 2, **tolerance(dtype)
        )
    np.testing.assert_allclose(variances[("bias", (1,))], 25.0, **tolerance(dtype))
    # Diagonal S_in: no correlation between different inputs, so Sigma is diagonal.
    np.testing.assert_array_equal(dense, np.diag(np.diag(dense)))


def test_bias_row_only_gives_bias_only_variance(backend: Backend, dtype: str) -> None:
    """S_in with only its bias row nonzero: Sigma is C_out * C_in[d_in, d_in] on the bias block."""
    s_out = np.array([[1.0, 0.0], [2.0, -1.0]])
    s_in = np.zeros((4, 4))
    s_in[3] = [0.0, 2.0, 0.0, 0.0]
    layer = Layer("bias-row", {"weight": (2, 3), "bias": (2,)}, None, None, s_out, s_in)
    dense = backend.to_numpy(_build(layer, backend, dtype).to_dense())
    expected = np.zeros((8, 8))
    expected[6:, 6:] = 4.0 * (s_out @ s_out.T)
    np.testing.assert_allclose(dense, expected, **tolerance(dtype))


def test_sample_scale_scales_factor_and_sigma(backend: Backend, dtype: str) -> None:
    """Setting sample_scale after initialization scales S by it and Sigma by its square."""
    base = LAYERS[1]
    scaled = Layer("scaled", base.spec, None, None, base.s_out, base.s_in, sample_scale=0.25)
    cov = _build(scaled, backend, dtype)
    np.testing.assert_allclose(
        backend.to_numpy(cov.to_dense()), _reference_sigma(scaled), **tolerance(dtype)
    )
    np.testing.assert_allclose(
        backend.to_numpy(cov.to_dense()), 0.0625 * _reference_sigma(base), **tolerance(dtype)
    )
