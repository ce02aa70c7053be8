"""One ``Kit`` per backend: arrays, random normals, jit, synchronisation and peak memory.

The benchmark measures three variants of every operation — structcov, the same maths
hand-written natively, and a floor — and each goes through ``Kit.prepare`` so all three
are called, synchronised and measured the same way:

* NumPy, CPU torch, CuPy and CUDA torch call the function eagerly;
* JAX wraps it in ``jax.jit`` (arrays are jit *arguments*, never closure constants, so
  XLA cannot fold the work away at compile time) and calls the jitted function.

Peak memory (``Prepared.peak``), one method per backend, reported in the results:

* ``numpy``: ``tracemalloc`` peak during one call (NumPy reports its array buffers to
  tracemalloc), so: bytes allocated by the call and alive at its high-water mark;
* ``torch`` (CPU): ``torch.profiler`` with ``profile_memory=True``: the allocator's
  ``[memory]`` events of one call, summed in time order, maximum of the running sum;
* ``torch`` (CUDA): ``torch.cuda.max_memory_allocated`` above the level before the call;
* ``jax``: XLA's buffer assignment of the compiled program (``memory_analysis()``:
  output + temporaries), i.e. what the executable allocates, not a measured allocation;
* ``cupy``: a ``cupy.cuda.MemoryHook`` summing the pool's mallocs and frees of one call.
"""

from __future__ import annotations

import importlib.util
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
from _common import generator as _generator
from _common import sync

__all__ = ["BACKEND_NAMES", "Kit", "Prepared", "backend_unavailable"]

BACKEND_NAMES = ("numpy", "torch", "jax", "cupy")


def backend_unavailable(name: str, device: str) -> str | None:
    """Why ``name`` cannot run on ``device`` here (``None`` when it can)."""
    if name not in BACKEND_NAMES:
        return f"unknown backend {name!r} (choose from {', '.join(BACKEND_NAMES)})"
    module = "jax" if name == "jax" else name
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    if name == "cupy":
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() < 1:
                return "no CUDA device available to CuPy"
        except Exception as error:  # any CUDA failure means "no device"
            return f"no CUDA device available to CuPy ({type(error).__name__})"
    if name == "torch" and device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "torch has no CUDA device"
    if name == "jax" and device == "cuda":
        import jax

        if not any(d.platform == "gpu" for d in jax.devices()):
            return "JAX sees no GPU"
    return None


