"""P ~ 2e6 (low rank plus diagonal, rank 8, float32): every operation runs, nothing is P x P.

A densifying path would need 16 TB here, so simply finishing proves the
structured paths. On NumPy the traced peak allocation of each operation is
also held under 1 GB. Time is not asserted (benchmarks/scale.py measures it).
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

import structcov as sc

D_OUT, D_IN, RANK = 2000, 1000, 8
P = D_OUT * D_IN + D_OUT


@pytest.fixture(scope="module")
def large(backend):
    rng = np.random.default_rng(0)
    mean = {
        "weight": backend.asarray(rng.standard_normal((D_OUT, D_IN)) * 0.1, "float32"),
        "bias": backend.asarray(rng.standard_normal(D_OUT) * 0.1, "float32"),
    }
    q = sc.GaussianParameter(mean, sc.LowRankPlusDiagonalCovariance(RANK))
    q.cov.reset_parameters(0.1, generator=backend.generator(1))
    return q, sc.normal_prior(q, 1.0)


OPERATIONS = ["sample", "diagonal", "trace", "logdet", "solve", "log_prob", "kl_to_prior"]


def _run(name, backend, q, prior):
    if name == "sample":
        return q.sample((), generator=backend.generator(2))
    if name == "diagonal":
        return q.cov.diagonal()
    if name == "trace":
        return q.cov.trace()
    if name == "logdet":
        return q.cov.logdet()
    if name == "solve":
        return q.cov.solve(q.flat_mean())
    if name == "log_prob":
        return q.log_prob({n: q.mean[n] for n in q.names})
    return sc.kl_divergence(q, prior)


@pytest.mark.parametrize("name", OPERATIONS)
def test_large_low_rank_plus_diagonal(backend, large, name):
    q, prior = large
    if backend.name == "numpy":
        tracemalloc.start()
        result = _run(name, backend, q, prior)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 2**30, f"{name} allocated {peak / 2**20:.0f} MB at its peak"
    else:
        result = _run(name, backend, q, prior)
    leaves = list(result.values()) if isinstance(result, dict) else [result]
    for leaf in leaves:
        values = backend.to_numpy(leaf)
        assert np.all(np.isfinite(values)), f"{name} returned a non-finite value"
        assert backend.dtype_name(leaf) == "float32"
    if name == "diagonal":
        assert leaves[0].shape == (P,)
    if name == "sample":
        assert leaves[0].shape == (D_OUT, D_IN) and leaves[1].shape == (D_OUT,)
    if name == "kl_to_prior":
        # d_i = 0.1 everywhere: the diagonal part alone gives P (0.01 - 1 - log 0.01) / 2.
        diagonal_part = P * (0.01 - 1.0 - math.log(0.01)) / 2
        assert float(backend.to_numpy(leaves[0])) >= 0.99 * diagonal_part
