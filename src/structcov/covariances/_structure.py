"""The contract of a covariance structure: a frozen value whose maths runs over explicit storage.

A structure (``Diagonal``, ``Factorized``, ``LowRankPlusDiagonal``, ``Kronecker``) is
an immutable, hashable value built complete against the means' `Layout`: ranks are
clamped once, in `Structure.build`, and nothing about it changes afterwards. It
holds no arrays. Its declared `Slot` s are the one description of its storage, a
mapping ``path -> array`` (``"factor.weight"``, ``"output_factor"``), and every
operation takes that mapping as an argument: ``blocks(xp, storage, z)`` is
``S z`` per name, and so on. The public pure functions over (structure, storage,
mean, inputs) are in `structcov.functional`; the seed API's covariance objects and
the adapters (torch modules, JAX pytrees) hold a structure and storage and call them.

Every structure is Sigma = S S^T with S of shape (P, K), K = `num_factor_columns`.
The hierarchy is abstract-or-final: `Structure` declares the contract as abstract
methods, each concrete structure is final and implements all of it.
"""

from __future__ import annotations

import abc
import functools
import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .._array_api import Array, backend_function, device_of
from .._layout import Layout

__all__ = [
    "SCALE_TRANSFORMS",
    "Slot",
    "Storage",
    "Structure",
    "add_into",
    "assemble",
    "check_rank",
    "check_scale_transform",
    "eye",
    "inverse_positive",
    "inverse_positive_array",
    "logdet_of",
    "positive",
    "require_parameters",
    "row_norms",
    "scale_into",
    "softplus",
    "split_flat",
    "total",
]

#: A structure's arrays by storage path (``"factor.weight"``, ``"output_factor"``).
Storage = Mapping[str, Array]


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


def scale_into(array: Array, factor: Array) -> Array:
    """``array * factor``, written into ``array`` where the backend allows it.

    The multiplicative twin of `add_into`: ``array`` must be new and held by nobody
    else. Immutable arrays (JAX) rebind; a backend that refuses (torch ``vmap`` with
    ``factor`` batched and ``array`` not) gets the out-of-place product.
    """
    try:
        array *= factor
    except (RuntimeError, TypeError, ValueError):
        array = array * factor
    return array


def row_norms(xp: Any, factor: Array) -> Array:
    """Squared row norms of a 2-D ``factor``, shape (rows,).

    Not ``xp.vecdot``: array-api-compat's torch version moves axes, which has no
    ``vmap`` batching rule.
    """
    return xp.sum(factor * factor, axis=-1)


