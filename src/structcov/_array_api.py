"""Namespace, device and dtype helpers.

This is the only module of structcov that imports ``array_api_compat``; every
other module asks here for the namespace of its arrays. Nothing here imports a
backend: ``array_api_compat`` recognises arrays by their type's module name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from typing import Any

import array_api_compat

__all__ = [
    "Array",
    "Layout",
    "backend_name",
    "chunks_of",
    "describe_means",
    "device_of",
    "is_array_api_obj",
    "namespace",
    "normalize_mean",
    "same_device",
    "to_device",
]

#: Arrays are typed loosely: any array of an array-API namespace.
Array = Any

_BACKENDS = (
    ("numpy", array_api_compat.is_numpy_namespace),
    ("torch", array_api_compat.is_torch_namespace),
    ("jax", array_api_compat.is_jax_namespace),
    ("cupy", array_api_compat.is_cupy_namespace),
    ("dask", array_api_compat.is_dask_namespace),
    ("array_api_strict", array_api_compat.is_array_api_strict_namespace),
)


#: (array type, dtype) -> namespace, for arrays whose namespace was looked up before
_NAMESPACES: dict[tuple[type, Any], Any] = {}


def namespace(*arrays: Array, argument: str = "the arrays") -> Any:
    """The array-API namespace shared by ``arrays`` (compat-wrapped where needed).

    Raises ``TypeError`` naming ``argument`` if the arrays come from different
    libraries or are not arrays at all.
    """
    # array_namespace costs microseconds, a measurable part of a call at small P. Its
    # answer depends only on the array type (and dtype: JAX's float0 gradients are
    # NumPy arrays), so arrays of one known (type, dtype) skip it.
    first = arrays[0] if arrays else None
    key = (type(first), getattr(first, "dtype", None))
    cached = _NAMESPACES.get(key)
    if cached is not None and all(
        type(a) is key[0] and getattr(a, "dtype", None) == key[1] for a in arrays[1:]
    ):
        return cached
    try:
        xp = array_api_compat.array_namespace(*arrays)
        if len(arrays) == 1:
            _NAMESPACES[key] = xp
        return xp
    except TypeError as error:
        kinds = sorted({f"{type(a).__module__}.{type(a).__qualname__}" for a in arrays})
        raise TypeError(
            f"{argument} must be arrays of one array-API library, got {', '.join(kinds)} ({error})"
        ) from None


def is_array_api_obj(x: Any) -> bool:
    """Whether ``x`` is an array of a library array-api-compat knows."""
    return bool(array_api_compat.is_array_api_obj(x))


def device_of(x: Array) -> Any:
    """The device of ``x`` (``None`` for a traced JAX array)."""
    return array_api_compat.device(x)


def to_device(x: Array, device: Any) -> Array:
    """``x`` on ``device`` (a device from `device_of`: for a sharded JAX array, its sharding).

    ``None`` (a traced JAX array has no device) leaves ``x`` where it is.
    """
    return x if device is None else array_api_compat.to_device(x, device)


def same_device(a: Any, b: Any) -> bool:
    """Whether two devices (from `device_of`) are the same place.

    A sharded JAX array's device is its sharding: arrays split differently over the
    same devices (a weight over its rows, its bias whole) are in the same place.
    """
    set_a, set_b = getattr(a, "device_set", None), getattr(b, "device_set", None)
    if set_a is not None and set_b is not None:
        return bool(set_a == set_b)
    return bool(a == b)


def chunks_of(xp: Any, x: Array) -> tuple[tuple[int, ...], ...] | None:
    """The chunking of ``x`` if ``xp`` is a chunked namespace (dask), else ``None``.

    The standard has no notion of chunks, so this is asked of the namespace here,
    not of the array elsewhere; it only informs how lazy draws are split (see
    `structcov._random`), never the maths.
    """
    if not array_api_compat.is_dask_namespace(xp):
        return None
    return tuple(tuple(int(c) for c in axis) for axis in x.chunks)


def backend_name(xp: Any) -> str:
    """A short name for the namespace ``xp``: numpy, torch, jax, cupy, dask, array_api_strict."""
    for name, test in _BACKENDS:
        if test(xp):
            return name
    return getattr(xp, "__name__", type(xp).__name__)


def normalize_mean(mean: Any) -> dict[str, Array | None]:
    """Turn the ``mean`` argument into an insertion-ordered ``{name: array or None}``.

    A bare array means ``{"mean": array}``.
    """
    if isinstance(mean, Mapping):
        out: dict[str, Array | None] = {}
        for name, value in mean.items():
            if not isinstance(name, str):
                raise TypeError(f"`mean` keys must be strings, got {name!r}")
            out[name] = value
        return out
    if mean is None:
        raise ValueError("`mean` must be an array or a mapping of names to arrays, got None")
    return {"mean": mean}


@dataclass(frozen=True)
class Layout:
    """Static description of the flat parameter vector (DESIGN.md §1).

    ``names`` are the participating mean names in insertion order, ``shapes``
    their shapes. The flat vector is the concatenation of each mean flattened
    in row-major order; ``offsets[i]:offsets[i] + sizes[i]`` is name ``i``'s slot.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(prod(shape) for shape in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        offsets, total = [], 0
        for size in self.sizes:
            offsets.append(total)
            total += size
        return tuple(offsets)

    @property
    def num_params(self) -> int:
        """P, the length of the flat parameter vector."""
        return sum(self.sizes)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self.shapes[self.names.index(name)]


def describe_means(mean_parameters: Any) -> tuple[Layout, Any, Any, Any]:
    """Validate the means and return ``(layout, xp, dtype, device)``.

    Checks only static facts: at least one non-``None`` entry, one namespace,
    one real floating dtype, one device.
    """
    means = normalize_mean(mean_parameters)
    present = {name: value for name, value in means.items() if value is not None}
    if not present:
        given = "an empty mapping" if not means else f"only None entries {list(means)}"
        raise ValueError(f"`mean` must contain at least one array, got {given}")
    for name, value in present.items():
        if not array_api_compat.is_array_api_obj(value):
            raise TypeError(
                f"`mean[{name!r}]` must be an array, got {type(value).__module__}."
                f"{type(value).__qualname__}"
            )
    xp = namespace(*present.values(), argument="`mean` entries")
    first_name, first = next(iter(present.items()))
    dtype, device = first.dtype, device_of(first)
    for name, value in present.items():
        if not xp.isdtype(value.dtype, "real floating"):
            raise TypeError(f"`mean[{name!r}]` must have a real floating dtype, got {value.dtype}")
        if value.dtype != dtype:
            raise TypeError(
                f"`mean` entries must share one dtype: `mean[{first_name!r}]` is {dtype}, "
                f"`mean[{name!r}]` is {value.dtype}"
            )
        if not same_device(device_of(value), device):
            raise ValueError(
                f"`mean` entries must live on one device: `mean[{first_name!r}]` is on "
                f"{device}, `mean[{name!r}]` is on {device_of(value)}"
            )
    layout = Layout(
        names=tuple(present),
        shapes=tuple(tuple(int(d) for d in value.shape) for value in present.values()),
    )
    return layout, xp, dtype, device
