"""Property tests of every identity with the condition number drawn (the numerics issue).

Hypothesis draws the structure, the layer layout (``weight`` (d_out, *in_shape), a bias
present, absent or inserted first), the rank, the dtype, the scale transform, an overall
magnitude ``scale`` (1e-3 .. 1e3: Sigma scales with its square, so every identity is also
a scale-invariance check) and the condition number ``kappa``: log-uniform over
[1, 1e6] in float32 and [1, 1e12] in float64. Each structure's storage is *built* to
have that conditioning (`build_storage` states what is controlled):

- diagonal: standard deviations s = scale * sqrt(v), v log-uniform over [1, kappa] with
  both ends present, so cond(Sigma) = kappa exactly (P >= 2);
- dense factor (full rank): S = scale * Q diag(sqrt(v)) R, Q and R Haar-orthogonal,
  so cond(Sigma) = cond(S)^2 = kappa exactly;
- low rank plus diagonal: d^2 spans [1, sqrt(kappa)] and W = D^-1 U = Q diag(w) R with
  w^2 over [1, sqrt(kappa)], so cond(D^2) = |W|^2 = cond(W)^2 = sqrt(kappa) (rank >= 2),
  the capacitance C = I + W^T W has cond(C) <= 1 + sqrt(kappa), and
  cond(Sigma) <= cond(D^2) (1 + |W|^2) ~ kappa. The implementation works on d and W
  (determinant lemma, whitened Woodbury with refinement), so its tolerances use the
  measured |W|^2 / cond(C), not cond(Sigma), wherever that is what the maths loses;
- Kronecker (full ranks): S_out and S_in as the dense factor with cond(C_out) =
  kappa^t and cond(C_in) = kappa^(1 - t), t drawn, so cond(Sigma) = cond(C_out)
  cond(C_in) = kappa (a factor of size 1 has cond 1: the measured value is used);
  ``sample_scale`` drawn too;
- low rank (rank < P, singular): a Gaussian factor; only as q in the KL pairs (+inf).

The standard deviations are stored through the drawn ``scale_transform``
(``inverse_positive_array``); "softplus" is constructed without the argument, so the
default is what runs.

**The reference.** `tests/oracle.py` rebuilds S (P x K) and Sigma in float64 from the
stored arrays (cast to the tested dtype first, so the reference is exact for what is
stored). Every reference value here comes from the SVD of that *factor*: the
eigenvalues of Sigma are sigma_i(S)^2, log det Sigma = 2 sum log sigma_i,
x^T Sigma^-1 x = |diag(1/sigma) V^T x|^2, and KL(q||p) = 0.5 [sum(l - 1 - log l) +
|Sigma_p^-1/2 (m_p - m_q)|^2] with l the squared singular values of
Sigma_p^-1/2 S_q. The SVD's singular values carry absolute error ~eps64 |S|, i.e.
relative eps64 cond(S) = eps64 sqrt(cond Sigma) <= 2e-16 * 1e6 = 2e-10 at
kappa = 1e12, where ``np.linalg.eigvalsh(Sigma)`` / ``slogdet(Sigma)`` would be off by
~1e-4 in the smallest eigenvalue. That is small, but in float64 not small against the
library's own bounds (a log of the smallest eigenvalue moves by ~1e-13 absolute), so
each bound adds the reference's first-order error, computed from the same SVDs
(`Built.logdet_reference_error`, `Built.whiten_reference_error`, `kl_reference`);
in float32 it is negligible. mpmath is installed, but an arbitrary-precision SVD per
example is far too slow for 10^4 examples.

**Tolerances.** Each check is |got - reference| <= C * eps(dtype) * (size factor) *
(condition factor) * (magnitude of the terms), with C = `C` and the factors derived,
per identity and structure, from the algorithm the implementation uses (comments at
each bound). The condition factors are *measured* on the stored float64 arrays (SVDs of
factors, accurate as above), not taken from the requested kappa.

What these tests can catch: an operation whose error grows faster with the condition
number (or with the scale) than its algorithm should allow, e.g. forming S S^T before
a factorisation (error eps cond(Sigma) instead of eps cond(S)), a Woodbury difference
that cancels, a log of an underflowed square, a KL that is a difference of large
numbers. What they cannot catch: errors below the bounds (a bound of eps cond(Sigma) at
kappa = 1e6 in float32 is O(1) relative, so there the forward-error checks say only
"finite and roughly right"; the backward-error checks stay sharp), shapes other than
layer layouts (tests/covariances/test_properties.py draws those), nor non-finite edges
(tests/test_numerics.py).

Examples: the hypothesis profile's ``max_examples`` per test (the ``thorough`` profile:
>= 10^4 per identity, ``nox -s thorough``); eager JAX (a compile per new shape) and dask
(a graph per call) run a fifth, as in tests/covariances/test_properties.py.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import structcov as sc
from conftest import Backend
from oracle import dense_oracle, kronecker_factors
from structcov.covariances._structure import inverse_positive_array

#: Safety factor over every first-order bound below (the bounds' own constants are
#: stated at each one; C absorbs the O(1) constants of LU/QR/GEMM rounding analyses).
C = 8.0
#: Largest drawn condition number of Sigma per dtype (the issue: 1e6 / 1e12).
KAPPA_MAX = {"float32": 1e6, "float64": 1e12}
FULL_RANK_KINDS = ("diagonal", "factorized", "lowrank+diagonal", "kronecker")
Q_KINDS = (*FULL_RANK_KINDS, "lowrank")
P_KINDS = FULL_RANK_KINDS
PAIRS = [(q, p) for q in Q_KINDS for p in P_KINDS]
TRANSFORMS = ("softplus", "exp", "identity")
LOG_2PI = math.log(2.0 * math.pi)
#: The reference's own unit roundoff (float64 NumPy/LAPACK).
EPS64 = float(np.finfo(np.float64).eps)


def eps(dtype: str) -> float:
    return float(np.finfo(dtype).eps)


# ----------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    """One drawn covariance: structure, layout, rank, dtype and its conditioning."""

    kind: str
    spec: tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape) in insertion order
    rank: int  # low-rank part (lowrank, lowrank+diagonal); unused otherwise
    dtype: str
    kappa: float  # requested cond(Sigma) (see the module docstring per kind)
    split: float  # Kronecker: cond(C_out) = kappa ** split
    scale: float  # overall magnitude: Sigma ~ scale^2
    sample_scale: float  # Kronecker only
    transform: str  # diagonal, lowrank+diagonal
    seed: int

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.spec)

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.spec)

    def with_kind(self, kind: str, **changes: Any) -> Recipe:
        values = {**self.__dict__, "kind": kind, **changes}
        return Recipe(**values)


@st.composite
def layouts(draw: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """A layer layout: weight (d_out, *in_shape), bias absent / last / first."""
    weight = (
        draw(st.integers(1, 4)),
        *draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)),
    )
    spec: list[tuple[str, tuple[int, ...]]] = [("weight", weight)]
    bias = draw(st.sampled_from(["absent", "last", "first"]))
    if bias == "last":
        spec.append(("bias", (weight[0],)))
    elif bias == "first":
        spec.insert(0, ("bias", (weight[0],)))
    return tuple(spec)


#: Eager JAX compiles every operation anew per shape (seconds per drawn layout on a
#: 2-core machine; the default profile took > 20 minutes), so by default JAX runs one
#: layout (weight (3, 4) + bias) and rank 2, with everything else (kind, dtype, kappa,
#: scale, transform, values) still drawn. ``STRUCTCOV_JAX_FULL=1`` draws layouts on JAX too.
LIGHT_SPEC: tuple[tuple[str, tuple[int, ...]], ...] = (("weight", (3, 4)), ("bias", (3,)))


def light(backend: Backend) -> bool:
    return backend.name == "jax" and os.environ.get("STRUCTCOV_JAX_FULL", "") != "1"


@st.composite
def recipes(
    draw: Any,
    kinds: tuple[str, ...] = FULL_RANK_KINDS,
    dtype: str | None = None,
    spec: tuple[tuple[str, tuple[int, ...]], ...] | None = None,
    fixed_shapes: bool = False,
) -> Recipe:
    """A drawn recipe; ``fixed_shapes`` (light JAX): `LIGHT_SPEC` and rank 2."""
    kind = draw(st.sampled_from(kinds))
    dtype = dtype or draw(st.sampled_from(["float32", "float64"]))
    spec = spec or (LIGHT_SPEC if fixed_shapes else draw(layouts()))
    num_params = sum(math.prod(shape) for _, shape in spec)
    log_kappa = draw(st.floats(0.0, math.log10(KAPPA_MAX[dtype])))
    if fixed_shapes:
        rank = 2
    elif kind == "lowrank":
        rank = draw(st.integers(1, max(1, num_params - 1)))
    else:
        rank = draw(st.integers(1, num_params + 1))  # clamped to P by the structure
    return Recipe(
        kind=kind,
        spec=spec,
        rank=rank,
        dtype=dtype,
        kappa=10.0**log_kappa,
        split=draw(st.floats(0.0, 1.0)),
        scale=10.0 ** draw(st.floats(-3.0, 3.0)),
        sample_scale=draw(st.sampled_from([1.0, 0.5, 3.0])),
        transform=draw(st.sampled_from(TRANSFORMS)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


# ----------------------------------------------------------------------------- storage
def spread(rng: np.random.Generator, n: int, kappa: float) -> np.ndarray:
    """n values log-uniform over [1, kappa], both ends present (n >= 2), shuffled."""
    values = np.exp(rng.uniform(0.0, math.log(kappa), n))
    if n >= 2:
        values[:2] = (1.0, kappa)
    return rng.permutation(values)


def orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    """A Haar-distributed n x n orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def conditioned_square(rng: np.random.Generator, n: int, kappa: float) -> np.ndarray:
    """A square factor S with cond(S S^T) = kappa: Q diag(sqrt(v)) R, v over [1, kappa]."""
    return (orthogonal(rng, n) * np.sqrt(spread(rng, n, kappa))) @ orthogonal(rng, n)


