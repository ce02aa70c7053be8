"""Pure functions over a structure and explicit storage: the core every object calls.

Each operation is a function of (structure, storage, mean, inputs): ``structure`` is
a frozen `Structure` value (``cov.structure``), ``storage`` the mapping
``path -> array`` of its `Slot` s (``cov.storage()``), ``mean`` a mapping
``name -> array``. Nothing is cached on an object and nothing is mutated, so the
same functions serve the seed API's objects, the torch modules (which pass their
``nn.Parameter`` s), JAX pytrees under ``jit``/``grad``/``vmap``, and layers.

Validation: `check_storage` validates a whole storage mapping (keys, shapes, one
namespace, dtype and device) and is called where storage is created or replaced;
the operations check only their own inputs (shape, dtype, namespace, device).

One-off setup: `prepare(structure, storage)` returns the state that `logdet`,
`solve`, `log_prob` and `entropy` share (a capacitance matrix, a square factor), and
`prepare_matmul(structure, storage)` the one `matmul` can reuse (Kronecker's factor
Grams); pass it as ``state=`` to reuse it across calls with the same storage.

The namespace is resolved once per call (`structcov._array_api.namespace`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

from ._array_api import (
    Array,
    chunks_of,
    device_of,
    is_array_api_obj,
    namespace,
    same_device,
    to_device,
)
from ._layout import normalize_mean
from ._random import standard_normal, standard_normals
from .covariances._kl import kl_function, kl_singular_function, kl_to_normal_function
from .covariances._structure import (
    Storage,
    Structure,
    add_into,
    assemble,
    eye,
    inverse_positive,
    logdet_of,
    split_flat,
)

__all__ = [
    "check_storage",
    "diagonal",
    "draw_noise",
    "draw_storage",
    "entropy",
    "factor_matmul",
    "factor_rmatmul",
    "flat_mean",
    "flatten",
    "kl_divergence",
    "kl_to_normal",
    "log_prob",
    "logdet",
    "matmul",
    "prepare",
    "prepare_matmul",
    "reference_array",
    "sample",
    "sample_shape_of",
    "solve",
    "to_dense",
    "trace",
    "unflatten",
    "zeros_storage",
]

_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------- storage
def reference_array(structure: Structure, storage: Storage) -> Array:
    """The first stored array: its namespace, dtype and device are the outputs'."""
    return storage[structure.slots[0].path]


def check_storage(structure: Structure, storage: Mapping[str, Any]) -> dict[str, Array]:
    """Validate a whole storage mapping for ``structure``; return it as a dict in slot order.

    Checks every path once (no missing, no extra), each array's shape, and that all
    arrays share one namespace, one real floating dtype and one device. Static facts
    only (never values). Cost: O(number of slots).
    """
    if not isinstance(storage, Mapping):
        raise TypeError(f"`storage` must be a mapping path -> array, got {type(storage).__name__}")
    paths = structure.paths
    if set(storage) != set(paths):
        raise ValueError(f"`storage` must have the keys {list(paths)}, got {list(storage)}")
    out: dict[str, Array] = {}
    for slot in structure.slots:
        value = storage[slot.path]
        if not is_array_api_obj(value):
            raise TypeError(
                f"`storage[{slot.path!r}]` must be an array, got {type(value).__module__}."
                f"{type(value).__qualname__}"
            )
        if tuple(value.shape) != slot.shape:
            raise ValueError(
                f"`storage[{slot.path!r}]` must have shape {slot.shape}, got {tuple(value.shape)}"
            )
        out[slot.path] = value
    arrays = list(out.values())
    xp = namespace(*arrays, argument="the storage arrays")
    first = arrays[0]
    if not xp.isdtype(first.dtype, "real floating"):
        raise TypeError(f"the storage must have a real floating dtype, got {first.dtype}")
    for path, value in out.items():
        if value.dtype != first.dtype:
            raise TypeError(
                f"the storage arrays must share one dtype: {paths[0]!r} is {first.dtype}, "
                f"{path!r} is {value.dtype}"
            )
        _check_device(value, first, f"`storage[{path!r}]`")
    return out


