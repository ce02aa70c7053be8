"""Proof at scale with dask: LowRankPlusDiagonalCovariance over P = 2e8 float32, never held whole.

    python benchmarks/scale_out.py [--P 2e8] [--rank 16] [--chunk 2e6]
                                   [--scheduler threads|distributed|both|none]
                                   [--numpy-P 2e6] [--numpy-chunk 5e5] [--threads 2]
                                   [--workers 2] [--worker-threads 1] [--worker-memory 6GB]
                                   [--prior normal_prior|like-means] [--json out.json]

One flat mean ``m`` of shape (P,), the factor ``U`` (P, rank) and the scale ``d`` (P,)
are dask arrays chunked along P (the rank axis in one chunk); every chunk is generated
from its own seed (``numpy.random.default_rng([seed, kind, chunk])``) when a task needs
it, so the factor (12.8 GB at P = 2e8, rank 16, float32) is never held whole. structcov
builds ``diagonal`` (reduced to its sum, min and max: P floats do not fit a report),
``trace``, ``logdet`` and ``KL(q || N(0, sigma^2 I))`` lazily, and one ``dask.compute``
evaluates all of them, so each factor chunk is generated once per scheduler (counted on
the threaded scheduler).

Each run is a fresh subprocess (the reference too, so that the process spawning them
stays small). Its peak memory is the resident set size (RSS) sampled every 50 ms
during the compute:

- ``threads``: dask's threaded scheduler (``--threads`` threads): that process's RSS.
- ``distributed``: a ``dask.distributed.LocalCluster`` of ``--workers`` worker processes
  with ``--worker-threads`` threads and ``--worker-memory`` each: the sum of each
  worker's sampled peak (a sampler thread started in each worker with ``client.run``)
  and of the peak of the process holding the client, the scheduler and the nannies. A
  sum of peaks: an upper bound of what was resident at one time.
- ``numpy``: the same structcov code on NumPy arrays at ``--numpy-P`` (inputs built
  whole from the same chunks first, and included in its RSS). The same P also runs on
  dask (threads) with ``--numpy-chunk`` rows per chunk.

The JSON also keeps ``ru_maxrss`` (``max_rss_bytes``): it cannot miss a spike between
samples, but Linux carries the spawning process's RSS into it.

The float64 reference is written without structcov: plain NumPy over the same chunks
(regenerated from the same seeds, cast to float64), accumulating diag(Sigma) checksums,
||U||^2, sum log d^2, the Gram matrix U^T D^-1 U and the KL terms per chunk; logdet from
``numpy.linalg.slogdet`` of the r x r capacitance I + U^T D^-1 U. Every result is
reported as its relative error |x - ref| / |ref|.

Dask runs set ``OMP/OPENBLAS/MKL_NUM_THREADS=1`` (dask parallelises over chunks); the
NumPy run keeps the BLAS default.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import load_average, machine_info

KINDS = {"mean": 0, "factor": 1, "scale": 2}
RESULTS = ("diagonal_sum", "diagonal_min", "diagonal_max", "trace", "logdet", "kl")
SINGLE_THREAD_BLAS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# ------------------------------------------------------------------ data, chunk by chunk


def chunk_sizes(num_params: int, chunk: int) -> tuple[int, ...]:
    """Rows per chunk: ``chunk`` each, the last one what is left."""
    full, rest = divmod(num_params, chunk)
    return (chunk,) * full + ((rest,) if rest else ())


def block(kind: str, seed: int, index: int, rows: int, rank: int) -> np.ndarray:
    """Chunk ``index`` (``rows`` rows) of the mean, the factor U or the scale d, float32.

    m = 0.1 z, U = 0.05 / sqrt(rank) z, d = 0.05 exp(0.2 z): a posterior much narrower than
    the N(0, 1) prior, with the low-rank part carrying most of the variance.
    """
    rng = np.random.default_rng([seed, KINDS[kind], index])
    if kind == "factor":
        out = rng.standard_normal((rows, rank), dtype=np.float32)
        out *= np.float32(0.05 / math.sqrt(rank))
        return out
    out = rng.standard_normal(rows, dtype=np.float32)
    if kind == "mean":
        out *= np.float32(0.1)
        return out
    out *= np.float32(0.2)
    np.exp(out, out=out)
    out *= np.float32(0.05)
    return out


#: one entry per chunk generated in this process (``list.append`` is atomic: no lock to pickle)
_GENERATED: list[str] = []


def _dask_block(
    index: np.ndarray, *, kind: str, seed: int, sizes: tuple[int, ...], rank: int
) -> np.ndarray:
    i = int(index[0])
    _GENERATED.append(kind)
    return block(kind, seed, i, sizes[i], rank)


def dask_inputs(num_params: int, rank: int, chunk: int, seed: int) -> dict[str, Any]:
    """Lazy dask arrays m (P,), U (P, rank), d (P,): one task per chunk, nothing computed."""
    import dask.array as da

    sizes = chunk_sizes(num_params, chunk)
    index = da.arange(len(sizes), chunks=1)
    common = {"seed": seed, "sizes": sizes, "rank": rank, "dtype": np.float32}
    vector = {"chunks": (sizes,), "meta": np.empty((0,), dtype=np.float32)}
    return {
        "mean": index.map_blocks(_dask_block, kind="mean", **common, **vector),
        "factor": index.map_blocks(
            _dask_block,
            kind="factor",
            **common,
            chunks=(sizes, (rank,)),
            new_axis=1,
            meta=np.empty((0, 0), dtype=np.float32),
        ),
        "scale": index.map_blocks(_dask_block, kind="scale", **common, **vector),
    }


def numpy_inputs(num_params: int, rank: int, chunk: int, seed: int) -> dict[str, np.ndarray]:
    """The same arrays as `dask_inputs`, built whole in NumPy (same chunks, same seeds)."""
    sizes = chunk_sizes(num_params, chunk)
    return {
        kind: np.concatenate([block(kind, seed, i, rows, rank) for i, rows in enumerate(sizes)])
        for kind in KINDS
    }


# ------------------------------------------------------------------ structcov


def structcov_results(
    inputs: dict[str, Any], rank: int, sigma: float, prior: str = "normal_prior"
) -> dict[str, Any]:
    """diag(Sigma) checksums, trace, logdet and KL to N(0, sigma^2 I): lazy on dask.

    ``prior="normal_prior"`` builds the prior with `structcov.normal_prior`;
    ``"like-means"`` builds the same N(0, sigma^2 I) from ``zeros_like``/``full_like``
    of the mean, so on dask its arrays have the mean's chunks.
    """
    import array_api_compat

    import structcov as sc

    # identity: ``inputs["scale"]`` holds d itself
    q = sc.GaussianParameter(
        inputs["mean"], sc.LowRankPlusDiagonalCovariance(rank, scale_transform="identity")
    )
    q.cov.load_storage({"factor.mean": inputs["factor"], "scale.mean": inputs["scale"]})
    diagonal = q.cov.diagonal()
    xp = array_api_compat.array_namespace(diagonal)
    if prior == "normal_prior":
        p = sc.normal_prior(q, sigma)
    elif prior == "like-means":
        p = sc.GaussianParameter(
            xp.zeros_like(inputs["mean"]), sc.DiagonalCovariance(scale_transform="identity")
        )
        p.cov.load_storage({"scale.mean": xp.full_like(inputs["mean"], sigma)})
    else:
        raise ValueError(f"`prior` must be normal_prior or like-means, got {prior!r}")
    return {
        "diagonal_sum": xp.sum(diagonal),
        "diagonal_min": xp.min(diagonal),
        "diagonal_max": xp.max(diagonal),
        "trace": q.cov.trace(),
        "logdet": q.cov.logdet(),
        "kl": sc.kl_divergence(q, p),
    }


# ------------------------------------------------------------------ float64 reference


def _reference_chunk(index: int, rows: int, rank: int, seed: int, sigma: float) -> dict[str, Any]:
    m = block("mean", seed, index, rows, rank).astype(np.float64)
    u = block("factor", seed, index, rows, rank).astype(np.float64)
    d2 = block("scale", seed, index, rows, rank).astype(np.float64) ** 2
    row_norms = np.einsum("ij,ij->i", u, u)
    diagonal = row_norms + d2
    ratio = d2 / sigma**2
    return {
        "diagonal_sum": float(np.sum(diagonal)),
        "diagonal_min": float(np.min(diagonal)),
        "diagonal_max": float(np.max(diagonal)),
        "u2": float(np.sum(row_norms)),
        "log_d2": float(np.sum(np.log(d2))),
        "kl_diagonal": float(np.sum(ratio - 1.0 - np.log(ratio))),
        "m2": float(np.sum(m * m)),
        "gram": u.T @ (u / d2[:, None]),
    }


def reference(
    num_params: int, rank: int, chunk: int, seed: int, sigma: float, threads: int = 2
) -> dict[str, float]:
    """The results in float64, chunk by chunk, without structcov (plain NumPy)."""
    sizes = chunk_sizes(num_params, chunk)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        parts = list(
            pool.map(
                lambda item: _reference_chunk(item[0], item[1], rank, seed, sigma),
                enumerate(sizes),
            )
        )
    total = {key: math.fsum(p[key] for p in parts) for key in ("diagonal_sum", "u2", "log_d2")}
    kl_diagonal = math.fsum(p["kl_diagonal"] for p in parts)
    m2 = math.fsum(p["m2"] for p in parts)
    gram = np.sum([p["gram"] for p in parts], axis=0)
    sign, logdet_c = np.linalg.slogdet(np.eye(rank) + gram)
    assert sign > 0, "the capacitance I + U^T D^-1 U is positive definite"
    return {
        "diagonal_sum": total["diagonal_sum"],
        "diagonal_min": min(p["diagonal_min"] for p in parts),
        "diagonal_max": max(p["diagonal_max"] for p in parts),
        "trace": total["diagonal_sum"],  # tr Sigma = ||U||^2 + sum d^2 = sum of diag(Sigma)
        "logdet": float(logdet_c) + total["log_d2"],
        # KL(N(m, D + UU^T) || N(0, s^2 I))
        #   = 0.5 [sum(d^2/s^2 - 1 - log(d^2/s^2)) + ||U||^2/s^2 + ||m||^2/s^2 - log det C]
        "kl": 0.5 * (kl_diagonal + total["u2"] / sigma**2 + m2 / sigma**2 - float(logdet_c)),
    }


# ------------------------------------------------------------------ memory


def _max_rss() -> int:
    """This process's peak resident set size so far, in bytes (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _rss() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


