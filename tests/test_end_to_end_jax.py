"""End to end on JAX: VI for a Bayesian linear regression with a known posterior.

The same problem as the torch end-to-end test (tests/regression_problem.py): the
reparametrised ELBO (Monte Carlo likelihood + exact KL to the N(0, tau^2 I)
prior) is maximised with optax Adam, the GaussianParameter itself being the
pytree that is differentiated; KL(q || exact posterior) must come close to the
best each structure can reach.
"""

from __future__ import annotations

import operator
import os

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
_selected = os.environ.get("STRUCTCOV_BACKEND")
if _selected and "jax" not in _selected.split(","):
    pytest.skip("JAX end-to-end tests run in the jax session", allow_module_level=True)

import jax.numpy as jnp  # noqa: E402

import structcov as sc  # noqa: E402
import structcov.jax as sj  # noqa: E402
from regression_problem import D_IN, D_OUT, make_problem  # noqa: E402

jax.config.update("jax_enable_x64", True)

STRUCTURES = {
    "diagonal": sc.DiagonalCovariance,
    "lowrank+diag": lambda: sc.LowRankPlusDiagonalCovariance(2),
    "kronecker": sc.KroneckerCovariance,
    "factorized": sc.FactorizedCovariance,
}


def fit(structure: str, steps: int = 700, samples: int = 16, seed: int = 0) -> float:
    """Fit q by VI; return KL(q || exact posterior)."""
    problem = make_problem()
    x, y = jnp.asarray(problem.x), jnp.asarray(problem.y)
    q = sc.GaussianParameter(
        {"weight": jnp.zeros((D_OUT, D_IN)), "bias": jnp.zeros(D_OUT)}, STRUCTURES[structure]()
    )
    q.cov.reset_parameters(0.1, generator=jax.random.key(seed))
    prior = sc.normal_prior(q, problem.tau)
    scales = sj.lr_scaling_tree(q)
    optimizer = optax.chain(
        optax.adam(optax.cosine_decay_schedule(0.05, steps)),
        optax.stateless(lambda updates, _: jax.tree.map(operator.mul, updates, scales)),
    )

    def loss(q, key):
        draw = q.sample((samples,), generator=key)
        prediction = x @ jnp.swapaxes(draw["weight"], -1, -2) + draw["bias"][:, None, :]
        log_likelihood = -0.5 * jnp.sum((y - prediction) ** 2, axis=(-1, -2)) / problem.sigma**2
        return -jnp.mean(log_likelihood) + sc.kl_divergence(q, prior)

    @jax.jit
    def step(q, state, key):
        grads = jax.grad(loss)(q, key)
        updates, state = optimizer.update(grads, state, q)
        return optax.apply_updates(q, updates), state

    state = optimizer.init(q)
    for key in jax.random.split(jax.random.key(seed + 1), steps):
        q, state = step(q, state, key)
    posterior = sc.from_dense(
        {k: jnp.asarray(v) for k, v in problem.mean.items()},
        jnp.asarray(problem.cov),
        sc.FactorizedCovariance(),
    )
    return float(sc.kl_divergence(q, posterior))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_vi_approaches_the_exact_posterior(structure):
    kl = fit(structure)
    best_diagonal = make_problem().best_diagonal_kl()
    best = best_diagonal if structure == "diagonal" else 0.0
    print(f"KL(q || posterior) for {structure}: {kl:.4f} (best reachable: {best:.4f})")
    assert np.isfinite(kl)
    assert kl >= best - 1e-6
    limit = {"kronecker": 0.05, "factorized": 0.05}.get(structure, best_diagonal + 0.05)
    assert kl < (best + 0.05 if structure == "diagonal" else limit)
