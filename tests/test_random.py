"""The RNG seam: every backend's generator in, standard normals out (DESIGN.md §1 Randomness).

The reference draws below use each backend's RNG the way ``structcov._random``
documents it, written here independently of that module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import structcov as sc
from cases import CASES, Case, make_parameter
from conftest import Backend, tolerance

#: Small cases with two names, so that samples cover several blocks.
WEIGHT_BIAS = next(case for case in CASES if case.id == "factorized-rank3-weight+bias")
KRONECKER = next(case for case in CASES if case.id == "kronecker-full-weight+bias")


def dask_noise_chunks(param: sc.GaussianParameter, shape: tuple[int, ...]) -> tuple[Any, ...]:
    """The documented chunking of ``sample``'s noise z of ``shape`` = (*sample_shape, K) on dask.

    The K axis is split like the columns of the factor S: for a diagonal S, the
    means' chunks in the flat order (a row chunk of a mean of shape (n, *rest) is
    that many rows times prod(rest) flat entries); for low rank plus diagonal,
    ``rank`` columns in one chunk, then the same; otherwise one chunk. The sample
    axes are dask's "auto".
    """
    flat: list[int] = []
    for value in present_means(param).values():
        if value.ndim == 0:
            flat.append(1)
            continue
        rest = int(np.prod(value.shape[1:]))
        flat.extend(int(rows) * rest for rows in value.chunks[0])
    if isinstance(param.cov, sc.DiagonalCovariance):
        columns = tuple(flat)
    elif isinstance(param.cov, sc.LowRankPlusDiagonalCovariance):
        columns = (param.cov.rank, *flat)
    else:
        columns = (shape[-1],)
    return (*("auto",) * (len(shape) - 1), columns)


def reference_normals(
    backend: Backend,
    generator: Any,
    shape: tuple[int, ...],
    like: Any,
    param: sc.GaussianParameter | None = None,
) -> Any:
    """One array of standard normals drawn from ``generator`` the documented way.

    numpy: ``Generator.standard_normal(shape, dtype=)``; torch: ``torch.randn(shape,
    generator=, dtype=, device=)``; jax: ``jax.random.normal(key, shape, dtype=)`` (one
    array: the key itself, not split); cupy: ``Generator.standard_normal(shape,
    dtype=)``; dask: ``Generator.standard_normal(shape, dtype=, chunks=)`` with the
    chunks `sample` uses for ``param`` (`dask_noise_chunks`), or dask's "auto" without
    ``param``; others (array_api_strict): a NumPy draw converted with ``asarray``.
    ``like`` gives dtype and device.
    """
    import array_api_compat

    device = array_api_compat.device(like)
    if backend.name == "dask":
        chunks = "auto" if param is None else dask_noise_chunks(param, shape)
        return generator.standard_normal(shape, dtype=like.dtype, chunks=chunks)
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


def present_means(param: sc.GaussianParameter) -> dict[str, Any]:
    """The non-None means, in insertion order."""
    return {name: value for name, value in param.mean.items() if value is not None}


def first_mean(param: sc.GaussianParameter) -> Any:
    return next(iter(present_means(param).values()))


def assert_samples_close(backend: Backend, got: dict, expected: dict, dtype: str) -> None:
    assert list(got) == list(expected)
    for name in expected:
        np.testing.assert_allclose(
            backend.to_numpy(got[name]),
            backend.to_numpy(expected[name]),
            **tolerance(dtype),
            err_msg=name,
        )


def storage(cov: sc.FactorizedCovariance) -> dict[str, Any]:
    """Every stored covariance array by its path (the keys of ``lr_scaling``)."""
    out = {}
    for path in cov.lr_scaling:
        attribute, _, name = path.partition(".")
        stored = getattr(cov, attribute)
        out[path] = stored[name] if name else stored
    return out


# ----------------------------------------------------------------- native generators
@pytest.mark.parametrize("case", [WEIGHT_BIAS, KRONECKER], ids=lambda c: c.id)
def test_native_generator_gives_documented_draw(backend: Backend, dtype: str, case: Case) -> None:
    param, _ = make_parameter(case, backend, dtype)
    rank = param.cov.rank
    sample = param.sample((4,), generator=backend.generator(7))
    z = reference_normals(backend, backend.generator(7), (4, rank), first_mean(param), param)
    expected = param.cov.factor_matmul(z, additive_constant=present_means(param))
    assert_samples_close(backend, sample, expected, dtype)


def test_native_generator_in_reset_parameters(backend: Backend, dtype: str) -> None:
    param, _ = make_parameter(KRONECKER, backend, dtype)
    param.cov.reset_parameters(1.0, generator=backend.generator(3))
    first = {k: backend.to_numpy(v) for k, v in storage(param.cov).items()}
    param.cov.reset_parameters(1.0, generator=backend.generator(3))
    for path, value in storage(param.cov).items():
        np.testing.assert_array_equal(backend.to_numpy(value), first[path], err_msg=path)
    param.cov.reset_parameters(1.0, generator=backend.generator(4))
    for path, value in storage(param.cov).items():
        assert not np.array_equal(backend.to_numpy(value), first[path]), path


# ------------------------------------------------------------------------ None
@pytest.fixture
def global_seed(backend: Backend) -> Iterator[Callable[[int], None]]:
    """Seeds the backend's global RNG (the one ``generator=None`` uses); restores it after."""
    if backend.name == "jax":
        yield lambda seed: None
        return
    if backend.name == "torch":
        import torch

        state = torch.random.get_rng_state()
        yield lambda seed: torch.manual_seed(seed) and None
        torch.random.set_rng_state(state)
        return
    if backend.name == "cupy":
        import cupy

        yield lambda seed: cupy.random.seed(seed)
        return
    if backend.name == "dask":
        import dask.array

        yield dask.array.random.seed
        return
    # generator=None means NumPy's legacy global RNG: that is what is under test here.
    state = np.random.get_state()  # noqa: NPY002
    yield np.random.seed
    np.random.set_state(state)  # noqa: NPY002


