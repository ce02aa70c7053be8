"""Namespace, device and dtype helpers.

This is the only module of structcov that imports ``array_api_compat``; every
other module asks here for the namespace of its arrays. Nothing here imports a
backend: ``array_api_compat`` recognises arrays by their type's module name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import array_api_compat

__all__ = [
    "Array",
    "backend_function",
    "backend_name",
    "chunks_of",
    "device_of",
    "is_array_api_obj",
    "namespace",
    "same_device",
    "to_device",
]


class Array(Protocol):
    """An array of an array-API namespace: the part of the standard's array object the
    core relies on outside namespace calls (shape facts, indexing, arithmetic).

    NumPy, CuPy, torch, JAX, dask and array_api_strict arrays all satisfy it. Results
    are typed ``Any``: the namespace functions (``xp.matmul``, ...) are untyped, and
    arithmetic between arrays and Python scalars is not worth a union per operator.
    """

    @property
    def shape(self) -> tuple[Any, ...]: ...

    @property
    def ndim(self) -> int: ...

    @property
    def dtype(self) -> Any: ...

    def __getitem__(self, key: Any, /) -> Any: ...

    def __add__(self, other: Any, /) -> Any: ...

    def __radd__(self, other: Any, /) -> Any: ...

    def __sub__(self, other: Any, /) -> Any: ...

    def __rsub__(self, other: Any, /) -> Any: ...

    def __mul__(self, other: Any, /) -> Any: ...

    def __rmul__(self, other: Any, /) -> Any: ...

    def __truediv__(self, other: Any, /) -> Any: ...

    def __rtruediv__(self, other: Any, /) -> Any: ...

    def __pow__(self, other: Any, /) -> Any: ...

    def __matmul__(self, other: Any, /) -> Any: ...

    def __neg__(self) -> Any: ...

    def __abs__(self) -> Any: ...

    def __eq__(self, other: object, /) -> Any: ...  # elementwise, an array

    def __ne__(self, other: object, /) -> Any: ...

    def __lt__(self, other: Any, /) -> Any: ...

    def __le__(self, other: Any, /) -> Any: ...

    def __gt__(self, other: Any, /) -> Any: ...

    def __ge__(self, other: Any, /) -> Any: ...

    def __and__(self, other: Any, /) -> Any: ...

    def __or__(self, other: Any, /) -> Any: ...

    def __invert__(self) -> Any: ...


_BACKENDS = (
    ("numpy", array_api_compat.is_numpy_namespace),
    ("torch", array_api_compat.is_torch_namespace),
    ("jax", array_api_compat.is_jax_namespace),
    ("cupy", array_api_compat.is_cupy_namespace),
    ("dask", array_api_compat.is_dask_namespace),
    ("array_api_strict", array_api_compat.is_array_api_strict_namespace),
)


#: (array type, dtype) for one array, a tuple of those pairs for several -> namespace,
#: for arrays whose namespace was looked up before
_NAMESPACES: dict[Any, Any] = {}
#: Array types whose ``.device`` attribute is their device (see `device_of`).
_STANDARD_DEVICE: set[type] = set()


def namespace(*arrays: Array, argument: str = "the arrays") -> Any:
    """The array-API namespace shared by ``arrays`` (compat-wrapped where needed).

    Raises ``TypeError`` naming ``argument`` if the arrays come from different
    libraries or are not arrays at all.
    """
    # array_namespace costs microseconds, a measurable part of a call at small P. Its
    # answer depends only on the array type (and dtype: JAX's float0 gradients are
    # NumPy arrays), so arrays of one known (type, dtype) skip it.
    # Several arrays are keyed by the tuple of their pairs (a torch Tensor input and
    # Parameter storage are two types: one lookup, then cached).
    key: Any = (
        (type(arrays[0]), getattr(arrays[0], "dtype", None))
        if len(arrays) == 1
        else tuple((type(a), getattr(a, "dtype", None)) for a in arrays)
    )
    cached = _NAMESPACES.get(key)
    if cached is not None:
        return cached
    try:
        xp = array_api_compat.array_namespace(*arrays)
        if arrays:
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


def reshaped(xp: Any, x: Array, shape: tuple[int, ...]) -> Array:
    """``xp.reshape(x, shape)``, or ``x`` itself when it already has that shape.

    For the hot paths (a layer's forward): a no-op reshape still costs the namespace
    wrapper's checks and, on torch, a new view and autograd node (a few µs per call).
    """
    return x if tuple(x.shape) == shape else xp.reshape(x, shape)


def device_of(x: Array) -> Any:
    """The device of ``x`` (``None`` for a traced JAX array)."""
    # compat's `device` tests for NumPy, dask, JAX and sparse arrays (a few µs) before
    # it reads the standard `.device` attribute; a type found to be none of them is read
    # directly from then on
    if type(x) in _STANDARD_DEVICE:
        return getattr(x, "device")  # noqa: B009 -- `Array` does not declare it
    if not (
        array_api_compat.is_numpy_array(x)
        or array_api_compat.is_dask_array(x)
        or array_api_compat.is_jax_array(x)
        or array_api_compat.is_pydata_sparse_array(x)
    ):
        _STANDARD_DEVICE.add(type(x))
    return array_api_compat.device(x)


def to_device(x: Array, device: Any) -> Array:
    """``x`` on ``device`` (a device from `device_of`: for a sharded JAX array, its sharding).

    ``None`` (a traced JAX array has no device) leaves ``x`` where it is.
    """
    if device is None or device_of(x) == device:
        # Already there: no copy, and a JAX array stays uncommitted (a committed leaf next
        # to uncommitted ones makes a jitted step compile a second time on its own output).
        return x
    return array_api_compat.to_device(x, device)


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
    chunked: Any = x  # a dask array: ``chunks`` is dask's, not the standard's
    return tuple(tuple(int(c) for c in axis) for axis in chunked.chunks)


_F = TypeVar("_F", bound=Callable[..., Any])


def backend_function(xp: Any, hooks: dict[str, _F], cache: dict[str, _F], default: _F) -> _F:
    """``hooks[backend_name(xp)]``, else ``default``: a per-backend kernel for what the
    standard cannot say in one call (a fused softplus, torch's ``linear``).

    Looked up once per namespace and kept in ``cache`` under the namespace module's
    name (not the module: ``torch.compile`` cannot hash a module).
    """
    key = getattr(xp, "__name__", None)
    function = cache.get(key) if key is not None else None
    if function is None:
        function = hooks.get(backend_name(xp), default)
        if key is not None:
            cache[key] = function
    return function


def backend_name(xp: Any) -> str:
    """A short name for the namespace ``xp``: numpy, torch, jax, cupy, dask, array_api_strict."""
    for name, test in _BACKENDS:
        if test(xp):
            return name
    return getattr(xp, "__name__", type(xp).__name__)
