"""Structured linear algebra against the dense float64 oracle (tests/oracle.py).

``matmul``, ``diagonal``, ``variances``, ``trace``, ``logdet``, ``solve``, ``flatten`` and
``unflatten`` of every case × backend × dtype are compared with the same computation
in NumPy float64 on the oracle's Sigma (``Sigma @ x``, ``np.diag``, ``np.linalg.slogdet``,
``np.linalg.solve``); the Kronecker mixed-product identities, the matrix determinant
lemma and Woodbury are checked against factors read from the storage; hypothesis
draws shapes, ranks and values for ``solve(matmul(x)) == x``, ``KL(q, q) == 0`` and
``KL >= 0``.

Storage is written from NumPy draws with a dominant diagonal (S = I + 0.1 N for square
factors, d ~ 1 and U ~ 0.3 N for low rank plus diagonal), so float32 results can be
held to a tolerance derived from the dtype and the oracle's condition number.
"""

from __future__ import annotations

import math
import os
from typing import Any

import array_api_compat
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import structcov as sc
from cases import CASE_IDS, CASES, MEAN_SPECS, Case, well_conditioned
from conftest import Backend
from oracle import Dense, dense_oracle, kronecker_factors, kronecker_positions, split

BATCHES = [(), (2, 3)]
BATCH_IDS = ["batch()", "batch(2,3)"]
#: The advice every singular-solve error must give (both advice texts name it).
ADVICE = "LowRankPlusDiagonalCovariance"
#: Safety factor over the first-order error bounds below (c * eps * size * condition).
C = 8.0

#: Eager JAX compiles every operation anew for every shape and dtype (about 0.1 s each
#: on a loaded 2-core machine, seconds per case), so by default JAX runs the per-case
#: tests on the weight+bias layer of every structure (both dtypes) with one batch
#: shape, and the properties on that layer's shapes; the layout variants run on every
#: other backend. ``STRUCTCOV_JAX_FULL=1`` runs everything on JAX too.
JAX_FULL = os.environ.get("STRUCTCOV_JAX_FULL", "") == "1"
JAX_SPEC = MEAN_SPECS["weight+bias"]
JAX_BATCH = (2, 3)


def light_on_jax(backend: Backend) -> bool:
    return backend.name == "jax" and not JAX_FULL


def jax_gate(backend: Backend, case: Case, batch: tuple[int, ...] = JAX_BATCH) -> None:
    """Skip what JAX leaves to the other backends by default (see ``JAX_FULL``)."""
    if light_on_jax(backend) and (case.spec != JAX_SPEC or batch != JAX_BATCH):
        pytest.skip(
            "eager JAX compiles per shape: it runs the weight+bias layer with batch (2, 3); "
            "STRUCTCOV_JAX_FULL=1 runs every case"
        )


def eps(dtype: str) -> float:
    return float(np.finfo(dtype).eps)


# ----------------------------------------------------------------- storage and cache


def load(cov: Any, storage: dict[str, np.ndarray], backend: Backend, dtype: str) -> None:
    cov.load_storage({path: backend.asarray(value, dtype) for path, value in storage.items()})


_CACHE: dict[tuple[str, str, str], tuple[Any, Any, Dense]] = {}


def setup(case: Case, backend: Backend, dtype: str) -> tuple[Any, Any, Dense]:
    """(parameter, means, oracle) per (case, backend, dtype); the tests only read them."""
    key = (case.id, backend.name, dtype)
    if key not in _CACHE:
        rng = np.random.default_rng(20240617)
        mean = case.make_mean(backend, dtype, rng)
        param = sc.GaussianParameter(mean, case.make_cov())
        load(param.cov, well_conditioned(param.cov, mean, rng), backend, dtype)
        _CACHE[key] = (param, mean, dense_oracle(param.cov, mean, backend.to_numpy))
    return _CACHE[key]


def full_rank(oracle: Dense) -> bool:
    return bool(np.linalg.matrix_rank(oracle.S) == oracle.P)


def condition(oracle: Dense) -> float:
    return float(np.linalg.cond(oracle.Sigma))


# ---------------------------------------------------------------------- assertions


def reference_of(mean: Any) -> Any:
    if not isinstance(mean, dict):
        return mean
    return next(value for value in mean.values() if value is not None)


