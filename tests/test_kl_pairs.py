"""KL(q || p) for every ordered pair of structures, against a dense float64 formula.

q ranges over every structure kind (diagonal, dense factor of full and low rank, low
rank plus diagonal, Kronecker of full and low ranks), p over every kind that is not
singular by construction. The expected value is written here from the oracle's Sigma
(tests/oracle.py) and means read element by element:

    KL(q || p) = 0.5 (tr(Sigma_p^-1 Sigma_q) + (m_p - m_q)^T Sigma_p^-1 (m_p - m_q) - P
                      + log det Sigma_p - log det Sigma_q),

``+inf`` for a singular q. Besides the values: KL(q || q) ~ 0 and never below
-tiny, KL >= 0, every pair dispatches to a structured registration (not the
generic one, which builds the K_q columns of S_q: P x P for a diagonal q), the
Kronecker inverse diagonal (the bias column convention) against the dense inverse,
exact edges (+inf, never NaN where the answer is infinite), JAX under ``jax.jit``,
and, on NumPy, a traced peak memory at P = 20000 far below one P x P array.
"""

from __future__ import annotations

import math
import tracemalloc
import warnings
from typing import Any

import numpy as np
import pytest

import structcov as sc
import structcov.functional as F
from cases import MEAN_SPECS, STRUCTURES, well_conditioned
from conftest import Backend
from oracle import dense_oracle, flat_layout, join
from structcov.covariances import Diagonal, Factorized, Kronecker, LowRankPlusDiagonal
from structcov.covariances._kl import _kl_generic, kl_function
from test_densities import Dense, eps
from test_densities import dense_kl as closed_form_kl

Q_KINDS = (
    "diagonal",
    "factorized-full",
    "lowrank-2",
    "lowrank+diag-2",
    "kronecker-full",
    "kronecker-2x1",
)
P_KINDS = ("diagonal", "factorized-full", "lowrank+diag-2", "kronecker-full")
#: Layer layouts: the bias column convention (bias last, first, absent, conv input).
LAYOUTS = ("weight+bias", "bias-first", "weight-only", "conv4d+bias")
#: Safety factor over the first-order error bound c eps P cond (1 + |value|).
C = 8.0


def dense_kl(q: Dense, p: Dense) -> float:
    """The closed form in float64 from the dense matrices (+inf for a singular q)."""
    return math.inf if not q.full_rank else float(closed_form_kl(q, p))


_CACHE: dict[tuple[Any, ...], tuple[sc.GaussianParameter, Dense]] = {}


def gaussian(
    kind: str, backend: Backend, dtype: str, layout: str = "weight+bias", seed: int = 0
) -> tuple[sc.GaussianParameter, Dense]:
    """A GaussianParameter of ``kind`` over ``layout`` with well-conditioned storage."""
    key = (kind, backend.name, dtype, layout, seed)
    if key not in _CACHE:
        spec = MEAN_SPECS[layout]
        rng = np.random.default_rng([seed, 777])
        mean = {n: backend.asarray(rng.standard_normal(s), dtype) for n, s in spec.items()}
        param = sc.GaussianParameter(mean, STRUCTURES[kind][0]())
        storage = well_conditioned(param.cov, mean, rng)
        param.cov.load_storage({p: backend.asarray(v, dtype) for p, v in storage.items()})
        oracle = dense_oracle(param.cov, mean, backend.to_numpy)
        m64 = join({n: backend.to_numpy(v) for n, v in mean.items()}, oracle.layout)
        _CACHE[key] = (param, Dense(m64, oracle.Sigma))
    return _CACHE[key]


def bound(dtype: str, q: Dense, p: Dense, expected: float) -> float:
    return C * eps(dtype) * (q.mean.shape[0] + 1) * (q.cond + p.cond) * (1 + abs(expected))