def test_none_uses_the_global_rng(
    backend: Backend, dtype: str, global_seed: Callable[[int], None]
) -> None:
    if backend.name == "jax":
        pytest.skip("JAX has no global RNG: None is an error there (tested below)")
    param, _ = make_parameter(WEIGHT_BIAS, backend, dtype)
    global_seed(11)
    first = param.sample((3,), generator=None)
    global_seed(11)
    again = param.sample((3,))
    assert_samples_close(backend, again, first, dtype)
    following = param.sample((3,))
    for name in first:
        assert not np.array_equal(backend.to_numpy(following[name]), backend.to_numpy(first[name]))
    param.cov.reset_parameters(1.0, generator=None)  # works, draws from the global RNG


def test_none_on_jax_says_to_pass_a_key(backend: Backend) -> None:
    if backend.name != "jax":
        pytest.skip("None is the global RNG on this backend")
    param, _ = make_parameter(WEIGHT_BIAS, backend, "float64")
    with pytest.raises(ValueError, match=r"`generator`.*key"):
        param.sample((2,), generator=None)
    with pytest.raises(ValueError, match=r"`generator`.*key"):
        param.sample((2,))
    with pytest.raises(ValueError, match=r"`generator`.*key"):
        param.cov.reset_parameters(1.0)


# --------------------------------------------------------- wrong generator kinds
def _numpy_generator() -> Any:
    return np.random.default_rng(0)


def _torch_generator() -> Any:
    torch = pytest.importorskip("torch")
    return torch.Generator().manual_seed(0)


def _jax_key() -> Any:
    jax = pytest.importorskip("jax")
    return jax.random.key(0)


def _jax_raw_key() -> Any:
    jax = pytest.importorskip("jax")
    return jax.random.PRNGKey(0)


def _dask_generator() -> Any:
    dask_array = pytest.importorskip("dask.array")
    return dask_array.random.default_rng(0)


def _dask_random_state() -> Any:
    dask_array = pytest.importorskip("dask.array")
    return dask_array.random.RandomState(0)


#: id -> (factory, backends it fits)
GENERATORS: dict[str, tuple[Callable[[], Any], set[str]]] = {
    "numpy-Generator": (_numpy_generator, {"numpy", "array_api_strict"}),
    "torch-Generator": (_torch_generator, {"torch"}),
    "jax-key": (_jax_key, {"jax"}),
    "jax-PRNGKey": (_jax_raw_key, {"jax"}),
    "dask-Generator": (_dask_generator, {"dask"}),
    "dask-RandomState": (_dask_random_state, {"dask"}),
    # numpy.random objects that are not a numpy.random.Generator
    "numpy-BitGenerator": (lambda: np.random.PCG64(0), set()),
    "numpy-SeedSequence": (lambda: np.random.SeedSequence(0), set()),
    "numpy-RandomState": (lambda: np.random.RandomState(0), set()),
    "object": (object, set()),
    "int-seed": (lambda: 0, set()),
    "str": (lambda: "seed", set()),
}


