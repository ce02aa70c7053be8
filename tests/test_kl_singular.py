"""KL(q || p) with q and p both singular by construction (a low-rank dense factor, a
low-rank Kronecker structure), against a dense float64 oracle written here.

q is absolutely continuous with respect to p exactly when both live on the same
affine subspace; the KL is then that of the two densities on it,

    KL = 0.5 (tr(Sigma_p^+ Sigma_q) + d^T Sigma_p^+ d - k + log pdet Sigma_p - log pdet Sigma_q),

(k the common rank, ^+ the pseudo-inverse, pdet the product of the non-zero
eigenvalues), and +inf otherwise. The oracle reads the supports from ``eigh`` of the
dense float64 Sigma; the library decides them from QR + SVD of the factors with a
tolerance. p is built to share q's support (q's factor times an invertible matrix,
the mean moved inside the support), or not (independent factors, a lower rank, a
mean moved off the support).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import structcov as sc
import structcov.functional as F
from cases import MEAN_SPECS
from conftest import Backend
from oracle import dense_oracle, join, split
from test_densities import eps

LAYOUT = MEAN_SPECS["weight+bias"]  # weight (3, 4), bias (3,): P = 15
C = 8.0


def factories() -> dict[str, Any]:
    return {
        "lowrank-2": lambda: sc.LowRankCovariance(2),
        "lowrank-6": lambda: sc.LowRankCovariance(6),
        "kronecker-2x1": lambda: sc.KroneckerCovariance(input_rank=2, output_rank=1),
        "kronecker-3x2": lambda: sc.KroneckerCovariance(input_rank=3, output_rank=2),
    }


def make(
    kind: str,
    storage: dict[str, np.ndarray],
    mean: dict[str, np.ndarray],
    backend: Backend,
    dtype: str,
) -> sc.GaussianParameter:
    param = sc.GaussianParameter(
        {n: backend.asarray(v, dtype) for n, v in mean.items()}, factories()[kind]()
    )
    param.cov.load_storage({path: backend.asarray(v, dtype) for path, v in storage.items()})
    return param


def random_storage(kind: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = {
        path: tuple(v.shape)
        for path, v in sc.GaussianParameter(
            {n: np.zeros(s) for n, s in LAYOUT.items()}, factories()[kind]()
        )
        .cov.storage()
        .items()
    }
    return {path: 0.5 * rng.standard_normal(shape) for path, shape in shapes.items()}


def mixing(size: int, rng: np.random.Generator) -> np.ndarray:
    """A well-conditioned invertible size x size matrix (the same column space)."""
    return np.eye(size) + 0.3 * rng.standard_normal((size, size))


def same_support(kind: str, storage: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
    """p's storage: each factor of q times an invertible matrix on the right."""
    if kind.startswith("kronecker"):
        m_in = mixing(storage["input_factor.weight"].shape[-1], rng)
        m_out = mixing(storage["output_factor"].shape[-1], rng)
        return {
            path: v @ (m_out if path == "output_factor" else m_in) for path, v in storage.items()
        }
    m = mixing(storage["factor.weight"].shape[-1], rng)
    return {path: v @ m for path, v in storage.items()}


class Oracle:
    """Sigma and the mean in float64, with the support read from eigh."""

    def __init__(self, param: sc.GaussianParameter, backend: Backend) -> None:
        dense = dense_oracle(param.cov, param.mean, backend.to_numpy)
        self.layout, self.S, self.sigma = dense.layout, dense.S, dense.Sigma
        self.mean = join({n: backend.to_numpy(v) for n, v in param.mean.items()}, self.layout)
        values, vectors = np.linalg.eigh(self.sigma)
        kept = values > 1e-9 * values.max()
        self.values, self.basis = values[kept], vectors[:, kept]

    @property
    def rank(self) -> int:
        return int(self.values.shape[0])

    @property
    def cond(self) -> float:
        return float(self.values.max() / self.values.min())


