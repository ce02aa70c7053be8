"""Kronecker matmul and solve against linear_operator and CoLA (torch CPU, float32).

    python benchmarks/kronecker_peers.py [--d-out 256] [--d-in 256] [--vectors 8]
                                         [--repeats 30] [--threads 1] [--smoke]

One dense layer, weight ``(d_out, d_in)`` and bias ``(d_out,)``, with a full-rank
`KroneckerCovariance`: square factors S_out (d_out x d_out) and S_in (d_aug x d_aug,
d_aug = d_in + 1, the bias is S_in's last row), so Sigma = C_out ⊗ C_in over the
augmented W~ = [W | b] with C = S S^T. The same Sigma goes to the peers:

* linear_operator: ``KroneckerProductLinearOperator(DenseLinearOperator(C_out),
  DenseLinearOperator(C_in))``; ``op @ X`` and ``op.solve(X)`` (Cholesky of each factor
  and ``cholesky_solve``; the factors are 256 x 256, below ``max_cholesky_size``);
* CoLA (``cola-ml``): ``Kronecker(PSD(Dense(C_out)), PSD(Dense(C_in)))``; ``op @ X`` and
  ``cola.solve(op, X)`` (``Auto``: Cholesky of each PSD factor, triangular solves);
* structcov: ``cov.matmul(x)`` and ``cov.solve(x)`` on the parameter's own storage (S);
* structcov, prepared: ``structcov.functional.matmul(..., state)`` with ``state =
  prepare_matmul(...)`` (the two factor Grams C) and ``functional.solve(..., state)``
  with ``state = prepare(...)``, the state formed once outside the timings as the
  peers' C are;
* by hand: the same maths written directly in torch from C (``C_out X~ C_in``, and
  ``torch.cholesky_solve`` with each factor's Cholesky), a floor for reference.

The peers receive C_out and C_in, formed once outside the timings; their operators
are built inside every timed call (a wrapper costs microseconds), so that every
library factorises per call, as structcov does (linear_operator caches a factor's
Cholesky on the operator object). The right-hand sides are B = ``--vectors`` vectors
given in each library's own layout: rows of X~ (B, d_out, d_aug) flattened row-major for
the peers (a (P, B) matrix), structcov's flat parameter order (weight row-major, then
bias) for structcov; the conversion is outside the timings.

Values: every result is compared with a float64 reference computed from the same
factors (NumPy, ``C_out X~ C_in`` and two dense solves); the table gives the largest
error relative to the reference's largest entry, and the script fails if one exceeds
``RTOL`` (1e-4: float32 rounding times Sigma's condition number, about 1e2 for these
near-identity factors, plus accumulation over 256-term sums).

Timing: ``torch.set_num_threads(--threads)`` (default 1: the numbers are then not a
function of how busy the other cores are), garbage collection off, one warm-up call
each, then ``--repeats`` rounds in which every (operation, library) is called once,
the order rotating from round to round; the median per call is reported, and
structcov's median divided by each library's (ratio <= 1: structcov is as fast or faster),
for the per-call and the prepared structcov.

``--smoke`` runs a tiny layer (weight 6 x 5) once: it checks that the script works
(and the values agree), not the timings. A peer that is not installed is skipped with
a note (``pip install linear_operator cola-ml``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from _common import load_average, machine_info

import structcov as sc
import structcov.functional as F

#: Largest error relative to the float64 reference's largest entry accepted as "equal".
RTOL = 1e-4

LIBRARIES = ("structcov", "structcov, prepared", "linear_operator", "cola", "by hand (torch)")
OPERATIONS = ("matmul", "solve")


def _near_identity(rng: np.random.Generator, n: int) -> np.ndarray:
    """I + 0.3 N / sqrt(n): singular values within about [0.4, 1.6] (as in kl_pairs.py)."""
    return np.eye(n) + 0.3 / np.sqrt(n) * rng.standard_normal((n, n))


def factors(d_out: int, d_in: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Square full-rank S_out (d_out x d_out) and S_in ((d_in + 1) x (d_in + 1)), float32."""
    rng = np.random.default_rng(seed)
    s_out = _near_identity(rng, d_out).astype(np.float32)
    s_in = _near_identity(rng, d_in + 1).astype(np.float32)
    return s_out, s_in


