"""The functional dense layer `structcov.layers.linear` against a float64 NumPy oracle.

The oracle is ``einsum(x, W_s) + b_s`` over explicit parameter samples drawn with
``param.sample(sample_shape, generator(seed))``; ``linear`` gets a generator with the
same seed. Agreement proves both the maths of each structure's shortcut and that
``linear`` uses the very same noise z as ``param.sample``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import structcov as sc
import structcov.layers as layers
from conftest import Backend, tolerance
from oracle import standard_deviations
from structcov._array_api import device_of
from structcov.covariances import Kronecker
from structcov.layers import linear

D_OUT, D_IN = 3, 4

STRUCTURES: dict[str, Callable[[], sc.FactorizedCovariance]] = {
    "diagonal": lambda: sc.DiagonalCovariance(),
    "lowrank-2": lambda: sc.LowRankCovariance(2),
    "factorized-full": lambda: sc.FactorizedCovariance(),
    "lowrank+diag-2": lambda: sc.LowRankPlusDiagonalCovariance(2),
    "kronecker-full": lambda: sc.KroneckerCovariance(),
    "kronecker-2x1": lambda: sc.KroneckerCovariance(input_rank=2, output_rank=1),
}
#: Structures with a choice between projecting the input and forming the weights.
CHOOSING = ("lowrank-2", "factorized-full", "lowrank+diag-2")
BIASES = ("bias", "no-bias", "bias-None")
BATCHES = [(), (5,), (2, 3)]
SAMPLE_SHAPES = [(), (4,), (2, 2), None]


def generator(backend: Backend, seed: int) -> Any:
    """``backend.generator(seed)``, but an ``rbg`` key (still a typed JAX key) on JAX:
    eager JAX compiles its draw for every new shape, the default threefry about twice
    as slowly. ``test_jax_jit`` runs the default key as well."""
    if backend.name == "jax":
        import jax

        return jax.random.key(seed, impl="rbg")
    return backend.generator(seed)


def jax_slice(backend: Backend, keep: bool) -> None:
    """Skip the case on JAX unless ``keep``: eager JAX compiles every new shape (0.1-1 s
    each on a shared CPU), so the largest grids run a slice of their cases there."""
    if backend.name == "jax" and not keep:
        pytest.skip("eager JAX compiles every new shape: this grid runs a slice on JAX")


def shape_id(shape: Any) -> str:
    return "None" if shape is None else "x".join(map(str, shape)) or "scalar"


_CACHE: dict[tuple[Any, ...], Any] = {}


def make_param(
    backend: Backend, structure: str, bias: str, dtype: str, sample_scale: float = 1.0
) -> sc.GaussianParameter:
    """A layer parameter (weight (3, 4), bias per ``bias``) with non-trivial storage.

    Cached per arguments: ``linear`` never changes a parameter. On JAX it is built and
    reset with NumPy, then moved leaf by leaf (as tests/test_jax_adapter.py does):
    eager JAX would compile a draw for every storage shape.
    """
    key = (backend.name, structure, bias, dtype, sample_scale)
    if key not in _CACHE:
        on_jax = backend.name == "jax"
        build = np.asarray if on_jax else backend.asarray
        rng = np.random.default_rng(0)
        mean: dict[str, Any] = {"weight": build(rng.standard_normal((D_OUT, D_IN)), dtype)}
        if bias == "bias":
            mean["bias"] = build(rng.standard_normal(D_OUT), dtype)
        elif bias == "bias-None":
            mean["bias"] = None
        cov = STRUCTURES[structure]()
        param = sc.GaussianParameter(mean, cov)
        param.cov.reset_parameters(
            0.5, np.random.default_rng(1) if on_jax else backend.generator(1)
        )
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
    weight: Any,
    bias: Any,
    sample_shape: tuple[int, ...],
    per_sample: bool = False,
) -> np.ndarray:
    """float64 ``x W_s^T + b_s``: weight (*S, o, i), bias (*S, o) or None; x (*[S], *batch, i)."""
    weight = backend.to_numpy(weight)
    num_samples = math.prod(sample_shape)
    batch = x.shape[len(sample_shape) : -1] if per_sample else x.shape[:-1]
    w = weight.reshape(num_samples, D_OUT, D_IN)
    if per_sample:
        y = np.einsum("sni,soi->sno", x.reshape(num_samples, -1, D_IN), w)
    else:
        y = np.einsum("ni,soi->sno", x.reshape(-1, D_IN), w)
    if bias is not None:
        y = y + backend.to_numpy(bias).reshape(num_samples, 1, D_OUT)
    return y.reshape(*sample_shape, *batch, D_OUT)


def mean_reference(backend: Backend, x: np.ndarray, param: sc.GaussianParameter) -> np.ndarray:
    y = x @ backend.to_numpy(param["weight"]).T
    bias = param.mean.get("bias")
    return y if bias is None else y + backend.to_numpy(bias)


def assert_matches(backend: Backend, got: Any, expected: np.ndarray, like: Any, dtype: str) -> None:
    assert type(got) is type(like)
    assert got.dtype == like.dtype
    assert device_of(got) == device_of(like)
    assert tuple(got.shape) == expected.shape
    np.testing.assert_allclose(backend.to_numpy(got), expected, **tolerance(dtype))


# ----------------------------------------------------------------------- the oracle grid
@pytest.mark.parametrize("sample_shape", SAMPLE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("batch", BATCHES, ids=shape_id)
@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_matches_parameter_samples(
    backend: Backend,
    dtype: str,
    structure: str,
    bias: str,
    batch: tuple[int, ...],
    sample_shape: tuple[int, ...] | None,
) -> None:
    # JAX: float64 without batch (5,) (the code path of (2, 3)); float32 on (2, 3) x {(2, 2), None}.
    jax_slice(
        backend,
        (dtype == "float64" and batch != (5,))
        or (batch == (2, 3) and sample_shape in ((2, 2), None)),
    )
    param = make_param(backend, structure, bias, dtype)
    x_np = np.random.default_rng(2).standard_normal((*batch, D_IN))
    x = backend.asarray(x_np, dtype)
    got = linear(x, param, sample_shape, generator(backend, 7))
    if sample_shape is None:
        expected = mean_reference(backend, x_np, param)
    else:
        samples = param.sample(sample_shape, generator(backend, 7))
        expected = reference(backend, x_np, samples["weight"], samples.get("bias"), sample_shape)
    assert_matches(backend, got, expected, x, dtype)


@pytest.mark.parametrize("structure", ["kronecker-full", "kronecker-2x1"])
def test_kronecker_sample_scale(backend: Backend, dtype: str, structure: str) -> None:
    param = make_param(backend, structure, "bias", dtype, sample_scale=0.3)
    x_np = np.random.default_rng(2).standard_normal((5, D_IN))
    x = backend.asarray(x_np, dtype)
    got = linear(x, param, (3,), generator(backend, 4))
    samples = param.sample((3,), generator(backend, 4))
    expected = reference(backend, x_np, samples["weight"], samples["bias"], (3,))
    assert_matches(backend, got, expected, x, dtype)


@pytest.mark.parametrize("sample_shape", [(4,), (2, 2)], ids=shape_id)
@pytest.mark.parametrize("bias", ["bias", "no-bias"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_input_contains_samples(
    backend: Backend, dtype: str, structure: str, bias: str, sample_shape: tuple[int, ...]
) -> None:
    param = make_param(backend, structure, bias, dtype)
    x_np = np.random.default_rng(3).standard_normal((*sample_shape, 2, 3, D_IN))
    x = backend.asarray(x_np, dtype)
    got = linear(x, param, sample_shape, generator(backend, 5), input_contains_samples=True)
    samples = param.sample(sample_shape, generator(backend, 5))
    expected = reference(
        backend, x_np, samples["weight"], samples.get("bias"), sample_shape, per_sample=True
    )
    assert_matches(backend, got, expected, x, dtype)


def test_input_contains_samples_with_an_empty_sample_shape(backend: Backend, dtype: str) -> None:
    """``sample_shape=()``: no sample dimensions to find in ``x``; the same as shared."""
    param = make_param(backend, "kronecker-full", "bias", dtype)
    x = backend.asarray(np.random.default_rng(3).standard_normal((5, D_IN)), dtype)
    got = linear(x, param, (), generator(backend, 5), input_contains_samples=True)
    expected = linear(x, param, (), generator(backend, 5))
    np.testing.assert_allclose(backend.to_numpy(got), backend.to_numpy(expected))


@pytest.mark.parametrize("bias", ["bias", "bias-None"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_parameter_samples(backend: Backend, dtype: str, structure: str, bias: str) -> None:
    """Given samples are used as they are; the generator is never touched (None on JAX too)."""
    param = make_param(backend, structure, bias, dtype)
    x_np = np.random.default_rng(4).standard_normal((2, 3, D_IN))
    x = backend.asarray(x_np, dtype)
    samples = param.sample((2, 2), generator(backend, 11))
    got = linear(x, param, (2, 2), None, parameter_samples=samples)
    expected = reference(backend, x_np, samples["weight"], samples.get("bias"), (2, 2))
    assert_matches(backend, got, expected, x, dtype)
    # with the samples' own inputs per sample
    xs_np = np.random.default_rng(5).standard_normal((2, 2, 3, D_IN))
    xs = backend.asarray(xs_np, dtype)
    got = linear(xs, param, (2, 2), parameter_samples=samples, input_contains_samples=True)
    expected = reference(
        backend, xs_np, samples["weight"], samples.get("bias"), (2, 2), per_sample=True
    )
    assert_matches(backend, got, expected, xs, dtype)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_mean_forward(backend: Backend, dtype: str, structure: str) -> None:
    """``sample_shape=None``: x M^T + b, whatever the covariance; no generator needed."""
    param = make_param(backend, structure, "bias", dtype)
    x_np = np.random.default_rng(6).standard_normal((2, 3, D_IN))
    x = backend.asarray(x_np, dtype)
    got = linear(x, param, None)
    assert_matches(backend, got, mean_reference(backend, x_np, param), x, dtype)


def test_samples_differ_and_average_to_the_mean(backend: Backend) -> None:
    """A smoke test of the distribution: fresh draws per sample index, centred on the mean."""
    param = make_param(backend, "lowrank+diag-2", "bias", "float64")
    x_np = np.random.default_rng(6).standard_normal((2, D_IN))
    x = backend.asarray(x_np, "float64")
    got = backend.to_numpy(linear(x, param, (4000,), generator(backend, 3)))
    assert not np.allclose(got[0], got[1])
    spread = got.std(axis=0)
    np.testing.assert_array_less(
        np.abs(got.mean(axis=0) - mean_reference(backend, x_np, param)), 5 * spread / np.sqrt(4000)
    )


# ----------------------------------------------------------------------- the cost rule
def test_cost_rule_picks_both_evaluations() -> None:
    for structure in CHOOSING:
        param = sc.GaussianParameter(
            {"weight": np.zeros((D_OUT, D_IN)), "bias": np.zeros(D_OUT)},
            STRUCTURES[structure](),
        )
        s = param.cov.structure
        assert layers._plan(s, 4, 1, False) == "project", structure  # many samples, one row
        assert layers._plan(s, 1, 100, False) == "weights", structure  # one sample, many rows
        assert layers._plan(s, 4, 1, True) == "weights", structure  # per-sample inputs
    for structure, plan in [
        ("kronecker-full", "project"),
        ("kronecker-2x1", "project"),
        ("diagonal", "weights"),
    ]:
        cov = STRUCTURES[structure]()
        sc.GaussianParameter({"weight": np.zeros((D_OUT, D_IN)), "bias": np.zeros(D_OUT)}, cov)
        for args in [(4, 1, False), (1, 100, False), (4, 1, True)]:
            assert layers._plan(cov.structure, *args) == plan, structure


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("bias", ["bias", "no-bias"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_both_evaluations_agree(
    backend: Backend,
    dtype: str,
    structure: str,
    bias: str,
    per_sample: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Forcing either evaluation gives the oracle's answer (Diagonal: only ``weights`` exists)."""
    jax_slice(backend, dtype == "float64")
    param = make_param(backend, structure, bias, dtype)
    x_np = np.random.default_rng(8).standard_normal((3, 2, D_IN) if per_sample else (2, D_IN))
    x = backend.asarray(x_np, dtype)
    samples = param.sample((3,), generator(backend, 9))
    expected = reference(
        backend, x_np, samples["weight"], samples.get("bias"), (3,), per_sample=per_sample
    )
    for plan in ("project", "weights"):
        monkeypatch.setattr(layers, "_plan", lambda *args, plan=plan: plan)
        got = linear(x, param, (3,), generator(backend, 9), input_contains_samples=per_sample)
        assert_matches(backend, got, expected, x, dtype)