def check_array(out: Any, shape: tuple[int, ...], mean: Any, backend: Backend, dtype: str) -> None:
    """Shape, namespace, dtype and device of a result."""
    reference = reference_of(mean)
    assert tuple(out.shape) == shape, (tuple(out.shape), shape)
    assert array_api_compat.array_namespace(out) is array_api_compat.array_namespace(reference)
    assert out.dtype == getattr(backend.xp, dtype), out.dtype
    assert array_api_compat.device(out) == array_api_compat.device(reference)


def assert_within(got: np.ndarray, expected: np.ndarray, bound: Any, what: str) -> None:
    """|got - expected| <= bound element-wise (bound broadcasts), and got is finite."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    assert np.all(np.isfinite(got)), f"{what}: non-finite values {got}"
    error = np.abs(got - expected)
    bound = np.broadcast_to(bound, error.shape)
    worst = np.unravel_index(np.argmax(error - bound), error.shape) if error.size else ()
    assert np.all(error <= bound), (
        f"{what}: |got - expected| = {error[worst]} > bound {bound[worst]} at {worst} "
        f"(got {got[worst]}, expected {expected[worst]})"
    )


def random_flat(
    backend: Backend, dtype: str, shape: tuple[int, ...], seed: int
) -> tuple[Any, np.ndarray]:
    x = backend.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)
    return x, backend.to_numpy(x)  # the oracle sees exactly the rounded input


# ------------------------------------------------------------------ oracle tests


@pytest.mark.parametrize("batch", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matmul(case: Case, backend: Backend, dtype: str, batch: tuple[int, ...]) -> None:
    jax_gate(backend, case, batch)
    param, mean, oracle = setup(case, backend, dtype)
    x, x64 = random_flat(backend, dtype, (*batch, oracle.P), seed=1)
    out = param.cov.matmul(x)
    check_array(out, (*batch, oracle.P), mean, backend, dtype)
    # Forward error of a product: |fl(Sigma x) - Sigma x| <= c eps K |S| |S^T| |x|.
    magnitude = np.abs(x64) @ (np.abs(oracle.S) @ np.abs(oracle.S).T)
    bound = C * eps(dtype) * (oracle.K + 1) * magnitude
    assert_within(backend.to_numpy(out), x64 @ oracle.Sigma.T, bound, "matmul")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_diagonal_variances_trace(case: Case, backend: Backend, dtype: str) -> None:
    jax_gate(backend, case)
    param, mean, oracle = setup(case, backend, dtype)
    cov = param.cov
    expected = np.diag(oracle.Sigma)
    bound = C * eps(dtype) * (oracle.K + 1) * np.sum(oracle.S**2, axis=1)
    diagonal = cov.diagonal()
    check_array(diagonal, (oracle.P,), mean, backend, dtype)
    assert_within(backend.to_numpy(diagonal), expected, bound, "diagonal")

    variances = cov.variances()
    assert list(variances) == list(oracle.layout.names)
    for name, value in split(expected, oracle.layout).items():
        check_array(variances[name], value.shape, mean, backend, dtype)
        assert_within(backend.to_numpy(variances[name]), value, np.max(bound), f"variances {name}")

    trace = cov.trace()
    check_array(trace, (), mean, backend, dtype)
    trace_bound = C * eps(dtype) * (oracle.K + oracle.P) * np.sum(oracle.S**2)
    assert_within(backend.to_numpy(trace), np.trace(oracle.Sigma), trace_bound, "trace")
    assert_within(
        backend.to_numpy(trace), np.sum(backend.to_numpy(diagonal)), trace_bound, "sum(diag)"
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_is_singular_matches_the_rank_of_the_oracle(case: Case, backend: Backend) -> None:
    jax_gate(backend, case)
    param, _, oracle = setup(case, backend, "float64")
    assert param.cov.is_singular == (not full_rank(oracle))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_logdet(case: Case, backend: Backend, dtype: str) -> None:
    jax_gate(backend, case)
    param, mean, oracle = setup(case, backend, dtype)
    logdet = param.cov.logdet()
    check_array(logdet, (), mean, backend, dtype)
    value = backend.to_numpy(logdet)
    if not full_rank(oracle):
        assert value == -np.inf, value
        return
    sign, expected = np.linalg.slogdet(oracle.Sigma)
    assert sign == 1.0
    # d logdet = tr(Sigma^-1 dSigma): at most P * cond * (relative perturbation).
    bound = C * eps(dtype) * (oracle.K + 1) * oracle.P * condition(oracle)
    assert_within(value, expected, bound, "logdet")


def singular_solve_raises(cov: Any, x: Any) -> None:
    with pytest.raises(ValueError, match=f"(?s)singular.*{ADVICE}"):
        cov.solve(x)


@pytest.mark.parametrize("batch", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_solve(case: Case, backend: Backend, dtype: str, batch: tuple[int, ...]) -> None:
    jax_gate(backend, case, batch)
    param, mean, oracle = setup(case, backend, dtype)
    x, x64 = random_flat(backend, dtype, (*batch, oracle.P), seed=2)
    if not full_rank(oracle):
        singular_solve_raises(param.cov, x)
        return
    out = param.cov.solve(x)
    check_array(out, (*batch, oracle.P), mean, backend, dtype)
    expected = np.linalg.solve(oracle.Sigma, x64.reshape(-1, oracle.P).T).T.reshape(x64.shape)
    # Backward stable solve: relative error <= c eps n cond(Sigma), norm-wise per vector.
    cond = condition(oracle)
    bound = C * eps(dtype) * (oracle.K + 1) * cond * np.max(np.abs(expected), -1, keepdims=True)
    assert_within(backend.to_numpy(out), expected, bound, "solve")

    round_trip = backend.to_numpy(param.cov.solve(param.cov.matmul(x)))
    bound = C * eps(dtype) * (oracle.K + 1) * cond * np.max(np.abs(x64), -1, keepdims=True)
    assert_within(round_trip, x64, bound, "solve(matmul(x))")


@pytest.mark.parametrize("batch", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_flatten_unflatten_round_trip(
    case: Case, backend: Backend, dtype: str, batch: tuple[int, ...]
) -> None:
    """Pure data movement, so exact; the flat order is the oracle's element-wise one."""
    jax_gate(backend, case, batch)
    param, mean, oracle = setup(case, backend, dtype)
    flat, flat64 = random_flat(backend, dtype, (*batch, oracle.P), seed=3)
    parts64 = split(flat64, oracle.layout, batch)
    parts = {name: backend.asarray(value, dtype) for name, value in parts64.items()}

    flattened = param.cov.flatten(parts)
    check_array(flattened, (*batch, oracle.P), mean, backend, dtype)
    np.testing.assert_array_equal(backend.to_numpy(flattened), flat64)

    unflattened = param.cov.unflatten(flat)
    assert list(unflattened) == list(oracle.layout.names)
    for name, value in parts64.items():
        check_array(unflattened[name], value.shape, mean, backend, dtype)
        np.testing.assert_array_equal(backend.to_numpy(unflattened[name]), value, err_msg=name)
    again = param.cov.flatten(param.cov.unflatten(flattened))
    np.testing.assert_array_equal(backend.to_numpy(again), flat64)


