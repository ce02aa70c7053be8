"""Machinery shared by every covariance structure.

Every structure is Sigma = S S^T with S of shape (P, K). A structure declares
its storage as a tuple of `Slot` s (what array lives where, its shape,
learning-rate scaling and initial standard deviation) and implements
``_blocks(xp, z)`` (the per-name products ``S_name z``), ``_rblocks(xp, x)``
(``S^T x``), ``_diagonal_blocks``, ``_logdet`` and ``_solve_blocks``. Everything
else — validation, storage creation, ``reset_parameters``, ``lr_scaling``, the
additive constant, flattening, ``matmul = S (S^T x)``, ``to_dense`` — is
written once here.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._array_api import (
    Array,
    Layout,
    chunks_of,
    describe_means,
    device_of,
    is_array_api_obj,
    namespace,
    normalize_mean,
    same_device,
    to_device,
)
from .._random import standard_normals

__all__ = ["Slot", "StructuredCovariance", "add_into", "check_rank", "total"]


def total(parts: Iterable[Array]) -> Array:
    """The sum of a non-empty sequence of arrays (keeps the first one's namespace)."""
    return functools.reduce(operator.add, parts)


def add_into(block: Array, other: Array) -> Array:
    """``block + other``, written into ``block`` where the backend allows it.

    ``block`` must be a new array that nobody else holds (a GEMM output): adding in
    place saves a pass over it and a temporary of its size. Immutable arrays (JAX)
    rebind instead; a backend that refuses (torch ``vmap`` with ``other`` batched and
    ``block`` not) gets the out-of-place sum, which raises again if the add itself is wrong.
    """
    try:
        block += other
    except (RuntimeError, TypeError, ValueError):
        block = block + other
    return block


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
        return xp.zeros(shape, dtype=dtype, device=device)
    zeros = xp.zeros_like(mean)
    if len(shape) == mean.ndim:
        return zeros
    return xp.asarray(xp.broadcast_to(xp.expand_dims(zeros, axis=-1), shape), copy=True)


def check_rank(value: Any, argument: str, *, optional: bool) -> int | None:
    """Validate a rank argument: a positive int (or ``None`` when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        expected = "a positive int or None" if optional else "a positive int"
        raise TypeError(f"`{argument}` must be {expected}, got {value!r}")
    if value < 1:
        raise ValueError(f"`{argument}` must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class Slot:
    """One stored array of a covariance.

    ``attribute`` is the storage attribute (``factor``, ``scale``, ...); ``name`` the
    mean name it belongs to, or ``None`` for a single array attribute (Kronecker's
    ``output_factor``). Its initial entries are N(0, std^2) with
    ``std = mean_parameter_scales[scale_of] * multiplier`` (``scale_of=None``: no scale);
    with ``random=False`` every entry is set to ``std`` instead.
    """

    attribute: str
    name: str | None
    shape: tuple[int, ...]
    lr_scaling: float
    multiplier: float
    scale_of: str | None
    random: bool = True

    @property
    def path(self) -> str:
        return self.attribute if self.name is None else f"{self.attribute}.{self.name}"


class StructuredCovariance:
    """Common base: storage, validation and the ``factor_matmul`` driver.

    Not public; the public base is [`FactorizedCovariance`][structcov.FactorizedCovariance].
    """

    #: storage attributes holding ``{name: array}`` dicts
    _dict_attributes: tuple[str, ...] = ()
    #: storage attributes holding a single array
    _array_attributes: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._layout: Layout | None = None
        self._slot_cache: tuple[Slot, ...] = ()
        for attribute in self._dict_attributes:
            setattr(self, attribute, {})
        for attribute in self._array_attributes:
            setattr(self, attribute, None)

    # ------------------------------------------------------------------ hooks
    def _setup(self, layout: Layout) -> None:
        """Validate the layout for this structure and fix the static ranks."""
        raise NotImplementedError

    def _slots(self) -> tuple[Slot, ...]:
        """The stored arrays, in a fixed order."""
        raise NotImplementedError

    def _blocks(self, xp: Any, z: Array) -> list[Array]:
        """``S_name z`` for each name in layout order: ``z`` is (B, K), each block (B, n).

        Each block must be a new array, not a view of ``z`` or of the storage:
        ``factor_matmul`` adds the mean into it in place.
        """
        raise NotImplementedError

    @property
    def num_factor_columns(self) -> int:
        """K, the number of columns of the sampling factor S (standard normals per sample)."""
        raise NotImplementedError

    def _rblocks(self, xp: Any, x: list[Array]) -> Array:
        """``S^T x`` of shape (B, K) from the per-name blocks ``x`` (each (B, n))."""
        raise NotImplementedError

    def _diagonal_blocks(self, xp: Any) -> list[Array]:
        """The diagonal of Sigma per name, each of shape (n,)."""
        raise NotImplementedError

    def _logdet(self, xp: Any) -> Array:
        """log det Sigma of a full-rank structure, a 0-D array."""
        raise NotImplementedError

    def _solve_blocks(self, xp: Any, x: list[Array]) -> list[Array]:
        """``Sigma^-1 x`` per name for a full-rank structure, blocks of shape (B, n)."""
        raise NotImplementedError

    @property
    def is_singular(self) -> bool:
        """Whether Sigma is singular by construction (fewer factor columns than it needs).

        A static fact of the structure and its ranks; a full-rank structure whose
        stored values happen to be degenerate is not detected here.
        """
        raise NotImplementedError

    _singular_advice = "use LowRankPlusDiagonalCovariance or a full-rank structure"

    # ------------------------------------------------------------ properties
    @property
    def layout(self) -> Layout:
        """Names, shapes and offsets of the flat parameter vector."""
        if self._layout is None:
            raise RuntimeError(
                f"{type(self).__name__} has not been initialized: call "
                "initialize_parameters(mean) first, or pass it to GaussianParameter(mean, cov)"
            )
        return self._layout

    @property
    def num_params(self) -> int:
        """P, the length of the flat parameter vector."""
        return self.layout.num_params

    @property
    def lr_scaling(self) -> dict[str, float]:
        """Learning-rate scaling per storage path (``"factor.weight"``, ``"output_factor"``)."""
        return {slot.path: slot.lr_scaling for slot in self._slots_checked()}

    def _slots_checked(self) -> tuple[Slot, ...]:
        # Built once at initialization, not lazily: a first-call cache write breaks
        # torch.compile tracing, and rebuilding Slot objects per call is measurable at small P.
        if not self._slot_cache:
            self.layout  # noqa: B018 -- raises the "not initialized" error
        return self._slot_cache

    def _get(self, slot: Slot) -> Array:
        stored = getattr(self, slot.attribute)
        return stored if slot.name is None else stored[slot.name]

    def _set(self, slot: Slot, value: Array) -> None:
        if slot.name is None:
            setattr(self, slot.attribute, value)
        else:
            getattr(self, slot.attribute)[slot.name] = value

    def _reference_array(self) -> Array:
        """A stored array whose namespace, dtype and device the outputs take."""
        return self._get(self._slots_checked()[0])

    def _static_state(self) -> tuple[tuple[str, Any], ...]:
        """Everything but the stored arrays, as a sorted hashable tuple.

        For adapters: JAX pytree aux data, serialisation. Equal structures with
        equal ranks and layouts give equal tuples.
        """
        # The slot cache is derived from the rest, so it is rebuilt rather than carried.
        skip = {*self._dict_attributes, *self._array_attributes, "_slot_cache"}
        return tuple(sorted((k, v) for k, v in vars(self).items() if k not in skip))

    @classmethod
    def _rebuild(cls, static: tuple[tuple[str, Any], ...], arrays: Mapping[str, Any]) -> Any:
        """A covariance with ``static`` state and ``arrays`` (path -> array), not validated.

        The inverse of ``(_static_state(), storage())``. Leaves may be anything
        (JAX passes tracers or placeholders when it rebuilds a pytree).
        """
        rebuilt = cls.__new__(cls)
        for key, value in static:
            setattr(rebuilt, key, value)
        for attribute in cls._dict_attributes:
            setattr(rebuilt, attribute, {})
        for attribute in cls._array_attributes:
            setattr(rebuilt, attribute, None)
        rebuilt._slot_cache = rebuilt._slots()
        for slot in rebuilt._slot_cache:
            rebuilt._set(slot, arrays[slot.path])
        return rebuilt

    def storage(self) -> dict[str, Array]:
        """The stored arrays by path (``"factor.weight"``, ``"output_factor"``), in a fixed order.

        The paths are those of `lr_scaling`. The arrays are the stored ones,
        not copies.
        """
        return {slot.path: self._get(slot) for slot in self._slots_checked()}

    def load_storage(self, arrays: Mapping[str, Array]) -> None:
        """Replace the stored arrays by ``arrays`` (path -> array, every path once).

        Each array must have its slot's shape; namespace, dtype and device are the
        caller's choice (e.g. to move a covariance to another backend).
        """
        slots = self._slots_checked()
        paths = [slot.path for slot in slots]
        if set(arrays) != set(paths):
            raise ValueError(f"`arrays` must have the keys {paths}, got {list(arrays)}")
        for slot in slots:
            value = arrays[slot.path]
            if tuple(value.shape) != slot.shape:
                raise ValueError(
                    f"`arrays[{slot.path!r}]` must have shape {slot.shape}, "
                    f"got {tuple(value.shape)}"
                )
        for slot in slots:
            self._set(slot, arrays[slot.path])

    # -------------------------------------------------------- initialization
    def initialize_parameters(self, mean_parameters: Any) -> None:
        """Create the covariance storage for the given means (entries set to zero).

        ``mean_parameters`` is a mapping name -> array (``None`` entries take no
        part) or a bare array (``{"mean": array}``). Storage takes the means'
        namespace, dtype and device. Call `reset_parameters` to draw
        initial values; [`GaussianParameter`][structcov.GaussianParameter] calls this for you.
        """
        layout, xp, dtype, device = describe_means(mean_parameters)
        self._setup(layout)
        self._layout = layout
        self._slot_cache = self._slots()
        for attribute in self._dict_attributes:
            setattr(self, attribute, {})
        means = normalize_mean(mean_parameters)
        for slot in self._slot_cache:
            mean = means.get(slot.name) if slot.name is not None else None
            self._set(slot, _zeros_laid_out_like(xp, slot.shape, mean, dtype, device))

    def reset_parameters(
        self,
        mean_parameter_scales: Mapping[str, float] | float = 1.0,
        generator: Any = None,
    ) -> None:
        """Draw new covariance parameters: entries N(0, std^2), std by structure.

        ``mean_parameter_scales`` is one float for every mean, or a mapping mean
        name -> float. The structure-specific std is documented on each class
        (e.g. ``scale / sqrt(rank)`` for factors). ``generator`` is the backend
        generator (see `structcov._random`); the same state gives the same
        parameters.
        """
        slots = self._slots_checked()
        scales = self._scales(mean_parameter_scales)
        reference = self._reference_array()
        xp = namespace(reference)
        dtype, device = reference.dtype, device_of(reference)
        random_slots = [slot for slot in slots if slot.random]
        draws = dict(
            zip(
                [slot.path for slot in random_slots],
                standard_normals(
                    generator,
                    [s.shape for s in random_slots],
                    xp=xp,
                    dtype=dtype,
                    device=device,
                    # dask: keep each stored array's chunks (laid out like the means).
                    chunks=[chunks_of(xp, self._get(s)) for s in random_slots],
                ),
                strict=True,
            )
        )
        for slot in slots:
            std = slot.multiplier * (1.0 if slot.scale_of is None else scales[slot.scale_of])
            if slot.random:
                # Back where the stored array was (a sharded JAX array: its sharding; the
                # draw itself is whole). Elsewhere a no-op: the draw is made on that device.
                placed = to_device(draws[slot.path], device_of(self._get(slot)))
                self._set(slot, placed * std)
            else:
                self._set(slot, xp.full_like(self._get(slot), std))  # keeps the layout

    def _scales(self, mean_parameter_scales: Mapping[str, float] | float) -> dict[str, float]:
        names = self.layout.names
        if isinstance(mean_parameter_scales, Mapping):
            unknown = sorted(set(mean_parameter_scales) - set(names))
            missing = [name for name in names if name not in mean_parameter_scales]
            if unknown or missing:
                raise ValueError(
                    f"`mean_parameter_scales` must have the keys {list(names)}, got "
                    f"{list(mean_parameter_scales)}"
                )
            scales = {name: mean_parameter_scales[name] for name in names}
        else:
            scales = dict.fromkeys(names, mean_parameter_scales)
        for name, value in scales.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"`mean_parameter_scales` must be finite non-negative floats, got {value!r} "
                    f"for {name!r}"
                )
        return {name: float(value) for name, value in scales.items()}

    # ------------------------------------------------------------ products
    def factor_matmul(
        self, input: Array, /, additive_constant: Array | Mapping[str, Array] | None = None
    ) -> dict[str, Array]:
        """Multiply the sampling factor S with ``input`` and add ``additive_constant``.

        Parameters
        ----------
        input
            Shape ``(*batch, K)`` with K = `num_factor_columns`, same
            namespace and dtype as the covariance parameters.
        additive_constant
            ``None``, a flat array of shape ``(P,)`` in the flat parameter order,
            or a mapping name -> array shaped like that mean (e.g. the means).

        Returns
        -------
        dict
            name -> array of shape ``(*batch, *mean.shape)``: ``m + S z`` split per
            name. With ``input = eye(K)`` the result holds the columns of S.
        """
        layout = self.layout
        reference = self._reference_array()
        xp = namespace(input, reference, argument="`input` and the covariance parameters")
        num_columns = self.num_factor_columns
        if input.ndim < 1 or input.shape[-1] != num_columns:
            raise ValueError(
                f"`input` must have last dimension {num_columns} (the number of factor "
                f"columns K), got shape {tuple(input.shape)}"
            )
        if input.dtype != reference.dtype:
            raise TypeError(
                f"`input` must have the covariance parameters' dtype {reference.dtype}, got "
                f"{input.dtype}"
            )
        self._check_device(input, reference, "`input`")
        constants = self._split_constant(xp, additive_constant, input)
        batch = tuple(input.shape[:-1])
        z = input if input.ndim == 2 else xp.reshape(input, (math.prod(batch), num_columns))
        out = {}
        for name, shape, block, constant in zip(
            layout.names, layout.shapes, self._blocks(xp, z), constants, strict=True
        ):
            if constant is not None:
                block = add_into(block, constant)  # the block is new (see `_blocks`)
            out[name] = xp.reshape(block, (*batch, *shape))
        return out

    def _split_constant(
        self, xp: Any, constant: Array | Mapping[str, Array] | None, reference: Array
    ) -> list[Array | None]:
        dtype = reference.dtype
        layout = self.layout
        if constant is None:
            return [None] * len(layout.names)
        if isinstance(constant, Mapping):
            present = {k: v for k, v in constant.items() if v is not None}
            if set(present) != set(layout.names):
                raise ValueError(
                    f"`additive_constant` must have the keys {list(layout.names)}, got "
                    f"{list(present)}"
                )
            parts = []
            for name, shape in zip(layout.names, layout.shapes, strict=True):
                value = present[name]
                if tuple(value.shape) != shape:
                    raise ValueError(
                        f"`additive_constant[{name!r}]` must have shape {shape}, got "
                        f"{tuple(value.shape)}"
                    )
                namespace(value, reference, argument=f"`additive_constant[{name!r}]` and `input`")
                self._check_dtype(value, dtype, f"`additive_constant[{name!r}]`")
                self._check_device(value, reference, f"`additive_constant[{name!r}]`")
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
        namespace(constant, reference, argument="`additive_constant` and `input`")
        self._check_dtype(constant, dtype, "`additive_constant`")
        self._check_device(constant, reference, "`additive_constant`")
        return [
            constant[offset : offset + size]
            for offset, size in zip(layout.offsets, layout.sizes, strict=True)
        ]

    @staticmethod
    def _check_device(value: Array, reference: Array, argument: str) -> None:
        # A traced JAX array has no device (None): only compare two known devices.
        device, expected = device_of(value), device_of(reference)
        if device is not None and expected is not None and not same_device(device, expected):
            raise ValueError(f"{argument} must be on the device {expected}, got {device}")

    @staticmethod
    def _check_dtype(value: Array, dtype: Any, argument: str) -> None:
        if value.dtype != dtype:
            raise TypeError(
                f"{argument} must have the covariance parameters' dtype {dtype}, got {value.dtype}"
            )

    # ------------------------------------------------- flat vectors and algebra
    def flatten(self, values: Mapping[str, Array]) -> Array:
        """Concatenate ``values`` (name -> ``(*batch, *shape)``) into ``(*batch, P)``.

        The flat parameter order: names in insertion order, each row-major. Costs
        one copy of size ``batch * P``.
        """
        layout = self.layout
        present = {k: v for k, v in values.items() if v is not None}
        if set(present) != set(layout.names):
            raise ValueError(
                f"`values` must have the keys {list(layout.names)}, got {list(present)}"
            )
        first = present[layout.names[0]]
        batch = tuple(first.shape[: first.ndim - len(layout.shapes[0])])
        parts = []
        for name, shape in zip(layout.names, layout.shapes, strict=True):
            value = present[name]
            if tuple(value.shape) != (*batch, *shape):
                raise ValueError(
                    f"`values[{name!r}]` must have shape {(*batch, *shape)} (batch {batch}, then "
                    f"the mean's shape), got {tuple(value.shape)}"
                )
            parts.append(value)
        xp = namespace(*parts, argument="`values`")
        return xp.concat([xp.reshape(v, (*batch, -1)) for v in parts], axis=-1)

    def unflatten(self, x: Array) -> dict[str, Array]:
        """Split ``x`` of shape ``(*batch, P)`` into name -> ``(*batch, *shape)`` (views)."""
        layout = self.layout
        xp = namespace(x, argument="`x`")
        self._check_flat(x, "x")
        batch = tuple(x.shape[:-1])
        return {
            name: xp.reshape(x[..., offset : offset + size], (*batch, *shape))
            for name, shape, offset, size in zip(
                layout.names, layout.shapes, layout.offsets, layout.sizes, strict=True
            )
        }

    def _check_flat(self, x: Array, argument: str) -> None:
        num_params = self.layout.num_params
        if x.ndim < 1 or x.shape[-1] != num_params:
            raise ValueError(
                f"`{argument}` must have last dimension {num_params} (P, the number of "
                f"parameters), got shape {tuple(x.shape)}"
            )

    def _flat_blocks(self, x: Array, argument: str) -> tuple[Any, tuple[int, ...], list[Array]]:
        """Validate ``x`` of shape (*batch, P); return ``(xp, batch, blocks)``, blocks (B, n)."""
        layout = self.layout
        reference = self._reference_array()
        xp = namespace(x, reference, argument=f"`{argument}` and the covariance parameters")
        self._check_flat(x, argument)
        self._check_dtype(x, reference.dtype, f"`{argument}`")
        self._check_device(x, reference, f"`{argument}`")
        batch = tuple(x.shape[:-1])
        x2 = x if x.ndim == 2 else xp.reshape(x, (math.prod(batch), layout.num_params))
        blocks = [
            x2[:, offset : offset + size]
            for offset, size in zip(layout.offsets, layout.sizes, strict=True)
        ]
        return xp, batch, blocks

    @staticmethod
    def _assemble(xp: Any, blocks: list[Array], batch: tuple[int, ...]) -> Array:
        flat = blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=1)
        return xp.reshape(flat, (*batch, flat.shape[1]))

    def matmul(self, x: Array) -> Array:
        """Sigma x for ``x`` of shape ``(*batch, P)``; returns ``(*batch, P)``.

        Computed as S (S^T x): O(B P K) for factor structures, O(B P) for the
        diagonal, two small GEMMs per side for Kronecker. Never forms Sigma.
        """
        xp, batch, blocks = self._flat_blocks(x, "x")
        return self._assemble(xp, self._blocks(xp, self._rblocks(xp, blocks)), batch)

    def diagonal(self) -> Array:
        """The marginal variances diag(Sigma), shape ``(P,)``, in the flat order. O(P K)."""
        xp = namespace(self._reference_array())
        blocks = self._diagonal_blocks(xp)
        return blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=0)

    def variances(self) -> dict[str, Array]:
        """The marginal variances per name, shaped like the means (``unflatten(diagonal())``)."""
        return self.unflatten(self.diagonal())

    def trace(self) -> Array:
        """tr Sigma = sum of the marginal variances, a 0-D array. O(P K)."""
        xp = namespace(self._reference_array())
        return total(xp.sum(block) for block in self._diagonal_blocks(xp))

    def logdet(self) -> Array:
        """log det Sigma, a 0-D array; ``-inf`` for a singular structure (see `is_singular`).

        The identity used is on each class (2 log|det S|, the matrix determinant
        lemma, the Kronecker mixed-product rule). Never forms S S^T.
        """
        reference = self._reference_array()
        xp = namespace(reference)
        if self.is_singular:
            return xp.full((), -math.inf, dtype=reference.dtype, device=device_of(reference))
        return self._logdet(xp)

    def solve(self, x: Array) -> Array:
        """Sigma^-1 x for ``x`` of shape ``(*batch, P)``; returns ``(*batch, P)``.

        Raises ``ValueError`` for a singular structure (no inverse exists). The
        identity used is on each class (square factor solves, Woodbury,
        Kronecker factor solves). Never forms or factorises S S^T.
        """
        if self.is_singular:
            raise ValueError(
                f"{self!r} is singular (rank {self.num_factor_columns} < P = {self.num_params}), "
                f"so it has no inverse: {self._singular_advice}"
            )
        xp, batch, blocks = self._flat_blocks(x, "x")
        return self._assemble(xp, self._solve_blocks(xp, blocks), batch)

    def _kl_to_diagonal(self, xp: Any, variances: Array) -> Array:
        """0.5 (tr(V^-1 Sigma) - P + log det V - log det Sigma) for V = diag(variances).

        The covariance part of KL(N(., Sigma) || N(., V)); structures override it
        with a sum of well-scaled terms where they can (float32).
        """
        ratio = xp.sum(self.diagonal() / variances)
        return 0.5 * (ratio - self.num_params + xp.sum(xp.log(variances)) - self.logdet())

    def to_dense(self) -> Array:
        """The dense covariance Sigma = S S^T, shape (P, P), in the flat parameter order.

        Cost: O(P^2 K) time, O(P^2 + P K) memory. The only operation that builds
        a P x P matrix; meant for tests and small problems.
        """
        reference = self._reference_array()
        xp = namespace(reference)
        num_columns = self.num_factor_columns
        eye = xp.eye(num_columns, dtype=reference.dtype, device=device_of(reference))
        columns = self.factor_matmul(eye)  # name -> (K, *shape): row k is column k of S
        factor_t = xp.concat(
            [xp.reshape(columns[name], (num_columns, -1)) for name in self.layout.names], axis=1
        )
        return xp.matmul(xp.matrix_transpose(factor_t), factor_t)

    def __repr__(self) -> str:
        if self._layout is None:
            return f"{type(self).__name__}(uninitialized)"
        return (
            f"{type(self).__name__}(P={self._layout.num_params}, "
            f"K={self.num_factor_columns}, names={list(self._layout.names)})"
        )