def check_rank(value: Any, argument: str, *, optional: bool) -> int | None:
    """Validate a rank argument: a positive integer (or ``None`` when ``optional``).

    Anything ``operator.index`` accepts (``numpy.int64`` too) counts as an integer.
    """
    if value is None and optional:
        return None
    expected = "a positive int or None" if optional else "a positive int"
    if isinstance(value, bool):
        raise TypeError(f"`{argument}` must be {expected}, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"`{argument}` must be {expected}, got {value!r}") from None
    if number < 1:
        raise ValueError(f"`{argument}` must be >= 1, got {number}")
    return number


#: How a stored diagonal scale ``rho`` maps to a standard deviation ``s`` (Diagonal and
#: LowRankPlusDiagonal): ``"softplus"`` s = log(1 + e^rho) (the default: s > 0 whatever
#: the optimiser does), ``"exp"`` s = e^rho, ``"identity"`` s = |rho| (the seed's raw scale).
SCALE_TRANSFORMS = ("softplus", "exp", "identity")


def check_scale_transform(value: Any) -> str:
    """Validate a ``scale_transform`` argument (one of `SCALE_TRANSFORMS`)."""
    if not isinstance(value, str) or value not in SCALE_TRANSFORMS:
        raise ValueError(
            f"`scale_transform` must be one of {list(SCALE_TRANSFORMS)}, got {value!r}"
        )
    return value


def positive(xp: Any, raw: Array, transform: str) -> Array:
    """The standard deviations stored as ``raw`` under ``transform`` (elementwise).

    softplus is ``logaddexp(rho, 0)`` (`softplus`): exact for large rho (no overflow
    of e^rho) and equal to e^rho to rounding for very negative rho (no cancellation
    in 1 + e^rho).
    """
    if transform == "softplus":
        return softplus(xp, raw)
    if transform == "exp":
        return xp.exp(raw)
    return raw


def _standard_softplus(xp: Any, raw: Array) -> Array:
    return xp.logaddexp(raw, xp.zeros_like(raw))


def _torch_softplus(xp: Any, raw: Any) -> Array:
    import torch

    # torch's fused kernel returns rho itself above `threshold`; rho + e^-rho rounds to
    # rho from about 15 in float32 and 34 in float64, so 20 and 40 are exact with margin
    threshold = 40.0 if raw.dtype == torch.float64 else 20.0
    return torch.nn.functional.softplus(raw, threshold=threshold)


#: backend name -> a fused softplus with `softplus`'s values. The standard has no
#: softplus; on CPU torch ``logaddexp``'s backward is four passes against one.
_SOFTPLUS_HOOKS: dict[str, Callable[[Any, Array], Array]] = {"torch": _torch_softplus}
#: namespace module name -> its softplus, looked up once per namespace (by name, not
#: by the module: torch.compile cannot hash a module)
_SOFTPLUS: dict[str, Callable[[Any, Array], Array]] = {}


def softplus(xp: Any, raw: Array) -> Array:
    """log(1 + e^rho) elementwise: ``logaddexp(rho, 0)``, or the backend's fused kernel
    with the same values (torch: about 1.4x faster forward + backward on CPU).

    Exact to rounding over the whole range: rho itself for large rho, e^rho for very
    negative rho; NaN and +-inf propagate (softplus(-inf) = 0).
    """
    function = backend_function(xp, _SOFTPLUS_HOOKS, _SOFTPLUS, _standard_softplus)
    return function(xp, raw)


def inverse_positive(value: float, transform: str) -> float:
    """The stored value whose standard deviation is ``value`` >= 0 (``-inf`` for 0 under
    softplus and exp). softplus^-1(s) = s + log(-expm1(-s)), without the 1 - e^-s
    cancellation for small s."""
    if transform == "identity":
        return value
    if value == 0:
        return -math.inf
    if transform == "exp":
        return math.log(value)
    return value + math.log(-math.expm1(-value))


def inverse_positive_array(xp: Any, value: Array, transform: str) -> Array:
    """`inverse_positive` elementwise on an array of standard deviations >= 0."""
    if transform == "identity":
        return value
    zero = value == 0
    safe = xp.where(zero, xp.ones_like(value), value)  # no log(0) warning; -inf put back below
    raw = xp.log(safe) if transform == "exp" else safe + xp.log(-xp.expm1(-safe))
    return xp.where(zero, xp.full_like(value, -math.inf), raw)


@dataclass(frozen=True)
class Slot:
    """One stored array of a structure.

    ``attribute`` is the storage attribute (``factor``, ``scale``, ...); ``name`` the
    mean name it belongs to, or ``None`` for a single array attribute (Kronecker's
    ``output_factor``). Its initial entries are N(0, std^2) with
    ``std = mean_parameter_scales[scale_of] * multiplier`` (``scale_of=None``: no scale);
    with ``random=False`` every entry is set to ``std`` instead, stored through
    ``transform`` (one of `SCALE_TRANSFORMS`: the entries are ``inverse_positive(std)``).
    """

    attribute: str
    name: str | None
    shape: tuple[int, ...]
    lr_scaling: float
    multiplier: float
    scale_of: str | None
    random: bool = True
    transform: str = "identity"
    path: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        path = self.attribute if self.name is None else f"{self.attribute}.{self.name}"
        object.__setattr__(self, "path", path)


@dataclass(frozen=True)
class Structure(abc.ABC):
    """The contract every covariance structure implements (abstract; structures are final).

    A frozen value: ``layout`` and the structure's own fields (ranks, ...) are fixed
    at `build`; ``slots`` (derived) lists the storage. Hashable, so it can be JAX aux
    data, a cache key or a checkpoint header. Operations take ``xp`` (the namespace,
    resolved once by the caller) and ``storage`` (path -> array); blocks are per mean
    name in layout order, each of shape ``(B, n_name)``.
    """

    layout: Layout
    slots: tuple[Slot, ...] = field(init=False, repr=False, compare=False)

    #: storage attributes holding one array per mean name
    dict_attributes: ClassVar[tuple[str, ...]] = ()
    #: storage attributes holding a single array
    array_attributes: ClassVar[tuple[str, ...]] = ()
    #: Whether the noise z has one column per parameter after its first few (S ends in
    #: a diagonal block): sampling then draws it split like the means (JAX sharding).
    noise_per_parameter: ClassVar[bool] = False
    #: What to use instead, said when a singular structure is asked to solve.
    singular_advice: ClassVar[str] = "use LowRankPlusDiagonalCovariance or a full-rank structure"

    def __post_init__(self) -> None:
        object.__setattr__(self, "slots", self._make_slots())

    # ------------------------------------------------------------ construction
    #: ``build(layout, /, **config)``: the structure for ``layout`` with ``config`` (the
    #: structure's own arguments, e.g. ``rank``); validates the layout, clamps the ranks
    #: (once). A classmethod of each final structure, with its own keyword arguments.
    build: ClassVar[Callable[..., Structure]]

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """The structure's own fields besides the layout (JSON-able): ``build``'s arguments."""

    @abc.abstractmethod
    def _make_slots(self) -> tuple[Slot, ...]:
        """The stored arrays, in a fixed order (called once, at construction)."""

    def initial_storage(self, xp: Any, zeros: dict[str, Array]) -> dict[str, Array]:
        """The storage a freshly initialised parameter holds, from all-zero ``zeros``
        (laid out like the means). Zeros unless a structure needs otherwise."""
        return zeros

    # ------------------------------------------------------------ static facts
    @property
    @abc.abstractmethod
    def num_factor_columns(self) -> int:
        """K, the number of columns of S (standard normals per sample)."""

    @property
    @abc.abstractmethod
    def is_singular(self) -> bool:
        """Whether Sigma is singular by construction (a static fact, values are not read)."""

    # ------------------------------------------------------------ maths
    @abc.abstractmethod
    def blocks(self, xp: Any, storage: Storage, z: Array) -> list[Array]:
        """``S_name z`` per name: ``z`` is (B, K), each block (B, n), a new array.

        New arrays, never views of ``z`` or of the storage: callers add into them.
        """

    @abc.abstractmethod
    def rblocks(self, xp: Any, storage: Storage, x: list[Array]) -> Array:
        """``S^T x`` of shape (B, K) from the per-name blocks ``x``."""

    def prepare_matmul(self, xp: Any, storage: Storage) -> Any:
        """What `matmul_blocks` can reuse across calls on this exact storage (``None``:
        nothing; Kronecker: its two factor Grams)."""
        return None

    @abc.abstractmethod
    def matmul_blocks(
        self, xp: Any, storage: Storage, x: list[Array], state: Any = None
    ) -> list[Array]:
        """``Sigma x`` per name, never forming Sigma; ``state`` from `prepare_matmul` or
        ``None`` (then formed per call where the structure needs it)."""

    @abc.abstractmethod
    def diagonal_blocks(self, xp: Any, storage: Storage) -> list[Array]:
        """diag(Sigma) per name, each of shape (n,)."""

    @abc.abstractmethod
    def trace(self, xp: Any, storage: Storage) -> Array:
        """tr Sigma, a 0-D array."""

    @abc.abstractmethod
    def prepare(self, xp: Any, storage: Storage) -> Any:
        """One-off setup shared by `logdet` and `solve_blocks` (a capacitance, a square
        factor), or ``None``. Only called on structures that are not singular."""

    @abc.abstractmethod
    def logdet(self, xp: Any, storage: Storage, state: Any) -> Array:
        """log det Sigma of a full-rank structure, a 0-D array; ``state`` from `prepare`."""

    @abc.abstractmethod
    def solve_blocks(self, xp: Any, storage: Storage, state: Any, x: list[Array]) -> list[Array]:
        """``Sigma^-1 x`` per name for a full-rank structure; ``state`` from `prepare`."""

    # ------------------------------------------------------------ derived, shared
    def sample_blocks(self, xp: Any, storage: Storage, noise: list[Array]) -> list[Array]:
        """`blocks` for a z that is handed over: ``noise`` is a one-element list holding
        z, emptied here, so that no caller keeps z alive. A structure may scale z in
        place or drop it after its first product (lower peak memory of ``sample``);
        the default is ``blocks(z)``."""
        return self.blocks(xp, storage, noise.pop())

    def quadratic(self, xp: Any, storage: Storage, state: Any, x: list[Array]) -> Array:
        """x^T Sigma^-1 x per row, shape (B,), from per-name blocks (full-rank structures).

        The default is ``sum(x * solve(x))``; structures whose solve would cancel in
        that product (low rank plus diagonal in float32) override it with a form that
        is a sum of non-negative terms.
        """
        solved = assemble(xp, self.solve_blocks(xp, storage, state, x))
        return xp.sum(assemble(xp, x) * solved, axis=-1)

    def singular_reason(self) -> str:
        """Why a singular structure is singular, for error messages."""
        return f"rank {self.num_factor_columns} < P = {self.layout.num_params}"

    @property
    def num_params(self) -> int:
        """P, the length of the flat parameter vector."""
        return self.layout.num_params

    @property
    def lr_scaling(self) -> dict[str, float]:
        """Learning-rate scaling per storage path."""
        return {slot.path: slot.lr_scaling for slot in self.slots}

    @property
    def paths(self) -> tuple[str, ...]:
        """The storage paths, in slot order."""
        return tuple(slot.path for slot in self.slots)

    def __repr__(self) -> str:
        config = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return (
            f"{type(self).__name__}(P={self.layout.num_params}, K={self.num_factor_columns}"
            f"{', ' if config else ''}{config}, names={list(self.layout.names)})"
        )


def eye(xp: Any, n: int, like: Array) -> Array:
    """The n x n identity in ``like``'s dtype and device."""
    return xp.eye(n, dtype=like.dtype, device=device_of(like))


def split_flat(structure: Structure, x: Array) -> list[Array]:
    """Per-name column blocks ``(B, n)`` of a (B, P) array (views)."""
    layout = structure.layout
    return [
        x[:, offset : offset + size]
        for offset, size in zip(layout.offsets, layout.sizes, strict=True)
    ]


def assemble(xp: Any, blocks: list[Array]) -> Array:
    """Per-name (B, n) blocks back into one (B, P) array."""
    return blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=1)


def logdet_of(xp: Any, structure: Structure, storage: Storage, state: Any = None) -> Array:
    """log det Sigma: ``-inf`` for a structure singular by construction, else through
    ``prepare`` (or the ``state`` it returned earlier) and ``logdet``."""
    if structure.is_singular:
        ref = storage[structure.slots[0].path]
        return xp.full((), -math.inf, dtype=ref.dtype, device=device_of(ref))
    if state is None:
        state = structure.prepare(xp, storage)
    return structure.logdet(xp, storage, state)


def require_parameters(layout: Layout, structure: str) -> None:
    """Raise the one clear error for a layout with no parameters (P = 0)."""
    if layout.num_params == 0:
        shapes = dict(zip(layout.names, layout.shapes, strict=True))
        raise ValueError(
            f"{structure} needs at least one parameter, got means of zero size {shapes} (P = 0); "
            "DiagonalCovariance supports empty means"
        )
