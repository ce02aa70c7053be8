"""structcov benchmark suite: time and peak memory per backend, structure, operation and P.

    python benchmarks/suite.py [--backends numpy,torch,jax] [--sizes 1e2,1e3,...,1e7]
                               [--smoke] [--out DIR] [--device cpu|cuda] [--update-docs]

For every backend, structure, operation and P it measures three variants in the same
process, interleaved round by round (so load changes hit all three alike): structcov,
the same maths hand-written natively in that backend, and a *floor* (the unavoidable
GEMM(s) or elementwise pass of the same shapes; see ``_structures.py``). It reports the
median time per call, the ratios structcov/native and structcov/floor, and the peak
memory of one call of structcov and of the native version (method per backend in
``_backends.py``). Outputs go to ``--out`` (default ``benchmarks/results``):
``results.json``, ``results.md``, ``targets.md`` (the issue's targets: measured ratio,
threshold, met or not) and ``time_vs_P.png`` (needs matplotlib).

``--smoke`` runs every structure and operation once at P = 100 (seconds): it checks
that the suite, the native baselines and the report still work, not the timings.
``--update-docs`` copies the tables into ``docs/performance.md`` and the figure to
``docs/img/time_vs_P.png``.

Before timing, each structcov result is compared with the native one (same random
numbers, float32 tolerance) for P <= 1e5, so a baseline that drifts from structcov's
maths shows up as a ``MISMATCH`` in the tables (and fails the smoke test).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from _backends import Kit, backend_unavailable
from _common import layer_shape, load_average, machine_info
from _report import evaluate_targets, update_docs, write_outputs
from _structures import (
    MATMUL_BATCH,
    OPERATIONS,
    Layer,
    Structure,
    default_structures,
    sample_batch,
    structure_id,
)

import structcov as sc

HERE = Path(__file__).resolve().parent
DEFAULT_SIZES = (10**2, 10**3, 10**4, 10**5, 10**6, 10**7)
SMOKE_SIZES = (10**2,)
#: structcov is compared with the native result up to this P (above, only timed)
CHECK_MAX_PARAMS = 10**5
#: relative tolerance (to the largest magnitude) of that comparison, float32
CHECK_RTOL = 2e-3
#: one timing sample lasts at least this long (calls are repeated inside it)
MIN_SAMPLE_S = 2e-3
#: wall-clock budget of the timed rounds of one (structure, P, operation)
GROUP_BUDGET_S = 0.4
MAX_REPEATS = 15


# ------------------------------------------------------------------- the plan
def target_configs(smoke: bool) -> list[tuple[str, int]]:
    """(structure id, P) pairs the targets need, whatever ``--sizes`` says."""
    if smoke:
        return []
    return [
        ("low_rank_r32", 10**6),
        ("kronecker", 256 * 257),  # 256 outputs x 256 inputs + bias
        ("diagonal", 10**6),
        ("low_rank_plus_diagonal_r64", 10**6),
        *[(structure_id(s), 10**2) for s in default_structures()],
    ]


def build_plan(
    structures: list[Structure], sizes: list[int], with_targets: bool, smoke: bool
) -> list[tuple[Structure, int]]:
    by_id = {structure_id(s): s for s in structures}
    pairs = {(structure_id(s), p) for s in structures for p in sizes if p <= s.max_params}
    if with_targets:
        pairs |= {(sid, p) for sid, p in target_configs(smoke) if sid in by_id}
    order = [structure_id(s) for s in structures]
    return [(by_id[sid], p) for sid, p in sorted(pairs, key=lambda x: (order.index(x[0]), x[1]))]


# -------------------------------------------------------------- the variants
def _build_param(structure: Structure, means: tuple[Any, ...], storage: dict[str, Any]) -> Any:
    q = sc.GaussianParameter(dict(zip(Layer.names, means, strict=True)), structure.make_cov())
    q.cov.load_storage(storage)
    return q


def _structcov_call(op: str, batch: int) -> Callable[[Any, Any, Any, dict[str, Any]], Any]:
    def call(q: Any, prior: Any, gen: Any, extra: dict[str, Any]) -> Any:
        if op == "sample":
            return q.sample((batch,), generator=gen)
        if op == "factor_matmul":
            means = {name: q.mean[name] for name in q.names}
            return q.cov.factor_matmul(extra["z"], additive_constant=means)
        if op == "matmul":
            return q.cov.matmul(extra["x"])
        if op == "diagonal":
            return q.cov.diagonal()
        if op == "trace":
            return q.cov.trace()
        if op == "logdet":
            return q.cov.logdet()
        if op == "kl":  # KL(q || N(0, I)): the float prior, as a training loop writes it
            return sc.kl_divergence(q, 1.0)
        raise ValueError(f"unknown operation {op!r}")

    return call


def _flatten(kit: Kit, out: Any) -> np.ndarray:
    if isinstance(out, dict):
        parts = [kit.to_numpy(out[name]) for name in Layer.names]
        batch = parts[0].shape[0]
        return np.concatenate([part.reshape(batch, -1) for part in parts], axis=1).ravel()
    return kit.to_numpy(out).ravel()


def _compare(kit: Kit, got: Any, expected: Any) -> str:
    a, b = _flatten(kit, got), _flatten(kit, expected)
    if a.shape != b.shape:
        return f"MISMATCH: shapes {a.shape} vs {b.shape}"
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        same = np.array_equal(a, b)
        return "ok (non-finite, equal)" if same else "MISMATCH: non-finite values differ"
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    error = float(np.max(np.abs(a - b))) / (scale or 1.0) if a.size else 0.0
    return f"ok (rel {error:.1e})" if error <= CHECK_RTOL else f"MISMATCH (rel {error:.1e})"


# -------------------------------------------------------------------- timing
def _time_batch(kit: Kit, call: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        out = call()
        kit.sync(out)
        del out
    return (time.perf_counter() - start) / number


def time_variants(
    kit: Kit,
    calls: dict[str, Callable[[], Any]],
    warm_up_s: dict[str, float],
    *,
    smoke: bool,
    min_repeats: int,
) -> dict[str, Any]:
    """Median seconds per call of each variant, rounds interleaved (order rotating).

    ``warm_up_s`` are the durations of the first calls: a variant whose first call took
    over 0.1 s is slow enough to time one call per sample (no calibration call).
    """
    names = list(calls)
    if smoke:
        numbers = dict.fromkeys(names, 1)
        repeats = 1
    else:
        first = {
            name: warm_up_s[name] if warm_up_s[name] > 0.1 else _time_batch(kit, calls[name], 1)
            for name in names
        }
        numbers = {
            name: max(1, min(1000, math.ceil(MIN_SAMPLE_S / max(first[name], 1e-9))))
            for name in names
        }
        per_round = sum(first[name] * numbers[name] for name in names)
        repeats = int(min(MAX_REPEATS, max(min_repeats, round(GROUP_BUDGET_S / per_round))))
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.disable()  # no collection pauses inside the timed rounds (as timeit does)
    try:
        for index in range(repeats):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(_time_batch(kit, calls[name], numbers[name]))
    finally:
        gc.enable()
    return {
        "median_s": {name: statistics.median(samples[name]) for name in names},
        "samples_s": samples,
        "number": numbers,
        "repeats": repeats,
    }


# ----------------------------------------------------------------- measuring
def _format_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def measure_structure(
    kit: Kit, structure: Structure, num_params: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Every operation of one structure at one P on one backend."""
    shape = Layer(*layer_shape(num_params))
    batch = sample_batch(num_params, structure.num_columns(shape))
    layer = Layer(shape.d_out, shape.d_in, batch)
    rng = np.random.default_rng(20240601 + num_params)
    flat_np = structure.arrays(layer, rng)
    flat = {name: kit.asarray(value) for name, value in flat_np.items()}
    storage = {path: kit.asarray(v) for path, v in structure.storage(layer, flat_np).items()}
    means = tuple(kit.asarray(v) for v in layer.mean_views(flat_np["m"]))
    num_columns = structure.num_columns(layer)
    eager_q = eager_prior = None
    if not kit.jit:
        eager_q = _build_param(structure, means, storage)

    rows = []
    for op in args.operations:
        batches = {"sample": batch, "factor_matmul": batch, "matmul": MATMUL_BATCH}
        row: dict[str, Any] = {
            "backend": kit.label,
            "backend_name": kit.name,
            "device": kit.device,
            "structure": structure_id(structure),
            "label": structure.label,
            "P": num_params,
            "d_out": layer.d_out,
            "d_in": layer.d_in,
            "K": num_columns,
            "op": op,
            "batch": batches.get(op),
            "native": structure.natives.get(op, ""),
            "floor": structure.floors.get(op, ""),
        }
        rows.append(row)
        if op in structure.skips:
            row["skipped"] = structure.skips[op]
            continue
        extra_np: dict[str, np.ndarray] = {}
        if op == "factor_matmul":
            extra_np["z"] = rng.standard_normal((layer.batch, num_columns), dtype=np.float32)
        if op == "matmul":
            extra_np["x"] = rng.standard_normal((MATMUL_BATCH, num_params), dtype=np.float32)
        extra = {key: kit.asarray(value) for key, value in extra_np.items()}
        floor_np = structure.floor_extras(layer, flat_np, op, rng)
        floor_extra = {**extra, **{key: kit.asarray(v) for key, v in floor_np.items()}}

        call = _structcov_call(op, layer.batch)
        if kit.jit:

            def jitted(gen: Any, m: Any, s: Any, e: Any, call: Any = call, op: str = op) -> Any:
                q = _build_param(structure, m, s)
                return call(q, None, gen, e)

            structcov_variant = kit.prepare(jitted, (means, storage, extra))
        else:
            structcov_variant = kit.prepare(
                lambda gen, q, prior, e, call=call: call(q, prior, gen, e),
                (eager_q, eager_prior, extra),
            )
        variants = {
            "structcov": structcov_variant,
            "native": kit.prepare(structure.native(kit, layer, op), (flat, extra)),
            "floor": kit.prepare(structure.floor(kit, layer, op), (flat, floor_extra)),
        }

        # First call of each: warm-up (and JAX compilation), peak memory, and the check.
        # (The smoke run measures memory for `sample` only: the torch profiler is slow.)
        with_memory = not args.smoke or op == "sample"
        warm_up: dict[str, float] = {}
        start = time.perf_counter()
        out_sc, peak_sc = _first_call(kit, variants["structcov"], with_memory)
        warm_up["structcov"] = row["first_call_s"] = time.perf_counter() - start
        start = time.perf_counter()
        out_native, peak_native = _first_call(kit, variants["native"], with_memory)
        warm_up["native"] = time.perf_counter() - start
        row["peak_bytes"] = peak_sc
        row["native_peak_bytes"] = peak_native
        row["output_bytes"] = kit.nbytes(out_sc)
        if op in ("sample", "factor_matmul"):
            row["z_bytes"] = layer.batch * num_columns * 4
        row["check"] = (
            _compare(kit, out_sc, out_native)
            if num_params <= CHECK_MAX_PARAMS
            else "not checked (P > 1e5)"
        )
        del out_sc, out_native
        start = time.perf_counter()
        kit.sync(variants["floor"](kit.generator(7)))
        warm_up["floor"] = time.perf_counter() - start

        gen = kit.generator(11)
        calls = {name: (lambda v=v, g=gen: v(g)) for name, v in variants.items()}
        targeted = (structure_id(structure), num_params) in set(target_configs(args.smoke))
        min_repeats = args.repeats or (5 if targeted or num_params < 10**6 else 3)
        timing = time_variants(kit, calls, warm_up, smoke=args.smoke, min_repeats=min_repeats)
        median = timing["median_s"]
        row.update(
            time_s=median["structcov"],
            native_s=median["native"],
            floor_s=median["floor"],
            ratio_native=median["structcov"] / median["native"],
            ratio_floor=median["structcov"] / median["floor"],
            repeats=timing["repeats"],
            number=timing["number"],
            samples_s=timing["samples_s"],
        )
        del variants, calls, extra, floor_extra
        _progress(row)
    del flat, storage, means, eager_q, eager_prior
    if num_params >= 10**6:
        gc.collect()  # large buffers must be gone before the next case (slow with torch/JAX)
    return rows


