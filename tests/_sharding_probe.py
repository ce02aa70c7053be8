"""Subprocess half of tests/test_jax_sharding.py: jitted structcov ops on a 4-device CPU mesh.

Run as ``python tests/_sharding_probe.py [CASE ...]`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` set before jax starts (the
test does that; it must be a fresh process). Prints one JSON line of facts about
jax (``"kind": "jax"``), then one per mesh mode, case and operation:

- ``collectives``: every collective of the compiled, per-device HLO (kind, result
  shapes, elements, the line);
- ``full_shapes``: shapes in that HLO with a dimension of the *global* size of a
  split axis (P, K, a mean's leading size). Per-device HLO holds the local shapes of
  split arrays, so such a shape is an array that was materialised whole on a device;
- ``outputs``: for each output leaf with a P-sized dimension, whether that
  dimension is split over the mesh;
- ``max_error``: the largest deviation (relative to the largest magnitude) from the
  same function jitted on plain single-device arrays, with the same key: the default
  threefry is partitionable, so a split draw gives the unsplit numbers;
- ``error``: the exception, if tracing, compiling or running failed.

Modes: ``Explicit`` (``jax.make_mesh``'s default axis type in jax 0.10, arrays carry
their sharding in their type, under ``jax.set_mesh``) and ``Auto`` (XLA's sharding
propagation, the legacy way: sharded arguments, no mesh context).

Not a test module (no ``test_`` prefix), so pytest does not collect it.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import structcov as sc
import structcov.jax  # registers the pytrees

jax.config.update("jax_enable_x64", True)

DEVICES = 4
BATCH = 8
RANK = 8
AXIS = "x"
MODES = ("Explicit", "Auto")
OPS = (
    "sample",
    "factor_matmul",
    "matmul",
    "diagonal",
    "trace",
    "logdet",
    "solve",
    "log_prob",
    "kl",
    "kl_float",
)


@dataclass(frozen=True)
class Case:
    """A structure over means whose leading axis is split over the mesh."""

    make_cov: Callable[[], sc.FactorizedCovariance]
    shapes: dict[str, tuple[int, ...]]
    #: storage paths kept replicated; every other stored array is split along its
    #: leading axis, like the means
    replicated: tuple[str, ...] = ()
    #: the noise z has one column per parameter (its columns split like the means)
    z_per_parameter: bool = False
    ops: tuple[str, ...] = OPS
    #: sizes no array of the compiled HLO may have (the global sizes of split axes);
    #: ``None``: P, the means' leading sizes, and K when z is per parameter
    forbidden: tuple[int, ...] | None = None
    #: whether to check that no array anywhere has a forbidden size (off where a
    #: replicated axis has a forbidden size by construction, e.g. K = P of a full factor)
    materialization: bool = True


# P = 4096 with means (2048, 2), (512, 8) or (256, 16). Within a case, a global size
# (256 / 512 / 2048 / 4096, and 4104 = K of rank 8 plus diagonal) never equals a per-device
# size (64 / 128 / 512 / 1024 / 1026), so a global size in the per-device HLO is a real one.
CASES: dict[str, Case] = {
    "diagonal": Case(sc.DiagonalCovariance, {"weight": (2048, 2)}, z_per_parameter=True),
    "lowrank": Case(
        lambda: sc.LowRankCovariance(RANK),
        {"weight": (2048, 2)},
        # singular: solve raises and there is no density
        ops=tuple(op for op in OPS if op not in ("solve", "log_prob")),
    ),
    "lowrank+diagonal": Case(
        lambda: sc.LowRankPlusDiagonalCovariance(RANK), {"weight": (2048, 2)}, z_per_parameter=True
    ),
    # P = 32768: a capacitance U^T D^-1 U summed over row chunks of U (8192 rows each,
    # tried in the core once) makes the partitioner re-split every chunk over all
    # devices: collective-permutes of f64[2048,8], O(P r) traffic instead of one r x r
    # all-reduce. The test's collective budget catches that.
    "lowrank+diagonal-P32768": Case(
        lambda: sc.LowRankPlusDiagonalCovariance(RANK),
        {"weight": (16384, 2)},
        z_per_parameter=True,
        ops=("logdet",),
    ),
    # Full rank stores a P x P factor: small P (128). K = P is the factor's replicated
    # column axis, so only the leading size 64 is a split size. logdet/solve are dense
    # LUs of S: S is gathered whole by design.
    "full": Case(
        sc.FactorizedCovariance,
        {"weight": (64, 2)},
        ops=("sample", "factor_matmul", "matmul", "diagonal", "trace", "logdet", "solve"),
        forbidden=(64,),
        materialization=False,
    ),
    # Kronecker: the rows of the weight (d_out) are split, and with them the rows of
    # S_out (d_out x r_out); S_in (d_in x r_in) is small and replicated. The noise
    # (r_out x r_in per draw) indexes factor columns: each device needs all of it for its
    # rows of S_out Z S_in^T, so it is replicated. Low output rank: singular (no solve).
    "kronecker": Case(
        lambda: sc.KroneckerCovariance(input_rank=4, output_rank=64),
        {"weight": (512, 8)},
        replicated=("input_factor.weight",),
        ops=tuple(op for op in OPS if op not in ("solve", "log_prob")),
    ),
    # Full ranks, for logdet and solve: LUs of S_out (d_out x d_out, gathered: the one
    # allowed collective of a split size) and of S_in. Here r_out = d_out = 256 is the
    # replicated column axis of S_out, hence no materialization check.
    "kronecker-full": Case(
        sc.KroneckerCovariance,
        {"weight": (256, 16)},
        replicated=("input_factor.weight",),
        ops=("logdet", "solve"),
        materialization=False,
    ),
}


def build(case: Case, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Means and well-conditioned storage (path -> array) for ``case``, as NumPy arrays."""
    rng = np.random.default_rng(seed)
    means = {name: rng.standard_normal(shape) for name, shape in case.shapes.items()}
    template = sc.GaussianParameter({n: jnp.asarray(m) for n, m in means.items()}, case.make_cov())
    storage = {}
    for path, array in template.cov.storage().items():
        shape = tuple(array.shape)
        square = math.prod(shape[:-1]) == shape[-1]
        if path.startswith("scale."):
            storage[path] = 0.5 + rng.uniform(size=shape)
        elif square:  # a square factor: I + small noise, well conditioned
            n = shape[-1]
            storage[path] = (np.eye(n) + 0.1 * rng.standard_normal((n, n)) / n**0.5).reshape(shape)
        else:
            storage[path] = 0.3 * rng.standard_normal(shape) / shape[-1] ** 0.5
    return means, storage


