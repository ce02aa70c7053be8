"""Shared fixtures: the backend matrix, dtypes, and hypothesis profiles.

``STRUCTCOV_BACKEND`` picks the backends (comma-separated; each nox session sets
one): numpy, array_api_strict, torch, jax, cupy, dask. Unset: every installed one.

On dask, every array a test creates with ``backend.asarray`` is chunked along its
leading axis (the parameter axis of the means) in chunks of `DASK_CHUNK` rows, so
the multi-chunk paths run; the factor's trailing (rank) axis stays in one chunk.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# JAX must know about float64 before it is imported anywhere.
os.environ.setdefault("JAX_ENABLE_X64", "1")

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", max_examples=50, deadline=None)
# >= 10^4 examples per property (the numerics issue); `nox -s thorough`, never by default.
settings.register_profile(
    "thorough",
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

ALL_BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "cupy", "dask")
_MODULES = {
    "numpy": "numpy",
    "array_api_strict": "array_api_strict",
    "torch": "torch",
    "jax": "jax",
    "cupy": "cupy",
    "dask": "dask",
}

#: dask: rows per chunk along the leading axis of every test array (small, so that
#: even the tiny test layouts span several chunks).
DASK_CHUNK = 2


def _selected() -> list[str]:
    raw = os.environ.get("STRUCTCOV_BACKEND", "")
    if raw:
        names = [b.strip() for b in raw.split(",") if b.strip()]
        unknown = sorted(set(names) - set(ALL_BACKENDS))
        if unknown:
            raise pytest.UsageError(f"STRUCTCOV_BACKEND: unknown backends {unknown}")
        return names
    return [b for b in ALL_BACKENDS if importlib.util.find_spec(_MODULES[b]) is not None]


def _cuda_reason() -> str | None:
    """Why CuPy cannot run here, or None if it can."""
    if importlib.util.find_spec("cupy") is None:
        return "cupy is not installed (pip install structcov[cupy] on a machine with CUDA)"
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # any CUDA failure means "no device"
        return f"no CUDA device available to CuPy ({type(error).__name__}: {error})"
    return None if count > 0 else "no CUDA device available to CuPy (0 devices)"


@dataclass(frozen=True)
class Backend:
    """One array library under test, with its compat namespace and helpers."""

    name: str
    xp: Any  # the array-API namespace (compat-wrapped where needed)

    def asarray(self, value: Any, dtype: str) -> Any:
        """A backend array of ``dtype`` ("float32"/"float64") from a NumPy array.

        dask: chunked along the leading axis (`DASK_CHUNK` rows), other axes whole.
        """
        array = self.xp.asarray(np.asarray(value), dtype=getattr(self.xp, dtype))
        if self.name == "dask" and array.ndim > 0:
            array = array.rechunk({0: DASK_CHUNK, **{axis: -1 for axis in range(1, array.ndim)}})
        return array

    def to_numpy(self, array: Any) -> np.ndarray:
        """A float64 NumPy copy of a backend array (any device)."""
        if self.name == "torch":
            return array.detach().cpu().double().numpy()
        if self.name == "cupy":
            return array.get().astype(np.float64)
        if self.name == "dask":
            return np.asarray(array.compute(scheduler="synchronous")).astype(np.float64)
        return np.asarray(array).astype(np.float64)

    def generator(self, seed: int) -> Any:
        """A fresh generator of this backend's native kind."""
        if self.name == "torch":
            import torch

            return torch.Generator().manual_seed(seed)
        if self.name == "jax":
            import jax

            return jax.random.key(seed)
        if self.name == "cupy":
            import cupy

            return cupy.random.default_rng(seed)
        if self.name == "dask":
            import dask.array

            return dask.array.random.default_rng(seed)
        return np.random.default_rng(seed)

    def dtype_name(self, array: Any) -> str:
        for name in ("float32", "float64"):
            if array.dtype == getattr(self.xp, name):
                return name
        return str(array.dtype)


def _make_backend(name: str) -> Backend:
    if name == "numpy":
        import array_api_compat.numpy as xp
    elif name == "array_api_strict":
        import array_api_strict as xp

        xp.set_array_api_strict_flags(boolean_indexing=False, data_dependent_shapes=False)
    elif name == "torch":
        import array_api_compat.torch as xp
    elif name == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as xp
    elif name == "dask":
        import array_api_compat.dask.array as xp
    else:
        import array_api_compat.cupy as xp
    return Backend(name, xp)


@pytest.fixture(scope="session", params=_selected())
def backend(request: pytest.FixtureRequest) -> Backend:
    name = request.param
    if name == "cupy":
        reason = _cuda_reason()
        if reason:
            pytest.skip(reason)
    elif importlib.util.find_spec(_MODULES[name]) is None:
        pytest.skip(f"{name} is not installed (selected by STRUCTCOV_BACKEND)")
    return _make_backend(name)


@pytest.fixture(params=["float32", "float64"])
def dtype(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def xp(backend: Backend) -> Any:
    return backend.xp


def tolerance(dtype: str) -> dict[str, float]:
    """rtol/atol for comparing results of O(10)-term sums with a float64 oracle."""
    eps = float(np.finfo(dtype).eps)
    return {"rtol": 2000 * eps, "atol": 2000 * eps}
