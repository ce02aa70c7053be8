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
import numbers
import operator
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import jax
import jax.numpy as jnp

from . import _linalg
from .convolution import _padding as _conv_padding
from .convolution import _per_dimension
from .convolution import conv as _conv
from .covariances import FactorizedCovariance
from .covariances._base import StructuredCovariance
from .functional import sample_shape_of
from .gaussian import GaussianParameter, normal_prior
from .gaussian import kl_divergence as _core_kl
from .layers import deterministic_forward as _deterministic_forward
from .layers import linear as _linear
from .parametrizations import LayerType, Parametrization, Standard, check_layer_type, fans

__all__ = [
    "DeterministicParameter",
    "bayesian",
    "equinox_module",
    "kl_divergence",
    "lr_scaling_tree",
    "nnx_module",
    "predictive",
    "register",
]

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


# ------------------------------------------------------- deterministic parameter
class DeterministicParameter:
    """The means of a deterministic layer (``cov=None``): ``mean[name]``, ``cov`` is None.

    Laid out like a `GaussianParameter` (``mean`` insertion-ordered, ``None``
    entries kept, ``params["weight"]``) so a layer has the same mean leaves with or
    without a covariance. A pytree whose leaves are the participating means, keyed
    ``DictKey(name)``; it takes no part in `kl_divergence` and its means get the
    parametrization's learning-rate factors in `lr_scaling_tree`.
    """

    cov: None = None

    def __init__(self, mean: Mapping[str, Any]) -> None:
        self.mean: dict[str, Any] = dict(mean)

    @property
    def names(self) -> tuple[str, ...]:
        """The participating (non-``None``) mean names, in insertion order."""
        return tuple(name for name, value in self.mean.items() if value is not None)

    def __getitem__(self, name: str) -> Any:
        return self.mean[name]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}: {tuple(self.mean[n].shape)}" for n in self.names)
        return f"DeterministicParameter({{{shapes}}})"


def _deterministic_aux(param: DeterministicParameter) -> tuple[tuple[str, bool], ...]:
    return tuple((name, value is not None) for name, value in param.mean.items())


def _deterministic_unflatten(
    aux: tuple[tuple[str, bool], ...], children: Iterable[Any]
) -> DeterministicParameter:
    present = iter(children)
    rebuilt = DeterministicParameter.__new__(DeterministicParameter)
    rebuilt.mean = {name: next(present) if participates else None for name, participates in aux}
    return rebuilt


jax.tree_util.register_pytree_with_keys(
    DeterministicParameter,
    lambda p: ([(_DictKey(n), p.mean[n]) for n in p.names], _deterministic_aux(p)),
    _deterministic_unflatten,
    lambda p: ([p.mean[n] for n in p.names], _deterministic_aux(p)),
)


# ------------------------------------------------------------------- layer glue
class _Sampled:
    """A layer whose call takes ``(x, sample_shape, key, *, input_contains_samples)``
    (the Equinox and NNX layers and sequentials; see `_sequential_forward`)."""

    if TYPE_CHECKING:

        def __call__(
            self,
            x: Any,
            sample_shape: Any = (),
            key: Any = None,
            *,
            input_contains_samples: bool = False,
        ) -> Any: ...

    @property
    def stochastic(self) -> bool:
        """Whether a forward draws parameters (a deterministic layer only replicates)."""
        raise NotImplementedError


class _LayerMethods(_Sampled):
    """What the Equinox and NNX layers share: parametrization scales and the forward.

    No annotations in the class body: Equinox would read them as dataclass fields.
    """

    if TYPE_CHECKING:
        params: Any
        in_features: int
        out_features: int
        layer_type: LayerType
        parametrization: Parametrization
        local_reparameterization: bool

        def _core_params(self) -> GaussianParameter | DeterministicParameter: ...

    @property
    def stochastic(self) -> bool:
        """Whether the layer has a covariance (else it is an ordinary linear layer)."""
        return self._core_params().cov is not None

    @property
    def weight(self) -> Any:
        """The weight mean (an array)."""
        return self._core_params().mean["weight"]

    @property
    def bias(self) -> Any:
        """The bias mean (an array), ``None`` without bias."""
        return self._core_params().mean["bias"]

    def _fans(self) -> tuple[int, int]:
        return fans((self.out_features, self.in_features))

    def init_scales(self) -> dict[str, float]:
        """The parametrization's initial stds ``{"weight": ..., "bias": ...}`` for this layer."""
        return self.parametrization.init_scales(*self._fans(), self.layer_type)

    def lr_scales(self, optimizer: str = "adam") -> dict[str, float]:
        """The parametrization's learning-rate factors ``{"weight": ..., "bias": ...}``."""
        return self.parametrization.lr_scales(*self._fans(), optimizer, self.layer_type)

    def _forward(
        self,
        x: Any,
        sample_shape: Any,
        key: Any,
        input_contains_samples: bool,
        parameter_samples: Mapping[str, Any] | None,
    ) -> Any:
        params = self._core_params()
        if isinstance(params, GaussianParameter):
            return _linear(
                x,
                params,
                sample_shape,
                key,
                input_contains_samples=input_contains_samples,
                parameter_samples=parameter_samples,
                local_reparameterization=self.local_reparameterization,
            )
        out = jnp.matmul(x, jnp.matrix_transpose(params.mean["weight"]))
        if params.mean["bias"] is not None:
            out = out + params.mean["bias"]
        return _deterministic_forward(
            out, x, sample_shape, input_contains_samples, parameter_samples, "x"
        )