def _put(value: np.ndarray, mesh: Any, axis: int | None) -> Any:
    """``value`` as a JAX array; on ``mesh``, split along ``axis`` (``None``: replicated)."""
    array = jnp.asarray(value)
    if mesh is None:
        return array
    spec = [None] * value.ndim
    if axis is not None:
        assert value.shape[axis] % DEVICES == 0, (value.shape, axis)
        spec[axis] = AXIS
    return jax.device_put(array, NamedSharding(mesh, P(*spec)))


def make_inputs(case: Case, mesh: Any) -> tuple[sc.GaussianParameter, dict[str, Any]]:
    """``q`` and the op arguments, split over ``mesh`` (``None``: plain arrays)."""
    means, storage = build(case)
    q = sc.GaussianParameter({n: _put(m, mesh, 0) for n, m in means.items()}, case.make_cov())
    q.cov.load_storage(
        {p: _put(v, mesh, None if p in case.replicated else 0) for p, v in storage.items()}
    )
    rng = np.random.default_rng(1)
    columns = q.cov.num_factor_columns
    args = {
        "key": jax.random.key(7),
        "x": _put(rng.standard_normal((BATCH, q.num_params)), mesh, 1),
        # z's columns are split where they index parameters (diagonal: K = P; low rank
        # plus diagonal: K = r + P); elsewhere K indexes factor columns: replicated.
        "z": _put(rng.standard_normal((BATCH, columns)), mesh, 1 if case.z_per_parameter else None),
        "value": [_put(rng.standard_normal((BATCH, *s)), mesh, 1) for s in q.shapes.values()],
    }
    return q, args


