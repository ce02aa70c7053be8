"""GaussianParameter and BNNParameter: means, sampling, reset_parameters, lr_scaling.

Expected storage shapes, ranks, learning-rate scalings and initial standard
deviations come from seed-api.md ("What users of the original rely on"), written
out here per structure, not read back from the code under test.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import array_api_compat
import numpy as np
import pytest

import structcov as sc
from cases import BARE, CASE_IDS, CASES, MEAN_SPECS, Case, make_parameter
from conftest import Backend, tolerance
from oracle import standard_deviations
from test_random import present_means, reference_normals, storage

#: structure id (tests/cases.py) -> the ranks requested in its factory
REQUESTED_RANK: dict[str, int | None] = {
    "factorized-full": None,
    "factorized-rank3": 3,
    "lowrank-2": 2,
    "lowrank-clamped": 1000,
}
REQUESTED_LRPD_RANK: dict[str, int] = {"lowrank+diag-2": 2}
REQUESTED_KRONECKER_RANKS: dict[str, tuple[int | None, int | None]] = {
    "kronecker-full": (None, None),
    "kronecker-2x1": (2, 1),
}


class Stored(NamedTuple):
    """What seed-api.md (and each class docstring beyond it) says about one stored array."""

    shape: tuple[int, ...]
    lr_scaling: float
    std: float  # reset_parameters: N(0, std^2) entries, or every entry = std if not random
    random: bool = True
    # diagonal scales (not random) store std through this transform (the default softplus)
    transform: str = "identity"


#: Every structure once, plus the bare / bias-None / single-element specs.
SHAPE_CASES = [case for case in CASES if case.id.endswith("-weight+bias")] + [
    case
    for case in CASES
    if case.structure == "factorized-rank3"
    and case.id.rsplit("rank3-", 1)[1] in ("bare-array", "bias-None", "single-element")
]


#: (case, dtype): every case in float64, SHAPE_CASES in float32 as well. Eager JAX compiles
#: every new shape and dtype (~1 s per case), so float32 is not crossed with every case here;
#: tests/covariances/test_oracle.py crosses factor_matmul with both dtypes on every case.
CASE_DTYPES = [pytest.param(case, "float64", id=f"float64-{case.id}") for case in CASES] + [
    pytest.param(case, "float32", id=f"float32-{case.id}") for case in SHAPE_CASES
]


def spec_shapes(spec: Any) -> dict[str, tuple[int, ...] | None]:
    """name -> shape (None for an absent entry) of a mean spec; a bare array is "mean"."""
    if isinstance(spec, tuple):
        assert spec[0] == BARE
        return {"mean": spec[1]}
    return dict(spec)


def present_shapes(spec: Any) -> dict[str, tuple[int, ...]]:
    return {name: shape for name, shape in spec_shapes(spec).items() if shape is not None}


def clamp(requested: int | None, dimension: int) -> int:
    return dimension if requested is None else min(requested, dimension)


def unknown(structure: str) -> Any:
    pytest.fail(
        f"tests/test_gaussian.py has no documented expectations for {structure!r}: add them"
    )


def expected_storage(
    structure: str, shapes: dict[str, tuple[int, ...]], scales: dict[str, float]
) -> dict[str, Stored]:
    """path -> what is stored there, as seed-api.md states it."""
    num_params = sum(math.prod(shape) for shape in shapes.values())
    if structure == "diagonal":
        # set to the scale, not drawn (stored through the default softplus transform)
        return {
            f"scale.{name}": Stored(shape, 1.0, scales[name], random=False, transform="softplus")
            for name, shape in shapes.items()
        }
    if structure in REQUESTED_RANK or structure in REQUESTED_LRPD_RANK:
        requested = REQUESTED_RANK.get(structure, REQUESTED_LRPD_RANK.get(structure))
        rank = clamp(requested, num_params)
        out = {
            f"factor.{name}": Stored((*shape, rank), 1.0 / rank, scales[name] / math.sqrt(rank))
            for name, shape in shapes.items()
        }
        if structure in REQUESTED_LRPD_RANK:
            # LowRankPlusDiagonalCovariance: d is set to the scale, not drawn
            out.update(
                {
                    f"scale.{name}": Stored(
                        shape, 1.0, scales[name], random=False, transform="softplus"
                    )
                    for name, shape in shapes.items()
                }
            )
        return out
    if structure not in REQUESTED_KRONECKER_RANKS:
        unknown(structure)
    requested_in, requested_out = REQUESTED_KRONECKER_RANKS[structure]
    weight = shapes["weight"]
    d_out, d_in = weight[0], math.prod(weight[1:])
    r_in = clamp(requested_in, d_in + int("bias" in shapes))
    r_out = clamp(requested_out, d_out)
    out = {
        f"input_factor.{name}": Stored(
            (*weight[1:], r_in) if name == "weight" else (1, r_in),
            1.0 / r_in,
            scales[name] / math.sqrt(r_in),
        )
        for name in shapes
    }
    out["output_factor"] = Stored((d_out, r_out), 1.0 / r_out, 1.0 / math.sqrt(r_out))
    return out


def expected_rank(structure: str, shapes: dict[str, tuple[int, ...]]) -> int:
    """``cov.rank``: columns of S for the seed structures, of U for low rank plus diagonal."""
    num_params = sum(math.prod(shape) for shape in shapes.values())
    if structure == "diagonal":
        return num_params
    if structure in REQUESTED_RANK:
        return clamp(REQUESTED_RANK[structure], num_params)
    if structure in REQUESTED_LRPD_RANK:
        return clamp(REQUESTED_LRPD_RANK[structure], num_params)
    if structure not in REQUESTED_KRONECKER_RANKS:
        unknown(structure)
    requested_in, requested_out = REQUESTED_KRONECKER_RANKS[structure]
    weight = shapes["weight"]
    r_in = clamp(requested_in, math.prod(weight[1:]) + int("bias" in shapes))
    return r_in * clamp(requested_out, weight[0])


def expected_columns(structure: str, shapes: dict[str, tuple[int, ...]]) -> int:
    """K, the number of standard normals per sample: ``rank`` (seed structures), rank + P (LRPD)."""
    rank = expected_rank(structure, shapes)
    if structure in REQUESTED_LRPD_RANK:
        return rank + sum(math.prod(shape) for shape in shapes.values())
    return rank


def same_namespace(a: Any, b: Any) -> bool:
    try:
        array_api_compat.array_namespace(a, b)
    except TypeError:
        return False
    return True


def alternate_device(backend: Backend) -> Any:
    """A non-default device where the backend has one on this machine, else None."""
    if backend.name == "array_api_strict":
        return backend.xp.Device("device1")
    return None


def as_numpy(backend: Backend, arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    return {name: backend.to_numpy(value) for name, value in arrays.items()}


# ---------------------------------------------------------------------- means
@pytest.mark.parametrize("spec_id", list(MEAN_SPECS))
def test_mean_mapping_and_getitem(backend: Backend, spec_id: str) -> None:
    spec = MEAN_SPECS[spec_id]
    case = Case(spec_id, "factorized-rank3", spec)
    mean = case.make_mean(backend, "float64", np.random.default_rng(0))
    for param in (
        sc.GaussianParameter(mean, sc.FactorizedCovariance(rank=3)),
        sc.BNNParameter(mean),
    ):
        expected = {"mean": mean} if isinstance(spec, tuple) else mean
        # the mapping keeps every entry, None ones included, in insertion order
        assert list(param.mean) == list(expected)
        for name, value in expected.items():
            if value is None:
                assert param.mean[name] is None
                assert param[name] is None
            else:
                assert param.mean[name] is value
                assert param[name] is value


def check_sample(
    backend: Backend, param: sc.GaussianParameter, case: Case, sample_shape: Any
) -> None:
    shapes = present_shapes(case.spec)
    sample = param.sample(sample_shape, generator=backend.generator(1))
    leading = (sample_shape,) if isinstance(sample_shape, int) else sample_shape
    # None entries are absent; order is the insertion order
    assert list(sample) == list(shapes)
    reference = next(iter(present_means(param).values()))
    for name, shape in shapes.items():
        value = sample[name]
        assert tuple(value.shape) == (*leading, *shape), name
        assert value.dtype == reference.dtype, name
        assert same_namespace(value, reference), name
        assert array_api_compat.device(value) == array_api_compat.device(reference), name


@pytest.mark.parametrize("case, dtype", CASE_DTYPES)
def test_sample_shapes_keys_dtype(backend: Backend, dtype: str, case: Case) -> None:
    param, _ = make_parameter(case, backend, dtype)
    check_sample(backend, param, case, (2, 3))


@pytest.mark.parametrize("case", SHAPE_CASES, ids=lambda case: case.id)
@pytest.mark.parametrize("sample_shape", [(), 3], ids=str)
def test_sample_shape_int_and_empty(
    backend: Backend, dtype: str, case: Case, sample_shape: Any
) -> None:
    param, _ = make_parameter(case, backend, dtype)
    check_sample(backend, param, case, sample_shape)


@pytest.mark.parametrize("case, dtype", CASE_DTYPES)
def test_sample_is_factor_matmul_of_the_generators_draw(
    backend: Backend, dtype: str, case: Case
) -> None:
    param, _ = make_parameter(case, backend, dtype)
    shapes = present_shapes(case.spec)
    rank = expected_columns(case.structure, shapes)
    means = present_means(param)
    sample = param.sample((2, 3), generator=backend.generator(5))
    z = reference_normals(
        backend, backend.generator(5), (2, 3, rank), next(iter(means.values())), param
    )
    expected = param.cov.factor_matmul(z, additive_constant=means)
    assert list(sample) == list(expected)
    for name in shapes:
        np.testing.assert_allclose(
            backend.to_numpy(sample[name]),
            backend.to_numpy(expected[name]),
            **tolerance(dtype),
            err_msg=name,
        )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_same_state_same_sample_different_state_different(backend: Backend, case: Case) -> None:
    param, _ = make_parameter(case, backend, "float64")
    first = as_numpy(backend, param.sample((2, 3), generator=backend.generator(10)))
    again = as_numpy(backend, param.sample((2, 3), generator=backend.generator(10)))
    other = as_numpy(backend, param.sample((2, 3), generator=backend.generator(11)))
    for name in first:
        np.testing.assert_array_equal(again[name], first[name], err_msg=name)
        assert not np.array_equal(other[name], first[name]), name


@pytest.mark.parametrize("case, dtype", CASE_DTYPES)
def test_batch_equals_loop_over_elements(backend: Backend, dtype: str, case: Case) -> None:
    param, _ = make_parameter(case, backend, dtype)
    means = present_means(param)
    rank = expected_columns(case.structure, present_shapes(case.spec))
    z = reference_normals(backend, backend.generator(3), (2, 3, rank), next(iter(means.values())))
    batch = as_numpy(backend, param.cov.factor_matmul(z, additive_constant=means))
    z_numpy = backend.to_numpy(z)  # slice in NumPy: eager JAX compiles every new index
    for i in range(2):
        for j in range(3):
            single = param.cov.factor_matmul(
                backend.asarray(z_numpy[i, j], dtype), additive_constant=means
            )
            for name, value in single.items():
                assert tuple(value.shape) == tuple(means[name].shape)
                np.testing.assert_allclose(
                    batch[name][i, j], backend.to_numpy(value), **tolerance(dtype), err_msg=name
                )


@pytest.mark.parametrize(
    "case",
    [case for case in CASES if case.id.endswith("weight+bias")],
    ids=lambda case: case.id,
)
def test_outputs_keep_namespace_dtype_device(backend: Backend, dtype: str, case: Case) -> None:
    """On array_api_strict the means live on a non-default device: every output follows."""
    device = alternate_device(backend)
    rng = np.random.default_rng(0)
    kwargs = {} if device is None else {"device": device}
    mean = {
        name: backend.xp.asarray(
            rng.standard_normal(shape), dtype=getattr(backend.xp, dtype), **kwargs
        )
        for name, shape in present_shapes(case.spec).items()
    }
    reference = mean["weight"]
    cov = case.make_cov()
    param = sc.GaussianParameter(mean, cov)
    cov.reset_parameters(0.5, generator=backend.generator(0))
    rank = expected_columns(case.structure, present_shapes(case.spec))
    z = reference_normals(backend, backend.generator(1), (2, 3, rank), reference)
    outputs = {
        **{f"sample.{k}": v for k, v in param.sample((2, 3), backend.generator(2)).items()},
        **{
            f"factor_matmul.{k}": v for k, v in cov.factor_matmul(z, additive_constant=mean).items()
        },
        **{f"storage.{k}": v for k, v in storage(cov).items()},
        "to_dense": cov.to_dense(),
    }
    for label, value in outputs.items():
        assert value.dtype == reference.dtype, label
        assert same_namespace(value, reference), label
        assert array_api_compat.device(value) == array_api_compat.device(reference), label


def test_bnn_parameter_sample_is_not_implemented(backend: Backend) -> None:
    param = sc.BNNParameter(backend.asarray(np.zeros((2, 3)), "float64"))
    with pytest.raises(NotImplementedError):
        param.sample()
    with pytest.raises(NotImplementedError):
        param.sample((2,), generator=backend.generator(0))


# ----------------------------------------------------------- reset_parameters
#: Means large enough that empirical standard deviations are informative.
LARGE_SPECS = {
    "factorized-rank3": {"weight": (20, 30), "bias": (20,)},
    "lowrank-2": {"weight": (20, 30), "bias": (20,)},
    "factorized-full": {"weight": (6, 5), "bias": (6,)},
    "diagonal": {"weight": (20, 30), "bias": (40,)},
    "kronecker-full": {"weight": (10, 30), "bias": (10,)},
    "kronecker-2x1": {"weight": (10, 30), "bias": (10,)},
    "lowrank+diag-2": {"weight": (20, 30), "bias": (20,)},
}


@pytest.mark.parametrize("structure", list(LARGE_SPECS))
@pytest.mark.parametrize("scales", [2.5, {"weight": 0.5, "bias": 3.0}], ids=["float", "dict"])
def test_reset_parameters_std(backend: Backend, structure: str, scales: Any) -> None:
    """float64 only: eager JAX compiles every new shape and dtype, and these are large."""
    spec = LARGE_SPECS[structure]
    case = Case(structure, structure, spec)
    param, _ = make_parameter(case, backend, "float64")
    param.cov.reset_parameters(scales, generator=backend.generator(123))
    per_name = scales if isinstance(scales, dict) else dict.fromkeys(spec, scales)
    expected = expected_storage(structure, present_shapes(spec), per_name)
    stored = storage(param.cov)
    assert set(stored) == set(expected)
    for path, (shape, _, std, random, _) in expected.items():
        value = backend.to_numpy(stored[path])
        assert value.shape == shape, path
        if not random:
            transform = expected[path].transform
            np.testing.assert_allclose(
                standard_deviations(value, transform), std, rtol=1e-14, err_msg=path
            )
            continue
        n = value.size
        # RMS about the known zero mean: relative standard error 1/sqrt(2n); allow 5 of them.
        rms = math.sqrt(float(np.mean(value**2)))
        assert rms == pytest.approx(std, rel=5 / math.sqrt(2 * n)), path
        # and centred: |mean| within 5 standard errors std/sqrt(n)
        assert abs(float(np.mean(value))) < 5 * std / math.sqrt(n), path


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reset_parameters_zero_scale_gives_zero_mean_storage(backend: Backend, case: Case) -> None:
    param, _ = make_parameter(case, backend, "float64")
    param.cov.reset_parameters(0.0, generator=backend.generator(0))
    for path, value in storage(param.cov).items():
        if path == "output_factor":
            # Kronecker's output factor has std 1/sqrt(output_rank), no mean scale
            assert np.any(backend.to_numpy(value) != 0), path
        elif path.startswith("scale."):
            # standard deviation 0 through softplus: the stored value is -inf
            np.testing.assert_array_equal(backend.to_numpy(value), -np.inf, err_msg=path)
        else:
            np.testing.assert_array_equal(backend.to_numpy(value), 0.0, err_msg=path)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reset_parameters_same_generator_same_parameters(backend: Backend, case: Case) -> None:
    param, _ = make_parameter(case, backend, "float64")
    shapes = present_shapes(case.spec)
    expected = expected_storage(case.structure, shapes, dict.fromkeys(shapes, 1.0))
    param.cov.reset_parameters(1.0, generator=backend.generator(42))
    first = as_numpy(backend, storage(param.cov))
    param.cov.reset_parameters(1.0, generator=backend.generator(42))
    again = as_numpy(backend, storage(param.cov))
    param.cov.reset_parameters(1.0, generator=backend.generator(43))
    other = as_numpy(backend, storage(param.cov))
    for path in first:
        np.testing.assert_array_equal(again[path], first[path], err_msg=path)
        if expected[path].random:
            assert not np.array_equal(other[path], first[path]), path


# ------------------------------------------------------------------ lr_scaling
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_lr_scaling_storage_and_ranks_as_documented(backend: Backend, case: Case) -> None:
    param, _ = make_parameter(case, backend, "float64")
    shapes = present_shapes(case.spec)
    expected = expected_storage(case.structure, shapes, dict.fromkeys(shapes, 1.0))
    assert param.cov.lr_scaling == {path: stored.lr_scaling for path, stored in expected.items()}
    for path, value in storage(param.cov).items():
        assert tuple(value.shape) == expected[path].shape, path
    assert param.cov.rank == expected_rank(case.structure, shapes)
    if case.structure in REQUESTED_KRONECKER_RANKS:
        assert param.cov.output_rank == expected["output_factor"].shape[1]
        assert param.cov.input_rank == expected["input_factor.weight"].shape[-1]


# --------------------------------------------------------- statistical smoke test
NUM_SAMPLES = 20_000


@pytest.mark.parametrize(
    "case",
    [case for case in CASES if case.id.endswith("-weight+bias")],
    ids=lambda case: case.id,
)
def test_sample_mean_and_covariance_match(backend: Backend, dtype: str, case: Case) -> None:
    """Smoke test: empirical moments of N samples vs mean and to_dense(), fixed seed."""
    param, _ = make_parameter(case, backend, dtype, seed=2024)
    names = list(present_shapes(case.spec))
    sample = param.sample(NUM_SAMPLES, generator=backend.generator(99))
    flat = np.concatenate(
        [backend.to_numpy(sample[name]).reshape(NUM_SAMPLES, -1) for name in names], axis=1
    )
    mean = np.concatenate([backend.to_numpy(param[name]).ravel() for name in names])
    sigma = backend.to_numpy(param.cov.to_dense())
    assert sigma.shape == (mean.size, mean.size)
    eps = float(np.finfo(dtype).eps)
    scale = float(np.max(np.abs(sigma)))

    variances = np.diag(sigma)
    mean_se = np.sqrt(variances / NUM_SAMPLES)
    np.testing.assert_array_less(
        np.abs(flat.mean(axis=0) - mean), 5 * mean_se + 100 * eps * (1 + np.abs(mean))
    )

    empirical = np.cov(flat, rowvar=False)
    cov_se = np.sqrt((np.outer(variances, variances) + sigma**2) / NUM_SAMPLES)
    np.testing.assert_array_less(np.abs(empirical - sigma), 5 * cov_se + 100 * eps * scale)