def _zeros_laid_out_like(
    xp: Any, shape: tuple[int, ...], mean: Array | None, dtype: Any, device: Any
) -> Array:
    """Zeros of ``shape``, split like ``mean`` when ``shape`` is the mean's shape (+ one axis).

    A chunked (dask) or sharded (JAX) mean passes its split on to the storage that
    extends it (``scale``: the mean's shape; ``factor``: the mean's shape + rank), so
    the structured operations line up with the means. ``zeros_like`` keeps the
    layout; broadcasting appends the rank axis whole, and the copy makes it a real
    array rather than a read-only broadcast view.
    """
    if mean is None or tuple(shape[: mean.ndim]) != tuple(mean.shape) or len(shape) > mean.ndim + 1:
        # moved only if the default device is not `device`: `device=` commits a JAX
        # array (see `structcov._array_api.to_device`)
        return to_device(xp.zeros(shape, dtype=dtype), device)
    zeros = xp.zeros_like(mean)
    if len(shape) == mean.ndim:
        return zeros
    return xp.asarray(xp.broadcast_to(xp.expand_dims(zeros, axis=-1), shape), copy=True)


def zeros_storage(structure: Structure, mean: Any) -> dict[str, Array]:
    """Initial storage for ``structure``, in the means' namespace, dtype, device and layout.

    Zeros, except where the structure says otherwise (`Structure.initial_storage`:
    Kronecker's factors start as truncated identities, since zero factors are a saddle).

    ``mean`` is the mapping name -> array (``None`` entries ignored) the structure was
    built for. Cost: one allocation per slot.
    """
    means = normalize_mean(mean)
    reference = means.get(structure.layout.names[0])
    if reference is None:
        raise ValueError(f"`mean` must have the names {list(structure.layout.names)}")
    xp = namespace(reference)
    dtype, device = reference.dtype, device_of(reference)
    zeros = {
        slot.path: _zeros_laid_out_like(
            xp, slot.shape, means.get(slot.name) if slot.name is not None else None, dtype, device
        )
        for slot in structure.slots
    }
    return structure.initial_storage(xp, zeros)


def _scales(structure: Structure, scales: Mapping[str, Any] | Any) -> dict[str, float]:
    names = structure.layout.names
    if isinstance(scales, Mapping):
        unknown = sorted(set(scales) - set(names))
        missing = [name for name in names if name not in scales]
        if unknown or missing:
            raise ValueError(
                f"`mean_parameter_scales` must have the keys {list(names)}, got {list(scales)}"
            )
        values = {name: scales[name] for name in names}
    else:
        values = dict.fromkeys(names, scales)
    out = {}
    for name, value in values.items():
        try:
            number = float(value) if not isinstance(value, (bool, str)) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or number < 0:
            raise ValueError(
                f"`mean_parameter_scales` must be finite non-negative floats, got {value!r} "
                f"for {name!r}"
            )
        out[name] = number
    return out


def draw_storage(
    structure: Structure,
    storage: Storage,
    mean_parameter_scales: Mapping[str, Any] | Any = 1.0,
    generator: Any = None,
) -> dict[str, Array]:
    """New storage drawn for ``structure``: entries N(0, std^2), std by slot.

    ``std = mean_parameter_scales[slot's mean] * slot.multiplier`` (see each
    structure); slots with ``random=False`` are filled with ``std`` (stored through
    the slot's positive transform: the standard deviation is ``std``). The new arrays
    take ``storage``'s namespace, dtype, device, chunks and sharding. ``generator``
    is the backend generator (`structcov._random`); the same state gives the same
    storage. ``storage`` is not changed.
    """
    scales = _scales(structure, mean_parameter_scales)
    reference = reference_array(structure, storage)
    xp = namespace(reference)
    dtype, device = reference.dtype, device_of(reference)
    random_slots = [slot for slot in structure.slots if slot.random]
    draws = standard_normals(
        generator,
        [slot.shape for slot in random_slots],
        xp=xp,
        dtype=dtype,
        device=device,
        # dask: keep each stored array's chunks (laid out like the means).
        chunks=[chunks_of(xp, storage[slot.path]) for slot in random_slots],
    )
    drawn = dict(zip([slot.path for slot in random_slots], draws, strict=True))
    out = {}
    for slot in structure.slots:
        std = slot.multiplier * (1.0 if slot.scale_of is None else scales[slot.scale_of])
        current = storage[slot.path]
        if slot.random:
            # Back where the stored array was (a sharded JAX array: its sharding; the
            # draw itself is whole). Elsewhere a no-op: the draw is made on that device.
            out[slot.path] = to_device(drawn[slot.path], device_of(current)) * std
        else:
            # keeps the layout; a positive transform stores softplus^-1(std) or log(std)
            out[slot.path] = xp.full_like(current, inverse_positive(std, slot.transform))
    return out