def _check_layer_arguments(
    in_features: Any,
    out_features: Any,
    layer_type: Any,
    cov: Any,
    parametrization: Any,
    local_reparameterization: bool,
) -> LayerType:
    for argument, value in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{argument}` must be an int >= 1, got {value!r}")
    if not isinstance(parametrization, Parametrization):
        raise TypeError(
            "`parametrization` must be a structcov.parametrizations.Parametrization "
            f"(Standard(), NeuralTangent(), MaximalUpdate()), got {type(parametrization).__name__}"
        )
    if cov is None and local_reparameterization:
        raise ValueError("`local_reparameterization=True` needs a covariance, got cov=None")
    return check_layer_type(layer_type)


class _ConvMethods(_LayerMethods):
    """`_LayerMethods` for the convolution layers: fans of ``(C_out, C_in/groups, *kernel)``
    and the forward through `structcov.conv`."""

    _spatial = 0  # the number of spatial dimensions, set per class
    local_reparameterization = False  # a convolution draws weights

    if TYPE_CHECKING:
        in_channels: int
        out_channels: int
        kernel_size: tuple[int, ...]
        stride: tuple[int, ...]
        padding: str | tuple[int, ...]
        dilation: tuple[int, ...]
        groups: int

    def _fans(self) -> tuple[int, int]:
        return fans((self.out_channels, self.in_channels // self.groups, *self.kernel_size))

    def _forward(
        self,
        x: Any,
        sample_shape: Any,
        key: Any,
        input_contains_samples: bool,
        parameter_samples: Mapping[str, Any] | None,
    ) -> Any:
        params = self._core_params()
        options: dict[str, Any] = {
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "groups": self.groups,
        }
        if isinstance(params, GaussianParameter):
            return _conv(
                x,
                params,
                sample_shape,
                key,
                input_contains_samples=input_contains_samples,
                parameter_samples=parameter_samples,
                **options,
            )
        n = self._spatial
        if x.ndim < n + 1 or x.shape[x.ndim - n - 1] != self.in_channels:
            raise ValueError(
                f"`x` must have shape (*batch, {self.in_channels}, *spatial) with {n} spatial "
                f"dimension(s), got shape {tuple(x.shape)}"
            )
        item = tuple(x.shape[x.ndim - n - 1 :])  # (C_in, *spatial)
        out = jax.lax.conv_general_dilated(
            jnp.reshape(x, (-1, *item)),
            params.mean["weight"],
            window_strides=self.stride,
            padding=_conv_padding(self.padding, self.kernel_size, self.stride, self.dilation),
            rhs_dilation=self.dilation,
            dimension_numbers=_CONV_DIMENSIONS[n],
            feature_group_count=self.groups,
        )  # the means, once
        if params.mean["bias"] is not None:
            out = out + jnp.reshape(params.mean["bias"], (-1,) + (1,) * n)
        out = jnp.reshape(out, (*x.shape[: x.ndim - len(item)], *out.shape[1:]))
        return _deterministic_forward(
            out, x, sample_shape, input_contains_samples, parameter_samples, "x"
        )


_CONV_DIMENSIONS = {
    1: ("NCH", "OIH", "NCH"),
    2: ("NCHW", "OIHW", "NCHW"),
    3: ("NCDHW", "OIDHW", "NCDHW"),
}


def _check_conv_arguments(
    n: int,
    in_channels: Any,
    out_channels: Any,
    kernel_size: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: Any,
    padding_mode: Any,
    layer_type: Any,
    cov: Any,
    parametrization: Any,
) -> tuple[LayerType, dict[str, Any]]:
    """The checked layer type and geometry ``{kernel_size, stride, padding, dilation}``
    (tuples of ``n`` ints; ``padding`` may stay ``"valid"`` / ``"same"``)."""
    for argument, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{argument}` must be an int >= 1, got {value!r}")
    layer_type = _check_layer_arguments(
        in_channels, out_channels, layer_type, cov, parametrization, False
    )
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"`groups` must be an int >= 1, got {groups!r}")
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"`groups` ({groups}) must divide in_channels ({in_channels}) and "
            f"out_channels ({out_channels})"
        )
    if padding_mode != "zeros":
        raise ValueError(
            f"`padding_mode` must be 'zeros' (the only mode structcov.conv has), got "
            f"{padding_mode!r}: pad the input yourself (jnp.pad) and use padding=0"
        )
    geometry: dict[str, Any] = {
        "kernel_size": _per_dimension(kernel_size, n, "kernel_size", 1),
        "stride": _per_dimension(stride, n, "stride", 1),
        "dilation": _per_dimension(dilation, n, "dilation", 1),
    }
    geometry["padding"] = (
        padding if isinstance(padding, str) else _per_dimension(padding, n, "padding", 0)
    )
    # "valid" / "same" (stride 1 only) and every other padding are checked here, once
    _conv_padding(geometry["padding"], geometry["kernel_size"], geometry["stride"],
                  geometry["dilation"])  # fmt: skip
    return layer_type, geometry


def _core_covariance(cov: Any) -> StructuredCovariance:
    core = cov if isinstance(cov, StructuredCovariance) else cov()
    if not isinstance(core, StructuredCovariance):
        raise TypeError(
            "`cov` must be None, a structcov covariance (e.g. structcov.KroneckerCovariance()) "
            f"or a zero-argument callable returning one, got {type(core).__name__}"
        )
    return core


def _initial_params(
    weight_shape: tuple[int, ...],
    bias: bool,
    cov: Any,
    scales: Mapping[str, float],
    key: Any,
    dtype: Any,
) -> GaussianParameter | DeterministicParameter:
    """Means N(0, scale^2) by name, the covariance reset at the same per-name scales.

    ``key`` is split into three: ``weight_key, bias_key, cov_key =
    jax.random.split(key, 3)`` (the bias key is unused without a bias).
    """
    if key is None:
        raise TypeError("`key` must be a JAX PRNG key (e.g. jax.random.key(0)), got None")
    weight_key, bias_key, cov_key = jax.random.split(key, 3)
    dtype = jnp.zeros((), dtype=dtype).dtype
    mean: dict[str, Any] = {
        "weight": scales["weight"] * jax.random.normal(weight_key, weight_shape, dtype),
        "bias": scales["bias"] * jax.random.normal(bias_key, weight_shape[:1], dtype)
        if bias
        else None,
    }
    if cov is None:
        return DeterministicParameter(mean)
    param = GaussianParameter(mean, _core_covariance(cov))
    param.cov.reset_parameters({name: scales[name] for name in param.names}, generator=cov_key)
    return param


def _sequential_forward(
    layers: Sequence[Any],
    x: Any,
    sample_shape: Any,
    key: Any,
    input_contains_samples: bool,
) -> Any:
    """The forward of `EquinoxSequential` / `NNXSequential` (torch `Sequential` semantics).

    ``key`` is split once per layer position, ``jax.random.split(key, len(layers))``,
    as ``equinox.nn.Sequential`` does: layer ``i`` draws with ``keys[i]`` whether or
    not the other layers are stochastic (a nested sequential splits its key again).
    """
    shape = None if sample_shape is None else sample_shape_of(sample_shape)
    if shape is None and input_contains_samples:
        raise ValueError("`input_contains_samples` needs a `sample_shape`, got sample_shape=None")
    keys: list[Any] = (
        [None] * len(layers) if key is None else list(jax.random.split(key, len(layers)))
    )
    contains = input_contains_samples
    out = x
    for layer, layer_key in zip(layers, keys, strict=True):
        if not isinstance(layer, _Sampled):
            out = layer(out)
        elif contains or layer.stochastic:
            out = layer(out, shape, layer_key, input_contains_samples=contains)
            contains = shape is not None
        else:
            out = layer(out, None)
    if shape is not None and not contains:
        out = jnp.broadcast_to(out, (*shape, *out.shape))
    return out


# -------------------------------------------------------- learning-rate scaling
def _is_structcov(node: Any) -> bool:
    return isinstance(node, (FactorizedCovariance, GaussianParameter))


def _scaled_gaussian(
    node: GaussianParameter, means: Mapping[str, float], weight_factor: float
) -> GaussianParameter:
    """``node``'s treedef with floats: ``means[name]`` per mean, the covariance's
    ``weight_factor * lr_scaling[path]``."""
    cov = node.cov
    mean = {
        name: means[name] if participates else None for name, participates in _gaussian_aux(node)
    }
    scaled = {path: weight_factor * factor for path, factor in cov.lr_scaling.items()}
    return type(node)._rebuild(mean, type(cov)._from_parts(cov._config(), cov.structure, scaled))