def oracle_kl(q: Oracle, p: Oracle, dtype: str) -> float:
    """The KL on the common support in float64, or +inf (written from Sigma alone).

    The storage was rounded to ``dtype``, so supports meant to be equal differ by
    rounding: equal below 1e3 eps (the cases here are either equal to rounding or
    apart by 1e-3 and more, far from either tolerance).
    """
    projector = p.basis @ p.basis.T
    d = p.mean - q.mean
    tol = max(1e-8, 1e3 * eps(dtype))
    same = (
        q.rank == p.rank
        and np.linalg.norm(q.basis - projector @ q.basis) < tol
        and np.linalg.norm(d - projector @ d) < tol * (1 + np.linalg.norm(d))
    )
    if not same:
        return math.inf
    pinv = p.basis @ np.diag(1 / p.values) @ p.basis.T
    return 0.5 * float(
        np.trace(pinv @ q.sigma)
        + d @ pinv @ d
        - p.rank
        + np.sum(np.log(p.values))
        - np.sum(np.log(q.values))
    )


def check(q: sc.GaussianParameter, p: sc.GaussianParameter, backend: Backend, dtype: str) -> float:
    dq, dp = Oracle(q, backend), Oracle(p, backend)
    expected = oracle_kl(dq, dp, dtype)
    kl = sc.kl_divergence(q, p)
    assert tuple(kl.shape) == ()
    got = float(backend.to_numpy(kl))
    if math.isinf(expected):
        assert got == math.inf, got
    else:
        bound = C * eps(dtype) * (dq.layout.num_params + 1) * (dq.cond + dp.cond)
        assert abs(got - expected) <= bound * (1 + abs(expected)), (got, expected, bound)
        assert got >= -bound, got
    return got


def moved_mean(oracle: Oracle, vector: np.ndarray) -> dict[str, np.ndarray]:
    return split(oracle.mean + vector, oracle.layout)


KINDS = ("lowrank-2", "lowrank-6", "kronecker-2x1", "kronecker-3x2")


@pytest.mark.parametrize("kind", KINDS)
def test_same_support_matches_the_oracle(backend: Backend, dtype: str, kind: str) -> None:
    """p = q's factors mixed by invertible matrices, the mean moved inside the support:
    a finite KL equal to the oracle's, both ways."""
    rng = np.random.default_rng([3, len(kind)])
    mean = {n: rng.standard_normal(s) for n, s in LAYOUT.items()}
    storage = random_storage(kind, rng)
    q = make(kind, storage, mean, backend, dtype)
    dq = Oracle(q, backend)
    p = make(
        kind,
        same_support(kind, storage, rng),
        moved_mean(dq, dq.S @ rng.standard_normal(dq.S.shape[1])),
        backend,
        dtype,
    )
    assert q.cov.is_singular and p.cov.is_singular
    forward, backward = check(q, p, backend, dtype), check(p, q, backend, dtype)
    assert math.isfinite(forward) and forward > 0 and math.isfinite(backward)


@pytest.mark.parametrize("kind", KINDS)
def test_kl_to_itself_and_to_a_copy_is_zero(backend: Backend, dtype: str, kind: str) -> None:
    rng = np.random.default_rng([4, len(kind)])
    mean = {n: rng.standard_normal(s) for n, s in LAYOUT.items()}
    storage = random_storage(kind, rng)
    q, copy = (make(kind, storage, mean, backend, dtype) for _ in range(2))
    tiny = C * eps(dtype) * (q.num_params + 1) * Oracle(q, backend).cond
    for other in (q, copy):
        got = float(backend.to_numpy(sc.kl_divergence(q, other)))
        assert abs(got) <= tiny, got


@pytest.mark.parametrize("kind", KINDS)
def test_different_supports_are_inf(backend: Backend, dtype: str, kind: str) -> None:
    """Independent factors, a mean moved off the support, and a q of lower rank inside
    p's support: q is not absolutely continuous with respect to p, +inf exactly."""
    rng = np.random.default_rng([5, len(kind)])
    mean = {n: rng.standard_normal(s) for n, s in LAYOUT.items()}
    storage = random_storage(kind, rng)
    q = make(kind, storage, mean, backend, dtype)
    dq = Oracle(q, backend)
    other = make(kind, random_storage(kind, rng), mean, backend, dtype)
    assert check(q, other, backend, dtype) == math.inf
    outside = rng.standard_normal(dq.layout.num_params)
    outside -= dq.basis @ (dq.basis.T @ outside)  # orthogonal to the support
    moved = make(kind, storage, moved_mean(dq, 1e-3 * outside), backend, dtype)
    assert check(q, moved, backend, dtype) == math.inf
    # One factor column zeroed: q's support is a proper subspace of p's.
    lower = {path: v.copy() for path, v in storage.items()}
    path = "output_factor" if kind == "kronecker-3x2" else next(iter(lower))
    if kind == "kronecker-2x1":
        path = "input_factor.weight"
        lower["input_factor.bias"][..., -1] = 0.0
    if path == "factor.weight":
        lower["factor.bias"][..., -1] = 0.0
    lower[path][..., -1] = 0.0
    smaller = make(kind, lower, mean, backend, dtype)
    assert check(smaller, q, backend, dtype) == math.inf  # lower rank inside: singular
    assert check(q, smaller, backend, dtype) == math.inf  # higher rank: not inside