# --------------------------------------------------------------------- checks
def _check_device(value: Array, reference: Array, argument: str) -> None:
    # A traced JAX array has no device (None): only compare two known devices.
    device, expected = device_of(value), device_of(reference)
    if device is not None and expected is not None and not same_device(device, expected):
        raise ValueError(f"{argument} must be on the device {expected}, got {device}")


def _check_dtype(value: Array, dtype: Any, argument: str) -> None:
    if value.dtype != dtype:
        raise TypeError(
            f"{argument} must have the covariance parameters' dtype {dtype}, got {value.dtype}"
        )


def _check_array(value: Any, reference: Array, argument: str) -> Any:
    """One namespace with ``reference``, its dtype and device; returns the namespace."""
    xp = namespace(value, reference, argument=f"{argument} and the covariance parameters")
    _check_dtype(value, reference.dtype, argument)
    _check_device(value, reference, argument)
    return xp


def _flat_blocks(
    structure: Structure, storage: Storage, x: Any, argument: str
) -> tuple[Any, tuple[int, ...], list[Array]]:
    """Validate ``x`` of shape (*batch, P); return ``(xp, batch, blocks)``, blocks (B, n)."""
    reference = reference_array(structure, storage)
    if not is_array_api_obj(x):
        raise TypeError(
            f"`{argument}` must be an array of shape (*batch, P), got {type(x).__name__}"
        )
    xp = _check_array(x, reference, f"`{argument}`")
    _check_flat(structure, x, argument)
    batch = tuple(x.shape[:-1])
    num_params = structure.layout.num_params
    x2 = x if x.ndim == 2 else xp.reshape(x, (math.prod(batch), num_params))
    return xp, batch, split_flat(structure, x2)


def _check_flat(structure: Structure, x: Array, argument: str) -> None:
    num_params = structure.layout.num_params
    if x.ndim < 1 or x.shape[-1] != num_params:
        raise ValueError(
            f"`{argument}` must have last dimension {num_params} (P, the number of "
            f"parameters), got shape {tuple(x.shape)}"
        )


def _unbatch(xp: Any, blocks: list[Array], batch: tuple[int, ...]) -> Array:
    flat = assemble(xp, blocks)
    return xp.reshape(flat, (*batch, flat.shape[1]))


