"""JAX adapter: structcov objects as pytrees, learning-rate scaling, Equinox and NNX wrappers.

Importing this module registers every covariance class of structcov (and every
subclass defined so far) and `GaussianParameter` as JAX pytrees, so
``jax.jit``, ``jax.grad``, ``jax.vmap`` and optax work on them directly::

    import jax
    import structcov as sc
    import structcov.jax as scj

    @jax.jit
    def loss(param):  # the GaussianParameter itself is the argument
        return sc.kl_divergence(param, sc.normal_prior(param))

    grads = jax.grad(loss)(param)  # a GaussianParameter of gradients

Pytree layout (``jax.tree_util.tree_flatten_with_path``):

- a `GaussianParameter`: the participating means in insertion order, keyed
  ``DictKey(name)`` (as in ``param[name]``), then its covariance under
  ``GetAttrKey("cov")``. Names whose mean is ``None`` have no leaf; the aux data
  records them, so they come back.
- a covariance: its stored arrays in slot order (that of ``cov.storage()``),
  keyed ``DictKey(path)`` with the storage paths of ``cov.lr_scaling``
  (``"factor.weight"``, ``"scale.bias"``, ``"output_factor"``). Its aux data
  is the frozen ``cov.structure`` (layout, clamped ranks, ``sample_scale``) and
  the constructor's configuration (requested ranks): hashable, and a change of
  it retraces ``jax.jit``.

So ``keystr(path)`` reads ``['weight']`` for a mean and ``.cov['factor.weight']``
for a covariance leaf. Leaves never pass through a dict that JAX would sort. The
order is fixed by the covariance's slots and the tuple of mean names.

Unflattening rebuilds the objects from those parts and validates nothing (JAX
passes tracers and placeholder objects). A covariance subclass defined after
this module was imported needs `register` (it also works as a class decorator).

The Equinox and Flax NNX wrappers (``EquinoxGaussian``, ``NNXGaussian``, and the
factories `equinox_module` and `nnx_module`) are created on first use; those
libraries are imported only then.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax

from . import _linalg
from .covariances import FactorizedCovariance
from .covariances._base import StructuredCovariance
from .gaussian import GaussianParameter, kl_divergence, normal_prior

__all__ = ["equinox_module", "lr_scaling_tree", "nnx_module", "register"]

_REGISTERED: set[type] = set()

_DictKey = jax.tree_util.DictKey
_GetAttrKey = jax.tree_util.GetAttrKey


# ------------------------------------------------------------------ covariances
def _covariance_aux(cov: StructuredCovariance) -> tuple[Any, ...]:
    structure = cov.structure  # raises the core's "not initialized" error
    return structure, tuple(sorted(cov._config().items()))


def _covariance_flatten_with_keys(
    cov: StructuredCovariance,
) -> tuple[list[tuple[Any, Any]], tuple[Any, ...]]:
    aux = _covariance_aux(cov)
    storage = cov._ops_storage()
    return [(_DictKey(path), storage[path]) for path in aux[0].paths], aux


def _covariance_flatten(cov: StructuredCovariance) -> tuple[list[Any], tuple[Any, ...]]:
    aux = _covariance_aux(cov)
    storage = cov._ops_storage()
    return [storage[path] for path in aux[0].paths], aux


def _covariance_unflatten(cls: type[StructuredCovariance]) -> Callable[..., Any]:
    def unflatten(aux: tuple[Any, ...], leaves: Iterable[Any]) -> Any:
        structure, config = aux
        storage = dict(zip(structure.paths, leaves, strict=True))
        return cls._from_parts(dict(config), structure, storage)

    return unflatten


# ------------------------------------------------------------ GaussianParameter
def _gaussian_aux(param: GaussianParameter) -> tuple[tuple[str, bool], ...]:
    present = set(param.names)
    return tuple((name, name in present) for name in param.mean)


def _gaussian_flatten_with_keys(
    param: GaussianParameter,
) -> tuple[list[tuple[Any, Any]], tuple[tuple[str, bool], ...]]:
    children = [(_DictKey(name), param.mean[name]) for name in param.names]
    children.append((_GetAttrKey("cov"), param.cov))
    return children, _gaussian_aux(param)


def _gaussian_flatten(param: GaussianParameter) -> tuple[list[Any], tuple[tuple[str, bool], ...]]:
    return [*(param.mean[name] for name in param.names), param.cov], _gaussian_aux(param)


def _gaussian_unflatten(cls: type[GaussianParameter]) -> Callable[..., Any]:
    def unflatten(aux: tuple[tuple[str, bool], ...], children: Iterable[Any]) -> Any:
        *means, cov = children
        present = iter(means)
        mean = {name: next(present) if participates else None for name, participates in aux}
        return cls._rebuild(mean, cov)

    return unflatten


# ------------------------------------------------------------------- registry
def register(cls: type[Any]) -> type[Any]:
    """Register a covariance class or a `GaussianParameter` subclass as a JAX pytree.

    Every class of structcov, and every subclass that exists when
    ``structcov.jax`` is imported, is registered already; call this (or use it
    as a class decorator) for a subclass defined later. Registering twice is a
    no-op. A subclass's arrays are its structure's slots; its structure and
    constructor configuration become the static aux data.

    Returns ``cls``.
    """
    if cls in _REGISTERED:
        return cls
    if isinstance(cls, type) and issubclass(cls, FactorizedCovariance):
        jax.tree_util.register_pytree_with_keys(
            cls,
            _covariance_flatten_with_keys,
            _covariance_unflatten(cls),
            _covariance_flatten,
        )
    elif isinstance(cls, type) and issubclass(cls, GaussianParameter):
        jax.tree_util.register_pytree_with_keys(
            cls, _gaussian_flatten_with_keys, _gaussian_unflatten(cls), _gaussian_flatten
        )
    else:
        raise TypeError(
            "`cls` must be a subclass of structcov.FactorizedCovariance or "
            f"structcov.GaussianParameter, got {cls!r}"
        )
    _REGISTERED.add(cls)
    return cls


def _register_existing(base: type[Any]) -> None:
    register(base)
    for subclass in base.__subclasses__():
        _register_existing(subclass)


_register_existing(FactorizedCovariance)
_register_existing(GaussianParameter)


# -------------------------------------------------------- learning-rate scaling
def _is_structcov(node: Any) -> bool:
    return isinstance(node, (FactorizedCovariance, GaussianParameter))


def _scales_of(node: Any, default: float) -> Any:
    if isinstance(node, GaussianParameter):
        means = {name: 1.0 if participates else None for name, participates in _gaussian_aux(node)}
        return type(node)._rebuild(means, _scales_of(node.cov, default))
    if isinstance(node, StructuredCovariance):
        return type(node)._from_parts(node._config(), node.structure, node.lr_scaling)
    return default


def lr_scaling_tree(tree: Any, default: float = 1.0) -> Any:
    """The learning-rate scaling of every leaf of ``tree``, as a pytree of the same structure.

    Parameters
    ----------
    tree
        A `GaussianParameter`, a covariance, or any pytree containing them
        (a dict of layers, an Equinox model filtered with ``eqx.filter(model,
        eqx.is_array)``).
    default
        The scaling of leaves that do not belong to a structcov object.

    Returns
    -------
    pytree
        Same treedef as ``tree`` with Python floats as leaves: 1.0 for each mean,
        ``cov.lr_scaling[path]`` for each covariance array (e.g. ``1 / rank`` for
        ``"factor.weight"``), ``default`` elsewhere.

    Examples
    --------
    A per-leaf learning-rate multiplier after Adam (scaling Adam's update equals
    scaling its learning rate):

    ```python
    scales = lr_scaling_tree(param)
    optimizer = optax.chain(
        optax.adam(1e-2),
        optax.stateless(lambda updates, _: jax.tree.map(operator.mul, updates, scales)),
    )
    ```

    Or as labels of ``optax.multi_transform``, one optimizer per distinct scaling:

    ```python
    labels = lr_scaling_tree(param)
    optimizer = optax.multi_transform(
        {s: optax.adam(1e-2 * s) for s in set(jax.tree.leaves(labels))}, labels
    )
    ```
    """
    return jax.tree_util.tree_map(
        functools.partial(_scales_of, default=default), tree, is_leaf=_is_structcov
    )


# ------------------------------------------------------------ module wrappers
def _resolve_prior(param: GaussianParameter, prior: Any) -> GaussianParameter:
    if prior is None:
        return normal_prior(param)
    inner = getattr(prior, "param", prior)
    if not isinstance(inner, GaussianParameter):
        raise TypeError(
            "`prior` must be a GaussianParameter, a structcov module wrapper or None "
            f"(N(0, I)), got {type(prior).__name__}"
        )
    return inner


def _check_param(param: Any) -> GaussianParameter:
    if not isinstance(param, GaussianParameter):
        raise TypeError(f"`param` must be a GaussianParameter, got {type(param).__name__}")
    register(type(param))
    return param


@functools.cache
def _equinox_class() -> type[Any]:
    import equinox as eqx  # type: ignore[import-not-found,unused-ignore]

    class EquinoxGaussian(eqx.Module):  # type: ignore[misc,unused-ignore]
        """An ``equinox.Module`` holding one `GaussianParameter` (field ``param``).

        The parameter is a pytree already, so its means and covariance arrays are
        the module's array leaves (``eqx.filter(module, eqx.is_array)`` selects
        them all); names, shapes and ranks are static. The methods call the core.
        """

        param: GaussianParameter

        def sample(self, key: Any, sample_shape: Any = ()) -> dict[str, Any]:
            """Draw ``mean + S z``: name -> ``(*sample_shape, *mean.shape)``, ``key`` a PRNG key."""
            return self.param.sample(sample_shape, generator=key)

        def log_prob(self, value: Any) -> Any:
            """log N(value; mean, Sigma): name -> ``(*batch, *shape)`` in, ``(*batch,)`` out."""
            return self.param.log_prob(value)

        def entropy(self) -> Any:
            """Differential entropy, a 0-D array."""
            return self.param.entropy()

        def kl_divergence(self, prior: Any = None) -> Any:
            """KL(self || prior), a 0-D array; ``prior=None`` is N(0, I) (`normal_prior`)."""
            return kl_divergence(self.param, _resolve_prior(self.param, prior))

    EquinoxGaussian.__module__ = __name__
    EquinoxGaussian.__qualname__ = "EquinoxGaussian"
    return EquinoxGaussian


def equinox_module(param: GaussianParameter) -> Any:
    """Wrap ``param`` in an ``equinox.Module`` (class ``structcov.jax.EquinoxGaussian``).

    The module has ``sample(key, sample_shape)``, ``log_prob(value)``,
    ``entropy()`` and ``kl_divergence(prior=None)``; ``module.param`` is the
    `GaussianParameter`. Imports equinox (raises ``ImportError`` without it).
    """
    return _equinox_class()(_check_param(param))


@functools.cache
def _nnx_class() -> type[Any]:
    from flax import nnx  # type: ignore[import-not-found,unused-ignore]

    class NNXGaussian(nnx.Module):  # type: ignore[misc,unused-ignore]
        """A Flax ``nnx.Module`` holding a `GaussianParameter` as ``nnx.Param`` s.

        ``module.mean[name]`` holds each participating mean and
        ``module.cov[path]`` each covariance array (paths of ``cov.storage()``);
        every ``nnx.Param`` carries ``lr_scaling`` metadata (1.0 for the means).
        Names, shapes, ranks and the pytree structure are static. ``module.param``
        rebuilds the core `GaussianParameter` from the current values; the
        methods go through it. Per-leaf scaling for ``nnx.Optimizer``::

            scales = jax.tree.map(
                lambda v: v.get_metadata().get("lr_scaling", 1.0),
                nnx.state(model, nnx.Param),
                is_leaf=lambda x: isinstance(x, nnx.Variable),
            )
        """

        def __init__(self, param: GaussianParameter) -> None:
            storage, scaling = param.cov.storage(), param.cov.lr_scaling
            self.mean = nnx.Dict(
                {name: nnx.Param(param.mean[name], lr_scaling=1.0) for name in param.names}
            )
            self.cov = nnx.Dict(
                {
                    path: nnx.Param(array, lr_scaling=scaling[path])
                    for path, array in storage.items()
                }
            )
            # The pytree's leaf order: the means, then the covariance slots (static).
            self._leaf_keys = tuple(("mean", n) for n in param.names) + tuple(
                ("cov", path) for path in storage
            )
            self._treedef = jax.tree_util.tree_structure(param)

        @property
        def param(self) -> GaussianParameter:
            """The core `GaussianParameter` over the current ``nnx.Param`` values."""
            leaves = [getattr(self, group)[key][...] for group, key in self._leaf_keys]
            rebuilt: GaussianParameter = jax.tree_util.tree_unflatten(self._treedef, leaves)
            return rebuilt

        def sample(self, key: Any, sample_shape: Any = ()) -> dict[str, Any]:
            """Draw ``mean + S z``: name -> ``(*sample_shape, *mean.shape)``, ``key`` a PRNG key."""
            return self.param.sample(sample_shape, generator=key)

        def log_prob(self, value: Any) -> Any:
            """log N(value; mean, Sigma): name -> ``(*batch, *shape)`` in, ``(*batch,)`` out."""
            return self.param.log_prob(value)

        def entropy(self) -> Any:
            """Differential entropy, a 0-D array."""
            return self.param.entropy()

        def kl_divergence(self, prior: Any = None) -> Any:
            """KL(self || prior), a 0-D array; ``prior=None`` is N(0, I) (`normal_prior`)."""
            param = self.param
            return kl_divergence(param, _resolve_prior(param, prior))

    NNXGaussian.__module__ = __name__
    NNXGaussian.__qualname__ = "NNXGaussian"
    return NNXGaussian


def nnx_module(param: GaussianParameter) -> Any:
    """Wrap ``param`` in a Flax ``nnx.Module`` (class ``structcov.jax.NNXGaussian``).

    Every mean and covariance array becomes an ``nnx.Param`` (with
    ``lr_scaling`` metadata); the module has ``param`` (the rebuilt
    `GaussianParameter`), ``sample(key, sample_shape)``, ``log_prob(value)``,
    ``entropy()`` and ``kl_divergence(prior=None)``. Imports flax (raises
    ``ImportError`` without it).
    """
    return _nnx_class()(_check_param(param))


_LAZY_CLASSES: dict[str, Callable[[], type[Any]]] = {
    "EquinoxGaussian": _equinox_class,
    "NNXGaussian": _nnx_class,
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_CLASSES:
        return _LAZY_CLASSES[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------- explicit sharding
#: untyped in jax's stubs
_PartitionSpec: Any = jax.sharding.PartitionSpec
_reshard: Any = jax.sharding.reshard


def _spec(x: Any) -> tuple[Any, ...]:
    """``x``'s split over explicit mesh axes, one entry per axis (``None``: not split)."""
    spec: tuple[Any, ...] = tuple(jax.typeof(x).sharding.spec)
    padding: int = x.ndim - len(spec)
    return spec + (None,) * padding


