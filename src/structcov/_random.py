"""The one RNG seam: a backend generator in, standard normal arrays out.

The array API has no random numbers, so this is the only module of the core that
knows backends by name. Everything else samples as
``factor_matmul(z, additive_constant=mean)`` with ``z`` drawn here.

Accepted ``generator`` values, by the namespace of the arrays:

=================  ==================================  ==========================
namespace          generator                           ``None`` means
=================  ==================================  ==========================
numpy              ``numpy.random.Generator``          NumPy's global RNG
torch              ``torch.Generator`` (same device)   torch's global RNG
jax                a PRNG key (``jax.random.key`` or   error: JAX needs a key
                   ``jax.random.PRNGKey``)
cupy               ``cupy.random.Generator``           CuPy's global RNG
dask               ``dask.array.random.Generator``     dask's global RandomState
                   (``default_rng``) or
                   ``dask.array.random.RandomState``
others (e.g.       ``numpy.random.Generator``; the     NumPy's global RNG
array_api_strict)  draw is converted with ``asarray``
=================  ==================================  ==========================

The same generator state gives the same numbers. A JAX key is split once per
array when several arrays are drawn at once, so no two arrays share numbers.

dask draws are lazy: a dask array whose chunks are drawn where they are computed,
so no draw materialises on one machine. ``chunks`` (one dask ``chunks=`` value per
shape, or ``None`` for ``"auto"``) says how to split them; other backends ignore it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ._array_api import Array, backend_name, to_device

__all__ = ["standard_normal", "standard_normals"]

_NATIVE = ("torch", "jax", "cupy", "dask")


def _generator_kind(generator: Any) -> str:
    module, name = type(generator).__module__, type(generator).__name__
    if generator is None:
        return "none"
    if module.startswith("numpy.random") and name == "Generator":
        return "numpy"
    if module.startswith("torch") and name == "Generator":
        return "torch"
    if module.startswith("cupy.random") and name == "Generator":
        return "cupy"
    if module.startswith(("jax", "jaxlib")):
        return "jax"
    if module.startswith("dask.array") and name in ("Generator", "RandomState"):
        return "dask"
    return "unknown"


def _describe(generator: Any) -> str:
    return f"{type(generator).__module__}.{type(generator).__qualname__}"


def standard_normals(
    generator: Any,
    shapes: Sequence[tuple[int, ...]],
    *,
    xp: Any,
    dtype: Any,
    device: Any,
    chunks: Sequence[Any] | None = None,
    split_like: Array | None = None,
) -> list[Array]:
    """Draw one standard normal array per shape in ``shapes``.

    Parameters
    ----------
    generator
        A backend generator fitting ``xp`` (see the module table) or ``None``.
    shapes
        The shapes to draw, in order.
    xp, dtype, device
        Namespace, dtype and device of the arrays to return.
    chunks
        dask only: one ``chunks=`` value per shape (``None`` entries, or ``None``
        for all: ``"auto"``). Ignored by other backends.
    split_like
        JAX only: ``None``, or a mean whose leading axis is split over explicit mesh
        axes; the last axis of each draw (one column per parameter) is then drawn
        split the same way, so no device holds the whole draw (the default threefry
        is partitionable: the numbers are those of an unsplit draw).

    Returns
    -------
    list of arrays
        ``len(shapes)`` arrays of standard normals, of ``dtype`` on ``device``.
    """
    backend = backend_name(xp)
    kind = _generator_kind(generator)
    shapes = [tuple(int(d) for d in shape) for shape in shapes]

    if kind == "none" and backend == "jax":
        raise ValueError(
            "`generator` must be a JAX PRNG key for JAX arrays (e.g. jax.random.key(0)), got None;"
            " JAX has no global random state"
        )
    if kind == "unknown":
        raise TypeError(
            f"`generator` must be a numpy.random.Generator, torch.Generator, JAX PRNG key, "
            f"cupy.random.Generator, dask.array.random.Generator/RandomState or None, got "
            f"{_describe(generator)}"
        )
    expected = backend if backend in _NATIVE else "numpy"
    if kind not in ("none", expected):
        raise TypeError(
            f"`generator` does not fit the arrays' backend: arrays are {backend}, so `generator` "
            f"must be {_EXPECTED[expected]}{'' if expected == 'jax' else ' or None'}, got "
            f"{_describe(generator)}"
        )

    if expected == "torch":
        return _torch_normals(generator, shapes, dtype, device)
    if expected == "jax":
        return _jax_normals(generator, shapes, dtype, device, split_like)
    if expected == "cupy":
        return _cupy_normals(generator, shapes, dtype)
    if expected == "dask":
        return _dask_normals(generator, shapes, dtype, chunks)
    return _numpy_normals(generator, shapes, xp, dtype, device, native=backend == "numpy")


def standard_normal(
    generator: Any,
    shape: tuple[int, ...],
    *,
    xp: Any,
    dtype: Any,
    device: Any,
    chunks: Any = None,
    split_like: Array | None = None,
) -> Array:
    """Draw one standard normal array of ``shape`` (see `standard_normals`)."""
    draws = standard_normals(
        generator,
        [shape],
        xp=xp,
        dtype=dtype,
        device=device,
        chunks=[chunks],
        split_like=split_like,
    )
    return draws[0]


_EXPECTED = {
    "numpy": "a numpy.random.Generator",
    "torch": "a torch.Generator",
    "jax": "a JAX PRNG key",
    "cupy": "a cupy.random.Generator",
    "dask": "a dask.array.random.Generator (dask.array.random.default_rng) or RandomState",
}


def _numpy_normals(
    generator: Any, shapes: list[tuple[int, ...]], xp: Any, dtype: Any, device: Any, native: bool
) -> list[Array]:
    import numpy as np

    if native and generator is not None:
        # np.asarray: a shape () draw is a NumPy scalar, not a 0-D array.
        return [np.asarray(generator.standard_normal(s, dtype=dtype)) for s in shapes]
    # None: NumPy's global state, so that numpy.random.seed() governs it.
    draw = np.random.standard_normal if generator is None else generator.standard_normal
    if native:
        return [np.asarray(draw(s), dtype=dtype) for s in shapes]
    return [xp.asarray(draw(s), dtype=dtype, device=device) for s in shapes]


def _torch_normals(
    generator: Any, shapes: list[tuple[int, ...]], dtype: Any, device: Any
) -> list[Array]:
    import torch

    # `.type` of the torch.device s themselves (constructing one costs about 1 µs)
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    if generator is not None and generator.device.type != kind:
        raise ValueError(
            f"`generator` is a torch.Generator on {generator.device}, but the arrays are on "
            f"{device}: use torch.Generator(device={str(device)!r})"
        )
    return [torch.randn(s, generator=generator, dtype=dtype, device=device) for s in shapes]


def _jax_split(jax: Any, like: Any, shape: tuple[int, ...]) -> Any:
    """``out_sharding`` splitting the last axis of ``shape`` like ``like``'s leading axis.

    ``None`` (JAX's default) unless ``like`` is split over explicit mesh axes whose
    size divides that axis. Under automatic sharding XLA splits the draw by itself.
    """
    if like is None or not shape:
        return None
    sharding = jax.typeof(like).sharding
    spec = tuple(sharding.spec)
    axes = spec[0] if spec else None
    if axes is None:
        return None
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    mesh = sharding.mesh
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    if any(types[name] != jax.sharding.AxisType.Explicit for name in names):
        return None
    if shape[-1] % math.prod(mesh.shape[name] for name in names):
        return None
    return jax.sharding.PartitionSpec(*([None] * (len(shape) - 1)), axes)


def _jax_normals(
    key: Any, shapes: list[tuple[int, ...]], dtype: Any, device: Any, split_like: Any = None
) -> list[Array]:
    import jax

    typed = jax.numpy.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not (typed and key.shape == ()) and not (str(key.dtype) == "uint32" and key.shape == (2,)):
        raise TypeError(
            "`generator` must be a single JAX PRNG key (jax.random.key(seed) or "
            f"jax.random.PRNGKey(seed)), got an array of dtype {key.dtype} and shape {key.shape}"
        )
    # One key per array: reusing a key would put the same numbers in two arrays.
    keys = [key] if len(shapes) == 1 else list(jax.random.split(key, len(shapes)))
    out: list[Any] = [
        jax.random.normal(k, s, dtype=dtype, out_sharding=_jax_split(jax, split_like, s))
        for k, s in zip(keys, shapes, strict=True)
    ]
    # A sharded reference's "device" is its sharding, which fits only arrays of its own
    # rank and layout: only a single device is imposed here (split draws: `split_like`).
    # Moved only when drawn elsewhere (`to_device`): device_put commits an array, and a
    # committed leaf next to uncommitted means makes a jitted training step compile twice.
    if isinstance(device, jax.Device):
        out = [to_device(z, device) for z in out]
    return out


def _cupy_normals(generator: Any, shapes: list[tuple[int, ...]], dtype: Any) -> list[Array]:
    import cupy

    draw = cupy.random.standard_normal if generator is None else generator.standard_normal
    return [draw(s, dtype=dtype) for s in shapes]


def _dask_normals(
    generator: Any, shapes: list[tuple[int, ...]], dtype: Any, chunks: Sequence[Any] | None
) -> list[Array]:
    import dask.array as da

    # None: dask's global RandomState (the module-level functions; dask.array.random.seed).
    draw = da.random.standard_normal if generator is None else generator.standard_normal
    # Only a Generator draws in float32 directly; a RandomState draws float64.
    native_dtype = type(generator).__name__ == "Generator"
    splits = [None] * len(shapes) if chunks is None else list(chunks)
    out = []
    for shape, split in zip(shapes, splits, strict=True):
        split = "auto" if split is None else split
        if math.prod(shape) == 0:
            split = shape  # one (empty) chunk per axis: dask's "auto" divides by the size
        if native_dtype:
            out.append(draw(shape, chunks=split, dtype=dtype))
        else:
            out.append(draw(shape, chunks=split).astype(dtype, copy=False))
    return out
