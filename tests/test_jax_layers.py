"""structcov.jax layers: Equinox and Flax NNX Linear / Sequential, model-level KL,
predictive and learning-rate trees (jax session).

The counterparts of tests/test_torch_layers.py. Every layer test runs for both module
systems (``kind`` = "equinox" / "nnx"); each skips when its package is missing.
"""

from __future__ import annotations

import math
import operator
import os
import re
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

_selected = [b.strip() for b in os.environ.get("STRUCTCOV_BACKEND", "").split(",") if b.strip()]
if _selected and "jax" not in _selected:
    pytest.skip(
        f"the JAX layers are tested in the jax session (STRUCTCOV_BACKEND={','.join(_selected)})",
        allow_module_level=True,
    )
jax = pytest.importorskip("jax", reason="jax is not installed (pip install structcov[jax])")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import structcov as sc  # noqa: E402
import structcov.jax as scj  # noqa: E402
import structcov.parametrizations as sp  # noqa: E402

STRUCTURES = {
    "diagonal": sc.DiagonalCovariance,
    "lowrank2": lambda: sc.LowRankCovariance(2),
    "lowrank2+diag": lambda: sc.LowRankPlusDiagonalCovariance(2),
    "factorized": sc.FactorizedCovariance,
    "kronecker": sc.KroneckerCovariance,
    "kronecker2x2": lambda: sc.KroneckerCovariance(2, 2),
}
#: Singular for these layers (rank < P): KL to a full-rank prior is +inf (DESIGN §3).
SINGULAR = {"lowrank2", "kronecker2x2"}
KINDS = ["equinox", "nnx"]


def need(kind: str) -> Any:
    """The module system's package (skips the test without it)."""
    if kind == "equinox":
        return pytest.importorskip("equinox")
    pytest.importorskip("flax")
    from flax import nnx

    return nnx


def Linear(kind: str, *args: Any, seed: int = 0, **kwargs: Any) -> Any:
    need(kind)
    if kind == "equinox":
        return scj.EquinoxLinear(*args, key=jax.random.key(seed), **kwargs)
    from flax import nnx

    return scj.NNXLinear(*args, rngs=nnx.Rngs(seed), **kwargs)


def Sequential(kind: str, *layers: Any) -> Any:
    return (scj.EquinoxSequential if kind == "equinox" else scj.NNXSequential)(*layers)


def layer(
    kind: str,
    structure: str | None,
    in_features: int = 4,
    out_features: int = 3,
    bias: bool = True,
    seed: int = 0,
    **kwargs: Any,
) -> Any:
    cov = None if structure is None else STRUCTURES[structure]
    kwargs.setdefault("dtype", jnp.float64)
    return Linear(kind, in_features, out_features, bias, cov=cov, seed=seed, **kwargs)


def core(lin: Any) -> Any:
    """The layer's core parameter (GaussianParameter or DeterministicParameter)."""
    return lin.params.param if hasattr(lin.params, "param") else lin.params


def key(seed: int) -> Any:
    return jax.random.key(seed)


def randn(seed: int, *shape: int) -> Any:
    return jax.random.normal(key(seed), shape, jnp.float64)


def assert_close(got: Any, expected: Any, rtol: float = 1e-12, atol: float = 1e-12) -> None:
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=rtol, atol=atol)