def reference(s_out: np.ndarray, s_in: np.ndarray, x_aug: np.ndarray) -> dict[str, np.ndarray]:
    """float64 Sigma x~ and Sigma^-1 x~ for x~ of shape (B, d_out, d_aug), Sigma = C_out ⊗ C_in."""
    c_out = s_out.astype(np.float64) @ s_out.T.astype(np.float64)
    c_in = s_in.astype(np.float64) @ s_in.T.astype(np.float64)
    x = x_aug.astype(np.float64)
    solved = np.linalg.solve(c_out, np.linalg.solve(c_in, x.transpose(0, 2, 1)).transpose(0, 2, 1))
    return {"matmul": c_out @ x @ c_in, "solve": solved}


def structcov_calls(torch: Any, s_out: np.ndarray, s_in: np.ndarray, d_in: int) -> Any:
    """(matmul, solve, prepared matmul, prepared solve, to_aug, from_aug) for a structcov
    parameter holding S_out and S_in (prepared: the state formed here, once)."""
    d_out = s_out.shape[0]
    mean = {"weight": torch.zeros(d_out, d_in), "bias": torch.zeros(d_out)}
    param = sc.GaussianParameter(mean, sc.KroneckerCovariance())
    param.cov.load_storage(
        {
            "output_factor": torch.from_numpy(s_out.copy()),
            "input_factor.weight": torch.from_numpy(s_in[:d_in].copy()),
            "input_factor.bias": torch.from_numpy(s_in[d_in:].copy()),
        }
    )
    cov = param.cov

    def to_flat(x_aug: Any) -> Any:  # (B, d_out, d_aug) -> (B, P) in structcov's order
        batch = x_aug.shape[0]
        weight = x_aug[:, :, :d_in].reshape(batch, d_out * d_in)
        return torch.cat([weight, x_aug[:, :, d_in]], dim=1).contiguous()

    def from_flat(y: Any) -> Any:  # (B, P) -> (B, d_out, d_aug)
        batch = y.shape[0]
        weight = y[:, : d_out * d_in].reshape(batch, d_out, d_in)
        return torch.cat([weight, y[:, d_out * d_in :, None]], dim=2)

    structure, storage = cov.structure, cov.storage()
    grams, square = F.prepare_matmul(structure, storage), F.prepare(structure, storage)

    def prepared_matmul(x: Any) -> Any:
        return F.matmul(structure, storage, x, grams)

    def prepared_solve(x: Any) -> Any:
        return F.solve(structure, storage, x, square)

    return cov.matmul, cov.solve, prepared_matmul, prepared_solve, to_flat, from_flat


