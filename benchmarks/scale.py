"""Time and peak memory per operation at P ~ 2e6 (low rank plus diagonal, rank 8, float32).

    python benchmarks/scale.py [--backend numpy|torch|jax] [--repeats 3] [--json out.json]

Peak memory is traced allocation above the baseline (tracemalloc: NumPy's and
Python's allocations) on NumPy, and process peak RSS growth on other backends.
Nothing here is of size P x P: a dense path would need 16 TB.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import tracemalloc
from typing import Any

import numpy as np
from _common import generator as _generator
from _common import namespace as _namespace
from _common import sync as _sync

import structcov as sc

D_OUT, D_IN = 2000, 1000  # weight (2000, 1000) + bias (2000,): P = 2,002,000


def build(backend: str, rank: int = 8) -> tuple[Any, sc.GaussianParameter, sc.GaussianParameter]:
    xp = _namespace(backend)
    rng = np.random.default_rng(0)
    mean = {
        "weight": xp.asarray(rng.standard_normal((D_OUT, D_IN), dtype=np.float32)),
        "bias": xp.asarray(rng.standard_normal(D_OUT, dtype=np.float32)),
    }
    q = sc.GaussianParameter(mean, sc.LowRankPlusDiagonalCovariance(rank))
    q.cov.reset_parameters(0.1, generator=_generator(backend, 1))
    return xp, q, sc.normal_prior(q, 1.0)


def operations(
    backend: str, xp: Any, q: sc.GaussianParameter, prior: sc.GaussianParameter
) -> dict[str, Any]:
    draw = q.sample((), generator=_generator(backend, 2))
    x = q.cov.flatten(draw)
    return {
        "sample": lambda: q.sample((), generator=_generator(backend, 2)),
        "diagonal": q.cov.diagonal,
        "trace": q.cov.trace,
        "logdet": q.cov.logdet,
        "solve": lambda: q.cov.solve(x),
        "log_prob": lambda: q.log_prob(draw),
        "kl_to_prior": lambda: sc.kl_divergence(q, prior),
    }


def measure(backend: str, repeats: int) -> list[dict[str, Any]]:
    xp, q, prior = build(backend)
    rows = []
    for name, op in operations(backend, xp, q, prior).items():
        _sync(op())  # warm-up (and JAX dispatch caches)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            _sync(op())
            times.append(time.perf_counter() - start)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        _sync(op())
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
        rows.append(
            {
                "operation": name,
                "median_s": statistics.median(times),
                "peak_bytes": peak if backend == "numpy" else rss_growth,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="numpy", choices=["numpy", "torch", "jax"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = measure(args.backend, args.repeats)
    p = D_OUT * D_IN + D_OUT
    print(f"{args.backend}: LowRankPlusDiagonalCovariance(8), P = {p:,}, float32")
    print(f"{'operation':<12} {'median s':>9} {'peak MB':>9}")
    for row in rows:
        print(f"{row['operation']:<12} {row['median_s']:>9.3f} {row['peak_bytes'] / 2**20:>9.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"backend": args.backend, "P": p, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