def test_kronecker_against_a_dense_factor_on_its_support(backend: Backend, dtype: str) -> None:
    """Mixed pair (the generic route): a LowRank(2) p whose factor spans the columns of a
    Kronecker(2x1) q's S: finite and equal to the oracle; a LowRank(3) p: +inf."""
    rng = np.random.default_rng(6)
    mean = {n: rng.standard_normal(s) for n, s in LAYOUT.items()}
    q = make("kronecker-2x1", random_storage("kronecker-2x1", rng), mean, backend, dtype)
    dq = Oracle(q, backend)
    columns = dq.S @ mixing(2, rng)  # (P, 2), flat order
    factor = split(columns.T, dq.layout, batch=(2,))  # name -> (2, *shape)
    storage = {f"factor.{n}": np.moveaxis(v, 0, -1) for n, v in factor.items()}
    p = make("lowrank-2", storage, moved_mean(dq, dq.S @ rng.standard_normal(2)), backend, dtype)
    assert math.isfinite(check(q, p, backend, dtype))
    assert math.isfinite(check(p, q, backend, dtype))
    wider = make("lowrank-6", random_storage("lowrank-6", rng), mean, backend, dtype)
    assert check(q, wider, backend, dtype) == math.inf
    assert check(wider, q, backend, dtype) == math.inf


@pytest.mark.parametrize("kind", ("lowrank-2", "kronecker-2x1"))
def test_point_masses(backend: Backend, dtype: str, kind: str) -> None:
    """All-zero factors: two point masses, KL 0 at the same mean and +inf elsewhere."""
    rng = np.random.default_rng(7)
    mean = {n: rng.standard_normal(s) for n, s in LAYOUT.items()}
    zeros = {path: np.zeros_like(v) for path, v in random_storage(kind, rng).items()}
    q = make(kind, zeros, mean, backend, dtype)
    assert float(backend.to_numpy(sc.kl_divergence(q, q))) == 0.0
    shifted = make(kind, zeros, {n: v + 1.0 for n, v in mean.items()}, backend, dtype)
    assert float(backend.to_numpy(sc.kl_divergence(q, shifted))) == math.inf


def test_under_jax_jit(backend: Backend, dtype: str) -> None:
    if backend.name != "jax":
        pytest.skip("jax.jit runs on the jax backend only")
    import jax

    rng = np.random.default_rng(8)
    mean = {n: rng.standard_normal(s) for n, s in LAYOUT.items()}
    for kind in ("lowrank-2", "kronecker-2x1"):
        storage = random_storage(kind, rng)
        q = make(kind, storage, mean, backend, dtype)
        same = make(kind, same_support(kind, storage, rng), mean, backend, dtype)
        apart = make(kind, random_storage(kind, rng), mean, backend, dtype)
        qs = q.cov.structure

        def kl(q_storage: Any, q_mean: Any, p_storage: Any, p_mean: Any) -> Any:
            return F.kl_divergence((qs, q_storage, q_mean), (qs, p_storage, p_mean))  # noqa: B023

        for p in (same, apart):
            args = (q.cov.storage(), dict(q.mean), p.cov.storage(), dict(p.mean))
            eager = float(backend.to_numpy(kl(*args)))
            jitted = float(backend.to_numpy(jax.jit(kl)(*args)))
            assert jitted == pytest.approx(eager, rel=100 * eps(dtype), abs=100 * eps(dtype))
        assert math.isfinite(eager) is False  # the last p is apart: +inf under jit too
