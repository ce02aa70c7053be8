"""Initial states that train: every stored array gets a non-zero gradient from a sampled loss.

For each structure, in the state right after ``GaussianParameter(mean, cov)`` (the
default storage) and after ``reset_parameters`` (scale 0.1), the gradient of
L = sum(c * sample) with respect to every stored array is computed by torch autograd
(and JAX, in its session) and must not be all zero: a state with a zero gradient for
some array (both Kronecker factors zero) is a saddle that gradient descent never leaves.
Diagonal scales must also start well away from zero.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

import structcov as sc

_selected = os.environ.get("STRUCTCOV_BACKEND", "numpy")

FACTORIES = {
    "diagonal": sc.DiagonalCovariance,
    "diagonal-identity": lambda: sc.DiagonalCovariance(scale_transform="identity"),
    "diagonal-exp": lambda: sc.DiagonalCovariance(scale_transform="exp"),
    "lowrank+diagonal": lambda: sc.LowRankPlusDiagonalCovariance(3),
    "lowrank": lambda: sc.LowRankCovariance(3),
    "factorized": sc.FactorizedCovariance,
    "kronecker": sc.KroneckerCovariance,
    "kronecker-low": lambda: sc.KroneckerCovariance(2, 2),
}

# The identity transform's default storage is zero (the seed's point mass), where only a
# reset gives trainable scales; every other default must train as it is.
DEFAULT_TRAINS = {name for name in FACTORIES if name != "diagonal-identity"}

D_OUT, D_IN = 4, 3


def _means(xp_zeros: object) -> dict[str, object]:
    zeros = xp_zeros  # a function (shape) -> zero array of the backend, float32
    return {"weight": zeros((D_OUT, D_IN)), "bias": zeros((D_OUT,))}  # type: ignore[operator]


@pytest.mark.skipif(_selected != "torch", reason="torch autograd check runs in the torch session")
@pytest.mark.parametrize("reset", [False, True], ids=["default", "reset"])
@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_every_stored_array_gets_a_gradient_torch(kind: str, reset: bool) -> None:
    torch = pytest.importorskip("torch")
    import structcov.torch as st

    if not reset and kind not in DEFAULT_TRAINS:
        pytest.skip("the identity transform's default scale is 0 (the seed's state)")
    q = st.GaussianParameter(
        _means(lambda shape: torch.zeros(shape, dtype=torch.float32)), FACTORIES[kind]()
    )
    if reset:
        q.cov.reset_parameters(0.1, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(0)
    weights = {
        "weight": torch.randn(8, D_OUT, D_IN, generator=generator),
        "bias": torch.randn(8, D_OUT, generator=generator),
    }
    sample = q.sample(8, generator)
    loss = sum((weights[name] * sample[name]).sum() for name in sample)
    loss.backward()
    for path, value in q.cov.storage().items():
        assert value.grad is not None, path
        assert torch.count_nonzero(value.grad) > 0, f"{kind}: zero gradient for {path}"


@pytest.mark.skipif(_selected != "jax", reason="JAX grad check runs in the jax session")
@pytest.mark.parametrize("kind", sorted(DEFAULT_TRAINS))
def test_every_stored_array_gets_a_gradient_jax(kind: str) -> None:
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    import structcov.jax  # noqa: F401 -- registers the pytrees

    q = sc.GaussianParameter(
        _means(lambda shape: jnp.zeros(shape, dtype=jnp.float32)), FACTORIES[kind]()
    )
    key = jax.random.key(0)
    c = {"weight": jnp.ones((8, D_OUT, D_IN)), "bias": jnp.ones((8, D_OUT))}

    def loss(param: sc.GaussianParameter) -> object:
        sample = param.sample(8, key)
        return sum(jnp.sum(c[name] * jnp.sin(sample[name])) for name in sample)

    grads = jax.grad(loss)(q)
    for path, value in grads.cov.storage().items():
        assert bool(jnp.any(value != 0)), f"{kind}: zero gradient for {path}"


@pytest.mark.parametrize("kind", ["diagonal", "diagonal-identity", "diagonal-exp"])
@pytest.mark.parametrize("scale", [1e-3, 0.1, 2.0])
def test_reset_sets_diagonal_scales_to_the_mean_scale(kind: str, scale: float) -> None:
    """``reset_parameters(c)`` gives every standard deviation c (not N(0, c^2) draws,
    some of which start near zero), whatever the transform."""
    q = sc.GaussianParameter({"w": np.zeros((50, 4)), "b": np.zeros(3)}, FACTORIES[kind]())
    q.cov.reset_parameters({"w": scale, "b": 2 * scale}, generator=np.random.default_rng(0))
    std = np.sqrt(np.diag(q.cov.to_dense()))
    np.testing.assert_allclose(std[:200], scale, rtol=1e-12)
    np.testing.assert_allclose(std[200:], 2 * scale, rtol=1e-12)


def test_default_kronecker_is_the_identity_at_full_rank() -> None:
    q = sc.GaussianParameter(
        {"weight": np.zeros((D_OUT, D_IN)), "bias": np.zeros(D_OUT)}, sc.KroneckerCovariance()
    )
    np.testing.assert_array_equal(q.cov.to_dense(), np.eye(D_OUT * (D_IN + 1)))
    assert math.isfinite(float(q.cov.logdet()))