# --------------------------------------------------------------------- products
def _split_constant(
    structure: Structure, xp: Any, constant: Any, reference: Array
) -> list[Array | None]:
    layout = structure.layout
    if constant is None:
        return [None] * len(layout.names)
    if isinstance(constant, Mapping):
        present = {k: v for k, v in constant.items() if v is not None}
        if set(present) != set(layout.names):
            raise ValueError(
                f"`additive_constant` must have the keys {list(layout.names)}, got {list(present)}"
            )
        parts = []
        for name, shape in zip(layout.names, layout.shapes, strict=True):
            value = present[name]
            if not is_array_api_obj(value):
                raise TypeError(
                    f"`additive_constant[{name!r}]` must be an array of shape {shape}, got "
                    f"{type(value).__name__}"
                )
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"`additive_constant[{name!r}]` must have shape {shape}, got "
                    f"{tuple(value.shape)}"
                )
            _check_array(value, reference, f"`additive_constant[{name!r}]`")
            parts.append(xp.reshape(value, (-1,)))
        return parts
    if not is_array_api_obj(constant):
        raise TypeError(
            "`additive_constant` must be an array of shape (P,) or a mapping name -> array, "
            f"got {type(constant).__name__}"
        )
    if constant.ndim != 1 or constant.shape[0] != layout.num_params:
        raise ValueError(
            f"`additive_constant` must have shape ({layout.num_params},) (P, the number of "
            f"parameters), got {tuple(constant.shape)}"
        )
    _check_array(constant, reference, "`additive_constant`")
    return [
        constant[offset : offset + size]
        for offset, size in zip(layout.offsets, layout.sizes, strict=True)
    ]


def factor_matmul(
    structure: Structure,
    storage: Storage,
    input: Array,
    /,
    additive_constant: Array | Mapping[str, Array] | None = None,
) -> dict[str, Array]:
    """``m + S z`` split per name: name -> ``(*batch, *mean.shape)``.

    ``input`` (z) has shape ``(*batch, K)``; ``additive_constant`` (m) is ``None``, a
    flat (P,) array or a mapping name -> array shaped like that mean. With
    ``input = eye(K)`` the result holds the columns of S. Cost: the structure's
    ``blocks`` (one GEMM per name for a dense factor) plus one pass to add m,
    written into the new blocks; no copy of S.
    """
    reference = reference_array(structure, storage)
    if not is_array_api_obj(input):
        raise TypeError(
            f"`input` must be an array of shape (*batch, K), got {type(input).__name__}"
        )
    xp = namespace(input, reference, argument="`input` and the covariance parameters")
    num_columns = structure.num_factor_columns
    if input.ndim < 1 or input.shape[-1] != num_columns:
        raise ValueError(
            f"`input` must have last dimension {num_columns} (the number of factor "
            f"columns K), got shape {tuple(input.shape)}"
        )
    _check_dtype(input, reference.dtype, "`input`")
    _check_device(input, reference, "`input`")
    constants = _split_constant(structure, xp, additive_constant, input)
    batch = tuple(input.shape[:-1])
    z = input if input.ndim == 2 else xp.reshape(input, (math.prod(batch), num_columns))
    layout = structure.layout
    out = {}
    for name, shape, block, constant in zip(
        layout.names, layout.shapes, structure.blocks(xp, storage, z), constants, strict=True
    ):
        if constant is not None:
            block = add_into(block, constant)  # the block is new (see `Structure.blocks`)
        out[name] = xp.reshape(block, (*batch, *shape))
    return out


def factor_rmatmul(structure: Structure, storage: Storage, x: Array) -> Array:
    """``S^T x`` for ``x`` of shape ``(*batch, P)``; returns ``(*batch, K)``.

    The transpose of `factor_matmul` (without the constant). Cost: as ``matmul``'s
    first half, O(B P K) for a dense factor.
    """
    xp, batch, blocks = _flat_blocks(structure, storage, x, "x")
    out = structure.rblocks(xp, storage, blocks)
    return xp.reshape(out, (*batch, structure.num_factor_columns))


def prepare_matmul(structure: Structure, storage: Storage) -> Any:
    """What `matmul` can reuse across calls on this storage, for its ``state`` (or ``None``).

    Kronecker: the factor Grams sample_scale^2 S_out S_out^T and S_in S_in^T
    (O(d_out^2 r_out + d_aug^2 r_in)), which `matmul` otherwise forms per call, or
    ``None`` where S (S^T x) is cheaper even with them (small ranks). Only valid for
    this exact storage: prepare again after every change of it (an optimizer step).
    """
    return structure.prepare_matmul(namespace(reference_array(structure, storage)), storage)