@pytest.mark.parametrize("structure", ["kronecker-full", "kronecker-2x1", *CHOOSING])
def test_projection_forms_no_per_sample_weights(
    backend: Backend, structure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kronecker (always) and the choosing structures (many samples, one row) never call
    ``blocks``, the per-sample S z that forming W_s needs."""
    param = make_param(backend, structure, "bias", "float64")
    structure_type = type(param.cov.structure)

    def refuse(*args: Any) -> Any:
        raise AssertionError("per-sample weights were formed")

    monkeypatch.setattr(structure_type, "blocks", refuse)
    x = backend.asarray(np.ones((1, D_IN)), "float64")
    assert tuple(linear(x, param, (8,), generator(backend, 0)).shape) == (8, 1, D_OUT)
    if isinstance(param.cov.structure, Kronecker):
        xs = backend.asarray(np.ones((8, 50, D_IN)), "float64")
        out = linear(xs, param, (8,), generator(backend, 0), input_contains_samples=True)
        assert tuple(out.shape) == (8, 50, D_OUT)


# ----------------------------------------------------------------------- local reparameterization
def diagonal_storage(backend: Backend, param: sc.GaussianParameter) -> dict[str, np.ndarray]:
    """The standard deviations by storage path (through the covariance's scale transform)."""
    transform = param.cov.structure.scale_transform
    return {
        path: standard_deviations(backend.to_numpy(a), transform)
        for path, a in param.cov.storage().items()
    }


@pytest.mark.parametrize("bias", ["bias", "no-bias"])
def test_local_reparameterization_mean_and_variance(
    backend: Backend, dtype: str, bias: str
) -> None:
    """Statistical smoke test against the closed form (fixed seed, tolerance from n)."""
    param = make_param(backend, "diagonal", bias, dtype)
    x_np = np.random.default_rng(10).standard_normal((3, D_IN))
    x = backend.asarray(x_np, dtype)
    n = 20000
    got = linear(x, param, (n,), generator(backend, 12), local_reparameterization=True)
    assert type(got) is type(x)
    assert got.dtype == x.dtype
    assert tuple(got.shape) == (n, 3, D_OUT)
    y = backend.to_numpy(got)
    stored = diagonal_storage(backend, param)
    mean = mean_reference(backend, x_np, param)
    variance = (x_np**2) @ (stored["scale.weight"] ** 2).T
    if bias == "bias":
        variance = variance + stored["scale.bias"] ** 2
    np.testing.assert_array_less(np.abs(y.mean(axis=0) - mean), 5 * np.sqrt(variance / n) + 1e-4)
    np.testing.assert_array_less(
        np.abs(y.var(axis=0) - variance), 5 * variance * np.sqrt(2 / (n - 1)) + 1e-4
    )
    # Rows no longer share one weight draw: their outputs are uncorrelated, unlike
    # the exact sampled forward's.
    local = np.corrcoef(y[:, 0, 0], y[:, 1, 0])[0, 1]
    assert abs(local) < 5 / np.sqrt(n)
    exact = backend.to_numpy(linear(x, param, (n,), generator(backend, 12)))
    shared = np.corrcoef(exact[:, 0, 0], exact[:, 1, 0])[0, 1]
    expected = (x_np[0] * x_np[1]) @ stored["scale.weight"][0] ** 2
    if bias == "bias":
        expected += stored["scale.bias"][0] ** 2
    expected /= np.sqrt(variance[0, 0] * variance[1, 0])
    assert abs(shared - expected) < 5 / np.sqrt(n)


@pytest.mark.parametrize("per_sample", [False, True])
def test_local_reparameterization_is_the_mean_at_zero_scale(
    backend: Backend, dtype: str, per_sample: bool
) -> None:
    rng = np.random.default_rng(13)
    mean = {
        "weight": backend.asarray(rng.standard_normal((D_OUT, D_IN)), dtype),
        "bias": backend.asarray(rng.standard_normal(D_OUT), dtype),
    }
    # the identity transform's storage starts at zero: std 0
    param = sc.GaussianParameter(mean, sc.DiagonalCovariance(scale_transform="identity"))
    x_np = rng.standard_normal((2, 5, D_IN) if per_sample else (5, D_IN))
    x = backend.asarray(x_np, dtype)
    got = linear(
        x,
        param,
        (2,),
        generator(backend, 0),
        local_reparameterization=True,
        input_contains_samples=per_sample,
    )
    expected = mean_reference(backend, x_np, param)
    if not per_sample:
        expected = np.broadcast_to(expected, (2, *expected.shape))
    assert_matches(backend, got, np.asarray(expected), x, dtype)


# ----------------------------------------------------------------------- errors
def layer_param(backend: Backend, mean_shapes: dict[str, Any], cov: Any) -> sc.GaussianParameter:
    rng = np.random.default_rng(0)
    mean = {
        name: None if shape is None else backend.asarray(rng.standard_normal(shape), "float64")
        for name, shape in mean_shapes.items()
    }
    return sc.GaussianParameter(mean, cov)


def test_wrong_names(backend: Backend) -> None:
    x = backend.asarray(np.ones((2, D_IN)), "float64")
    for shapes in [{"w": (D_OUT, D_IN)}, {"weight": (D_OUT, D_IN), "scale": (D_OUT,)}]:
        param = layer_param(backend, shapes, sc.DiagonalCovariance())
        with pytest.raises(ValueError, match=r"`param` must have means named 'weight'"):
            linear(x, param, (2,), generator(backend, 0))
    bare = sc.GaussianParameter(
        backend.asarray(np.ones((D_OUT, D_IN)), "float64"), sc.DiagonalCovariance()
    )
    with pytest.raises(ValueError, match=r"got the names \['mean'\]"):
        linear(x, bare, None)
    param = layer_param(
        backend, {"weight": (D_OUT, D_IN), "bias": (D_OUT + 1,)}, sc.DiagonalCovariance()
    )
    with pytest.raises(ValueError, match=r"'bias' mean must have shape \(3,\)"):
        linear(x, param, None)


def test_not_a_gaussian_parameter(backend: Backend) -> None:
    x = backend.asarray(np.ones((2, D_IN)), "float64")
    weight = backend.asarray(np.ones((D_OUT, D_IN)), "float64")
    with pytest.raises(TypeError, match="`param` must be a structcov GaussianParameter"):
        linear(x, {"weight": weight}, None)


@pytest.mark.parametrize("cov", [sc.DiagonalCovariance, sc.KroneckerCovariance])
def test_three_dimensional_weight(backend: Backend, cov: Any) -> None:
    param = layer_param(backend, {"weight": (2, 3, 2), "bias": (2,)}, cov())
    x = backend.asarray(np.ones((2, 6)), "float64")
    with pytest.raises(ValueError, match=r"linear needs a 2-D `weight`.*got shape \(2, 3, 2\)"):
        linear(x, param, (2,), generator(backend, 0))


def test_wrong_x(backend: Backend) -> None:
    param = make_param(backend, "diagonal", "bias", "float64")
    bad = backend.asarray(np.ones((5, 3)), "float64")
    with pytest.raises(ValueError, match=r"`x` must have last dimension 4 .*got shape \(5, 3\)"):
        linear(bad, param, (2,), generator(backend, 0))
    with pytest.raises(TypeError, match=r"`x` must have the parameter's dtype"):
        linear(backend.asarray(np.ones((5, D_IN)), "float32"), param, (2,), generator(backend, 0))
    with pytest.raises(TypeError, match=r"`x` must be an array"):
        linear([[1.0] * D_IN], param, None)
    x = backend.asarray(np.ones((3, 5, D_IN)), "float64")
    with pytest.raises(ValueError, match=r"`x` must start with the sample dimensions \(2,\)"):
        linear(x, param, (2,), generator(backend, 0), input_contains_samples=True)
    with pytest.raises(ValueError, match=r"`input_contains_samples` needs a `sample_shape`"):
        linear(x, param, None, input_contains_samples=True)


def test_x_from_another_library(backend: Backend) -> None:
    param = make_param(backend, "diagonal", "bias", "float64")
    if backend.name == "numpy":
        import array_api_strict

        other: Any = array_api_strict.ones((2, D_IN), dtype=array_api_strict.float64)
    else:
        other = np.ones((2, D_IN))
    with pytest.raises(TypeError, match=r"`x` and `param` must be arrays of one array-API library"):
        linear(other, param, None)


def test_local_reparameterization_needs_a_diagonal(backend: Backend) -> None:
    x = backend.asarray(np.ones((2, D_IN)), "float64")
    for structure in STRUCTURES:
        if structure == "diagonal":
            continue
        param = make_param(backend, structure, "bias", "float64")
        with pytest.raises(ValueError, match=r"`local_reparameterization=True` needs a diagonal"):
            linear(x, param, (2,), generator(backend, 0), local_reparameterization=True)
    param = make_param(backend, "diagonal", "bias", "float64")
    samples = param.sample((2,), generator(backend, 0))
    with pytest.raises(ValueError, match=r"cannot use `parameter_samples`"):
        linear(x, param, (2,), parameter_samples=samples, local_reparameterization=True)


def test_wrong_parameter_samples(backend: Backend) -> None:
    param = make_param(backend, "factorized-full", "bias", "float64")
    x = backend.asarray(np.ones((2, D_IN)), "float64")
    samples = param.sample((2,), generator(backend, 0))
    with pytest.raises(ValueError, match=r"`parameter_samples` must have the keys"):
        linear(x, param, (2,), parameter_samples={"weight": samples["weight"]})
    with pytest.raises(ValueError, match=r"`parameter_samples\['weight'\]` must have shape"):
        linear(x, param, (3,), parameter_samples=samples)
    with pytest.raises(ValueError, match=r"`parameter_samples` needs a `sample_shape`"):
        linear(x, param, None, parameter_samples=samples)
    with pytest.raises(TypeError, match=r"`parameter_samples` must be a mapping"):
        linear(x, param, (2,), parameter_samples=samples["weight"])


# ----------------------------------------------------------------------- adapters
@pytest.mark.parametrize("structure", STRUCTURES)
def test_torch_module(backend: Backend, structure: str) -> None:
    """A ``structcov.torch.GaussianParameter`` works as it is; gradients reach every array."""
    if backend.name != "torch":
        pytest.skip("the torch adapter runs on the torch backend only")
    import torch

    import structcov.torch as sct

    rng = np.random.default_rng(0)
    mean = {
        "weight": torch.tensor(rng.standard_normal((D_OUT, D_IN))),
        "bias": torch.tensor(rng.standard_normal(D_OUT)),
    }
    module = sct.GaussianParameter(mean, STRUCTURES[structure]())
    module.cov.reset_parameters(0.5, torch.Generator().manual_seed(1))
    x = torch.tensor(rng.standard_normal((5, D_IN)))
    got = linear(x, module, (3,), torch.Generator().manual_seed(2))
    samples = module.sample((3,), torch.Generator().manual_seed(2))
    expected = reference(backend, x.numpy(), samples["weight"], samples["bias"], (3,))
    np.testing.assert_allclose(got.detach().numpy(), expected, **tolerance("float64"))
    (got**2).sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_torch_local_reparameterization_gradient_at_zero_scale(backend: Backend) -> None:
    """The zero-initialised storage gets a finite gradient (no NaN from sqrt at 0)."""
    if backend.name != "torch":
        pytest.skip("the torch adapter runs on the torch backend only")
    import torch

    import structcov.torch as sct

    mean = {"weight": torch.ones((D_OUT, D_IN)), "bias": torch.ones(D_OUT)}
    module = sct.GaussianParameter(mean, sc.DiagonalCovariance())  # scale starts at zero
    x = torch.ones((2, D_IN))
    y = linear(x, module, (3,), torch.Generator().manual_seed(0), local_reparameterization=True)
    y.sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize(
    ("structure", "impl"),
    [(structure, "rbg") for structure in STRUCTURES] + [("kronecker-2x1", "threefry2x32")],
)
def test_jax_jit(backend: Backend, dtype: str, structure: str, impl: str) -> None:
    """Under ``jax.jit`` (parameter, input and key traced) as eagerly.

    Mostly with an ``rbg`` key (still a typed JAX key): XLA compiles the default
    threefry about three times slower inside ``jit`` (see tests/test_jax_jit.py).
    """
    if backend.name != "jax":
        pytest.skip("jax.jit runs on the jax backend only")
    jax_slice(backend, dtype == "float64" or structure == "kronecker-full")
    import jax

    import structcov.jax  # noqa: F401  (the core objects become pytrees)

    param = make_param(backend, structure, "bias", dtype)
    x = backend.asarray(np.random.default_rng(1).standard_normal((2, 3, D_IN)), dtype)
    xs = backend.asarray(np.random.default_rng(1).standard_normal((4, 3, D_IN)), dtype)
    key = jax.random.key(3, impl=impl)
    local = structure == "diagonal"

    @jax.jit
    def run(x: Any, xs: Any, p: Any, key: Any) -> tuple[Any, ...]:
        return (
            linear(x, p, (4,), key),
            linear(xs, p, (4,), key, input_contains_samples=True),
            linear(x, p, None),
            linear(x, p, (4,), key, local_reparameterization=local),
        )

    jitted = run(x, xs, param, key)
    eager = (
        linear(x, param, (4,), key),
        linear(xs, param, (4,), key, input_contains_samples=True),
        linear(x, param, None),
        linear(x, param, (4,), key, local_reparameterization=local),
    )
    for got, expected in zip(jitted, eager, strict=True):
        assert got.dtype == expected.dtype
        assert got.shape == expected.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), **tolerance(dtype))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_dask_stays_lazy(backend: Backend, structure: str) -> None:
    """Every mode builds a graph under a scheduler that raises: nothing is computed."""
    if backend.name != "dask":
        pytest.skip("laziness is a dask property")
    import dask

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("linear computed a dask graph; it must stay lazy")

    param = make_param(backend, structure, "bias", "float64")
    x = backend.asarray(np.ones((6, D_IN)), "float64")
    xs = backend.asarray(np.ones((4, 6, D_IN)), "float64")
    with dask.config.set(scheduler=refuse):
        samples = param.sample((4,), backend.generator(0))
        outs = [
            linear(x, param, (4,), backend.generator(0)),
            linear(xs, param, (4,), backend.generator(0), input_contains_samples=True),
            linear(x, param, None),
            linear(x, param, (4,), parameter_samples=samples),
        ]
        if structure == "diagonal":
            outs.append(linear(x, param, (4,), backend.generator(0), local_reparameterization=True))
    for out in outs:
        assert type(out) is type(x)
        assert np.all(np.isfinite(backend.to_numpy(out)))