def _scales_of(node: Any, default: float) -> Any:
    if isinstance(node, GaussianParameter):
        return _scaled_gaussian(node, {name: 1.0 for name in node.mean}, 1.0)
    if isinstance(node, StructuredCovariance):
        return type(node)._from_parts(node._config(), node.structure, node.lr_scaling)
    return default


def _layer_scales(layer: _LayerMethods, default: float, optimizer: str) -> Any:
    factors = layer.lr_scales(optimizer)

    def scales(node: Any) -> Any:
        if isinstance(node, GaussianParameter):
            return _scaled_gaussian(node, factors, factors["weight"])
        if isinstance(node, DeterministicParameter):
            return _deterministic_unflatten(
                _deterministic_aux(node), [factors[name] for name in node.names]
            )
        return default

    is_leaf: Callable[[Any], bool] = lambda n: isinstance(  # noqa: E731
        n, (GaussianParameter, DeterministicParameter)
    )
    return jax.tree_util.tree_map(scales, layer, is_leaf=is_leaf)


def _nnx_module_type() -> type[Any] | None:
    """``flax.nnx.Module`` if flax is imported already, else ``None`` (no NNX model exists)."""
    nnx = sys.modules.get("flax.nnx")
    return None if nnx is None else cast(type[Any], nnx.Module)


def _nnx_lr_scaling(model: Any, default: float, optimizer: str) -> Any:
    from flax import nnx  # type: ignore[import-not-found,unused-ignore]

    # graph path of every Variable inside a structcov layer -> its factor
    factors: dict[tuple[Any, ...], float] = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, _LayerMethods):
            f = node.lr_scales(optimizer)
            params = node.params
            for name in node._core_params().names:
                entry = (*path, "params", "mean", name)
                factors[entry] = f[name]
            if params.cov is not None:
                for cov_path, variable in params.cov.items():
                    scaling = variable.get_metadata().get("lr_scaling", 1.0)
                    entry = (*path, "params", "cov", cov_path)
                    factors[entry] = f["weight"] * scaling

    def scale(path: tuple[Any, ...], variable: Any) -> Any:
        found = factors.get(tuple(path))
        if found is not None:
            return found
        return variable.get_metadata().get("lr_scaling", default)

    return nnx.map_state(scale, nnx.state(model, nnx.Param))


def lr_scaling_tree(tree: Any, default: float = 1.0, optimizer: str = "adam") -> Any:
    """The learning-rate factor of every leaf of ``tree``, as a pytree of the same structure.

    The same rule as ``structcov.torch.param_groups``: in a structcov layer
    (`EquinoxLinear`, `NNXLinear`, ...) with factors ``f = layer.lr_scales(optimizer)``
    (its parametrization's), the mean ``name`` gets ``f[name]`` and each covariance
    array ``f["weight"] * cov.lr_scaling[path]``; a `GaussianParameter` outside a
    layer gets 1.0 per mean and ``cov.lr_scaling[path]`` per covariance array;
    every other leaf ``default``. With `Standard` layers (the default) only the
    covariances' ``lr_scaling`` acts.

    Parameters
    ----------
    tree
        A `GaussianParameter`, a covariance, or any pytree containing them or
        Equinox layers (a dict of parameters, an Equinox model, also filtered with
        ``eqx.filter(model, eqx.is_array)``); or a Flax ``nnx.Module``.
    default
        The factor of leaves that do not belong to a structcov object.
    optimizer
        ``"adam"`` (also ``"adamw"``, ``"rmsprop"``: optimizers invariant to the
        gradient's scale) or ``"sgd"``: which of the parametrization's
        learning-rate rules applies (`structcov.parametrizations`).

    Returns
    -------
    pytree
        Same treedef as ``tree`` with Python floats as leaves. For an
        ``nnx.Module``: an ``nnx.State`` of floats shaped like
        ``nnx.state(model, nnx.Param)`` (Variables outside structcov layers get
        their ``lr_scaling`` metadata, else ``default``).

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

    Or as labels of ``optax.multi_transform``, one optimizer per distinct factor:

    ```python
    labels = lr_scaling_tree(param)
    optimizer = optax.multi_transform(
        {s: optax.adam(1e-2 * s) for s in set(jax.tree.leaves(labels))}, labels
    )
    ```
    """
    nnx_module = _nnx_module_type()
    if nnx_module is not None and isinstance(tree, nnx_module):
        return _nnx_lr_scaling(tree, default, optimizer)

    def scales(node: Any) -> Any:
        if isinstance(node, _LayerMethods):
            return _layer_scales(node, default, optimizer)
        return _scales_of(node, default)

    return jax.tree_util.tree_map(
        scales, tree, is_leaf=lambda n: _is_structcov(n) or isinstance(n, _LayerMethods)
    )


