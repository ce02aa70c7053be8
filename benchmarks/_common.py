"""Helpers shared by the benchmark scripts (``scale.py``, ``suite.py``).

Nothing here imports an array backend at module level: each helper imports the
one it is asked for, so ``--backends numpy`` never pays for importing torch or JAX.
"""

from __future__ import annotations

import importlib
import math
import os
import platform
import subprocess
import sys
from typing import Any

import numpy as np

__all__ = [
    "generator",
    "layer_shape",
    "load_average",
    "machine_info",
    "namespace",
    "sync",
]


def namespace(backend: str, *, x64: bool = True) -> Any:
    """The array-API namespace of ``backend`` (``jax.numpy`` for JAX, compat-wrapped otherwise).

    With ``x64`` (the default, as in ``scale.py``) JAX is asked for float64 support
    through ``JAX_ENABLE_X64`` before it is first imported; float32 arrays stay float32.
    """
    if backend == "jax":
        if x64:
            os.environ.setdefault("JAX_ENABLE_X64", "1")
        return importlib.import_module("jax.numpy")
    return importlib.import_module(f"array_api_compat.{backend}")


def generator(backend: str, seed: int, device: Any = None) -> Any:
    """A fresh generator of ``backend``'s native kind: what structcov's ``generator`` takes."""
    if backend == "torch":
        import torch

        return torch.Generator(device=device or "cpu").manual_seed(seed)
    if backend == "jax":
        import jax

        return jax.random.key(seed)
    if backend == "cupy":
        import cupy

        return cupy.random.default_rng(seed)
    return np.random.default_rng(seed)


def _leaves(result: Any) -> list[Any]:
    if isinstance(result, dict):
        return [leaf for value in result.values() for leaf in _leaves(value)]
    if isinstance(result, (list, tuple)):
        return [leaf for value in result for leaf in _leaves(value)]
    return [result]


def sync(result: Any) -> None:
    """Wait until every array in ``result`` (an array, or a dict/list/tuple of them) is computed.

    JAX: ``block_until_ready``; CUDA torch tensors: ``torch.cuda.synchronize``;
    CuPy: synchronize the current stream. NumPy and CPU torch are synchronous.
    """
    cuda_torch = cupy_seen = False
    for leaf in _leaves(result):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
        elif type(leaf).__module__.startswith("torch") and getattr(leaf, "is_cuda", False):
            cuda_torch = True
        elif type(leaf).__module__.startswith("cupy"):
            cupy_seen = True
    if cuda_torch:
        import torch

        torch.cuda.synchronize()
    if cupy_seen:
        import cupy

        cupy.cuda.get_current_stream().synchronize()


def layer_shape(num_params: int) -> tuple[int, int]:
    """``(d_out, d_in)`` of a dense layer with weight ``(d_out, d_in)`` and bias ``(d_out,)``.

    ``d_out * (d_in + 1) == num_params`` exactly, with ``d_out`` the largest divisor of
    ``num_params`` not above its square root (so the layer is about square):
    1e3 -> (25, 39), 1e6 -> (1000, 999), 256 * 257 -> (256, 256).
    """
    if num_params < 2:
        raise ValueError(f"`num_params` must be >= 2, got {num_params}")
    for d_out in range(math.isqrt(num_params), 0, -1):
        if num_params % d_out == 0 and num_params // d_out >= 2:
            return d_out, num_params // d_out - 1
    raise AssertionError("unreachable: d_out = 1 always divides")


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages (``None`` where the OS has none)."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpu_names() -> list[str]:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU model and count, memory, GPUs, versions."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory = pages * page_size
    except (OSError, ValueError):
        memory = None
    versions: dict[str, str] = {"python": sys.version.split()[0], "numpy": np.__version__}
    for module in ("structcov", "torch", "jax", "cupy"):
        if module in sys.modules:
            versions[module] = str(getattr(sys.modules[module], "__version__", "?"))
    return {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_bytes": memory,
        "gpus": _gpu_names(),
        "platform": platform.platform(),
        "versions": versions,
    }