def jitted(kind: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` compiled once (eager JAX compiles every primitive per shape: slower)."""
    if kind == "equinox":
        return need(kind).filter_jit(fn)(*args)
    return need(kind).jit(fn)(*args)


#: (kind, structure, bias): every structure on Equinox, one on NNX (the forward is
#: shared code); without bias for the structures whose forward treats the bias apart
KIND_STRUCTURES = [
    *(("equinox", s, True) for s in STRUCTURES),
    ("equinox", "lowrank2+diag", False),
    ("equinox", "kronecker", False),
    ("nnx", "lowrank2+diag", True),
]


def manual(x: Any, draw: dict[str, Any]) -> Any:
    out = x @ jnp.swapaxes(draw["weight"], -1, -2)
    return out if "bias" not in draw else out + draw["bias"][..., None, :]


# ----------------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    ("kind", "structure"),
    [*(("equinox", s) for s in [*STRUCTURES, None]), ("nnx", "kronecker"), ("nnx", None)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_shapes(kind, structure, bias):
    lin = layer(kind, structure, bias=bias)
    x = jax.ShapeDtypeStruct((7, 2, 4), jnp.float64)
    for sample_shape, leading in [((), ()), ((4,), (4,)), ((2, 3), (2, 3)), (None, ()), (5, (5,))]:
        # traced, not compiled: shapes and dtypes only
        out = jax.eval_shape(lambda x, k, s=sample_shape: lin(x, s, k), x, key(2))
        assert out.shape == (*leading, 7, 2, 3), sample_shape
        assert out.dtype == jnp.float64
    params = core(lin)
    assert (params["bias"] is None) == (not bias)
    assert params.names == (("weight", "bias") if bias else ("weight",))
    assert lin.stochastic == (structure is not None)
    assert (lin.bias is None) == (not bias) and lin.weight.shape == (3, 4)


@pytest.mark.parametrize(("kind", "structure", "bias"), KIND_STRUCTURES)
def test_forward_is_structcov_linear_on_params(kind, structure, bias):
    lin = layer(kind, structure, bias=bias)
    assert isinstance(core(lin), sc.GaussianParameter)
    x = randn(1, 5, 4)
    shapes = [(), (2, 3), None]

    def outputs(lin: Any) -> Any:
        params = core(lin)
        ours = [lin(x, shape, key(3)) for shape in shapes]
        theirs = [sc.linear(x, params, shape, key(3)) for shape in shapes]
        # ... and the weights drawn by params.sample with the same key
        return ours, theirs, lin(x, (4,), key(3)), manual(x, params.sample((4,), generator=key(3)))

    ours, theirs, sampled, expected = jitted(kind, outputs, lin)
    for got, want in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert_close(sampled, expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("structure", ["kronecker", "lowrank2+diag"])
def test_input_contains_samples_and_parameter_samples(kind, structure):
    lin = layer(kind, structure)
    xs = randn(1, 2, 3, 5, 4)
    x = xs[0, 0]

    def outputs(lin: Any) -> Any:
        params = core(lin)
        out = lin(xs, (2, 3), key(4), input_contains_samples=True)
        expected = sc.linear(xs, params, (2, 3), key(4), input_contains_samples=True)
        draw = params.sample((2,), generator=key(5))
        return out, expected, lin(x, (2,), parameter_samples=draw), manual(x, draw)

    out, expected, given, by_hand = jitted(kind, outputs, lin)
    assert out.shape == (2, 3, 5, 3)
    assert_close(out, expected)
    assert_close(given, by_hand)


@pytest.mark.parametrize("kind", KINDS)
def test_local_reparameterization(kind):
    lin = layer(kind, "diagonal", local_reparameterization=True)
    x = randn(1, 5, 4)
    got, expected = jitted(
        kind,
        lambda lin: (
            lin(x, (3,), key(2)),
            sc.linear(x, core(lin), (3,), key(2), local_reparameterization=True),
        ),
        lin,
    )
    assert_close(got, expected)
    with pytest.raises(ValueError, match="needs a covariance"):
        layer(kind, None, local_reparameterization=True)


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_layer_is_an_ordinary_linear_layer(kind):
    lin = layer(kind, None)
    params = core(lin)
    assert not lin.stochastic and params.cov is None
    assert isinstance(params, scj.DeterministicParameter)
    x = randn(1, 5, 4)
    expected = x @ lin.weight.T + lin.bias
    assert_close(lin(x, None), expected)
    replicated = lin(x, (2, 3))
    assert replicated.shape == (2, 3, 5, 3)
    assert_close(replicated, jnp.broadcast_to(expected, (2, 3, 5, 3)))
    xs = randn(2, 2, 5, 4)
    assert_close(lin(xs, (2,), input_contains_samples=True), xs @ lin.weight.T + lin.bias)
    with pytest.raises(ValueError, match="no `parameter_samples`"):
        lin(x, (2,), parameter_samples={"weight": jnp.zeros((2, 3, 4))})
    with pytest.raises(ValueError, match=re.escape("must start with the sample_shape (3,)")):
        lin(xs, (3,), input_contains_samples=True)
    with pytest.raises(ValueError, match="needs a `sample_shape`"):
        lin(x, None, input_contains_samples=True)
    model = Sequential(kind, lin, layer(kind, "diagonal", 3, 2))
    assert jnp.isfinite(scj.kl_divergence(model, 1.0))
    # a bias-free deterministic layer
    assert_close(layer(kind, None, bias=False)(x, None), x @ layer(kind, None, bias=False).weight.T)


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_without_a_key_says_to_pass_one(kind):
    lin = layer(kind, "diagonal")
    with pytest.raises(ValueError, match="must be a JAX PRNG key"):
        lin(randn(1, 5, 4), (2,))


# ----------------------------------------------------------------------- construction
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "parametrization", [sp.Standard(), sp.NeuralTangent(), sp.MaximalUpdate()], ids=repr
)
@pytest.mark.parametrize("layer_type", ["input", "hidden", "output"])
def test_initialised_at_the_parametrization_scales(kind, parametrization, layer_type):
    fan_in, fan_out = 400, 300
    lin = Linear(
        kind,
        fan_in,
        fan_out,
        layer_type=layer_type,
        cov=sc.DiagonalCovariance,
        parametrization=parametrization,
        dtype=jnp.float64,
    )
    scales = lin.init_scales()
    assert scales == parametrization.init_scales(fan_in, fan_out, layer_type)
    # 120000 draws: the empirical std is within 1.5% of the parametrization's
    assert float(jnp.std(lin.weight)) == pytest.approx(scales["weight"], rel=0.015)
    assert float(jnp.std(lin.bias)) == pytest.approx(scales["bias"], rel=0.25)
    assert abs(float(jnp.mean(lin.weight))) < 0.05 * scales["weight"]
    # the diagonal covariance's stds are the same per-name scales (through softplus)
    storage = core(lin).cov.storage()
    for name in ("weight", "bias"):
        std = jax.nn.softplus(storage[f"scale.{name}"])
        assert_close(std, jnp.full_like(std, scales[name]), rtol=1e-10)
    assert lin.lr_scales("sgd") == parametrization.lr_scales(fan_in, fan_out, "sgd", layer_type)


@pytest.mark.parametrize("kind", KINDS)
def test_initial_draws_are_non_zero_reproducible_and_keyed(kind):
    kron = Linear(kind, 6, 5, cov=sc.KroneckerCovariance(), parametrization=sp.MaximalUpdate())
    for path, value in core(kron).cov.storage().items():
        assert float(jnp.min(jnp.abs(value))) > 0, path
    assert kron.weight.dtype == jnp.zeros(()).dtype  # JAX's default float
    again = Linear(kind, 6, 5, cov=sc.KroneckerCovariance(), parametrization=sp.MaximalUpdate())
    other = Linear(kind, 6, 5, cov=sc.KroneckerCovariance(), seed=1)
    for a, b in zip(jax.tree.leaves(core(kron)), jax.tree.leaves(core(again)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(kron.weight), np.asarray(other.weight))
    # the documented split of the init key
    if kind == "equinox":
        weight_key, bias_key, cov_key = jax.random.split(key(0), 3)
        scales = kron.init_scales()
        w = scales["weight"] * jax.random.normal(weight_key, (5, 6), kron.weight.dtype)
        b = scales["bias"] * jax.random.normal(bias_key, (5,), kron.weight.dtype)
        assert_close(kron.weight, w) and assert_close(kron.bias, b)
        expected = sc.GaussianParameter({"weight": w, "bias": b}, sc.KroneckerCovariance())
        expected.cov.reset_parameters(scales, generator=cov_key)
        for path, value in expected.cov.storage().items():
            assert_close(core(kron).cov.storage()[path], value)


@pytest.mark.parametrize("kind", KINDS)
def test_argument_errors(kind):
    with pytest.raises(ValueError, match="`layer_type` must be one of"):
        Linear(kind, 4, 3, layer_type="middle")
    with pytest.raises(TypeError, match="`parametrization` must be a structcov"):
        Linear(kind, 4, 3, parametrization="muP")
    with pytest.raises(ValueError, match="`in_features` must be an int >= 1"):
        Linear(kind, 0, 3)
    with pytest.raises(TypeError, match="`cov` must be None, a structcov covariance"):
        Linear(kind, 4, 3, cov=lambda: "diagonal")
    cov = sc.DiagonalCovariance()
    Linear(kind, 4, 3, cov=cov)
    with pytest.raises(ValueError, match="belongs to one parameter"):
        Linear(kind, 4, 3, cov=cov)
    if kind == "equinox":
        with pytest.raises(TypeError, match="`key` must be a JAX PRNG key"):
            scj.EquinoxLinear(4, 3, key=None)


# ----------------------------------------------------------------------- Sequential
@pytest.mark.parametrize("kind", KINDS)
def test_sequential_passes_samples_through_with_one_key_per_layer(kind):
    first = layer(kind, "kronecker", 4, 6)
    second = layer(kind, "lowrank2+diag", 6, 3, seed=1)
    model = Sequential(kind, first, jax.nn.relu, second)
    assert model.stochastic and len(model) == 3 and model[0] is first
    x = randn(1, 5, 4)

    def outputs(model: Any) -> Any:
        first, second = model[0], model[2]
        k0, _, k2 = jax.random.split(key(7), 3)  # one key per layer position
        hidden = jax.nn.relu(sc.linear(x, core(first), (2, 3), k0))
        expected = sc.linear(hidden, core(second), (2, 3), k2, input_contains_samples=True)
        mean = second(jax.nn.relu(first(x, None)), None)
        return model(x, (2, 3), key(7)), expected, model(x, None), mean

    got, expected, mean, expected_mean = jitted(kind, outputs, model)
    assert got.shape == (2, 3, 5, 3)
    assert_close(got, expected)
    assert_close(mean, expected_mean)
    assert jax.eval_shape(lambda k: model(x, (), k), key(0)).shape == (5, 3)
    xs = randn(2, 2, 5, 4)
    out = jax.eval_shape(lambda k: model(xs, (2,), k, input_contains_samples=True), key(0))
    assert out.shape == (2, 5, 3)
    with pytest.raises(ValueError, match="needs a `sample_shape`"):
        model(xs, None, input_contains_samples=True)


@pytest.mark.parametrize("kind", KINDS)
def test_sequential_with_deterministic_layers_and_nesting(kind):
    det, sto = layer(kind, None, 4, 6), layer(kind, "diagonal", 6, 3)
    inner = Sequential(kind, sto, jax.nn.relu)
    model = Sequential(kind, det, jnp.tanh, inner)
    assert model.stochastic and not Sequential(kind, det).stochastic
    x = randn(1, 5, 4)

    def outputs(model: Any) -> Any:
        det, sto = model[0], model[2][0]
        inner_key = jax.random.split(key(3), 3)[2]
        sto_key = jax.random.split(inner_key, 2)[0]
        return model(x, (4,), key(3)), jax.nn.relu(sto(jnp.tanh(det(x, None)), (4,), sto_key))

    got, expected = jitted(kind, outputs, model)
    assert_close(got, expected)
    only = Sequential(kind, det, jax.nn.relu)
    assert only(x, (2,)).shape == (2, 5, 6)


def test_nnx_rngs_draw_one_sample_key():
    nnx = need("nnx")
    model = Sequential(
        "nnx", layer("nnx", "diagonal", 4, 6), nnx.relu, layer("nnx", "kronecker", 6, 3)
    )
    x = randn(1, 5, 4)

    @nnx.jit
    def outputs(model: Any, a: Any, b: Any, c: Any, d: Any) -> Any:
        lin = model[0]
        return (
            model(x, (3,), rngs=a),
            model(x, (3,), b.sample()),
            lin(x, (2,), rngs=c),
            lin(x, (2,), d.sample()),
        )

    got, expected, lin_got, lin_expected = outputs(model, *(nnx.Rngs(sample=5) for _ in range(4)))
    assert_close(got, expected)
    assert_close(lin_got, lin_expected)
    lin = model[0]
    with pytest.raises(TypeError, match="either `key` or `rngs`"):
        lin(x, (2,), key(0), rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------- lr scaling
def mup_model(kind: str) -> Any:
    return Sequential(
        kind,
        Linear(
            kind,
            8,
            16,
            layer_type="input",
            cov=sc.KroneckerCovariance,
            parametrization=sp.MaximalUpdate(),
        ),
        jax.nn.relu,
        Linear(
            kind,
            16,
            4,
            layer_type="output",
            cov=lambda: sc.LowRankPlusDiagonalCovariance(2),
            parametrization=sp.MaximalUpdate(),
            seed=1,
        ),
        Linear(kind, 4, 2, parametrization=sp.MaximalUpdate(), seed=2),  # deterministic
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_lr_scaling_tree_combines_the_parametrization_with_lr_scaling(optimizer):
    eqx = need("equinox")
    model = mup_model("equinox")
    params = eqx.filter(model, eqx.is_array)
    scales = scj.lr_scaling_tree(params, optimizer=optimizer)
    assert jax.tree.structure(scales) == jax.tree.structure(params)
    for index in (0, 2, 3):
        lin, got = model[index], scales[index].params
        factors = sp.MaximalUpdate().lr_scales(
            lin.in_features, lin.out_features, optimizer, lin.layer_type
        )
        assert got["weight"] == pytest.approx(factors["weight"])
        assert got["bias"] == pytest.approx(factors["bias"])
        if lin.stochastic:
            for path, factor in lin.params.cov.lr_scaling.items():
                expected = factors["weight"] * factor
                assert got.cov.storage()[path] == pytest.approx(expected), path
    # the unfiltered model too (its non-array leaves, e.g. jax.nn.relu, get `default`)
    unfiltered = scj.lr_scaling_tree(model, default=0.5, optimizer=optimizer)
    assert jax.tree.structure(unfiltered) == jax.tree.structure(model)
    assert unfiltered[1] == 0.5 and unfiltered[0].params["weight"] == scales[0].params["weight"]
    q = model[0].params
    bare = scj.lr_scaling_tree(q)
    assert bare["weight"] == 1.0 and bare.cov.storage() == q.cov.lr_scaling


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_nnx_lr_scaling_tree(optimizer):
    nnx = need("nnx")
    model = mup_model("nnx")
    scales = scj.lr_scaling_tree(model, optimizer=optimizer)
    flat = {path: value for path, value in nnx.to_flat_state(scales)}
    state = nnx.state(model, nnx.Param)
    assert set(flat) == {path for path, _ in nnx.to_flat_state(state)}
    for index in (0, 2, 3):
        lin = model[index]
        factors = lin.lr_scales(optimizer)
        for name in ("weight", "bias"):
            assert flat[("layers", index, "params", "mean", name)] == pytest.approx(factors[name])
        if lin.stochastic:
            for path, factor in core(lin).cov.lr_scaling.items():
                got = flat[("layers", index, "params", "cov", path)]
                assert got == pytest.approx(factors["weight"] * factor), path
    # the documented use: multiply the updates of nnx.Optimizer leaf by leaf
    optax = pytest.importorskip("optax")
    tx = optax.chain(
        optax.sgd(0.1),
        optax.stateless(lambda updates, _: jax.tree.map(operator.mul, updates, scales)),
    )
    optimizer_state = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = randn(1, 5, 8)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, (2,), key(0)) ** 2)))(model)
    before = np.asarray(model[0].weight)
    optimizer_state.update(model, grads)
    assert not np.allclose(before, np.asarray(model[0].weight))


# ----------------------------------------------------------------------- model-level inference
@pytest.mark.parametrize("kind", KINDS)
def test_kl_divergence_over_a_model(kind):
    layers = [layer(kind, "kronecker", 4, 6), layer(kind, "lowrank2+diag", 6, 3, seed=1)]
    model = Sequential(kind, layers[0], jax.nn.relu, layers[1], layer(kind, None, 3, 2))
    prior_layers = [
        layer(kind, "kronecker", 4, 6, seed=5),
        layer(kind, "lowrank2+diag", 6, 3, seed=6),
    ]
    prior = Sequential(kind, prior_layers[0], jax.nn.relu, prior_layers[1], layer(kind, None, 3, 2))

    def values(model: Any, prior: Any) -> Any:
        qs, ps = [core(model[i]) for i in (0, 2)], [core(prior[i]) for i in (0, 2)]
        q, p = qs[0], sc.normal_prior(qs[0], 2.0)
        return (
            (
                scj.kl_divergence(model, 0.5),
                sum(sc.kl_divergence(q, sc.normal_prior(q, 0.5)) for q in qs),
            ),
            # one parameter: float prior or a parameter
            (scj.kl_divergence(q, 0.5), sc.kl_divergence(q, sc.normal_prior(q, 0.5))),
            (scj.kl_divergence(q, p), sc.kl_divergence(q, p)),
            # a model of the same layout as the prior: pairs by path
            (scj.kl_divergence(model, prior), sum(map(sc.kl_divergence, qs, ps))),
        )

    for got, expected in jitted(kind, values, model, prior):
        assert_close(got, expected)
    with pytest.raises(ValueError, match="same paths"):
        scj.kl_divergence(model, Sequential(kind, layer(kind, "kronecker", 4, 6)))
    with pytest.raises(ValueError, match="holds no structcov GaussianParameter"):
        scj.kl_divergence(Sequential(kind, layer(kind, None)), 1.0)
    with pytest.raises(TypeError, match="`prior` must be a float prior scale"):
        scj.kl_divergence(model, "wide")


def test_kl_divergence_over_pytrees_jit_and_grad():
    eqx = need("equinox")
    a, b = layer("equinox", "diagonal"), layer("equinox", "factorized", seed=1)
    tree = {"a": a.params, "b": [b.params, jnp.ones(3)]}

    @eqx.filter_jit
    def values(tree: Any) -> Any:
        a, b = tree["a"], tree["b"][0]
        expected = sc.kl_divergence(a, sc.normal_prior(a)) + sc.kl_divergence(b, sc.normal_prior(b))
        model = Sequential("equinox", layer_a, jax.nn.relu, layer_b)
        grads = eqx.filter_grad(lambda m: scj.kl_divergence(m, 1.0))(model)
        return scj.kl_divergence(tree, 1.0), expected, grads

    layer_a, layer_b = a, b
    got, expected, grads = values(tree)
    assert_close(got, expected)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("kind", KINDS)
def test_predictive(kind):
    model = Sequential(
        kind, layer(kind, "diagonal", 4, 6), jax.nn.relu, layer(kind, "diagonal", 6, 3)
    )
    x = randn(1, 5, 4)

    def outputs(model: Any) -> Any:
        return (
            (scj.predictive(model, x, (8,), key(2)), model(x, (8,), key(2))),
            (
                scj.predictive(model, x, (2, 4), key(2), probabilities=True),
                jax.nn.softmax(model(x, (2, 4), key(2)), -1).mean(axis=(0, 1)),
            ),
            (
                scj.predictive(model, x, None, probabilities=True),
                jax.nn.softmax(model(x, None), -1),
            ),
        )

    pairs = jitted(kind, outputs, model)
    for got, expected in pairs:
        assert_close(got, expected)
    probs = pairs[1][0]
    assert probs.shape == (5, 3)
    assert_close(probs.sum(-1), jnp.ones(5))


# ----------------------------------------------------------------------- jit / grad / vmap
def test_eager_equals_jit():
    eqx, nnx = need("equinox"), need("nnx")
    x = randn(1, 5, 4)
    for kind in KINDS:
        model = Sequential(
            kind, layer(kind, "kronecker", 4, 6), jnp.tanh, layer(kind, "diagonal", 6, 3)
        )
        eager = model(x, (2,), key(2))
        compiled = (eqx.filter_jit if kind == "equinox" else nnx.jit)(lambda m: m(x, (2,), key(2)))
        assert_close(compiled(model), eager, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_equinox_jit_grad_reaches_every_array(structure):
    eqx = need("equinox")
    model = Sequential(
        "equinox", layer("equinox", structure, 4, 6), jax.nn.tanh, layer("equinox", structure, 6, 3)
    )
    x = randn(1, 5, 4)
    grads = eqx.filter_jit(eqx.filter_grad(lambda m: jnp.sum(m(x, (4,), key(2)) ** 2)))(model)
    for index in (0, 2):
        for path, value in jax.tree_util.tree_leaves_with_path(grads[index].params):
            assert bool(jnp.all(jnp.isfinite(value))), path
            assert float(jnp.sum(jnp.abs(value))) > 0, jax.tree_util.keystr(path)


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_over_keys(kind):
    model = Sequential(
        kind, layer(kind, "kronecker", 4, 6), jnp.tanh, layer(kind, "diagonal", 6, 3)
    )
    x = randn(1, 5, 4)
    keys = jax.random.split(key(3), 3)

    def run(model: Any) -> Any:
        return jax.vmap(lambda k: model(x, (2,), k))(keys), model(x, (2,), keys[1])

    batched, single = jitted(kind, run, model)
    assert batched.shape == (3, 2, 5, 3)
    assert_close(batched[1], single)


def test_equinox_ensemble_built_under_vmap_and_jit():
    eqx = need("equinox")
    x = randn(1, 5, 4)

    @eqx.filter_jit
    def ensemble_outputs(keys: Any) -> Any:
        ensemble = eqx.filter_vmap(
            lambda k: scj.EquinoxLinear(4, 3, cov=sc.KroneckerCovariance, key=k, dtype=jnp.float64)
        )(keys)
        return ensemble, eqx.filter_vmap(lambda m: m(x, (2,), key(5)))(ensemble)

    keys = jax.random.split(key(4), 2)
    ensemble, outs = ensemble_outputs(keys)
    assert outs.shape == (2, 2, 5, 3)
    member = scj.EquinoxLinear(4, 3, cov=sc.KroneckerCovariance, key=keys[1], dtype=jnp.float64)
    assert_close(ensemble.params["weight"][1], member.weight)
    assert_close(
        ensemble.params.cov.storage()["output_factor"][1],
        member.params.cov.storage()["output_factor"],
    )


def test_nnx_jit_grad_reaches_every_array():
    nnx = need("nnx")
    model = Sequential(
        "nnx", layer("nnx", "lowrank2+diag", 4, 6), nnx.tanh, layer("nnx", "kronecker", 6, 3)
    )
    x = randn(1, 5, 4)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, (4,), key(2)) ** 2)))(model)
    flat = nnx.to_flat_state(grads)
    assert len(flat) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    for path, value in flat:
        value = value[...] if hasattr(value, "get_metadata") else value
        assert bool(jnp.all(jnp.isfinite(value))), path
        assert float(jnp.sum(jnp.abs(value))) > 0, path


# ----------------------------------------------------------------------- training
def classification_problem() -> tuple[Any, Any, Any, Any]:
    """4 classes from a random two-layer teacher on 12 features; 256 train, 512 test."""
    k1, k2, k3 = jax.random.split(key(123), 3)
    x = jax.random.normal(k1, (768, 12), jnp.float32)
    w1, w2 = jax.random.normal(k2, (12, 16)), jax.random.normal(k3, (16, 4))
    y = jnp.argmax(jnp.tanh(x @ w1) @ w2, axis=-1)
    return x[:256], y[:256], x[256:], y[256:]


def nll(logits: Any, y: Any) -> Any:
    """Mean cross-entropy of logits ``(..., N, C)`` against labels ``(N,)``."""
    log_probs = jax.nn.log_softmax(logits, -1)
    return -jnp.mean(jnp.sum(log_probs * jax.nn.one_hot(y, logits.shape[-1]), axis=-1))


def mlp(kind: str, structure: str) -> Any:
    cov = STRUCTURES[structure]
    return Sequential(
        kind,
        Linear(kind, 12, 32, cov=cov, layer_type="input", dtype=jnp.float32),
        jax.nn.relu,
        Linear(kind, 32, 4, cov=cov, layer_type="output", dtype=jnp.float32, seed=1),
    )


@pytest.mark.parametrize("structure", STRUCTURES)
def test_short_equinox_elbo_training_run_improves_test_nll(structure):
    eqx = need("equinox")
    optax = pytest.importorskip("optax")
    x, y, x_test, y_test = classification_problem()
    model = mlp("equinox", structure)
    kl_weight = 0.0 if structure in SINGULAR else 1.0 / len(x)
    if structure in SINGULAR:
        assert scj.kl_divergence(model, 1.0) == math.inf

    @eqx.filter_jit
    def test_nll(model: Any) -> Any:
        probs = scj.predictive(model, x_test, (16,), key(99), probabilities=True)
        picked = jnp.take_along_axis(probs, y_test[:, None], axis=-1)
        return -jnp.mean(jnp.log(picked))

    def loss(model: Any, k: Any) -> Any:
        value = nll(model(x, (4,), k), y)
        return value + kl_weight * scj.kl_divergence(model, 1.0) if kl_weight else value

    params = eqx.filter(model, eqx.is_array)
    scales = scj.lr_scaling_tree(params)
    optimizer = optax.chain(
        optax.adam(0.02),
        optax.stateless(lambda updates, _: jax.tree.map(operator.mul, updates, scales)),
    )
    state = optimizer.init(params)

    @eqx.filter_jit
    def step(model: Any, state: Any, k: Any) -> Any:
        value, grads = eqx.filter_value_and_grad(loss)(model, k)
        updates, state = optimizer.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, value

    before, initial = test_nll(model), jax.tree.leaves(params)
    k = key(1)
    for _ in range(30):
        k, subkey = jax.random.split(k)
        model, state, value = step(model, state, subkey)
        assert bool(jnp.isfinite(value)), value
    after = test_nll(model)
    assert float(after) < float(before), (before, after)
    for old, new in zip(initial, jax.tree.leaves(eqx.filter(model, eqx.is_array)), strict=True):
        assert new.dtype == jnp.float32
        assert not np.array_equal(np.asarray(old), np.asarray(new))


@pytest.mark.parametrize("structure", ["kronecker"])
def test_short_nnx_elbo_training_run_improves_test_nll(structure):
    nnx = need("nnx")
    optax = pytest.importorskip("optax")
    x, y, x_test, y_test = classification_problem()
    model = mlp("nnx", structure)
    scales = scj.lr_scaling_tree(model)
    tx = optax.chain(
        optax.adam(0.02),
        optax.stateless(lambda updates, _: jax.tree.map(operator.mul, updates, scales)),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_test_nll(model: Any) -> Any:
        probs = scj.predictive(model, x_test, (16,), key(99), probabilities=True)
        return -jnp.mean(jnp.log(jnp.take_along_axis(probs, y_test[:, None], axis=-1)))

    def test_nll() -> float:
        return float(nnx_test_nll(model))

    @nnx.jit
    def step(model: Any, optimizer: Any, k: Any) -> Any:
        def loss(model: Any) -> Any:
            return nll(model(x, (4,), k), y) + scj.kl_divergence(model, 1.0) / len(x)

        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    before = test_nll()
    initial = [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))]
    k = key(1)
    for _ in range(30):
        k, subkey = jax.random.split(k)
        assert bool(jnp.isfinite(step(model, optimizer, subkey)))
    assert test_nll() < before
    for old, new in zip(initial, jax.tree.leaves(nnx.state(model, nnx.Param)), strict=True):
        assert not np.array_equal(old, np.asarray(new))


# ----------------------------------------------------------------------- laziness
def test_the_layers_import_their_package_only_when_used():
    pytest.importorskip("equinox")
    code = (
        "import sys, jax, structcov as sc, structcov.jax as scj\n"
        "assert 'equinox' not in sys.modules and 'flax' not in sys.modules\n"
        "lin = scj.EquinoxLinear(3, 2, cov=sc.DiagonalCovariance, key=jax.random.key(0))\n"
        "scj.kl_divergence(lin, 1.0); scj.lr_scaling_tree(lin)\n"
        "assert 'flax' not in sys.modules, 'flax imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------- convolutions
def Conv(kind: str, n: int, *args: Any, seed: int = 0, **kwargs: Any) -> Any:
    """``{Equinox,NNX}Conv{n}d(*args, ...)`` in float64."""
    need(kind)
    kwargs.setdefault("dtype", jnp.float64)
    cls = getattr(scj, f"{'Equinox' if kind == 'equinox' else 'NNX'}Conv{n}d")
    if kind == "equinox":
        return cls(*args, key=jax.random.key(seed), **kwargs)
    from flax import nnx

    return cls(*args, rngs=nnx.Rngs(seed), **kwargs)


#: (n, in, out, kernel, options, spatial in, spatial out)
CONV_CASES = [
    (1, 4, 6, 3, {"stride": 2, "padding": 1, "groups": 2}, (9,), (5,)),
    (2, 2, 3, (3, 2), {"padding": "same", "dilation": (1, 2)}, (5, 6), (5, 6)),
    (3, 3, 3, 2, {"groups": 3, "bias": False, "padding": (1, 0, 0)}, (3, 4, 2), (4, 3, 1)),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=["1d", "2d", "3d"])
def test_conv_forward_shapes(kind, case):
    n, c_in, c_out, kernel, options, spatial, spatial_out = case
    for cov in (sc.DiagonalCovariance, None):  # shapes only: the cheapest initialisation
        conv = Conv(kind, n, c_in, c_out, kernel, cov=cov, **options)
        x = jax.ShapeDtypeStruct((2, 1, c_in, *spatial), jnp.float64)
        for sample_shape, leading in [((3,), (3,)), (None, ())]:
            out = jax.eval_shape(lambda x, k, s=sample_shape, c=conv: c(x, s, k), x, key(1))
            assert out.shape == (*leading, 2, 1, c_out, *spatial_out), (cov, sample_shape)
            assert out.dtype == jnp.float64
        kernel_t = kernel if isinstance(kernel, tuple) else (kernel,) * n
        assert conv.weight.shape == (c_out, c_in // options.get("groups", 1), *kernel_t)
        assert (conv.bias is None) == (options.get("bias") is False)
        assert conv.stochastic == (cov is not None) and conv.kernel_size == kernel_t


@pytest.mark.parametrize(("kind", "structure"), [("equinox", "kronecker"), ("nnx", "diagonal")])
def test_conv_forward_is_structcov_conv_on_params(kind, structure):
    conv = Conv(kind, 2, 4, 2, 3, padding=1, groups=2, cov=STRUCTURES[structure])
    options = {"stride": 1, "padding": 1, "dilation": 1, "groups": 2}
    x = randn(1, 3, 4, 5, 5)
    xs = randn(2, 2, 3, 4, 5, 5)

    def outputs(conv: Any) -> Any:
        params = core(conv)
        ours = [
            conv(x, (2,), key(3)),
            conv(x, None),
            conv(xs, (2,), key(4), input_contains_samples=True),
        ]
        theirs = [
            sc.conv(x, params, (2,), key(3), **options),
            sc.conv(x, params, None, **options),
            sc.conv(xs, params, (2,), key(4), input_contains_samples=True, **options),
        ]
        return ours, theirs

    ours, theirs = jitted(kind, outputs, conv)
    for got, want in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert ours[0].shape == (2, 3, 2, 5, 5)


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_conv_is_lax_conv_on_the_means(kind):
    conv = Conv(kind, 1, 4, 6, 3, stride=2, padding=1, dilation=2, groups=2)
    assert isinstance(core(conv), scj.DeterministicParameter)
    x = randn(1, 2, 3, 4, 11)
    flat = jax.lax.conv_general_dilated(
        x.reshape(6, 4, 11),
        conv.weight,
        window_strides=(2,),
        padding=((1, 1),),
        rhs_dilation=(2,),
        dimension_numbers=("NCH", "OIH", "NCH"),
        feature_group_count=2,
    )
    expected = (flat + conv.bias[:, None]).reshape(2, 3, 6, -1)
    mean, replicated, per_sample, unbatched = jitted(
        kind,
        lambda c: (
            c(x, None),
            c(x, (2,)),
            c(x, (2,), input_contains_samples=True),
            c(x[0, 0], None),  # no batch axes
        ),
        conv,
    )
    assert_close(mean, expected)
    assert_close(replicated, jnp.broadcast_to(expected, (2, *expected.shape)))
    assert_close(per_sample, expected)
    assert_close(unbatched, expected[0, 0])
    with pytest.raises(ValueError, match="no `parameter_samples`"):
        conv(x, (2,), parameter_samples={"weight": jnp.zeros((2, *conv.weight.shape))})
    with pytest.raises(ValueError, match=r"must have shape \(\*batch, 4, \*spatial\)"):
        conv(randn(1, 3, 5, 11), None)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("parametrization", [sp.Standard(), sp.MaximalUpdate()], ids=repr)
def test_conv_initialised_at_the_parametrization_scales(kind, parametrization):
    # fan_in = in_channels / groups * prod(kernel) = 8 / 2 * 9 = 36, fan_out = 60 * 9
    conv = Conv(
        kind, 2, 8, 60, 3, groups=2, layer_type="input", cov=sc.DiagonalCovariance,
        parametrization=parametrization,
    )  # fmt: skip
    assert conv._fans() == sp.fans((60, 4, 3, 3)) == (36, 540)
    scales = conv.init_scales()
    assert scales == parametrization.init_scales(36, 540, "input")
    assert conv.lr_scales("sgd") == parametrization.lr_scales(36, 540, "sgd", "input")
    assert float(jnp.std(conv.weight)) == pytest.approx(scales["weight"], rel=0.05)
    storage = core(conv).cov.storage()
    for name in ("weight", "bias"):
        std = jax.nn.softplus(storage[f"scale.{name}"])
        assert_close(std, jnp.full_like(std, scales[name]), rtol=1e-10)
    factors = scj.lr_scaling_tree(conv, optimizer="sgd")
    f = conv.lr_scales("sgd")
    if kind == "equinox":
        assert factors.params["weight"] == f["weight"] and factors.params["bias"] == f["bias"]
    else:
        assert factors["params"]["mean"]["weight"] == f["weight"]
        assert factors["params"]["cov"]["scale.weight"] == f["weight"]


@pytest.mark.parametrize("kind", KINDS)
def test_conv_in_sequential_jit_grad_kl_and_predictive(kind):
    first = Conv(kind, 1, 2, 4, 3, padding=1, cov=sc.KroneckerCovariance, seed=0)
    second = Conv(kind, 1, 4, 3, 3, stride=2, cov=sc.LowRankPlusDiagonalCovariance(1), seed=1)
    model = Sequential(kind, first, jax.nn.relu, second, lambda h: jnp.mean(h, axis=-1))
    x = randn(1, 5, 2, 8)

    def outputs(model: Any) -> Any:
        first, second = model[0], model[2]
        k0, _, k2, _ = jax.random.split(key(7), 4)
        hidden = jax.nn.relu(first(x, (2,), k0))
        expected = jnp.mean(second(hidden, (2,), k2, input_contains_samples=True), axis=-1)
        probs = scj.predictive(model, x, (2,), key(1), probabilities=True)
        return model(x, (2,), key(7)), expected, probs, scj.kl_divergence(model, 1.0)

    got, expected, probs, kl = jitted(kind, outputs, model)
    assert got.shape == (2, 5, 3) and probs.shape == (5, 3)
    assert_close(got, expected)
    assert bool(jnp.isfinite(kl))

    def loss(model: Any) -> Any:
        return jnp.sum(model(x, (2,), key(2)) ** 2) + scj.kl_divergence(model, 1.0)

    if kind == "equinox":
        eqx = need(kind)
        grads = eqx.filter_jit(eqx.filter_grad(loss))(model)
        leaves = [
            (jax.tree_util.keystr(p), v)
            for i in (0, 2)
            for p, v in jax.tree_util.tree_leaves_with_path(grads[i].params)
        ]
        assert len(leaves) == len(jax.tree.leaves(core(first))) + len(jax.tree.leaves(core(second)))
    else:
        nnx = need(kind)
        leaves = list(nnx.to_flat_state(nnx.jit(nnx.grad(loss))(model)))
        assert len(leaves) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    for path, value in leaves:
        value = value[...] if hasattr(value, "get_metadata") else value
        assert bool(jnp.all(jnp.isfinite(value))), path
        assert float(jnp.sum(jnp.abs(value))) > 0, path


@pytest.mark.parametrize("kind", KINDS)
def test_conv_argument_errors(kind):
    with pytest.raises(ValueError, match=r"`groups` \(2\) must divide"):
        Conv(kind, 2, 3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="`groups` must be an int >= 1"):
        Conv(kind, 2, 3, 4, 3, groups=0)
    with pytest.raises(ValueError, match="`padding_mode` must be 'zeros'"):
        Conv(kind, 2, 3, 4, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="`kernel_size` must be a positive int or a tuple of 2"):
        Conv(kind, 2, 3, 4, (3, 3, 3))
    with pytest.raises(ValueError, match="`kernel_size` must be a positive int"):
        Conv(kind, 1, 3, 4, 0)
    with pytest.raises(ValueError, match="`padding='same'` needs stride 1"):
        Conv(kind, 1, 3, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="`padding` must be 'valid', 'same'"):
        Conv(kind, 1, 3, 4, 3, padding="full")
    with pytest.raises(ValueError, match="`in_channels` must be an int >= 1"):
        Conv(kind, 3, 0, 4, 3)
    with pytest.raises(ValueError, match="`layer_type` must be one of"):
        Conv(kind, 1, 3, 4, 3, layer_type="middle")
    with pytest.raises(TypeError, match="`cov` must be None, a structcov covariance"):
        Conv(kind, 1, 3, 4, 3, cov=lambda: "diagonal")


def test_the_conv_layers_are_created_lazily():
    pytest.importorskip("equinox")
    code = (
        "import sys, jax, structcov as sc, structcov.jax as scj\n"
        "assert 'equinox' not in sys.modules and 'flax' not in sys.modules\n"
        "conv = scj.EquinoxConv2d(2, 3, 3, cov=sc.DiagonalCovariance, key=jax.random.key(0))\n"
        "out = conv(jax.numpy.ones((1, 2, 4, 4)), (2,), jax.random.key(1))\n"
        "assert out.shape == (2, 1, 3, 2, 2)\n"
        "assert 'flax' not in sys.modules, 'flax imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
