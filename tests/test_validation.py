"""Bad inputs get clear errors that name the argument and give expected vs got.

Validation raises on static facts only (shapes, dtypes, namespaces, devices,
ranks), never on values: traced JAX calls with valid shapes do not raise, and
NaN means are accepted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import structcov as sc
from cases import CASES, STRUCTURES
from conftest import Backend
from test_random import present_means, storage

WEIGHT_BIAS = next(case for case in CASES if case.id == "factorized-rank3-weight+bias")


def weight_bias(backend: Backend, dtype: str = "float64", rank: int = 3) -> sc.GaussianParameter:
    """weight (3, 4) + bias (3,), P = 15, FactorizedCovariance(rank), parameters drawn."""
    rng = np.random.default_rng(0)
    mean = {
        "weight": backend.asarray(rng.standard_normal((3, 4)), dtype),
        "bias": backend.asarray(rng.standard_normal(3), dtype),
    }
    param = sc.GaussianParameter(mean, sc.FactorizedCovariance(rank=rank))
    param.cov.reset_parameters(1.0, generator=backend.generator(0))
    return param


def other_namespace_array(backend: Backend, value: np.ndarray) -> Any:
    """``value`` as an array of a different array library than ``backend``."""
    if backend.name == "numpy":
        import array_api_strict

        return array_api_strict.asarray(value)
    return np.asarray(value)


# ----------------------------------------------------------------------- ranks
RANKED: dict[str, tuple[Callable[[Any], Any], str]] = {
    "FactorizedCovariance": (lambda r: sc.FactorizedCovariance(rank=r), "rank"),
    "LowRankCovariance": (lambda r: sc.LowRankCovariance(r), "rank"),
    "Kronecker-input_rank": (lambda r: sc.KroneckerCovariance(input_rank=r), "input_rank"),
    "Kronecker-output_rank": (lambda r: sc.KroneckerCovariance(output_rank=r), "output_rank"),
}


@pytest.mark.parametrize("constructor", list(RANKED))
@pytest.mark.parametrize("value", [0, -1, -100])
def test_rank_below_one_is_a_value_error(constructor: str, value: int) -> None:
    make, argument = RANKED[constructor]
    with pytest.raises(ValueError, match=rf"`{argument}` must be >= 1, got {value}"):
        make(value)


@pytest.mark.parametrize("constructor", list(RANKED))
@pytest.mark.parametrize("value", [2.0, "3", True, False, [2]], ids=repr)
def test_rank_of_wrong_type_is_a_type_error(constructor: str, value: Any) -> None:
    make, argument = RANKED[constructor]
    with pytest.raises(
        TypeError, match=rf"`{argument}` must be a positive int.*got {re.escape(repr(value))}"
    ):
        make(value)


def test_low_rank_needs_a_rank() -> None:
    with pytest.raises(TypeError, match=r"`rank` must be a positive int, got None"):
        sc.LowRankCovariance(None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------- means
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_empty_mean_mapping(structure: str) -> None:
    with pytest.raises(ValueError, match=r"`mean` must contain at least one array.*empty"):
        sc.GaussianParameter({}, STRUCTURES[structure][0]())


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_mean_of_only_none(structure: str) -> None:
    with pytest.raises(ValueError, match=r"`mean` must contain at least one array.*None"):
        sc.GaussianParameter({"weight": None, "bias": None}, STRUCTURES[structure][0]())


def test_mean_none() -> None:
    with pytest.raises(ValueError, match=r"`mean`.*None"):
        sc.GaussianParameter(None, sc.DiagonalCovariance())  # type: ignore[arg-type]


@pytest.mark.parametrize("int_dtype", ["int32", "int64"])
def test_non_floating_mean(backend: Backend, int_dtype: str) -> None:
    integers = backend.xp.asarray(np.arange(6).reshape(2, 3), dtype=getattr(backend.xp, int_dtype))
    with pytest.raises(
        TypeError, match=rf"`mean\['mean'\]` must have a real floating dtype.*{int_dtype}"
    ):
        sc.GaussianParameter(integers, sc.DiagonalCovariance())
    floats = backend.asarray(np.zeros(2), "float64")
    with pytest.raises(
        TypeError, match=rf"`mean\['b'\]` must have a real floating dtype.*{int_dtype}"
    ):
        sc.GaussianParameter({"w": floats, "b": integers}, sc.FactorizedCovariance())


def test_means_of_different_float_dtypes(backend: Backend) -> None:
    mean = {
        "weight": backend.asarray(np.zeros((2, 3)), "float64"),
        "bias": backend.asarray(np.zeros(2), "float32"),
    }
    with pytest.raises(TypeError, match=r"`mean`.*dtype.*float64.*float32"):
        sc.GaussianParameter(mean, sc.KroneckerCovariance())


def test_mean_that_is_not_an_array(backend: Backend) -> None:
    with pytest.raises(TypeError, match=r"`mean\['bias'\]` must be an array, got builtins.list"):
        sc.GaussianParameter(
            {"weight": backend.asarray(np.zeros((2, 3)), "float64"), "bias": [0.0, 0.0]},
            sc.DiagonalCovariance(),
        )


def test_means_from_different_namespaces(backend: Backend) -> None:
    mean = {
        "weight": backend.asarray(np.zeros((2, 3)), "float64"),
        "bias": other_namespace_array(backend, np.zeros(2)),
    }
    with pytest.raises(TypeError, match=r"`mean` entries must be arrays of one array-API library"):
        sc.GaussianParameter(mean, sc.DiagonalCovariance())


def test_means_numpy_and_torch() -> None:
    torch = pytest.importorskip("torch")
    mean = {"weight": np.zeros((2, 3)), "bias": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(TypeError, match=r"`mean` entries.*numpy.ndarray.*torch.Tensor"):
        sc.GaussianParameter(mean, sc.FactorizedCovariance(rank=2))


def _strict_devices(backend: Backend) -> tuple[Any, Any]:
    if backend.name != "array_api_strict":
        pytest.skip("needs several devices: array_api_strict has them on any machine")
    xp = backend.xp
    return xp.Device("CPU_DEVICE"), xp.Device("device1")


def test_means_on_different_devices(backend: Backend) -> None:
    here, there = _strict_devices(backend)
    xp = backend.xp
    mean = {
        "weight": xp.asarray(np.zeros((2, 3)), dtype=xp.float64, device=here),
        "bias": xp.asarray(np.zeros(2), dtype=xp.float64, device=there),
    }
    with pytest.raises(ValueError, match=r"`mean` entries must live on one device.*device1"):
        sc.GaussianParameter(mean, sc.KroneckerCovariance())


def test_factor_matmul_input_on_another_device(backend: Backend) -> None:
    _, there = _strict_devices(backend)
    param = weight_bias(backend)
    z = backend.xp.asarray(np.zeros((2, 3)), dtype=backend.xp.float64, device=there)
    with pytest.raises(ValueError, match=r"`input`.*device"):
        param.cov.factor_matmul(z)


def test_additive_constant_on_another_device(backend: Backend) -> None:
    _, there = _strict_devices(backend)
    param = weight_bias(backend)
    xp = backend.xp
    z = xp.zeros((2, 3), dtype=xp.float64)
    constant = xp.zeros((15,), dtype=xp.float64, device=there)
    with pytest.raises(ValueError, match=r"`additive_constant`.*device"):
        param.cov.factor_matmul(z, additive_constant=constant)


def test_cov_that_is_not_a_covariance(backend: Backend) -> None:
    with pytest.raises(TypeError, match=r"`cov` must be a structcov covariance.*got str"):
        sc.GaussianParameter(backend.asarray(np.zeros(3), "float64"), "diagonal")  # type: ignore[arg-type]


# ------------------------------------------------------------- factor_matmul input
@pytest.mark.parametrize("shape", [(4, 2), (4, 4), (5,), (2, 3, 1), ()], ids=str)
def test_input_with_wrong_last_dimension(backend: Backend, shape: tuple[int, ...]) -> None:
    param = weight_bias(backend)
    z = backend.asarray(np.zeros(shape), "float64")
    with pytest.raises(
        ValueError, match=rf"`input` must have last dimension 3 .*got shape {re_shape(shape)}"
    ):
        param.cov.factor_matmul(z)


def re_shape(shape: tuple[int, ...]) -> str:
    """The regex of a tuple's repr."""
    return re.escape(str(shape))