def check_pair(
    backend: Backend, dtype: str, q_kind: str, p_kind: str, layout: str
) -> tuple[float, float]:
    q, dq = gaussian(q_kind, backend, dtype, layout)
    p, dp = gaussian(p_kind, backend, dtype, layout, seed=1)
    kl = sc.kl_divergence(q, p)
    assert tuple(kl.shape) == ()
    assert kl.dtype == getattr(backend.xp, dtype)
    got, expected = float(backend.to_numpy(kl)), dense_kl(dq, dp)
    if math.isinf(expected):
        assert got == math.inf, (q_kind, p_kind, got)
    else:
        assert abs(got - expected) <= bound(dtype, dq, dp, expected), (got, expected)
        assert got >= -C * eps(dtype) * (dq.mean.shape[0] + 1), got  # KL >= 0
    return got, expected


# ------------------------------------------------------------------------- values


@pytest.mark.parametrize("p_kind", P_KINDS)
@pytest.mark.parametrize("q_kind", Q_KINDS)
def test_kl_pair_matches_dense(backend: Backend, dtype: str, q_kind: str, p_kind: str) -> None:
    check_pair(backend, dtype, q_kind, p_kind, "weight+bias")


@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("q_kind", Q_KINDS)
def test_kl_to_kronecker_over_layer_layouts(
    backend: Backend, dtype: str, q_kind: str, layout: str
) -> None:
    """The Kronecker p pairs read diag(Sigma_p^-1) in W~'s order: bias first, absent, conv."""
    if backend.name == "jax" and layout != "bias-first":
        pytest.skip("eager JAX compiles per shape: one extra layout on JAX")
    check_pair(backend, dtype, q_kind, "kronecker-full", layout)


@pytest.mark.parametrize("p_kind", ["lowrank+diag-2", "factorized-full"])
def test_kl_from_kronecker_over_bias_first(backend: Backend, dtype: str, p_kind: str) -> None:
    check_pair(backend, dtype, "kronecker-full", p_kind, "bias-first")


@pytest.mark.parametrize("kind", P_KINDS)
def test_kl_to_itself_is_zero(backend: Backend, dtype: str, kind: str) -> None:
    q, dq = gaussian(kind, backend, dtype)
    kl = float(backend.to_numpy(sc.kl_divergence(q, q)))
    tiny = C * eps(dtype) * (q.num_params + 1) * dq.cond
    assert -tiny <= kl <= tiny, kl


@pytest.mark.parametrize("p_kind", P_KINDS)
@pytest.mark.parametrize("q_kind", Q_KINDS)
def test_registered_route_is_structured(backend: Backend, q_kind: str, p_kind: str) -> None:
    """No pair falls back to the generic form (it forms S_q's K_q columns: P x P for a
    diagonal or low rank plus diagonal q)."""
    q, _ = gaussian(q_kind, backend, "float64")
    p, _ = gaussian(p_kind, backend, "float64", seed=1)
    assert kl_function(type(q.cov.structure), type(p.cov.structure)) is not _kl_generic


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kronecker_inverse_diagonal(backend: Backend, dtype: str, layout: str) -> None:
    """diag(Sigma^-1) = sample_scale^-2 kron(diag(C_out^-1), diag(C_in^-1)) over W~, in the
    flat order, against the dense inverse of the oracle's Sigma."""
    p, dp = gaussian("kronecker-full", backend, dtype, layout)
    p.cov.sample_scale = 0.8  # sample_scale^-2 enters too
    structure, storage = p.cov.structure, p.cov.storage()
    assert isinstance(structure, Kronecker)
    xp = backend.xp
    state = structure.prepare(xp, storage)
    got = np.concatenate(
        [backend.to_numpy(b) for b in structure.inverse_diagonal_blocks(xp, storage, state)]
    )
    expected = np.diag(np.linalg.inv(0.8**2 * dp.sigma))
    tol = C * eps(dtype) * dp.cond * (p.num_params + 1)
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * np.max(expected))
    p.cov.sample_scale = 1.0