# ------------------------------------------------------- Kronecker and LRPD identities

KRONECKER_CASES = [case for case in CASES if case.structure.startswith("kronecker")]
LRPD_CASES = [case for case in CASES if case.structure == "lowrank+diag-2"]


def _logdet64(a: np.ndarray) -> float:
    sign, value = np.linalg.slogdet(a)
    return float(value) if sign > 0 else -math.inf


@pytest.mark.parametrize("sample_scale", [1.0, 1.7])
@pytest.mark.parametrize("case", KRONECKER_CASES, ids=lambda case: case.id)
def test_kronecker_mixed_product_identities(
    case: Case, backend: Backend, dtype: str, sample_scale: float
) -> None:
    """logdet = d_aug logdet(C_out) + d_out logdet(C_in) + P log s^2, tr = s^2 tr C_out tr C_in."""
    jax_gate(backend, case)
    rng = np.random.default_rng(5)
    mean = case.make_mean(backend, dtype, rng)
    param = sc.GaussianParameter(mean, case.make_cov())
    cov = param.cov
    load(cov, well_conditioned(cov, mean, rng), backend, dtype)
    cov.sample_scale = sample_scale
    oracle = dense_oracle(cov, mean, backend.to_numpy)
    s_out, s_in = kronecker_factors(cov, oracle.layout, backend.to_numpy)
    c_out, c_in = s_out @ s_out.T, s_in @ s_in.T
    d_out, d_aug, p = c_out.shape[0], c_in.shape[0], oracle.P
    scale2 = sample_scale**2

    expected_trace = scale2 * np.trace(c_out) * np.trace(c_in)
    np.testing.assert_allclose(expected_trace, np.trace(oracle.Sigma), rtol=1e-12)  # identity
    trace = cov.trace()
    check_array(trace, (), mean, backend, dtype)
    trace_bound = C * eps(dtype) * (oracle.K + p) * abs(expected_trace)
    assert_within(backend.to_numpy(trace), expected_trace, trace_bound, "trace")
    # The scale reaches the products and the diagonal too (oracle: Sigma filled from C).
    magnitude = np.abs(oracle.S) @ np.abs(oracle.S).T
    diagonal = backend.to_numpy(cov.diagonal())
    bound = C * eps(dtype) * (oracle.K + 1) * np.diag(magnitude)
    assert_within(diagonal, np.diag(oracle.Sigma), bound, "diagonal")
    x, x64 = random_flat(backend, dtype, (*JAX_BATCH, p), seed=6)
    bound = C * eps(dtype) * (oracle.K + 1) * (np.abs(x64) @ magnitude)
    assert_within(backend.to_numpy(cov.matmul(x)), x64 @ oracle.Sigma, bound, "matmul")

    logdet = backend.to_numpy(cov.logdet())
    if cov.is_singular:
        assert logdet == -np.inf
        assert not full_rank(oracle)
        return
    expected = d_aug * _logdet64(c_out) + d_out * _logdet64(c_in) + p * math.log(scale2)
    np.testing.assert_allclose(expected, _logdet64(oracle.Sigma), rtol=1e-10, atol=1e-10)
    cond = np.linalg.cond(c_out) * np.linalg.cond(c_in)
    bound = C * eps(dtype) * (d_out + d_aug) * p * cond
    assert_within(logdet, expected, bound, "logdet")
    inverse = np.kron(np.linalg.inv(c_out), np.linalg.inv(c_in)) / scale2  # augmented order
    o_idx, i_idx, _, _ = kronecker_positions(oracle.layout)
    dense_inverse = inverse[np.ix_(o_idx * d_aug + i_idx, o_idx * d_aug + i_idx)]
    expected_solve = x64 @ dense_inverse.T
    np.testing.assert_allclose(dense_inverse @ oracle.Sigma, np.eye(p), atol=1e-9)  # identity
    bound = C * eps(dtype) * p * cond * np.max(np.abs(expected_solve), -1, keepdims=True)
    assert_within(backend.to_numpy(cov.solve(x)), expected_solve, bound, "solve")