@pytest.mark.parametrize("generator_id", list(GENERATORS))
def test_wrong_generator_is_a_type_error_naming_generator(
    backend: Backend, generator_id: str
) -> None:
    factory, fits = GENERATORS[generator_id]
    if backend.name in fits:
        pytest.skip(f"{generator_id} is the right generator for {backend.name}")
    generator = factory()
    param, _ = make_parameter(WEIGHT_BIAS, backend, "float64")
    with pytest.raises(TypeError, match="`generator`"):
        param.sample((2,), generator=generator)
    with pytest.raises(TypeError, match="`generator`"):
        param.cov.reset_parameters(1.0, generator=generator)


# --------------------------------------------------------------------- JAX keys
def _jax(backend: Backend) -> Any:
    if backend.name != "jax":
        pytest.skip("JAX keys only")
    import jax

    return jax


@pytest.mark.parametrize("style", ["key", "PRNGKey"])
def test_jax_raw_and_typed_keys_both_work(backend: Backend, dtype: str, style: str) -> None:
    jax = _jax(backend)
    make_key = getattr(jax.random, style)
    param, _ = make_parameter(WEIGHT_BIAS, backend, dtype)
    sample = param.sample((5,), generator=make_key(2))
    z = jax.random.normal(make_key(2), (5, param.cov.rank), dtype=first_mean(param).dtype)
    expected = param.cov.factor_matmul(z, additive_constant=present_means(param))
    assert_samples_close(backend, sample, expected, dtype)
    param.cov.reset_parameters(1.0, generator=make_key(3))


@pytest.mark.parametrize("style", ["key", "PRNGKey"])
def test_jax_batch_of_keys_is_rejected(backend: Backend, style: str) -> None:
    jax = _jax(backend)
    keys = jax.random.split(getattr(jax.random, style)(0), 3)
    param, _ = make_parameter(WEIGHT_BIAS, backend, "float64")
    with pytest.raises(TypeError, match=r"`generator`.*single"):
        param.sample((2,), generator=keys)
    with pytest.raises(TypeError, match=r"`generator`.*single"):
        param.cov.reset_parameters(1.0, generator=keys)


def test_jax_array_that_is_not_a_key_is_rejected(backend: Backend) -> None:
    jax = _jax(backend)
    param, _ = make_parameter(WEIGHT_BIAS, backend, "float64")
    not_a_key = jax.numpy.zeros((2,), dtype=jax.numpy.int32)
    with pytest.raises(TypeError, match="`generator`"):
        param.sample((2,), generator=not_a_key)


# ------------------------------------------------------ one key, several arrays
@pytest.mark.parametrize(
    "cov, mean_shapes",
    [
        # Kronecker with d_in = d_out and full ranks: input and output factors are both 3 x 3.
        (lambda: sc.KroneckerCovariance(), {"weight": (3, 3)}),
        # Two names of the same shape: factor.a and factor.b are both (2, 3, 2).
        (lambda: sc.FactorizedCovariance(rank=2), {"a": (2, 3), "b": (2, 3)}),
        # (Diagonal scales are set to the mean scale, not drawn: nothing to compare.)
        (lambda: sc.LowRankCovariance(rank=3), {"a": (4,), "b": (4,)}),
    ],
    ids=["kronecker-3x3", "factorized-two-equal", "lowrank-two-equal"],
)
def test_blocks_drawn_at_once_differ(
    backend: Backend, cov: Callable[[], Any], mean_shapes: dict[str, tuple[int, ...]]
) -> None:
    means = {
        name: backend.asarray(np.zeros(shape), "float64") for name, shape in mean_shapes.items()
    }
    covariance = cov()
    sc.GaussianParameter(means, covariance)
    covariance.reset_parameters(1.0, generator=backend.generator(0))
    blocks = {path: backend.to_numpy(value) for path, value in storage(covariance).items()}
    shapes = {value.shape for value in blocks.values()}
    assert len(shapes) == 1, f"the blocks should share one shape, got {shapes}"
    paths = list(blocks)
    for i, first in enumerate(paths):
        for second in paths[i + 1 :]:
            assert not np.allclose(blocks[first], blocks[second]), (first, second)
            # not merely a sign flip or a scaling of the same draw either
            corr = np.corrcoef(blocks[first].ravel(), blocks[second].ravel())[0, 1]
            assert abs(corr) < 0.99, (first, second, corr)
