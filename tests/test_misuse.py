"""Misuse, as a careless user commits it: every case raises a clear error that names the
argument (or is accepted where it should be), and nothing already built changes.

Walks the list of the misuse issue on every backend; the cases that belong to one
adapter live beside it (tests/test_torch_adapter.py: modules given to core functions,
``sample_scale`` on a module; tests/covariances/test_structures.py: ownership, atomic
construction, validated storage assignment).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import structcov as sc
from conftest import Backend


def _arrays(backend: Backend, spec: dict[str, tuple[int, ...]], seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    return {n: backend.asarray(rng.standard_normal(s), "float64") for n, s in spec.items()}


def _param(backend: Backend, cov: Any = None, spec: Any = None) -> sc.GaussianParameter:
    mean = _arrays(backend, spec or {"weight": (3, 4), "bias": (3,)})
    param = sc.GaussianParameter(mean, cov if cov is not None else sc.DiagonalCovariance())
    param.cov.reset_parameters(0.5, backend.generator(1))
    return param


def _other_library(backend: Backend) -> Any:
    """Arrays of another array library than the backend's (NumPy, or array_api_strict)."""
    if backend.name == "numpy":
        import array_api_strict

        return lambda a: array_api_strict.asarray(a)
    return lambda a: np.asarray(a)


# ------------------------------------------------------------ settings of a structure
def test_sample_scale_only_where_it_means_something(backend: Backend) -> None:
    param = _param(backend)
    with pytest.raises(AttributeError, match="has no setting 'sample_scale'"):
        param.cov.sample_scale = 0.1
    with pytest.raises(AttributeError, match="has no setting 'rnak'"):
        param.cov.rnak = 3  # a typo is not silently stored
    kron = _param(backend, sc.KroneckerCovariance())
    for bad in ("2", float("nan"), float("inf"), -0.5, None):
        with pytest.raises(ValueError, match="`sample_scale` must be a finite float >= 0"):
            kron.cov.sample_scale = bad
    with pytest.raises(AttributeError):
        kron.cov.rank = 3  # derived from the structure, not settable


def test_singular_kronecker_says_why(backend: Backend) -> None:
    kron = _param(backend, sc.KroneckerCovariance())
    kron.cov.sample_scale = 0
    x = backend.asarray(np.zeros(15), "float64")
    with pytest.raises(ValueError, match="singular \\(sample_scale is 0\\)"):
        kron.cov.solve(x)
    low = _param(backend, sc.KroneckerCovariance(input_rank=2))
    with pytest.raises(ValueError, match="input_rank 2 of d_in \\+ has_bias = 5"):
        low.cov.solve(x)


# ------------------------------------------------------------------- normal_prior
@pytest.mark.parametrize("scale", [None, "2", True, object()])
def test_normal_prior_rejects_scales_that_are_not_numbers(backend: Backend, scale: Any) -> None:
    with pytest.raises(TypeError, match="`scale` for 'weight' must be a float >= 0"):
        sc.normal_prior(_param(backend), scale)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0])
def test_normal_prior_rejects_bad_numbers(backend: Backend, scale: float) -> None:
    with pytest.raises(ValueError, match="`scale` for 'weight' must be a finite float >= 0"):
        sc.normal_prior(_param(backend), scale)


def test_normal_prior_mapping_and_array_scales(backend: Backend) -> None:
    param = _param(backend)
    with pytest.raises(ValueError, match=r"`scale` must have the keys \['weight', 'bias'\]"):
        sc.normal_prior(param, {"weight": 1.0, "bias": 1.0, "extra": 2.0})
    with pytest.raises(ValueError, match=r"`scale` must have the keys"):
        sc.normal_prior(param, {"weight": 1.0})
    wrong = backend.asarray(np.ones(4), "float64")
    with pytest.raises(ValueError, match=r"`scale` for 'bias' must broadcast to .* \(3,\)"):
        sc.normal_prior(param, {"weight": 1.0, "bias": wrong})
    other = _other_library(backend)(np.ones(3))
    with pytest.raises(TypeError, match="`scale` for 'bias' and the means"):
        sc.normal_prior(param, {"weight": 1.0, "bias": other})
    # Accepted: NumPy scalars, a per-row array that broadcasts, float32 cast to the means'.
    column = backend.asarray(np.full((3, 1), 2.0), "float32")
    prior = sc.normal_prior(param, {"weight": column, "bias": np.float32(0.5)})
    np.testing.assert_array_equal(backend.to_numpy(prior.cov.scale["weight"]), np.full((3, 4), 2.0))
    np.testing.assert_array_equal(backend.to_numpy(prior.cov.scale["bias"]), np.full(3, 0.5))


