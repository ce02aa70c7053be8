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
    "Factorized(full)": sc.FactorizedCovariance,
    "Kronecker(full)": sc.KroneckerCovariance,
    "Kronecker(2, 2)": lambda: sc.KroneckerCovariance(input_rank=2, output_rank=2),
}

LAYERS = {
    "dense 4x3+b": {"weight": (4, 3), "bias": (4,)},
    "conv 2x2x2x2+b": {"weight": (2, 2, 2, 2), "bias": (2,)},
}


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


def _run_backend(backend: str, xp: Any, args: argparse.Namespace, np: Any) -> list[list[str]]:
    rng = np.random.default_rng(args.seed)
    dtype = getattr(xp, args.dtype)
    rows = []
    for layer, shapes in LAYERS.items():
        means_np = {name: rng.standard_normal(shape) for name, shape in shapes.items()}
        for structure, make in STRUCTURES.items():
            cov = make()
            param = sc.GaussianParameter(
                {name: xp.asarray(value, dtype=dtype) for name, value in means_np.items()}, cov
            )
            # Covariance parameters and noise from NumPy: identical on every backend.
            reference = make()
            sc.GaussianParameter(means_np, reference)
            reference.reset_parameters(0.5, generator=np.random.default_rng(args.seed + 1))
            cov.load_storage(
                {
                    path: xp.asarray(value, dtype=dtype)
                    for path, value in reference.storage().items()
                }
            )
            z = xp.asarray(
                np.random.default_rng(args.seed + 2).standard_normal(
                    (args.samples, cov.num_factor_columns)
                ),
                dtype=dtype,
            )
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                samples = cov.factor_matmul(z, additive_constant=param.mean)
                float(xp.sum(samples[param.names[0]]))  # wait for lazy/async backends
                times.append(time.perf_counter() - start)
            flat = xp.concat(
                [xp.reshape(samples[name], (args.samples, -1)) for name in param.names], axis=1
            )
            centred = flat - xp.mean(flat, axis=0)
            empirical = xp.matmul(xp.matrix_transpose(centred), centred) / (args.samples - 1)
            exact = cov.to_dense()
            gap = float(xp.max(xp.abs(empirical - exact)))
            # Standard error of a sample covariance entry: sqrt((S_ii S_jj + S_ij^2) / N).
            diag = xp.linalg.diagonal(exact)
            se = xp.sqrt((diag[:, None] * diag[None, :] + exact**2) / args.samples)
            expected = float(xp.max(se))
            storage = sum(math.prod(value.shape) for value in cov.storage().values())
            rows.append(
                [
                    structure,
                    layer,
                    str(cov.num_params),
                    str(cov.num_factor_columns),
                    f"{storage} / {cov.num_params**2}",
                    f"{gap:.4f}",
                    f"{expected:.4f}",
                    f"{statistics.median(times) * 1e3:.2f}",
                ]
            )
    return rows


def _print_table(rows: list[list[str]]) -> None:
    header = ["structure", "layer", "P", "K", "storage / dense", "max gap", "max s.e.", "sample ms"]
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
        "--repeats", type=int, default=5, help="timed repeats of each sample call (default: 5)"
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
        "largest standard error of an empirical entry (gaps of a few s.e. are expected)."
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
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
