"""log_prob, entropy and kl_divergence against dense closed forms, for every structure pair.

The closed forms are written here in NumPy float64 from the oracle's Sigma
(tests/oracle.py) and means read element by element:

    log N(x; m, Sigma) = -0.5 (P log 2 pi + log det Sigma + (x - m)^T Sigma^-1 (x - m))
    H = 0.5 (P (1 + log 2 pi) + log det Sigma)
    KL(q || p) = 0.5 (tr(Sigma_p^-1 Sigma_q) + (m_p - m_q)^T Sigma_p^-1 (m_p - m_q) - P
                      + log det Sigma_p - log det Sigma_q)

over a weight+bias layer, for every (q, p) pair of structures, p also
``normal_prior(q, sigma)`` (sigma a float or per-name arrays; its Sigma is built
here from sigma, not read from structcov), and over every shared case (layouts) for
the KL to a per-name prior. Singular cases: KL of a singular q is +inf, so is a full-rank
q against a singular p, two singular ones raise, log_prob of a singular q raises;
mismatched names, shapes or dtypes raise.
float32 is held to a bound derived from its eps and the condition numbers, and must
be finite. A Monte Carlo smoke test checks KL against sampled log-density
differences; on JAX a few structures also run under ``jax.jit``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pytest
import scipy.stats

import structcov as sc
from cases import CASE_IDS, CASES, MEAN_SPECS, STRUCTURES, Case, well_conditioned
from conftest import Backend, tolerance
from oracle import dense_oracle, flat_layout, join

LAYER = MEAN_SPECS["weight+bias"]  # weight (3, 4), bias (3,): P = 15
STRUCTURE_IDS = list(STRUCTURES)
PRIORS = ("prior-float", "prior-per-name")
LOG_2PI = math.log(2 * math.pi)
#: Safety factor over the first-order error bounds (c eps P cond (1 + |value|)).
C = 8.0

#: Eager JAX compiles every operation anew per shape (about 0.1 s each on a loaded
#: 2-core machine), so by default JAX runs log_prob with one sample shape and the KL
#: of every q to the priors (diagonal path), to a low rank plus diagonal p (generic
#: path), to a singular p (error) and, for Kronecker q, to a Kronecker p (the
#: Kronecker-Kronecker path); ``STRUCTCOV_JAX_FULL=1`` runs the whole grid on JAX too.
JAX_FULL = os.environ.get("STRUCTCOV_JAX_FULL", "") == "1"
JAX_SAMPLE_SHAPE = (2, 3)
JAX_P_KINDS = (*PRIORS, "lowrank+diag-2", "kronecker-2x1")


def jax_gate(backend: Backend, keep: bool, what: str) -> None:
    if backend.name == "jax" and not JAX_FULL and not keep:
        pytest.skip(
            f"eager JAX compiles per shape: {what} runs on the other backends "
            "(STRUCTCOV_JAX_FULL=1 runs it on JAX too)"
        )


def eps(dtype: str) -> float:
    return float(np.finfo(dtype).eps)


# ------------------------------------------------------------------------ storage


class Dense:
    """A Gaussian's float64 mean and Sigma, and its condition number."""

    def __init__(self, mean: np.ndarray, sigma: np.ndarray) -> None:
        self.mean, self.sigma = mean, sigma
        self.full_rank = bool(np.linalg.matrix_rank(sigma) == sigma.shape[0])
        self.cond = float(np.linalg.cond(sigma)) if self.full_rank else math.inf

    @property
    def logdet(self) -> float:
        sign, value = np.linalg.slogdet(self.sigma)
        assert sign == 1.0
        return float(value)


_CACHE: dict[tuple[Any, ...], tuple[sc.GaussianParameter, Dense]] = {}


