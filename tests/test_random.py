"""The RNG seam: every backend's generator in, standard normals out (DESIGN.md §1 Randomness).

The reference draws below use each backend's RNG the way ``structcov._random``
documents it, written here independently of that module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from cases import CASE_IDS, CASES, Case, make_parameter
from conftest import Backend, tolerance

import structcov as sc

#: A small case with two names, so that samples cover several blocks.
WEIGHT_BIAS = next(case for case in CASES if case.id == "factorized-rank3-weight+bias")


def reference_normals(backend: Backend, generator: Any, shape: tuple[int, ...], like: Any) -> Any:
    """One array of standard normals drawn from ``generator`` the documented way.

    numpy: ``Generator.standard_normal(shape, dtype=)``; torch: ``torch.randn(shape,
    generator=, dtype=, device=)``; jax: ``jax.random.normal(key, shape, dtype=)`` (one
    array: the key itself, not split); cupy: ``Generator.standard_normal(shape,
    dtype=)``; others (array_api_strict): a NumPy draw converted with ``asarray``.
    ``like`` gives dtype and device.
    """
    import array_api_compat

    device = array_api_compat.device(like)
    if backend.name == "numpy":
        return generator.standard_normal(shape, dtype=like.dtype)
    if backend.name == "torch":
        import torch

        return torch.randn(shape, generator=generator, dtype=like.dtype, device=device)
    if backend.name == "jax":
        import jax

        return jax.random.normal(generator, shape, dtype=like.dtype)
    if backend.name == "cupy":
        return generator.standard_normal(shape, dtype=like.dtype)
    return backend.xp.asarray(generator.standard_normal(shape), dtype=like.dtype, device=device)


def first_mean(param: sc.GaussianParameter) -> Any:
    return next(value for value in param.mean.values() if value is not None)


def assert_samples_close(backend: Backend, got: dict, expected: dict, dtype: str) -> None:
    assert list(got) == list(expected)
    for name in expected:
        np.testing.assert_allclose(
            backend.to_numpy(got[name]),
            backend.to_numpy(expected[name]),
            **tolerance(dtype),
            err_msg=name,
        )


# ----------------------------------------------------------------- native generators
@pytest.mark.parametrize("case", [WEIGHT_BIAS, CASES[-1]], ids=lambda c: c.id)
def test_native_generator_gives_documented_draw(backend: Backend, dtype: str, case: Case) -> None:
    param, mean = make_parameter(case, backend, dtype)
    like = first_mean(param)
    rank = param.cov.rank
    sample = param.sample((4,), generator=backend.generator(7))
    z = reference_normals(backend, backend.generator(7), (4, rank), like)
    expected = param.cov.factor_matmul(z, additive_constant=param.mean_dict_for_test)  # type: ignore[attr-defined]
    assert_samples_close(backend, sample, expected, dtype)