# -------------------------------------------------------------------- zero-size means
@pytest.mark.parametrize(
    ("cov", "spec", "match"),
    [
        (lambda: sc.LowRankCovariance(2), {"w": (0,)}, "needs at least one parameter"),
        (sc.FactorizedCovariance, {"w": (2, 0)}, "needs at least one parameter"),
        (lambda: sc.LowRankPlusDiagonalCovariance(2), {"w": (0,)}, "needs at least one"),
        (sc.KroneckerCovariance, {"weight": (3, 0)}, "needs d_out >= 1 and d_in"),
        (sc.KroneckerCovariance, {"weight": (0, 3)}, "needs d_out >= 1 and d_in"),
    ],
    ids=["lowrank-0", "factorized-2x0", "lrpd-0", "kronecker-3x0", "kronecker-0x3"],
)
def test_zero_size_means_get_one_clear_error(
    backend: Backend, cov: Any, spec: dict[str, tuple[int, ...]], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        sc.GaussianParameter(_arrays(backend, spec), cov())


def test_zero_size_means_work_with_a_diagonal(backend: Backend) -> None:
    param = sc.GaussianParameter(_arrays(backend, {"w": (0,)}), sc.DiagonalCovariance())
    assert param.num_params == 0
    assert tuple(param.sample((2,), backend.generator(0))["w"].shape) == (2, 0)
    assert float(backend.to_numpy(param.cov.logdet())) == 0.0
    assert float(backend.to_numpy(sc.kl_divergence(param, 1.5))) == 0.0


# --------------------------------------------------------------- values of a parameter
def test_a_bare_parameter_takes_a_bare_value(backend: Backend) -> None:
    mean = backend.asarray(np.zeros(5), "float64")
    param = sc.GaussianParameter(mean, sc.DiagonalCovariance())
    param.cov.reset_parameters(1.0, backend.generator(0))
    bare = param.log_prob(backend.asarray(np.ones(5), "float64"))
    mapped = param.log_prob({"mean": backend.asarray(np.ones(5), "float64")})
    np.testing.assert_allclose(backend.to_numpy(bare), backend.to_numpy(mapped))


def test_a_bare_value_for_a_named_parameter_says_what_is_expected(backend: Backend) -> None:
    param = _param(backend)
    with pytest.raises(TypeError, match=r"`value` must be a mapping name -> array .*'weight'"):
        param.log_prob(backend.asarray(np.zeros(15), "float64"))
    with pytest.raises(TypeError, match=r"`value\['bias'\]` must be an array, got float"):
        param.log_prob({"weight": backend.asarray(np.zeros((3, 4)), "float64"), "bias": 1.0})


def test_additive_constant_of_numbers_names_the_entry(backend: Backend) -> None:
    param = _param(backend, spec={"w": (3,)})
    z = backend.asarray(np.zeros(3), "float64")
    with pytest.raises(TypeError, match=r"`additive_constant\['w'\]` must be an array"):
        param.cov.factor_matmul(z, additive_constant={"w": 1.0})
    with pytest.raises(TypeError, match="`additive_constant` must be an array of shape"):
        param.cov.factor_matmul(z, additive_constant=[0.0, 0.0, 0.0])


def test_load_storage_given_a_list(backend: Backend) -> None:
    param = _param(backend)
    with pytest.raises(TypeError, match="`storage` must be a mapping path -> array, got list"):
        param.cov.load_storage(list(param.cov.storage().values()))


# ------------------------------------------------------------------- mixed libraries
def test_mixed_libraries_name_both(backend: Backend) -> None:
    q = _param(backend)
    other = _other_library(backend)
    p = sc.GaussianParameter(
        {"weight": other(np.zeros((3, 4))), "bias": other(np.zeros(3))}, sc.DiagonalCovariance()
    )
    p.cov.load_storage({path: other(np.ones(v.shape)) for path, v in p.cov.storage().items()})
    with pytest.raises(TypeError, match="`q` and `p` must be arrays of one array-API library"):
        sc.kl_divergence(q, p)
    value = {"weight": other(np.zeros((3, 4))), "bias": other(np.zeros(3))}
    with pytest.raises(TypeError, match="`value` and the parameter must be arrays of one"):
        q.log_prob(value)
    x = other(np.zeros(15))
    with pytest.raises(TypeError, match="`x` and the covariance parameters must be arrays of one"):
        q.cov.matmul(x)


# ------------------------------------------------------------------ over-strict inputs
def test_numpy_integers_and_floats_are_accepted(backend: Backend) -> None:
    param = _param(backend, sc.LowRankPlusDiagonalCovariance(np.int64(4)))
    assert param.cov.rank == 4
    param.cov.reset_parameters(np.float32(0.1), backend.generator(2))
    param.cov.reset_parameters({"weight": np.float64(0.1), "bias": 1}, backend.generator(2))
    samples = param.sample(np.int64(3), backend.generator(3))
    assert tuple(samples["bias"].shape) == (3, 3)
    samples = param.sample((np.int64(2), 2), backend.generator(3))
    assert tuple(samples["bias"].shape) == (2, 2, 3)
    kron = _param(backend, sc.KroneckerCovariance(np.int64(2), np.int32(2)))
    assert (kron.cov.input_rank, kron.cov.output_rank) == (2, 2)
    kron.cov.sample_scale = np.float32(0.5)
    assert kron.cov.sample_scale == 0.5


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True, (2, -1)])
def test_bad_sample_shapes_name_the_argument(backend: Backend, bad: Any) -> None:
    with pytest.raises(TypeError, match="`sample_shape` must be a tuple of non-negative ints"):
        _param(backend).sample(bad, backend.generator(0))


# ---------------------------------------------------------------------- .npz files
def test_npz_with_a_nan_sample_scale_does_not_load(backend: Backend, tmp_path: Path) -> None:
    if backend.name != "numpy":
        pytest.skip("structcov.numpy files hold NumPy arrays: one backend is enough")
    import json

    import structcov.numpy as scnp

    param = _param(backend, sc.KroneckerCovariance())
    arrays = scnp.to_dict(param)
    meta = json.loads(str(arrays[scnp.METADATA_KEY]))
    meta["sample_scale"] = float("nan")
    arrays[scnp.METADATA_KEY] = np.asarray(json.dumps(meta))
    with pytest.raises(ValueError, match="`sample_scale` must be a finite float >= 0"):
        scnp.from_dict(arrays)
    path = tmp_path / "q.npz"
    scnp.save(path, param)
    with open(path, encoding="latin-1") as text, pytest.raises(TypeError, match="binary file"):
        scnp.load(text)  # type: ignore[arg-type]
    with open(path, "rb") as binary:
        assert scnp.load(binary).cov.sample_scale == 1.0
    assert isinstance(io.BytesIO(path.read_bytes()), io.BufferedIOBase)