def matmul(structure: Structure, storage: Storage, x: Array, state: Any = None) -> Array:
    """Sigma x for ``x`` of shape ``(*batch, P)``, never forming Sigma (S (S^T x) or better).

    ``state`` from `prepare_matmul` on this storage, or ``None`` (formed per call where
    the structure needs it). Kronecker with its Grams given multiplies C_out X~ C_in:
    B P (d_out + d_aug) multiply-adds, nothing formed per call. A state that did not
    come from `prepare_matmul` raises ``TypeError`` (Kronecker).
    """
    xp, batch, blocks = _flat_blocks(structure, storage, x, "x")
    return _unbatch(xp, structure.matmul_blocks(xp, storage, blocks, state), batch)


def diagonal(structure: Structure, storage: Storage) -> Array:
    """The marginal variances diag(Sigma), shape ``(P,)``, in the flat order."""
    xp = namespace(reference_array(structure, storage))
    blocks = structure.diagonal_blocks(xp, storage)
    return blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=0)


def trace(structure: Structure, storage: Storage) -> Array:
    """tr Sigma, a 0-D array."""
    return structure.trace(namespace(reference_array(structure, storage)), storage)


def prepare(structure: Structure, storage: Storage) -> Any:
    """The one-off setup `logdet` and `solve` share, for reuse across calls (or ``None``).

    E.g. the r x r capacitance of low rank plus diagonal, or the stacked square
    factor of a full-rank dense factor. Only valid for this exact storage.
    """
    if structure.is_singular:
        return None
    return structure.prepare(namespace(reference_array(structure, storage)), storage)


def logdet(structure: Structure, storage: Storage, state: Any = None) -> Array:
    """log det Sigma, a 0-D array; ``-inf`` for a structure singular by construction."""
    xp = namespace(reference_array(structure, storage))
    return logdet_of(xp, structure, storage, state)


def _singular_error(structure: Structure) -> ValueError:
    return ValueError(
        f"{structure!r} is singular ({structure.singular_reason()}), so it has no inverse or "
        f"density: {structure.singular_advice}"
    )


def solve(structure: Structure, storage: Storage, x: Array, state: Any = None) -> Array:
    """Sigma^-1 x for ``x`` of shape ``(*batch, P)``; raises for a singular structure."""
    if structure.is_singular:
        raise _singular_error(structure)
    xp, batch, blocks = _flat_blocks(structure, storage, x, "x")
    if state is None:
        state = structure.prepare(xp, storage)
    return _unbatch(xp, structure.solve_blocks(xp, storage, state, blocks), batch)


def to_dense(structure: Structure, storage: Storage) -> Array:
    """The dense Sigma = S S^T, shape (P, P). O(P^2 K): for tests and small problems only."""
    reference = reference_array(structure, storage)
    xp = namespace(reference)
    identity = eye(xp, structure.num_factor_columns, reference)
    factor_t = assemble(xp, structure.blocks(xp, storage, identity))  # (K, P) = S^T
    return xp.matmul(xp.matrix_transpose(factor_t), factor_t)


def flatten(structure: Structure, values: Any, argument: str = "values") -> Array:
    """Concatenate ``values`` (name -> ``(*batch, *shape)``) into ``(*batch, P)``. One copy.

    A bare array is accepted for a bare parameter (the single name ``"mean"``), as in
    ``GaussianParameter(array, cov)``. ``argument`` names ``values`` in error messages.
    """
    layout = structure.layout
    if is_array_api_obj(values) and layout.names == ("mean",):
        values = {"mean": values}  # a bare parameter's value, like its bare mean
    if not isinstance(values, Mapping):
        raise TypeError(
            f"`{argument}` must be a mapping name -> array with the keys {list(layout.names)}, "
            f"got {type(values).__module__}.{type(values).__qualname__}"
        )
    present = {k: v for k, v in values.items() if v is not None}
    if set(present) != set(layout.names):
        raise ValueError(
            f"`{argument}` must have the keys {list(layout.names)}, got {list(present)}"
        )
    for name in layout.names:
        if not is_array_api_obj(present[name]):
            raise TypeError(
                f"`{argument}[{name!r}]` must be an array, got {type(present[name]).__name__}"
            )
    first = present[layout.names[0]]
    batch = tuple(first.shape[: first.ndim - len(layout.shapes[0])])
    parts = []
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        value = present[name]
        if tuple(value.shape) != (*batch, *shape):
            raise ValueError(
                f"`{argument}[{name!r}]` must have shape {(*batch, *shape)} (batch {batch}, then "
                f"the mean's shape), got {tuple(value.shape)}"
            )
        parts.append(value)
    xp = namespace(*parts, argument=f"`{argument}`")
    if len(parts) == 1:
        return xp.reshape(parts[0], (*batch, -1))
    return xp.concat([xp.reshape(v, (*batch, -1)) for v in parts], axis=-1)


