"""float32 accuracy per structure against float64, with the condition number controlled.

    python benchmarks/accuracy.py [--backends numpy,torch[,jax]] [--draws 20] [--smoke]

For each structure (Diagonal, Factorized full rank, LRPD(rank 4), Kronecker full ranks)
on one layer (``weight`` (6, 7) + ``bias`` (6,): P = 48, d_aug = 8) and each condition
number kappa = cond(Sigma) in {1e1, 1e3, 1e5, 1e6} (1e6: the float32 maximum of
``tests/test_conditioning.py``), ``--draws`` random storages are *built* to have that
conditioning (the ideas of ``tests/test_conditioning.py``'s ``build_storage``):

- Diagonal: std s = sqrt(v), v log-uniform over [1, kappa], both ends present
  (random signs: only |s| may matter);
- Factorized: S = Q diag(sqrt(v)) R, Q, R Haar-orthogonal: cond(S) = sqrt(kappa);
- LRPD: d^2 over [1, sqrt(kappa)], W = D^-1 U = Q diag(w) R with w^2 over
  [1, sqrt(kappa)]: 1 + |W|^2 = 1 + sqrt(kappa), cond(Sigma) <~ kappa;
- Kronecker: S_out and S_in as the dense factor, cond(C_out) = cond(C_in) = sqrt(kappa)
  (split 1/2), so cond(Sigma) = kappa and cond(S_out), cond(S_in) = kappa^(1/4);
- LRPD stress ("d tiny against U"): d^2 = 1e-6 * [1, 10], w^2 over [1, omega] for
  |W|^2 = omega in {1e8, 1e12}: cond(Sigma) ~ 10 omega, beyond what float32 Sigma can
  hold, where only the factor forms (determinant lemma, ridge quadratic) stay accurate.

Diagonal and LRPD are constructed with ``scale_transform="identity"`` so the stored
``scale`` *is* the standard deviation (the default, softplus, stores rho with
s = softplus(rho); the error of that transform is not what is measured here).

The storage is rounded to float32 and loaded into the tested backend (float32); the
reference is float64 NumPy from the *same* rounded storage: the factor S
(``factor_matmul(eye(K))`` of a float64 copy, exact products) and its SVD
(eigenvalues sigma_i^2, whitening diag(1/sigma) V^T), as in ``tests/test_conditioning.py``.
Measured per draw (errors in units of eps32 = 2^-23 = 1.19e-7 in the tables):

- ``logdet``: |error| / P (log det is a sum of P logs: the mean relative error of the
  eigenvalues); ``entropy`` likewise |error| / P;
- ``log_prob``: relative error of ``log_prob`` at a sample x = m + S z (rounded to
  float32), through the public API (centring included);
- ``quad``: relative error of the structure's quadratic form x^T Sigma^-1 x
  (``structure.quadratic``, what ``log_prob`` uses) at the centred sample, and
  ``quad weak`` at 3 sigma_min v_min (the eigenvector of the smallest eigenvalue);
- ``solve fwd``: |x^ - Sigma^-1 b| / |Sigma^-1 b|; ``solve bwd``:
  |Sigma x^ - b| / (|Sigma|_2 |x^| + |b|), b ~ N(0, I);
- ``KL N(0,I)``: relative error of KL(q || normal_prior(q)); ``KL pert``: relative error
  of KL(q || q') with q' = q's storage times (1 + 1e-3 xi), xi ~ N(0, 1) (KL ~ 1e-5:
  a difference of large numbers in a careless implementation).

Printed: per structure, one Markdown table, rows (backend, kappa), cells
"median / max" over the draws in units of eps32, and the measured factor that governs
the structure's error (1, cond(S), 1 + |W|^2, max(cond S_out, cond S_in)), cond(Sigma)
and the median reference KL(q || q') (the size the ``KL pert`` error is relative to).
``--smoke``: 2 draws, kappa in {1e1, 1e6}, NumPy only (seconds).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import structcov as sc
from structcov.covariances._structure import split_flat

EPS32 = float(np.finfo(np.float32).eps)
SPEC: tuple[tuple[str, tuple[int, ...]], ...] = (("weight", (6, 7)), ("bias", (6,)))
P = sum(math.prod(shape) for _, shape in SPEC)
RANK = 4
KAPPAS = (1e1, 1e3, 1e5, 1e6)
STRESS = (1e8, 1e12)  # |W|^2 of the LRPD stress rows
PERTURBATION = 1e-3
QUANTITIES = (
    "logdet",
    "log_prob",
    "quad",
    "quad weak",
    "solve fwd",
    "solve bwd",
    "entropy",
    "KL N(0,I)",
    "KL pert",
)
STRUCTURES = ("Diagonal", "Factorized", "LRPD(4)", "Kronecker", "LRPD(4) stress")


# ----------------------------------------------------------------------------- storage
def spread(rng: np.random.Generator, n: int, kappa: float) -> np.ndarray:
    """n values log-uniform over [1, kappa], both ends present (n >= 2), shuffled."""
    values = np.exp(rng.uniform(0.0, math.log(kappa), n))
    if n >= 2:
        values[:2] = (1.0, kappa)
    return rng.permutation(values)


def orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def conditioned_square(rng: np.random.Generator, n: int, kappa: float) -> np.ndarray:
    """S with cond(S S^T) = kappa."""
    return (orthogonal(rng, n) * np.sqrt(spread(rng, n, kappa))) @ orthogonal(rng, n)


def by_name(rows: np.ndarray, prefix: str) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for name, shape in SPEC:
        size = math.prod(shape)
        out[f"{prefix}.{name}"] = rows[start : start + size].reshape(*shape, *rows.shape[1:])
        start += size
    return out


def lrpd_storage(rng: np.random.Generator, d2: np.ndarray, w2_max: float) -> dict[str, Any]:
    w = (orthogonal(rng, P)[:, :RANK] * np.sqrt(spread(rng, RANK, w2_max))) @ orthogonal(rng, RANK)
    d = np.sqrt(d2)
    return {**by_name(d[:, None] * w, "factor"), **by_name(d, "scale")}


def build_storage(structure: str, kappa: float, rng: np.random.Generator) -> dict[str, Any]:
    """float64 storage with the conditioning of the module docstring."""
    if structure == "Diagonal":
        std = np.sqrt(spread(rng, P, kappa)) * rng.choice([-1.0, 1.0], P)
        return by_name(std, "scale")
    if structure == "Factorized":
        return by_name(conditioned_square(rng, P, kappa), "factor")
    if structure == "LRPD(4)":
        root = math.sqrt(kappa)
        return lrpd_storage(rng, spread(rng, P, root), root)
    if structure == "LRPD(4) stress":
        return lrpd_storage(rng, 1e-6 * spread(rng, P, 10.0), kappa)
    assert structure == "Kronecker", structure
    d_out, d_in = SPEC[0][1]
    s_in = conditioned_square(rng, d_in + 1, math.sqrt(kappa))
    return {
        "output_factor": conditioned_square(rng, d_out, math.sqrt(kappa)),
        "input_factor.weight": s_in[:d_in],
        "input_factor.bias": s_in[d_in:],
    }


def make_covariance(structure: str) -> sc.FactorizedCovariance:
    if structure == "Diagonal":
        return sc.DiagonalCovariance(scale_transform="identity")
    if structure == "Factorized":
        return sc.FactorizedCovariance()
    if structure.startswith("LRPD"):
        return sc.LowRankPlusDiagonalCovariance(RANK, scale_transform="identity")
    return sc.KroneckerCovariance()


def governing_factor(structure: str, storage: dict[str, np.ndarray], s: np.ndarray) -> float:
    """The measured condition factor of the pieces the structure's algorithms work on."""
    if structure == "Diagonal":
        return 1.0
    if structure == "Factorized":
        return float(np.linalg.cond(s))
    if structure.startswith("LRPD"):
        u, d = s[:, :RANK], np.diag(s[:, RANK:])
        return 1.0 + float(np.linalg.norm(u / d[:, None], 2) ** 2)
    d_in = SPEC[0][1][1]
    s_in = np.concatenate([storage["input_factor.weight"], storage["input_factor.bias"]])
    assert s_in.shape[0] == d_in + 1
    return float(max(np.linalg.cond(storage["output_factor"]), np.linalg.cond(s_in)))


