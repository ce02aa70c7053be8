"""``python -m structcov``: sample every structure and compare with the exact covariance.

For each covariance structure, builds a GaussianParameter over a small dense
layer and a small conv layer, draws samples and prints, per backend: P, the
factor columns K, storage vs dense size, the largest gap between the empirical
and the exact covariance (with the gap expected from the sample size), and the
time per ``sample`` call. The noise is drawn once with NumPy and handed to
every backend, so the same numbers come out everywhere.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import structcov as sc

BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "cupy")

STRUCTURES: dict[str, Callable[[], sc.FactorizedCovariance]] = {
    "Diagonal": sc.DiagonalCovariance,
    "LowRank(2)": lambda: sc.LowRankCovariance(2),
    "LowRank+Diag(2)": lambda: sc.LowRankPlusDiagonalCovariance(2),
    "Factorized(full)": sc.FactorizedCovariance,
    "Kronecker(full)": sc.KroneckerCovariance,
    "Kronecker(2, 2)": lambda: sc.KroneckerCovariance(input_rank=2, output_rank=2),
}

LAYERS = {
    "dense 4x3+b": {"weight": (4, 3), "bias": (4,)},
    "conv 2x2x2x2+b": {"weight": (2, 2, 2, 2), "bias": (2,)},
}

HEADER = [
    "structure", "layer", "P", "K", "storage/dense", "max gap", "max s.e.",
    "logdet", "KL to N(0,I)", "sample ms", "logdet ms", "KL ms",
]  # fmt: skip


def _namespace(backend: str) -> Any:
    """The array-API namespace of ``backend``; raises ImportError with a one-line reason."""
    if backend == "jax":
        os.environ.setdefault("JAX_ENABLE_X64", "1")
        jax = importlib.import_module("jax")
        jax.config.update("jax_enable_x64", True)
        return importlib.import_module("jax.numpy")
    if backend == "array_api_strict":
        return importlib.import_module("array_api_strict")
    if backend == "cupy":
        cupy = importlib.import_module("cupy")
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise ImportError("no CUDA device")
    return importlib.import_module(f"array_api_compat.{backend}")


def _median_ms(repeats: int, operation: Callable[[], Any], xp: Any) -> tuple[Any, float]:
    """Run ``operation`` ``repeats`` times; return its last result and the median time in ms."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = operation()
        leaf = next(iter(result.values())) if isinstance(result, dict) else result
        float(xp.sum(leaf))  # wait for lazy or asynchronous backends
        times.append(time.perf_counter() - start)
    return result, statistics.median(times) * 1e3


def _build(
    make: Callable[[], sc.FactorizedCovariance],
    means_np: dict[str, Any],
    xp: Any,
    dtype: Any,
    seed: int,
    np: Any,
) -> sc.GaussianParameter:
    """A GaussianParameter on ``xp`` whose covariance values come from NumPy (same everywhere)."""
    reference = sc.GaussianParameter(means_np, make())
    reference.cov.reset_parameters(0.5, generator=np.random.default_rng(seed))
    param = sc.GaussianParameter(
        {n: xp.asarray(v, dtype=dtype) for n, v in means_np.items()}, make()
    )
    param.cov.load_storage(
        {path: xp.asarray(value, dtype=dtype) for path, value in reference.cov.storage().items()}
    )
    return param


def _run_backend(backend: str, xp: Any, args: argparse.Namespace, np: Any) -> list[list[str]]:
    rng = np.random.default_rng(args.seed)
    rows = []
    for layer, shapes in LAYERS.items():
        means_np = {name: rng.standard_normal(shape) for name, shape in shapes.items()}
        for structure, make in STRUCTURES.items():
            print(f"  {layer}: {structure} ...", file=sys.stderr, flush=True)
            param = _build(make, means_np, xp, getattr(xp, args.dtype), args.seed + 1, np)
            rows.append([structure, layer, *_measure(param, xp, args, np)])
    return rows


def _measure(param: sc.GaussianParameter, xp: Any, args: argparse.Namespace, np: Any) -> list[str]:
    """The table cells after the structure and layer names, for one parameter."""
    cov = param.cov
    z = xp.asarray(
        np.random.default_rng(args.seed + 2).standard_normal(
            (args.samples, cov.num_factor_columns)
        ),
        dtype=getattr(xp, args.dtype),
    )
    samples, sample_ms = _median_ms(
        args.repeats, lambda: cov.factor_matmul(z, additive_constant=param.mean), xp
    )
    prior = sc.normal_prior(param, 1.0)
    logdet, logdet_ms = _median_ms(args.repeats, cov.logdet, xp)
    kl, kl_ms = _median_ms(args.repeats, lambda: sc.kl_divergence(param, prior), xp)
    flat = cov.flatten(samples)
    centred = flat - xp.mean(flat, axis=0)
    empirical = xp.matmul(xp.matrix_transpose(centred), centred) / (args.samples - 1)
    exact = cov.to_dense()
    gap = float(xp.max(xp.abs(empirical - exact)))
    # Standard error of a sample covariance entry: sqrt((S_ii S_jj + S_ij^2) / N).
    variances = cov.diagonal()
    outer = xp.expand_dims(variances, axis=1) * xp.expand_dims(variances, axis=0)
    se = float(xp.max(xp.sqrt((outer + exact**2) / args.samples)))
    storage = sum(math.prod(value.shape) for value in cov.storage().values())
    return [
        str(cov.num_params),
        str(cov.num_factor_columns),
        f"{storage}/{cov.num_params**2}",
        f"{gap:.4f}",
        f"{se:.4f}",
        f"{float(logdet):.3f}",
        f"{float(kl):.3f}",
        f"{sample_ms:.2f}",
        f"{logdet_ms:.2f}",
        f"{kl_ms:.2f}",
    ]