# ------------------------------------------------- the isotropic prior as a float


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("q_kind", Q_KINDS)
def test_kl_to_a_float_prior_matches_dense(
    backend: Backend, dtype: str, q_kind: str, sigma: float
) -> None:
    """kl_divergence(q, sigma) (no prior built) against the dense N(0, sigma^2 I) formula."""
    q, dq = gaussian(q_kind, backend, dtype)
    kl = sc.kl_divergence(q, sigma)
    assert tuple(kl.shape) == ()
    assert kl.dtype == getattr(backend.xp, dtype)
    n = dq.mean.shape[0]
    prior = Dense(np.zeros(n), sigma**2 * np.eye(n))
    got, expected = float(backend.to_numpy(kl)), dense_kl(dq, prior)
    if math.isinf(expected):
        assert got == math.inf, (q_kind, got)
    else:
        assert abs(got - expected) <= bound(dtype, dq, prior, expected), (got, expected)
        built = float(backend.to_numpy(sc.kl_divergence(q, sc.normal_prior(q, sigma))))
        assert abs(got - built) <= bound(dtype, dq, prior, expected), (got, built)


@pytest.mark.parametrize("kind", ["diagonal", "lowrank+diag-2", "kronecker-full"])
def test_kl_to_a_float_prior_equal_to_q_is_zero(backend: Backend, dtype: str, kind: str) -> None:
    """q = N(0, sigma^2 I) exactly: KL 0 to rounding (no cancellation of P-sized sums)."""
    q, _ = gaussian(kind, backend, dtype)
    sigma = 0.7
    cov = STRUCTURES[kind][0]()
    zero_mean = {
        n: backend.asarray(np.zeros(backend.to_numpy(v).shape), dtype) for n, v in q.mean.items()
    }
    prior_like = sc.GaussianParameter(zero_mean, cov)
    if kind == "kronecker-full":
        # A fresh Kronecker stores identity factors: scaled by sqrt(sigma) each
        storage = {path: np.sqrt(sigma) * backend.to_numpy(v) for path, v in cov.storage().items()}
    else:
        transform = q.cov.structure.scale_transform
        raw = sigma if transform == "identity" else math.log(math.expm1(sigma))
        storage = {
            path: np.full(backend.to_numpy(v).shape, raw if path.startswith("scale") else 0.0)
            for path, v in q.cov.storage().items()
        }
    cov.load_storage({path: backend.asarray(v, dtype) for path, v in storage.items()})
    got = float(backend.to_numpy(sc.kl_divergence(prior_like, sigma)))
    tiny = C * eps(dtype) * (q.num_params + 1)
    assert abs(got) <= tiny, got


def test_kl_to_a_float_prior_edges(backend: Backend, dtype: str) -> None:
    q, _ = gaussian("diagonal", backend, dtype)
    zero = zero_raw_scale(q.cov.structure)
    dead = with_storage(q, backend, dtype, {"scale.weight": lambda a: _set_first(a, zero)})
    huge = with_storage(q, backend, dtype, {"scale.bias": lambda a: _set_first(a, math.inf)})
    with warnings.catch_warnings():  # NumPy warns of log(0) and inf - inf; the value is +inf
        warnings.simplefilter("ignore", RuntimeWarning)
        assert float(backend.to_numpy(sc.kl_divergence(dead, 1.0))) == math.inf
        assert float(backend.to_numpy(sc.kl_divergence(huge, 1.0))) == math.inf
    lost = with_storage(q, backend, dtype, {"scale.bias": lambda a: _set_first(a, math.nan)})
    with warnings.catch_warnings():  # NumPy warns on NaN in logaddexp; the value matters
        warnings.simplefilter("ignore", RuntimeWarning)
        assert math.isnan(float(backend.to_numpy(sc.kl_divergence(lost, 1.0))))
    assert float(backend.to_numpy(sc.kl_divergence(q, 0.0))) == math.inf  # p singular
    singular, _ = gaussian("lowrank-2", backend, dtype)
    assert float(backend.to_numpy(sc.kl_divergence(singular, 2.0))) == math.inf
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="sigma of the prior"):
            sc.kl_divergence(q, bad)
    with pytest.raises(TypeError, match="`p` must be a structcov GaussianParameter"):
        sc.kl_divergence(q, True)