def stored_scales(rng: np.random.Generator, std: np.ndarray, transform: str) -> np.ndarray:
    """The raw ``scale`` storing standard deviations ``std`` under ``transform``
    (the identity transform with random signs: only |s| may matter)."""
    if transform == "identity":
        return std * rng.choice([-1.0, 1.0], size=std.shape)
    return np.asarray(inverse_positive_array(np, std, transform))


def by_name(flat_rows: np.ndarray, spec: Any) -> dict[str, np.ndarray]:
    """Rows of a flat (P, ...) array as name -> (*shape, ...), in the flat order."""
    out, start = {}, 0
    for name, shape in spec:
        size = math.prod(shape)
        out[name] = flat_rows[start : start + size].reshape(*shape, *flat_rows.shape[1:])
        start += size
    return out


def build_storage(r: Recipe) -> dict[str, np.ndarray]:
    """float64 storage by path with the conditioning of the module docstring."""
    rng = np.random.default_rng([r.seed, 7])
    p = r.num_params
    out: dict[str, np.ndarray] = {}
    if r.kind == "diagonal":
        std = r.scale * np.sqrt(spread(rng, p, r.kappa))
        for name, value in by_name(stored_scales(rng, std, r.transform), r.spec).items():
            out[f"scale.{name}"] = value
    elif r.kind == "factorized":
        s = r.scale * conditioned_square(rng, p, r.kappa)
        out.update({f"factor.{n}": v for n, v in by_name(s, r.spec).items()})
    elif r.kind == "lowrank":
        s = r.scale * rng.standard_normal((p, r.rank))
        out.update({f"factor.{n}": v for n, v in by_name(s, r.spec).items()})
    elif r.kind == "lowrank+diagonal":
        rank = min(r.rank, p)
        root = math.sqrt(r.kappa)
        d = r.scale * np.sqrt(spread(rng, p, root))  # cond(D^2) = sqrt(kappa)
        w = (orthogonal(rng, p)[:, :rank] * np.sqrt(spread(rng, rank, root))) @ orthogonal(
            rng, rank
        )  # |W|^2 = cond(W)^2 = sqrt(kappa) for rank >= 2
        u = d[:, None] * w
        out.update({f"factor.{n}": v for n, v in by_name(u, r.spec).items()})
        scales = stored_scales(rng, d, r.transform)
        out.update({f"scale.{n}": v for n, v in by_name(scales, r.spec).items()})
    else:
        assert r.kind == "kronecker", r.kind
        shapes = r.shapes
        d_out, in_shape = shapes["weight"][0], shapes["weight"][1:]
        d_in = math.prod(in_shape)
        d_aug = d_in + int("bias" in shapes)
        root = math.sqrt(r.scale)  # Sigma ~ (root^2)^2 = scale^2
        out["output_factor"] = root * conditioned_square(rng, d_out, r.kappa**r.split)
        s_in = root * conditioned_square(rng, d_aug, r.kappa ** (1.0 - r.split))
        out["input_factor.weight"] = s_in[:d_in].reshape(*in_shape, d_aug)
        if "bias" in shapes:
            out["input_factor.bias"] = s_in[d_in:]
    return out


