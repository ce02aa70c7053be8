"""KL(q || p) against a low rank plus diagonal p whose d has exact zeros where q has variance.

Sigma_p = U U^T + diag(d^2) with 1..rank exact zeros of d and U's rows there generic is
regular, and the KL is finite. It used to be NaN on purpose (the Woodbury trace term
(1 - w_i C^-1 w_i^T) / d_i'^2 with d' a tiny stand-in for 0 is pure rounding); it is
now computed through the block inverse at the zeros (their Schur complement). Checked
here against a dense float64 closed form written from the stored arrays alone (q's
dense Sigma from the repository's oracle, tests/oracle.py), for every q kind, plus:
KL(q || q) = 0 with zeros, more than rank zeros (+inf), NaN storage (NaN), JAX under
``jax.jit``, and torch gradients (finite, equal to a float64 central difference).

Measured errors against the oracle (NumPy; the largest over counts 1..3 and q kinds):
float64 6e-15 relative, float32 2e-6 (torch 6e-7); bounds 1e-8 and 1e-3.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import structcov as sc
import structcov.functional as F
from cases import well_conditioned
from conftest import Backend
from oracle import dense_oracle, flat_layout, join
from test_numerics import split_np

SHAPES = {"weight": (4, 5), "bias": (4,)}
P = flat_layout(SHAPES).num_params  # 24
RANK = 3
#: Flat positions of the zeros of d_p (weight and bias), by count.
ZEROS = {1: [7], 2: [2, 21], 3: [0, 13, 23], 4: [1, 9, 17, 22]}
Q_KINDS = ("diagonal", "lrpd-equal", "lrpd-lower", "dense", "kronecker")
RTOL = {"float64": 1e-8, "float32": 1e-3}


def split_flat(flat: np.ndarray) -> dict[str, np.ndarray]:
    return split_np(flat, SHAPES)


class Gaussian:
    """A GaussianParameter on the backend and its float64 dense (mean, Sigma) as stored."""

    def __init__(
        self,
        backend: Backend,
        dtype: str,
        cov: Any,
        mean: np.ndarray,
        storage: Callable[[Any], dict[str, np.ndarray]],
    ) -> None:
        """``storage(cov)``: float64 storage by path, once ``cov`` is laid out."""
        means = {n: backend.asarray(v, dtype) for n, v in split_flat(mean).items()}
        self.param = sc.GaussianParameter(means, cov)
        cov.load_storage({k: backend.asarray(v, dtype) for k, v in storage(cov).items()})
        oracle = dense_oracle(cov, means, backend.to_numpy)
        self.sigma = oracle.Sigma
        self.mean = join({n: backend.to_numpy(v) for n, v in means.items()}, oracle.layout)
        self.backend, self.dtype = backend, dtype

    @property
    def parts(self) -> tuple[Any, Any, Any]:
        """(structure, storage, mean) for `structcov.functional`."""
        return (self.param.cov.structure, self.param.cov.storage(), dict(self.param.mean))


def lrpd(
    backend: Backend,
    dtype: str,
    seed: int,
    rank: int = RANK,
    zeros: list[int] | None = None,
    transform: str = "identity",
) -> Gaussian:
    """Sigma = U U^T + diag(d^2), U ~ N(0, 0.5^2) (generic), d in [0.5, 1.5] with exact
    zeros at ``zeros`` (the raw scale that the transform maps to 0)."""
    rng = np.random.default_rng([seed, 31])
    u = 0.5 * rng.standard_normal((P, rank))
    d = rng.uniform(0.5, 1.5, P)
    raw = d if transform == "identity" else d + np.log(-np.expm1(-d))  # softplus^-1
    raw[zeros or []] = 0.0 if transform == "identity" else -math.inf
    storage = {}
    for name, block in split_flat(u).items():
        storage[f"factor.{name}"] = block
    for name, block in split_flat(raw).items():
        storage[f"scale.{name}"] = block
    cov = sc.LowRankPlusDiagonalCovariance(rank, scale_transform=transform)
    return Gaussian(backend, dtype, cov, rng.standard_normal(P), lambda _: storage)


def make_q(backend: Backend, dtype: str, kind: str, seed: int = 5) -> Gaussian:
    if kind == "lrpd-equal":
        return lrpd(backend, dtype, seed)
    if kind == "lrpd-lower":
        return lrpd(backend, dtype, seed, rank=RANK - 1)
    cov = {
        "diagonal": lambda: sc.DiagonalCovariance(),
        "dense": lambda: sc.FactorizedCovariance(),
        "lowrank": lambda: sc.LowRankCovariance(2),
        "kronecker": lambda: sc.KroneckerCovariance(),
    }[kind]()
    rng = np.random.default_rng([seed, 32])
    mean = rng.standard_normal(P)
    return Gaussian(
        backend, dtype, cov, mean, lambda laid: well_conditioned(laid, split_flat(mean), rng)
    )


def dense_kl(q: Gaussian, p: Gaussian) -> float:
    """0.5 (tr(Sigma_p^-1 Sigma_q) + delta^T Sigma_p^-1 delta - P + log det Sigma_p
    - log det Sigma_q) in float64 from the dense matrices."""
    delta = p.mean - q.mean
    _, logdet_p = np.linalg.slogdet(p.sigma)
    _, logdet_q = np.linalg.slogdet(q.sigma)
    trace = np.trace(np.linalg.solve(p.sigma, q.sigma))
    return float(0.5 * (trace + delta @ np.linalg.solve(p.sigma, delta) - P + logdet_p - logdet_q))


def value(backend: Backend, array: Any) -> float:
    return float(backend.to_numpy(array))


# ------------------------------------------------------------------------- values


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("q_kind", Q_KINDS)
def test_zeros_of_p_where_q_has_variance_match_dense(
    backend: Backend, dtype: str, q_kind: str, count: int
) -> None:
    """1, 2 and rank zeros of d_p (spread over both names), every q kind: finite and
    equal to the dense float64 KL (measured float64 <= 6e-15, float32 <= 2e-6 relative)."""
    p = lrpd(backend, dtype, 1, zeros=ZEROS[count])
    q = make_q(backend, dtype, q_kind)
    assert np.linalg.matrix_rank(p.sigma) == P  # regular: the KL is finite
    kl = sc.kl_divergence(q.param, p.param)
    assert tuple(kl.shape) == ()
    assert kl.dtype == getattr(backend.xp, dtype)
    got, expected = value(backend, kl), dense_kl(q, p)
    assert math.isfinite(got)
    assert got == pytest.approx(expected, rel=RTOL[dtype]), (got, expected)


@pytest.mark.parametrize("q_kind", ["lrpd-equal", "diagonal", "kronecker"])
def test_zeros_under_the_softplus_transform(backend: Backend, dtype: str, q_kind: str) -> None:
    """d = softplus(-inf) = 0 exactly: the same values as the identity transform."""
    p = lrpd(backend, dtype, 2, zeros=ZEROS[2], transform="softplus")
    q = make_q(backend, dtype, q_kind)
    got, expected = value(backend, sc.kl_divergence(q.param, p.param)), dense_kl(q, p)
    assert got == pytest.approx(expected, rel=RTOL[dtype]), (got, expected)


def test_zeros_of_q_meeting_some_zeros_of_p(backend: Backend, dtype: str) -> None:
    """d_q = 0 at one zero of d_p and not at the other (q regular, U_q generic): every zero
    of d_p is then computed through the block inverse, q's own zeros through d'."""
    p = lrpd(backend, dtype, 3, zeros=[2, 21])
    q = lrpd(backend, dtype, 4, zeros=[2, 10])
    got, expected = value(backend, sc.kl_divergence(q.param, p.param)), dense_kl(q, p)
    assert got == pytest.approx(expected, rel=RTOL[dtype]), (got, expected)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_kl_to_itself_and_a_copy_with_zeros_is_zero(
    backend: Backend, dtype: str, count: int
) -> None:
    """KL(q || q) and KL(q || copy) with exact zeros of d: exactly 0 (the identical pair
    is read through d'); a q one rounding away from p: the dense value, never below
    -tiny."""
    p = lrpd(backend, dtype, 6, zeros=ZEROS[count])
    copy = lrpd(backend, dtype, 6, zeros=ZEROS[count])
    for other in (p, copy):
        assert value(backend, sc.kl_divergence(p.param, other.param)) == 0.0
    storage = {k: backend.to_numpy(v).copy() for k, v in copy.param.cov.storage().items()}
    storage["factor.weight"].reshape(-1)[4] *= 1.0 + 4 * float(np.finfo(dtype).eps)
    copy.param.cov.load_storage({k: backend.asarray(v, dtype) for k, v in storage.items()})
    copy.sigma = np.concatenate([storage[f"factor.{n}"].reshape(-1, RANK) for n in SHAPES])
    copy.sigma = copy.sigma @ copy.sigma.T + np.diag(
        np.concatenate([storage[f"scale.{n}"].reshape(-1) for n in SHAPES]) ** 2
    )
    copy.mean = p.mean
    got = value(backend, sc.kl_divergence(copy.param, p.param))
    tiny = 100 * float(np.finfo(dtype).eps) * P
    assert abs(got - dense_kl(copy, p)) <= tiny, (got, dense_kl(copy, p))


@pytest.mark.parametrize("u_q", ["same U", "other U"])
def test_zeros_of_q_at_the_zeros_of_p(backend: Backend, dtype: str, u_q: str) -> None:
    """d_q = 0 exactly where d_p = 0, q otherwise different (d, and U or not): the dense
    value (the d' reading alone was 1e-3 off in float64 with the same U)."""
    p = lrpd(backend, dtype, 13, zeros=ZEROS[2])
    q = lrpd(backend, dtype, 13 if u_q == "same U" else 14, zeros=ZEROS[2])
    storage = {k: backend.to_numpy(v).copy() for k, v in q.param.cov.storage().items()}
    for name in SHAPES:
        scale = storage[f"scale.{name}"]
        storage[f"scale.{name}"] = np.where(scale == 0, 0.0, 1.3 * scale)
    q.param.cov.load_storage({k: backend.asarray(v, dtype) for k, v in storage.items()})
    u = np.concatenate([storage[f"factor.{n}"].reshape(-1, RANK) for n in SHAPES])
    d = np.concatenate([storage[f"scale.{n}"].reshape(-1) for n in SHAPES])
    q.sigma = u @ u.T + np.diag(d**2)
    got, expected = value(backend, sc.kl_divergence(q.param, p.param)), dense_kl(q, p)
    assert got == pytest.approx(expected, rel=RTOL[dtype]), (got, expected)


# -------------------------------------------------------------------------- edges


@pytest.mark.parametrize("q_kind", Q_KINDS)
def test_more_zeros_than_the_rank_is_inf(backend: Backend, dtype: str, q_kind: str) -> None:
    p = lrpd(backend, dtype, 8, zeros=ZEROS[RANK + 1])
    q = make_q(backend, dtype, q_kind)
    assert value(backend, sc.kl_divergence(q.param, p.param)) == math.inf


def test_a_singular_q_against_zeros_is_inf(backend: Backend, dtype: str) -> None:
    p = lrpd(backend, dtype, 9, zeros=ZEROS[2])
    q = make_q(backend, dtype, "lowrank")
    assert value(backend, sc.kl_divergence(q.param, p.param)) == math.inf


@pytest.mark.parametrize("where", ["d", "u", "q"])
@pytest.mark.parametrize("q_kind", ["lrpd-equal", "diagonal", "kronecker"])
def test_nan_storage_gives_nan(backend: Backend, dtype: str, q_kind: str, where: str) -> None:
    """A NaN in p's d or U (with zeros of d elsewhere) or in q's storage: NaN, not a number
    (or, on torch and dask, the error their factorisations raise on NaN, as before)."""
    p = lrpd(backend, dtype, 10, zeros=ZEROS[2])
    q = make_q(backend, dtype, q_kind)
    target = q if where == "q" else p
    storage = {k: backend.to_numpy(v).copy() for k, v in target.param.cov.storage().items()}
    path = {"d": "scale.weight", "u": "factor.weight"}.get(where, sorted(storage)[0])
    storage[path].reshape(-1)[1] = math.nan
    target.param.cov.load_storage({k: backend.asarray(v, dtype) for k, v in storage.items()})
    if backend.name in ("torch", "dask"):
        # torch's Cholesky and dask's LU (SciPy, check_finite) raise on NaN: `prepare`'s
        # factorisations, as before the zeros were computed.
        raised: tuple[type[BaseException], ...] = (ValueError,)
        if backend.name == "torch":
            import torch

            raised = (torch.linalg.LinAlgError,)
        try:
            with np.errstate(invalid="ignore"):  # NumPy warns on NaN in logaddexp
                got = value(backend, sc.kl_divergence(q.param, p.param))
        except raised:
            return
        assert math.isnan(got)
        return
    with np.errstate(invalid="ignore"):
        assert math.isnan(value(backend, sc.kl_divergence(q.param, p.param)))


# ------------------------------------------------------------- jit and autograd


@pytest.mark.parametrize("count", [0, 2, 3, 4])
@pytest.mark.parametrize("q_kind", ["lrpd-equal", "diagonal", "kronecker"])
def test_under_jax_jit(backend: Backend, dtype: str, q_kind: str, count: int) -> None:
    """Jitted = eager = the dense value (0 zeros: the ordinary path; 4 > rank: +inf)."""
    if backend.name != "jax":
        pytest.skip("jax.jit runs on the jax backend only")
    import jax

    p = lrpd(backend, dtype, 11, zeros=ZEROS.get(count, []))
    q = make_q(backend, dtype, q_kind)
    (qs, q_storage, q_mean), (ps, p_storage, p_mean) = q.parts, p.parts

    def kl(q_storage: Any, q_mean: Any, p_storage: Any, p_mean: Any) -> Any:
        return F.kl_divergence((qs, q_storage, q_mean), (ps, p_storage, p_mean))

    args = (q_storage, q_mean, p_storage, p_mean)
    eager, jitted = value(backend, kl(*args)), value(backend, jax.jit(kl)(*args))
    if count > RANK:
        assert eager == jitted == math.inf
        return
    expected = dense_kl(q, p)
    assert eager == pytest.approx(expected, rel=RTOL[dtype])
    assert jitted == pytest.approx(eager, rel=100 * float(np.finfo(dtype).eps))


@pytest.mark.parametrize("count", [0, 2])
@pytest.mark.parametrize("q_kind", ["lrpd-equal", "diagonal", "kronecker"])
def test_torch_gradients(backend: Backend, q_kind: str, count: int) -> None:
    """torch float64: backward through KL(q || p) gives finite gradients for q's and p's
    storage, and p's factor gradient equals a central difference of the dense KL."""
    if backend.name != "torch":
        pytest.skip("torch autograd runs on the torch backend only")
    import torch

    p = lrpd(backend, "float64", 12, zeros=ZEROS.get(count, []))
    q = make_q(backend, "float64", q_kind)
    (qs, q_storage, q_mean), (ps, p_storage, p_mean) = q.parts, p.parts
    q_leaves = {k: v.detach().clone().requires_grad_(True) for k, v in q_storage.items()}
    p_leaves = {k: v.detach().clone().requires_grad_(True) for k, v in p_storage.items()}
    kl = F.kl_divergence((qs, q_leaves, q_mean), (ps, p_leaves, p_mean))
    kl.backward()
    for leaf in (*q_leaves.values(), *p_leaves.values()):
        assert leaf.grad is not None and bool(torch.isfinite(leaf.grad).all())
    # d KL / d U_p[i, k] by central differences of the dense formula (Sigma_p = U U^T + D^2)
    u = np.concatenate(
        [backend.to_numpy(p_storage[f"factor.{n}"]).reshape(-1, RANK) for n in SHAPES]
    )
    d = np.concatenate([backend.to_numpy(p_storage[f"scale.{n}"]).reshape(-1) for n in SHAPES])
    grad = np.concatenate(
        [backend.to_numpy(p_leaves[f"factor.{n}"].grad).reshape(-1, RANK) for n in SHAPES]
    )
    step = 1e-6
    for i, k in [(0, 0), (7, 1), (21, 2), (13, 0)]:
        values = []
        for sign in (1.0, -1.0):
            moved = u.copy()
            moved[i, k] += sign * step
            p.sigma = moved @ moved.T + np.diag(d**2)
            values.append(dense_kl(q, p))
        assert grad[i, k] == pytest.approx((values[0] - values[1]) / (2 * step), rel=1e-5, abs=1e-7)
