"""The seed API's covariance objects: a frozen structure plus storage, over pure functions.

`CovarianceMethods` is the seed API's set of covariance operations (``factor_matmul``,
``matmul``, ``logdet``, ...) written once over ``self.structure`` (a frozen
`Structure`) and the storage its holder provides; every method is one call of
`structcov.functional`. Two holders use it: `StructuredCovariance` here (the core
objects users build, ``DiagonalCovariance()`` and friends, holding a dict of arrays)
and ``structcov.torch.Covariance`` (an ``nn.Module`` holding ``nn.Parameter`` s).

A core covariance is built in two steps, as in the seed API: the constructor takes
the configuration (ranks), and `StructuredCovariance.initialize_parameters` (called by
``GaussianParameter(mean, cov)``) builds the frozen structure for the means' layout
and zero storage, atomically. A covariance belongs to one parameter: attaching it to
a second ``GaussianParameter`` raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, ClassVar, TypeVar

from .. import functional as F
from .._array_api import Array
from .._layout import Layout, describe_means
from ._structure import Storage, Structure

__all__ = ["COVARIANCES", "CovarianceMethods", "StructuredCovariance", "register_covariance"]


class CovarianceMethods:
    """The covariance operations of the seed API over ``structure`` and ``_ops_storage()``.

    Holders provide the property ``structure`` and the method ``_ops_storage`` (the
    current arrays by path, not validated per call); everything here is a thin
    call of the pure function of the same name in `structcov.functional`.
    """

    @property
    def structure(self) -> Structure:
        """The frozen structure (layout, ranks) of this covariance."""
        raise NotImplementedError

    def _ops_storage(self) -> Storage:
        raise NotImplementedError

    # ------------------------------------------------------------ static facts
    @property
    def layout(self) -> Layout:
        """Names, shapes and offsets of the flat parameter vector."""
        return self.structure.layout

    @property
    def num_params(self) -> int:
        """P, the length of the flat parameter vector."""
        return self.structure.layout.num_params

    @property
    def num_factor_columns(self) -> int:
        """K, the number of columns of the sampling factor S (standard normals per sample)."""
        return self.structure.num_factor_columns

    @property
    def is_singular(self) -> bool:
        """Whether Sigma is singular by construction (fewer factor columns than it needs).

        A static fact of the structure and its ranks; a full-rank structure whose
        stored values happen to be degenerate is not detected here.
        """
        return self.structure.is_singular

    @property
    def lr_scaling(self) -> dict[str, float]:
        """Learning-rate scaling per storage path (``"factor.weight"``, ``"output_factor"``)."""
        return self.structure.lr_scaling

    # ------------------------------------------------------------ operations
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
        return F.factor_matmul(self.structure, self._ops_storage(), input, additive_constant)

    def factor_rmatmul(self, x: Array) -> Array:
        """S^T x for ``x`` of shape ``(*batch, P)``; returns ``(*batch, K)``."""
        return F.factor_rmatmul(self.structure, self._ops_storage(), x)

    def matmul(self, x: Array) -> Array:
        """Sigma x for ``x`` of shape ``(*batch, P)``; returns ``(*batch, P)``.

        Computed from the factors (S (S^T x), or the structure's cheaper form: see
        each class); never forms Sigma.
        """
        return F.matmul(self.structure, self._ops_storage(), x)

    def diagonal(self) -> Array:
        """The marginal variances diag(Sigma), shape ``(P,)``, in the flat order. O(P K)."""
        return F.diagonal(self.structure, self._ops_storage())

    def variances(self) -> dict[str, Array]:
        """The marginal variances per name, shaped like the means (``unflatten(diagonal())``)."""
        return self.unflatten(self.diagonal())

    def trace(self) -> Array:
        """tr Sigma = sum of the marginal variances, a 0-D array."""
        return F.trace(self.structure, self._ops_storage())

    def logdet(self) -> Array:
        """log det Sigma, a 0-D array; ``-inf`` for a singular structure (see `is_singular`).

        The identity used is on each class (2 log|det S|, the matrix determinant
        lemma, the Kronecker mixed-product rule). Never forms S S^T.
        """
        return F.logdet(self.structure, self._ops_storage())

    def solve(self, x: Array) -> Array:
        """Sigma^-1 x for ``x`` of shape ``(*batch, P)``; returns ``(*batch, P)``.

        Raises ``ValueError`` for a singular structure (no inverse exists). The
        identity used is on each class (square factor solves, Woodbury,
        Kronecker factor inverses). Never forms the P x P Sigma, never factorises
        S S^T (Kronecker forms its small factor Grams only to multiply with them).
        """
        return F.solve(self.structure, self._ops_storage(), x)

    def to_dense(self) -> Array:
        """The dense covariance Sigma = S S^T, shape (P, P), in the flat parameter order.

        Cost: O(P^2 K) time, O(P^2 + P K) memory. The only operation that builds
        a P x P matrix; meant for tests and small problems.
        """
        return F.to_dense(self.structure, self._ops_storage())

    def flatten(self, values: Mapping[str, Array]) -> Array:
        """Concatenate ``values`` (name -> ``(*batch, *shape)``) into ``(*batch, P)``.

        The flat parameter order: names in insertion order, each row-major. Costs
        one copy of size ``batch * P``.
        """
        return F.flatten(self.structure, values)

    def unflatten(self, x: Array) -> dict[str, Array]:
        """Split ``x`` of shape ``(*batch, P)`` into name -> ``(*batch, *shape)`` (views)."""
        return F.unflatten(self.structure, x)


class _SlotView(MutableMapping[str, Array]):
    """``cov.factor`` and friends: the arrays of one storage attribute by mean name.

    Reads the covariance's current storage; an assignment replaces one array after
    validating it with the rest (`structcov.functional.check_storage`), so a wrong
    shape, dtype or library is refused and nothing changes.
    """

    def __init__(self, owner: StructuredCovariance, attribute: str) -> None:
        self._owner = owner
        self._attribute = attribute

    def _path(self, name: str) -> str:
        return f"{self._attribute}.{name}"

    def _names(self) -> tuple[str, ...]:
        structure = self._owner._structure
        if structure is None:
            return ()
        return tuple(s.name for s in structure.slots if s.attribute == self._attribute and s.name)

    def __getitem__(self, name: str) -> Array:
        if name not in self._names():
            raise KeyError(name)
        return self._owner._storage[self._path(name)]

    def __setitem__(self, name: str, value: Array) -> None:
        if name not in self._names():
            raise KeyError(f"{self._attribute!r} has the names {list(self._names())}, got {name!r}")
        self._owner._replace({self._path(name): value})

    def __delitem__(self, name: str) -> None:
        raise TypeError(f"`{self._attribute}` entries cannot be deleted")

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return repr(dict(self.items()))


class StructuredCovariance(CovarianceMethods):
    """Common base of the core covariance objects: configuration, structure and storage.

    Not public; the public base is [`FactorizedCovariance`][structcov.FactorizedCovariance].
    Subclasses set ``_structure_type`` and keep their constructor arguments in
    `_config` (the arguments of ``_structure_type.build``).
    """

    #: the frozen structure this covariance builds
    _structure_type: ClassVar[type[Structure]]
    #: the constructor's arguments (each kept as ``_requested_<argument>``)
    _arguments: ClassVar[tuple[str, ...]] = ()
    #: settings changed after construction, passed to ``build`` too (``sample_scale``)
    _settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        object.__setattr__(self, "_structure", None)
        object.__setattr__(self, "_storage", {})
        object.__setattr__(self, "_attached", False)

    # ------------------------------------------------------------ configuration
    def _config(self) -> dict[str, Any]:
        """The arguments of ``build`` as given (requested ranks, not clamped; settings)."""
        return {key: getattr(self, f"_requested_{key}") for key in self._arguments + self._settings}

    @property
    def structure(self) -> Structure:
        """The frozen structure (layout and clamped ranks); set by `initialize_parameters`."""
        structure: Structure | None = self._structure
        if structure is None:
            raise RuntimeError(
                f"{type(self).__name__} has not been initialized: call "
                "initialize_parameters(mean) first, or pass it to GaussianParameter(mean, cov)"
            )
        return structure

    def _ops_storage(self) -> Storage:
        self.structure  # noqa: B018 -- raises the "not initialized" error
        storage: Storage = self._storage
        return storage

    def _set_structure(self, structure: Structure) -> None:
        """Replace the structure by one with the same slots (e.g. a new ``sample_scale``)."""
        object.__setattr__(self, "_structure", structure)

    @classmethod
    def _from_parts(
        cls, config: Mapping[str, Any], structure: Structure | None, storage: Mapping[str, Any]
    ) -> Any:
        """A covariance from its parts, not validated (adapters: JAX passes tracers and
        placeholders, `lr_scaling_tree` floats)."""
        rebuilt = cls.__new__(cls)
        StructuredCovariance.__init__(rebuilt)
        for key, value in config.items():
            object.__setattr__(rebuilt, f"_requested_{key}", value)
        object.__setattr__(rebuilt, "_structure", structure)
        object.__setattr__(rebuilt, "_storage", dict(storage))
        object.__setattr__(rebuilt, "_attached", structure is not None)
        return rebuilt

    # ------------------------------------------------------------ storage
    def storage(self) -> dict[str, Array]:
        """The stored arrays by path (``"factor.weight"``, ``"output_factor"``), in slot order.

        The paths are those of `lr_scaling`. The arrays are the stored ones,
        not copies; the dict is new (changing it changes nothing here).
        """
        return dict(self._ops_storage())

    def load_storage(self, arrays: Mapping[str, Array]) -> None:
        """Replace the stored arrays by ``arrays`` (path -> array, every path once).

        Validated as a whole (paths, shapes, one namespace, dtype and device) before
        anything changes. The namespace may differ from the current one (e.g. to
        move a covariance to another backend).
        """
        object.__setattr__(self, "_storage", F.check_storage(self.structure, arrays))

    def _replace(self, arrays: Mapping[str, Array]) -> None:
        """Replace some stored arrays, validating the result as a whole."""
        new = dict(self._ops_storage())
        new.update(arrays)
        self.load_storage(new)

    def __getattr__(self, name: str) -> Any:
        # Storage attributes (``factor``, ``scale``, ``input_factor``, ``output_factor``).
        structure_type = getattr(type(self), "_structure_type", None)
        if structure_type is not None and not name.startswith("_"):
            if name in structure_type.dict_attributes:
                return _SlotView(self, name)
            if name in structure_type.array_attributes:
                return self._storage.get(name) if self._structure is not None else None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        structure_type = getattr(type(self), "_structure_type", None)
        if structure_type is not None and name in structure_type.array_attributes:
            self._replace({name: value})
        elif structure_type is not None and name in structure_type.dict_attributes:
            raise AttributeError(
                f"`{name}` cannot be replaced as a whole: set its entries "
                f"(cov.{name}[name] = array) or call load_storage"
            )
        elif name.startswith("_") or hasattr(type(self), name):
            object.__setattr__(self, name, value)  # a property's setter, or private state
        else:
            # A misspelt or foreign setting (``sample_scale`` on a diagonal) would be ignored.
            storage = () if structure_type is None else structure_type.dict_attributes
            storage += () if structure_type is None else structure_type.array_attributes
            raise AttributeError(
                f"{type(self).__name__} has no setting {name!r}; its settable attributes are "
                f"{list(type(self)._settings)} and its storage {list(storage)}"
            )

    # ------------------------------------------------------------ initialization
    def initialize_parameters(self, mean_parameters: Any) -> None:
        """Build the structure for the given means and zero storage (atomically).

        ``mean_parameters`` is a mapping name -> array (``None`` entries take no
        part) or a bare array (``{"mean": array}``). Storage takes the means'
        namespace, dtype, device and layout. Call `reset_parameters` to draw
        initial values; [`GaussianParameter`][structcov.GaussianParameter] calls this for you.
        On any error nothing changes. A covariance that belongs to a parameter can
        only be re-initialized for means of the same layout.
        """
        layout = describe_means(mean_parameters)[0]
        structure = self._structure_type.build(layout, **self._config())
        if self._attached and self._structure is not None and structure != self._structure:
            raise ValueError(
                f"this {type(self).__name__} belongs to a GaussianParameter with the layout "
                f"{_describe(self._structure.layout)}; it cannot be re-initialized for "
                f"{_describe(layout)} (create a new covariance)"
            )
        storage = F.zeros_storage(structure, mean_parameters)
        object.__setattr__(self, "_structure", structure)
        object.__setattr__(self, "_storage", storage)

    def _attach(self, mean_parameters: Any) -> None:
        """Initialize for ``mean_parameters`` and record that a parameter owns this covariance."""
        if self._attached:
            raise ValueError(
                f"this {type(self).__name__} already belongs to a GaussianParameter (over "
                f"{_describe(self.structure.layout)}): a covariance belongs to one parameter; "
                f"create a new one for each parameter, e.g. {type(self).__name__}(...) again"
            )
        self.initialize_parameters(mean_parameters)
        object.__setattr__(self, "_attached", True)

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
        drawn = F.draw_storage(
            self.structure, self._ops_storage(), mean_parameter_scales, generator
        )
        object.__setattr__(self, "_storage", drawn)

    def __repr__(self) -> str:
        if self._structure is None:
            return f"{type(self).__name__}(uninitialized)"
        structure = self._structure
        return (
            f"{type(self).__name__}(P={structure.num_params}, "
            f"K={structure.num_factor_columns}, names={list(structure.layout.names)})"
        )


def _describe(layout: Layout) -> str:
    return str(dict(zip(layout.names, layout.shapes, strict=True)))


#: class name -> public covariance class, one entry per class a structure module
#: registers: what checkpoints and `from_dense` know how to rebuild.
COVARIANCES: dict[str, type[StructuredCovariance]] = {}

_C = TypeVar("_C", bound=type[StructuredCovariance])


def register_covariance(cls: _C) -> _C:
    """Register a public covariance class by name (a class decorator; returns ``cls``)."""
    COVARIANCES[cls.__name__] = cls
    return cls