def make_covariance(r: Recipe) -> sc.FactorizedCovariance:
    transform = {} if r.transform == "softplus" else {"scale_transform": r.transform}
    if r.kind == "diagonal":
        return sc.DiagonalCovariance(**transform)
    if r.kind == "factorized":
        return sc.FactorizedCovariance()
    if r.kind == "lowrank":
        return sc.LowRankCovariance(r.rank)
    if r.kind == "lowrank+diagonal":
        return sc.LowRankPlusDiagonalCovariance(r.rank, **transform)
    return sc.KroneckerCovariance()


@dataclass
class Built:
    """A drawn parameter on the backend and its float64 reference pieces."""

    recipe: Recipe
    param: sc.GaussianParameter
    mean: np.ndarray  # (P,) flat, float64 of the stored values
    S: np.ndarray  # (P, K) from the oracle
    Sigma: np.ndarray  # (P, P) from the oracle
    sv: np.ndarray  # singular values of S, descending (P of them, zeros if singular)
    V: np.ndarray  # (P, P) left singular vectors of S

    @property
    def cov(self) -> Any:
        return self.param.cov

    @property
    def P(self) -> int:
        return self.S.shape[0]

    @property
    def K(self) -> int:
        return self.S.shape[1]

    @property
    def eigenvalues(self) -> np.ndarray:
        return self.sv**2

    @property
    def cond(self) -> float:
        """cond(Sigma) = (sigma_max / sigma_min)^2 of the factor (inf if singular)."""
        with np.errstate(divide="ignore"):
            return float((self.sv[0] / self.sv[-1]) ** 2) if self.sv[-1] > 0 else math.inf

    @property
    def logdet(self) -> float:
        return float(2.0 * np.sum(np.log(self.sv)))

    @property
    def logdet_reference_error(self) -> float:
        """Error bound of `logdet` (float64 SVD): sigma_i carries absolute error
        ~eps64 sigma_max (times a small multiple of P), so log sigma_i is off by
        eps64 sigma_max / sigma_i."""
        return float(2.0 * EPS64 * self.P * self.sv[0] * np.sum(1.0 / self.sv))

    def whiten_reference_error(self, x: np.ndarray, whitened_norm2: np.ndarray) -> np.ndarray:
        """Error bound of |whiten(x)|^2 (columns of x): V^T x carries absolute error
        ~eps64 |x| per component, divided by sigma_i <= sigma_min, so the square norm w
        is off by 2 sqrt(w) eps64 P |x| / sigma_min."""
        norms = np.linalg.norm(x, axis=0)
        return 2.0 * EPS64 * self.P * norms * np.sqrt(whitened_norm2) / self.sv[-1]

    def whiten(self, x: np.ndarray) -> np.ndarray:
        """Sigma^-1/2 x in the eigenbasis: diag(1/sigma) V^T x, x of shape (P, ...)."""
        return (self.V.T @ x) / self.sv.reshape(-1, *([1] * (x.ndim - 1)))

    # Conditioning of the pieces the implementation works on (measured, float64).
    @property
    def low_rank_parts(self) -> tuple[np.ndarray, np.ndarray]:
        """(U, d) of a low rank plus diagonal: S = [U, diag(d)]."""
        rank = self.K - self.P
        return self.S[:, :rank], np.diag(self.S[:, rank:])

    @property
    def w_norm2(self) -> float:
        """|W|_2^2 for W = D^-1 U (low rank plus diagonal); the capacitance is I + W^T W."""
        u, d = self.low_rank_parts
        return float(np.linalg.norm(u / d[:, None], 2) ** 2)

    @property
    def factor_cond(self) -> float:
        """cond of the square factors the LU solves use: S (dense) or the larger of
        S_out, S_in (Kronecker); 1 for diagonal; 1 + |W|^2 = cond bound of C (LRPD)."""
        kind = self.recipe.kind
        if kind == "diagonal":
            return 1.0
        if kind == "lowrank+diagonal":
            return 1.0 + self.w_norm2
        if kind == "kronecker":
            s_out, s_in = kronecker_factors(self.cov, _layout_of(self), self._to_numpy)
            return float(max(np.linalg.cond(s_out), np.linalg.cond(s_in)))
        return math.sqrt(self.cond)

    _to_numpy: Any = None