# ----------------------------------------------------------------------------- backends
def converters(backend: str) -> tuple[Callable[[np.ndarray], Any], Callable[[Any], np.ndarray]]:
    """(float32 numpy -> backend array, backend array -> float64 numpy)."""
    if backend == "numpy":
        return (lambda a: np.asarray(a, np.float32)), (lambda a: np.asarray(a, np.float64))
    if backend == "torch":
        import torch

        return (
            lambda a: torch.as_tensor(np.asarray(a, np.float32)),
            lambda a: a.detach().numpy().astype(np.float64),
        )
    assert backend == "jax", backend
    import jax.numpy as jnp

    return (lambda a: jnp.asarray(np.asarray(a, np.float32))), (lambda a: np.asarray(a, np.float64))


# ----------------------------------------------------------------------------- one draw
def whitened2(v: np.ndarray, sv: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|diag(1/sv) V^T x|^2 per column of x (P, B)."""
    return np.sum(((v.T @ x) / sv[:, None]) ** 2, axis=0)


def reference_factor(structure: str, storage32: dict[str, np.ndarray]) -> np.ndarray:
    """S (P x K) in float64 from the float32-rounded storage (exact products)."""
    cov = make_covariance(structure)
    sc.GaussianParameter({name: np.zeros(shape) for name, shape in SPEC}, cov)
    cov.load_storage({k: v.astype(np.float64) for k, v in storage32.items()})
    k = cov.num_factor_columns
    return np.asarray(cov.flatten(cov.factor_matmul(np.eye(k)))).T


def kl_reference(q_s: np.ndarray, p_s: np.ndarray) -> float:
    """KL(q || p) for equal means: 0.5 sum(l - 1 - log l), l = sv(Sigma_p^-1/2 S_q)^2."""
    v, sv, _ = np.linalg.svd(p_s, full_matrices=False)
    m = (v.T @ q_s) / sv[:, None]
    lam = np.linalg.svd(m, compute_uv=False)[:P] ** 2
    return float(0.5 * np.sum(lam - 1.0 - np.log(lam)))


def one_draw(
    structure: str, kappa: float, seed: int, to_backend: Callable, to_numpy: Callable
) -> tuple[dict[str, float], float, float, float]:
    """(errors by quantity, governing factor, cond(Sigma), reference KL(q || q'))."""
    rng = np.random.default_rng([seed, int(math.log10(kappa) * 10)])
    storage32 = {k: v.astype(np.float32) for k, v in build_storage(structure, kappa, rng).items()}
    mean32 = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SPEC}
    cov = make_covariance(structure)
    param = sc.GaussianParameter({k: to_backend(v) for k, v in mean32.items()}, cov)
    cov.load_storage({k: to_backend(v) for k, v in storage32.items()})

    s = reference_factor(structure, storage32)
    v, sv, _ = np.linalg.svd(s, full_matrices=False)
    sigma = s @ s.T
    m = np.concatenate([mean32[name].reshape(-1) for name, _ in SPEC]).astype(np.float64)
    logdet = float(2.0 * np.sum(np.log(sv)))
    err: dict[str, float] = {}

    def rel(got: Any, ref: float) -> float:
        return abs(float(to_numpy(got)) - ref) / abs(ref)

    err["logdet"] = abs(float(to_numpy(cov.logdet())) - logdet) / P
    entropy = 0.5 * (P * (1.0 + math.log(2 * math.pi)) + logdet)
    err["entropy"] = abs(float(to_numpy(param.entropy())) - entropy) / P

    # A sample x = m + S z, rounded to float32; the reference centres it in float64.
    x32 = (m + s @ rng.standard_normal(s.shape[1])).astype(np.float32)
    centred = x32.astype(np.float64) - m
    quad = float(whitened2(v, sv, centred[:, None])[0])
    log_prob = -0.5 * (P * math.log(2 * math.pi) + logdet + quad)
    value = cov.unflatten(to_backend(x32[None, :]))
    err["log_prob"] = rel(param.log_prob(value)[0], log_prob)

    structure_ = cov.structure
    storage = cov._ops_storage()
    state = structure_.prepare(_namespace(to_backend), storage)

    def quadratic(c: np.ndarray) -> tuple[float, float]:
        c32 = c.astype(np.float32)
        got = structure_.quadratic(
            _namespace(to_backend), storage, state, split_flat(structure_, to_backend(c32[None]))
        )
        ref = float(whitened2(v, sv, c32.astype(np.float64)[:, None])[0])
        return float(to_numpy(got)[0]), ref

    got, ref = quadratic(centred)
    err["quad"] = abs(got - ref) / ref
    got, ref = quadratic(3.0 * sv[-1] * v[:, -1])
    err["quad weak"] = abs(got - ref) / ref

    b32 = rng.standard_normal(P).astype(np.float32)
    b = b32.astype(np.float64)
    exact = v @ ((v.T @ b) / sv**2)
    solved = to_numpy(cov.solve(to_backend(b32[None, :])))[0]
    err["solve fwd"] = float(np.linalg.norm(solved - exact) / np.linalg.norm(exact))
    residual = np.linalg.norm(sigma @ solved - b)
    err["solve bwd"] = float(
        residual / (np.linalg.norm(sigma, 2) * np.linalg.norm(solved) + np.linalg.norm(b))
    )

    prior = sc.normal_prior(param, 1.0)
    kl_prior = 0.5 * float(np.sum(sv**2 - 1.0 - np.log(sv**2)) + m @ m)
    err["KL N(0,I)"] = rel(sc.kl_divergence(param, prior), kl_prior)

    noise = {k: 1.0 + PERTURBATION * rng.standard_normal(a.shape) for k, a in storage32.items()}
    perturbed32 = {k: (a * noise[k]).astype(np.float32) for k, a in storage32.items()}
    other = make_covariance(structure)
    p = sc.GaussianParameter({k: to_backend(v) for k, v in mean32.items()}, other)
    other.load_storage({k: to_backend(a) for k, a in perturbed32.items()})
    kl_pert = kl_reference(s, reference_factor(structure, perturbed32))
    err["KL pert"] = rel(sc.kl_divergence(param, p), kl_pert)

    factor = governing_factor(structure, {k: a.astype(np.float64) for k, a in storage32.items()}, s)
    return err, factor, float((sv[0] / sv[-1]) ** 2), kl_pert


def _namespace(to_backend: Callable) -> Any:
    from structcov._array_api import namespace

    return namespace(to_backend(np.zeros(1, np.float32)))


# ----------------------------------------------------------------------------- report
def cell(values: list[float]) -> str:
    def fmt(x: float) -> str:
        u = x / EPS32
        if not math.isfinite(u):
            return "nan" if math.isnan(u) else "inf"
        return f"{u:.2g}" if u < 1e4 else f"{u:.1e}"

    return f"{fmt(statistics.median(values))} / {fmt(max(values))}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="numpy,torch")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--structures", default=",".join(STRUCTURES))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    draws, kappas = args.draws, KAPPAS
    if args.smoke:
        backends, draws, kappas = ["numpy"], 2, (1e1, 1e6)
    print(
        f"P = {P} (weight (6, 7) + bias (6,)), LRPD rank {RANK}, float32 vs float64, "
        f"{draws} draws per cell; cells: median / max of the error in units of "
        f"eps32 = {EPS32:.3g}\n"
    )
    start = time.perf_counter()
    for structure in args.structures.split(","):
        axis = STRESS if structure.endswith("stress") else kappas
        label = "norm(W)^2" if structure.endswith("stress") else "kappa"
        header = ["backend", label, "factor", "cond(Sigma)", *QUANTITIES, "KL pert value"]
        print(f"### {structure}\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for backend in backends:
            to_backend, to_numpy = converters(backend)
            for kappa in axis:
                try:
                    rows = [
                        one_draw(structure, kappa, seed, to_backend, to_numpy)
                        for seed in range(draws)
                    ]
                except Exception as error:  # e.g. a LinAlgError: report it as the cell
                    reason = f"{type(error).__name__}: {str(error).splitlines()[0][:60]}"
                    print(f"| {backend} | {kappa:.0e} | fails: {reason} |")
                    continue
                factor = statistics.median(r[1] for r in rows)
                cond = statistics.median(r[2] for r in rows)
                cells = [cell([r[0][q] for r in rows]) for q in QUANTITIES]
                kl_value = statistics.median(r[3] for r in rows)
                print(
                    f"| {backend} | {kappa:.0e} | {factor:.2g} | {cond:.2g} | "
                    + " | ".join(cells)
                    + f" | {kl_value:.2g} |"
                )
                sys.stdout.flush()
        print()
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
