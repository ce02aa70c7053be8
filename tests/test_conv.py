"""The functional convolution `structcov.conv` against a float64 NumPy oracle.

The oracle (`correlate`) is written here from the definition, one output position
at a time: ``y[n, o, p] = b[o] + sum_{c, j} W[o, c, j] x_pad[n, g(o) C_g + c,
p * stride + j * dilation]`` over ``np.pad``-ded float64 input, independently of the
code under test (which sums over kernel offsets, or calls torch / JAX). Parameter
samples come from ``param.sample(sample_shape, generator(seed))``; ``conv`` gets a
generator with the same seed, so agreement proves both each structure's shortcut and
that ``conv`` uses the very same noise as ``param.sample``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import structcov as sc
import structcov.convolution as conv_module
from conftest import Backend, tolerance
from structcov._array_api import device_of
from structcov.convolution import array_api_conv, conv, register_conv
from structcov.covariances import Kronecker

STRUCTURES: dict[str, Callable[[], sc.FactorizedCovariance]] = {
    "diagonal": lambda: sc.DiagonalCovariance(),
    "lowrank-2": lambda: sc.LowRankCovariance(2),
    "factorized-full": lambda: sc.FactorizedCovariance(),
    "lowrank+diag-2": lambda: sc.LowRankPlusDiagonalCovariance(2),
    "kronecker-full": lambda: sc.KroneckerCovariance(),
    "kronecker-2x1": lambda: sc.KroneckerCovariance(input_rank=2, output_rank=1),
}
BIASES = ("bias", "no-bias", "bias-None")
SAMPLE_SHAPES = [(), (3,), (2, 2), None]


@dataclass(frozen=True)
class Geometry:
    """One convolution: weight (c_out, c_in / groups, *kernel), input (c_in, *spatial)."""

    c_in: int
    c_out: int
    kernel: tuple[int, ...]
    spatial: tuple[int, ...]
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1

    @property
    def ndim(self) -> int:
        return len(self.kernel)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.c_out, self.c_in // self.groups, *self.kernel)

    def options(self) -> dict[str, Any]:
        return {
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "groups": self.groups,
        }


GEOMETRIES = {
    "1d-stride2-pad1-groups2": Geometry(4, 4, (3,), (7,), stride=2, padding=1, groups=2),
    "2d-mixed": Geometry(3, 2, (2, 3), (5, 6), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
    "2d-valid-groups2": Geometry(4, 2, (2, 2), (4, 3), padding="valid", groups=2),
    "3d-same": Geometry(2, 2, (2, 1, 3), (3, 2, 4), padding="same", dilation=(1, 1, 2)),
}


def per_dimension(value: Any, ndim: int) -> tuple[int, ...]:
    return (value,) * ndim if isinstance(value, int) else tuple(value)


def correlate(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    geometry: Geometry,
) -> np.ndarray:
    """The float64 oracle: x (N, C_in, *spatial), weight (C_out, C_g, *k) -> (N, C_out, *out).

    One output position at a time: the (N, C_in, *k) window it reads, dotted with each
    output channel's kernel over its group's input channels.
    """
    ndim = geometry.ndim
    kernel = tuple(weight.shape[2:])
    stride = per_dimension(geometry.stride, ndim)
    dilation = per_dimension(geometry.dilation, ndim)
    if geometry.padding == "valid":
        pads = [(0, 0)] * ndim
    elif geometry.padding == "same":
        pads = [
            (d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
            for k, d in zip(kernel, dilation, strict=True)
        ]
    else:
        pads = [(p, p) for p in per_dimension(geometry.padding, ndim)]
    xp_ = np.pad(x, [(0, 0), (0, 0), *pads])
    padded = xp_.shape[2:]
    out = tuple(
        (n - d * (k - 1) - 1) // s + 1
        for n, k, s, d in zip(padded, kernel, stride, dilation, strict=True)
    )
    c_out, c_group = weight.shape[:2]
    per_group = c_out // geometry.groups
    y = np.zeros((x.shape[0], c_out, *out))
    for position in np.ndindex(*out):
        window = xp_[
            (
                slice(None),
                slice(None),
                *(
                    slice(p * s, p * s + d * (k - 1) + 1, d)
                    for p, s, d, k in zip(position, stride, dilation, kernel, strict=True)
                ),
            )
        ]  # (N, C_in, *k)
        for o in range(c_out):
            group = o // per_group
            channels = window[:, group * c_group : (group + 1) * c_group]
            y[(slice(None), o, *position)] = np.sum(
                channels * weight[o], axis=tuple(range(1, ndim + 2))
            )
    if bias is not None:
        y = y + bias.reshape((1, c_out) + (1,) * ndim)
    return y


def generator(backend: Backend, seed: int) -> Any:
    """An ``rbg`` key on JAX (eager JAX compiles its draw per shape; rbg is faster)."""
    if backend.name == "jax":
        import jax

        return jax.random.key(seed, impl="rbg")
    return backend.generator(seed)


def jax_slice(backend: Backend, keep: bool) -> None:
    """Skip the case on JAX unless ``keep``: eager JAX compiles every new shape."""
    if backend.name == "jax" and not keep:
        pytest.skip("eager JAX compiles every new shape: this grid runs a slice on JAX")


def shape_id(shape: Any) -> str:
    return "None" if shape is None else "x".join(map(str, shape)) or "scalar"


_CACHE: dict[tuple[Any, ...], Any] = {}


def make_param(
    backend: Backend,
    structure: str,
    geometry: Geometry,
    bias: str,
    dtype: str,
    sample_scale: float = 1.0,
) -> sc.GaussianParameter:
    """A conv parameter with random means and non-trivial storage (cached; on JAX built
    with NumPy and moved leaf by leaf, as tests/test_layers.py does)."""
    key = (backend.name, structure, geometry, bias, dtype, sample_scale)
    if key not in _CACHE:
        on_jax = backend.name == "jax"
        build = np.asarray if on_jax else backend.asarray
        rng = np.random.default_rng(0)
        mean: dict[str, Any] = {"weight": build(rng.standard_normal(geometry.weight_shape), dtype)}
        if bias == "bias":
            mean["bias"] = build(rng.standard_normal(geometry.c_out), dtype)
        elif bias == "bias-None":
            mean["bias"] = None
        cov = STRUCTURES[structure]()
        param = sc.GaussianParameter(mean, cov)
        cov.reset_parameters(0.5, np.random.default_rng(1) if on_jax else backend.generator(1))
        if sample_scale != 1.0:
            cov.sample_scale = sample_scale
        if on_jax:
            import jax

            import structcov.jax  # noqa: F401  (the core objects become pytrees)

            param = jax.tree_util.tree_map(backend.xp.asarray, param)
        _CACHE[key] = param
    return _CACHE[key]


def reference(
    backend: Backend,
    x: np.ndarray,
    samples: dict[str, Any],
    geometry: Geometry,
    sample_shape: tuple[int, ...],
    per_sample: bool = False,
) -> np.ndarray:
    """float64 conv(x_s, W_s) + b_s for each sample, shaped (*S, *batch, C_out, *out)."""
    num_samples = math.prod(sample_shape)
    weight = backend.to_numpy(samples["weight"]).reshape(num_samples, *geometry.weight_shape)
    bias = samples.get("bias")
    biases = None if bias is None else backend.to_numpy(bias).reshape(num_samples, -1)
    lead = len(sample_shape) if per_sample else 0
    batch = x.shape[lead : x.ndim - geometry.ndim - 1]
    inputs = x.reshape(num_samples if per_sample else 1, -1, *x.shape[x.ndim - geometry.ndim - 1 :])
    outs = [
        correlate(
            inputs[s if per_sample else 0],
            weight[s],
            None if biases is None else biases[s],
            geometry,
        )
        for s in range(num_samples)
    ]
    stacked = np.stack(outs)
    return stacked.reshape(*sample_shape, *batch, *stacked.shape[2:])


def mean_reference(
    backend: Backend, x: np.ndarray, param: sc.GaussianParameter, geometry: Geometry
) -> np.ndarray:
    bias = param.mean.get("bias")
    batch = x.shape[: x.ndim - geometry.ndim - 1]
    y = correlate(
        x.reshape(-1, *x.shape[len(batch) :]),
        backend.to_numpy(param["weight"]),
        None if bias is None else backend.to_numpy(bias),
        geometry,
    )
    return y.reshape(*batch, *y.shape[1:])


def assert_matches(backend: Backend, got: Any, expected: np.ndarray, like: Any, dtype: str) -> None:
    assert type(got) is type(like)
    assert got.dtype == like.dtype
    assert device_of(got) == device_of(like)
    assert tuple(got.shape) == expected.shape
    np.testing.assert_allclose(backend.to_numpy(got), expected, **tolerance(dtype))


def make_input(backend: Backend, shape: tuple[int, ...], dtype: str, seed: int) -> tuple[Any, Any]:
    x_np = np.random.default_rng(seed).standard_normal(shape)
    return x_np, backend.asarray(x_np, dtype)


# ----------------------------------------------------------------------- the hooks
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_array_api_fallback_matches_the_oracle(backend: Backend, geometry: Geometry) -> None:
    """The generic fallback on every backend (on torch/JAX too, where conv uses a hook)."""
    x_np, x = make_input(backend, (2, geometry.c_in, *geometry.spatial), "float64", 0)
    w_np, w = make_input(backend, geometry.weight_shape, "float64", 1)
    ndim = geometry.ndim
    kernel = geometry.kernel
    stride = per_dimension(geometry.stride, ndim)
    dilation = per_dimension(geometry.dilation, ndim)
    padding = conv_module._padding(geometry.padding, kernel, stride, dilation)
    got = array_api_conv(
        backend.xp,
        x,
        w,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=geometry.groups,
    )
    assert_matches(backend, got, correlate(x_np, w_np, None, geometry), x, "float64")


def test_backend_hooks_are_registered_lazily(backend: Backend) -> None:
    expected = {"torch": conv_module._torch_conv, "jax": conv_module._jax_conv}
    assert conv_module._hook(backend.xp) is expected.get(backend.name, array_api_conv)


def test_register_conv(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registered hook (by name, or by predicate) is the one `conv` calls; the latest wins."""
    monkeypatch.setattr(conv_module, "_HOOKS", list(conv_module._HOOKS))
    calls: list[str] = []

    def counting(label: str) -> Any:
        def hook(xp: Any, x: Any, weight: Any, **options: Any) -> Any:
            calls.append(label)
            return array_api_conv(xp, x, weight, **options)

        return hook

    geometry = GEOMETRIES["2d-mixed"]
    param = make_param(backend, "kronecker-2x1", geometry, "bias", "float64")
    x_np, x = make_input(backend, (2, geometry.c_in, *geometry.spatial), "float64", 3)
    register_conv(backend.name, counting("name"))
    got = conv(x, param, None, **geometry.options())
    assert calls and set(calls) == {"name"}
    assert_matches(backend, got, mean_reference(backend, x_np, param, geometry), x, "float64")
    register_conv(lambda xp: xp is backend.xp, counting("predicate"))
    calls.clear()
    conv(x, param, (2,), generator(backend, 0), **geometry.options())
    assert calls and set(calls) == {"predicate"}
    with pytest.raises(TypeError, match=r"`predicate_or_namespace_name` must be"):
        register_conv(3, counting("bad"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`fn` must be callable"):
        register_conv("numpy", None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------- the oracle grid
@pytest.mark.parametrize("sample_shape", SAMPLE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
@pytest.mark.parametrize("structure", STRUCTURES)
def test_matches_parameter_samples(
    backend: Backend,
    dtype: str,
    structure: str,
    geometry: Geometry,
    sample_shape: tuple[int, ...] | None,
) -> None:
    jax_slice(backend, dtype == "float64" or sample_shape == (2, 2))
    param = make_param(backend, structure, geometry, "bias", dtype)
    x_np, x = make_input(backend, (2, geometry.c_in, *geometry.spatial), dtype, 2)
    got = conv(x, param, sample_shape, generator(backend, 7), **geometry.options())
    if sample_shape is None:
        expected = mean_reference(backend, x_np, param, geometry)
    else:
        samples = param.sample(sample_shape, generator(backend, 7))
        expected = reference(backend, x_np, samples, geometry, sample_shape)
    assert_matches(backend, got, expected, x, dtype)


@pytest.mark.parametrize("batch", [(), (2, 3)], ids=shape_id)
@pytest.mark.parametrize("bias", ["no-bias", "bias-None"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_without_bias_and_batch_shapes(
    backend: Backend, structure: str, bias: str, batch: tuple[int, ...]
) -> None:
    jax_slice(backend, batch == (2, 3))
    geometry = GEOMETRIES["1d-stride2-pad1-groups2"]
    param = make_param(backend, structure, geometry, bias, "float64")
    x_np, x = make_input(backend, (*batch, geometry.c_in, *geometry.spatial), "float64", 3)
    got = conv(x, param, (3,), generator(backend, 8), **geometry.options())
    samples = param.sample((3,), generator(backend, 8))
    assert "bias" not in samples
    assert_matches(backend, got, reference(backend, x_np, samples, geometry, (3,)), x, "float64")
    mean = conv(x, param, None, **geometry.options())
    assert_matches(backend, mean, mean_reference(backend, x_np, param, geometry), x, "float64")


@pytest.mark.parametrize("structure", ["kronecker-full", "kronecker-2x1"])
def test_kronecker_sample_scale(backend: Backend, structure: str) -> None:
    geometry = GEOMETRIES["2d-valid-groups2"]
    param = make_param(backend, structure, geometry, "bias", "float64", sample_scale=0.3)
    x_np, x = make_input(backend, (2, geometry.c_in, *geometry.spatial), "float64", 4)
    got = conv(x, param, (3,), generator(backend, 4), **geometry.options())
    samples = param.sample((3,), generator(backend, 4))
    assert_matches(backend, got, reference(backend, x_np, samples, geometry, (3,)), x, "float64")


@pytest.mark.parametrize("sample_shape", [(3,), (2, 2)], ids=shape_id)
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
@pytest.mark.parametrize("structure", STRUCTURES)
def test_input_contains_samples(
    backend: Backend, structure: str, geometry: Geometry, sample_shape: tuple[int, ...]
) -> None:
    jax_slice(backend, sample_shape == (2, 2))
    param = make_param(backend, structure, geometry, "bias", "float64")
    x_np, x = make_input(
        backend, (*sample_shape, 2, geometry.c_in, *geometry.spatial), "float64", 5
    )
    got = conv(
        x,
        param,
        sample_shape,
        generator(backend, 5),
        input_contains_samples=True,
        **geometry.options(),
    )
    samples = param.sample(sample_shape, generator(backend, 5))
    expected = reference(backend, x_np, samples, geometry, sample_shape, per_sample=True)
    assert_matches(backend, got, expected, x, "float64")


def test_input_contains_samples_with_an_empty_sample_shape(backend: Backend) -> None:
    geometry = GEOMETRIES["2d-mixed"]
    param = make_param(backend, "kronecker-full", geometry, "bias", "float64")
    _, x = make_input(backend, (2, geometry.c_in, *geometry.spatial), "float64", 5)
    got = conv(
        x, param, (), generator(backend, 5), input_contains_samples=True, **geometry.options()
    )
    expected = conv(x, param, (), generator(backend, 5), **geometry.options())
    np.testing.assert_allclose(backend.to_numpy(got), backend.to_numpy(expected))


@pytest.mark.parametrize("bias", ["bias", "bias-None"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_parameter_samples(backend: Backend, structure: str, bias: str) -> None:
    """Given samples are used as they are; no generator needed (None on JAX too)."""
    geometry = GEOMETRIES["1d-stride2-pad1-groups2"]
    param = make_param(backend, structure, geometry, bias, "float64")
    samples = param.sample((2, 2), generator(backend, 11))
    x_np, x = make_input(backend, (3, geometry.c_in, *geometry.spatial), "float64", 6)
    got = conv(x, param, (2, 2), None, parameter_samples=samples, **geometry.options())
    assert_matches(backend, got, reference(backend, x_np, samples, geometry, (2, 2)), x, "float64")
    xs_np, xs = make_input(backend, (2, 2, 3, geometry.c_in, *geometry.spatial), "float64", 7)
    got = conv(
        xs,
        param,
        (2, 2),
        parameter_samples=samples,
        input_contains_samples=True,
        **geometry.options(),
    )
    expected = reference(backend, xs_np, samples, geometry, (2, 2), per_sample=True)
    assert_matches(backend, got, expected, xs, "float64")


# ----------------------------------------------------------------------- Kronecker shortcut
@pytest.mark.parametrize("noise_first", [True, False])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("structure", ["kronecker-full", "kronecker-2x1"])
def test_kronecker_both_orders(
    backend: Backend,
    structure: str,
    per_sample: bool,
    noise_first: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A (Z_s u) and (A Z_s) u agree with the oracle (the cost rule picks one)."""
    monkeypatch.setattr(conv_module, "_mix_noise_first", lambda *args: noise_first)
    geometry = GEOMETRIES["1d-stride2-pad1-groups2"]
    param = make_param(backend, structure, geometry, "bias", "float64")
    lead = (3,) if per_sample else ()
    x_np, x = make_input(backend, (*lead, 2, geometry.c_in, *geometry.spatial), "float64", 8)
    got = conv(
        x,
        param,
        (3,),
        generator(backend, 9),
        input_contains_samples=per_sample,
        **geometry.options(),
    )
    samples = param.sample((3,), generator(backend, 9))
    expected = reference(backend, x_np, samples, geometry, (3,), per_sample=per_sample)
    assert_matches(backend, got, expected, x, "float64")


@pytest.mark.parametrize("structure", ["kronecker-full", "kronecker-2x1"])
def test_kronecker_forms_no_per_sample_kernels(
    backend: Backend, structure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    geometry = GEOMETRIES["2d-valid-groups2"]
    param = make_param(backend, structure, geometry, "bias", "float64")

    def refuse(*args: Any) -> Any:
        raise AssertionError("per-sample kernels were formed")

    monkeypatch.setattr(Kronecker, "blocks", refuse)
    _, x = make_input(backend, (1, geometry.c_in, *geometry.spatial), "float64", 0)
    out = conv(x, param, (8,), generator(backend, 0), **geometry.options())
    assert tuple(out.shape) == (8, 1, geometry.c_out, 3, 2)
    _, xs = make_input(backend, (8, 1, geometry.c_in, *geometry.spatial), "float64", 0)
    out = conv(
        xs, param, (8,), generator(backend, 0), input_contains_samples=True, **geometry.options()
    )
    assert tuple(out.shape) == (8, 1, geometry.c_out, 3, 2)


def test_mix_noise_first_cost_rule() -> None:
    geometry = conv_module._Geometry(64, 64, (3, 3), (1, 1), ((1, 1),) * 2, (1, 1), 1, True)
    # r_in = 8 > r_out = 2: Z_s u (r_out channels) first
    assert conv_module._mix_noise_first(geometry, 4, 8, 8, 2, 1024)
    # r_in = 1 < r_out = 64: A Z_s (C_out x 1) first, then one channel of u per output
    assert not conv_module._mix_noise_first(geometry, 4, 8, 1, 64, 1024)


def test_samples_differ_and_average_to_the_mean(backend: Backend) -> None:
    """A smoke test of the distribution: fresh draws per sample index, centred on the mean."""
    geometry = GEOMETRIES["1d-stride2-pad1-groups2"]
    param = make_param(backend, "kronecker-2x1", geometry, "bias", "float64")
    x_np, x = make_input(backend, (1, geometry.c_in, *geometry.spatial), "float64", 6)
    n = 2000
    got = backend.to_numpy(conv(x, param, (n,), generator(backend, 3), **geometry.options()))
    assert not np.allclose(got[0], got[1])
    spread = got.std(axis=0)
    mean = mean_reference(backend, x_np, param, geometry)
    np.testing.assert_array_less(np.abs(got.mean(axis=0) - mean), 5 * spread / np.sqrt(n) + 1e-12)


# ----------------------------------------------------------------------- errors
def layer_param(backend: Backend, mean_shapes: dict[str, Any], cov: Any) -> sc.GaussianParameter:
    rng = np.random.default_rng(0)
    mean = {
        name: None if shape is None else backend.asarray(rng.standard_normal(shape), "float64")
        for name, shape in mean_shapes.items()
    }
    return sc.GaussianParameter(mean, cov)


def test_wrong_param(backend: Backend) -> None:
    x = backend.asarray(np.ones((2, 4, 6)), "float64")
    param = layer_param(backend, {"weight": (2, 4)}, sc.DiagonalCovariance())
    with pytest.raises(ValueError, match=r"conv needs a `weight` mean .*got shape \(2, 4\)"):
        conv(x, param, None)
    param = layer_param(backend, {"w": (2, 4, 3)}, sc.DiagonalCovariance())
    with pytest.raises(ValueError, match=r"`param` must have means named 'weight'"):
        conv(x, param, None)
    param = layer_param(backend, {"weight": (2, 4, 3), "bias": (3,)}, sc.DiagonalCovariance())
    with pytest.raises(ValueError, match=r"'bias' mean must have shape \(2,\)"):
        conv(x, param, None)
    with pytest.raises(TypeError, match="`param` must be a structcov GaussianParameter"):
        conv(x, {"weight": x}, None)


def test_wrong_groups(backend: Backend) -> None:
    param = layer_param(backend, {"weight": (3, 2, 3), "bias": (3,)}, sc.DiagonalCovariance())
    x = backend.asarray(np.ones((2, 4, 6)), "float64")
    with pytest.raises(ValueError, match=r"`groups` must divide out_channels 3 .*groups=2"):
        conv(x, param, None, groups=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"`groups` must be a positive int"):
            conv(x, param, None, groups=bad)


def test_wrong_x(backend: Backend) -> None:
    geometry = GEOMETRIES["2d-mixed"]
    param = make_param(backend, "diagonal", geometry, "bias", "float64")
    options = geometry.options()
    bad = backend.asarray(np.ones((2, 4, 5, 6)), "float64")
    with pytest.raises(ValueError, match=r"`x` must have 3 channels .*got shape \(2, 4, 5, 6\)"):
        conv(bad, param, (2,), generator(backend, 0), **options)
    flat = backend.asarray(np.ones((3, 6)), "float64")
    with pytest.raises(
        ValueError, match=r"`x` must have at least 3 dimensions .*got shape \(3, 6\)"
    ):
        conv(flat, param, None, **options)
    with pytest.raises(TypeError, match=r"`x` must have the parameter's dtype"):
        conv(backend.asarray(np.ones((2, 3, 5, 6)), "float32"), param, None, **options)
    with pytest.raises(TypeError, match=r"`x` must be an array"):
        conv([[1.0]], param, None, **options)
    x = backend.asarray(np.ones((3, 2, 3, 5, 6)), "float64")
    with pytest.raises(ValueError, match=r"`x` must start with the sample dimensions \(2,\)"):
        conv(x, param, (2,), generator(backend, 0), input_contains_samples=True, **options)
    with pytest.raises(ValueError, match=r"`input_contains_samples` needs a `sample_shape`"):
        conv(x, param, None, input_contains_samples=True, **options)
    tiny = backend.asarray(np.ones((2, 3, 1, 6)), "float64")
    with pytest.raises(ValueError, match=r"spatial shape \(1, 6\) is smaller than the dilated"):
        conv(tiny, param, None, **{**options, "padding": 0})


def test_wrong_options(backend: Backend) -> None:
    geometry = GEOMETRIES["2d-mixed"]
    param = make_param(backend, "diagonal", geometry, "bias", "float64")
    x = backend.asarray(np.ones((2, 3, 5, 6)), "float64")
    with pytest.raises(ValueError, match=r"`stride` must be a positive int or a tuple of 2"):
        conv(x, param, None, stride=(1, 2, 3))
    with pytest.raises(ValueError, match=r"`stride` must be a positive int"):
        conv(x, param, None, stride=0)
    with pytest.raises(ValueError, match=r"`dilation` must be a positive int"):
        conv(x, param, None, dilation=(1, 0))
    with pytest.raises(ValueError, match=r"`padding` must be a non-negative int"):
        conv(x, param, None, padding=-1)
    with pytest.raises(ValueError, match=r"`padding` must be 'valid', 'same'"):
        conv(x, param, None, padding="full")
    with pytest.raises(ValueError, match=r"`padding='same'` needs stride 1"):
        conv(x, param, None, padding="same", stride=2)


def test_x_from_another_library(backend: Backend) -> None:
    geometry = GEOMETRIES["2d-mixed"]
    param = make_param(backend, "diagonal", geometry, "bias", "float64")
    if backend.name == "numpy":
        import array_api_strict

        other: Any = array_api_strict.ones((2, 3, 5, 6), dtype=array_api_strict.float64)
    else:
        other = np.ones((2, 3, 5, 6))
    with pytest.raises(TypeError, match=r"`x` and `param` must be arrays of one array-API library"):
        conv(other, param, None)


def test_wrong_parameter_samples(backend: Backend) -> None:
    geometry = GEOMETRIES["2d-mixed"]
    param = make_param(backend, "factorized-full", geometry, "bias", "float64")
    x = backend.asarray(np.ones((2, 3, 5, 6)), "float64")
    samples = param.sample((2,), generator(backend, 0))
    options = geometry.options()
    with pytest.raises(ValueError, match=r"`parameter_samples` must have the keys"):
        conv(x, param, (2,), parameter_samples={"weight": samples["weight"]}, **options)
    with pytest.raises(ValueError, match=r"`parameter_samples\['weight'\]` must have shape"):
        conv(x, param, (3,), parameter_samples=samples, **options)
    with pytest.raises(ValueError, match=r"`parameter_samples` needs a `sample_shape`"):
        conv(x, param, None, parameter_samples=samples, **options)


# ----------------------------------------------------------------------- backends
@pytest.mark.parametrize("structure", ["kronecker-2x1", "lowrank+diag-2"])
def test_torch_module_gradients(backend: Backend, structure: str) -> None:
    """A ``structcov.torch.GaussianParameter`` works as it is; gradients reach every array."""
    if backend.name != "torch":
        pytest.skip("the torch adapter runs on the torch backend only")
    import torch

    import structcov.torch as sct

    geometry = GEOMETRIES["2d-mixed"]
    rng = np.random.default_rng(0)
    mean = {
        "weight": torch.tensor(rng.standard_normal(geometry.weight_shape)),
        "bias": torch.tensor(rng.standard_normal(geometry.c_out)),
    }
    module = sct.GaussianParameter(mean, STRUCTURES[structure]())
    module.cov.reset_parameters(0.5, torch.Generator().manual_seed(1))
    x = torch.tensor(rng.standard_normal((2, geometry.c_in, *geometry.spatial)))
    got = conv(x, module, (3,), torch.Generator().manual_seed(2), **geometry.options())
    samples = module.sample((3,), torch.Generator().manual_seed(2))
    expected = reference(backend, x.numpy(), samples, geometry, (3,))
    np.testing.assert_allclose(got.detach().numpy(), expected, **tolerance("float64"))
    (got**2).sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("structure", ["kronecker-2x1", "lowrank-2"])
def test_jax_jit(backend: Backend, structure: str) -> None:
    if backend.name != "jax":
        pytest.skip("jax.jit runs on the jax backend only")
    import jax

    import structcov.jax  # noqa: F401  (the core objects become pytrees)

    geometry = GEOMETRIES["1d-stride2-pad1-groups2"]
    param = make_param(backend, structure, geometry, "bias", "float64")
    _, x = make_input(backend, (2, geometry.c_in, *geometry.spatial), "float64", 1)
    _, xs = make_input(backend, (4, 2, geometry.c_in, *geometry.spatial), "float64", 1)
    key = jax.random.key(3, impl="rbg")
    options = geometry.options()

    def run(x: Any, xs: Any, p: Any, key: Any) -> tuple[Any, ...]:
        return (
            conv(x, p, (4,), key, **options),
            conv(xs, p, (4,), key, input_contains_samples=True, **options),
            conv(x, p, None, **options),
        )

    for got, expected in zip(jax.jit(run)(x, xs, param, key), run(x, xs, param, key), strict=True):
        assert got.dtype == expected.dtype
        assert got.shape == expected.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), **tolerance("float64"))


@pytest.mark.parametrize("structure", ["kronecker-2x1", "lowrank+diag-2"])
def test_dask_stays_lazy(backend: Backend, structure: str) -> None:
    """Every mode builds a graph under a scheduler that raises: nothing is computed."""
    if backend.name != "dask":
        pytest.skip("laziness is a dask property")
    import dask

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("conv computed a dask graph; it must stay lazy")

    geometry = GEOMETRIES["2d-mixed"]
    param = make_param(backend, structure, geometry, "bias", "float64")
    _, x = make_input(backend, (6, geometry.c_in, *geometry.spatial), "float64", 0)
    _, xs = make_input(backend, (4, 6, geometry.c_in, *geometry.spatial), "float64", 0)
    options = geometry.options()
    with dask.config.set(scheduler=refuse):
        samples = param.sample((4,), backend.generator(0))
        outs = [
            conv(x, param, (4,), backend.generator(0), **options),
            conv(xs, param, (4,), backend.generator(0), input_contains_samples=True, **options),
            conv(x, param, None, **options),
            conv(x, param, (4,), parameter_samples=samples, **options),
        ]
    for out in outs:
        assert type(out) is type(x)
        assert np.all(np.isfinite(backend.to_numpy(out)))