def _layout_of(built: Built) -> Any:
    from oracle import flat_layout

    return flat_layout(built.recipe.shapes)


def build(r: Recipe, backend: Backend) -> Built:
    rng = np.random.default_rng([r.seed, 11])
    mean_np = {name: r.scale * rng.standard_normal(shape) for name, shape in r.spec}
    mean = {name: backend.asarray(value, r.dtype) for name, value in mean_np.items()}
    cov = make_covariance(r)
    param = sc.GaussianParameter(mean, cov)
    if r.kind == "kronecker":
        cov.sample_scale = r.sample_scale
    storage = build_storage(r)
    cov.load_storage({path: backend.asarray(value, r.dtype) for path, value in storage.items()})
    oracle = dense_oracle(cov, mean, backend.to_numpy)
    flat_mean = np.concatenate([backend.to_numpy(mean[name]).reshape(-1) for name, _ in r.spec])
    v, sv, _ = np.linalg.svd(oracle.S, full_matrices=False)
    if sv.shape[0] < oracle.P:  # low rank: pad with exact zeros (and complete V)
        v = np.linalg.svd(oracle.S, full_matrices=True)[0]
        sv = np.concatenate([sv, np.zeros(oracle.P - sv.shape[0])])
    built = Built(r, param, flat_mean, oracle.S, oracle.Sigma, sv, v)
    built._to_numpy = backend.to_numpy
    return built


def scalar(backend: Backend, value: Any) -> float:
    assert tuple(value.shape) == (), value.shape
    return float(backend.to_numpy(value))


def logdet_bound(b: Built) -> float:
    """Error bound (without C) of the library's log det Sigma, per structure.

    Every algorithm sums P logs of computed numbers: eps P sum|log lambda_i| covers the
    (worst-case, recursive) summation, and 4 eps per term each log's own rounding and the
    few-eps relative error of the standard deviation through its transform (softplus,
    exp) and of the product by 2.
    On top:
    - dense factor: LU of S with backward error eps P |S| gives
      |tr(S^-1 dS)| <= eps P^2 cond(S) (times 2 for log det S S^T);
    - Kronecker: the same for each factor, weighted d_aug resp. d_out:
      eps P (d_out cond(S_out) + d_aug cond(S_in)) <= eps P^2 factor_cond;
    - low rank plus diagonal: the Gram C = I + W^T W has entrywise error eps P |W|^2 and
      |C^-1| <= 1, so log det C is off by at most eps P r (1 + |W|^2).
    """
    kind, p = b.recipe.kind, b.P
    base = p * np.sum(np.abs(np.log(b.eigenvalues))) + 4 * p
    if kind in ("factorized", "kronecker"):
        return eps(b.recipe.dtype) * (base + 2 * p * p * b.factor_cond)
    if kind == "lowrank+diagonal":
        rank = b.K - b.P
        return eps(b.recipe.dtype) * (base + p * rank * b.factor_cond)
    return eps(b.recipe.dtype) * base


def quadratic_cond(b: Built) -> float:
    """The condition factor of x^T Sigma^-1 x as the library computes it.

    diagonal: sum((x/s)^2), no condition factor; low rank plus diagonal: the ridge form
    with one refinement step, error ~ eps cond(W)^2 <= eps (1 + |W|^2) (docstring of
    ``LowRankPlusDiagonal._coefficients``); dense factor and Kronecker: sum(x * solve(x))
    with a backward-stable solve, |x^T dx| <= eps P |Sigma| |Sigma^-1 x|^2, i.e. up to
    eps P cond(Sigma) relative.
    """
    kind = b.recipe.kind
    if kind == "diagonal":
        return 1.0
    if kind == "lowrank+diagonal":
        return b.factor_cond
    return b.cond


