"""dask stays lazy: structcov builds graphs and never computes (runs in the dask session).

Every operation runs under a dask scheduler that raises, so any compute inside
structcov fails the test. Every result must be a dask array (0-D for scalars). The
graphs are then computed with the synchronous scheduler and compared with the same
operations on NumPy arrays holding the same means and storage (float64). P-sized
results must keep the means' chunks: nothing is gathered into one P-sized chunk.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
_selected = os.environ.get("STRUCTCOV_BACKEND")
if _selected and "dask" not in _selected.split(","):
    pytest.skip("dask laziness tests run in the dask session", allow_module_level=True)

import structcov as sc  # noqa: E402
from cases import STRUCTURES, well_conditioned  # noqa: E402
from test_random import dask_noise_chunks  # noqa: E402

#: Rows per chunk along the parameter axis (axis 0) of every mean and stored array.
CHUNK = 2
SHAPES = {"weight": (6, 4), "bias": (6,)}
#: The means' chunking in the flat order: each row chunk of a mean is rows * prod(rest).
FLAT_CHUNKS = (8, 8, 8, 2, 2, 2)
RTOL = 1e-10


def _no_compute(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("structcov computed a dask graph; it must stay lazy")


@pytest.fixture
def lazy() -> Iterator[None]:
    """Any compute inside the block raises (the scheduler is a function that raises)."""
    with dask.config.set(scheduler=_no_compute):
        yield


def _chunked(array: np.ndarray) -> Any:
    """A dask array chunked along axis 0 (CHUNK rows), the other axes in one chunk."""
    chunks = (CHUNK, *array.shape[1:]) if array.ndim else ()
    return da.from_array(array, chunks=chunks)


def _chunked_storage(storage: dict[str, np.ndarray]) -> dict[str, Any]:
    """Storage chunked like the means: rows that follow the means' axis 0 in CHUNK rows.

    Factor and scale rows run along the means' axes, so they take the means'
    chunks; Kronecker's ``output_factor`` rows are the weight's axis 0 (chunked),
    its ``input_factor`` rows the weight's other axes (one chunk, as in the means).
    """
    return {
        path: da.from_array(value, chunks=-1)
        if path.startswith("input_factor")
        else _chunked(value)
        for path, value in storage.items()
    }


def _compute(value: Any) -> Any:
    (out,) = dask.compute(value, scheduler="synchronous")
    return out


def _build(structure: str) -> tuple[sc.GaussianParameter, Any, Any]:
    """(dask parameter, NumPy parameter, NumPy storage) with the same means and storage."""
    rng = np.random.default_rng(0)
    means = {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}
    numpy_param = sc.GaussianParameter(means, STRUCTURES[structure][0]())
    storage = well_conditioned(numpy_param.cov, means, rng)
    numpy_param.cov.load_storage(storage)
    dask_means = {name: _chunked(value) for name, value in means.items()}
    param = sc.GaussianParameter(dask_means, STRUCTURES[structure][0]())
    return param, numpy_param, storage


def _is_lazy(value: Any, ndim: int | None = None) -> None:
    assert isinstance(value, da.Array), type(value)
    if ndim is not None:
        assert value.ndim == ndim, value.shape


def _operations(
    numpy_param: sc.GaussianParameter,
) -> Iterator[tuple[str, Callable[[sc.GaussianParameter], Any], bool]]:
    """(label, operation, is a scalar) for every operation of issue 7, given one parameter."""
    rng = np.random.default_rng(5)
    cov = numpy_param.cov
    k, p = cov.num_factor_columns, cov.num_params
    z = rng.standard_normal((3, k))
    x = rng.standard_normal((3, p))
    value = cov.unflatten(rng.standard_normal((2, p)) + numpy_param.flat_mean())

    def native(array: np.ndarray, param_: sc.GaussianParameter) -> Any:
        if isinstance(param_.mean["weight"], np.ndarray):
            return array
        # z: the rows whole; x and values: the parameter axis chunked like the means.
        if array.shape[-1] == p:
            return da.from_array(array, chunks=(array.shape[0], FLAT_CHUNKS))
        return da.from_array(array, chunks=(array.shape[0], -1))

    def values(param_: sc.GaussianParameter) -> dict[str, Any]:
        if isinstance(param_.mean["weight"], np.ndarray):
            return value
        return {
            name: da.from_array(v, chunks=(2, CHUNK, *v.shape[2:])) for name, v in value.items()
        }

    yield (
        "factor_matmul",
        lambda q: q.cov.factor_matmul(native(z, q), additive_constant=q.mean),
        False,
    )
    yield "diagonal", lambda q: q.cov.diagonal(), False
    yield "trace", lambda q: q.cov.trace(), True
    yield "logdet", lambda q: q.cov.logdet(), True
    yield "matmul", lambda q: q.cov.matmul(native(x, q)), False
    yield "entropy", lambda q: q.entropy(), True
    yield "kl", lambda q: sc.kl_divergence(q, sc.normal_prior(q, 0.7)), True
    if not cov.is_singular:
        yield "solve", lambda q: q.cov.solve(native(x, q)), False
        yield "log_prob", lambda q: q.log_prob(values(q)), False


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_every_operation_stays_lazy_and_matches_numpy(structure: str, lazy: None) -> None:
    param, numpy_param, storage = _build(structure)
    cov = param.cov
    for stored in cov.storage().values():
        _is_lazy(stored)  # initialize_parameters: lazy zeros
    cov.reset_parameters(0.5, generator=da.random.default_rng(1))
    for path, stored in cov.storage().items():
        _is_lazy(stored)
        assert tuple(stored.shape) == tuple(storage[path].shape), path
    cov.reset_parameters(0.5, generator=da.random.RandomState(1))
    cov.load_storage(_chunked_storage(storage))

    results, expected = {}, {}
    for label, operation, scalar in _operations(numpy_param):
        out = operation(param)
        leaves = out.values() if isinstance(out, dict) else [out]
        for leaf in leaves:
            _is_lazy(leaf, 0 if scalar else None)
        results[label] = out
        expected[label] = operation(numpy_param)

    samples = param.sample((2,), generator=da.random.default_rng(3))
    for name, leaf in samples.items():
        _is_lazy(leaf)
        assert tuple(leaf.shape) == (2, *SHAPES[name])
    global_samples = param.sample(3)  # generator=None: dask's global RandomState
    for leaf in global_samples.values():
        _is_lazy(leaf)

    # Nothing above computed; now compute and compare with NumPy on the same storage.
    with dask.config.set(scheduler="synchronous"):
        for label, out in results.items():
            want = expected[label]
            if isinstance(want, dict):
                assert list(out) == list(want), label
                for name in want:
                    np.testing.assert_allclose(
                        _compute(out[name]), want[name], rtol=RTOL, atol=RTOL, err_msg=label
                    )
            else:
                np.testing.assert_allclose(_compute(out), want, rtol=RTOL, atol=RTOL, err_msg=label)
        # The sample is mean + S z with z the documented draw of the same generator state.
        shape = (2, cov.num_factor_columns)
        z = da.random.default_rng(3).standard_normal(
            shape, dtype=np.float64, chunks=dask_noise_chunks(param, shape)
        )
        want = numpy_param.cov.factor_matmul(_compute(z), additive_constant=numpy_param.mean)
        for name in want:
            np.testing.assert_allclose(
                _compute(samples[name]), want[name], rtol=RTOL, atol=RTOL, err_msg=name
            )


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_parameter_sized_results_keep_the_means_chunks(structure: str, lazy: None) -> None:
    param, numpy_param, storage = _build(structure)
    param.cov.load_storage(_chunked_storage(storage))
    for label, operation, scalar in _operations(numpy_param):
        if scalar:
            continue
        out = operation(param)
        if isinstance(out, dict):  # name -> (batch, *shape): the mean axes as the means
            for name, leaf in out.items():
                mean_chunks = param.mean[name].chunks
                assert leaf.chunks[leaf.ndim - len(mean_chunks) :] == mean_chunks, (label, name)
        elif out.shape[-1] == sum(FLAT_CHUNKS):  # (..., P): the means' chunks, flat order
            if label in ("solve", "matmul") and structure.startswith("kronecker"):
                # vec(C_out^+-1 X~ C_in^+-1) moves the batch into the columns of the factor
                # products (the Gram path of matmul, the inverse factors of solve): the
                # reshapes regroup the chunks, but the result stays split (here 24 | 6),
                # never one P-sized chunk.
                assert len(out.chunks[-1]) > 1, (label, out.chunks)
                continue
            assert out.chunks[-1] == FLAT_CHUNKS, (label, out.chunks)
    samples = param.sample((2,), generator=da.random.default_rng(3))
    for name, leaf in samples.items():
        assert leaf.chunks[1:] == param.mean[name].chunks, (name, leaf.chunks)
    assert math.prod(len(c) for c in samples["weight"].chunks) > 1


@pytest.mark.parametrize(
    "structure", ["factorized-rank3", "lowrank-2", "lowrank+diag-2", "diagonal"]
)
def test_storage_created_and_drawn_takes_the_means_chunks(structure: str, lazy: None) -> None:
    # Storage that extends the means (scale: the mean's shape; factor: + rank) is
    # created chunked like them, and reset_parameters keeps those chunks.
    param, _, _ = _build(structure)
    for _ in range(2):  # as created, then as drawn
        for path, value in param.cov.storage().items():
            _is_lazy(value)
            name = path.split(".", 1)[1]
            mean_chunks = param.mean[name].chunks
            assert value.chunks[: len(mean_chunks)] == mean_chunks, (path, value.chunks)
            assert all(len(axis) == 1 for axis in value.chunks[len(mean_chunks) :]), path
        param.cov.reset_parameters(0.5, generator=da.random.default_rng(1))
    prior = sc.normal_prior(param, 0.5)
    for name, value in prior.mean.items():
        assert value.chunks == param.mean[name].chunks, name
    for path, value in prior.cov.storage().items():
        assert value.chunks == param.mean[path.split(".", 1)[1]].chunks, path