def gaussian(
    structure: str, backend: Backend, dtype: str, seed: int = 0, spec: Any = None
) -> tuple[sc.GaussianParameter, Dense]:
    """A GaussianParameter of ``structure`` over the layer with well-conditioned storage."""
    spec = LAYER if spec is None else spec
    key = (structure, backend.name, dtype, seed, repr(spec))
    if key not in _CACHE:
        rng = np.random.default_rng([seed, 12345])
        mean = {n: backend.asarray(rng.standard_normal(s), dtype) for n, s in spec.items()}
        param = sc.GaussianParameter(mean, STRUCTURES[structure][0]())
        storage = well_conditioned(param.cov, mean, rng)
        param.cov.load_storage({p: backend.asarray(v, dtype) for p, v in storage.items()})
        oracle = dense_oracle(param.cov, mean, backend.to_numpy)
        m64 = join({n: backend.to_numpy(v) for n, v in mean.items()}, oracle.layout)
        _CACHE[key] = (param, Dense(m64, oracle.Sigma))
    return _CACHE[key]


def prior_scales(
    kind: str, backend: Backend, dtype: str, spec: Any = None
) -> tuple[Any, np.ndarray]:
    """(the ``scale`` argument of normal_prior, the flat float64 sigma it means)."""
    layout = flat_layout(LAYER if spec is None else spec)
    if kind == "prior-float":
        return 0.7, np.full(layout.num_params, 0.7)
    rng = np.random.default_rng(99)
    sigma = {
        n: rng.uniform(0.5, 1.5, size=s) for n, s in zip(layout.names, layout.shapes, strict=True)
    }
    as_backend = {n: backend.asarray(v, dtype) for n, v in sigma.items()}
    rounded = {n: backend.to_numpy(v) for n, v in as_backend.items()}
    return as_backend, join(rounded, layout)


def target(kind: str, q: sc.GaussianParameter, backend: Backend, dtype: str) -> tuple[Any, Dense]:
    """p for the KL tests: a prior of q, or another structure (other means and storage)."""
    if kind in PRIORS:
        scale, sigma = prior_scales(kind, backend, dtype, q.shapes)
        return sc.normal_prior(q, scale), Dense(np.zeros_like(sigma), np.diag(sigma**2))
    return gaussian(kind, backend, dtype, seed=1, spec=q.shapes)


# ------------------------------------------------------------------ closed forms


def dense_log_prob(x: np.ndarray, g: Dense) -> np.ndarray:
    centred = x - g.mean
    flat = centred.reshape(-1, centred.shape[-1])
    quadratic = np.sum(flat * np.linalg.solve(g.sigma, flat.T).T, axis=-1)
    p = g.mean.shape[0]
    return (-0.5 * (p * LOG_2PI + g.logdet + quadratic)).reshape(centred.shape[:-1])


def dense_entropy(g: Dense) -> float:
    return 0.5 * (g.mean.shape[0] * (1.0 + LOG_2PI) + g.logdet)


def dense_kl(q: Dense, p: Dense) -> float:
    diff = p.mean - q.mean
    return 0.5 * (
        np.trace(np.linalg.solve(p.sigma, q.sigma))
        + diff @ np.linalg.solve(p.sigma, diff)
        - q.mean.shape[0]
        + p.logdet
        - q.logdet
    )


def assert_close(got: Any, expected: Any, bound: float, what: str) -> None:
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    assert np.all(np.isfinite(got)), f"{what}: non-finite {got}"
    error = float(np.max(np.abs(got - expected)))
    assert error <= bound, f"{what}: |got - expected| = {error} > {bound} ({got} vs {expected})"


def check_scalar(value: Any, backend: Backend, dtype: str) -> None:
    assert tuple(value.shape) == ()
    assert value.dtype == getattr(backend.xp, dtype)


# ------------------------------------------------------------------------- tests


