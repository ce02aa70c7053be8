"""Per-call overhead at small P: the seed-API methods against the pure functions.

    python benchmarks/overhead.py [--backends numpy torch] [--repeat 7] [--number 200]

A layer of weight (9, 10) + bias (9,) (P = 99), float64, four vectors where an
operation takes vectors. For each structure and operation it times the seed-API
method (``param.cov.matmul(x)``, ``param.log_prob(v)``, ...; on torch the
``structcov.torch`` module) and the pure function of `structcov.functional` with the
same structure and storage, interleaved, and prints the medians in microseconds
and their ratio. Medians of ``--repeat`` runs of ``--number`` calls each.
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np

import structcov as sc
import structcov.functional as F

STRUCTURES: dict[str, Callable[[], sc.FactorizedCovariance]] = {
    "diagonal": sc.DiagonalCovariance,
    "lowrank+diag(8)": lambda: sc.LowRankPlusDiagonalCovariance(8),
    "kronecker": sc.KroneckerCovariance,
}


def _setup(backend: str) -> tuple[Callable[[np.ndarray], Any], Any, Callable[..., Any]]:
    if backend == "torch":
        import torch

        import structcov.torch as sct

        return torch.asarray, torch.Generator().manual_seed(0), sct.GaussianParameter
    return (lambda a: a), np.random.default_rng(0), sc.GaussianParameter


def _pairs(param: Any, prior: Any, value: Any, x: Any, z: Any) -> dict[str, tuple[Any, Any]]:
    """operation -> (seed-API call, pure-function call) on the same structure and storage."""
    structure, storage, means = param.cov.structure, param.cov.storage(), dict(param.mean)
    prior_parts = prior._parts()
    return {
        "factor_matmul": (
            lambda: param.cov.factor_matmul(z),
            lambda: F.factor_matmul(structure, storage, z),
        ),
        "matmul": (lambda: param.cov.matmul(x), lambda: F.matmul(structure, storage, x)),
        "diagonal": (lambda: param.cov.diagonal(), lambda: F.diagonal(structure, storage)),
        "logdet": (lambda: param.cov.logdet(), lambda: F.logdet(structure, storage)),
        "solve": (lambda: param.cov.solve(x), lambda: F.solve(structure, storage, x)),
        "log_prob": (
            lambda: param.log_prob(value),
            lambda: F.log_prob(structure, storage, means, value),
        ),
        "kl_to_prior": (
            lambda: sc.kl_divergence(param, prior),
            lambda: F.kl_divergence((structure, storage, means), prior_parts),
        ),
    }


def measure(backend: str, repeat: int, number: int) -> list[tuple[str, str, float, float]]:
    """(structure, operation, seed-API µs, pure-function µs) rows."""
    asarray, generator, gaussian = _setup(backend)
    rng = np.random.default_rng(0)
    mean = {
        "weight": asarray(rng.standard_normal((9, 10))),
        "bias": asarray(rng.standard_normal(9)),
    }
    x = asarray(rng.standard_normal((4, 99)))
    rows = []
    for label, make in STRUCTURES.items():
        param = gaussian(mean, make())
        param.cov.reset_parameters(0.1, generator)
        prior = sc.normal_prior(param)
        value = param.sample((4,), generator)
        z = asarray(rng.standard_normal((4, param.cov.num_factor_columns)))
        for operation, (seed, pure) in _pairs(param, prior, value, x, z).items():
            seed_times, pure_times = [], []
            for _ in range(repeat):  # interleaved: the machine's load hits both alike
                seed_times.append(timeit.timeit(seed, number=number) / number)
                pure_times.append(timeit.timeit(pure, number=number) / number)
            rows.append(
                (
                    label,
                    operation,
                    statistics.median(seed_times) * 1e6,
                    statistics.median(pure_times) * 1e6,
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["numpy", "torch"])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=200)
    args = parser.parse_args()
    print("| backend | structure | operation | seed API (µs) | pure function (µs) | ratio |")
    print("|---|---|---|---|---|---|")
    for backend in args.backends:
        for label, operation, seed, pure in measure(backend, args.repeat, args.number):
            print(
                f"| {backend} | {label} | {operation} | {seed:.1f} | {pure:.1f} | "
                f"{seed / pure:.2f} |"
            )


if __name__ == "__main__":
    main()