@pytest.mark.parametrize("kind", ["diagonal", "lowrank+diag-2", "kronecker-full"])
def test_kl_to_a_float_prior_gradient_matches_the_built_prior(
    backend: Backend, dtype: str, kind: str
) -> None:
    """Under torch autograd the float route's gradient is the built prior's."""
    if backend.name != "torch":
        pytest.skip("autograd is checked on torch (the JAX adapter shares the core)")
    import torch

    q, _ = gaussian(kind, backend, dtype)
    leaves = {p: v.clone().requires_grad_(True) for p, v in q.cov.storage().items()}
    means = {n: v.clone().requires_grad_(True) for n, v in q.mean.items()}
    structure = q.cov.structure
    grads = []
    for route in ("float", "built"):
        if route == "float":
            value = F.kl_to_normal(structure, leaves, means, 0.8)
        else:
            prior = sc.normal_prior(q, 0.8)
            value = F.kl_divergence((structure, leaves, means), prior._parts())
        grads.append(torch.autograd.grad(value, [*leaves.values(), *means.values()]))
    for a, b in zip(*grads, strict=True):
        scale = float(b.abs().max()) + 1.0
        assert float((a - b).abs().max()) <= 1e3 * eps(dtype) * scale


def _set_first(array: np.ndarray, value: float) -> np.ndarray:
    array.reshape(-1)[0] = value
    return array


# -------------------------------------------------------------------------- edges


def zero_raw_scale(structure: Any) -> float:
    """The stored value whose standard deviation is exactly 0 (by the scale transform)."""
    transform = getattr(structure, "scale_transform", "identity")
    return 0.0 if transform == "identity" else -math.inf


def with_storage(
    param: sc.GaussianParameter, backend: Backend, dtype: str, edit: dict[str, Any]
) -> sc.GaussianParameter:
    """A new parameter like ``param`` with some stored arrays edited (NumPy functions)."""
    storage = {path: backend.to_numpy(v) for path, v in param.cov.storage().items()}
    for path, function in edit.items():
        storage[path] = function(storage[path].copy())
    cov = STRUCTURES[_kind_of(param)][0]()
    out = sc.GaussianParameter(dict(param.mean), cov)
    cov.load_storage({path: backend.asarray(v, dtype) for path, v in storage.items()})
    return out


def _kind_of(param: sc.GaussianParameter) -> str:
    structure = param.cov.structure
    if isinstance(structure, Diagonal):
        return "diagonal"
    if isinstance(structure, LowRankPlusDiagonal):
        return "lowrank+diag-2"
    if isinstance(structure, Kronecker):
        return "kronecker-full"
    assert isinstance(structure, Factorized)
    return "factorized-full"


def test_zero_diagonal_q_against_kronecker_is_inf(backend: Backend, dtype: str) -> None:
    q, _ = gaussian("diagonal", backend, dtype)
    p, _ = gaussian("kronecker-full", backend, dtype, seed=1)
    zero = zero_raw_scale(q.cov.structure)

    def set_zero(a: np.ndarray) -> np.ndarray:
        a.reshape(-1)[1] = zero
        return a

    degenerate = with_storage(q, backend, dtype, {"scale.weight": set_zero})
    assert float(backend.to_numpy(sc.kl_divergence(degenerate, p))) == math.inf


def test_singular_q_against_lrpd_and_kronecker_is_inf(backend: Backend, dtype: str) -> None:
    for q_kind in ("lowrank-2", "kronecker-2x1"):
        q, _ = gaussian(q_kind, backend, dtype)
        for p_kind in ("lowrank+diag-2", "kronecker-full", "factorized-full"):
            p, _ = gaussian(p_kind, backend, dtype, seed=1)
            got = float(backend.to_numpy(sc.kl_divergence(q, p)))
            assert got == math.inf, (q_kind, p_kind, got)


