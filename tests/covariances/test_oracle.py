"""Every case × backend × dtype against the dense float64 oracle (tests/oracle.py)."""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np
import pytest

import structcov as sc
from cases import CASE_IDS, CASES, Case
from conftest import Backend, tolerance
from oracle import Dense, dense_oracle, join, split

BATCHES = [(), (2, 3)]


_CACHE: dict[tuple[str, str, str], tuple[Any, Any, Dense]] = {}


def _fill_storage(cov: Any, backend: Backend, dtype: str, seed: int) -> None:
    """Overwrite every stored array of ``cov`` with seeded standard normals.

    ``cases.make_parameter`` draws the storage with ``reset_parameters`` and the
    backend's RNG; on JAX that compiles a threefry kernel per stored shape, about
    0.6 s per case (58 s for the 90 case x dtype pairs on this machine). The oracle
    only reads the storage, so NumPy draws (identical on every backend) serve as well.
    """
    rng = np.random.default_rng(seed)
    for attribute in ("factor", "scale", "input_factor"):
        store = getattr(cov, attribute, None)
        if store is not None:
            for name, value in store.items():
                store[name] = backend.asarray(rng.standard_normal(tuple(value.shape)), dtype)
    if getattr(cov, "output_factor", None) is not None:
        shape = tuple(cov.output_factor.shape)
        cov.output_factor = backend.asarray(rng.standard_normal(shape), dtype)


def _setup(case: Case, backend: Backend, dtype: str) -> tuple[Any, Any, Dense]:
    """One parameter per (case, backend, dtype), shared by the tests of this module.

    The means and the structure come from the shared case factory; the tests only
    read the parameter, so it is built once.
    """
    key = (case.id, backend.name, dtype)
    if key not in _CACHE:
        mean = case.make_mean(backend, dtype, np.random.default_rng(7))
        param = sc.GaussianParameter(mean, case.make_cov())
        _fill_storage(param.cov, backend, dtype, seed=8)
        _CACHE[key] = (param, mean, dense_oracle(param.cov, mean, backend.to_numpy))
    return _CACHE[key]


def _reference(mean: Any) -> Any:
    if not isinstance(mean, dict):
        return mean
    return next(value for value in mean.values() if value is not None)


def _check_output(
    out: Any,
    expected: dict[str, np.ndarray],
    reference: Any,
    backend: Backend,
    dtype: str,
) -> None:
    """Keys in insertion order, shapes, namespace, dtype, device, then values."""
    assert isinstance(out, dict)
    assert list(out) == list(expected), f"keys {list(out)} != {list(expected)}"
    ref_ns = array_api_compat.array_namespace(reference)
    for name, value in out.items():
        assert array_api_compat.array_namespace(value) is ref_ns, name
        assert value.dtype == getattr(backend.xp, dtype), (name, value.dtype)
        assert array_api_compat.device(value) == array_api_compat.device(reference), name
        assert tuple(value.shape) == expected[name].shape, (name, value.shape)
        np.testing.assert_allclose(
            backend.to_numpy(value), expected[name], **tolerance(dtype), err_msg=name
        )


def _z(backend: Backend, dtype: str, shape: tuple[int, ...], seed: int) -> tuple[Any, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = backend.asarray(rng.standard_normal(shape), dtype)
    return z, backend.to_numpy(z)  # the oracle sees exactly the rounded input


@pytest.mark.parametrize("batch", BATCHES, ids=["batch()", "batch(2,3)"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_factor_matmul(case: Case, backend: Backend, dtype: str, batch: tuple[int, ...]) -> None:
    param, mean, oracle = _setup(case, backend, dtype)
    cov = param.cov
    assert cov.num_factor_columns == oracle.K
    z, z64 = _z(backend, dtype, (*batch, oracle.K), seed=11)
    expected_flat = z64 @ oracle.S.T  # (*batch, P)
    _check_output(
        cov.factor_matmul(z),
        split(expected_flat, oracle.layout, batch),
        _reference(mean),
        backend,
        dtype,
    )


@pytest.mark.parametrize("batch", BATCHES, ids=["batch()", "batch(2,3)"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_factor_matmul_additive_constant_flat(
    case: Case, backend: Backend, dtype: str, batch: tuple[int, ...]
) -> None:
    param, mean, oracle = _setup(case, backend, dtype)
    z, z64 = _z(backend, dtype, (*batch, oracle.K), seed=12)
    m, m64 = _z(backend, dtype, (oracle.P,), seed=13)
    out = param.cov.factor_matmul(z, additive_constant=m)
    expected = split(m64 + z64 @ oracle.S.T, oracle.layout, batch)
    _check_output(out, expected, _reference(mean), backend, dtype)


@pytest.mark.parametrize("batch", BATCHES, ids=["batch()", "batch(2,3)"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_factor_matmul_additive_constant_mapping(
    case: Case, backend: Backend, dtype: str, batch: tuple[int, ...]
) -> None:
    """The means themselves as the constant (``None`` entries included): a sample."""
    param, mean, oracle = _setup(case, backend, dtype)
    constant = mean if isinstance(mean, dict) else {"mean": mean}
    m64 = join(
        {n: backend.to_numpy(v) for n, v in constant.items() if v is not None}, oracle.layout
    )
    z, z64 = _z(backend, dtype, (*batch, oracle.K), seed=14)
    out = param.cov.factor_matmul(z, additive_constant=constant)
    expected = split(m64 + z64 @ oracle.S.T, oracle.layout, batch)
    _check_output(out, expected, _reference(mean), backend, dtype)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_factor_matmul_eye_gives_columns_of_s(case: Case, backend: Backend, dtype: str) -> None:
    param, mean, oracle = _setup(case, backend, dtype)
    eye = backend.asarray(np.eye(oracle.K), dtype)
    out = param.cov.factor_matmul(eye)
    # Row k of the output (sample axis first) is column k of S.
    _check_output(
        out, split(oracle.S.T, oracle.layout, (oracle.K,)), _reference(mean), backend, dtype
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_to_dense(case: Case, backend: Backend, dtype: str) -> None:
    param, mean, oracle = _setup(case, backend, dtype)
    dense = param.cov.to_dense()
    reference = _reference(mean)
    assert array_api_compat.array_namespace(dense) is array_api_compat.array_namespace(reference)
    assert dense.dtype == getattr(backend.xp, dtype)
    assert array_api_compat.device(dense) == array_api_compat.device(reference)
    assert tuple(dense.shape) == (oracle.P, oracle.P)
    np.testing.assert_allclose(backend.to_numpy(dense), oracle.Sigma, **tolerance(dtype))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_oracle_factor_squares_to_oracle_sigma(case: Case, backend: Backend, dtype: str) -> None:
    """Self-check of the oracle: for Kronecker, Sigma is filled element-wise from
    C_out and C_in, S column by column from S_out and S_in; the two must agree."""
    _, _, oracle = _setup(case, backend, dtype)
    np.testing.assert_allclose(oracle.S @ oracle.S.T, oracle.Sigma, rtol=1e-12, atol=1e-12)
    # The random storage is not degenerate: no comparison in this file is 0 == 0.
    assert np.all(np.diag(oracle.Sigma) > 1e-10)