class Prepared:
    """A variant ready to run: ``prepared(gen)`` computes it, ``peak(gen)`` also measures memory."""

    def __init__(self, kit: Kit, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.kit = kit
        self.args = args
        if kit.jit:
            import jax

            self._function = jax.jit(function)
        else:
            self._function = function

    def __call__(self, gen: Any) -> Any:
        return self._function(gen, *self.args)

    def peak(self, gen: Any) -> tuple[Any, int | None]:
        """Run once; return the output and the peak bytes of that call (``None``: unknown)."""
        return self.kit.peak(self, gen)


class Kit:
    """Everything backend-specific the benchmark needs, behind one small interface."""

    def __init__(self, name: str, device: str = "cpu") -> None:
        self.name = name
        self.device = device
        self.jit = name == "jax"
        if name == "numpy":
            self.lib = np
            self.dtype = np.float32
        elif name == "torch":
            import torch

            self.lib = torch
            self.dtype = torch.float32
            self.torch_device = torch.device(device)
        elif name == "jax":
            import jax
            import jax.numpy as jnp

            self.lib = jnp
            self.dtype = jnp.float32
            self.jax_device = jax.devices("gpu" if device == "cuda" else "cpu")[0]
        elif name == "cupy":
            import cupy

            self.lib = cupy
            self.dtype = cupy.float32
        else:
            raise ValueError(f"unknown backend {name!r}")
        self.memory_method = self.memory_methods(name, device)

    @staticmethod
    def memory_methods(name: str, device: str) -> str:
        """How peak memory is measured on ``name`` (see the module docstring)."""
        if name == "torch":
            if device == "cuda":
                return "torch.cuda.max_memory_allocated above the level before one call"
            return "torch.profiler [memory] events of one call (running-sum maximum)"
        return {
            "numpy": "tracemalloc peak of one call",
            "jax": "XLA memory_analysis of the jitted program (output + temporaries)",
            "cupy": "cupy.cuda.MemoryHook: pool mallocs minus frees during one call (maximum)",
        }.get(name, "not measured")

    # ---------------------------------------------------------------- labels
    @property
    def label(self) -> str:
        """How the backend ran: ``numpy``, ``torch``, ``jax.jit``, ``torch (cuda)``, ..."""
        base = "jax.jit" if self.jit else self.name
        return base if self.device == "cpu" or self.name == "cupy" else f"{base} ({self.device})"

    # ---------------------------------------------------------------- arrays
    def asarray(self, value: np.ndarray) -> Any:
        """A float32 backend array with the values of ``value`` (shares memory where it can)."""
        value = np.asarray(value, dtype=np.float32)
        if self.name == "numpy":
            return value
        if self.name == "torch":
            tensor = self.lib.from_numpy(np.ascontiguousarray(value))
            return tensor if self.device == "cpu" else tensor.to(self.torch_device)
        if self.name == "jax":
            import jax

            return jax.device_put(value, self.jax_device)
        return self.lib.asarray(value)

    def to_numpy(self, value: Any) -> np.ndarray:
        """A float64 NumPy copy of a backend array."""
        if self.name == "torch":
            return value.detach().cpu().double().numpy()
        if self.name == "cupy":
            return value.get().astype(np.float64)
        return np.asarray(value).astype(np.float64)

    def generator(self, seed: int) -> Any:
        """A fresh generator of the kind structcov's ``generator`` argument takes."""
        if self.name == "jax":
            import jax

            with jax.default_device(self.jax_device):
                return jax.random.key(seed)
        return _generator(self.name, seed, self.device if self.name == "torch" else None)

    def randn(self, gen: Any, shape: tuple[int, ...]) -> Any:
        """Standard normals, float32: the same numbers structcov draws from ``gen``."""
        if self.name == "numpy":
            return gen.standard_normal(shape, dtype=np.float32)
        if self.name == "torch":
            return self.lib.randn(shape, generator=gen, dtype=self.dtype, device=self.torch_device)
        if self.name == "jax":
            import jax

            return jax.random.normal(gen, shape, dtype=self.dtype)
        return gen.standard_normal(shape, dtype=self.dtype)

    def eye(self, n: int) -> Any:
        if self.name == "torch":
            return self.lib.eye(n, dtype=self.dtype, device=self.torch_device)
        return self.lib.eye(n, dtype=self.dtype)

    def concat(self, arrays: list[Any], axis: int) -> Any:
        if self.name == "torch":
            return self.lib.cat(arrays, dim=axis)
        return self.lib.concatenate(arrays, axis=axis)

    def nbytes(self, tree: Any) -> int:
        """Total bytes of the arrays in ``tree`` (an array or a dict of arrays)."""
        if isinstance(tree, dict):
            return sum(self.nbytes(v) for v in tree.values())
        if self.name == "torch":
            return int(tree.numel() * tree.element_size())
        return int(tree.size * tree.dtype.itemsize)

    # ---------------------------------------------------------------- running
    def prepare(self, function: Callable[..., Any], args: tuple[Any, ...]) -> Prepared:
        """``function(gen, *args)`` as a variant (jitted for JAX, arrays as arguments)."""
        return Prepared(self, function, args)

    def sync(self, result: Any) -> None:
        sync(result)

    # ---------------------------------------------------------------- memory
    def peak(self, prepared: Prepared, gen: Any) -> tuple[Any, int | None]:
        if self.name == "numpy":
            tracemalloc.start()
            try:
                out = prepared(gen)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            return out, peak
        if self.name == "torch":
            return self._torch_peak(prepared, gen)
        if self.name == "jax":
            out = prepared(gen)
            sync(out)
            analysis = prepared._function.lower(gen, *prepared.args).compile().memory_analysis()
            if analysis is None:
                return out, None
            return out, int(analysis.output_size_in_bytes + analysis.temp_size_in_bytes)
        return self._cupy_peak(prepared, gen)

    def _torch_peak(self, prepared: Prepared, gen: Any) -> tuple[Any, int | None]:
        torch = self.lib
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = prepared(gen)
            torch.cuda.synchronize()
            return out, int(torch.cuda.max_memory_allocated() - before)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = prepared(gen)
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        current = peak = 0
        for event in events:
            current += int(event.nbytes())
            peak = max(peak, current)
        return out, peak

    def _cupy_peak(self, prepared: Prepared, gen: Any) -> tuple[Any, int | None]:
        cupy = self.lib

        class _Peak(cupy.cuda.MemoryHook):  # type: ignore[misc]
            name = "structcov-benchmark-peak"

            def __init__(self) -> None:
                self.current = self.peak = 0

            def malloc_postprocess(self, **kwargs: Any) -> None:
                self.current += kwargs["mem_size"]
                self.peak = max(self.peak, self.current)

            def free_postprocess(self, **kwargs: Any) -> None:
                self.current -= kwargs["mem_size"]

        hook = _Peak()
        cupy.cuda.get_current_stream().synchronize()
        with hook:
            out = prepared(gen)
            cupy.cuda.get_current_stream().synchronize()
        return out, hook.peak