def run_op(op: str, q: sc.GaussianParameter, args: dict[str, Any]) -> Any:
    """The operation ``op`` of ``q``: what it returns is compared and checked."""
    if op == "sample":
        return q.sample((BATCH,), generator=args["key"])
    if op == "factor_matmul":
        means = {name: q.mean[name] for name in q.names}
        return q.cov.factor_matmul(args["z"], additive_constant=means)
    if op == "matmul":
        return q.cov.matmul(args["x"])
    if op == "diagonal":
        return q.cov.diagonal()
    if op == "trace":
        return q.cov.trace()
    if op == "logdet":
        return q.cov.logdet()
    if op == "solve":
        return q.cov.solve(args["x"])
    if op == "log_prob":
        return q.log_prob(dict(zip(q.names, args["value"], strict=True)))
    if op == "kl":
        return sc.kl_divergence(q, sc.normal_prior(q, 1.0))
    if op == "kl_float":  # the float prior's own path (`functional.kl_to_normal`)
        return sc.kl_divergence(q, 1.5)
    raise ValueError(f"unknown op {op!r}")


_COLLECTIVE = re.compile(
    r"=\s*(?P<result>.*?)\s(?P<kind>all-gather|all-reduce|all-to-all|collective-permute"
    r"|reduce-scatter|collective-broadcast)(?P<phase>-start|-done)?\("
)
_SHAPE = re.compile(r"\b(?:pred|[suf]\d+|bf16|c\d+)\[([\d,]*)\]")


def _shapes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in dims.split(",") if d) for dims in _SHAPE.findall(text)]


def hlo_report(hlo: str, global_sizes: set[int]) -> dict[str, Any]:
    """The collectives of a compiled (per-device) HLO module, and its global-size shapes."""
    collectives, full = [], set()
    for line in hlo.splitlines():
        line = line.strip()
        if not line or line.startswith(("//", "HloModule")):
            continue
        match = _COLLECTIVE.search(line)
        if match and match["phase"] != "-done":  # an async pair is one collective
            shapes = _shapes(match["result"])
            collectives.append(
                {
                    "kind": match["kind"],
                    "shapes": shapes,
                    "elements": sum(math.prod(s) for s in shapes),
                    "line": line[:240],
                }
            )
        # Operand shapes are results of earlier lines or parameters, so the result
        # shapes (text before the opcode) cover every array; metadata has no shapes.
        head = line.split("(", 1)[0] if "=" not in line else line.split("=", 1)[1]
        head = re.split(r"\s[a-z][\w\-]*\(", head, maxsplit=1)[0]
        for shape in _shapes(head):
            if global_sizes & set(shape):
                full.add(shape)
    return {"collectives": collectives, "full_shapes": sorted(full)}


def _leaves(tree: Any) -> list[np.ndarray]:
    return [np.asarray(leaf, dtype=np.float64) for leaf in jax.tree.leaves(tree)]


def max_error(got: Any, expected: Any) -> float:
    """Largest |got - expected| over the largest |expected| (>= 1); inf on a mismatch."""
    worst = 0.0
    got_leaves, expected_leaves = _leaves(got), _leaves(expected)
    if len(got_leaves) != len(expected_leaves):
        return math.inf
    for a, b in zip(got_leaves, expected_leaves, strict=True):
        finite = np.isfinite(b)
        if a.shape != b.shape or not np.array_equal(np.isfinite(a), finite):
            return math.inf
        if not np.array_equal(a[~finite], b[~finite]):
            return math.inf
        scale = max(1.0, float(np.max(np.abs(b[finite]), initial=0.0)))
        worst = max(worst, float(np.max(np.abs(a[finite] - b[finite]), initial=0.0)) / scale)
    return worst


