"""Low rank plus diagonal against torch.distributions.LowRankMultivariateNormal (CPU, float32).

    python benchmarks/lrpd_peers.py [--params 1000000] [--rank 32] [--samples 4]
                                    [--repeats 15] [--threads 1] [--smoke]

One Gaussian over P parameters (a weight of ``(P / 1000, 1000)``), Sigma = U U^T +
diag(d^2) with U (P, r) and d (P,) drawn once (``U ~ 0.3 N(0, 1) / sqrt(r)``,
``d ~ U(0.5, 1.5)``), float32. The same Sigma goes to both:

* structcov: a core `GaussianParameter` over torch tensors with
  ``LowRankPlusDiagonalCovariance(r, scale_transform="identity")`` (the stored d is
  the std), loaded once;
* torch: ``LowRankMultivariateNormal(loc, cov_factor=U, cov_diag=d^2)``, built inside
  every timed call (its constructor factors the capacitance, lazily: structcov
  factors per call too, so both pay for it each time).

Operations (each timed call is what a user writes):

* ``sample``: ``param.sample((S,), generator)`` / ``dist.rsample((S,))``, S =
  ``--samples``;
* ``log_prob``: of S given points (``param.log_prob(x)`` / ``dist.log_prob(x)``);
* ``kl``: KL(q || N(0, I)): ``structcov.kl_divergence(q, 1.0)`` (the float prior) and
  against ``normal_prior(q, 1.0)`` built once (the structured pair); torch's
  ``kl_divergence(q, p)`` with ``p = LowRankMultivariateNormal(0, zeros (P, 1), 1)``
  (torch has no KL from a low-rank normal to a diagonal one; a rank-1 zero factor is
  the cheapest p it accepts), built inside the call.

Values: log_prob and KL are compared with torch's (relative difference), and both
with a float64 evaluation of the same formulas in torch (Woodbury and the determinant
lemma in float64: exact enough at these sizes); the script fails if structcov's error
against float64 exceeds ``RTOL``. Samples are not compared element-wise (different
normals), their shapes are.

Timing: ``torch.set_num_threads(--threads)``, garbage collection off, one warm-up
call each, ``--repeats`` rounds with the order rotating; medians, and structcov's
median divided by torch's (<= 1: structcov is as fast or faster; the target of
issue 15 is <= 0.8).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from _common import load_average, machine_info

import structcov as sc

#: Largest relative error of structcov's log_prob / KL against float64 accepted.
RTOL = 1e-4


def problem(torch: Any, params: int, rank: int, samples: int) -> dict[str, Any]:
    """The shared storage, points and a float64 reference of log_prob and KL."""
    cols = 1000 if params >= 1000 else params
    rows = params // cols
    p = rows * cols
    rng = np.random.default_rng(0)
    u = (0.3 / math.sqrt(rank) * rng.standard_normal((p, rank))).astype(np.float32)
    d = rng.uniform(0.5, 1.5, p).astype(np.float32)
    m = (0.1 * rng.standard_normal(p)).astype(np.float32)
    x = (m + rng.standard_normal((samples, p))).astype(np.float32)
    return {
        "shape": (rows, cols),
        "u": torch.from_numpy(u),
        "d": torch.from_numpy(d),
        "m": torch.from_numpy(m),
        "x": torch.from_numpy(x),
    }


def reference(torch: Any, data: dict[str, Any]) -> dict[str, np.ndarray]:
    """log_prob of the points and KL(q || N(0, I)) in float64 (Woodbury, determinant lemma)."""
    u, d, m, x = (data[k].double() for k in ("u", "d", "m", "x"))
    p, r = u.shape
    d2 = d * d
    w = u / d[:, None]
    cap = torch.eye(r, dtype=torch.float64) + w.T @ w
    chol = torch.linalg.cholesky(cap)
    logdet = 2 * torch.log(torch.diagonal(chol)).sum() + torch.log(d2).sum()
    c = (x - m) / d  # (S, P), whitened by d
    proj = torch.cholesky_solve((c @ w).T, chol)  # C^-1 W^T c
    quad = (c * c).sum(1) - ((c @ w) * proj.T).sum(1)
    log_prob = -0.5 * (p * math.log(2 * math.pi) + logdet + quad)
    trace = d2.sum() + (u * u).sum()
    kl = 0.5 * (trace + (m * m).sum() - p - logdet)
    return {"log_prob": log_prob.numpy(), "kl": np.array(kl.item())}


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, float]]:
    import torch
    from torch.distributions import LowRankMultivariateNormal, kl_divergence

    torch.set_num_threads(args.threads)
    data = problem(torch, args.params, args.rank, args.samples)
    expected = reference(torch, data)
    u, d, m, x = data["u"], data["d"], data["m"], data["x"]
    shape = data["shape"]
    p = u.shape[0]

    param = sc.GaussianParameter(
        {"weight": m.reshape(shape)},
        sc.LowRankPlusDiagonalCovariance(args.rank, scale_transform="identity"),
    )
    param.cov.load_storage(
        {"factor.weight": u.reshape(*shape, args.rank), "scale.weight": d.reshape(shape)}
    )
    prior = sc.normal_prior(param, 1.0)
    values = {"weight": x.reshape(args.samples, *shape)}
    generator = torch.Generator().manual_seed(0)
    d2 = d * d
    zero_loc, zero_factor, ones = torch.zeros(p), torch.zeros(p, 1), torch.ones(p)

    def dist() -> Any:
        return LowRankMultivariateNormal(m, cov_factor=u, cov_diag=d2)

    calls: dict[tuple[str, str], Callable[[], Any]] = {
        ("sample", "structcov"): lambda: param.sample((args.samples,), generator)["weight"],
        ("sample", "torch"): lambda: dist().rsample((args.samples,)),
        ("log_prob", "structcov"): lambda: param.log_prob(values),
        ("log_prob", "torch"): lambda: dist().log_prob(x),
        ("kl", "structcov"): lambda: sc.kl_divergence(param, 1.0),
        ("kl", "structcov (normal_prior)"): lambda: sc.kl_divergence(param, prior),
        ("kl", "torch"): lambda: kl_divergence(
            dist(), LowRankMultivariateNormal(zero_loc, cov_factor=zero_factor, cov_diag=ones)
        ),
    }
    errors: dict[str, float] = {}
    with torch.no_grad():
        for (operation, name), call in calls.items():
            got = call()  # also the warm-up
            if operation == "sample":
                assert tuple(got.shape) in ((args.samples, *shape), (args.samples, p)), got.shape
                continue
            want = expected[operation]
            error = float(np.max(np.abs(got.double().numpy() - want)) / np.max(np.abs(want)))
            errors[f"{operation} {name}"] = error

    times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    keys = list(calls)
    gc.disable()
    try:
        with torch.no_grad():
            for round_ in range(args.repeats):
                shift = round_ % len(keys)
                for key in keys[shift:] + keys[:shift]:
                    start = time.perf_counter()
                    calls[key]()
                    times[key].append(time.perf_counter() - start)
    finally:
        gc.enable()
    rows = []
    for operation in ("sample", "log_prob", "kl"):
        base = statistics.median(times[operation, "torch"])
        for (op, name), timing in times.items():
            if op != operation:
                continue
            median = statistics.median(timing)
            rows.append(
                {
                    "operation": operation,
                    "library": name,
                    "time_s": median,
                    "ratio": median / base,
                    "error": errors.get(f"{operation} {name}", math.nan),
                }
            )
    return rows, errors


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| operation | library | median time | / torch | max rel. error vs float64 |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        error = "—" if math.isnan(row["error"]) else f"{row['error']:.1e}"
        lines.append(
            f"| {row['operation']} | {row['library']} | {row['time_s'] * 1e3:.1f} ms "
            f"| {row['ratio']:.2f} | {error} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="P = 60, rank 3, one round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.params, args.rank, args.repeats = 60, 3, 1
    if importlib.util.find_spec("torch") is None:
        print("skipping: this benchmark needs torch", file=sys.stderr)
        return 0
    rows, errors = run(args)
    import torch

    info = machine_info()
    print(
        f"LowRankPlusDiagonal({args.rank}) vs torch.distributions.LowRankMultivariateNormal, "
        f"P = {args.params:,}, {args.samples} samples / points, torch {torch.__version__} CPU "
        f"float32, {args.threads} thread(s); medians of {args.repeats} interleaved rounds; "
        f"{info['cpu']} ({info['cpus']} CPUs), load {load_average()}.\n"
    )
    print(table(rows))
    bad = [
        k for k, v in errors.items() if k.split(" ", 1)[1].startswith("structcov") and not v <= RTOL
    ]
    if bad:
        print(f"\nstructcov's values disagree with float64 (> {RTOL:g}): {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