def unflatten(structure: Structure, x: Array) -> dict[str, Array]:
    """Split ``x`` of shape ``(*batch, P)`` into name -> ``(*batch, *shape)`` (views)."""
    layout = structure.layout
    xp = namespace(x, argument="`x`")
    _check_flat(structure, x, "x")
    batch = tuple(x.shape[:-1])
    return {
        name: xp.reshape(x[..., offset : offset + size], (*batch, *shape))
        for name, shape, offset, size in zip(
            layout.names, layout.shapes, layout.offsets, layout.sizes, strict=True
        )
    }


# --------------------------------------------------------------------- densities
def sample_shape_of(sample_shape: Any) -> tuple[int, ...]:
    """Normalise ``sample_shape`` (an int or a sequence of ints, ``numpy.int64`` too)."""

    def index(d: Any) -> int:
        if isinstance(d, bool):
            raise TypeError
        number = operator.index(d)
        if number < 0:
            raise TypeError
        return number

    try:
        if not isinstance(sample_shape, Sequence) and not hasattr(sample_shape, "__iter__"):
            return (index(sample_shape),)
        return tuple(index(d) for d in sample_shape)
    except TypeError:
        raise TypeError(
            f"`sample_shape` must be a tuple of non-negative ints, got {sample_shape!r}"
        ) from None


def _noise_chunks(
    xp: Any, structure: Structure, storage: Storage, means: list[Array], sample_ndim: int
) -> Any:
    """How a chunked backend (dask) splits the noise z of shape ``(*sample_shape, K)``.

    Like the columns of the factor S: the K axis takes the chunks of S^T m, a lazy
    product that is only built, never computed (for a diagonal S these are the
    means' chunks, for low rank plus diagonal ``rank`` then the means' chunks). The
    sample axes are dask's ``"auto"``. ``None`` on other backends: nothing is built.
    """
    if chunks_of(xp, means[0]) is None:
        return None
    rows = [
        xp.reshape(mean, (1, size))
        for mean, size in zip(means, structure.layout.sizes, strict=True)
    ]
    columns = chunks_of(xp, structure.rblocks(xp, storage, rows))
    assert columns is not None
    return ("auto",) * sample_ndim + (columns[-1],)


def _present_means(structure: Structure, mean: Mapping[str, Any]) -> list[Array]:
    return [mean[name] for name in structure.layout.names]


def draw_noise(
    structure: Structure,
    storage: Storage,
    mean: Mapping[str, Array],
    sample_shape: tuple[int, ...],
    generator: Any,
) -> Array:
    """The standard normals z of shape ``(*sample_shape, K)`` for a sample of ``mean + S z``.

    In the means' dtype and device; dask: chunked like the columns of S; JAX: split
    like the means when S ends in a diagonal block. Every sampled operation (`sample`,
    `structcov.linear`) draws through here, so one generator state gives one z.
    """
    means = _present_means(structure, mean)
    reference = means[0]
    xp = namespace(reference)
    return standard_normal(
        generator,
        (*sample_shape, structure.num_factor_columns),
        xp=xp,
        dtype=reference.dtype,
        device=device_of(reference),
        chunks=_noise_chunks(xp, structure, storage, means, len(sample_shape)),
        split_like=reference if structure.noise_per_parameter else None,
    )