def test_full_rank_q_against_a_singular_p_is_inf(backend: Backend, dtype: str) -> None:
    """q has a density on R^P, p lives on a subspace: not absolutely continuous, +inf
    exactly; KL(q || q) for a singular q is 0 (the common support; tests/test_kl_singular.py)."""
    for q_kind in ("diagonal", "lowrank+diag-2", "kronecker-full"):
        q, _ = gaussian(q_kind, backend, dtype)
        for p_kind in ("lowrank-2", "kronecker-2x1"):
            p, _ = gaussian(p_kind, backend, dtype, seed=1)
            got = sc.kl_divergence(q, p)
            assert got.dtype == q.cov.storage()[q.cov.structure.paths[0]].dtype
            assert float(backend.to_numpy(got)) == math.inf, (q_kind, p_kind)
    singular, _ = gaussian("lowrank-2", backend, dtype)
    tiny = C * eps(dtype) * (singular.num_params + 1)
    assert abs(float(backend.to_numpy(sc.kl_divergence(singular, singular)))) <= tiny


def test_dead_row_of_lrpd_p_is_inf_where_q_has_mass(backend: Backend, dtype: str) -> None:
    """A zero row of Sigma_p (d = 0 and U's row 0) where a Kronecker q has mass: +inf;
    a zero d whose U row is not zero: Sigma_p is regular, and the KL is the dense one
    (the zero read exactly, through its Schur complement)."""
    q, _ = gaussian("kronecker-full", backend, dtype)
    p, _ = gaussian("lowrank+diag-2", backend, dtype, seed=1)
    zero = zero_raw_scale(p.cov.structure)

    def zero_scale(a: np.ndarray) -> np.ndarray:
        a.reshape(-1)[2] = zero
        return a

    def zero_row(a: np.ndarray) -> np.ndarray:
        a.reshape(-1, a.shape[-1])[2] = 0.0
        return a

    dead = with_storage(p, backend, dtype, {"scale.weight": zero_scale, "factor.weight": zero_row})
    assert float(backend.to_numpy(sc.kl_divergence(q, dead))) == math.inf
    partial = with_storage(p, backend, dtype, {"scale.weight": zero_scale})
    dq = gaussian("kronecker-full", backend, dtype)[1]
    exact = dense_oracle(partial.cov, partial.mean, backend.to_numpy)
    m64 = join({n: backend.to_numpy(v) for n, v in partial.mean.items()}, exact.layout)
    dp = Dense(m64, exact.Sigma)
    got, expected = float(backend.to_numpy(sc.kl_divergence(q, partial))), dense_kl(dq, dp)
    assert abs(got - expected) <= bound(dtype, dq, dp, expected), (got, expected)


def test_tiny_diagonal_against_kronecker_is_finite_in_float32(backend: Backend) -> None:
    """s = 1e-20: s^2 = 1e-40 underflows in float32; the KL stays finite and correct."""
    q, _ = gaussian("diagonal", backend, "float32")
    p, dp = gaussian("kronecker-full", backend, "float32", seed=1)
    identity = zero_raw_scale(q.cov.structure) == 0.0
    tiny_raw = 1e-20 if identity else math.log(1e-20)  # softplus(log s) = s to rounding

    def shrink(a: np.ndarray) -> np.ndarray:
        a.reshape(-1)[:3] = tiny_raw
        return a

    small = with_storage(q, backend, "float32", {"scale.weight": shrink})
    got = float(backend.to_numpy(sc.kl_divergence(small, p)))
    dq = dense_oracle(small.cov, small.mean, backend.to_numpy)
    mean = join({n: backend.to_numpy(v) for n, v in small.mean.items()}, dq.layout)
    exact = Dense(mean, dq.Sigma)
    exact.full_rank = True  # regular in exact arithmetic; matrix_rank's tolerance says no
    expected = dense_kl(exact, dp)
    assert math.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------------------- jit


