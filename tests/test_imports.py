"""``import structcov`` loads no array backend, and the public API is what the docs say."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import structcov

#: Array libraries (top-level module names) that the core must not import.
BACKEND_MODULES = ("torch", "jax", "jaxlib", "cupy", "numpy", "dask", "array_api_strict")

#: The seed API's names (seed-api.md), which structcov keeps.
SEED_API = {
    "BNNParameter",
    "GaussianParameter",
    "FactorizedCovariance",
    "DiagonalCovariance",
    "LowRankCovariance",
    "KroneckerCovariance",
}

API_PAGE = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def loaded_after(statement: str) -> list[str]:
    """Backend top-level modules in ``sys.modules`` after ``statement`` in a fresh interpreter."""
    code = (
        f"{statement}\n"
        "import json, sys\n"
        "top = {name.split('.')[0] for name in sys.modules}\n"
        f"print(json.dumps(sorted(top & set({BACKEND_MODULES!r}))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_probe_sees_a_backend_import() -> None:
    """The check itself can fail: importing NumPy is seen."""
    assert loaded_after("import numpy") == ["numpy"]


def test_import_structcov_loads_no_backend() -> None:
    assert loaded_after("import structcov") == []


def test_public_names_load_no_backend() -> None:
    assert loaded_after("from structcov import *") == []


def test_all_keeps_the_seed_api() -> None:
    assert set(structcov.__all__) >= SEED_API | {"__version__"}


def test_all_is_what_the_api_page_documents() -> None:
    """DESIGN.md §5: a test that the public API is what the docs say (docs/api.md)."""
    documented = re.findall(r"^::: structcov\.(\w+)\s*$", API_PAGE.read_text(), flags=re.M)
    assert len(documented) == len(set(documented)), "a name is documented twice"
    exported = set(structcov.__all__)
    assert exported - set(documented) == set(), "exported but not on docs/api.md"
    assert set(documented) - exported == set(), "on docs/api.md but not exported"


def test_all_names_exist_and_are_unique() -> None:
    assert len(structcov.__all__) == len(set(structcov.__all__))
    missing = [name for name in structcov.__all__ if not hasattr(structcov, name)]
    assert missing == []
    assert isinstance(structcov.__version__, str)