class _RssSampler:
    """Samples this process's RSS every ``interval`` seconds in a thread; ``peak`` is the max.

    Covers the compute only; may miss a spike shorter than the interval. ``peak`` stays
    ``None`` without psutil.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak = interval, _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = _rss()
            if rss is not None and (self.peak is None or rss > self.peak):
                self.peak = rss

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        rss = _rss()
        if rss is not None and (self.peak is None or rss > self.peak):
            self.peak = rss


def _worker_memory() -> dict[str, int | None]:
    """Run in each worker by ``client.run``: its current and peak RSS."""
    import resource as resource_module
    import sys as sys_module

    try:
        import psutil

        rss: int | None = int(psutil.Process().memory_info().rss)
    except ImportError:
        rss = None
    peak = resource_module.getrusage(resource_module.RUSAGE_SELF).ru_maxrss
    return {"rss": rss, "max_rss": int(peak if sys_module.platform == "darwin" else peak * 1024)}


# ------------------------------------------------------------------ one measured run


def _start_worker_sampler(dask_worker: Any) -> None:
    """``client.run``: start sampling this worker's RSS (kept on the worker object)."""
    sampler = _RssSampler()
    sampler.__enter__()
    dask_worker._scale_out_sampler = sampler


def _stop_worker_sampler(dask_worker: Any) -> dict[str, int | None]:
    """``client.run``: stop the worker's sampler; its sampled peak and its ``ru_maxrss``."""
    sampler = dask_worker._scale_out_sampler
    sampler.__exit__()
    return {"peak": sampler.peak, **_worker_memory()}