@pytest.mark.parametrize(
    "param_dtype, input_dtype",
    [("float64", "float32"), ("float32", "float64"), ("float64", "int64")],
)
def test_input_with_wrong_dtype(backend: Backend, param_dtype: str, input_dtype: str) -> None:
    param = weight_bias(backend, param_dtype)
    z = backend.xp.asarray(np.zeros((2, 3)), dtype=getattr(backend.xp, input_dtype))
    with pytest.raises(
        TypeError,
        match=rf"`input` must have the covariance parameters' dtype .*{param_dtype}"
        rf".*got .*{input_dtype}",
    ):
        param.cov.factor_matmul(z)


def test_input_from_another_namespace(backend: Backend) -> None:
    param = weight_bias(backend)
    with pytest.raises(TypeError, match=r"`input`.*one array-API library"):
        param.cov.factor_matmul(other_namespace_array(backend, np.zeros((2, 3))))


# ------------------------------------------------------------- additive_constant
def _zeros(backend: Backend, shape: tuple[int, ...], dtype: str = "float64") -> Any:
    return backend.asarray(np.zeros(shape), dtype)


@pytest.mark.parametrize("shape", [(14,), (16,), (1, 15), (15, 1), ()], ids=str)
def test_flat_additive_constant_of_wrong_shape(backend: Backend, shape: tuple[int, ...]) -> None:
    param = weight_bias(backend)
    with pytest.raises(
        ValueError,
        match=rf"`additive_constant` must have shape \(15,\) .*got {re_shape(shape)}",
    ):
        param.cov.factor_matmul(_zeros(backend, (2, 3)), additive_constant=_zeros(backend, shape))


