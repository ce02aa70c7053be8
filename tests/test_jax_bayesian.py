"""structcov.jax.bayesian: a deterministic Equinox model made Bayesian (jax session).

The counterpart of the ``bayesian`` tests in tests/test_torch_layers.py. Equinox
layers take one example, the converted model a batch: the oracle is
``jax.vmap(plain)(x)``.
"""

from __future__ import annotations

import os
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
eqx = pytest.importorskip("equinox", reason="equinox is not installed")

import jax.numpy as jnp  # noqa: E402

import structcov as sc  # noqa: E402
import structcov.jax as scj  # noqa: E402
import structcov.parametrizations as sp  # noqa: E402


def keys(seed: int, n: int) -> Any:
    return jax.random.split(jax.random.key(seed), n)


def assert_close(actual: Any, expected: Any) -> None:
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-12, atol=1e-12)


def mlp() -> Any:
    k = keys(0, 2)
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(4, 6, key=k[0], dtype=jnp.float64),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(6, 3, use_bias=False, key=k[1], dtype=jnp.float64),
        ]
    )


class Net(eqx.Module):
    """A model with its own ``__call__`` (one example, one draw per call)."""

    body: Any
    fc: Any

    def __init__(self, key: Any) -> None:
        k1, k2 = jax.random.split(key)
        self.body = eqx.nn.Sequential(
            [eqx.nn.Linear(4, 6, key=k1, dtype=jnp.float64), eqx.nn.Lambda(jax.nn.relu)]
        )
        self.fc = eqx.nn.Linear(6, 3, key=k2, dtype=jnp.float64)

    def __call__(self, x: Any, key: Any = None) -> Any:
        return self.fc(self.body(x), key=key)


def test_bayesian_converts_an_mlp_keeping_its_means():
    plain = mlp()
    key = jax.random.key(7)
    model = scj.bayesian(plain, sc.DiagonalCovariance, key=key, parametrization=sp.MaximalUpdate())
    assert isinstance(model, scj.EquinoxSequential) and len(model) == 3
    assert type(plain.layers[0]) is eqx.nn.Linear  # the original is not changed
    assert isinstance(model[0], scj.EquinoxLinear) and isinstance(model[1], eqx.nn.Lambda)
    assert [model[0].layer_type, model[2].layer_type] == ["input", "output"]
    assert model[0].stochastic and model[2].stochastic and model[2].bias is None
    assert model[0].weight is plain.layers[0].weight and model[0].bias is plain.layers[0].bias
    assert model[2].weight is plain.layers[2].weight
    # the covariance is that of the layer constructor with the layer's key
    reference = scj.EquinoxLinear(
        6, 3, False, "output", sc.DiagonalCovariance, sp.MaximalUpdate(),
        key=jax.random.split(key, 2)[1], dtype=jnp.float64,
    )  # fmt: skip
    for got, want in zip(
        jax.tree_util.tree_leaves(model[2].params.cov),
        jax.tree_util.tree_leaves(reference.params.cov),
        strict=True,
    ):
        assert_close(got, want)
    x = jax.random.normal(jax.random.key(1), (5, 4))
    assert_close(model(x, None), jax.vmap(plain)(x))
    assert_close(model(x[0], None), plain(x[0]))  # one example, as Equinox takes it
    samples, kl = eqx.filter_jit(lambda m, x, k: (m(x, (3,), k), scj.kl_divergence(m, 1.0)))(
        model, x, jax.random.key(2)
    )
    assert samples.shape == (3, 5, 3) and samples.dtype == jnp.float64
    assert not np.allclose(np.asarray(samples[0]), np.asarray(model(x, None)))
    assert np.isfinite(float(kl))


def test_bayesian_only_selects_and_keeps_a_custom_call():
    net = Net(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 4))
    last = scj.bayesian(net, sc.KroneckerCovariance(), key=jax.random.key(2), only=["fc"])
    assert isinstance(last.body, scj.EquinoxSequential) and isinstance(last.fc, scj.EquinoxLinear)
    assert last.fc.stochastic and last.fc.layer_type == "output"
    # unselected: a deterministic structcov layer with the same weights (takes batches)
    assert not last.body[0].stochastic and last.body[0].layer_type == "input"
    assert last.body[0].weight is net.body.layers[0].weight
    assert_close(last.fc(last.body(x), None), jax.vmap(net)(x))
    assert last(x, jax.random.key(3)).shape == (5, 3)  # one draw per call
    seen = []

    def wide(path: str, layer: Any) -> bool:
        seen.append(path)
        return layer.out_features == 6

    picked = scj.bayesian(net, sc.DiagonalCovariance, key=jax.random.key(2), only=wide)
    assert seen == ["body.0", "fc"]
    assert picked.body[0].stochastic and not picked.fc.stochastic
    assert picked.body[0].layer_type == "output"  # a single selected layer (torch's rule)
    with pytest.raises(ValueError, match=r"`only` names no convertible layer .*\['body'\]"):
        scj.bayesian(net, sc.DiagonalCovariance, key=jax.random.key(2), only=["body"])
    with pytest.raises(ValueError, match="one covariance object belongs to one layer"):
        scj.bayesian(net, sc.DiagonalCovariance(), key=jax.random.key(2))
    with pytest.raises(ValueError, match="has no layer to convert"):
        scj.bayesian(eqx.nn.Lambda(jax.nn.relu), sc.DiagonalCovariance, key=jax.random.key(2))
    with pytest.raises(TypeError, match="`key` must be a JAX PRNG key"):
        scj.bayesian(net, sc.DiagonalCovariance, key=None)