# ------------------------------------------------------------ model-level inference
def _is_scale(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _gaussian_parts(model: Any) -> dict[str, GaussianParameter]:
    """Path -> every `GaussianParameter` of ``model`` (``""`` for the model itself).

    An ``nnx.Module``: its NNX wrappers found by ``nnx.iter_graph`` (path joined with
    ``/``); anything else: the pytree's `GaussianParameter` nodes (``keystr`` path).
    """
    nnx_module = _nnx_module_type()
    if isinstance(model, GaussianParameter):
        return {"": model}
    if nnx_module is not None and isinstance(model, nnx_module):
        from flax import nnx

        wrapper = _nnx_class()
        return {
            "/".join(map(str, path)): node.param
            for path, node in nnx.iter_graph(model)
            if isinstance(node, wrapper)
        }
    flat, _ = jax.tree_util.tree_flatten_with_path(
        model, is_leaf=lambda n: isinstance(n, GaussianParameter)
    )
    return {
        jax.tree_util.keystr(path): leaf
        for path, leaf in flat
        if isinstance(leaf, GaussianParameter)
    }


def kl_divergence(model: Any, prior: Any) -> Any:
    """KL(q || p) summed over every `GaussianParameter` of a model, a 0-D array.

    Parameters
    ----------
    model
        A `GaussianParameter`, or any pytree holding them (a dict of parameters, an
        Equinox model of `EquinoxLinear` layers, a model filtered with
        ``eqx.filter``), or a Flax ``nnx.Module`` holding `NNXLinear` layers or
        `nnx_module` wrappers. Deterministic layers (``cov=None``) take no part.
    prior
        A float ``sigma``: each parameter's prior is N(0, sigma^2 I), the value of
        ``normal_prior(q_i, sigma)`` computed without building it. Or a model of the
        same layout (the same kind of container), whose `GaussianParameter` s are
        paired with ``model`` 's by tree path (the same paths on both sides, else
        ``ValueError``); a single `GaussianParameter` for a single one.

    Returns
    -------
    array
        The sum of the core's exact KL (`structcov.kl_divergence`) over the
        parameters; ``+inf`` if one covariance is singular. Traceable: use it
        inside ``jax.jit`` / ``eqx.filter_jit`` / ``nnx.jit`` and ``grad``.
    """
    q_parts = _gaussian_parts(model)
    if not q_parts:
        raise ValueError(
            f"`model` ({type(model).__name__}) holds no structcov GaussianParameter "
            "(a model of deterministic layers has no KL)"
        )
    if _is_scale(prior):
        terms = [_core_kl(q, prior) for q in q_parts.values()]
    else:
        p_parts = {} if isinstance(prior, (str, bytes)) else _gaussian_parts(prior)
        if not p_parts:
            raise TypeError(
                "`prior` must be a float prior scale (N(0, prior^2 I)) or a model of the same "
                f"layout as `model`, got {type(prior).__name__}"
            )
        if set(p_parts) != set(q_parts):
            raise ValueError(
                "`prior` must hold GaussianParameters at the same paths as `model`: "
                f"expected {sorted(q_parts)}, got {sorted(p_parts)}"
            )
        terms = [_core_kl(q, p_parts[path]) for path, q in q_parts.items()]
    return functools.reduce(operator.add, terms)


def predictive(
    model: Callable[..., Any],
    x: Any,
    sample_shape: Any = (),
    key: Any = None,
    *,
    probabilities: bool = False,
) -> Any:
    """The model's outputs over parameter samples, stacked or as averaged probabilities.

    Parameters
    ----------
    model
        Called as ``model(x, sample_shape, key)``, like the layers (`EquinoxLinear`,
        `EquinoxSequential`, `NNXLinear`, `NNXSequential`).
    x
        The input, ``(*batch, in_features)``.
    sample_shape
        The sample dimensions (an int or a tuple); ``None``: the means' forward.
    key
        A JAX PRNG key (the model splits it per layer).
    probabilities
        ``False``: return the stacked outputs. ``True``: the Monte Carlo predictive
        ``mean_s softmax(y_s)`` (softmax over the last axis, averaged over the sample
        axes; the softmax of the mean forward for ``sample_shape=None``).

    Returns
    -------
    array
        ``(*sample_shape, *batch, out)``, or ``(*batch, out)`` with
        ``probabilities=True``.
    """
    shape = None if sample_shape is None else sample_shape_of(sample_shape)
    out = model(x, shape, key)
    if not probabilities:
        return out
    probs = jax.nn.softmax(out, axis=-1)
    if not shape:
        return probs
    return jnp.mean(probs, axis=tuple(range(len(shape))))


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
            return _core_kl(self.param, _resolve_prior(self.param, prior))

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
            return _core_kl(param, _resolve_prior(param, prior))

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


# ------------------------------------------------------------------ Equinox layers
_LINEAR_DOC = """A dense layer ``y = x W^T + b`` with Gaussian (or fixed) parameters ({kind}).

    The counterpart of ``structcov.torch.Linear``: thin glue around
    `structcov.linear`, which every forward calls with ``params`` (the core
    `GaussianParameter`), so the structure-aware evaluation and its costs are the core's.
    {storage}

    Parameters
    ----------
    in_features, out_features
        The sizes of the input and output (at least 1).
    bias
        Whether the layer has a bias (else ``params["bias"]`` is ``None``).
    layer_type
        ``"input"``, ``"hidden"`` or ``"output"``: where the layer sits, for the
        parametrization's initial and learning-rate scales.
    cov
        ``None``: a deterministic layer (an ordinary linear layer). Else a core
        covariance, e.g. ``structcov.KroneckerCovariance()``, or a zero-argument
        callable returning one (``structcov.DiagonalCovariance``), called once for
        this layer. A covariance object belongs to one parameter.
    parametrization
        ``Standard()`` (the default), ``NeuralTangent()`` or ``MaximalUpdate()``
        (`structcov.parametrizations`): the initial stds of the means and of the
        covariance, and the learning-rate factors `lr_scaling_tree` applies.
    local_reparameterization
        `structcov.DiagonalCovariance` only: draw output noise instead of weights
        (see `structcov.linear`: it changes the joint distribution across the batch).
    {key}
    dtype
        The parameters' dtype (``None``: JAX's default float).

    Notes
    -----
    Initialisation: ``weight_key, bias_key, cov_key = jax.random.split(key, 3)``;
    the means are ``init_scale * jax.random.normal(...)`` with the
    parametrization's ``init_scales()``, and the covariance is
    ``cov.reset_parameters(init_scales, generator=cov_key)``.

    The call ``layer(x, sample_shape=(), key=None, *, input_contains_samples=False,
    parameter_samples=None)`` returns ``(*sample_shape, *batch, out_features)`` from
    ``(*batch, in_features)``: one parameter draw per sample index, shared by the batch,
    from ``key`` (the generator of `structcov.linear`; the same key gives the same draw
    as ``params.sample(sample_shape, generator=key)``). ``sample_shape=None`` is the mean
    forward ``(*batch, out_features)``; ``input_contains_samples=True`` takes an input
    ``(*sample_shape, *batch, in_features)``; ``parameter_samples`` uses given samples.
    A deterministic layer computes ``x W^T + b`` once; a ``sample_shape`` only
    broadcasts it over leading axes; it takes no ``parameter_samples``.
    """

_CONV_DOC = """A {n}-D convolution layer with Gaussian (or fixed) parameters ({kind}).

    The counterpart of ``structcov.torch.Conv{n}d``: ``{cls}(in_channels,
    out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
    padding_mode="zeros", layer_type="hidden", cov=None, parametrization=Standard(),
    *, {key}, dtype=None)``. The means are ``weight`` ``(out_channels, in_channels /
    groups, *kernel_size)`` and ``bias`` ``(out_channels,)``; ``cov``, ``layer_type``,
    ``parametrization``, the key and ``dtype`` as for the Linear layer (fan_in =
    in_channels / groups * prod(kernel_size)). ``kernel_size``, ``stride``,
    ``dilation``: an int or a tuple of {n}; ``padding``: an int, a tuple of {n},
    ``"valid"`` or ``"same"`` (stride 1 only). Only ``padding_mode="zeros"``.
    {storage}

    Every forward of a stochastic layer is `structcov.conv` on the core parameter:
    ``layer(x, sample_shape=(), key=None, *, input_contains_samples=False,
    parameter_samples=None)`` returns ``(*sample_shape, *batch, out_channels,
    *spatial_out)`` from ``(*batch, in_channels, *spatial)``, one parameter draw per
    sample index (the draw of ``params.sample(sample_shape, generator=key)``);
    ``sample_shape=None`` is the mean forward. A deterministic layer (``cov=None``)
    convolves once with the means (``jax.lax.conv_general_dilated``) and broadcasts
    over ``sample_shape``.
    """

_SEQUENTIAL_DOC = """Layers applied in order, passing ``sample_shape`` and the key ({kind}).

    The counterpart of ``structcov.torch.Sequential``. The call ``model(x,
    sample_shape=(), key=None, *, input_contains_samples=False)``: the first
    stochastic layer (a layer with a covariance, or a nested sequential holding one)
    draws with ``sample_shape`` and returns ``(*sample_shape, *batch, out)``; every
    later structcov layer gets ``input_contains_samples=True`` and draws its own
    parameters per sample index. Deterministic structcov layers before the first
    stochastic one run once; if no layer is stochastic the output is broadcast over
    ``sample_shape`` at the end. Any other callable (``jax.nn.relu``) is called as
    ``f(x)`` on the whole array, sample axes included. ``sample_shape=None`` is the
    mean forward of every layer.

    Keys: ``keys = jax.random.split(key, len(layers))`` and layer ``i`` draws with
    ``keys[i]`` (as ``equinox.nn.Sequential`` splits), stochastic or not, so making
    one layer deterministic does not change the others' draws; a nested sequential
    splits its key again.{extra}
    """


@functools.cache
def _equinox_layer_classes() -> dict[str, type[Any]]:
    import equinox as eqx

    class EquinoxLinear(_LayerMethods, eqx.Module):  # type: ignore[misc,unused-ignore]
        params: Any  # GaussianParameter, or DeterministicParameter for cov=None
        in_features: int = eqx.field(static=True)
        out_features: int = eqx.field(static=True)
        layer_type: LayerType = eqx.field(static=True)
        parametrization: Parametrization = eqx.field(static=True)
        local_reparameterization: bool = eqx.field(static=True)

        def __init__(
            self,
            in_features: int,
            out_features: int,
            bias: bool = True,
            layer_type: LayerType = "hidden",
            cov: Any = None,
            parametrization: Parametrization = Standard(),  # noqa: B008 -- immutable
            *,
            local_reparameterization: bool = False,
            key: Any,
            dtype: Any = None,
        ) -> None:
            self.layer_type = _check_layer_arguments(
                in_features, out_features, layer_type, cov, parametrization,
                local_reparameterization,
            )  # fmt: skip
            self.in_features = in_features
            self.out_features = out_features
            self.parametrization = parametrization
            self.local_reparameterization = local_reparameterization
            scales = parametrization.init_scales(in_features, out_features, self.layer_type)
            self.params = _initial_params(
                (out_features, in_features), bias, cov, scales, key, dtype
            )

        def _core_params(self) -> GaussianParameter | DeterministicParameter:
            return cast("GaussianParameter | DeterministicParameter", self.params)

        def __call__(
            self,
            x: Any,
            sample_shape: Any = (),
            key: Any = None,
            *,
            input_contains_samples: bool = False,
            parameter_samples: Mapping[str, Any] | None = None,
        ) -> Any:
            return self._forward(x, sample_shape, key, input_contains_samples, parameter_samples)

    class EquinoxSequential(_Sampled, eqx.Module):  # type: ignore[misc,unused-ignore]
        layers: tuple[Any, ...]

        def __init__(self, *layers: Any) -> None:
            self.layers = tuple(layers)

        @property
        def stochastic(self) -> bool:
            """Whether any layer draws parameters."""
            return any(isinstance(m, _Sampled) and m.stochastic for m in self.layers)

        def __getitem__(self, index: int) -> Any:
            return self.layers[index]

        def __len__(self) -> int:
            return len(self.layers)

        def __call__(
            self,
            x: Any,
            sample_shape: Any = (),
            key: Any = None,
            *,
            input_contains_samples: bool = False,
        ) -> Any:
            return _sequential_forward(self.layers, x, sample_shape, key, input_contains_samples)

    def equinox_conv(n: int) -> type[Any]:
        class EquinoxConv(_ConvMethods, eqx.Module):  # type: ignore[misc,unused-ignore]
            params: Any  # GaussianParameter, or DeterministicParameter for cov=None
            in_channels: int = eqx.field(static=True)
            out_channels: int = eqx.field(static=True)
            kernel_size: tuple[int, ...] = eqx.field(static=True)
            stride: tuple[int, ...] = eqx.field(static=True)
            padding: Any = eqx.field(static=True)  # tuple of ints, "valid" or "same"
            dilation: tuple[int, ...] = eqx.field(static=True)
            groups: int = eqx.field(static=True)
            layer_type: LayerType = eqx.field(static=True)
            parametrization: Parametrization = eqx.field(static=True)

            _spatial = n

            def __init__(
                self,
                in_channels: int,
                out_channels: int,
                kernel_size: Any,
                stride: Any = 1,
                padding: Any = 0,
                dilation: Any = 1,
                groups: int = 1,
                bias: bool = True,
                padding_mode: str = "zeros",
                layer_type: LayerType = "hidden",
                cov: Any = None,
                parametrization: Parametrization = Standard(),  # noqa: B008 -- immutable
                *,
                key: Any,
                dtype: Any = None,
            ) -> None:
                self.layer_type, geometry = _check_conv_arguments(
                    n, in_channels, out_channels, kernel_size, stride, padding, dilation,
                    groups, padding_mode, layer_type, cov, parametrization,
                )  # fmt: skip
                self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
                self.kernel_size = geometry["kernel_size"]
                self.stride = geometry["stride"]
                self.padding = geometry["padding"]
                self.dilation = geometry["dilation"]
                self.parametrization = parametrization
                scales = parametrization.init_scales(*self._fans(), self.layer_type)
                shape = (out_channels, in_channels // groups, *self.kernel_size)
                self.params = _initial_params(shape, bias, cov, scales, key, dtype)

            def _core_params(self) -> GaussianParameter | DeterministicParameter:
                return cast("GaussianParameter | DeterministicParameter", self.params)

            def __call__(
                self,
                x: Any,
                sample_shape: Any = (),
                key: Any = None,
                *,
                input_contains_samples: bool = False,
                parameter_samples: Mapping[str, Any] | None = None,
            ) -> Any:
                return self._forward(
                    x, sample_shape, key, input_contains_samples, parameter_samples
                )

        EquinoxConv.__doc__ = _CONV_DOC.format(
            n=n,
            cls=f"EquinoxConv{n}d",
            kind="an ``equinox.Module``",
            storage=(
                "``params`` is a `GaussianParameter` or, for ``cov=None``, a\n"
                "    `DeterministicParameter` (as in `EquinoxLinear`); channels, kernel size,\n"
                "    stride, padding, dilation, groups, layer type and parametrization are\n"
                "    static fields."
            ),
            key="key=key",
        )
        return EquinoxConv

    conv_classes = {f"EquinoxConv{n}d": equinox_conv(n) for n in (1, 2, 3)}

    EquinoxLinear.__doc__ = _LINEAR_DOC.format(
        kind="an ``equinox.Module``",
        storage=(
            "Its one array field ``params`` is a `GaussianParameter` (pytree leaves\n"
            "    ``.params['weight']``, ``.params.cov['factor.weight']``, ...) or a\n"
            "    `DeterministicParameter` for ``cov=None``; sizes, layer type and\n"
            "    parametrization are static fields."
        ),
        key="key\n        A JAX PRNG key for the initial draws (keyword, as in Equinox).",
    )
    EquinoxSequential.__doc__ = _SEQUENTIAL_DOC.format(
        kind="an ``equinox.Module``, ``EquinoxSequential(*layers)``", extra=""
    )
    return _finish(
        {"EquinoxLinear": EquinoxLinear, "EquinoxSequential": EquinoxSequential, **conv_classes}
    )


def _finish(classes: dict[str, type[Any]]) -> dict[str, type[Any]]:
    for name, cls in classes.items():
        cls.__module__ = __name__
        cls.__qualname__ = name
    return classes


# ------------------------------------------------------------------ Flax NNX layers
def _nnx_key(key: Any, rngs: Any) -> Any:
    if rngs is None:
        return key
    if key is not None:
        raise TypeError("pass either `key` or `rngs`, not both")
    return rngs.sample()


@functools.cache
def _nnx_layer_classes() -> dict[str, type[Any]]:
    from flax import nnx

    wrapper = _nnx_class()

    class NNXDeterministic(nnx.Module):  # type: ignore[misc,unused-ignore]
        """The means of a deterministic NNX layer: ``mean[name]`` ``nnx.Param`` s, ``cov`` None."""

        def __init__(self, param: DeterministicParameter) -> None:
            self.mean = nnx.Dict(
                {name: nnx.Param(param.mean[name], lr_scaling=1.0) for name in param.names}
            )
            self.cov = None
            self._aux = _deterministic_aux(param)

        @property
        def param(self) -> DeterministicParameter:
            """The core `DeterministicParameter` over the current values."""
            return _deterministic_unflatten(
                self._aux, [self.mean[name][...] for name, present in self._aux if present]
            )

    class NNXLinear(_LayerMethods, nnx.Module):  # type: ignore[misc,unused-ignore]
        def __init__(
            self,
            in_features: int,
            out_features: int,
            bias: bool = True,
            layer_type: LayerType = "hidden",
            cov: Any = None,
            parametrization: Parametrization = Standard(),  # noqa: B008 -- immutable
            *,
            local_reparameterization: bool = False,
            rngs: Any,
            dtype: Any = None,
        ) -> None:
            self.layer_type = _check_layer_arguments(
                in_features, out_features, layer_type, cov, parametrization,
                local_reparameterization,
            )  # fmt: skip
            self.in_features = in_features
            self.out_features = out_features
            self.parametrization = parametrization
            self.local_reparameterization = local_reparameterization
            scales = parametrization.init_scales(in_features, out_features, self.layer_type)
            core = _initial_params(
                (out_features, in_features), bias, cov, scales, rngs.params(), dtype
            )
            if isinstance(core, GaussianParameter):
                self.params = wrapper(core)
            else:
                self.params = NNXDeterministic(core)

        def _core_params(self) -> GaussianParameter | DeterministicParameter:
            return cast("GaussianParameter | DeterministicParameter", self.params.param)

        def __call__(
            self,
            x: Any,
            sample_shape: Any = (),
            key: Any = None,
            *,
            rngs: Any = None,
            input_contains_samples: bool = False,
            parameter_samples: Mapping[str, Any] | None = None,
        ) -> Any:
            return self._forward(
                x, sample_shape, _nnx_key(key, rngs), input_contains_samples, parameter_samples
            )

    class NNXSequential(_Sampled, nnx.Module):  # type: ignore[misc,unused-ignore]
        def __init__(self, *layers: Any) -> None:
            self.layers = nnx.List(layers)

        @property
        def stochastic(self) -> bool:
            """Whether any layer draws parameters."""
            return any(isinstance(m, _Sampled) and m.stochastic for m in self.layers)

        def __getitem__(self, index: int) -> Any:
            return self.layers[index]

        def __len__(self) -> int:
            return len(self.layers)

        def __call__(
            self,
            x: Any,
            sample_shape: Any = (),
            key: Any = None,
            *,
            rngs: Any = None,
            input_contains_samples: bool = False,
        ) -> Any:
            return _sequential_forward(
                list(self.layers), x, sample_shape, _nnx_key(key, rngs), input_contains_samples
            )

    def nnx_conv(n: int) -> type[Any]:
        class NNXConv(_ConvMethods, nnx.Module):  # type: ignore[misc,unused-ignore]
            _spatial = n

            def __init__(
                self,
                in_channels: int,
                out_channels: int,
                kernel_size: Any,
                stride: Any = 1,
                padding: Any = 0,
                dilation: Any = 1,
                groups: int = 1,
                bias: bool = True,
                padding_mode: str = "zeros",
                layer_type: LayerType = "hidden",
                cov: Any = None,
                parametrization: Parametrization = Standard(),  # noqa: B008 -- immutable
                *,
                rngs: Any,
                dtype: Any = None,
            ) -> None:
                self.layer_type, geometry = _check_conv_arguments(
                    n, in_channels, out_channels, kernel_size, stride, padding, dilation,
                    groups, padding_mode, layer_type, cov, parametrization,
                )  # fmt: skip
                self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
                self.kernel_size = geometry["kernel_size"]
                self.stride = geometry["stride"]
                self.padding = geometry["padding"]
                self.dilation = geometry["dilation"]
                self.parametrization = parametrization
                scales = parametrization.init_scales(*self._fans(), self.layer_type)
                shape = (out_channels, in_channels // groups, *self.kernel_size)
                core = _initial_params(shape, bias, cov, scales, rngs.params(), dtype)
                if isinstance(core, GaussianParameter):
                    self.params = wrapper(core)
                else:
                    self.params = NNXDeterministic(core)

            def _core_params(self) -> GaussianParameter | DeterministicParameter:
                return cast("GaussianParameter | DeterministicParameter", self.params.param)

            def __call__(
                self,
                x: Any,
                sample_shape: Any = (),
                key: Any = None,
                *,
                rngs: Any = None,
                input_contains_samples: bool = False,
                parameter_samples: Mapping[str, Any] | None = None,
            ) -> Any:
                return self._forward(
                    x, sample_shape, _nnx_key(key, rngs), input_contains_samples,
                    parameter_samples,
                )  # fmt: skip

        NNXConv.__doc__ = _CONV_DOC.format(
            n=n,
            cls=f"NNXConv{n}d",
            kind="a Flax ``nnx.Module``",
            storage=(
                "``params`` is an `NNXGaussian` or, for ``cov=None``, a module with\n"
                "    ``params.mean[name]`` only (as in `NNXLinear`). The call also takes\n"
                "    ``rngs=`` (an ``nnx.Rngs``) instead of ``key``: one key ``rngs.sample()``."
            ),
            key="rngs=rngs",
        )
        return NNXConv

    conv_classes = {f"NNXConv{n}d": nnx_conv(n) for n in (1, 2, 3)}

    NNXLinear.__doc__ = _LINEAR_DOC.format(
        kind="a Flax ``nnx.Module``",
        storage=(
            "``params`` is an `NNXGaussian` (``params.mean[name]`` and\n"
            "    ``params.cov[path]`` are ``nnx.Param`` s with ``lr_scaling`` metadata) or,\n"
            "    for ``cov=None``, a module with ``params.mean[name]`` only. The call also\n"
            "    takes ``rngs=`` (an ``nnx.Rngs``) instead of ``key``: it draws one key\n"
            "    ``rngs.sample()`` (the ``sample`` stream, else ``default``)."
        ),
        key=(
            "rngs\n        An ``nnx.Rngs``; the initial draws use one key ``rngs.params()``\n"
            "        (NNX convention)."
        ),
    )
    NNXSequential.__doc__ = _SEQUENTIAL_DOC.format(
        kind="a Flax ``nnx.Module``, ``NNXSequential(*layers)``",
        extra=(
            " With ``rngs=`` instead of ``key``, one key ``rngs.sample()`` is drawn and\n"
            "    split the same way."
        ),
    )
    return _finish(
        {
            "NNXLinear": NNXLinear,
            "NNXSequential": NNXSequential,
            "NNXDeterministic": NNXDeterministic,
            **conv_classes,
        }
    )


# ------------------------------------------------------------------ conversion
@functools.cache
def _equinox_converters() -> dict[type, Callable[..., Any]]:
    """Deterministic Equinox layer type -> builder of its structcov layer (with its means)."""
    import equinox as eqx

    return {
        eqx.nn.Linear: _equinox_linear_from,
        eqx.nn.Conv: _equinox_conv_from,
        eqx.nn.Conv1d: _equinox_conv_from,
        eqx.nn.Conv2d: _equinox_conv_from,
        eqx.nn.Conv3d: _equinox_conv_from,
    }


_CONVERTIBLE = "equinox.nn.Linear, equinox.nn.Conv1d/2d/3d"


def _with_means(layer: Any, weight: Any, bias: Any) -> Any:
    """``layer`` with its means replaced by ``weight`` and ``bias`` (the same arrays)."""
    import equinox as eqx

    if bias is None:
        return eqx.tree_at(lambda m: m.params.mean["weight"], layer, weight)
    return eqx.tree_at(
        lambda m: (m.params.mean["weight"], m.params.mean["bias"]), layer, (weight, bias)
    )


def _equinox_linear_from(path: str, module: Any, cov: Any, key: Any, **options: Any) -> Any:
    if "scalar" in (module.in_features, module.out_features):
        raise ValueError(
            f"the equinox.nn.Linear at {path!r} has in_features={module.in_features!r}, "
            f"out_features={module.out_features!r}: structcov layers take (*batch, features) "
            "inputs, not 'scalar' ones"
        )
    layer = _equinox_layer_classes()["EquinoxLinear"](
        module.in_features,
        module.out_features,
        module.use_bias,
        cov=cov,
        key=key,
        dtype=module.weight.dtype,
        **options,
    )
    return _with_means(layer, module.weight, module.bias)


def _equinox_conv_padding(path: str, module: Any) -> str | tuple[int, ...]:
    """An Equinox convolution's padding as structcov's (torch's): symmetric ints or "same"."""
    n, padding = module.num_spatial_dims, module.padding
    where = f"the equinox.nn.Conv{n}d at {path!r}"
    if isinstance(padding, str) and padding != "VALID":  # "SAME" / "SAME_LOWER"
        if any(s != 1 for s in module.stride):
            raise ValueError(
                f"{where} has padding={padding!r} with stride {module.stride}: Equinox then "
                "pads by the input's size, structcov layers need a static padding"
            )
        totals = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation, strict=True)]
        low = [t // 2 if padding == "SAME" else t - t // 2 for t in totals]
        pairs = [(lo, t - lo) for lo, t in zip(low, totals, strict=True)]
    elif isinstance(padding, str):
        pairs = [(0, 0)] * n
    else:
        pairs = [(int(lo), int(hi)) for lo, hi in padding]
    if module.padding_mode != "ZEROS" and any(pair != (0, 0) for pair in pairs):
        raise ValueError(
            f"{where} has padding_mode={module.padding_mode!r}: structcov convolutions pad "
            "with zeros only"
        )
    if all(lo == hi for lo, hi in pairs):
        return tuple(lo for lo, _ in pairs)
    if padding == "SAME":
        return "same"  # d (k - 1) // 2 before, the rest after: Equinox's split
    raise ValueError(
        f"{where} pads asymmetrically ({tuple(pairs)}): structcov convolutions pad the same "
        "amount on both sides (or padding='same')"
    )


def _equinox_conv_from(path: str, module: Any, cov: Any, key: Any, **options: Any) -> Any:
    n = module.num_spatial_dims
    if n not in (1, 2, 3):
        raise ValueError(
            f"the equinox.nn.Conv at {path!r} has {n} spatial dimensions: structcov has "
            "convolution layers for 1, 2 and 3"
        )
    padding = _equinox_conv_padding(path, module)
    layer = _equinox_layer_classes()[f"EquinoxConv{n}d"](
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        module.stride,
        padding,
        module.dilation,
        module.groups,
        module.use_bias,
        cov=cov,
        key=key,
        dtype=module.weight.dtype,
        **options,
    )
    bias = None if module.bias is None else jnp.reshape(module.bias, (module.out_channels,))
    return _with_means(layer, module.weight, bias)


def _key_name(key: Any) -> str:
    for attribute in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _equinox_walk(
    node: Any,
    path: str,
    visit: Callable[[str, Any], Any],
    sequential: Callable[[Any, list[Any]], Any],
) -> Any:
    """``node`` with every convertible layer ``m`` at ``path`` replaced by ``visit(path, m)``
    and every ``equinox.nn.Sequential`` ``s`` by ``sequential(s, converted layers)``, in
    pytree order. Paths join attribute names, sequence indices and dict keys with ``"."``;
    the layers of a Sequential are ``"0"``, ``"1"``, ... (as in torch's ``named_modules``)."""
    import equinox as eqx

    converters = _equinox_converters()

    def stop(x: Any) -> bool:
        return type(x) in converters or type(x) is eqx.nn.Sequential

    def join(name: str) -> str:
        return f"{path}.{name}" if path else name

    if type(node) in converters:
        return visit(path, node)
    if type(node) is eqx.nn.Sequential:
        layers = [
            _equinox_walk(layer, join(str(i)), visit, sequential)
            for i, layer in enumerate(node.layers)
        ]
        return sequential(node, layers)
    pairs, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=stop)
    if not any(stop(leaf) for _, leaf in pairs):
        return node
    leaves = [
        _equinox_walk(leaf, join(".".join(_key_name(k) for k in keys)), visit, sequential)
        if stop(leaf)
        else leaf
        for keys, leaf in pairs
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def bayesian(
    model: Any,
    cov: StructuredCovariance | Callable[[], StructuredCovariance] | None,
    *,
    key: Any,
    only: Iterable[str] | Callable[[str, Any], bool] | None = None,
    parametrization: Parametrization = Standard(),  # noqa: B008 -- immutable
) -> Any:
    """A Bayesian copy of a deterministic Equinox ``model``: its layers with Gaussian parameters.

    The counterpart of ``structcov.torch.bayesian``. Every ``equinox.nn.Linear`` (and
    ``equinox.nn.Conv1d/2d/3d``) selected by ``only`` becomes the structcov layer of the
    same shape (`EquinoxLinear`, ``EquinoxConv1d/2d/3d``) with a covariance from ``cov``
    (a zero-argument callable, called once per layer, or one covariance object for a
    single layer), its means the model's weight and bias (the same arrays; a convolution's
    bias ``(out, 1, ...)`` becomes ``(out,)``) and its covariance reset at the
    parametrization's scales, as the layer constructors do. ``cov=None`` makes them
    deterministic structcov layers. Every ``equinox.nn.Sequential`` becomes an
    `EquinoxSequential` (so ``sample_shape`` and ``key`` reach the layers; other layers
    such as ``equinox.nn.Lambda(jax.nn.relu)`` are kept and called as ``f(x)``).
    ``model`` is not changed (Equinox modules are immutable; the arrays are shared).

    Unlike torch, an unselected convertible layer becomes a *deterministic* structcov
    layer (``cov=None``) with the same weights, not the Equinox layer itself: Equinox
    layers take one example (``(in_features,)``), structcov layers take
    ``(*sample_shape, *batch, in_features)``, so only that keeps the converted model's
    batched and sampled forwards working.

    ``only``: ``None`` selects every convertible layer; an iterable of paths (attribute
    names, sequence indices and dict keys joined by ``"."``; the layers of a Sequential
    are ``"0"``, ``"1"``, ..., e.g. ``["fc"]``, ``["body.2"]``, or ``["4"]`` for the last
    layer of a Sequential) or a predicate ``(path, layer) -> bool`` selects some. A path
    that names no convertible layer raises ``ValueError``. Layer types for the
    parametrization: the first selected layer in model (pytree) order is ``"input"``, the
    last ``"output"`` (a single one: ``"output"``), the rest ``"hidden"``; an unselected
    layer gets the type of its position among all convertible layers.

    ``key``: a JAX PRNG key, split once per convertible layer in model order
    (``jax.random.split(key, n)``); layer ``i`` is built with ``keys[i]``, so its
    covariance starts as that of the layer constructor with that key.

    Convolutions must pad with zeros, symmetrically or as ``"SAME"`` at stride 1
    (``ValueError`` otherwise). Layers inside your own ``equinox.Module`` are called by
    its ``__call__``: ``layer(x, key=k)`` is one parameter draw (``sample_shape=()``),
    ``layer(x, None)`` the mean. Imports equinox (``ImportError`` without it).
    """
    nnx_module = _nnx_module_type()
    if nnx_module is not None and isinstance(model, nnx_module):
        raise TypeError(
            "`model` is a Flax NNX module: structcov.jax.bayesian converts Equinox models "
            "(build NNX models from NNXLinear / NNXConv / NNXSequential directly)"
        )
    if key is None:
        raise TypeError("`key` must be a JAX PRNG key (e.g. jax.random.key(0)), got None")
    found: list[tuple[str, Any]] = []

    def record(path: str, layer: Any) -> Any:
        found.append((path, layer))
        return layer

    _equinox_walk(model, "", record, lambda s, layers: s)
    if only is None:
        selected = [path for path, _ in found]
    elif callable(only):
        selected = [path for path, layer in found if only(path, layer)]
    else:
        wanted = list(only)
        paths = [path for path, _ in found]
        unknown = [path for path in wanted if path not in paths]
        if unknown:
            raise ValueError(
                f"`only` names no convertible layer ({_CONVERTIBLE}) at {unknown}; "
                f"the convertible layers are at {paths}"
            )
        selected = [path for path in paths if path in set(wanted)]
    if not selected:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no layer to convert ({_CONVERTIBLE}) "
            "among the selected ones"
        )
    if isinstance(cov, StructuredCovariance) and len(selected) > 1:
        raise ValueError(
            f"one covariance object belongs to one layer, but {len(selected)} layers are "
            "selected: pass a zero-argument callable (e.g. structcov.DiagonalCovariance)"
        )
    order = [path for path, _ in found]
    types: dict[str, LayerType] = {path: "hidden" for path in order}
    types[order[0]], types[order[-1]] = "input", "output"
    types.update({path: "hidden" for path in selected})
    types[selected[0]] = "input"
    types[selected[-1]] = "output"
    keys = dict(zip(order, jax.random.split(key, len(order)), strict=True))
    chosen = set(selected)
    sequential_class = _equinox_layer_classes()["EquinoxSequential"]

    def convert(path: str, layer: Any) -> Any:
        return _equinox_converters()[type(layer)](
            path,
            layer,
            cov if path in chosen else None,
            keys[path],
            layer_type=types[path],
            parametrization=parametrization,
        )

    return _equinox_walk(model, "", convert, lambda s, layers: sequential_class(*layers))


_LAZY_CLASSES: dict[str, Callable[[], type[Any]]] = {
    "EquinoxGaussian": _equinox_class,
    "NNXGaussian": _nnx_class,
    "EquinoxLinear": lambda: _equinox_layer_classes()["EquinoxLinear"],
    "EquinoxSequential": lambda: _equinox_layer_classes()["EquinoxSequential"],
    "NNXLinear": lambda: _nnx_layer_classes()["NNXLinear"],
    "NNXSequential": lambda: _nnx_layer_classes()["NNXSequential"],
    **{
        f"{system}Conv{n}d": functools.partial(
            lambda classes, name: classes()[name], factory, f"{system}Conv{n}d"
        )
        for system, factory in (
            ("Equinox", _equinox_layer_classes),
            ("NNX", _nnx_layer_classes),
        )
        for n in (1, 2, 3)
    },
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
    then an all-reduce), which automatic sharding picks by itself. 1-D operands as in
    ``matmul`` (a dot product of two vectors is 0-D, replicated)."""
    spec_a, spec_b = _spec(a), _spec(b)
    if spec_a[-1] is None or spec_b[-2 if b.ndim > 1 else -1] is None:
        return jax.numpy.matmul(a, b)
    batch_a, batch_b = spec_a[:-2], spec_b[:-2]  # empty for a 1-D operand
    batch = max(len(batch_a), len(batch_b))
    pad_a = (None,) * (batch - len(batch_a)) + batch_a
    pad_b = (None,) * (batch - len(batch_b)) + batch_b
    out = tuple(x if x is not None else y for x, y in zip(pad_a, pad_b, strict=True))
    rows = spec_a[-2:-1] if a.ndim > 1 else ()
    columns = spec_b[-1:] if b.ndim > 1 else ()
    return jax.numpy.matmul(a, b, out_sharding=_PartitionSpec(*out, *rows, *columns))


def _one_piece(a: Any, axes: tuple[int, ...]) -> Any:
    """``a`` with ``axes`` whole on every device (an all-gather, of a small matrix)."""
    spec = _spec(a)
    if all(spec[axis] is None for axis in axes):
        return a
    whole = tuple(None if axis in axes else s for axis, s in enumerate(spec))
    return _reshard(a, _PartitionSpec(*whole))


_linalg.register_override("jax", "matmul", _sharded_matmul)
_linalg.register_override("jax", "one_piece", _one_piece)