@pytest.mark.parametrize(
    "keys",
    [("weight",), ("bias",), ("weight", "bias", "extra"), ("weight", "b")],
    ids=lambda keys: "+".join(keys),
)
def test_additive_constant_with_wrong_keys(backend: Backend, keys: tuple[str, ...]) -> None:
    param = weight_bias(backend)
    shapes = {"weight": (3, 4), "bias": (3,), "extra": (3,), "b": (3,)}
    constant = {key: _zeros(backend, shapes[key]) for key in keys}
    with pytest.raises(
        ValueError, match=r"`additive_constant` must have the keys \['weight', 'bias'\]"
    ):
        param.cov.factor_matmul(_zeros(backend, (2, 3)), additive_constant=constant)


@pytest.mark.parametrize(
    "weight_shape, bias_shape",
    [((4, 3), (3,)), ((12,), (3,)), ((3, 4), (1, 3)), ((2, 3, 4), (3,))],
    ids=str,
)
def test_additive_constant_entry_of_wrong_shape(
    backend: Backend, weight_shape: tuple[int, ...], bias_shape: tuple[int, ...]
) -> None:
    param = weight_bias(backend)
    constant = {"weight": _zeros(backend, weight_shape), "bias": _zeros(backend, bias_shape)}
    bad, expected, got = (
        ("weight", (3, 4), weight_shape) if weight_shape != (3, 4) else ("bias", (3,), bias_shape)
    )
    with pytest.raises(
        ValueError,
        match=rf"`additive_constant\['{bad}'\]` must have shape {re_shape(expected)}, "
        rf"got {re_shape(got)}",
    ):
        param.cov.factor_matmul(_zeros(backend, (2, 3)), additive_constant=constant)


def test_additive_constant_of_wrong_dtype(backend: Backend) -> None:
    param = weight_bias(backend, "float64")
    z = _zeros(backend, (2, 3))
    with pytest.raises(TypeError, match=r"`additive_constant`.*dtype.*float64.*got.*float32"):
        param.cov.factor_matmul(z, additive_constant=_zeros(backend, (15,), "float32"))
    constant = {"weight": _zeros(backend, (3, 4), "float32"), "bias": _zeros(backend, (3,))}
    with pytest.raises(TypeError, match=r"`additive_constant\['weight'\]`.*dtype.*float32"):
        param.cov.factor_matmul(z, additive_constant=constant)


def test_additive_constant_that_is_not_an_array(backend: Backend) -> None:
    param = weight_bias(backend)
    with pytest.raises(TypeError, match="`additive_constant`"):
        param.cov.factor_matmul(_zeros(backend, (2, 3)), additive_constant=[0.0] * 15)


def test_additive_constant_from_another_namespace(backend: Backend) -> None:
    param = weight_bias(backend)
    z = _zeros(backend, (2, 3))
    with pytest.raises(TypeError, match=r"`additive_constant`.*one array-API library"):
        param.cov.factor_matmul(z, additive_constant=other_namespace_array(backend, np.zeros(15)))
    constant = {
        "weight": other_namespace_array(backend, np.zeros((3, 4))),
        "bias": _zeros(backend, (3,)),
    }
    with pytest.raises(TypeError, match=r"`additive_constant.*one array-API library"):
        param.cov.factor_matmul(z, additive_constant=constant)