def test_bayesian_without_covariance_gives_deterministic_layers():
    plain = mlp()
    model = scj.bayesian(plain, None, key=jax.random.key(0))
    assert isinstance(model, scj.EquinoxSequential)
    assert not model.stochastic and not model[0].stochastic and not model[2].stochastic
    assert isinstance(model[0].params, scj.DeterministicParameter)
    x = jax.random.normal(jax.random.key(1), (5, 4))
    mean = model(x, None)
    assert_close(mean, jax.vmap(plain)(x))
    assert_close(model(x, (2,), jax.random.key(3)), jnp.broadcast_to(mean, (2, 5, 3)))
    with pytest.raises(ValueError, match="holds no structcov GaussianParameter"):
        scj.kl_divergence(model, 1.0)


def test_bayesian_converts_convolutions():
    k = keys(3, 2)
    plain = eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(1, 4, 3, stride=2, padding=1, key=k[0], dtype=jnp.float64),
            eqx.nn.Lambda(jax.nn.relu),
            # "SAME" with an even kernel pads (0, 1): structcov's padding="same"
            eqx.nn.Conv2d(4, 2, 2, padding="SAME", groups=2, use_bias=False, key=k[1],
                          dtype=jnp.float64),
        ]
    )  # fmt: skip
    model = scj.bayesian(plain, sc.DiagonalCovariance, key=jax.random.key(4))
    first, second = model[0], model[2]
    assert isinstance(first, scj.EquinoxConv2d) and isinstance(second, scj.EquinoxConv2d)
    assert first.stochastic and second.stochastic
    assert (first.stride, first.padding, second.padding) == ((2, 2), (1, 1), "same")
    assert [first.layer_type, second.layer_type] == ["input", "output"]
    assert first.weight is plain.layers[0].weight and first.bias.shape == (4,)
    assert_close(first.bias, plain.layers[0].bias[:, 0, 0])
    assert second.bias is None and second.groups == 2
    images = jax.random.normal(jax.random.key(5), (3, 1, 6, 6))
    mean = model(images, None)
    assert_close(mean, jax.vmap(plain)(images))
    samples, kl = eqx.filter_jit(lambda m, x, k: (m(x, (2,), k), scj.kl_divergence(m, 1.0)))(
        model, images, jax.random.key(6)
    )
    assert samples.shape == (2, 3, 2, 3, 3)
    assert not np.allclose(np.asarray(samples[0]), np.asarray(mean))
    assert np.isfinite(float(kl))


def test_bayesian_refuses_what_structcov_layers_cannot_express():
    k = jax.random.key(0)
    cases = {
        "padding_mode='REFLECT'": eqx.nn.Conv1d(1, 1, 3, padding=1, padding_mode="REFLECT", key=k),
        r"pads asymmetrically": eqx.nn.Conv1d(1, 1, 3, padding=((0, 1),), key=k),
        r"padding='SAME' with stride \(2,\)": eqx.nn.Conv1d(1, 1, 3, 2, padding="SAME", key=k),
        "pads asymmetrically \\(\\(\\(1, 0\\),\\)\\)": eqx.nn.Conv1d(
            1, 1, 2, padding="SAME_LOWER", key=k
        ),
        "'scalar'": eqx.nn.Linear("scalar", 2, key=k),
    }
    for message, layer in cases.items():
        with pytest.raises(ValueError, match=message):
            scj.bayesian(layer, sc.DiagonalCovariance(), key=k)
    # zero padding makes the padding mode irrelevant
    layer = eqx.nn.Conv1d(1, 1, 3, padding_mode="REFLECT", key=k)
    assert isinstance(scj.bayesian(layer, None, key=k), scj.EquinoxConv1d)


def test_bayesian_refuses_an_nnx_model():
    pytest.importorskip("flax")
    from flax import nnx

    with pytest.raises(TypeError, match="Flax NNX module"):
        scj.bayesian(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), None, key=jax.random.key(0))
