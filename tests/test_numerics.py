"""Float32 numerics of low rank plus diagonal and diagonal (issue 12), against float64 oracles.

Every oracle here is built in the test from the stored arrays (cast to the tested
dtype, then read as float64), with the layout's meaning from DESIGN.md §1: the flat
vector is ``weight`` (row-major) then ``bias``; Sigma = U U^T + diag(d^2). Where the
dense float64 Sigma is itself too ill-conditioned to be an oracle (d = 1e-6 against
factor entries of size 3: cond(Sigma) ~ 1e15), the float64 oracle is the
determinant lemma on the whitened factor, checked against the dense one where both
are good.

Covered: log N(x; 0, Sigma) of float32 samples at P = 400 (the Woodbury quadratic
form used to be off by hundreds of nats), solve residuals with d over 1e-6..1,
logdet, KL(q || q) = KL(q || copy) = 0, the exact +-inf edges (eagerly and under
``jax.jit``), the structured LRPD-LRPD and diagonal-LRPD KL against the dense
formula for drawn pairs, and a memory bound for the LRPD-LRPD KL at P = 2e5.
"""

from __future__ import annotations

import math
import tracemalloc
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import structcov as sc
import structcov.functional as F
from conftest import Backend
from structcov._array_api import namespace
from structcov.covariances import Diagonal, LowRankPlusDiagonal
from structcov.covariances._kl import kl_function
from structcov.covariances._structure import softplus, split_flat

#: The layout of most tests: P = 400 over two names (the per-name blocks are exercised).
SHAPES = {"weight": (20, 19), "bias": (20,)}
SMALL = {"weight": (3, 4), "bias": (3,)}


def eps(dtype: str) -> float:
    return float(np.finfo(dtype).eps)


def num_params(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for shape in shapes.values())