# ------------------------------------------------------------------- Kronecker
@pytest.mark.parametrize(
    "spec",
    [
        {"w": (3, 4)},
        {"weight": (3, 4), "scale": (3,)},
        {"bias": (3,)},
        {"mean": (3, 4)},
    ],
    ids=["w", "weight+scale", "bias-only", "mean"],
)
def test_kronecker_needs_weight_and_at_most_bias(
    backend: Backend, spec: dict[str, tuple[int, ...]]
) -> None:
    mean = {name: _zeros(backend, shape) for name, shape in spec.items()}
    with pytest.raises(ValueError, match=rf"`weight`.*`bias`.*got {re_list(list(spec))}"):
        sc.GaussianParameter(mean, sc.KroneckerCovariance())


def re_list(names: list[str]) -> str:
    return re.escape(str(names))


def test_kronecker_bare_array_is_not_a_layer(backend: Backend) -> None:
    with pytest.raises(ValueError, match=r"`weight`.*got \['mean'\]"):
        sc.GaussianParameter(_zeros(backend, (3, 4)), sc.KroneckerCovariance())


@pytest.mark.parametrize("weight_shape", [(4,), ()], ids=str)
def test_kronecker_weight_needs_two_dimensions(
    backend: Backend, weight_shape: tuple[int, ...]
) -> None:
    with pytest.raises(
        ValueError,
        match=rf"`weight` of shape \(d_out, \*in_shape\).*got shape {re_shape(weight_shape)}",
    ):
        sc.GaussianParameter({"weight": _zeros(backend, weight_shape)}, sc.KroneckerCovariance())


@pytest.mark.parametrize("bias_shape", [(4,), (2,), (3, 1), (1, 3), ()], ids=str)
def test_kronecker_bias_of_wrong_shape(backend: Backend, bias_shape: tuple[int, ...]) -> None:
    mean = {"weight": _zeros(backend, (3, 4)), "bias": _zeros(backend, bias_shape)}
    with pytest.raises(
        ValueError, match=rf"`bias` of shape \(3,\) \(d_out\), got {re_shape(bias_shape)}"
    ):
        sc.GaussianParameter(mean, sc.KroneckerCovariance(input_rank=2))


# ----------------------------------------------------------- before initialization
USES: dict[str, Callable[[Any, Backend], Any]] = {
    "factor_matmul": lambda cov, backend: cov.factor_matmul(_zeros(backend, (2, 3))),
    "to_dense": lambda cov, backend: cov.to_dense(),
    "reset_parameters": lambda cov, backend: cov.reset_parameters(
        1.0, generator=backend.generator(0)
    ),
    "lr_scaling": lambda cov, backend: cov.lr_scaling,
}


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("use", list(USES))
def test_use_before_initialize_parameters(backend: Backend, structure: str, use: str) -> None:
    cov = STRUCTURES[structure][0]()
    with pytest.raises(RuntimeError, match=r"not been initialized.*initialize_parameters"):
        USES[use](cov, backend)


# ------------------------------------------------------------ mean_parameter_scales
@pytest.mark.parametrize(
    "scales",
    [{"weight": 1.0}, {"bias": 1.0}, {"weight": 1.0, "bias": 1.0, "other": 1.0}, {}],
    ids=["no-bias", "no-weight", "extra", "empty"],
)
def test_scales_with_wrong_keys(backend: Backend, scales: dict[str, float]) -> None:
    param = weight_bias(backend)
    with pytest.raises(
        ValueError, match=r"`mean_parameter_scales` must have the keys \['weight', 'bias'\]"
    ):
        param.cov.reset_parameters(scales, generator=backend.generator(0))


@pytest.mark.parametrize(
    "scales, bad",
    [
        (-1.0, "-1.0"),
        (-1, "-1"),
        ({"weight": 1.0, "bias": -0.5}, "-0.5"),
        (math.nan, "nan"),
        ({"weight": math.nan, "bias": 1.0}, "nan"),
    ],
    ids=["negative", "negative-int", "negative-in-dict", "nan", "nan-in-dict"],
)
def test_scales_negative_or_nan(backend: Backend, scales: Any, bad: str) -> None:
    param = weight_bias(backend)
    with pytest.raises(ValueError, match=rf"`mean_parameter_scales`.*{bad}"):
        param.cov.reset_parameters(scales, generator=backend.generator(0))


@pytest.mark.parametrize("scales", ["1.0", None, [1.0, 1.0]], ids=repr)
def test_scales_of_wrong_type(backend: Backend, scales: Any) -> None:
    param = weight_bias(backend)
    with pytest.raises((TypeError, ValueError), match="`mean_parameter_scales`"):
        param.cov.reset_parameters(scales, generator=backend.generator(0))


