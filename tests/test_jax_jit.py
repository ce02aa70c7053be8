"""JAX: factor_matmul, to_dense and sample under ``jax.jit`` agree with eager, for every case.

Inside the jitted function everything is traced: the means, the covariance
storage, the input and the key. The means travel as a tuple, not a dict: JAX
sorts dict keys when it flattens a pytree, which would reorder the flat
parameter vector (DESIGN.md §1).

The every-case test draws with an ``rbg`` key (``jax.random.key(seed, impl="rbg")``,
still a typed JAX key): XLA compiles the default partitionable threefry about three
times slower inside a jitted function, which made this grid take minutes. The default
threefry key under ``jax.jit`` is tested on a few cases below, and in
tests/test_validation.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("jax")

import jax

import structcov as sc
from cases import CASE_IDS, CASES, Case, make_parameter
from conftest import Backend, tolerance
from test_random import present_means, storage


@pytest.fixture
def jax_backend(backend: Backend) -> Backend:
    if backend.name != "jax":
        pytest.skip("jax.jit runs on the jax backend only")
    return backend


def set_storage(cov: sc.FactorizedCovariance, path: str, value: Any) -> None:
    """Store ``value`` at ``path`` (a key of ``lr_scaling``: "factor.weight", "output_factor")."""
    attribute, _, name = path.partition(".")
    if name:
        getattr(cov, attribute)[name] = value
    else:
        setattr(cov, attribute, value)


def assert_close(got: Any, expected: Any, dtype: str, label: str) -> None:
    assert got.dtype == expected.dtype, label
    assert got.shape == expected.shape, label
    np.testing.assert_allclose(
        np.asarray(got, dtype=np.float64),
        np.asarray(expected, dtype=np.float64),
        **tolerance(dtype),
        err_msg=label,
    )


def parameter_without_rng(case: Case, backend: Backend, dtype: str) -> tuple[Any, Any]:
    """Like ``make_parameter``, with the storage drawn by NumPy instead of ``reset_parameters``.

    Eager JAX compiles its PRNG anew for every storage shape (about a second per case);
    ``reset_parameters`` on JAX is covered by tests/test_gaussian.py.
    """
    rng = np.random.default_rng(0)
    mean = case.make_mean(backend, dtype, rng)
    cov = case.make_cov()
    param = sc.GaussianParameter(mean, cov)
    for path, value in storage(cov).items():
        set_storage(cov, path, backend.asarray(rng.standard_normal(value.shape), dtype))
    return param, mean


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_jit_agrees_with_eager(jax_backend: Backend, dtype: str, case: Case) -> None:
    param, mean = parameter_without_rng(case, jax_backend, dtype)
    present = present_means(param)
    names = list(present)
    stored = storage(param.cov)
    paths = list(stored)
    jdtype = present[names[0]].dtype
    z = jax.random.normal(jax.random.key(0), (2, 3, param.cov.num_factor_columns), dtype=jdtype)
    key = jax.random.key(5, impl="rbg")

    def rebuild_mean(values: tuple) -> Any:
        """The mean argument in its original form: a bare array, or a dict in insertion order."""
        if not isinstance(mean, dict):
            return values[0]
        by_name = dict(zip(names, values, strict=True))
        return {name: None if value is None else by_name[name] for name, value in mean.items()}

    @jax.jit
    def run(mean_values: tuple, storage_values: tuple, z: Any, key: Any) -> tuple:
        cov = case.make_cov()
        traced = sc.GaussianParameter(rebuild_mean(mean_values), cov)
        for path, value in zip(paths, storage_values, strict=True):
            set_storage(cov, path, value)
        means = {name: traced[name] for name in names}
        return (
            cov.factor_matmul(z, additive_constant=means),
            cov.to_dense(),
            traced.sample((2, 3), generator=key),
        )

    jit_fm, jit_dense, jit_sample = run(tuple(present.values()), tuple(stored.values()), z, key)

    eager_fm = param.cov.factor_matmul(z, additive_constant=present)
    eager_dense = param.cov.to_dense()
    eager_sample = param.sample((2, 3), generator=key)
    # jit returns dicts with sorted keys: compare by name
    for label, got in [("factor_matmul", jit_fm), ("sample", jit_sample)]:
        assert sorted(got) == sorted(names), label
    for name in names:
        assert_close(jit_fm[name], eager_fm[name], dtype, f"factor_matmul[{name}]")
        assert_close(jit_sample[name], eager_sample[name], dtype, f"sample[{name}]")
    assert_close(jit_dense, eager_dense, dtype, "to_dense")


CLOSURE_CASES = [
    case
    for case in CASES
    if case.id
    in ("factorized-rank3-weight+bias", "diagonal-bias-None", "kronecker-2x1-conv4d+bias")
]


@pytest.mark.parametrize("case", CLOSURE_CASES, ids=lambda case: case.id)
def test_jit_sample_of_an_eager_parameter(jax_backend: Backend, dtype: str, case: Case) -> None:
    """The common use: a parameter built eagerly, ``jax.jit(lambda key: param.sample(...))``."""
    param, _ = make_parameter(case, jax_backend, dtype)
    key = jax.random.key(8)
    got = jax.jit(lambda key: param.sample((2, 3), generator=key))(key)
    expected = param.sample((2, 3), generator=key)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert_close(got[name], expected[name], dtype, f"sample[{name}]")
    other = jax.jit(lambda key: param.sample((2, 3), generator=key))(jax.random.key(9))
    assert not np.array_equal(np.asarray(other["weight"]), np.asarray(got["weight"]))