def _sharded_matmul(a: Any, b: Any) -> Any:
    """``a @ b``; when both sides split the contracted axis, JAX's explicit mode asks for
    the output sharding: that of the contraction with the axis unsplit (partial sums,
    then an all-reduce), which automatic sharding picks by itself."""
    spec_a, spec_b = _spec(a), _spec(b)
    if spec_a[-1] is None or spec_b[-2] is None:
        return jax.numpy.matmul(a, b)
    batch = max(a.ndim, b.ndim) - 2
    pad_a = (None,) * (batch - a.ndim + 2) + spec_a[:-2]
    pad_b = (None,) * (batch - b.ndim + 2) + spec_b[:-2]
    out = tuple(x if x is not None else y for x, y in zip(pad_a, pad_b, strict=True))
    return jax.numpy.matmul(a, b, out_sharding=_PartitionSpec(*out, spec_a[-2], spec_b[-1]))


def _one_piece(a: Any, axes: tuple[int, ...]) -> Any:
    """``a`` with ``axes`` whole on every device (an all-gather, of a small matrix)."""
    spec = _spec(a)
    if all(spec[axis] is None for axis in axes):
        return a
    whole = tuple(None if axis in axes else s for axis, s in enumerate(spec))
    return _reshard(a, _PartitionSpec(*whole))


_linalg.register_override("jax", "matmul", _sharded_matmul)
_linalg.register_override("jax", "one_piece", _one_piece)