def solve_backward_cond(b: Built) -> float:
    """The condition factor of solve's backward error |Sigma x^ - b| / (|Sigma| |x^| + |b|).

    diagonal (elementwise), dense factor (two backward-stable triangular LU solves:
    Sigma x^ - b = -E1 y - S E2^T x^, both <= eps P |Sigma| |x^|) and Kronecker (the same
    per factor, composed): 1. Low rank plus diagonal: Woodbury is not backward stable in
    general; the refined coefficients a are accurate to eps cond(W)^2 relative, which
    enters the residual through U a, so 1 + |W|^2.
    """
    return b.factor_cond if b.recipe.kind == "lowrank+diagonal" else 1.0


# ----------------------------------------------------------------------------- runner
def run(backend: Backend, test: Any, examples: int | None = None, **strategies: Any) -> None:
    """The loaded profile's examples (or ``examples``); eager JAX and dask run a fifth."""
    current = settings.default
    n = current.max_examples if examples is None else examples
    if backend.name in ("jax", "dask"):
        n = max(5, n // 5)
    configured = settings(
        current,
        max_examples=n,
        deadline=None,
        suppress_health_check=[
            *current.suppress_health_check,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )
    configured(given(**strategies)(test))()


def batches(backend: Backend, size: int) -> Any:
    """1 or ``size`` vectors per call (light JAX: ``size`` only, one shape to compile)."""
    return st.just(size) if light(backend) else st.sampled_from([1, size])


def vectors(backend: Backend, r: Recipe, batch: int, tag: int) -> tuple[Any, np.ndarray]:
    rng = np.random.default_rng([r.seed, tag])
    x = backend.asarray(rng.standard_normal((batch, r.num_params)), r.dtype)
    return x, backend.to_numpy(x)


def row_norms(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x, axis=-1)


# ----------------------------------------------------------------------------- tests
def test_solve_inverts_matmul(backend: Backend) -> None:
    """solve(matmul(x)) = x (forward error) and matmul(solve(b)) = b (backward error).

    Forward: matmul is backward stable (|dSigma| <= eps K |Sigma|), solve adds its backward
    error, and a backward error e gives a forward error <= cond(Sigma) e:
    |x^ - x| <= C eps P cond(Sigma) backward_cond |x|. This is an O(1) bound in float32 at
    kappa = 1e6 (only "finite, roughly right"); the backward check stays sharp:
    |matmul(solve(b)) - b| <= C eps P backward_cond (|Sigma| |x^| + |b|), which also
    contains matmul's own rounding (eps K |Sigma| |x^|).
    """

    def check(r: Recipe, batch: int) -> None:
        b = build(r, backend)
        cov, u = b.cov, eps(r.dtype)
        x, x64 = vectors(backend, r, batch, 1)
        back = solve_backward_cond(b)
        size = b.K + b.P
        got = backend.to_numpy(cov.solve(cov.matmul(x)))
        bound = C * u * size * b.cond * back * row_norms(x64)
        error = row_norms(got - x64)
        assert np.all(error <= bound), ("solve(matmul(x))", error / bound, b.cond)

        rhs, rhs64 = vectors(backend, r, batch, 2)
        solved = cov.solve(rhs)
        solved64 = backend.to_numpy(solved)
        norm = np.linalg.norm(b.Sigma, 2)
        scale = norm * row_norms(solved64) + row_norms(rhs64)
        bound = C * u * size * back * scale
        residual = row_norms(solved64 @ b.Sigma - rhs64)  # Sigma symmetric, float64
        assert np.all(residual <= bound), ("backward error of solve", residual / bound)
        error = row_norms(backend.to_numpy(cov.matmul(solved)) - rhs64)
        assert np.all(error <= bound), ("matmul(solve(b))", error / bound)

    run(backend, check, r=recipes(fixed_shapes=light(backend)), batch=batches(backend, 3))


def test_logdet_matches_eigenvalues(backend: Backend) -> None:
    """log det Sigma = sum log lambda_i, lambda_i = sigma_i(S)^2 of the float64 factor
    (not eigvalsh(Sigma): at kappa = 1e12 its smallest eigenvalue is off by ~1e-4)."""

    def check(r: Recipe) -> None:
        b = build(r, backend)
        got = scalar(backend, b.cov.logdet())
        expected = float(np.sum(np.log(b.eigenvalues)))
        bound = C * (logdet_bound(b) + b.logdet_reference_error)
        assert abs(got - expected) <= bound, (got, expected, abs(got - expected) / bound)

    run(backend, check, r=recipes(fixed_shapes=light(backend)))


def test_trace_is_sum_of_diagonal(backend: Backend) -> None:
    """trace = sum(diagonal()) = tr of the oracle, diagonal() = diag of the oracle.

    Every entry of diag(Sigma) is a sum of K non-negative squares (Kronecker: a product
    of two such sums), so its relative error is <= eps (K + 2) whatever the conditioning,
    and the trace, a sum of P of them, <= eps (K + P + 2): no condition factor. That the
    drawn kappa and scale do not matter here is the property.
    """

    def check(r: Recipe) -> None:
        b = build(r, backend)
        u = eps(r.dtype)
        diagonal = backend.to_numpy(b.cov.diagonal())
        expected = np.diag(b.Sigma)
        np.testing.assert_allclose(diagonal, expected, rtol=C * u * (b.K + 2), atol=0)
        trace = scalar(backend, b.cov.trace())
        total = float(np.sum(expected))
        rtol = C * u * (b.K + b.P + 2)
        assert abs(trace - total) <= rtol * total, (trace, total)
        assert abs(trace - float(np.sum(diagonal))) <= rtol * total, (trace, diagonal.sum())

    run(backend, check, r=recipes(fixed_shapes=light(backend)))


def test_entropy_formula(backend: Backend) -> None:
    """entropy = 0.5 (P log(2 pi e) + log det Sigma): against the library's own logdet
    (eps times the size of the terms) and against the float64 eigenvalues (half the
    logdet bound)."""

    def check(r: Recipe) -> None:
        b = build(r, backend)
        u = eps(r.dtype)
        got = scalar(backend, b.param.entropy())
        constant = b.P * (1.0 + LOG_2PI)
        own = 0.5 * (constant + scalar(backend, b.cov.logdet()))
        size = constant + abs(own) + abs(b.logdet)
        assert abs(got - own) <= C * u * size, (got, own)
        expected = 0.5 * (constant + b.logdet)
        bound = C * (0.5 * (logdet_bound(b) + b.logdet_reference_error) + u * size)
        assert abs(got - expected) <= bound, (got, expected, abs(got - expected) / bound)

    run(backend, check, r=recipes(fixed_shapes=light(backend)))


def test_log_prob_matches_dense_formula(backend: Backend) -> None:
    """log N(x; m, Sigma) = -0.5 (P log 2 pi + log det Sigma + |Sigma^-1/2 (x - m)|^2)
    for x = m + S z (typical points, q ~ P) and x = m + 3 sigma_min v_min (the worst
    direction); the reference quadratic form is whitened through the factor's SVD.

    Bound: 0.5 (logdet bound + C eps P quadratic_cond q) + eps (|value| + P log 2 pi).
    """

    def check(r: Recipe, batch: int) -> None:
        b = build(r, backend)
        u = eps(r.dtype)
        rng = np.random.default_rng([r.seed, 3])
        centred = (b.S @ rng.standard_normal((b.K, batch))).T
        weakest = 3.0 * b.sv[-1] * b.V[:, -1]  # the eigenvector of the smallest eigenvalue
        centred = np.concatenate([centred, weakest[None, :]])
        x = backend.asarray(b.mean + centred, r.dtype)
        x64 = backend.to_numpy(x) - b.mean  # what is passed, centred in float64
        quadratic = np.sum(b.whiten(x64.T) ** 2, axis=0)
        expected = -0.5 * (b.P * LOG_2PI + b.logdet + quadratic)
        got = backend.to_numpy(b.param.log_prob(b.cov.unflatten(x)))
        # x64 is the stored x (read back), so the rounding of x itself costs nothing here.
        reference_error = b.logdet_reference_error + b.whiten_reference_error(x64.T, quadratic)
        bound = 0.5 * C * (logdet_bound(b) + u * b.P * quadratic_cond(b) * quadratic)
        bound = bound + C * (u * (np.abs(expected) + b.P * LOG_2PI) + 0.5 * reference_error)
        error = np.abs(got - expected)
        assert np.all(error <= bound), (error / bound, b.cond)

    run(backend, check, r=recipes(fixed_shapes=light(backend)), batch=batches(backend, 4))


@dataclass(frozen=True)
class KLReference:
    value: float
    trace: float  # tr(Sigma_p^-1 Sigma_q)
    mahalanobis: float  # |Sigma_p^-1/2 (m_p - m_q)|^2
    error: float  # the reference's own error bound (float64)


def kl_reference(q: Built, p: Built) -> KLReference:
    """KL(q||p) in float64 from the factors, with its own error bound.

    KL = 0.5 [sum(l - 1 - log l) + |Sigma_p^-1/2 d|^2], l the squared singular values of
    M = Sigma_p^-1/2 S_q (P of them; zeros for a singular q give +inf): a sum of
    non-negative terms, so the reference does not cancel when q ~ p. Its error: the
    singular values s_i = sqrt(l_i) of M carry absolute error ~eps64 |M| P, which moves
    l_i - 1 - log l_i by |1 - 1/l_i| 2 s_i eps64 |M| P = 2 eps64 P |M| |l_i - 1| / s_i
    (large where l_i << 1: at cond(Sigma_p) = 1e12 this is ~1e-13 absolute, more than
    the float64 library bound), plus the Mahalanobis term's (`whiten_reference_error`).
    """
    m = p.whiten(q.S)
    singular = np.linalg.svd(m, compute_uv=False)
    singular = np.concatenate([singular, np.zeros(max(0, q.P - singular.shape[0]))])[: q.P]
    lam = singular**2
    difference = (p.mean - q.mean)[:, None]
    mahalanobis = float(np.sum(p.whiten(difference) ** 2))
    trace = float(np.sum(lam))
    if q.sv[-1] == 0 or np.any(lam == 0):
        return KLReference(math.inf, trace, mahalanobis, 0.0)
    excess = float(np.sum(lam - 1.0 - np.log(lam)))
    error = 2.0 * EPS64 * q.P * singular[0] * float(np.sum(np.abs(lam - 1.0) / singular))
    error += float(p.whiten_reference_error(difference, np.array([mahalanobis]))[0])
    return KLReference(0.5 * (excess + mahalanobis), trace, mahalanobis, 0.5 * error)


def kl_bound(q: Built, p: Built, trace: float, mahalanobis: float, reference: float = 0.0) -> float:
    """Error bound (with C) of the library's KL, from the identity each pair uses.

    KL = 0.5 [tr(Sigma_p^-1 Sigma_q) + d^T Sigma_p^-1 d - P + log det Sigma_p
    - log det Sigma_q]: the log-determinants carry their bounds (`logdet_bound`); the
    trace and the Mahalanobis term are whitened by p (sums of squares |S_p^-1 s|^2 for a
    dense or Kronecker p: eps P cond(S_p) relative; divisions by s_p for a diagonal p:
    eps relative; the whitened Woodbury for a low rank plus diagonal p, whose difference
    of two sums of squares loses eps |W_p|^2 relative to the diagonal part of the trace
    (docstring of ``_kl_to_lrpd``), so eps (1 + |W_p|^2) times
    sum(diag(Sigma_q) / d_p^2) + the trace), and the final sum of O(P) terms adds
    eps (tr + P + |log det|s). ``reference`` is the float64 reference's own error bound.
    """
    u = eps(q.recipe.dtype)
    if p.recipe.kind == "lowrank+diagonal":
        _, d = p.low_rank_parts
        diagonal_part = float(np.sum(np.diag(q.Sigma) / d**2))
        whitening = p.factor_cond * (trace + diagonal_part + mahalanobis)
    elif p.recipe.kind == "diagonal":
        whitening = trace + mahalanobis
    else:
        whitening = p.factor_cond * (trace + mahalanobis)
    terms = trace + mahalanobis + q.P + abs(q.logdet) + abs(p.logdet)
    return C * (
        u * (q.K + q.P) * whitening
        + 0.5 * (logdet_bound(q) + logdet_bound(p))
        + u * q.P * terms
        + reference
    )


@st.composite
def kl_pairs(draw: Any, q_kind: str, p_kind: str, fixed: bool) -> tuple[Recipe, Recipe]:
    q = draw(recipes((q_kind,), fixed_shapes=fixed))
    p = draw(recipes((p_kind,), dtype=q.dtype, spec=q.spec, fixed_shapes=fixed))
    return q, p


@pytest.mark.parametrize(("q_kind", "p_kind"), PAIRS, ids=[f"{q}-{p}" for q, p in PAIRS])
def test_kl_matches_dense_formula_and_is_non_negative(
    backend: Backend, q_kind: str, p_kind: str
) -> None:
    """KL(q || p) for every pair (q: every structure, low rank included; p: every
    full-rank one) against the float64 factor reference, and KL >= -bound (KL >= 0 up to
    rounding); +inf for a singular q. The profile's examples are spread over the 20 pairs
    (at least 10 each), so the identity as a whole gets >= max_examples."""

    def check(pair: tuple[Recipe, Recipe]) -> None:
        q, p = build(pair[0], backend), build(pair[1], backend)
        got = scalar(backend, sc.kl_divergence(q.param, p.param))
        ref = kl_reference(q, p)
        if math.isinf(ref.value):
            assert got == math.inf, got
            return
        bound = kl_bound(q, p, ref.trace, ref.mahalanobis, ref.error)
        assert got >= -bound, ("KL < 0", got, bound)
        assert abs(got - ref.value) <= bound, (got, ref.value, abs(got - ref.value) / bound)

    per_pair = max(10, math.ceil(2 * settings.default.max_examples / len(PAIRS)))
    run(backend, check, examples=per_pair, pair=kl_pairs(q_kind, p_kind, light(backend)))


def test_kl_of_q_to_itself_is_zero(backend: Backend) -> None:
    """KL(q || q) = 0 and KL(q || copy of q) = 0 for every full-rank structure.

    The reference is exactly 0; the bound is the pair's KL bound at trace = P,
    Mahalanobis 0 (the structured pairs that are exact, diagonal-diagonal and
    low-rank-plus-diagonal pairs of equal rank, get 0 or a few eps anyway).
    """

    def check(r: Recipe) -> None:
        b = build(r, backend)
        copy = build(r, backend)
        bound = kl_bound(b, b, float(b.P), 0.0)
        for other in (b, copy):
            got = scalar(backend, sc.kl_divergence(b.param, other.param))
            assert abs(got) <= bound, (got, bound)

    run(backend, check, r=recipes(fixed_shapes=light(backend)))


def test_kl_of_a_nearby_q_is_small_and_non_negative(backend: Backend) -> None:
    """p = q with every stored array perturbed by a relative t (1e-6 .. 1e-1): KL is
    then O(t^2 P) and a difference of large numbers in a careless implementation;
    it must match the reference and stay >= -bound."""

    def check(r: Recipe, log_t: float) -> None:
        q = build(r, backend)
        p = build(r, backend)
        rng = np.random.default_rng([r.seed, 5])
        t = 10.0**log_t
        storage = {path: backend.to_numpy(value) for path, value in p.cov.storage().items()}
        perturbed = {
            path: value * (1.0 + t * rng.standard_normal(value.shape))
            for path, value in storage.items()
        }
        p.cov.load_storage({k: backend.asarray(v, r.dtype) for k, v in perturbed.items()})
        p = rebuild_reference(p, backend)
        got = scalar(backend, sc.kl_divergence(q.param, p.param))
        ref = kl_reference(q, p)
        bound = kl_bound(q, p, ref.trace, ref.mahalanobis, ref.error)
        assert got >= -bound, ("KL < 0", got, bound)
        assert abs(got - ref.value) <= bound, (got, ref.value, abs(got - ref.value) / bound)

    run(backend, check, r=recipes(fixed_shapes=light(backend)), log_t=st.floats(-6.0, -1.0))


def rebuild_reference(b: Built, backend: Backend) -> Built:
    """``b`` with its float64 reference recomputed from the current storage."""
    oracle = dense_oracle(b.cov, b.param.mean, backend.to_numpy)
    v, sv, _ = np.linalg.svd(oracle.S, full_matrices=False)
    rebuilt = Built(b.recipe, b.param, b.mean, oracle.S, oracle.Sigma, sv, v)
    rebuilt._to_numpy = backend.to_numpy
    return rebuilt


def test_kronecker_mixed_product_identities(backend: Backend) -> None:
    """With C_out = S_out S_out^T, C_in = S_in S_in^T read from storage (float64), cond(C_out)
    and cond(C_in) drawn (their product = kappa), and sample_scale a:

    - log det Sigma = d_aug log det C_out + d_out log det C_in + P log a^2;
    - tr Sigma = a^2 tr C_out tr C_in;
    - Sigma vec_r(X) = a^2 vec_r(C_out X C_in) (matmul; weight block X[:, :d_in] row-major,
      bias X[:, d_in]) and Sigma^-1 vec_r(X) = a^-2 vec_r(C_out^-1 X C_in^-1) (solve, as a
      backward error: |C_out Y C_in a^2 - X| <= C eps P (|Sigma| |Y| + |X|)).

    The log-determinants of the factors come from their SVDs in float64.
    """

    def check(r: Recipe) -> None:
        b = build(r, backend)
        u = eps(r.dtype)
        layout = _layout_of(b)
        s_out, s_in = kronecker_factors(b.cov, layout, backend.to_numpy)
        a2 = r.sample_scale**2
        d_out, d_aug = s_out.shape[0], s_in.shape[0]
        d_in = d_aug - int("bias" in r.shapes)
        c_out, c_in = s_out @ s_out.T, s_in @ s_in.T
        log_out = 2.0 * np.sum(np.log(np.linalg.svd(s_out, compute_uv=False)))
        log_in = 2.0 * np.sum(np.log(np.linalg.svd(s_in, compute_uv=False)))
        expected = d_aug * log_out + d_out * log_in + b.P * math.log(a2)
        got = scalar(backend, b.cov.logdet())
        assert abs(got - expected) <= C * logdet_bound(b), (got, expected)
        trace = scalar(backend, b.cov.trace())
        expected_trace = a2 * np.trace(c_out) * np.trace(c_in)
        assert abs(trace - expected_trace) <= C * u * (b.P + b.K) * expected_trace

        def flat(mat: np.ndarray) -> np.ndarray:  # (B, d_out, d_aug) -> (B, P) in the flat order
            parts = {"weight": mat[:, :, :d_in].reshape(mat.shape[0], -1)}
            if "bias" in r.shapes:
                parts["bias"] = mat[:, :, d_in]
            return np.concatenate([parts[name] for name, _ in r.spec], axis=1)

        rng = np.random.default_rng([r.seed, 9])
        x_mat = rng.standard_normal((2, d_out, d_aug))
        x = backend.asarray(flat(x_mat), r.dtype)
        x_mat = np.stack([_unflat(m, r, d_in) for m in backend.to_numpy(x)])
        product = backend.to_numpy(b.cov.matmul(x))
        expected_product = flat(a2 * (c_out @ x_mat @ c_in))
        norm = np.linalg.norm(b.Sigma, 2)
        bound = C * u * b.K * norm * row_norms(flat(x_mat))
        assert np.all(row_norms(product - expected_product) <= bound)
        y = np.stack([_unflat(m, r, d_in) for m in backend.to_numpy(b.cov.solve(x))])
        residual = row_norms(flat(a2 * (c_out @ y @ c_in) - x_mat))
        bound = C * u * b.P * (norm * row_norms(flat(y)) + row_norms(flat(x_mat)))
        assert np.all(residual <= bound), residual / bound

    run(backend, check, r=recipes(("kronecker",), fixed_shapes=light(backend)))


def _unflat(row: np.ndarray, r: Recipe, d_in: int) -> np.ndarray:
    """A flat (P,) vector back to the augmented (d_out, d_aug) matrix [W | b]."""
    parts, start = {}, 0
    for name, shape in r.spec:
        size = math.prod(shape)
        parts[name] = row[start : start + size]
        start += size
    d_out = r.shapes["weight"][0]
    weight = parts["weight"].reshape(d_out, d_in)
    if "bias" not in parts:
        return weight
    return np.concatenate([weight, parts["bias"][:, None]], axis=1)
