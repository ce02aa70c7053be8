"""The layout of the flat parameter vector: names, shapes, sizes and offsets of the means.

DESIGN.md §1: the flat vector is the means in insertion order, each flattened
row-major; ``None`` entries take no part. Everything here is static (Python ints
and tuples), so a `Layout` is hashable and can be part of a frozen structure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from math import prod
from typing import Any

from ._array_api import Array, device_of, is_array_api_obj, namespace, same_device

__all__ = ["Layout", "describe_means", "normalize_mean"]


@dataclass(frozen=True)
class Layout:
    """Static description of the flat parameter vector (DESIGN.md §1).

    ``names`` are the participating mean names in insertion order, ``shapes``
    their shapes. The flat vector is the concatenation of each mean flattened
    in row-major order; ``offsets[i]:offsets[i] + sizes[i]`` is name ``i``'s slot.
    ``sizes``, ``offsets`` and ``num_params`` are computed once, at construction.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...] = field(init=False, repr=False, compare=False)
    offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)
    num_params: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sizes = tuple(prod(shape) for shape in self.shapes)
        offsets, running = [], 0
        for size in sizes:
            offsets.append(running)
            running += size
        # Derived once: these are read on every call of every operation.
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "offsets", tuple(offsets))
        object.__setattr__(self, "num_params", running)

    def shape_of(self, name: str) -> tuple[int, ...]:
        """The shape of the mean ``name``."""
        return self.shapes[self.names.index(name)]


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
        if not is_array_api_obj(value):
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
