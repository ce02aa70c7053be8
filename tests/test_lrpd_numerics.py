"""Low rank plus diagonal numerics left open by issue 12: d tiny against U, exact zeros of
d, and one shared setup per density, against dense float64 oracles.

Sigma = U U^T + diag(d^2) with ``scale_transform="identity"`` (the stored scale is d).
The oracles are built here from the stored arrays (cast to the tested dtype, then read
as float64; `test_numerics.Pair`): the dense Sigma where it is well conditioned in
float64, else the float64 determinant lemma on the whitened factor.

- d tiny on a few rows (|W|^2 = |D^-1 U|^2 up to 4e13 in float32): the capacitance's Gram
  used to fail its Cholesky (LinAlgError; NaN under JAX) from |W|^2 ~ 1e8 on, although
  Sigma itself is well conditioned. log det, log_prob, solve and KL to N(0, I) are now
  accurate to a few hundred eps per parameter.
- the benchmark's stress case (W = Q diag(w) R, |W|^2 = 1e8, cond(Sigma) ~ 4e8).
- exact zeros of d: 1..rank zeros give a regular Sigma (U generic) and finite, correct
  values; more than rank zeros or a zero row give -inf / +inf, never NaN. Eagerly,
  under ``jax.jit`` and through torch autograd.
- log_prob factorises the r x r capacitance once (two Choleskys, the two passes of
  ``prepare``), and solves with it without another factorisation.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import structcov as sc
import structcov._linalg as linalg
import structcov.functional as F
from conftest import Backend
from test_numerics import SHAPES, SMALL, Pair, dense_kl, eps, num_params, scalar

P = num_params(SHAPES)  # 400


def log_prob64(pair: Pair, x: np.ndarray) -> np.ndarray:
    """log N(x; mean, Sigma) per row of x (B, P) in float64, Sigma never inverted: the
    quadratic form as the least-squares residual min_a |D^-1 (c - U a)|^2 + |a|^2 of the
    stacked [D^-1 U; I] (LAPACK's SVD solver), the log det from `logdet_qr64`. The dense
    solve and slogdet lose eps64 cond(Sigma) ~ 1e-4 with more tiny d than the rank."""
    nonzero = pair.d != 0
    assert np.all(nonzero), "zeros of d: use the dense formula (Sigma is regular)"
    stacked = np.concatenate([pair.u / pair.d[:, None], np.eye(pair.u.shape[1])])
    out = []
    for c in x - pair.mean:
        rhs = np.concatenate([c / pair.d, np.zeros(pair.u.shape[1])])
        a = np.linalg.lstsq(stacked, rhs, rcond=None)[0]
        quadratic = np.sum((rhs - stacked @ a) ** 2)
        out.append(-0.5 * (x.shape[1] * math.log(2 * math.pi) + logdet_qr64(pair) + quadratic))
    return np.array(out)


def dense_log_prob(pair: Pair, x: np.ndarray) -> np.ndarray:
    """log N(x; mean, Sigma) per row of x (B, P), dense float64 (a regular, well
    conditioned Sigma)."""
    sigma = pair.sigma
    c = x - pair.mean
    quadratic = np.einsum("bi,bi->b", c, np.linalg.solve(sigma, c.T).T)
    return -0.5 * (x.shape[1] * math.log(2 * math.pi) + np.linalg.slogdet(sigma)[1] + quadratic)


def dense_kl_to_normal(pair: Pair) -> float:
    """KL(N(m, Sigma) || N(0, I)) in float64 from the eigenvalues of the dense Sigma."""
    lam = np.linalg.eigvalsh(pair.sigma)
    return float(0.5 * (np.sum(lam - 1.0 - np.log(lam)) + pair.mean @ pair.mean))


def sample(rng: np.random.Generator, pair: Pair, n: int) -> np.ndarray:
    """n float64 draws of N(mean, Sigma) from the stored U and d."""
    rank = pair.u.shape[1]
    return (
        pair.mean
        + rng.standard_normal((n, rank)) @ pair.u.T
        + rng.standard_normal((n, pair.d.shape[0])) * pair.d
    )


def logdet_qr64(pair: Pair) -> float:
    """log det Sigma in float64 without squaring W: the determinant lemma with log det C
    from the R of a Householder QR of the stacked [W; I] (R^T R = C), rows sorted by
    norm, largest first (row-wise stable for graded rows). Accurate to about
    eps64 cond(W), where the float64 Gram (`Pair.logdet64`) loses eps64 |W|^2 and the
    dense slogdet eps64 cond(Sigma)."""
    w = pair.u / pair.d[:, None]
    stacked = np.concatenate([w, np.eye(w.shape[1])])
    stacked = stacked[np.argsort(-np.linalg.norm(stacked, axis=1))]
    r = np.linalg.qr(stacked, mode="r")
    return float(2.0 * np.sum(np.log(np.abs(pair.d))) + 2.0 * np.sum(np.log(np.abs(np.diag(r)))))


def cond_w(pair: Pair) -> float:
    """sqrt(1 + |W|^2), W = D^-1 U over the non-zero d: the condition number of the
    stacked [W; I] whose factor the capacitance is (zeros of d enter at |W|^2 ~ c / eps)."""
    nonzero = pair.d != 0
    w = pair.u[nonzero] / pair.d[nonzero, None]
    return math.sqrt(1.0 + np.linalg.norm(w, 2) ** 2)


def check_solve(backend: Backend, pair: Pair, b: Any, factor: float = 1.0) -> None:
    """Sigma^-1 b = (b - U a) / d^2 with a = U^T Sigma^-1 b: the capacitance's part, a,
    is checked through |d^2 (x_hat - x)| = |U (a - a_hat)| + rounding <= c eps (|b| +
    |U| |a|). Entries where d is tiny or 0 are not accurate in themselves (the rounding of
    b_i - u_i a, eps |b_i|, is divided by d_i^2): a limit of the Woodbury solve, not
    of the capacitance. a itself is accurate to eps ``factor`` (cond(W) for tiny d)."""
    b64 = backend.to_numpy(b)
    solved = backend.to_numpy(pair.cov.solve(b))
    exact = np.linalg.solve(pair.sigma, b64.T).T
    assert np.all(np.isfinite(solved))
    error = np.linalg.norm((solved - exact) * pair.d**2, axis=-1)
    scale = np.linalg.norm(b64, axis=-1) + np.linalg.norm(pair.u, 2) * np.linalg.norm(
        exact @ pair.u, axis=-1
    )
    assert np.all(error <= 100 * eps(pair.dtype) * factor * scale), error / scale


# ------------------------------------------------------------- d tiny on a few rows
def graded(seed: int, rank: int, tiny: float, count: int) -> tuple[np.ndarray, np.ndarray]:
    """U ~ N(0, 1) (P x rank), d = 1 except ``count`` rows where d = ``tiny``."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((P, rank))
    d = np.ones(P)
    d[rng.choice(P, count, replace=False)] = tiny
    return u, d


@pytest.mark.parametrize("tiny", [1e-4, 1e-6])
@pytest.mark.parametrize("count", [1, 4, 6])
def test_tiny_d_on_a_few_rows(backend: Backend, dtype: str, tiny: float, count: int) -> None:
    """|W|^2 = |u_i|^2 / d_i^2 up to 4e13 on ``count`` rows (fewer, as many or more than
    the rank 4), Sigma well conditioned: the Gram's Cholesky failed here in float32.

    Measured (NumPy, float32): log det within 3e-5 absolute (sum of 400 logs), KL to
    N(0, I) within 1e-5 relative; bounds 100 eps P and 1e3 eps relative. log_prob and
    solve at float32 inputs are limited by the data: a coordinate with d_i = 1e-6 and
    |x_i| ~ 3 is known to eps |x_i| / d_i ~ 0.4 sigma (measured: 7e-3 nats for one such
    row, 0.1 for six), so their bounds are eps cond(W) per tiny row.
    """
    u, d = graded(count, 4, tiny, count)
    rng = np.random.default_rng(10 + count)
    mean = rng.standard_normal(P)
    pair = Pair(backend, dtype, SHAPES, u, d, mean)
    e = eps(dtype)

    # Oracle: the float64 lemma on a QR of [W; I] (the float64 Gram squares |W| ~ 2e6 and
    # is off by 1e-3; with more tiny rows than the rank, cond(Sigma) ~ 1e12 spoils the
    # dense slogdet as well).
    expected = logdet_qr64(pair)
    kappa = cond_w(pair)
    logdet = scalar(backend, pair.cov.logdet())
    assert abs(logdet - expected) <= e * (100 * P + 10 * kappa), (logdet, expected)

    x = backend.asarray(sample(rng, pair, 4), dtype)
    x64 = backend.to_numpy(x)
    got = backend.to_numpy(pair.param.log_prob(pair.cov.unflatten(x)))
    np.testing.assert_allclose(
        got, log_prob64(pair, x64), rtol=0, atol=e * (kappa * count + 100 * P)
    )

    if count <= 4:  # else cond(Sigma) ~ 1e12 and the dense float64 solve is no oracle
        check_solve(backend, pair, backend.asarray(rng.standard_normal((3, P)), dtype), kappa)

    kl = scalar(backend, sc.kl_divergence(pair.param, sc.normal_prior(pair.param)))
    reference = 0.5 * (np.sum(pair.u**2) + np.sum(pair.d**2) - P - expected + mean @ mean)
    assert math.isclose(kl, reference, rel_tol=1e3 * e), (kl, reference)


def orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stress_whitened_factor_of_norm_1e8(backend: Backend, dtype: str, seed: int) -> None:
    """benchmarks/accuracy.py's stress case: d^2 = 1e-6 [1, 10], W = Q diag(w) R with w^2
    over [1, 1e8] (both ends present): |W|^2 = 1e8, cond(Sigma) ~ 4e8, beyond a float32
    Gram. log det and KL to N(0, I) against the float64 determinant lemma.

    Measured (float32, P = 48 in the benchmark): log det 7 / 27 eps per parameter
    (median / max); bound 300 eps per parameter.
    """
    rng = np.random.default_rng(seed)
    rank = 4
    w2 = np.exp(rng.uniform(0.0, math.log(1e8), rank))
    w2[:2] = (1.0, 1e8)
    w = (orthogonal(rng, P)[:, :rank] * np.sqrt(w2)) @ orthogonal(rng, rank)
    d = np.sqrt(1e-6 * np.exp(rng.uniform(0.0, math.log(10.0), P)))
    pair = Pair(backend, dtype, SHAPES, d[:, None] * w, d)
    e = eps(dtype)
    logdet = scalar(backend, pair.cov.logdet())
    expected = logdet_qr64(pair)
    assert abs(logdet - expected) <= 300 * e * P, (logdet, expected)
    entropy = scalar(backend, pair.param.entropy())
    assert abs(entropy - 0.5 * (P * (1.0 + math.log(2 * math.pi)) + expected)) <= 300 * e * P
    # KL to N(0, I): 0.5 (tr Sigma - P - log det Sigma + |m|^2), tr Sigma exact in float64.
    kl = scalar(backend, sc.kl_divergence(pair.param, sc.normal_prior(pair.param)))
    reference = 0.5 * (np.sum(pair.u**2) + np.sum(pair.d**2) - P - expected)
    assert math.isclose(kl, reference, rel_tol=100 * e), (kl, reference)


# ------------------------------------------------------------- exact zeros of d
def with_zeros(seed: int, count: int, rank: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """U ~ N(0, 1) (generic: Sigma regular for count <= rank), d in [0.5, 2] with
    ``count`` exact zeros (spread over both names)."""
    rng = np.random.default_rng(100 + seed)
    u = rng.standard_normal((P, rank))
    d = rng.uniform(0.5, 2.0, P)
    d[rng.choice(P, count, replace=False)] = 0.0
    return u, d


@pytest.mark.parametrize("count", [1, 2, 4])
def test_zero_d_with_a_regular_sigma_is_finite_and_correct(
    backend: Backend, dtype: str, count: int
) -> None:
    """1..rank exact zeros of d, U generic: Sigma is regular, and log det, entropy,
    log_prob, solve, KL to N(0, I), KL to a regular LRPD and KL(q || q) are finite and
    match the dense float64 oracle (which needs no whitening: Sigma is well conditioned).

    Measured (NumPy, float32): log det within 2e-5, log_prob 1e-6 relative; bounds
    100 eps P per zero absolute and 1e3 eps relative.
    """
    u, d = with_zeros(count, count)
    rng = np.random.default_rng(count)
    mean = rng.standard_normal(P)
    q = Pair(backend, dtype, SHAPES, u, d, mean)
    e = eps(dtype)
    expected = np.linalg.slogdet(q.sigma)[1]

    # the zeros read as d' move log det by about eps per zero (and per eigenvalue)
    bound = 100 * e * P * count
    logdet = scalar(backend, q.cov.logdet())
    assert math.isfinite(logdet) and abs(logdet - expected) <= bound, (logdet, expected)
    entropy = scalar(backend, q.param.entropy())
    assert abs(entropy - 0.5 * (P * (1.0 + math.log(2 * math.pi)) + expected)) <= bound

    x = backend.asarray(sample(rng, q, 3), dtype)
    got = backend.to_numpy(q.param.log_prob(q.cov.unflatten(x)))
    want = dense_log_prob(q, backend.to_numpy(x))
    np.testing.assert_allclose(got, want, rtol=1e3 * e, atol=100 * e * P)

    # the zeros enter as rows with |w_i|^2 ~ c / eps: cond(W) ~ 1 / sqrt(eps)
    check_solve(backend, q, backend.asarray(rng.standard_normal((2, P)), dtype), e**-0.5)

    kl_prior = scalar(backend, sc.kl_divergence(q.param, sc.normal_prior(q.param)))
    assert math.isclose(kl_prior, dense_kl_to_normal(q), rel_tol=1e3 * e * count), kl_prior

    u_p, d_p = with_zeros(50 + count, 0)
    p = Pair(backend, dtype, SHAPES, u_p, d_p, rng.standard_normal(P))
    kl = scalar(backend, sc.kl_divergence(q.param, p.param))
    assert math.isclose(kl, dense_kl(q, p), rel_tol=1e3 * e * count), (kl, dense_kl(q, p))
    # q's zeros against the same zeros in p: exactly 0 for the same storage.
    assert scalar(backend, sc.kl_divergence(q.param, q.param)) == 0.0


def test_zero_d_of_p_where_q_has_variance_is_exact(backend: Backend, dtype: str) -> None:
    """KL(q || p) with exact zeros of d_p where q's own d is not 0: Sigma_p is regular and
    the zeros are read exactly (p without them, plus their Schur complement), so the KL
    is the dense one; through d' the Woodbury trace terms there were rounding noise.
    Tolerance 1e4 eps: the dense float64 formula is itself only good to ~5e-13 here
    (cond Sigma_p = 1.4e5)."""
    u, d = with_zeros(7, 2)
    p = Pair(backend, dtype, SHAPES, u, d)
    u_q, d_q = with_zeros(8, 0)
    e = eps(dtype)
    for q in (Pair(backend, dtype, SHAPES, u_q, d_q), Pair(backend, dtype, SHAPES, None, d_q)):
        kl = scalar(backend, sc.kl_divergence(q.param, p.param))
        assert math.isclose(kl, dense_kl(q, p), rel_tol=1e4 * e), (kl, dense_kl(q, p))


SINGULAR = {
    "all zero": lambda u, d: (u, np.zeros_like(d)),
    "rank + 1 zeros": lambda u, d: (u, np.where(np.arange(P) % 80 == 3, 0.0, d)),  # 5 zeros
    "a zero row": lambda u, d: (np.where((np.arange(P) == 7)[:, None], 0.0, u), _zero(d, 7)),
}


def _zero(d: np.ndarray, index: int) -> np.ndarray:
    out = d.copy()
    out[index] = 0.0
    return out


@pytest.mark.parametrize("label", list(SINGULAR))
def test_zero_d_with_a_singular_sigma_is_infinite(backend: Backend, dtype: str, label: str) -> None:
    """More than rank zeros, all zero, or a zero row: -inf log det and entropy, +inf KL
    to N(0, I) (LRPD-diagonal pair) and to a regular LRPD, and +inf for a regular q
    against it (LRPD pair)."""
    u, d = SINGULAR[label](*with_zeros(3, 0))
    q = Pair(backend, dtype, SHAPES, u, d)
    assert scalar(backend, q.cov.logdet()) == -math.inf
    assert scalar(backend, q.param.entropy()) == -math.inf
    assert scalar(backend, sc.kl_divergence(q.param, sc.normal_prior(q.param))) == math.inf
    p = Pair(backend, dtype, SHAPES, *with_zeros(4, 0))
    assert scalar(backend, sc.kl_divergence(q.param, p.param)) == math.inf
    # A singular p against a regular q: +inf.
    assert scalar(backend, sc.kl_divergence(p.param, q.param)) == math.inf


# ------------------------------------------------------------- jit and autograd
@pytest.fixture
def jax_backend(backend: Backend) -> Backend:
    if backend.name != "jax":
        pytest.skip("jax.jit runs on the jax backend only")
    return backend


@pytest.mark.parametrize("case", ["two d = 1e-6", "two zeros", "five zeros"])
def test_zero_d_and_tiny_d_under_jit(jax_backend: Backend, dtype: str, case: str) -> None:
    """logdet, entropy, log_prob and KL to N(0, I) jitted equal the eager values and the
    oracle: finite for two rows with d = 1e-6 or two zeros, -inf / +inf for five zeros
    (more than the rank; log_prob is not compared there: no density exists). No NaN."""
    import jax

    backend = jax_backend
    count = {"two d = 1e-6": 0, "two zeros": 2, "five zeros": 5}[case]
    u, d = with_zeros(20 + count, count)
    if count == 0:
        d[[11, 222]] = 1e-6
    q = Pair(backend, dtype, SHAPES, u, d)
    structure, storage = q.cov.structure, q.cov.storage()
    prior = sc.normal_prior(q.param)
    p_structure, p_storage = prior.cov.structure, prior.cov.storage()
    x = backend.asarray(sample(np.random.default_rng(0), q, 2), dtype)
    value = q.cov.unflatten(x)

    def run(storage: dict, p_storage: dict, mean: dict, value: dict) -> tuple:
        return (
            F.logdet(structure, storage),
            F.entropy(structure, storage),
            F.kl_divergence((structure, storage, mean), (p_structure, p_storage, mean)),
            F.log_prob(structure, storage, mean, value),
        )

    e = eps(dtype)
    eager = [backend.to_numpy(v) for v in run(storage, p_storage, q.means, value)]
    jitted = [backend.to_numpy(v) for v in jax.jit(run)(storage, p_storage, q.means, value)]
    for a, b in zip(eager[:3], jitted[:3], strict=True):
        assert not np.isnan(a) and not np.isnan(b)
        np.testing.assert_allclose(b, a, rtol=100 * e)
    if count > 4:
        assert eager[0] == -math.inf and eager[2] == math.inf
        return
    expected = logdet_qr64(q) if count == 0 else np.linalg.slogdet(q.sigma)[1]
    assert abs(float(eager[0]) - expected) <= 100 * e * P * max(count, 1)
    # log_prob at float32 inputs: eps cond(W) per tiny row (see test_tiny_d_on_a_few_rows)
    reference = log_prob64(q, backend.to_numpy(x)) if count == 0 else None
    if reference is None:
        reference = dense_log_prob(q, backend.to_numpy(x))
    bound = e * (2 * (cond_w(q) if count == 0 else e**-0.5) + 100 * P)
    for got in (eager[3], jitted[3]):
        np.testing.assert_allclose(got, reference, rtol=0, atol=bound)


@pytest.mark.parametrize("count", [2, 5])
def test_zero_d_through_torch_autograd(backend: Backend, count: int) -> None:
    """torch: values with requires_grad storage are finite (2 zeros) or -inf / +inf
    (5 > rank zeros), and backward runs (the gradients may be inf or NaN at d = 0)."""
    if backend.name != "torch":
        pytest.skip("torch autograd runs on the torch backend only")
    u, d = with_zeros(30 + count, count)
    q = Pair(backend, "float32", SHAPES, u, d)
    storage = {k: v.clone().requires_grad_(True) for k, v in q.cov.storage().items()}
    structure = q.cov.structure
    prior = sc.normal_prior(q.param)
    logdet = F.logdet(structure, storage)
    kl = F.kl_divergence(
        (structure, storage, q.means), (prior.cov.structure, prior.cov.storage(), q.means)
    )
    (logdet + kl).backward()
    logdet_value, kl_value = float(logdet.detach()), float(kl.detach())
    if count <= 4:
        assert math.isfinite(logdet_value) and math.isfinite(kl_value)
        expected = np.linalg.slogdet(q.sigma)[1]
        assert abs(logdet_value - expected) <= 100 * eps("float32") * P * count
    else:
        assert logdet_value == -math.inf and kl_value == math.inf
    assert all(v.grad is not None for v in storage.values())


# ------------------------------------------------------------- one setup per density
def test_log_prob_factorises_the_capacitance_once(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """log_prob = one ``prepare`` (two Choleskys: the two passes, two r x r triangular
    inverses) shared by the log det and the quadratic form: no LU of the capacitance
    per solve, no second capacitance for the log det."""
    calls = {"cholesky": 0, "solve": 0}
    for name in calls:
        original = getattr(linalg, name)

        def counted(*args: Any, _name: str = name, _original: Any = original) -> Any:
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(linalg, name, counted)
    u, d = graded(0, 4, 1e-3, 2)
    pair = Pair(backend, "float64", SMALL, u[:15], d[:15])
    x = backend.asarray(np.linspace(-1.0, 1.0, 45).reshape(3, 15), "float64")
    pair.param.log_prob(pair.cov.unflatten(x))
    assert calls == {"cholesky": 2, "solve": 2}, calls


def test_a_zero_row_of_u_with_positive_d_has_finite_gradients(backend: Backend) -> None:
    """Training regression (digits, torch float32, step 915): the KL drives the U rows of
    always-zero input pixels to 0; with d > 0 every value and every gradient stays finite."""
    if backend.name not in ("torch", "jax"):
        pytest.skip("gradients are checked with torch autograd and jax.grad")
    u, d = with_zeros(30, 0)
    u = np.array(u)
    u[:3] = 0.0  # three rows of U exactly zero, every d > 0
    q = Pair(backend, "float32", SHAPES, u, d)
    structure, means = q.cov.structure, q.means
    prior = sc.normal_prior(q.param)
    p_parts = (prior.cov.structure, prior.cov.storage(), means)

    def loss(storage: Any) -> Any:
        logdet = F.logdet(structure, storage)
        return logdet + F.kl_divergence((structure, storage, means), p_parts)

    if backend.name == "torch":
        storage = {k: v.clone().requires_grad_(True) for k, v in q.cov.storage().items()}
        value = loss(storage)
        value.backward()
        grads = {k: v.grad.numpy() for k, v in storage.items()}
        value = float(value.detach())
    else:
        import jax

        value, raw = jax.value_and_grad(loss)(dict(q.cov.storage()))
        grads = {k: np.asarray(v) for k, v in raw.items()}
        value = float(value)
    assert math.isfinite(value)
    for path, grad in grads.items():
        assert np.all(np.isfinite(grad)), path