def split_np(flat: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """A flat (P, *rest) NumPy array into name -> (*shape, *rest), in the layout's order."""
    out, start = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        out[name] = flat[start : start + size].reshape(*shape, *flat.shape[1:])
        start += size
    return out


class Pair:
    """A parameter on the backend and its storage as float64 NumPy (after the dtype cast)."""

    def __init__(
        self,
        backend: Backend,
        dtype: str,
        shapes: dict[str, tuple[int, ...]],
        u: np.ndarray | None,
        d: np.ndarray,
        mean: np.ndarray | None = None,
    ) -> None:
        p = num_params(shapes)
        mean = np.zeros(p) if mean is None else mean
        self.means = {n: backend.asarray(v, dtype) for n, v in split_np(mean, shapes).items()}
        cov: sc.FactorizedCovariance
        storage: dict[str, Any] = {}
        if u is None:
            cov = sc.DiagonalCovariance(scale_transform="identity")
        else:
            cov = sc.LowRankPlusDiagonalCovariance(u.shape[1], scale_transform="identity")
            for n, v in split_np(u, shapes).items():
                storage[f"factor.{n}"] = backend.asarray(v, dtype)
        for n, v in split_np(d, shapes).items():
            storage[f"scale.{n}"] = backend.asarray(v, dtype)
        self.param = sc.GaussianParameter(self.means, cov)
        cov.load_storage(storage)
        # float64 copies of exactly what is stored (the oracle's inputs)
        self.u = None if u is None else u.astype(dtype).astype(np.float64)
        self.d = d.astype(dtype).astype(np.float64)
        self.mean = mean.astype(dtype).astype(np.float64)
        self.backend, self.dtype, self.shapes = backend, dtype, shapes

    @property
    def cov(self) -> Any:
        return self.param.cov

    @property
    def sigma(self) -> np.ndarray:
        low = 0.0 if self.u is None else self.u @ self.u.T
        return low + np.diag(self.d**2)

    def logdet64(self) -> float:
        """Determinant lemma in float64 on the whitened factor (the dense slogdet is
        not accurate at cond(Sigma) ~ 1e15)."""
        lemma = 2.0 * np.sum(np.log(np.abs(self.d)))
        if self.u is not None:
            w = self.u / self.d[:, None]
            lemma += np.linalg.slogdet(np.eye(w.shape[1]) + w.T @ w)[1]
        return float(lemma)


def draw_u_d(
    rng: np.random.Generator, p: int, rank: int, d: float | tuple[float, float], factor: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    u = factor * rng.standard_normal((p, rank))
    if isinstance(d, tuple):  # log-uniform over [d[0], d[1]], random signs
        values = np.exp(rng.uniform(np.log(d[0]), np.log(d[1]), p))
        return u, values * rng.choice([-1.0, 1.0], p)
    return u, np.full(p, d)


def dense_kl(q: Pair, p: Pair) -> float:
    """The dense KL formula in float64 (eigenvalues of Sigma_p^-1 Sigma_q: no cancellation)."""
    sq, sp = q.sigma, p.sigma
    lam = np.linalg.eigvals(np.linalg.solve(sp, sq)).real
    m = p.mean - q.mean
    return float(0.5 * (np.sum(lam - 1.0 - np.log(lam)) + m @ np.linalg.solve(sp, m)))


def scalar(backend: Backend, value: Any) -> float:
    assert value.shape == ()
    return float(backend.to_numpy(value))


# ----------------------------------------------------------------- log_prob, P = 400
def test_quadratic_form_of_float32_samples(backend: Backend) -> None:
    """P = 400, rank 4, U ~ 3 N(0, 1), d = 1e-3, float32: the quadratic form of samples.

    Measured (NumPy): relative error 6e-5 (ridge form with one refinement step); the
    Woodbury difference sum(x * solve(x)) was off by 1e3 relative (1686 for ~407).
    """
    rng = np.random.default_rng(0)
    u, d = draw_u_d(rng, 400, 4, 1e-3)
    pair = Pair(backend, "float32", SHAPES, u, d)
    structure, storage = pair.cov.structure, pair.cov.storage()
    x64 = rng.standard_normal((8, 4)) @ pair.u.T + rng.standard_normal((8, 400)) * pair.d
    x = backend.asarray(x64, "float32")
    x64 = backend.to_numpy(x)
    expected = np.einsum("bi,bi->b", x64, np.linalg.solve(pair.sigma, x64.T).T)
    state = F.prepare(structure, storage)
    got = backend.to_numpy(
        structure.quadratic(backend.xp, storage, state, split_flat(structure, x))
    )
    np.testing.assert_allclose(got, expected, rtol=1e-3)


def test_log_prob_of_float32_samples(backend: Backend) -> None:
    """log_prob of its own float32 samples at P = 400, d = 1e-3: < 1e-3 relative."""
    rng = np.random.default_rng(1)
    u, d = draw_u_d(rng, 400, 4, 1e-3)
    pair = Pair(backend, "float32", SHAPES, u, d)
    x64 = rng.standard_normal((8, 4)) @ pair.u.T + rng.standard_normal((8, 400)) * pair.d
    x = backend.asarray(x64, "float32")
    x64 = backend.to_numpy(x)
    value = pair.cov.unflatten(x)
    quadratic = np.einsum("bi,bi->b", x64, np.linalg.solve(pair.sigma, x64.T).T)
    expected = -0.5 * (400 * np.log(2 * np.pi) + np.linalg.slogdet(pair.sigma)[1] + quadratic)
    got = backend.to_numpy(pair.param.log_prob(value))
    np.testing.assert_allclose(got, expected, rtol=1e-3)


# ----------------------------------------------------------------- solve and logdet
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solve_residual_and_logdet_with_d_over_six_decades(
    backend: Backend, dtype: str, seed: int
) -> None:
    """d log-uniform over [1e-6, 1] (random signs): backward error of solve, and logdet.

    Residual |Sigma x_hat - b| <= c eps (|Sigma| |x_hat| + |b|) per vector, computed
    densely in float64 (a residual needs no accurate inverse). logdet against the
    float64 determinant lemma, to eps times the size of its terms.
    """
    rng = np.random.default_rng(seed)
    u, d = draw_u_d(rng, 400, 3 + seed, (1e-6, 1.0))
    pair = Pair(backend, dtype, SHAPES, u, d)
    b = backend.asarray(rng.standard_normal((3, 400)), dtype)
    b64 = backend.to_numpy(b)
    solved = backend.to_numpy(pair.cov.solve(b))
    sigma = pair.sigma
    residual = np.linalg.norm(solved @ sigma - b64, axis=-1)
    scale = np.linalg.norm(sigma, 2) * np.linalg.norm(solved, axis=-1) + np.linalg.norm(
        b64, axis=-1
    )
    assert np.all(residual <= 100 * eps(dtype) * scale), residual / scale

    logdet = scalar(backend, pair.cov.logdet())
    expected = pair.logdet64()
    size = 2.0 * np.sum(np.abs(np.log(np.abs(pair.d)))) + abs(expected)
    assert abs(logdet - expected) <= 10 * eps(dtype) * size, (logdet, expected)


def test_logdet_lemma_oracle_agrees_with_dense() -> None:
    """The float64 determinant-lemma oracle against dense slogdet where both are accurate."""
    rng = np.random.default_rng(3)
    u, d = draw_u_d(rng, 60, 3, (1e-2, 1.0))
    sigma = u @ u.T + np.diag(d**2)
    w = u / d[:, None]
    lemma = 2 * np.sum(np.log(np.abs(d))) + np.linalg.slogdet(np.eye(3) + w.T @ w)[1]
    np.testing.assert_allclose(lemma, np.linalg.slogdet(sigma)[1], rtol=1e-12)


# ----------------------------------------------------------------- KL(q || q) = 0
@pytest.mark.parametrize("d", [1.0, 1e-3, 1e-6])
@pytest.mark.parametrize("kind", ["lowrank+diagonal", "diagonal"])
def test_kl_to_itself_and_to_a_copy_is_zero(
    backend: Backend, dtype: str, d: float, kind: str
) -> None:
    rng = np.random.default_rng(4)
    u, scale = draw_u_d(rng, 400, 4, d)
    if kind == "diagonal":
        u, scale = None, scale * np.exp(rng.uniform(-1, 1, 400))
    mean = rng.standard_normal(400)
    q = Pair(backend, dtype, SHAPES, u, scale, mean)
    copy = Pair(backend, dtype, SHAPES, u, scale, mean)
    tol = 100 * eps(dtype) * 400
    for other in (q, copy):
        kl = scalar(backend, sc.kl_divergence(q.param, other.param))
        assert abs(kl) <= tol, kl


# ----------------------------------------------------------------- exact infinities
def _edge_values(backend: Backend, dtype: str) -> dict[str, Callable[[], Any]]:
    """label -> a function computing one edge value from fresh parameters (eager)."""
    zeros = {n: backend.asarray(np.zeros(s), dtype) for n, s in SMALL.items()}

    def lrpd(reset: float | None) -> sc.GaussianParameter:
        param = sc.GaussianParameter(
            zeros, sc.LowRankPlusDiagonalCovariance(2, scale_transform="identity")
        )
        if reset is not None:
            param.cov.reset_parameters(reset, generator=backend.generator(0))
        return param

    def diagonal(values: np.ndarray) -> sc.GaussianParameter:
        param = sc.GaussianParameter(zeros, sc.DiagonalCovariance(scale_transform="identity"))
        param.cov.load_storage(
            {f"scale.{n}": backend.asarray(v, dtype) for n, v in split_np(values, SMALL).items()}
        )
        return param

    p = num_params(SMALL)
    one_zero = np.ones(p)
    one_zero[4] = 0.0
    return {
        "lrpd never reset: logdet": lambda: lrpd(None).cov.logdet(),
        "lrpd reset 0: logdet": lambda: lrpd(0.0).cov.logdet(),
        "lrpd never reset: entropy": lambda: lrpd(None).entropy(),
        "lrpd reset 0: KL to N(0, 1)": lambda: to_prior(lrpd(0.0), 1.0),
        "lrpd never reset: KL to N(0, 1)": lambda: to_prior(lrpd(None), 1.0),
        "diagonal zero scale: logdet": lambda: diagonal(one_zero).cov.logdet(),
        "diagonal zero scale: KL to N(0, 1)": lambda: to_prior(diagonal(one_zero), 1.0),
        "diagonal: KL to N(0, 0)": lambda: to_prior(diagonal(np.ones(p)), 0.0),
        "lrpd: KL to N(0, 0)": lambda: to_prior(lrpd(1.0), 0.0),
    }


def to_prior(q: sc.GaussianParameter, scale: float) -> Any:
    return sc.kl_divergence(q, sc.normal_prior(q, scale))


EDGE_EXPECTED = {
    "lrpd never reset: logdet": -math.inf,
    "lrpd reset 0: logdet": -math.inf,
    "lrpd never reset: entropy": -math.inf,
    "lrpd reset 0: KL to N(0, 1)": math.inf,
    "lrpd never reset: KL to N(0, 1)": math.inf,
    "diagonal zero scale: logdet": -math.inf,
    "diagonal zero scale: KL to N(0, 1)": math.inf,
    "diagonal: KL to N(0, 0)": math.inf,
    "lrpd: KL to N(0, 0)": math.inf,
}


@pytest.mark.parametrize("label", list(EDGE_EXPECTED))
def test_exact_infinities_are_infinities(backend: Backend, dtype: str, label: str) -> None:
    value = _edge_values(backend, dtype)[label]()
    assert scalar(backend, value) == EDGE_EXPECTED[label]


def test_tiny_scale_kl_is_finite_in_float32(backend: Backend, dtype: str) -> None:
    """s = 1e-23 (s^2 underflows in float32) against N(0, 1): 0.5 P (rho - 1 - log rho)."""
    zeros = {"w": backend.asarray(np.zeros(4), dtype)}
    q = sc.GaussianParameter(zeros, sc.DiagonalCovariance(scale_transform="identity"))
    q.cov.load_storage({"scale.w": backend.asarray(np.full(4, 1e-23), dtype)})
    s = float(np.float32(1e-23)) if dtype == "float32" else 1e-23
    expected = 0.5 * 4 * (s**2 - 1.0 - 2.0 * math.log(s))  # 209.8
    got = scalar(backend, sc.kl_divergence(q, sc.normal_prior(q)))
    assert math.isclose(got, expected, rel_tol=10 * eps(dtype)), (got, expected)
    assert abs(expected - 209.8) < 0.1


@pytest.mark.parametrize(("offset", "tolerance"), [(1e-4, 4e-4), (-1e-4, 1.5e-3)])
def test_diagonal_kl_near_its_prior_in_float32(
    backend: Backend, offset: float, tolerance: float
) -> None:
    """Every std at 1 + offset, float32, P = 120,300, against N(0, 1): the KL's per-element
    terms r^2 - 1 - 2 log r are summed as one. Two separate sums of r^2 - 1 and 2 log r
    (one pass fewer) round with their own size, not the difference's: 6.5e-4 to 2.3e-3
    relative here, against 1.5e-4 and 6.5e-4 for the per-element sum (measured on NumPy,
    torch and JAX). Reference: the float32 stds in float64, with log1p and fsum."""
    shapes = {"weight": (300, 400), "bias": (300,)}
    zeros = {n: backend.asarray(np.zeros(shape), "float32") for n, shape in shapes.items()}
    q = sc.GaussianParameter(zeros, sc.DiagonalCovariance(scale_transform="identity"))
    s = np.float32(1.0 + offset)
    q.cov.load_storage(
        {f"scale.{n}": backend.asarray(np.full(shape, s), "float32") for n, shape in shapes.items()}
    )
    r = float(s)  # exact: a float32 is a float64
    term = (r - 1.0) * (r + 1.0) - 2.0 * math.log1p(r - 1.0)
    expected = 0.5 * math.fsum([term] * (300 * 400 + 300))
    got = scalar(backend, sc.kl_divergence(q, 1.0))
    assert abs(got - expected) <= tolerance * expected, (got, expected, abs(got / expected - 1))


@pytest.mark.parametrize("transform", ["softplus", "exp"])
def test_positive_transforms_reach_zero_only_at_minus_infinity(
    backend: Backend, dtype: str, transform: str
) -> None:
    """A zero std under softplus / exp is a stored -inf (``reset_parameters(0.0)``): the
    edges are the identity transform's (-inf logdet and entropy, +inf KL), never NaN;
    a very negative finite rho is a tiny positive std, with a finite logdet."""
    zeros = {"w": backend.asarray(np.zeros(3), dtype), "b": backend.asarray(np.zeros(2), dtype)}
    for cov in (
        sc.DiagonalCovariance(scale_transform=transform),
        sc.LowRankPlusDiagonalCovariance(1, scale_transform=transform),
    ):
        q = sc.GaussianParameter(zeros, cov)
        q.cov.reset_parameters(0.0, generator=backend.generator(0))
        assert scalar(backend, q.cov.logdet()) == -math.inf
        assert scalar(backend, q.entropy()) == -math.inf
        assert scalar(backend, sc.kl_divergence(q, sc.normal_prior(q))) == math.inf
        q.cov.reset_parameters(1.0, generator=backend.generator(0))
        rho = -40.0  # softplus(-40) = exp(-40) = 4.2e-18 to float64 rounding
        q.cov.load_storage({**q.cov.storage(), "scale.w": backend.asarray(np.full(3, rho), dtype)})
        logdet = scalar(backend, q.cov.logdet())
        # Diagonal: 2 * 3 * rho = -240; LRPD adds log det C = log(1 + |u|^2 / d^2) ~ 80
        assert math.isfinite(logdet) and logdet < -100, logdet


def test_softplus_is_exact_over_the_whole_range(backend: Backend, dtype: str) -> None:
    """The softplus of every stored scale (torch's fused kernel on torch, logaddexp
    elsewhere) against log(1 + e^rho) in float64 (log1p / exp, the large-rho form
    rho + log1p(e^-rho)): within 2 ulp from rho = -100 to 100, across both thresholds
    of the fused kernel (17..20 and 37..40), with +inf, -inf and NaN propagated. Below
    the smallest normal number (float32 rho < -87) only to that absolute size: CPU
    backends flush or approximate subnormal results (XLA flushes them to zero)."""
    grid = np.concatenate(
        [np.linspace(-100.0, 100.0, 4001), [16.9, 17.0, 20.0, 20.001, 36.9, 37.0, 40.0, 40.01]]
    )
    rho = np.asarray(grid, dtype=dtype)  # the tested values, read back in float64 below
    exact = np.where(
        rho > 0, rho + np.log1p(np.exp(-np.abs(rho.astype(np.float64)))), 0.0
    ) + np.where(rho <= 0, np.log1p(np.exp(np.minimum(rho.astype(np.float64), 0.0))), 0.0)
    x = backend.asarray(rho, dtype)
    got = backend.to_numpy(softplus(namespace(x), x)).astype(np.float64)
    tiny = float(np.finfo(dtype).smallest_normal)
    assert np.all(np.abs(got - exact) <= 2 * eps(dtype) * np.abs(exact) + tiny), np.max(
        np.abs(got - exact) / exact
    )
    edges = backend.asarray(np.array([np.inf, -np.inf, np.nan]), dtype)
    with warnings.catch_warnings():  # NumPy may warn on NaN in logaddexp
        warnings.simplefilter("ignore", RuntimeWarning)
        out = backend.to_numpy(softplus(namespace(edges), edges))
    assert out[0] == np.inf and out[1] == 0.0 and np.isnan(out[2]), out


def test_zero_point_masses_at_the_same_place_have_kl_zero(backend: Backend) -> None:
    """Diagonal pair, both scales 0 at one coordinate: 0 there (same mean), +inf otherwise."""
    zeros = {"w": backend.asarray(np.zeros(3), "float64")}
    scales = backend.asarray(np.array([0.0, 1.0, 2.0]), "float64")
    q = sc.GaussianParameter(zeros, sc.DiagonalCovariance(scale_transform="identity"))
    q.cov.load_storage({"scale.w": scales})
    p = sc.GaussianParameter(zeros, sc.DiagonalCovariance(scale_transform="identity"))
    p.cov.load_storage({"scale.w": scales})
    assert scalar(backend, sc.kl_divergence(q, p)) == 0.0
    moved = sc.GaussianParameter(
        {"w": backend.asarray(np.array([1.0, 0.0, 0.0]), "float64")},
        sc.DiagonalCovariance(scale_transform="identity"),
    )
    moved.cov.load_storage({"scale.w": scales})
    assert scalar(backend, sc.kl_divergence(q, moved)) == math.inf


@pytest.fixture
def jax_backend(backend: Backend) -> Backend:
    if backend.name != "jax":
        pytest.skip("jax.jit runs on the jax backend only")
    return backend


def test_exact_infinities_under_jit(jax_backend: Backend, dtype: str) -> None:
    """The same edges with every array traced (values through ``where``, no branches)."""
    import jax

    backend = jax_backend
    zeros = {n: backend.asarray(np.zeros(s), dtype) for n, s in SMALL.items()}
    q = sc.GaussianParameter(zeros, sc.LowRankPlusDiagonalCovariance(2, scale_transform="identity"))
    diag = sc.GaussianParameter(zeros, sc.DiagonalCovariance(scale_transform="identity"))
    structure, q_storage = q.cov.structure, q.cov.storage()  # all zero
    d_structure = diag.cov.structure
    prior = sc.normal_prior(q)
    zero_prior = sc.normal_prior(q, 0.0)
    p_structure = prior.cov.structure

    @jax.jit
    def run(q_storage: dict, d_storage: dict, prior: dict, zero_prior: dict, mean: dict) -> tuple:
        return (
            F.logdet(structure, q_storage),
            F.entropy(structure, q_storage),
            F.kl_divergence((structure, q_storage, mean), (p_structure, prior, mean)),
            F.logdet(d_structure, d_storage),
            F.kl_divergence((d_structure, d_storage, mean), (p_structure, prior, mean)),
            F.kl_divergence((d_structure, prior, mean), (p_structure, zero_prior, mean)),
        )

    d_storage = {
        k: v.at[0].set(0.0) if k == "scale.bias" else v for k, v in prior.cov.storage().items()
    }
    out = run(q_storage, d_storage, prior.cov.storage(), zero_prior.cov.storage(), zeros)
    assert [float(v) for v in out] == [
        -math.inf,
        -math.inf,
        math.inf,
        -math.inf,
        math.inf,
        math.inf,
    ]


# ----------------------------------------------------------------- structured KL pairs
def test_kl_registry_has_the_structured_pairs() -> None:
    from structcov.covariances.low_rank_plus_diagonal import _kl_diagonal_lrpd, _kl_lrpd_lrpd

    assert kl_function(LowRankPlusDiagonal, LowRankPlusDiagonal) is _kl_lrpd_lrpd
    assert kl_function(Diagonal, LowRankPlusDiagonal) is _kl_diagonal_lrpd


def _run(backend: Backend, test: Callable[..., None], **strategies: Any) -> None:
    examples = 6 if backend.name in ("jax", "dask") else 20
    configured = settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    configured(given(**strategies)(test))()


def test_structured_kl_pairs_match_the_dense_formula(backend: Backend) -> None:
    """Drawn pairs (ranks, scales of d and U, dtype, mean shift) against dense float64.

    Tolerance: c eps (KL + P) times the condition numbers of the whitened pieces
    (cond(C_p), cond(C_q)): each term is computed to eps relative to its own size.
    """

    def check(
        dtype: str,
        q_kind: str,
        q_rank: int,
        p_rank: int,
        d_q: float,
        d_p: float,
        factor: float,
        shift: float,
        seed: int,
    ) -> None:
        rng = np.random.default_rng(seed)
        p_count = num_params(SMALL)
        u_p, s_p = draw_u_d(rng, p_count, p_rank, (d_p, 3 * d_p), factor)
        u_q, s_q = draw_u_d(rng, p_count, q_rank, (d_q, 3 * d_q), factor)
        q = Pair(
            backend,
            dtype,
            SMALL,
            None if q_kind == "diagonal" else u_q,
            s_q,
            shift * rng.standard_normal(p_count),
        )
        p = Pair(backend, dtype, SMALL, u_p, s_p, shift * rng.standard_normal(p_count))
        expected = dense_kl(q, p)
        got = scalar(backend, sc.kl_divergence(q.param, p.param))
        wp = p.u / p.d[:, None]  # type: ignore[operator]
        cond = np.linalg.cond(np.eye(p_rank) + wp.T @ wp)
        if q.u is not None:
            wq = q.u / q.d[:, None]
            cond = max(cond, np.linalg.cond(np.eye(q_rank) + wq.T @ wq))
        # ours, plus the dense float64 oracle's own error (eps64 cond(Sigma_p))
        bound = (200 * eps(dtype) * cond + 100 * eps("float64") * np.linalg.cond(p.sigma)) * (
            abs(expected) + p_count
        )
        assert abs(got - expected) <= bound, (got, expected, bound)

    _run(
        backend,
        check,
        dtype=st.sampled_from(["float32", "float64"]),
        q_kind=st.sampled_from(["lowrank+diagonal", "diagonal"]),
        q_rank=st.integers(1, 4),
        p_rank=st.integers(1, 4),
        d_q=st.sampled_from([1e-2, 0.1, 1.0, 3.0]),
        d_p=st.sampled_from([1e-2, 0.1, 1.0, 3.0]),
        factor=st.sampled_from([0.1, 1.0, 3.0]),
        shift=st.sampled_from([0.0, 1.0]),
        seed=st.integers(0, 2**32 - 1),
    )


def test_lrpd_pair_kl_near_equal_pairs(backend: Backend, dtype: str) -> None:
    """q a small perturbation of p: KL is small and matches dense float64 (relative)."""
    rng = np.random.default_rng(6)
    p_count = num_params(SMALL)
    u, d = draw_u_d(rng, p_count, 2, (0.1, 1.0))
    p = Pair(backend, "float64", SMALL, u, d)
    q = Pair(backend, "float64", SMALL, u * (1 + 1e-3 * rng.standard_normal(u.shape)), d * 1.001)
    expected = dense_kl(q, p)
    got = scalar(backend, sc.kl_divergence(q.param, p.param))
    assert 0 < expected < 1e-2
    assert abs(got - expected) <= 1e-6 * expected + 1e-12


# ----------------------------------------------------------------- memory
def test_lrpd_pair_kl_memory_is_linear_in_p(backend: Backend) -> None:
    """P = 2e5, rank 8, float32 on NumPy: the peak is a small multiple of the storage."""
    if backend.name != "numpy":
        pytest.skip("tracemalloc sees NumPy's allocations only")
    p_count, rank = 200_000, 8
    rng = np.random.default_rng(7)
    shapes = {"w": (p_count,)}
    q = Pair(
        backend, "float32", shapes, rng.standard_normal((p_count, rank)), np.full(p_count, 0.5)
    )
    p = Pair(
        backend, "float32", shapes, rng.standard_normal((p_count, rank)), np.full(p_count, 0.7)
    )
    storage_bytes = 2 * p_count * (rank + 1) * 4
    tracemalloc.start()
    try:
        value = sc.kl_divergence(q.param, p.param)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.isfinite(value)
    assert peak < 20 * storage_bytes, (peak, storage_bytes)
