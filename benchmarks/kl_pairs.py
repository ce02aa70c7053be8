"""KL(q || p) between structured Gaussians at P = 1e6 (float32): time and peak memory per pair.

    python benchmarks/kl_pairs.py [--backends numpy,torch] [--params 1000000] [--rank 32]
                                  [--repeats 3] [--smoke] [--pairs low_rank:low_rank,...]

Every pair runs ``structcov.kl_divergence(q, p)`` on one dense layer (``weight``
``(d_out, d_in)`` and ``bias`` ``(d_out,)``, ``layer_shape``: 1e6 -> 1000 x 999 + bias, so a
Kronecker factor pair is 1000 x 1000 twice) with the same storage on every backend (see
`build`). It
prints a Markdown table: the registered KL function, the median time of ``--repeats``
calls after one warm-up call, the peak memory of one call (``_backends.Kit.peak``:
``tracemalloc`` for NumPy, the torch profiler's allocator events for CPU torch) and
that peak as a multiple of the larger of the two storages. A P x P float32 array
would be 4 P^2 bytes (4 TB at P = 1e6): a densifying route could not run at all.

``--smoke`` runs every pair once at P = 64 (seconds): it checks that the script works,
not the timings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from _backends import Kit, backend_unavailable
from _common import layer_shape, load_average, machine_info

import structcov as sc
from structcov.covariances._kl import kl_function, kl_singular_function

#: id -> covariance factory taking the rank of the low-rank kinds
KINDS: dict[str, Callable[[int], sc.FactorizedCovariance]] = {
    "diagonal": lambda rank: sc.DiagonalCovariance(),
    "low_rank": lambda rank: sc.LowRankCovariance(rank),
    "lrpd": lambda rank: sc.LowRankPlusDiagonalCovariance(rank),
    "kronecker": lambda rank: sc.KroneckerCovariance(),
    "kronecker_low": lambda rank: sc.KroneckerCovariance(input_rank=rank, output_rank=rank),
}
#: singular by construction: a pair of these compares on their common support
SINGULAR = ("low_rank", "kronecker_low")

#: (q kind, p kind): the new structured pairs first, then existing ones for reference
PAIRS = (
    ("diagonal", "lrpd"),
    ("diagonal", "kronecker"),
    ("lrpd", "kronecker"),
    ("kronecker", "lrpd"),
    ("low_rank", "lrpd"),
    ("low_rank", "kronecker"),
    ("kronecker", "diagonal"),
    ("lrpd", "lrpd"),
    ("kronecker", "kronecker"),
    ("low_rank", "low_rank"),
    ("kronecker_low", "kronecker_low"),
)

SMOKE_PARAMS = 64


def label(kind: str, rank: int, shape: tuple[int, int]) -> str:
    if kind == "kronecker":
        return f"Kronecker({shape[0]}x{shape[1] + 1})"
    if kind == "kronecker_low":
        return f"Kronecker({shape[0]}x{shape[1] + 1}, ranks {rank})"
    return {"diagonal": "Diagonal", "low_rank": f"LowRank({rank})", "lrpd": f"LRPD({rank})"}[kind]


def _near_identity(rng: np.random.Generator, n: int) -> np.ndarray:
    """I + 0.3 N / sqrt(n): singular values within about [0.4, 1.6] (a well-conditioned factor)."""
    return np.eye(n) + 0.3 / np.sqrt(n) * rng.standard_normal((n, n))


def build(kit: Kit, kind: str, rank: int, shape: tuple[int, int], seed: int) -> Any:
    """A GaussianParameter of ``kind`` over the layer, the same values on every backend.

    Storage from ``reset_parameters`` with a NumPy generator (so the diagonal scales go
    through the structure's own scale transform), except Kronecker factors: square
    near-identity ones, so that the KL values are well conditioned in float32 (random
    Gaussian 1000 x 1000 factors make Sigma's condition number about 1e13).
    """
    d_out, d_in = shape
    rng = np.random.default_rng(seed)
    mean_np = {
        "weight": rng.standard_normal((d_out, d_in)).astype(np.float32),
        "bias": rng.standard_normal(d_out).astype(np.float32),
    }
    template = sc.GaussianParameter(mean_np, KINDS[kind](rank))
    template.cov.reset_parameters(0.5, generator=rng)
    storage = {path: np.asarray(value) for path, value in template.cov.storage().items()}
    if kind == "kronecker":
        s_in = _near_identity(rng, d_in + 1)
        storage["output_factor"] = _near_identity(rng, d_out)
        storage["input_factor.weight"], storage["input_factor.bias"] = s_in[:d_in], s_in[d_in:]
    param = sc.GaussianParameter(
        {name: kit.asarray(value) for name, value in mean_np.items()}, KINDS[kind](rank)
    )
    param.cov.load_storage({path: kit.asarray(value) for path, value in storage.items()})
    return param


def same_support(kit: Kit, q: Any, kind: str, rank: int, seed: int) -> Any:
    """A parameter on q's support (two singular kinds): q's factors times a
    well-conditioned r x r matrix, so the KL is finite and every step of the support
    decision runs (independent factors would only change the answer to +inf)."""
    rng = np.random.default_rng(seed)
    mix = _near_identity(rng, rank)
    storage = {path: kit.to_numpy(value) @ mix for path, value in q.cov.storage().items()}
    param = sc.GaussianParameter(dict(q.mean), KINDS[kind](rank))
    param.cov.load_storage({path: kit.asarray(value) for path, value in storage.items()})
    return param


def _format_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def _format_time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def measure(kit: Kit, q_kind: str, p_kind: str, args: argparse.Namespace) -> dict[str, Any]:
    shape = layer_shape(args.params)
    q = build(kit, q_kind, args.rank, shape, 1)
    if q_kind == p_kind and q_kind in SINGULAR:
        p = same_support(kit, q, p_kind, args.rank, 2)
        function = kl_singular_function(type(q.cov.structure), type(p.cov.structure))
    else:
        p = build(kit, p_kind, args.rank, shape, 2)
        function = kl_function(type(q.cov.structure), type(p.cov.structure))
    prepared = kit.prepare(lambda gen, q, p: sc.kl_divergence(q, p), (q, p))
    out, peak = prepared.peak(None)  # also the warm-up call
    kit.sync(out)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        kit.sync(prepared(None))
        times.append(time.perf_counter() - start)
    storage = max(kit.nbytes(q.cov.storage()), kit.nbytes(p.cov.storage()))
    return {
        "q": label(q_kind, args.rank, shape),
        "p": label(p_kind, args.rank, shape),
        "route": function.__name__,
        "kl": float(kit.to_numpy(out)),
        "time_s": statistics.median(times),
        "peak": peak,
        "storage": storage,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| backend | q | p | registered | KL | time | peak | larger storage | peak / storage |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = "-" if row["peak"] is None else f"{row['peak'] / row['storage']:.1f}"
        lines.append(
            f"| {row['backend']} | {row['q']} | {row['p']} | `{row['route']}` | {row['kl']:.4g} "
            f"| {_format_time(row['time_s'])} | {_format_bytes(row['peak'])} "
            f"| {_format_bytes(row['storage'])} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="numpy,torch")
    parser.add_argument("--params", type=float, default=1e6, help="P (default 1e6)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help=f"P = {SMOKE_PARAMS}, one call")
    parser.add_argument(
        "--pairs", default="", help="only these pairs, e.g. low_rank:low_rank,lrpd:lrpd"
    )
    args = parser.parse_args(argv)
    args.params = SMOKE_PARAMS if args.smoke else int(args.params)
    if args.smoke:
        args.rank, args.repeats = min(args.rank, 4), 1
    rows = []
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if name not in ("numpy", "torch"):
            print(f"skipping {name}: this script measures numpy and CPU torch", file=sys.stderr)
            continue
        reason = backend_unavailable(name, "cpu")
        if reason:
            print(f"skipping {name}: {reason}", file=sys.stderr)
            continue
        kit = Kit(name, "cpu")
        chosen = {tuple(pair.split(":")) for pair in args.pairs.split(",") if pair}
        for q_kind, p_kind in PAIRS:
            if chosen and (q_kind, p_kind) not in chosen:
                continue
            row = measure(kit, q_kind, p_kind, args)
            row["backend"] = kit.label
            rows.append(row)
            progress = f"{name} {row['q']} || {row['p']}: {_format_time(row['time_s'])}"
            print(progress, file=sys.stderr)
    d_out, d_in = layer_shape(args.params)
    info = machine_info()
    print(
        f"KL(q || p), float32, P = {args.params} (weight {d_out} x {d_in} + bias), rank "
        f"{args.rank}; {info['cpu']} ({info['cpus']} CPUs), load {load_average()}; "
        f"a P x P float32 array would be {_format_bytes(4 * args.params**2)}.\n"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