def sample(
    structure: Structure,
    storage: Storage,
    mean: Mapping[str, Array],
    sample_shape: Any = (),
    generator: Any = None,
) -> dict[str, Array]:
    """Draw ``mean + S z`` with z ~ N(0, I_K): name -> ``(*sample_shape, *shape)``.

    Cost: ``prod(sample_shape) * K`` normals (`draw_noise`) plus the products of
    `factor_matmul`, with the mean added into the new blocks. Memory: z is drawn
    here, so it is handed over to the structure's ``sample_blocks`` where it has
    one (it may scale z in place or drop it once used: low rank plus diagonal,
    Kronecker); the peak is then about output + z, not the 1.5x of a product that
    must leave ``factor_matmul``'s ``input`` untouched. The values are those of
    ``factor_matmul(z, additive_constant=mean)``.
    """
    shape = sample_shape_of(sample_shape)
    z = draw_noise(structure, storage, mean, shape, generator)
    xp = namespace(z)
    means = {name: mean[name] for name in structure.layout.names}
    constants = _split_constant(structure, xp, means, z)
    # A one-element list hands z over: no reference stays in this frame, so the
    # structure can release it (see `Structure.sample_blocks`).
    noise = [z if z.ndim == 2 else xp.reshape(z, (math.prod(shape), structure.num_factor_columns))]
    del z
    layout = structure.layout
    out = {}
    for name, block_shape, block, constant in zip(
        layout.names,
        layout.shapes,
        structure.sample_blocks(xp, storage, noise),
        constants,
        strict=True,
    ):
        if constant is not None:
            block = add_into(block, constant)  # the block is new
        out[name] = xp.reshape(block, (*shape, *block_shape))
    return out


def flat_mean(structure: Structure, mean: Mapping[str, Array]) -> Array:
    """The means as one flat (P,) vector."""
    return flatten(structure, {name: mean[name] for name in structure.layout.names})


def log_prob(
    structure: Structure,
    storage: Storage,
    mean: Mapping[str, Array],
    value: Mapping[str, Array],
    state: Any = None,
) -> Array:
    """log N(value; mean, Sigma); ``value`` name -> ``(*batch, *shape)``, returns ``(*batch,)``.

    = -0.5 (P log 2 pi + log det Sigma + (x - m)^T Sigma^-1 (x - m)) with one shared
    `prepare` for the solve and the logdet. Raises for a singular structure.
    """
    if structure.is_singular:
        raise _singular_error(structure)
    flat = flatten(structure, value, "value")
    reference = reference_array(structure, storage)
    xp = namespace(flat, reference, argument="`value` and the parameter")
    if flat.dtype != reference.dtype:
        raise TypeError(
            f"`value` must have the parameter's dtype {reference.dtype}, got {flat.dtype}"
        )
    centred = flat - flat_mean(structure, mean)
    if state is None:
        state = structure.prepare(xp, storage)
    batch = tuple(centred.shape[:-1])
    c2 = xp.reshape(centred, (math.prod(batch), structure.num_params))
    # The structure's own quadratic form: for low rank plus diagonal a sum of
    # non-negative terms, where sum(c * solve(c)) cancels in float32.
    quadratic = xp.reshape(
        structure.quadratic(xp, storage, state, split_flat(structure, c2)), batch
    )
    return -0.5 * (
        structure.num_params * _LOG_2PI + structure.logdet(xp, storage, state) + quadratic
    )


def entropy(structure: Structure, storage: Storage, state: Any = None) -> Array:
    """Differential entropy 0.5 (P (1 + log 2 pi) + log det Sigma); ``-inf`` if singular."""
    return 0.5 * (structure.num_params * (1.0 + _LOG_2PI) + logdet(structure, storage, state))