def test_new_pairs_under_jax_jit(backend: Backend, dtype: str) -> None:
    if backend.name != "jax":
        pytest.skip("jax.jit runs on the jax backend only")
    import jax

    pairs = [
        ("diagonal", "kronecker-full"),
        ("lowrank+diag-2", "kronecker-full"),
        ("factorized-full", "kronecker-full"),
        ("kronecker-full", "lowrank+diag-2"),
        ("kronecker-2x1", "factorized-full"),
    ]
    for q_kind, p_kind in pairs:
        q, _ = gaussian(q_kind, backend, dtype)
        p, _ = gaussian(p_kind, backend, dtype, seed=1)
        qs, ps = q.cov.structure, p.cov.structure

        def kl(q_storage: Any, q_mean: Any, p_storage: Any, p_mean: Any) -> Any:
            return F.kl_divergence((qs, q_storage, q_mean), (ps, p_storage, p_mean))  # noqa: B023

        args = (q.cov.storage(), dict(q.mean), p.cov.storage(), dict(p.mean))
        eager = float(backend.to_numpy(kl(*args)))
        jitted = float(backend.to_numpy(jax.jit(kl)(*args)))
        assert jitted == pytest.approx(eager, rel=100 * eps(dtype), abs=100 * eps(dtype))


# ------------------------------------------------------------------------- memory

#: weight (100, 199) + bias (100,): P = 20000; one float32 P x P array is 1.6 GB.
MEMORY_LAYER = {"weight": (100, 199), "bias": (100,)}
#: Peak traced allocation during one KL, as a multiple of the larger storage (bytes).
#: About 7 is reached against Kronecker p: NumPy's ``linalg.solve`` copies a float32
#: d x d factor and identity into float64 for the two inverse factors.
MEMORY_FACTOR = 10.0
MEMORY_PAIRS = [
    ("diagonal", "kronecker"),
    ("lowrank+diag", "kronecker"),
    ("diagonal", "lowrank+diag"),
    ("kronecker", "lowrank+diag"),
    ("kronecker-low", "lowrank+diag"),
    ("lowrank+diag", "lowrank+diag"),
]


def memory_parameter(kind: str, seed: int) -> sc.GaussianParameter:
    rng = np.random.default_rng(seed)
    mean = {n: rng.standard_normal(s).astype(np.float32) for n, s in MEMORY_LAYER.items()}
    cov = {
        "diagonal": lambda: sc.DiagonalCovariance(),
        "lowrank+diag": lambda: sc.LowRankPlusDiagonalCovariance(8),
        "kronecker": lambda: sc.KroneckerCovariance(),
        "kronecker-low": lambda: sc.KroneckerCovariance(input_rank=20, output_rank=10),
    }[kind]()
    param = sc.GaussianParameter(mean, cov)
    cov.reset_parameters(0.5, generator=rng)
    return param


@pytest.mark.parametrize(
    ("q_kind", "p_kind"), MEMORY_PAIRS, ids=["-".join(p) for p in MEMORY_PAIRS]
)
def test_kl_peak_memory_is_a_small_multiple_of_the_storage(
    backend: Backend, q_kind: str, p_kind: str
) -> None:
    if backend.name != "numpy":
        pytest.skip("tracemalloc traces NumPy's allocations only")
    q, p = memory_parameter(q_kind, 0), memory_parameter(p_kind, 1)
    num_params = flat_layout(MEMORY_LAYER).num_params
    storage_bytes = max(sum(a.nbytes for a in param.cov.storage().values()) for param in (q, p))
    tracemalloc.start()
    try:
        kl = sc.kl_divergence(q, p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not np.isnan(kl)  # +inf for the low-rank Kronecker q
    assert peak < MEMORY_FACTOR * storage_bytes, (peak, storage_bytes)
    assert peak < 0.01 * 4 * num_params**2  # 1% of one float32 P x P array