def peer_calls(
    name: str, torch: Any, c_out: Any, c_in: Any
) -> tuple[Callable[[Any], Any], Callable[[Any], Any]] | str:
    """(matmul, solve) over (P, B) right-hand sides for a peer, or why it is skipped."""
    if name == "linear_operator":
        if importlib.util.find_spec("linear_operator") is None:
            return "linear_operator is not installed (pip install linear_operator)"
        from linear_operator.operators import (
            DenseLinearOperator,
            KroneckerProductLinearOperator,
        )

        def lo_operator() -> Any:
            return KroneckerProductLinearOperator(
                DenseLinearOperator(c_out), DenseLinearOperator(c_in)
            )

        return (lambda x: lo_operator() @ x), (lambda x: lo_operator().solve(x))
    if name == "cola":
        if importlib.util.find_spec("cola") is None:
            return "CoLA is not installed (pip install cola-ml)"
        import cola

        def cola_operator() -> Any:
            return cola.ops.Kronecker(
                cola.PSD(cola.ops.Dense(c_out)), cola.PSD(cola.ops.Dense(c_in))
            )

        return (lambda x: cola_operator() @ x), (lambda x: cola.solve(cola_operator(), x))
    # by hand: x (P, B) -> X~ (B, d_out, d_aug); C_out X~ C_in; Cholesky solves per factor.
    d_out, d_aug = c_out.shape[0], c_in.shape[0]

    def hand_matmul(x: Any) -> Any:
        x_aug = x.T.reshape(-1, d_out, d_aug)
        return (c_out @ x_aug @ c_in).reshape(-1, d_out * d_aug).T

    def hand_solve(x: Any) -> Any:
        batch = x.shape[1]
        l_out, l_in = torch.linalg.cholesky(c_out), torch.linalg.cholesky(c_in)
        # (d_out, B d_aug): the batch in the right-hand side's columns
        left = x.T.reshape(batch, d_out, d_aug).permute(1, 0, 2).reshape(d_out, batch * d_aug)
        left = torch.cholesky_solve(left, l_out).reshape(d_out, batch, d_aug)
        right = left.permute(2, 1, 0).reshape(d_aug, batch * d_out)
        right = torch.cholesky_solve(right, l_in).reshape(d_aug, batch, d_out)
        return right.permute(1, 2, 0).reshape(batch, d_out * d_aug).T

    return hand_matmul, hand_solve


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    import torch

    torch.set_num_threads(args.threads)
    d_out, d_in, batch = args.d_out, args.d_in, args.vectors
    d_aug = d_in + 1
    s_out, s_in = factors(d_out, d_in, seed=0)
    x_aug_np = np.random.default_rng(1).standard_normal((batch, d_out, d_aug)).astype(np.float32)
    expected = reference(s_out, s_in, x_aug_np)

    c_out = torch.from_numpy(s_out) @ torch.from_numpy(s_out).T  # float32, as a user would
    c_in = torch.from_numpy(s_in) @ torch.from_numpy(s_in).T
    x_aug = torch.from_numpy(x_aug_np)
    x_peer = x_aug.reshape(batch, d_out * d_aug).T.contiguous()  # (P, B)

    sc_matmul, sc_solve, pre_matmul, pre_solve, to_flat, from_flat = structcov_calls(
        torch, s_out, s_in, d_in
    )
    x_flat = to_flat(x_aug)
    calls: dict[tuple[str, str], Callable[[], Any]] = {
        ("matmul", "structcov"): lambda: sc_matmul(x_flat),
        ("solve", "structcov"): lambda: sc_solve(x_flat),
        ("matmul", "structcov, prepared"): lambda: pre_matmul(x_flat),
        ("solve", "structcov, prepared"): lambda: pre_solve(x_flat),
    }
    readers: dict[str, Callable[[Any], np.ndarray]] = {
        "structcov": lambda y: from_flat(y).double().numpy(),
        "structcov, prepared": lambda y: from_flat(y).double().numpy(),
    }
    notes = []
    for name in LIBRARIES[2:]:
        found = peer_calls(name, torch, c_out, c_in)
        if isinstance(found, str):
            notes.append(f"skipped {name}: {found}")
            continue
        for operation, function in zip(OPERATIONS, found, strict=True):
            calls[operation, name] = lambda function=function: function(x_peer)
        readers[name] = lambda y: y.T.reshape(batch, d_out, d_aug).double().numpy()

    errors = {}
    for (operation, name), call in calls.items():
        with torch.no_grad():
            got = readers[name](call())  # also the warm-up call
        want = expected[operation]
        errors[operation, name] = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))

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
    for operation in OPERATIONS:
        base = statistics.median(times[operation, "structcov"])
        prepared = statistics.median(times[operation, "structcov, prepared"])
        for name in LIBRARIES:
            if (operation, name) not in calls:
                continue
            median = statistics.median(times[operation, name])
            rows.append(
                {
                    "operation": operation,
                    "library": name,
                    "time_s": median,
                    "ratio": base / median,
                    "ratio_prepared": prepared / median,
                    "error": errors[operation, name],
                }
            )
    return rows, notes


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| operation | library | median time | structcov / library "
        "| structcov, prepared / library | max rel. error vs float64 |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['operation']} | {row['library']} | {row['time_s'] * 1e3:.2f} ms "
            f"| {row['ratio']:.2f}x | {row['ratio_prepared']:.2f}x | {row['error']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-out", type=int, default=256)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--vectors", type=int, default=8, help="right-hand sides B")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--smoke", action="store_true", help="weight 6 x 5, one round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.d_out, args.d_in, args.repeats = 6, 5, 1
    if importlib.util.find_spec("torch") is None:
        print("skipping: this benchmark needs torch", file=sys.stderr)
        return 0
    rows, notes = run(args)
    import torch

    info = machine_info()
    versions = [f"torch {torch.__version__}"]
    for module, label in (("linear_operator", "linear_operator"), ("cola", "cola-ml")):
        if module in sys.modules:
            versions.append(f"{label} {getattr(sys.modules[module], '__version__', '?')}")
    print(
        f"Sigma x and Sigma^-1 x for {args.vectors} vectors, torch CPU float32, "
        f"{args.threads} thread(s); weight {args.d_out} x {args.d_in} + bias (factors "
        f"{args.d_out} x {args.d_out} and {args.d_in + 1} x {args.d_in + 1}); medians of "
        f"{args.repeats} interleaved rounds; {', '.join(versions)}; {info['cpu']} "
        f"({info['cpus']} CPUs), load {load_average()}.\n"
    )
    print(table(rows))
    for note in notes:
        print(f"\n{note}")
    bad = [row for row in rows if not row["error"] <= RTOL]
    if bad:
        names = ", ".join(f"{row['operation']} {row['library']}" for row in bad)
        print(f"\nvalues disagree (relative error > {RTOL:g}): {names}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