def output_report(out: Any, split_sizes: set[int]) -> list[dict[str, Any]]:
    """For each output leaf with a P-sized dimension: is that dimension split over the mesh?"""
    report = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
        dims = [i for i, n in enumerate(leaf.shape) if n in split_sizes]
        if not dims:
            continue
        shard = leaf.sharding.shard_shape(leaf.shape)
        report.append(
            {
                "leaf": jax.tree_util.keystr(path),
                "shape": list(leaf.shape),
                "shard_shape": list(shard),
                "spec": str(getattr(leaf.sharding, "spec", leaf.sharding)),
                "fully_replicated": bool(leaf.sharding.is_fully_replicated),
                "split": all(shard[i] * DEVICES == leaf.shape[i] for i in dims),
            }
        )
    return report


def probe(case_names: list[str]) -> None:
    default_mesh = jax.make_mesh((DEVICES,), (AXIS,))
    facts = {
        "kind": "jax",
        "version": jax.__version__,
        "devices": jax.device_count(),
        "default_axis_types": [t.name for t in default_mesh.axis_types],
        "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
    }
    print(json.dumps(facts), flush=True)
    meshes = {
        mode: jax.make_mesh((DEVICES,), (AXIS,), axis_types=(getattr(AxisType, mode),))
        for mode in MODES
    }
    for case_name in case_names:
        case = CASES[case_name]
        plain_q, plain_args = make_inputs(case, None)
        split_sizes = {plain_q.num_params, *(shape[0] for shape in case.shapes.values())}
        if case.forbidden is not None:
            forbidden = set(case.forbidden)
        else:
            forbidden = split_sizes | (
                {plain_q.cov.num_factor_columns} if case.z_per_parameter else set()
            )
        columns = plain_q.cov.num_factor_columns
        print(
            json.dumps(
                {
                    "kind": "case",
                    "case": case_name,
                    "num_params": plain_q.num_params,
                    "num_factor_columns": columns,
                    "forbidden": sorted(forbidden),
                    "split_sizes": sorted(split_sizes),
                    "materialization": case.materialization,
                    # collectives of O(B r + r^2) elements, or O(B K) where the K factor
                    # columns are replicated (S^T x of a full or Kronecker factor)
                    "budget": max(
                        4 * (BATCH + RANK) * RANK, 0 if case.z_per_parameter else BATCH * columns
                    ),
                }
            ),
            flush=True,
        )
        for op in case.ops:
            fn = jax.jit(lambda q, args, op=op: run_op(op, q, args))
            expected = fn(plain_q, plain_args)
            for mode, mesh in meshes.items():
                record: dict[str, Any] = {"kind": "op", "mode": mode, "case": case_name, "op": op}
                start = time.perf_counter()
                try:
                    # Explicit axes need the mesh in context; Auto is used the legacy way.
                    with jax.set_mesh(mesh) if mode == "Explicit" else nullcontext():
                        q, args = make_inputs(case, mesh)
                        compiled = fn.lower(q, args).compile()
                        out = jax.block_until_ready(compiled(q, args))
                    record.update(hlo_report(compiled.as_text(), forbidden))
                    record["outputs"] = output_report(out, split_sizes)
                    record["max_error"] = max_error(out, expected)
                except Exception as error:  # reported to the test, which decides
                    record["error"] = f"{type(error).__name__}: {error}"[:1500]
                    record["traceback"] = traceback.format_exc()[-2500:]
                record["seconds"] = round(time.perf_counter() - start, 2)
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    probe(sys.argv[1:] or list(CASES))