@pytest.mark.parametrize("case", LRPD_CASES, ids=lambda case: case.id)
def test_low_rank_plus_diagonal_lemma_and_woodbury(
    case: Case, backend: Backend, dtype: str
) -> None:
    jax_gate(backend, case)
    param, mean, oracle = setup(case, backend, dtype)
    cov = param.cov
    rank = oracle.K - oracle.P  # S = [U, diag(d)]
    u, d = oracle.S[:, :rank], np.diag(oracle.S[:, rank:])
    capacitance64 = np.eye(rank) + u.T @ (u / d[:, None] ** 2)
    capacitance = cov.capacitance()
    check_array(capacitance, (rank, rank), mean, backend, dtype)
    bound = C * eps(dtype) * oracle.P * (1.0 + np.abs(u.T) @ np.abs(u / d[:, None] ** 2))
    assert_within(backend.to_numpy(capacitance), capacitance64, bound, "capacitance")

    # Matrix determinant lemma, first in float64 (the identity), then structcov.
    lemma = _logdet64(capacitance64) + np.sum(np.log(d**2))
    np.testing.assert_allclose(lemma, _logdet64(oracle.Sigma), rtol=1e-12, atol=1e-12)
    cond = condition(oracle)
    bound = C * eps(dtype) * oracle.K * oracle.P * cond
    assert_within(backend.to_numpy(cov.logdet()), lemma, bound, "logdet")

    # Woodbury against the dense inverse.
    x, x64 = random_flat(backend, dtype, (3, oracle.P), seed=7)
    woodbury = np.diag(d**-2) - (u / d[:, None] ** 2) @ np.linalg.solve(
        capacitance64, (u / d[:, None] ** 2).T
    )
    inverse = np.linalg.inv(oracle.Sigma)
    np.testing.assert_allclose(woodbury, inverse, rtol=1e-10, atol=1e-10)
    expected = x64 @ inverse.T
    bound = C * eps(dtype) * oracle.K * cond * np.max(np.abs(expected), -1, keepdims=True)
    assert_within(backend.to_numpy(cov.solve(x)), expected, bound, "Woodbury solve")

    # KL to a diagonal prior: the well-scaled sum of its own (not logdet's difference).
    prior = sc.normal_prior(param, 0.7)
    expected_kl, tolerance = dense_kl(param, prior, backend)
    assert abs(backend.to_numpy(sc.kl_divergence(param, prior)) - expected_kl) <= tolerance