def _first_call(kit: Kit, variant: Any, with_memory: bool) -> tuple[Any, int | None]:
    if with_memory:
        out, peak = variant.peak(kit.generator(7))
    else:
        out, peak = variant(kit.generator(7)), None
    kit.sync(out)
    return out, peak


def _progress(row: dict[str, Any]) -> None:
    flag = "" if row["check"].startswith(("ok", "not")) else f"  {row['check']}"
    print(
        f"[{row['backend']}] {row['structure']:<28} P={row['P']:<9,} {row['op']:<14}"
        f" {_format_time(row['time_s']):>10}  x{row['ratio_native']:.2f} native"
        f"  x{row['ratio_floor']:.2f} floor{flag}",
        file=sys.stderr,
        flush=True,
    )


# ---------------------------------------------------------------------- main
def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(float(item)) for item in text.split(",") if item.strip()})
    except ValueError:
        message = f"--sizes must be numbers like 1e3,1e4, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not sizes or sizes[0] < 4:
        raise argparse.ArgumentTypeError(f"--sizes must be >= 4, got {text!r}")
    return sizes


def _parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backends", type=_parse_list, default=["numpy", "torch", "jax"])
    parser.add_argument("--sizes", type=_parse_sizes, default=None, help="P values, e.g. 1e3,1e6")
    parser.add_argument("--structures", type=_parse_list, default=None, help="structure ids")
    parser.add_argument("--operations", type=_parse_list, default=list(OPERATIONS))
    parser.add_argument("--smoke", action="store_true", help="P = 100, one repeat (seconds)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=0, help="minimum timed rounds")
    parser.add_argument("--no-targets", action="store_true", help="only the --sizes sweep")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--update-docs", action="store_true")
    parser.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="measure nothing: rebuild the reports (and, with --update-docs, the docs) from a "
        "results.json written earlier",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.operations) - set(OPERATIONS))
    if unknown:
        parser.error(f"--operations: unknown {unknown} (choose from {', '.join(OPERATIONS)})")
    if args.sizes is None:
        args.sizes = list(SMOKE_SIZES if args.smoke else DEFAULT_SIZES)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        results = json.loads(args.report.read_text())
        results["targets"] = evaluate_targets(results["rows"], smoke=results["smoke"])
        return _write(results, args)
    if args.smoke and "jax" in args.backends and "jax" not in sys.modules:
        # Smoke timings mean nothing; compiling ~120 tiny XLA programs without LLVM
        # optimisation takes a third less time.
        os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
    structures = default_structures()
    if args.structures:
        known = {structure_id(s): s for s in structures}
        missing = sorted(set(args.structures) - set(known))
        if missing:
            print(f"unknown structures {missing}; known: {sorted(known)}", file=sys.stderr)
            return 2
        structures = [known[sid] for sid in args.structures]
    plan = build_plan(structures, args.sizes, not args.no_targets, args.smoke)

    started = time.perf_counter()
    load_before = load_average()
    rows: list[dict[str, Any]] = []
    skipped_backends: dict[str, str] = {}
    for name in args.backends:
        reason = backend_unavailable(name, args.device)
        if reason:
            skipped_backends[name] = reason
            print(f"[{name}] skipped: {reason}", file=sys.stderr)
            continue
        kit = Kit(name, args.device)
        for structure, num_params in plan:
            rows.extend(measure_structure(kit, structure, num_params, args))
    load_after = load_average()

    results = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "smoke": args.smoke,
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "duration_s": time.perf_counter() - started,
        "dtype": "float32",
        "threads": _threads(args.backends),
        "memory_methods": {n: Kit.memory_methods(n, args.device) for n in args.backends},
        "skipped_backends": skipped_backends,
        "sizes": args.sizes,
        "rows": rows,
    }
    results["targets"] = evaluate_targets(rows, smoke=args.smoke)
    return _write(results, args)


def _write(results: dict[str, Any], args: argparse.Namespace) -> int:
    for path in write_outputs(results, args.out):
        print(f"wrote {path}", file=sys.stderr)
    if args.update_docs:
        for path in update_docs(results, args.out, HERE.parent / "docs"):
            print(f"updated {path}", file=sys.stderr)
    rows = results["rows"]
    mismatches = [r for r in rows if str(r.get("check", "")).startswith("MISMATCH")]
    for row in mismatches:
        where = f"{row['backend']} {row['structure']} P={row['P']} {row['op']}"
        print(f"MISMATCH {where}: {row['check']}", file=sys.stderr)
    return 1 if mismatches else 0


def _threads(backends: list[str]) -> dict[str, Any]:
    threads: dict[str, Any] = {"cpus_available": len(os.sched_getaffinity(0))}
    if "torch" in backends and "torch" in sys.modules:
        threads["torch"] = sys.modules["torch"].get_num_threads()
    return threads


if __name__ == "__main__":
    sys.exit(main())