def _memory(row: dict[str, Any], baseline: int | None, sampled: int | None) -> None:
    """Record the baseline and the sampled peak (``ru_maxrss`` where psutil is missing)."""
    row["baseline_bytes"] = baseline
    row["max_rss_bytes"] = _max_rss()
    row["peak_bytes"] = sampled if sampled is not None else row["max_rss_bytes"]


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One run in this (fresh) process: ``reference``, ``numpy``, ``threads``, ``distributed``.

    Peak memory is the resident set size sampled every 50 ms during the compute
    (`_RssSampler`); ``max_rss_bytes`` (``ru_maxrss``) is kept as a cross-check: it
    cannot miss a spike, but Linux carries the spawning process's RSS into it.
    """
    kind, p, rank = args.run_one, args.P, args.rank
    row: dict[str, Any] = {"run": kind, "P": p, "rank": rank, "chunk": args.chunk}
    row["prior"] = args.prior
    row["factor_bytes"] = p * rank * 4
    if kind == "reference":
        baseline = _rss()
        start = time.perf_counter()
        with _RssSampler() as sampler:
            row["values"] = reference(
                p, rank, args.chunk, args.seed, args.sigma, args.reference_threads
            )
        row["compute_s"] = time.perf_counter() - start
        _memory(row, baseline, sampler.peak)
        return row
    if kind == "numpy":
        inputs = numpy_inputs(p, rank, args.chunk, args.seed)
        row.update(backend="numpy", scheduler="-", n_chunks=1, build_s=0.0)
        baseline = _rss()
        start = time.perf_counter()
        with _RssSampler() as sampler:
            results = structcov_results(inputs, rank, args.sigma, args.prior)
        row["compute_s"] = time.perf_counter() - start
        row["values"] = {key: float(value) for key, value in results.items()}
        _memory(row, baseline, sampler.peak)
        row["peak_how"] = "process RSS sampled every 50 ms, inputs held whole"
        return row

    import dask

    row.update(backend="dask", scheduler=kind, n_chunks=len(chunk_sizes(p, args.chunk)))
    start = time.perf_counter()
    inputs = dask_inputs(p, rank, args.chunk, args.seed)
    lazy = structcov_results(inputs, rank, args.sigma, args.prior)
    row["build_s"] = time.perf_counter() - start
    if kind == "threads":
        row["threads"] = args.threads
        with dask.config.set(scheduler="threads", num_workers=args.threads):
            baseline = _rss()
            start = time.perf_counter()
            with _RssSampler() as sampler:
                (values,) = dask.compute(lazy)
            row["compute_s"] = time.perf_counter() - start
        _memory(row, baseline, sampler.peak)
        row["peak_how"] = "process RSS sampled every 50 ms"
        row["generated_chunks"] = {kind: _GENERATED.count(kind) for kind in KINDS}
    elif kind == "distributed":
        from distributed import Client, LocalCluster

        row.update(
            workers=args.workers, threads=args.worker_threads, worker_memory=args.worker_memory
        )
        with (
            LocalCluster(
                n_workers=args.workers,
                threads_per_worker=args.worker_threads,
                memory_limit=args.worker_memory,
                processes=True,
                dashboard_address=None,
            ) as cluster,
            Client(cluster) as client,
        ):
            before = client.run(_worker_memory)
            client_rss = _rss()
            client.run(_start_worker_sampler)
            start = time.perf_counter()
            with _RssSampler() as sampler:
                (values,) = dask.compute(lazy)
            row["compute_s"] = time.perf_counter() - start
            after = client.run(_stop_worker_sampler)
        workers = list(after.values())
        row["worker_peak_bytes"] = [m["peak"] for m in workers]
        row["worker_max_rss_bytes"] = [m["max_rss"] for m in workers]
        row["client_peak_bytes"] = sampler.peak
        baseline = sum(m["rss"] or 0 for m in before.values()) + (client_rss or 0)
        _memory(row, baseline, sum(m["peak"] or 0 for m in workers) + (sampler.peak or 0))
        row["max_rss_bytes"] = sum(row["worker_max_rss_bytes"]) + _max_rss()
        row["peak_how"] = (
            "sum of each worker's and of the client/scheduler/nanny process's RSS, each "
            "sampled every 50 ms (a sum of peaks)"
        )
    else:
        raise ValueError(
            f"`--run-one` must be reference, numpy, threads or distributed, got {kind!r}"
        )
    row["values"] = {key: float(value) for key, value in values.items()}
    return row


def _spawn(args: argparse.Namespace, kind: str, p: int, chunk: int) -> dict[str, Any]:
    """Run `run_one` in a fresh interpreter and return its row."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--run-one",
        kind,
        "--P",
        str(p),
        "--chunk",
        str(chunk),
        "--rank",
        str(args.rank),
        "--seed",
        str(args.seed),
        "--sigma",
        str(args.sigma),
        "--threads",
        str(args.threads),
        "--workers",
        str(args.workers),
        "--worker-threads",
        str(args.worker_threads),
        "--worker-memory",
        args.worker_memory,
        "--prior",
        args.prior,
        "--reference-threads",
        str(args.reference_threads),
    ]
    env = dict(os.environ)
    if kind in ("threads", "distributed"):
        env.update(SINGLE_THREAD_BLAS)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} run at P = {p:,} failed:\n{done.stderr[-6000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ report


def _gb(value: int | None) -> str:
    return "?" if value is None else f"{value / 1e9:.2f} GB"


def relative_errors(values: dict[str, float], ref: dict[str, float]) -> dict[str, float]:
    return {key: abs(values[key] - ref[key]) / abs(ref[key]) for key in RESULTS}


def markdown(
    rows: list[dict[str, Any]], references: dict[tuple[int, int], dict[str, float]]
) -> str:
    lines = [
        "| P | run | chunks | wall s | peak memory (before compute) | factor size"
        " | rel. error: diag sum · min · max | trace | logdet | KL |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        err = row["relative_errors"]
        if row["backend"] == "numpy":
            run = "numpy"
        elif row["scheduler"] == "threads":
            run = f"dask threads ({row['threads']} threads)"
        else:
            run = (
                f"dask distributed ({row['workers']} workers x {row['threads']} thread,"
                f" {row['worker_memory']} each)"
            )
        chunks = f"{row['n_chunks']} x {row['chunk']:,}" if row["backend"] == "dask" else "whole"
        if row.get("prior", "normal_prior") != "normal_prior":
            run += f", prior {row['prior']}"
        lines.append(
            f"| {row['P']:,} | {run} | {chunks} | {row['compute_s']:.1f} | "
            f"{_gb(row['peak_bytes'])} ({_gb(row['baseline_bytes'])}) | "
            f"{_gb(row['factor_bytes'])} | "
            f"{err['diagonal_sum']:.1e} · {err['diagonal_min']:.1e} · {err['diagonal_max']:.1e} | "
            f"{err['trace']:.1e} | {err['logdet']:.1e} | {err['kl']:.1e} |"
        )
    lines += ["", "| P | reference (float64): trace | logdet | KL | reference wall s |"]
    lines.append("|---|---|---|---|---|")
    for (p, _), ref in references.items():
        lines.append(
            f"| {p:,} | {ref['trace']:.9g} | {ref['logdet']:.9g} | {ref['kl']:.9g} | "
            f"{ref['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def _load(load: tuple[float, float, float] | None) -> str:
    return "?" if load is None else ", ".join(f"{x:.1f}" for x in load)


def _versions() -> dict[str, str]:
    import importlib.metadata

    found = {}
    for package in ("dask", "distributed", "array-api-compat", "structcov"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _count(text: str) -> int:
    value = float(text)
    if value != int(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--P", type=_count, default=200_000_000, help="parameters (2e8)")
    parser.add_argument("--rank", type=_count, default=16)
    parser.add_argument("--chunk", type=_count, default=2_000_000, help="rows per chunk (2e6)")
    parser.add_argument(
        "--scheduler", choices=["threads", "distributed", "both", "none"], default="both"
    )
    parser.add_argument(
        "--numpy-P", type=_count, default=2_000_000, help="NumPy comparison P (2e6; 0: none)"
    )
    parser.add_argument(
        "--numpy-chunk", type=_count, default=500_000, help="rows per chunk of its dask run"
    )
    parser.add_argument("--threads", type=_count, default=2, help="threaded scheduler threads")
    parser.add_argument("--workers", type=_count, default=2, help="LocalCluster workers")
    parser.add_argument("--worker-threads", type=_count, default=1)
    parser.add_argument("--worker-memory", default="6GB", help="LocalCluster memory_limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sigma", type=float, default=1.0, help="prior standard deviation")
    parser.add_argument(
        "--prior",
        choices=["normal_prior", "like-means"],
        default="normal_prior",
        help="build N(0, sigma^2 I) with structcov.normal_prior (default) or from "
        "zeros_like/full_like of the mean (dask: chunked like the mean)",
    )
    parser.add_argument("--reference-threads", type=_count, default=2)
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.run_one:
        print(json.dumps(run_one(args)))
        return 0

    schedulers = {"both": ["threads", "distributed"], "none": []}.get(
        args.scheduler, [args.scheduler]
    )
    plan: list[tuple[str, int, int]] = []
    if args.P < 1 or args.chunk < 1:
        parser.error("`--P` and `--chunk` must be at least 1")
    if args.numpy_P:
        plan += [
            ("numpy", args.numpy_P, args.numpy_chunk),
            ("threads", args.numpy_P, args.numpy_chunk),
        ]
    plan += [(kind, args.P, args.chunk) for kind in schedulers]
    plan = list(dict.fromkeys(plan))  # --numpy-P = --P: one threaded run

    started = time.time()
    load_before = load_average()
    references: dict[tuple[int, int], dict[str, float]] = {}
    rows = []
    for kind, p, chunk in plan:
        if (p, chunk) not in references:  # the chunks' seeds depend on the chunk size
            # In its own process too: this one stays small, so that the runs it spawns
            # do not inherit a large RSS (Linux carries it into their ru_maxrss).
            done = _spawn(args, "reference", p, chunk)
            ref = {**done["values"], "wall_s": done["compute_s"], "peak_bytes": done["peak_bytes"]}
            references[p, chunk] = ref
            print(f"reference P = {p:,}: {ref['wall_s']:.1f} s", file=sys.stderr)
        row = _spawn(args, kind, p, chunk)
        row["relative_errors"] = relative_errors(row["values"], references[p, chunk])
        rows.append(row)
        print(
            f"{kind} P = {p:,}: {row['compute_s']:.1f} s, peak {_gb(row['peak_bytes'])}",
            file=sys.stderr,
        )

    load = load_average()
    machine = machine_info()
    machine["versions"].update(_versions())
    print(
        f"LowRankPlusDiagonalCovariance({args.rank}), float32, seed {args.seed}, "
        f"prior N(0, {args.sigma}^2 I); {machine['cpu']}, {machine['cpus']} CPUs, "
        f"{(machine['memory_bytes'] or 0) / 2**30:.0f} GiB; load average (1, 5, 15 min) "
        f"before {_load(load_before)}, after {_load(load)}; {time.time() - started:.0f} s in all"
    )
    print(", ".join(f"{k} {v}" for k, v in machine["versions"].items()))
    print(markdown(rows, references))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "argv": sys.argv[1:] if argv is None else argv,
                    "started": started,
                    "load_average_before": load_before,
                    "load_average_after": load,
                    "machine": machine,
                    "rows": rows,
                    "references": [
                        {"P": p, "chunk": chunk, **ref} for (p, chunk), ref in references.items()
                    ],
                },
                handle,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