# ------------------------------------------------------------ hypothesis properties

FULL_RANK_KINDS = ("factorized", "lowrank-clamped", "diagonal", "lowrank+diagonal", "kronecker")
#: Light JAX: the kinds whose KL(q, q) pairs tests/test_densities.py compiles on JAX too.
LIGHT_KINDS = ("diagonal", "lowrank+diagonal", "kronecker")


@st.composite
def drawn_full_rank(draw: Any, light: bool = False) -> tuple[str, dict, int, str, int, float]:
    """(kind, mean shapes, low rank, dtype, seed, scale): a full-rank parameter's recipe.

    ``light`` (JAX by default): the weight+bias layer's shapes and low rank 2, so the
    operations compiled for the per-case tests are reused; values are still drawn.
    """
    kind = draw(st.sampled_from(LIGHT_KINDS if light else FULL_RANK_KINDS))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 3.0, 1e3]))  # Sigma scales with its square
    if light:
        return kind, dict(JAX_SPEC), 2, dtype, seed, scale
    dim = st.integers(1, 3)
    if kind == "kronecker":
        weight = (draw(st.integers(1, 3)), *draw(st.lists(dim, min_size=1, max_size=2)))
        shapes: dict[str, tuple[int, ...]] = {"weight": weight}
        if draw(st.booleans()):
            shapes["bias"] = (weight[0],)
            if draw(st.booleans()):
                shapes = {"bias": shapes["bias"], "weight": weight}
    else:
        names = draw(
            st.lists(st.sampled_from(["w", "b", "x"]), min_size=1, max_size=2, unique=True)
        )
        shapes = {n: tuple(draw(st.lists(dim, min_size=0, max_size=2))) for n in names}
    num_params = sum(math.prod(s) for s in shapes.values())
    rank = draw(st.integers(1, num_params + 2))
    return kind, shapes, rank, dtype, seed, scale


def build_drawn(recipe: tuple, backend: Backend, seed_offset: int = 0) -> sc.GaussianParameter:
    kind, shapes, rank, dtype, seed, scale = recipe
    rng = np.random.default_rng([seed, seed_offset])
    mean = {n: backend.asarray(rng.standard_normal(s), dtype) for n, s in shapes.items()}
    cov = {
        "factorized": lambda: sc.FactorizedCovariance(),
        "lowrank-clamped": lambda: sc.LowRankCovariance(sum(map(math.prod, shapes.values())) + 2),
        # identity: the stored scales are the stds the scaling below multiplies
        # (tests/test_conditioning.py covers the positive transforms)
        "diagonal": lambda: sc.DiagonalCovariance(scale_transform="identity"),
        "lowrank+diagonal": lambda: sc.LowRankPlusDiagonalCovariance(
            rank, scale_transform="identity"
        ),
        "kronecker": sc.KroneckerCovariance,
    }[kind]()
    param = sc.GaussianParameter(mean, cov)
    storage = well_conditioned(cov, mean, rng)
    # Multiply every factor by sqrt(scale) (Kronecker: both sides), so Sigma scales by scale^2.
    factor = math.sqrt(scale) if kind == "kronecker" else scale
    load(cov, {path: factor * value for path, value in storage.items()}, backend, dtype)
    return param


