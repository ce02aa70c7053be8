"""The benchmark suite's smoke mode runs, so ``benchmarks/`` cannot rot.

``benchmarks/suite.py --smoke`` runs every structure and operation once at P = 100 for
the backend of this session (``STRUCTCOV_BACKEND``, NumPy by default) in a subprocess,
and writes its JSON and Markdown reports. Timings are not asserted (a smoke run is one
call on a shared machine); what is asserted is that every structure x operation has a
row, timed or skipped with a reason, and that structcov agrees with the hand-written
native baseline wherever both ran (so the baselines keep computing the same maths).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "suite.py"

STRUCTURES = {
    "diagonal",
    "low_rank_r32",
    "low_rank_plus_diagonal_r64",
    "low_rank_plus_diagonal_r8",
    "kronecker",
    "factorized",
}
OPERATIONS = {"sample", "factor_matmul", "matmul", "diagonal", "trace", "logdet", "kl"}


def _session_backend() -> str:
    raw = os.environ.get("STRUCTCOV_BACKEND", "numpy")
    names = [b.strip() for b in raw.split(",") if b.strip()]
    # A multi-backend selection benchmarks the first one that is a real array library.
    for name in names:
        if name != "array_api_strict":
            return name
    return names[0] if names else "numpy"


def _skip_reason(backend: str) -> str | None:
    if backend == "array_api_strict":
        return "array_api_strict is a test-only namespace: the benchmarks measure real backends"
    if backend == "dask":
        return (
            "benchmarks/suite.py has no dask backend (its kits are numpy, torch, jax, cupy): "
            "lazy graphs would time graph construction, not the maths"
        )
    module = "jax" if backend == "jax" else backend
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    if backend == "cupy":
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() < 1:
                return "cupy needs a CUDA device; none found"
        except Exception as error:  # any CUDA failure means "no device"
            return f"cupy needs a CUDA device ({type(error).__name__})"
    return None


def _run_smoke(backend: str, out: Path) -> None:
    command = [sys.executable, str(SUITE), "--smoke", "--backends", backend, "--out", str(out)]
    if backend == "cupy":
        command += ["--device", "cuda"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"suite failed ({done.returncode}):\n{done.stderr[-4000:]}"


# One test, not several sharing a fixture: under pytest-xdist each worker would run the
# suite again for its share of the tests.
def test_smoke_run_reports_every_structure_and_operation(tmp_path: Path) -> None:
    backend = _session_backend()
    reason = _skip_reason(backend)
    if reason:
        pytest.skip(reason)
    _run_smoke(backend, tmp_path)

    # The reports exist.
    for name in ("results.json", "results.md", "targets.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "time_vs_P.png").stat().st_size > 0

    # Every structure x operation has a row, timed or skipped with a reason.
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {row["backend_name"] for row in rows} == {backend}
    assert {(row["structure"], row["op"]) for row in rows} == {
        (s, op) for s in STRUCTURES for op in OPERATIONS
    }
    for row in rows:
        assert ("time_s" in row) != ("skipped" in row), row
        if "time_s" in row:
            for key in ("native_s", "floor_s", "ratio_native", "ratio_floor"):
                assert row[key] > 0, (key, row)
            assert row["output_bytes"] > 0

    # structcov agrees with the hand-written native baselines (same random numbers).
    bad = [
        (r["structure"], r["op"], r["check"])
        for r in rows
        if "time_s" in r and not r["check"].startswith("ok")
    ]
    assert not bad

    # The Markdown tables show every operation, structure and target.
    results = (tmp_path / "results.md").read_text()
    for operation in OPERATIONS:
        assert f"`{operation}`" in results
    for label in ("DiagonalCovariance()", "LowRankCovariance(32)", "KroneckerCovariance()"):
        assert label in results
    targets = (tmp_path / "targets.md").read_text()
    for ident in ("T1", "T2", "T3", "T4", "T5", "T6"):
        assert f"| {ident} |" in targets


def test_kl_pairs_smoke_run_reports_every_pair() -> None:
    """``benchmarks/kl_pairs.py --smoke``: every pair timed, its memory measured, finite or inf."""
    backend = _session_backend()
    reason = _skip_reason(backend)
    if reason is None and backend not in ("numpy", "torch"):
        reason = "benchmarks/kl_pairs.py measures numpy and CPU torch only"
    if reason:
        pytest.skip(reason)
    script = ROOT / "benchmarks" / "kl_pairs.py"
    command = [sys.executable, str(script), "--smoke", "--backends", backend]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"kl_pairs failed ({done.returncode}):\n{done.stderr[-4000:]}"
    rows = [line for line in done.stdout.splitlines() if line.startswith(f"| {backend} |")]
    assert len(rows) == 11, done.stdout  # 9 full-rank p, 2 pairs singular by construction
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[3].startswith("`_kl_") and cells[3] != "`_kl_generic`", row
        assert cells[4] != "nan" and cells[6] != "-", row  # a KL value and a measured peak


def test_layer_speed_smoke_run_reports_every_covariance() -> None:
    """``benchmarks/layer_speed.py --smoke``: every covariance timed against the floor."""
    if _session_backend() != "torch":
        pytest.skip("benchmarks/layer_speed.py measures CPU torch layers (the torch session)")
    script = ROOT / "benchmarks" / "layer_speed.py"
    command = [sys.executable, str(script), "--smoke"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"layer_speed failed ({done.returncode}):\n{done.stderr[-4000:]}"
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    rows = [row for row in rows if not row.startswith("|---")]
    assert len(rows) == 8, done.stdout  # 4 covariances x (forward, fwd+bwd)
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[4]) > 0, row  # structcov and floor timed


def test_train_step_smoke_run_reports_every_structure() -> None:
    """``benchmarks/train_step.py --smoke``: a structcov, seed and native step per structure."""
    if _session_backend() != "torch":
        pytest.skip("benchmarks/train_step.py measures CPU torch training steps (torch session)")
    script = ROOT / "benchmarks" / "train_step.py"
    command = [sys.executable, str(script), "--smoke"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"train_step failed ({done.returncode}):\n{done.stderr[-4000:]}"
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| diagonal", "| kron"))]
    assert len(rows) == 2, done.stdout
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[3]) > 0, row  # structcov and native timed
        if cells[0] == "diagonal":  # structcov's layers with the native KL, timed
            assert float(cells[6]) > 0 and float(cells[7]) > 0, row


def test_train_step_jax_smoke_run_reports_every_structure() -> None:
    """``benchmarks/train_step_jax.py --smoke``: a jitted structcov and native step per
    structure (Equinox layers and optax)."""
    if _session_backend() != "jax":
        pytest.skip("benchmarks/train_step_jax.py measures jitted JAX training steps (jax session)")
    for module in ("jax", "equinox", "optax"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (benchmarks/train_step_jax.py needs it)")
    script = ROOT / "benchmarks" / "train_step_jax.py"
    command = [sys.executable, str(script), "--smoke"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, (
        f"train_step_jax failed ({done.returncode}):\n{done.stderr[-4000:]}"
    )
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| diagonal", "| kron"))]
    assert len(rows) == 2, done.stdout
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[2]) > 0, row  # structcov and native timed


def test_kronecker_peers_smoke_run_agrees_with_float64() -> None:
    """``benchmarks/kronecker_peers.py --smoke``: structcov's Kronecker matmul and solve,
    per call and with the state prepared, against the peers that are installed and a
    hand-written torch floor; the script exits 1 if a value disagrees with float64."""
    if _session_backend() != "torch":
        pytest.skip("benchmarks/kronecker_peers.py compares CPU torch operators (torch session)")
    script = ROOT / "benchmarks" / "kronecker_peers.py"
    command = [sys.executable, str(script), "--smoke"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, (
        f"kronecker_peers failed ({done.returncode}):\n{done.stderr[-4000:]}"
    )
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| matmul", "| solve"))]
    libraries = {cells[1] for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows)}
    assert {"structcov", "structcov, prepared", "by hand (torch)"} <= libraries, done.stdout
    assert len(rows) == 2 * len(libraries), done.stdout


def test_lrpd_peers_smoke_run_agrees_with_float64() -> None:
    """``benchmarks/lrpd_peers.py --smoke``: structcov's low rank plus diagonal against
    torch.distributions.LowRankMultivariateNormal; the script exits 1 if structcov's
    log_prob or KL disagrees with its float64 reference."""
    if _session_backend() != "torch":
        pytest.skip("benchmarks/lrpd_peers.py compares CPU torch distributions (torch session)")
    script = ROOT / "benchmarks" / "lrpd_peers.py"
    command = [sys.executable, str(script), "--smoke"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"lrpd_peers failed ({done.returncode}):\n{done.stderr[-4000:]}"
    rows = [
        line for line in done.stdout.splitlines() if line.startswith(("| sample", "| log", "| kl"))
    ]
    assert len(rows) == 7, done.stdout  # sample, log_prob: 2 each; kl: 3
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[3]) > 0, row  # timed against torch
