"""Gradients with respect to the covariance storage agree with central finite differences.

float64, every structure with a full-rank covariance, over a small weight+bias layer
(P = 8): KL(q || normal_prior(q, sigma)) (float and per-name sigma), KL(q || p) to a
low rank plus diagonal p (the generic trace path) and log_prob of a batch of values.

- torch: ``torch.autograd.gradcheck`` on the storage tensors (every entry), loaded
  with ``cov.load_storage``.
- JAX: ``jax.value_and_grad`` of a function of the storage dict (jitted: one compile
  per test) against central differences of three entries per stored array; the
  prior KL with per-name sigma and log_prob (the other targets run on torch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import structcov as sc
from cases import STRUCTURES
from conftest import Backend
from test_densities import JAX_FULL, gaussian, prior_scales, target

#: A small layer (P = 8): gradcheck perturbs every stored entry.
SMALL_LAYER = {"weight": (2, 3), "bias": (2,)}
FULL_RANK = ["factorized-full", "lowrank-clamped", "diagonal", "lowrank+diag-2", "kronecker-full"]
TARGETS = ["kl-prior-float", "kl-prior-per-name", "kl-lowrank+diag", "log_prob"]
#: JAX compiles value_and_grad once per test (about a second here): by default it checks
#: the per-name prior KL and log_prob (STRUCTCOV_JAX_FULL=1: every target); torch all.
JAX_TARGETS = ["kl-prior-per-name", "log_prob"]


def objective(name: str, q: sc.GaussianParameter, backend: Backend) -> Callable[[], Any]:
    """The scalar (or batch) function of q's current storage that ``name`` stands for."""
    if name.startswith("kl-prior"):
        scale, _ = prior_scales(name.removeprefix("kl-"), backend, "float64", q.shapes)
        prior = sc.normal_prior(q, scale)
        return lambda: sc.kl_divergence(q, prior)
    if name == "kl-lowrank+diag":
        p, _ = target("lowrank+diag-2", q, backend, "float64")
        return lambda: sc.kl_divergence(q, p)
    rng = np.random.default_rng(11)
    values = {
        n: backend.asarray(
            backend.to_numpy(q.mean[n]) + 0.5 * rng.standard_normal((3, *s)), "float64"
        )
        for n, s in q.shapes.items()
    }
    return lambda: q.log_prob(values)


def fresh_q(structure: str, backend: Backend) -> sc.GaussianParameter:
    """A private copy of the cached parameter (the tests load other storage into it)."""
    cached, _ = gaussian(structure, backend, "float64", spec=SMALL_LAYER)
    q = sc.GaussianParameter(dict(cached.mean), STRUCTURES[structure][0]())
    q.cov.load_storage(cached.cov.storage())
    return q


@pytest.fixture
def autodiff(backend: Backend) -> Backend:
    if backend.name not in ("torch", "jax"):
        pytest.skip(f"gradients need an autodiff backend (torch or jax); {backend.name} has none")
    return backend


@pytest.mark.parametrize("name", TARGETS)
@pytest.mark.parametrize("structure", FULL_RANK)
def test_gradients_match_finite_differences(autodiff: Backend, structure: str, name: str) -> None:
    backend = autodiff
    if backend.name == "jax" and name not in JAX_TARGETS and not JAX_FULL:
        pytest.skip(f"JAX checks {JAX_TARGETS} (a compile per test); torch checks {name}")
    q = fresh_q(structure, backend)
    assert not q.cov.is_singular
    evaluate = objective(name, q, backend)
    original = q.cov.storage()
    paths = list(original)

    def f_of(storage: dict[str, Any]) -> Any:
        q.cov.load_storage(storage)
        try:
            return evaluate()
        finally:
            q.cov.load_storage(original)

    if backend.name == "torch":
        import torch

        inputs = tuple(original[p].detach().clone().requires_grad_(True) for p in paths)
        assert all(t.dtype == torch.float64 for t in inputs)
        assert torch.autograd.gradcheck(
            lambda *tensors: f_of(dict(zip(paths, tensors, strict=True))),
            inputs,
            eps=1e-6,
            atol=1e-6,
            rtol=1e-5,
        )
        return

    import jax

    def scalar(storage: dict[str, Any]) -> Any:
        out = f_of(storage)
        return out if out.ndim == 0 else out.sum() + (out**2).sum() / 10

    # One compile per test (eager JAX would compile every operation separately); the
    # finite differences below evaluate the same compiled function.
    value_and_grad = jax.jit(jax.value_and_grad(scalar))
    value, gradient = value_and_grad(original)
    assert np.isfinite(float(value))
    assert set(gradient) == set(paths)  # JAX sorts dict keys; compare by path
    rng = np.random.default_rng(5)
    h = 1e-6
    for path in paths:
        base = np.asarray(original[path], dtype=np.float64)
        grad = np.asarray(gradient[path])
        assert grad.shape == base.shape and np.all(np.isfinite(grad)), path
        for flat_index in rng.choice(base.size, size=min(3, base.size), replace=False):
            index = np.unravel_index(flat_index, base.shape)
            values = []
            for step in (h, -h):
                moved = base.copy()
                moved[index] += step
                values.append(float(value_and_grad({**original, path: moved})[0]))
            numeric = (values[0] - values[1]) / (2 * h)
            np.testing.assert_allclose(
                grad[index], numeric, rtol=1e-5, atol=1e-6, err_msg=f"{path}{index}"
            )