def run(backend: Backend, test: Any, **strategies: Any) -> None:
    """Hypothesis with the loaded profile; JAX (eager, a compile per new shape) runs a fifth."""
    current = settings.default
    examples = current.max_examples if backend.name != "jax" else max(5, current.max_examples // 5)
    configured = settings(
        current,
        max_examples=examples,
        deadline=None,
        suppress_health_check=[*current.suppress_health_check, HealthCheck.too_slow],
    )
    configured(given(**strategies)(test))()


def dense_kl(q: Any, p: Any, backend: Backend) -> tuple[float, float]:
    """KL(q || p) from the oracle's Sigmas in float64, and the bound c eps P cond (1 + |KL|)."""
    (sq, mq), (sp, mp) = [
        (dense_oracle(g.cov, g.mean, backend.to_numpy).Sigma, g.flat_mean()) for g in (q, p)
    ]
    diff = backend.to_numpy(mp) - backend.to_numpy(mq)
    kl = 0.5 * (
        np.trace(np.linalg.solve(sp, sq))
        + diff @ np.linalg.solve(sp, diff)
        - q.num_params
        + _logdet64(sp)
        - _logdet64(sq)
    )
    conds = np.linalg.cond(sq) + np.linalg.cond(sp)
    return kl, C * eps(backend.dtype_name(mq)) * (q.num_params + 1) * conds * (1.0 + abs(kl))


def test_property_solve_inverts_matmul(backend: Backend) -> None:
    def check(recipe: tuple, batch: tuple[int, ...]) -> None:
        param = build_drawn(recipe, backend)
        dtype = recipe[3]
        cov = param.cov
        oracle = dense_oracle(cov, param.mean, backend.to_numpy)
        assert not cov.is_singular
        x, x64 = random_flat(backend, dtype, (*batch, oracle.P), seed=recipe[4] % 1000)
        cond = condition(oracle)
        bound = C * eps(dtype) * (oracle.K + 1) * cond * np.max(np.abs(x64), -1, keepdims=True)
        assert_within(backend.to_numpy(cov.solve(cov.matmul(x))), x64, bound, "solve(matmul)")
        assert_within(backend.to_numpy(cov.matmul(cov.solve(x))), x64, bound, "matmul(solve)")

    light = light_on_jax(backend)
    batches = st.just(JAX_BATCH) if light else st.sampled_from([(), (2,), (1, 3)])
    run(backend, check, recipe=drawn_full_rank(light), batch=batches)


def test_property_kl_of_q_to_itself_is_zero(backend: Backend) -> None:
    def check(recipe: tuple) -> None:
        q = build_drawn(recipe, backend)
        p = build_drawn(recipe, backend)  # equal, but another object
        for other in (q, p):
            kl = sc.kl_divergence(q, other)
            value = backend.to_numpy(kl)
            assert value.shape == ()
            expected, tol = dense_kl(q, other, backend)
            assert abs(expected) <= 1e-9  # the oracle agrees: KL(q, q) = 0
            assert abs(value) <= tol, (value, tol)

    run(backend, check, recipe=drawn_full_rank(light_on_jax(backend)))


def test_property_kl_is_non_negative(backend: Backend) -> None:
    light = light_on_jax(backend)

    @st.composite
    def pair(draw: Any) -> tuple[tuple, tuple, bool]:
        q = draw(drawn_full_rank(light))
        kind, shapes, rank, dtype, _, _ = q
        kinds = FULL_RANK_KINDS if kind == "kronecker" else FULL_RANK_KINDS[:4]
        # Light JAX: p of q's kind or low rank plus diagonal (pairs compiled elsewhere).
        p_kind = draw(st.sampled_from((kind, "lowrank+diagonal") if light else kinds))
        p = (
            p_kind,
            shapes,
            2 if light else draw(st.integers(1, rank + 1)),
            dtype,
            draw(st.integers(0, 2**32 - 1)),
            draw(st.sampled_from([0.01, 0.3, 1.0, 2.0, 100.0])),
        )
        return q, p, draw(st.booleans())

    def check(recipes: tuple[tuple, tuple, bool]) -> None:
        q_recipe, p_recipe, prior = recipes
        q = build_drawn(q_recipe, backend)
        p = sc.normal_prior(q, p_recipe[5]) if prior else build_drawn(p_recipe, backend, 1)
        value = backend.to_numpy(sc.kl_divergence(q, p))
        assert np.isfinite(value), value
        expected, tol = dense_kl(q, p, backend)
        assert value >= -tol, (value, tol)
        assert abs(value - expected) <= tol, (value, expected, tol)

    run(backend, check, recipes=pair())