def kl_divergence(
    q: tuple[Structure, Storage, Mapping[str, Array]],
    p: tuple[Structure, Storage, Mapping[str, Array]],
) -> Array:
    """KL(q || p) for two ``(structure, storage, mean)`` triples over the same layout.

    Dispatched on (type of q's structure, type of p's structure) through the KL
    registry (`structcov.covariances._kl`); each registration states its identity and cost.
    ``+inf`` for a singular ``p`` and a full-rank ``q`` (q is not absolutely continuous
    with respect to p). When both are singular by construction: the KL of the two
    densities on their common support where the supports coincide (decided with the
    tolerance of `structcov.covariances._kl.Support`: rank, principal angles and the
    mean difference's off-support part against max(P, K) eps cond), else ``+inf``.
    """
    q_structure, q_storage, q_mean = q
    p_structure, p_storage, p_mean = p
    if q_structure.layout != p_structure.layout:
        raise ValueError(
            "`q` and `p` must have the same names (in the same order) and shapes, got "
            f"{dict(zip(q_structure.layout.names, q_structure.layout.shapes, strict=True))} and "
            f"{dict(zip(p_structure.layout.names, p_structure.layout.shapes, strict=True))}"
        )
    q_ref, p_ref = reference_array(q_structure, q_storage), reference_array(p_structure, p_storage)
    xp = namespace(q_ref, p_ref, argument="`q` and `p`")
    if q_ref.dtype != p_ref.dtype:
        raise TypeError(f"`q` and `p` must share one dtype, got {q_ref.dtype} and {p_ref.dtype}")
    difference = flat_mean(p_structure, p_mean) - flat_mean(q_structure, q_mean)
    if p_structure.is_singular:
        if not q_structure.is_singular:
            # q has a density on all of R^P, p lives on a subspace: q is not absolutely
            # continuous with respect to p, so the divergence is +inf exactly.
            return xp.full((), math.inf, dtype=q_ref.dtype, device=device_of(q_ref))
        # Both on subspaces: finite on a common support (decided with a tolerance).
        mean_size = _norm(xp, flat_mean(q_structure, q_mean)) + _norm(
            xp, flat_mean(p_structure, p_mean)
        )
        singular = kl_singular_function(type(q_structure), type(p_structure))
        return singular(xp, q_structure, q_storage, p_structure, p_storage, difference, mean_size)
    function = kl_function(type(q_structure), type(p_structure))
    return function(xp, q_structure, q_storage, p_structure, p_storage, difference)


def _norm(xp: Any, x: Array) -> Array:
    """|x|_2 of a flat vector, scaled first (no overflow of x^2 in float32)."""
    top = xp.max(xp.abs(x)) if x.shape[0] else xp.zeros((), dtype=x.dtype)
    safe = xp.where(top > 0, top, xp.ones_like(top))
    return top * xp.sqrt(xp.sum((x / safe) ** 2))


def kl_to_normal(
    structure: Structure, storage: Storage, mean: Mapping[str, Array], scale: float
) -> Array:
    """KL(N(mean, Sigma) || N(0, scale^2 I)) for a Python float ``scale`` > 0, a 0-D array.

    The same value as ``kl_divergence`` against ``normal_prior(q, scale)``, without
    building that prior: O(P) elementwise for a diagonal q, else q's ``trace`` and
    ``logdet`` only (KL = 0.5 [tr/c - P + P log c - log det Sigma + |m|^2 / c],
    c = scale^2, summed as non-negative terms; see
    ``structcov.covariances._kl._kl_to_normal_generic``). ``+inf`` for a singular q and
    at the exact edges (a zero standard deviation, a zero or infinite trace), where
    NumPy warns of the ``log(0)`` or ``inf - inf`` and the gradient is NaN.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"`scale` must be a float > 0, got {scale!r}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"`scale` must be a finite float > 0, got {scale!r}")
    means = [mean[name] for name in structure.layout.names]
    reference = reference_array(structure, storage)
    xp = namespace(reference, *means, argument="`mean` and `storage`")
    if any(m.dtype != reference.dtype for m in means):
        raise TypeError(f"`mean` must have the storage's dtype {reference.dtype}")
    function = kl_to_normal_function(type(structure))
    return function(xp, structure, storage, means, scale)