def _plot(path: str, args: argparse.Namespace, np: Any) -> None:
    """Heatmaps of each structure's covariance (dense layer) and a scatter of two coordinates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer, shapes = next(iter(LAYERS.items()))
    means_np = {n: np.random.default_rng(args.seed).standard_normal(s) for n, s in shapes.items()}
    columns = math.ceil((len(STRUCTURES) + 1) / 2)
    fig, grid = plt.subplots(2, columns, figsize=(3.3 * columns, 7.0))
    axes = list(grid.flat)
    for ax in axes[len(STRUCTURES) + 1 :]:
        ax.set_axis_off()
    for ax, (structure, make) in zip(axes, STRUCTURES.items(), strict=False):
        cov = _build(make, means_np, np, np.float64, args.seed + 1, np).cov
        dense = cov.to_dense()
        limit = float(np.abs(dense).max())
        ax.imshow(dense, cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(f"{structure}\nK = {cov.num_factor_columns}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    full = _build(sc.FactorizedCovariance, means_np, np, np.float64, args.seed + 1, np)
    dense = full.cov.to_dense()
    sd = np.sqrt(np.diag(dense))
    correlation = dense / np.outer(sd, sd) - np.eye(len(sd))
    i, j = np.unravel_index(np.argmax(np.abs(correlation)), correlation.shape)
    samples = full.cov.flatten(full.sample((2000,), generator=np.random.default_rng(args.seed)))
    scatter = axes[len(STRUCTURES)]
    scatter.scatter(samples[:, i], samples[:, j], s=2, alpha=0.3)
    scatter.set_title(f"Factorized(full) samples\nx[{i}] vs x[{j}], corr = {correlation[i, j]:.2f}")
    scatter.set_aspect("equal", adjustable="datalim")
    fig.suptitle(f"Covariance of each structure over the {layer} layer (P = {len(sd)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_table(rows: list[list[str]]) -> None:
    header = HEADER
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="structcov",
        description=(
            "Sample each covariance structure over a small dense and a small conv layer and "
            "compare the empirical covariance of the samples with the exact one."
        ),
    )
    parser.add_argument(
        "--backend",
        default="numpy",
        choices=[*BACKENDS, "all"],
        help="array library to run on; 'all' runs every installed one (default: numpy)",
    )
    parser.add_argument(
        "--samples", type=int, default=20000, help="samples per structure (default: 20000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of all randomness (default: 0)")
    parser.add_argument(
        "--dtype", default="float64", choices=["float32", "float64"], help="default: float64"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed repeats of each operation (default: 5)"
    )
    parser.add_argument(
        "--plot",
        metavar="PATH",
        help="also write a PNG: each structure's covariance as a heatmap and a scatter of two "
        "correlated coordinates (needs matplotlib: pip install 'structcov[plot]')",
    )
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error("--samples must be at least 2")
    try:
        np = importlib.import_module("numpy")
    except ImportError:
        print(
            "structcov demo: NumPy is needed for the demo's noise: pip install 'structcov[numpy]'"
        )
        return 1

    print(
        f"structcov {sc.__version__}: {args.samples} samples per structure, {args.dtype}, seed "
        f"{args.seed}.\nThe noise is drawn once with NumPy, so every backend prints the same "
        "numbers (up to rounding).\n'max gap' = max |empirical - exact covariance|; 'max s.e.' = "
        "largest standard error of an empirical entry (gaps of a few s.e. are expected).\n"
        "LowRank(2) and Kronecker(2, 2) are singular: logdet = -inf, KL to the prior = inf."
    )
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    ran = 0
    for backend in backends:
        try:
            xp = _namespace(backend)
        except Exception as error:  # any import failure is a one-line skip
            print(f"\n[{backend}] skipped: {type(error).__name__}: {error}".splitlines()[0])
            continue
        print(f"\n[{backend}]", flush=True)
        _print_table(_run_backend(backend, xp, args, np))
        ran += 1
    if args.plot:
        try:
            _plot(args.plot, args, np)
        except ImportError as error:
            print(f"--plot needs matplotlib (pip install 'structcov[plot]'): {error}")
            return 1
        print(f"\nwrote {args.plot}")
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
