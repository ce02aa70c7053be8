"""Importing one adapter imports no other backend (checked in fresh interpreters)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "structcov"
BACKENDS = ("jax", "torch", "numpy", "cupy")


def imported_backends(statement: str) -> set[str]:
    """The backend top-level modules loaded after running ``statement`` in a new interpreter."""
    code = (
        f"{statement}\nimport sys\nprint(' '.join(m for m in {BACKENDS!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def require(module: str, adapter: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    if not (SRC / f"{adapter}.py").exists():
        pytest.skip(f"src/structcov/{adapter}.py does not exist yet")


def test_structcov_imports_no_backend() -> None:
    assert imported_backends("import structcov") == set()


def test_jax_adapter_imports_no_torch() -> None:
    require("jax", "jax")
    loaded = imported_backends("import structcov.jax")
    assert "jax" in loaded
    assert "torch" not in loaded
    assert "cupy" not in loaded


def test_jax_adapter_imports_no_equinox_or_flax_until_used() -> None:
    require("jax", "jax")
    code = (
        "import structcov.jax, sys\n"
        "assert 'equinox' not in sys.modules and 'flax' not in sys.modules, "
        "sorted(m for m in ('equinox', 'flax') if m in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


def test_torch_adapter_imports_no_jax() -> None:
    require("torch", "torch")
    loaded = imported_backends("import structcov.torch")
    assert "torch" in loaded
    assert "jax" not in loaded
    assert "cupy" not in loaded


def test_numpy_adapter_imports_no_other_backend() -> None:
    require("numpy", "numpy")
    loaded = imported_backends("import structcov.numpy")
    assert "numpy" in loaded
    assert not loaded & {"jax", "torch", "cupy"}
