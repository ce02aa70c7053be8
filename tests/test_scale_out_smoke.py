"""``benchmarks/scale_out.py`` (the dask proof at scale) runs, and its reference is right.

The script runs at a tiny P with the threaded scheduler only (a ``LocalCluster`` would
start processes: too slow for the test matrix) in a subprocess, as its users run it.
What is asserted: every run has its row, structcov on dask and on NumPy agrees with the
script's float64 reference to float32 accuracy, each factor chunk is generated once by
the one ``dask.compute``, and the reference (plain NumPy, chunk by chunk) itself equals
the dense float64 formulas. Runs only where dask is installed, in the numpy and dask
sessions (the script is NumPy + dask whatever the session's backend).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "scale_out.py"


def _skip_reason() -> str | None:
    if importlib.util.find_spec("dask") is None:
        return "dask is not installed"
    raw = os.environ.get("STRUCTCOV_BACKEND", "numpy")
    names = {b.strip() for b in raw.split(",") if b.strip()} or {"numpy"}
    if not names & {"numpy", "dask"}:
        return f"runs in the numpy and dask sessions only (STRUCTCOV_BACKEND={raw})"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def _script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # for its `_common` import
    spec = importlib.util.spec_from_file_location("scale_out_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_matches_the_dense_formulas(monkeypatch: pytest.MonkeyPatch) -> None:
    script = _script(monkeypatch)
    p, rank, chunk, seed, sigma = 300, 4, 70, 3, 1.7  # a short last chunk
    inputs = script.numpy_inputs(p, rank, chunk, seed)
    m, u, d = (inputs[k].astype(np.float64) for k in ("mean", "factor", "scale"))
    assert u.shape == (p, rank) and m.shape == d.shape == (p,)
    sigma_q = u @ u.T + np.diag(d**2)
    logdet = np.linalg.slogdet(sigma_q)[1]
    kl = 0.5 * (np.trace(sigma_q) / sigma**2 + m @ m / sigma**2 - p + p * np.log(sigma**2) - logdet)
    expected = {
        "diagonal_sum": np.diag(sigma_q).sum(),
        "diagonal_min": np.diag(sigma_q).min(),
        "diagonal_max": np.diag(sigma_q).max(),
        "trace": np.trace(sigma_q),
        "logdet": logdet,
        "kl": kl,
    }
    got = script.reference(p, rank, chunk, seed, sigma, threads=2)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-10, err_msg=key)


def test_dask_inputs_are_the_numpy_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    script = _script(monkeypatch)
    lazy = script.dask_inputs(250, 3, 60, 5)
    whole = script.numpy_inputs(250, 3, 60, 5)
    assert lazy["factor"].chunks == ((60, 60, 60, 60, 10), (3,))
    for kind in ("mean", "factor", "scale"):
        np.testing.assert_array_equal(lazy[kind].compute(scheduler="sync"), whole[kind])
    assert (whole["scale"] > 0).all()


def test_script_runs_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "scale_out.json"
    command = [
        sys.executable,
        str(SCRIPT),
        "--P",
        "1e4",
        "--chunk",
        "2500",
        "--scheduler",
        "threads",
        "--numpy-P",
        "4000",
        "--numpy-chunk",
        "1000",
        "--json",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"scale_out.py failed ({done.returncode}):\n{done.stderr[-4000:]}"
    assert "| 10,000 | dask threads" in done.stdout

    report = json.loads(out.read_text())
    runs = [(row["run"], row["P"]) for row in report["rows"]]
    assert runs == [("numpy", 4000), ("threads", 4000), ("threads", 10_000)]
    for row in report["rows"]:
        for key, error in row["relative_errors"].items():
            assert error < 1e-5, (row["run"], row["P"], key, error)  # float32 vs float64
        assert row["peak_bytes"] > 0 and row["compute_s"] > 0
        if row["run"] == "threads":
            # one dask.compute of all results: every chunk of m, U and d generated once
            assert row["generated_chunks"] == dict.fromkeys(("mean", "factor", "scale"), 4)