# ---------------------------------------------------------------- sample_shape
@pytest.mark.parametrize("sample_shape", [-1, (2, -1), 2.0, (2.0,), "3", True], ids=repr)
def test_bad_sample_shape(backend: Backend, sample_shape: Any) -> None:
    param = weight_bias(backend)
    with pytest.raises((TypeError, ValueError), match="`sample_shape`"):
        param.sample(sample_shape, generator=backend.generator(0))


# ---------------------------------------------------------- values never checked
@pytest.mark.parametrize("case", [WEIGHT_BIAS], ids=lambda case: case.id)
def test_non_finite_means_are_accepted(backend: Backend, case: Any) -> None:
    mean = {
        "weight": backend.asarray(np.full((3, 4), np.nan), "float64"),
        "bias": backend.asarray(np.array([np.inf, -np.inf, 0.0]), "float64"),
    }
    param = sc.GaussianParameter(mean, case.make_cov())
    param.cov.reset_parameters(1.0, generator=backend.generator(0))
    sample = param.sample((2,), generator=backend.generator(1))
    assert np.isnan(backend.to_numpy(sample["weight"])).all()


def test_static_checks_only_under_jax_jit(backend: Backend) -> None:
    """Traced means, storage, inputs and keys with valid shapes: nothing raises."""
    if backend.name != "jax":
        pytest.skip("jax.jit only")
    import jax
    import jax.numpy as jnp

    param = weight_bias(backend)
    means = present_means(param)
    stored = storage(param.cov)

    # Pass the means as a tuple: JAX sorts dict keys when it flattens a pytree, which
    # would reorder the flat parameter vector inside the traced function.
    @jax.jit
    def run(weight: Any, bias: Any, z: Any, flat: Any, key: Any) -> tuple:
        means = {"weight": weight, "bias": bias}
        cov = sc.FactorizedCovariance(rank=3)
        traced = sc.GaussianParameter(means, cov)
        cov.reset_parameters({"weight": 0.5, "bias": 2.0}, generator=key)
        for path, value in stored.items():  # the concrete storage, as constants
            assert path.startswith("factor.")
            cov.factor[path.removeprefix("factor.")] = value * jnp.ones_like(value)
        return (
            cov.factor_matmul(z, additive_constant=means),
            cov.factor_matmul(z, additive_constant=flat),
            cov.to_dense(),
            traced.sample((2,), generator=key),
            cov.lr_scaling,
        )

    z = jnp.zeros((4, 3))
    flat = jnp.concatenate([jnp.reshape(means["weight"], (-1,)), means["bias"]])
    fm_dict, fm_flat, dense, sample, lr_scaling = run(
        means["weight"], means["bias"], z, flat, jax.random.key(0)
    )
    for name in means:
        np.testing.assert_array_equal(np.asarray(fm_dict[name]), np.asarray(fm_flat[name]))
        assert sample[name].shape == (2, *means[name].shape)
    assert dense.shape == (15, 15)
    assert lr_scaling == {"factor.weight": 1 / 3, "factor.bias": 1 / 3}


def test_static_errors_still_raise_under_jax_jit(backend: Backend) -> None:
    """Shape and dtype facts are known while tracing: the same clear errors come out."""
    if backend.name != "jax":
        pytest.skip("jax.jit only")
    import jax
    import jax.numpy as jnp

    param = weight_bias(backend)
    with pytest.raises(ValueError, match=r"`input` must have last dimension 3"):
        jax.jit(param.cov.factor_matmul)(jnp.zeros((4, 2)))
    with pytest.raises(TypeError, match=r"`input` must have the covariance parameters' dtype"):
        jax.jit(param.cov.factor_matmul)(jnp.zeros((4, 3), dtype=jnp.float32))
    with pytest.raises(ValueError, match=r"`additive_constant` must have shape \(15,\)"):
        jax.jit(lambda c: param.cov.factor_matmul(jnp.zeros((4, 3)), additive_constant=c))(
            jnp.zeros(14)
        )
    with pytest.raises(TypeError, match=r"`generator` must be a single JAX PRNG key"):
        jax.jit(lambda keys: param.sample((2,), generator=keys))(
            jax.random.split(jax.random.key(0), 2)
        )
    with pytest.raises(TypeError, match=r"`mean\['mean'\]` must have a real floating dtype"):
        jax.jit(lambda m: sc.GaussianParameter(m, sc.DiagonalCovariance()).sample((), None))(
            jnp.zeros(3, dtype=jnp.int32)
        )