def test_closed_forms_agree_with_scipy() -> None:
    """Self-check of the closed forms written here, on a random SPD matrix."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 6, 6))
    q = Dense(rng.standard_normal(6), a @ a.T + 0.5 * np.eye(6))
    p = Dense(rng.standard_normal(6), b @ b.T + 0.5 * np.eye(6))
    x = rng.standard_normal((4, 6))
    reference = scipy.stats.multivariate_normal(q.mean, q.sigma)
    np.testing.assert_allclose(dense_log_prob(x, q), reference.logpdf(x), rtol=1e-12)
    np.testing.assert_allclose(dense_entropy(q), reference.entropy(), rtol=1e-12)
    # KL(q || p) = cross-entropy(q, p) - H(q), the cross-entropy from its own closed form.
    cross = 0.5 * (
        6 * LOG_2PI
        + p.logdet
        + np.trace(np.linalg.solve(p.sigma, q.sigma))
        + (q.mean - p.mean) @ np.linalg.solve(p.sigma, q.mean - p.mean)
    )
    np.testing.assert_allclose(dense_kl(q, p), cross - dense_entropy(q), rtol=1e-12)
    assert dense_kl(q, q) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("sample_shape", [(), (4,), (2, 3)], ids=str)
@pytest.mark.parametrize("structure", STRUCTURE_IDS)
def test_log_prob(backend: Backend, dtype: str, structure: str, sample_shape: tuple) -> None:
    jax_gate(backend, sample_shape == JAX_SAMPLE_SHAPE, "this sample shape")
    q, dense = gaussian(structure, backend, dtype)
    layout = flat_layout(LAYER)
    rng = np.random.default_rng(4)
    x64 = dense.mean + 0.5 * rng.standard_normal((*sample_shape, layout.num_params))
    values = {
        n: backend.asarray(x64[..., layout.slots[n]].reshape((*sample_shape, *s)), dtype)
        for n, s in LAYER.items()
    }
    x64 = np.concatenate(  # exactly what the backend holds, in the oracle's flat order
        [backend.to_numpy(values[n]).reshape((*sample_shape, -1)) for n in layout.names], axis=-1
    )
    if not dense.full_rank:
        assert q.cov.is_singular
        with pytest.raises(ValueError, match="singular"):
            q.log_prob(values)
        return
    out = q.log_prob(values)
    assert tuple(out.shape) == sample_shape
    assert out.dtype == getattr(backend.xp, dtype)
    expected = dense_log_prob(x64, dense)
    if dtype == "float64":
        reference = scipy.stats.multivariate_normal(dense.mean, dense.sigma).logpdf(x64)
        np.testing.assert_allclose(expected, reference, rtol=1e-10)
    bound = C * eps(dtype) * (layout.num_params + 1) * dense.cond * (1 + np.max(np.abs(expected)))
    assert_close(backend.to_numpy(out), expected, bound, "log_prob")


@pytest.mark.parametrize("structure", STRUCTURE_IDS)
def test_entropy(backend: Backend, dtype: str, structure: str) -> None:
    q, dense = gaussian(structure, backend, dtype)
    out = q.entropy()
    check_scalar(out, backend, dtype)
    if not dense.full_rank:
        assert backend.to_numpy(out) == -np.inf
        return
    bound = C * eps(dtype) * (q.num_params + 1) * dense.cond
    assert_close(backend.to_numpy(out), dense_entropy(dense), bound, "entropy")


@pytest.mark.parametrize("p_kind", [*STRUCTURE_IDS, *PRIORS])
@pytest.mark.parametrize("q_kind", STRUCTURE_IDS)
def test_kl_divergence(backend: Backend, dtype: str, q_kind: str, p_kind: str) -> None:
    kronecker_pair = q_kind == p_kind == "kronecker-full"
    jax_gate(backend, p_kind in JAX_P_KINDS or kronecker_pair, "this pair")
    q, dq = gaussian(q_kind, backend, dtype)
    p, dp = target(p_kind, q, backend, dtype)
    if not dp.full_rank:
        assert p.cov.is_singular
        # q has a density on R^P, or lives on a subspace other than p's (independent
        # storage; equal supports are tested in tests/test_kl_singular.py): not
        # absolutely continuous, +inf.
        assert backend.to_numpy(sc.kl_divergence(q, p)) == np.inf
        return
    kl = sc.kl_divergence(q, p)
    check_scalar(kl, backend, dtype)
    if not dq.full_rank:
        assert backend.to_numpy(kl) == np.inf
        return
    expected = dense_kl(dq, dp)
    bound = C * eps(dtype) * (q.num_params + 1) * (dq.cond + dp.cond) * (1 + abs(expected))
    assert_close(backend.to_numpy(kl), expected, bound, "KL")


@pytest.mark.parametrize("structure", STRUCTURE_IDS)
def test_kl_of_q_to_itself_is_zero(backend: Backend, dtype: str, structure: str) -> None:
    q, dense = gaussian(structure, backend, dtype)
    cond = dense.cond
    if not dense.full_rank:  # 0 on its own support: the condition number there
        values = np.linalg.eigvalsh(dense.sigma)
        kept = values[values > 1e-9 * values.max()]
        cond = float(kept.max() / kept.min())
    kl = backend.to_numpy(sc.kl_divergence(q, q))
    assert abs(kl) <= C * eps(dtype) * (q.num_params + 1) * cond, kl


def test_prior_variances_are_sigma_squared(backend: Backend, dtype: str) -> None:
    q, _ = gaussian("diagonal", backend, dtype)
    for kind in PRIORS:
        scale, sigma = prior_scales(kind, backend, dtype)
        prior = sc.normal_prior(q, scale)
        np.testing.assert_allclose(
            backend.to_numpy(prior.cov.diagonal()), sigma**2, **tolerance(dtype)
        )
        np.testing.assert_array_equal(backend.to_numpy(prior.flat_mean()), 0.0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_case_log_prob_entropy_and_kl_to_a_per_name_prior(
    backend: Backend, dtype: str, case: Case
) -> None:
    """Every shared case (layouts: bias first, None entries, bare arrays, conv weights)."""
    jax_gate(backend, case.spec == LAYER, "this layout (the layer runs above)")
    rng = np.random.default_rng(21)
    mean = case.make_mean(backend, dtype, rng)
    q = sc.GaussianParameter(mean, case.make_cov())
    storage = well_conditioned(q.cov, mean, rng)
    q.cov.load_storage({p: backend.asarray(v, dtype) for p, v in storage.items()})
    oracle = dense_oracle(q.cov, mean, backend.to_numpy)
    layout = oracle.layout
    means = {n: v for n, v in q.mean.items() if v is not None}
    dense = Dense(join({n: backend.to_numpy(v) for n, v in means.items()}, layout), oracle.Sigma)
    scale = {n: backend.asarray(rng.uniform(0.5, 1.5, s), dtype) for n, s in q.shapes.items()}
    sigma = join({n: backend.to_numpy(v) for n, v in scale.items()}, layout)
    prior = Dense(np.zeros(layout.num_params), np.diag(sigma**2))
    batch = JAX_SAMPLE_SHAPE
    x64 = dense.mean + 0.5 * rng.standard_normal((*batch, layout.num_params))
    values = {
        n: backend.asarray(x64[..., layout.slots[n]].reshape((*batch, *s)), dtype)
        for n, s in q.shapes.items()
    }
    x64 = np.concatenate(
        [backend.to_numpy(values[n]).reshape((*batch, -1)) for n in layout.names], axis=-1
    )

    kl = backend.to_numpy(sc.kl_divergence(q, sc.normal_prior(q, scale)))
    entropy = backend.to_numpy(q.entropy())
    if not dense.full_rank:
        assert (kl, entropy) == (np.inf, -np.inf)
        with pytest.raises(ValueError, match="singular"):
            q.log_prob(values)
        return
    bound = C * eps(dtype) * (layout.num_params + 1) * (dense.cond + 1)
    assert_close(entropy, dense_entropy(dense), bound, "entropy")
    expected = dense_kl(dense, prior)
    assert_close(kl, expected, bound * (1 + abs(expected)) * np.max(sigma**-2), "KL")
    log_prob = backend.to_numpy(q.log_prob(values))
    expected = dense_log_prob(x64, dense)
    assert_close(log_prob, expected, bound * (1 + np.max(np.abs(expected))), "log_prob")


def test_kronecker_sample_scale(backend: Backend, dtype: str) -> None:
    """sample_scale s multiplies Sigma by s^2: in log_prob, entropy and both KL paths."""
    params, denses = [], []
    for seed, scale in ((0, 1.3), (1, 0.8)):
        cached, _ = gaussian("kronecker-full", backend, dtype, seed=seed)
        param = sc.GaussianParameter(dict(cached.mean), sc.KroneckerCovariance())
        param.cov.load_storage(cached.cov.storage())
        param.cov.sample_scale = scale
        oracle = dense_oracle(param.cov, param.mean, backend.to_numpy)
        m64 = join({n: backend.to_numpy(v) for n, v in param.mean.items()}, oracle.layout)
        params.append(param)
        denses.append(Dense(m64, oracle.Sigma))
    (q, p), (dq, dp) = params, denses
    np.testing.assert_allclose(
        dq.sigma, 1.3**2 * gaussian("kronecker-full", backend, dtype)[1].sigma, rtol=1e-12
    )
    bound = C * eps(dtype) * (q.num_params + 1) * (dq.cond + dp.cond)
    assert_close(backend.to_numpy(q.entropy()), dense_entropy(dq), bound, "entropy")
    expected = dense_kl(dq, dp)
    assert_close(backend.to_numpy(sc.kl_divergence(q, p)), expected, bound * (1 + expected), "KL")
    scale, sigma = prior_scales("prior-per-name", backend, dtype)
    expected = dense_kl(dq, Dense(np.zeros_like(sigma), np.diag(sigma**2)))
    kl = backend.to_numpy(sc.kl_divergence(q, sc.normal_prior(q, scale)))
    assert_close(kl, expected, bound * (1 + expected), "KL to the prior")
    values = {n: v + 0.5 for n, v in q.mean.items()}
    x64 = dq.mean + 0.5
    expected = dense_log_prob(x64, dq)
    got = backend.to_numpy(q.log_prob(values))
    assert_close(got, expected, bound * (1 + abs(expected)), "log_prob")


# ------------------------------------------------------------------ errors


def test_mismatched_names_and_shapes_raise(backend: Backend) -> None:
    q, _ = gaussian("diagonal", backend, "float64")
    others = {
        "missing bias": {"weight": (3, 4)},
        "other order": {"bias": (3,), "weight": (3, 4)},
        "other shape": {"weight": (3, 5), "bias": (3,)},
        "other name": {"weight": (3, 4), "b": (3,)},
    }
    for spec in others.values():
        p, _ = gaussian("diagonal", backend, "float64", seed=2, spec=spec)
        for a, b in ((q, p), (p, q)):
            with pytest.raises(ValueError, match="same names"):
                sc.kl_divergence(a, b)
    with pytest.raises(TypeError, match="GaussianParameter"):
        sc.kl_divergence(q, q.mean)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keys"):
        sc.normal_prior(q, {"weight": 1.0})


def test_log_prob_of_wrong_values_raises(backend: Backend) -> None:
    q, _ = gaussian("lowrank+diag-2", backend, "float64")
    weight = backend.asarray(np.zeros((3, 4)), "float64")
    bias = backend.asarray(np.zeros(3), "float64")
    with pytest.raises(ValueError, match="keys"):
        q.log_prob({"weight": weight})
    with pytest.raises(ValueError, match="shape"):
        q.log_prob({"weight": weight, "bias": backend.asarray(np.zeros(4), "float64")})
    with pytest.raises(ValueError, match="shape"):  # the right size, the wrong shape
        q.log_prob({"weight": weight, "bias": backend.asarray(np.zeros((3, 1)), "float64")})
    with pytest.raises(ValueError, match="shape"):  # inconsistent sample dimensions
        q.log_prob({"weight": weight, "bias": backend.asarray(np.zeros((2, 3)), "float64")})
    assert tuple(q.log_prob({"weight": weight, "bias": bias}).shape) == ()


@pytest.mark.parametrize("p_kind", ["prior-float", "lowrank+diag-2"])
def test_kl_of_mixed_dtypes_raises(backend: Backend, p_kind: str) -> None:
    """q float32, p float64: no silent promotion (DESIGN.md §1), whichever path p takes."""
    q, _ = gaussian("lowrank+diag-2", backend, "float32")
    p64, _ = gaussian("lowrank+diag-2", backend, "float64")
    p = sc.normal_prior(p64, 0.7) if p_kind in PRIORS else p64
    with pytest.raises(TypeError, match="dtype"):
        sc.kl_divergence(q, p)


# ------------------------------------------------------------- Monte Carlo smoke


@pytest.mark.parametrize(
    ("q_kind", "p_kind"),
    [("lowrank+diag-2", "prior-per-name"), ("kronecker-full", "kronecker-full")],
)
def test_kl_monte_carlo_smoke(backend: Backend, q_kind: str, p_kind: str) -> None:
    """KL(q || p) = E_q[log q(x) - log p(x)]: within 4 standard errors of a fixed-seed mean.

    A smoke test of the closed form against sampled log-density differences, not
    its only check (test_kl_divergence compares it with the dense formula).
    """
    jax_gate(backend, p_kind in PRIORS, "this pair")
    n = 4000
    q, dq = gaussian(q_kind, backend, "float64")
    p, dp = target(p_kind, q, backend, "float64")
    samples = q.sample((n,), generator=backend.generator(2024))
    difference = backend.to_numpy(q.log_prob(samples)) - backend.to_numpy(p.log_prob(samples))
    estimate = float(np.mean(difference))
    standard_error = float(np.std(difference, ddof=1)) / math.sqrt(n)
    kl = float(backend.to_numpy(sc.kl_divergence(q, p)))
    assert standard_error > 0
    assert abs(estimate - kl) <= 4 * standard_error, (estimate, kl, standard_error)
    # The estimate is informative: its error is small next to the divergence.
    assert standard_error < 0.05 * kl, (standard_error, kl)
    assert kl == pytest.approx(dense_kl(dq, dp), rel=1e-9)


# ----------------------------------------------------------------------- jax.jit

#: Few (a compile each): every kind of structure once, both dtypes, one singular.
JIT_CASES = [
    ("factorized-full", "float64"),
    ("diagonal", "float32"),
    ("lowrank+diag-2", "float64"),
    ("kronecker-full", "float32"),
    ("lowrank-2", "float64"),
]


@pytest.mark.parametrize(("structure", "dtype"), JIT_CASES)
def test_jit_equals_eager(backend: Backend, dtype: str, structure: str) -> None:
    """On JAX: every public operation under ``jax.jit``, closing over the parameters."""
    if backend.name != "jax":
        pytest.skip("jax.jit runs on the jax backend only")
    import jax

    q, dense = gaussian(structure, backend, dtype)
    prior, _ = target("prior-per-name", q, backend, dtype)
    other, _ = target("lowrank+diag-2", q, backend, dtype)
    rng = np.random.default_rng(8)
    # The shapes of the eager tests above, so the eager half reuses their compiled operations.
    x = backend.asarray(rng.standard_normal((*JAX_SAMPLE_SHAPE, q.num_params)), dtype)
    values = {
        n: backend.asarray(rng.standard_normal((*JAX_SAMPLE_SHAPE, *s)), dtype)
        for n, s in LAYER.items()
    }

    def everything(x: Any, values: dict[str, Any]) -> dict[str, Any]:
        cov = q.cov
        out = {
            "matmul": cov.matmul(x),
            "logdet": cov.logdet(),
            "diagonal": cov.diagonal(),
            "trace": cov.trace(),
            "entropy": q.entropy(),
            "kl_prior": sc.kl_divergence(q, prior),
            "kl_other": sc.kl_divergence(q, other),
        }
        if not cov.is_singular:
            out["solve"] = cov.solve(x)
            out["log_prob"] = q.log_prob(values)
        return out

    eager = everything(x, values)
    jitted = jax.jit(everything)(x, values)
    assert sorted(jitted) == sorted(eager)
    assert ("solve" in eager) == dense.full_rank
    for key, value in eager.items():
        assert jitted[key].dtype == value.dtype, key
        assert jitted[key].shape == value.shape, key
        np.testing.assert_allclose(
            np.asarray(jitted[key], dtype=np.float64),
            np.asarray(value, dtype=np.float64),
            **tolerance(dtype),
            err_msg=key,
        )
