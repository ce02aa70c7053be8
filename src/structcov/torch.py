"""PyTorch adapter: a ``GaussianParameter`` that is a ``torch.nn.Module``.

Storage and glue only; every operation delegates to the core. The means and the
covariance storage are ``nn.Parameter`` s with stable names, in insertion order:

- ``mean.<name>`` for each mean (``None`` entries are registered as ``None``),
- ``cov.<storage>.<name>`` for per-name storage (``cov.factor.weight``,
  ``cov.scale.bias``, ``cov.input_factor.weight``) and ``cov.<storage>`` for a
  single array (``cov.output_factor``) — the paths of ``cov.lr_scaling``.

The module owns its arrays: every operation reads the module's current
parameters and calls the core's pure functions (`structcov.functional`) with the
frozen structure (``q.cov.structure``). There is no shared core object to keep in
sync, so ``.to()``, ``load_state_dict``, ``torch.func.functional_call`` and
``vmap`` over stacked states all see what they expect. The core covariance passed
to the constructor gives its structure and current storage (copied into
``nn.Parameter`` s) and then belongs to this module: use ``q.cov`` afterwards.

Layers (`Linear`, `Sequential`) are thin modules around the core's functional
`structcov.linear`; `kl_divergence(model, prior)` sums over every
`GaussianParameter` of a model and `predictive` stacks or averages sampled outputs.

Example::

    q = structcov.torch.GaussianParameter(
        {"weight": torch.zeros(8, 4), "bias": torch.zeros(8)},
        structcov.LowRankPlusDiagonalCovariance(rank=2),
    )
    q.cov.reset_parameters(0.1, generator=torch.Generator().manual_seed(0))
    prior = structcov.torch.normal_prior(q, 1.0)
    loss = structcov.torch.kl_divergence(q, prior)
    loss.backward()
"""

from __future__ import annotations

import copy as _copy
import numbers
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, cast

import torch
from torch import nn

from . import functional as _functional
from . import gaussian as _gaussian
from .convolution import conv as _conv
from .covariances import CovarianceMethods, StructuredCovariance
from .covariances._structure import Storage, Structure
from .functional import sample_shape_of
from .layers import deterministic_forward as _deterministic_forward
from .layers import linear as _linear
from .parametrizations import LayerType, Parametrization, Standard, check_layer_type, fans

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Covariance",
    "DeterministicParameter",
    "GaussianParameter",
    "Linear",
    "Sequential",
    "bayesian",
    "kl_divergence",
    "normal_prior",
    "param_groups",
    "predictive",
]


def _as_parameter(value: torch.Tensor) -> nn.Parameter:
    return value if isinstance(value, nn.Parameter) else nn.Parameter(value)


class NamedParameters(nn.Module):
    """Parameters by mean name, in insertion order, readable like a mapping.

    ``holder["weight"]`` is the ``nn.Parameter``; iteration gives the names.
    (``nn.ParameterDict`` is avoided: built from a dict it may sort its keys.)
    """

    def __getitem__(self, name: str) -> nn.Parameter | None:
        return self._parameters[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parameters)

    def __len__(self) -> int:
        return len(self._parameters)

    def __contains__(self, name: object) -> bool:
        return name in self._parameters

    def keys(self) -> Any:
        return self._parameters.keys()

    def values(self) -> Any:
        return self._parameters.values()

    def items(self) -> Any:
        return self._parameters.items()

    def get(self, name: str, default: Any = None) -> Any:
        return self._parameters.get(name, default)


# A read-only mapping name -> parameter (not a Mapping subclass: Mapping's __eq__ would
# make modules unhashable), so core functions take it wherever they take a mapping.
Mapping.register(NamedParameters)


class Covariance(CovarianceMethods, nn.Module):
    """A covariance's storage as ``nn.Parameter`` s and its frozen structure.

    Parameters are named by storage path (``factor.weight`` is
    ``self.factor["weight"]``, ``output_factor`` is ``self.output_factor``). The
    seed API's operations (``rank``, ``logdet()``, ``solve(x)``,
    ``reset_parameters(...)``, ...) call the core's pure functions with the current
    parameters.
    """

    def __init__(
        self,
        structure: Structure,
        storage: Storage,
        origin: tuple[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self._frozen = structure
        # The core class and its constructor configuration (requested ranks, settings)
        # this module was built from: what a checkpoint needs to rebuild the same object.
        name, config = origin if origin is not None else (None, structure.config())
        self._covariance_class: str | None = name
        self._origin_config = dict(config)
        for path in structure.paths:
            array = cast(torch.Tensor, storage[path])
            attribute, _, name = path.partition(".")
            if name:
                if attribute not in self._modules:
                    self.add_module(attribute, NamedParameters())
                self._holder(attribute).register_parameter(name, _as_parameter(array))
            else:
                self.register_parameter(attribute, _as_parameter(array))

    @property
    def structure(self) -> Structure:
        """The frozen structure (layout, clamped ranks, ``sample_scale``)."""
        return self._frozen

    def _holder(self, attribute: str) -> NamedParameters:
        return cast(NamedParameters, self._modules[attribute])

    def _parameter(self, path: str) -> torch.Tensor:
        attribute, _, name = path.partition(".")
        found = self._holder(attribute)[name] if name else self._parameters[attribute]
        return cast(torch.Tensor, found)

    def _ops_storage(self) -> Storage:
        return self.storage()

    def storage(self) -> dict[str, torch.Tensor]:
        """The parameters by storage path, in slot order (the tensors themselves)."""
        return {path: self._parameter(path) for path in self._frozen.paths}

    def load_storage(self, arrays: Mapping[str, torch.Tensor]) -> None:
        """Copy ``arrays`` (path -> tensor, every path once) into the parameters.

        Validated as a whole first (paths, shapes, one namespace, dtype and device).
        """
        checked = _functional.check_storage(self._frozen, arrays)
        with torch.no_grad():
            for path, value in checked.items():
                self._parameter(path).copy_(cast(torch.Tensor, value))

    def reset_parameters(
        self, mean_parameter_scales: Mapping[str, float] | float = 1.0, generator: Any = None
    ) -> None:
        """Draw new values (see the core ``reset_parameters``), copied into the parameters."""
        drawn = _functional.draw_storage(
            self._frozen, self._ops_storage(), mean_parameter_scales, generator
        )
        with torch.no_grad():
            for path, value in drawn.items():
                self._parameter(path).copy_(cast(torch.Tensor, value))

    def _setting(self, key: str) -> Any:
        config = self._frozen.config()
        if key not in config:
            raise AttributeError(f"{type(self._frozen).__name__} has no {key!r}")
        return config[key]

    @property
    def rank(self) -> int:
        """The seed API's ``rank`` (for Kronecker, input_rank * output_rank)."""
        return cast(int, getattr(self._frozen, "rank"))  # noqa: B009 -- not on every structure

    @property
    def input_rank(self) -> int:
        """Kronecker only: the columns of S_in."""
        return cast(int, self._setting("input_rank"))

    @property
    def output_rank(self) -> int:
        """Kronecker only: the columns of S_out."""
        return cast(int, self._setting("output_rank"))

    @property
    def sample_scale(self) -> float:
        """Kronecker only: the float multiplying S; validated when set."""
        return cast(float, self._setting("sample_scale"))

    @sample_scale.setter
    def sample_scale(self, value: float) -> None:
        config = dict(self._frozen.config())
        if "sample_scale" not in config:
            raise AttributeError(
                f"{type(self._frozen).__name__} has no 'sample_scale' (only Kronecker does)"
            )
        config["sample_scale"] = value
        self._frozen = type(self._frozen).build(self._frozen.layout, **config)
        self._origin_config["sample_scale"] = self._frozen.config()["sample_scale"]

    def _config(self) -> dict[str, Any]:
        """The core constructor's configuration (requested ranks, settings), as
        ``StructuredCovariance._config`` gives it."""
        return dict(self._origin_config)

    def extra_repr(self) -> str:
        return repr(self._frozen)


class GaussianParameter(_gaussian.GaussianMethods, nn.Module):
    """A Gaussian-distributed parameter as an ``nn.Module``: N(mean, cov).

    ``forward(sample_shape=(), generator=None)`` is ``sample``, so
    ``torch.func.functional_call(module, state, (shape,))`` draws with a swapped
    state.

    Parameters
    ----------
    mean
        A mapping name -> tensor (or ``None``), or a bare tensor (``{"mean": t}``).
    cov
        A core covariance, e.g. ``structcov.KroneckerCovariance()``: it is built for
        ``mean`` (storage entries zero: call ``param.cov.reset_parameters(scale,
        generator)``), its arrays become this module's parameters, and it then
        belongs to this module (it cannot be given to another parameter).
    """

    mean: NamedParameters
    cov: Covariance

    def __init__(self, mean: Any, cov: StructuredCovariance) -> None:
        nn.Module.__init__(self)
        core = _gaussian.GaussianParameter(mean, cov)
        dotted = [name for name in core.mean if "." in name or not name]
        if dotted:
            raise ValueError(f"`mean` names must be non-empty and contain no '.', got {dotted}")
        holder = NamedParameters()
        for name, value in core.mean.items():
            holder.register_parameter(name, None if value is None else _as_parameter(value))
        self.mean = holder
        self.cov = Covariance(
            cov.structure, cov._ops_storage(), origin=(type(cov).__name__, cov._config())
        )

    @property
    def names(self) -> tuple[str, ...]:
        """Participating mean names in flat order."""
        return self.cov.structure.layout.names

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> mean shape."""
        layout = self.cov.structure.layout
        return dict(zip(layout.names, layout.shapes, strict=True))

    @property
    def num_params(self) -> int:
        """P, the length of the flat parameter vector."""
        return self.cov.structure.layout.num_params

    def __getitem__(self, name: str) -> nn.Parameter | None:
        return self.mean[name]

    def forward(self, sample_shape: Any = (), generator: Any = None) -> dict[str, torch.Tensor]:
        return cast(dict[str, torch.Tensor], self.sample(sample_shape, generator))


def normal_prior(like: Any, scale: Any = 1.0) -> _gaussian.GaussianParameter:
    """The prior N(0, scale^2 I) over ``like``'s parameters (a core object of tensors).

    Build it once and reuse it: it depends only on ``like``'s shapes, dtype and device.
    """
    return _gaussian.normal_prior(like, scale)


def param_groups(module: nn.Module, lr: float, optimizer: str = "adam") -> list[dict[str, Any]]:
    """Optimizer parameter groups: the layers' parametrizations times each ``lr_scaling``.

    For a structcov layer (`Linear`, `Conv1d`, ...) with learning-rate factors
    ``f = layer.lr_scales(optimizer)`` (its parametrization's, for ``"sgd"`` or
    ``"adam"``): its mean ``name`` gets ``lr * f[name]`` and each covariance array
    ``lr * f["weight"] * cov.lr_scaling[path]`` (a covariance array couples weight and
    bias, see `structcov.parametrizations`). Any other covariance gets
    ``lr * cov.lr_scaling[path]``; every other parameter ``lr``. Parameters with equal
    rates share a group, in the order ``module.parameters()`` first meets them. Use as
    ``torch.optim.Adam(param_groups(model, 1e-3))``; with `Standard` layers only the
    covariances' ``lr_scaling`` acts.
    """
    rates: dict[int, float] = {}
    for submodule in module.modules():  # pre-order: a layer before its covariance
        if isinstance(submodule, _Layer):
            factors = submodule.lr_scales(optimizer)
            for name, value in submodule.params.mean.items():
                if value is not None:
                    rates[id(value)] = lr * factors[name]
            cov = submodule.params.cov
            if cov is not None:
                for path, factor in cov.lr_scaling.items():
                    rates[id(cov._parameter(path))] = lr * factors["weight"] * factor
        elif isinstance(submodule, Covariance):
            for path, factor in submodule.lr_scaling.items():
                rates.setdefault(id(submodule._parameter(path)), lr * factor)
    grouped: dict[float, list[nn.Parameter]] = {}
    for parameter in module.parameters():
        grouped.setdefault(rates.get(id(parameter), lr), []).append(parameter)
    return [{"params": params, "lr": rate} for rate, params in grouped.items()]


# ------------------------------------------------------------------ model-level inference
def _gaussian_modules(module: nn.Module) -> dict[str, GaussianParameter]:
    """Module path -> every `GaussianParameter` in ``module`` (``""`` for itself)."""
    return {
        path: found
        for path, found in module.named_modules()
        # a layer made deterministic by `params.cov = None` takes no part
        if isinstance(found, GaussianParameter) and found.cov is not None
    }


def kl_divergence(q: Any, p: Any) -> torch.Tensor:
    """KL(q || p) for one parameter or summed over a whole model, a 0-D tensor.

    - ``q`` and ``p`` Gaussian parameters (modules of this adapter or core
      ``GaussianParameter`` s): the core's exact KL (see `structcov.kl_divergence`).
    - ``q`` any ``nn.Module`` holding `GaussianParameter` submodules (e.g. a
      `Sequential` of `Linear` layers): the sum of each one's KL. Deterministic
      layers (``cov=None``) take no part.

    ``p`` is then a float ``sigma`` — each parameter's prior is N(0, sigma^2 I), the
    value of ``normal_prior(q_i, sigma)`` computed without building it — or a model of
    the same layout, whose `GaussianParameter` s are paired with ``q`` 's by module
    path (the same paths on both sides, else ``ValueError``).
    """
    if isinstance(q, _gaussian.GaussianMethods) and not _is_scale(p):
        return cast(torch.Tensor, _gaussian.kl_divergence(q, p))
    if isinstance(q, _gaussian.GaussianMethods):
        return cast(torch.Tensor, _gaussian.kl_divergence(q, p))
    if not isinstance(q, nn.Module):
        raise TypeError(
            "`q` must be a structcov GaussianParameter or an nn.Module holding "
            f"structcov.torch.GaussianParameter submodules, got {type(q).__name__}"
        )
    q_parts = _gaussian_modules(q)
    if not q_parts:
        raise ValueError(
            f"`q` ({type(q).__name__}) holds no structcov.torch.GaussianParameter "
            "(a model of deterministic layers has no KL)"
        )
    if _is_scale(p):
        terms = [_gaussian.kl_divergence(part, p) for part in q_parts.values()]
    elif isinstance(p, nn.Module):
        p_parts = _gaussian_modules(p)
        if set(p_parts) != set(q_parts):
            raise ValueError(
                "`p` must hold GaussianParameters at the same module paths as `q`: "
                f"expected {sorted(q_parts)}, got {sorted(p_parts)}"
            )
        terms = [_gaussian.kl_divergence(part, p_parts[path]) for path, part in q_parts.items()]
    else:
        raise TypeError(
            "`p` must be a float prior scale (N(0, p^2 I)) or a model of the same layout as "
            f"`q`, got {type(p).__name__}"
        )
    return torch.stack([cast(torch.Tensor, t) for t in terms]).sum()


def _is_scale(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def predictive(
    model: nn.Module,
    x: torch.Tensor,
    sample_shape: Any = (),
    generator: torch.Generator | None = None,
    *,
    probabilities: bool = False,
) -> torch.Tensor:
    """The model's outputs over parameter samples, stacked or as averaged probabilities.

    ``model(x, sample_shape, generator)`` must follow the layers' forward (`Linear`,
    `Sequential`). Returns the stacked outputs ``(*sample_shape, *batch, out)``, or
    with ``probabilities=True`` the Monte Carlo predictive
    ``mean_s softmax(y_s)`` of shape ``(*batch, out)`` (softmax over the last axis,
    averaged over the sample axes). ``sample_shape=None`` uses the means (the
    softmax of the mean forward with ``probabilities=True``). Gradients flow as
    usual: wrap in ``torch.no_grad()`` for evaluation.
    """
    shape = None if sample_shape is None else sample_shape_of(sample_shape)
    out = cast(torch.Tensor, model(x, shape, generator))
    if not probabilities:
        return out
    probs = torch.softmax(out, dim=-1)
    if not shape:
        return probs
    return probs.mean(dim=tuple(range(len(shape))))


# ------------------------------------------------------------------ layers
class DeterministicParameter(nn.Module):
    """The means of a deterministic layer (``cov=None``): ``mean.<name>``, ``cov`` is None.

    Laid out like `GaussianParameter` (the same ``mean.<name>`` state-dict keys, ``None``
    entries registered as ``None``) so a layer's state dict has the same mean keys with
    or without a covariance. It takes no part in `kl_divergence` or `param_groups`
    scaling.
    """

    mean: NamedParameters
    cov: None

    def __init__(self, mean: Mapping[str, torch.Tensor | None]) -> None:
        super().__init__()
        holder = NamedParameters()
        for name, value in mean.items():
            holder.register_parameter(name, None if value is None else _as_parameter(value))
        self.mean = holder
        self.cov = None

    @property
    def names(self) -> tuple[str, ...]:
        """The participating (non-``None``) mean names."""
        return tuple(name for name, value in self.mean.items() if value is not None)

    def __getitem__(self, name: str) -> nn.Parameter | None:
        return self.mean[name]


class _Sampled(nn.Module):
    """A layer whose forward takes ``(input, sample_shape, generator, ...)`` (see `Sequential`)."""

    @property
    def stochastic(self) -> bool:
        """Whether a forward draws parameters (a deterministic layer only replicates)."""
        raise NotImplementedError


CovarianceSpec = StructuredCovariance | Callable[[], StructuredCovariance] | None


def _core_covariance(cov: StructuredCovariance | Callable[[], StructuredCovariance]) -> Any:
    core = cov if isinstance(cov, StructuredCovariance) else cov()
    if not isinstance(core, StructuredCovariance):
        raise TypeError(
            "`cov` must be None, a structcov covariance (e.g. "
            "structcov.KroneckerCovariance()) or a zero-argument callable returning "
            f"one, got {type(core).__name__}"
        )
    return core


class _Layer(_Sampled):
    """What `Linear` and the convolutions share: ``params``, the parametrization and its
    initialisation, learning-rate scales, ``nn.Linear`` / ``nn.Conv*`` state dicts."""

    params: GaussianParameter | DeterministicParameter

    def _build(
        self,
        mean: dict[str, torch.Tensor | None],
        cov: CovarianceSpec,
        layer_type: LayerType,
        parametrization: Parametrization,
    ) -> None:
        self.layer_type = check_layer_type(layer_type)
        if not isinstance(parametrization, Parametrization):
            raise TypeError(
                "`parametrization` must be a structcov.parametrizations.Parametrization "
                "(Standard(), NeuralTangent(), MaximalUpdate()), got "
                f"{type(parametrization).__name__}"
            )
        self.parametrization = parametrization
        if cov is None:
            self.params = DeterministicParameter(mean)
        else:
            self.params = GaussianParameter(mean, _core_covariance(cov))
        self.reset_parameters()

    @property
    def stochastic(self) -> bool:
        """Whether the layer has a covariance (``params.cov`` is not ``None``).

        Setting ``layer.params.cov = None`` makes the layer deterministic (its forward
        then uses the means, as with ``cov=None``).
        """
        return self.params.cov is not None

    @property
    def weight(self) -> nn.Parameter:
        """The weight mean, ``params.mean.weight``."""
        return cast(nn.Parameter, self.params.mean["weight"])

    @property
    def bias(self) -> nn.Parameter | None:
        """The bias mean, ``params.mean.bias`` (``None`` without bias)."""
        return self.params.mean["bias"]

    def _fans(self) -> tuple[int, int]:
        return fans(tuple(self.weight.shape))

    def init_scales(self) -> dict[str, float]:
        """The parametrization's initial stds ``{"weight": ..., "bias": ...}`` for this layer."""
        return self.parametrization.init_scales(*self._fans(), self.layer_type)

    def lr_scales(self, optimizer: str = "adam") -> dict[str, float]:
        """The parametrization's learning-rate factors ``{"weight": ..., "bias": ...}``."""
        return self.parametrization.lr_scales(*self._fans(), optimizer, self.layer_type)

    def reset_parameters(self) -> None:
        """Means N(0, init_scale^2) by name, then the covariance at the same per-name scales.

        The scales are the parametrization's (`init_scales`); the draws come from
        torch's global RNG (as ``nn.Linear`` 's), the covariance's through its
        ``reset_parameters(scales)``: each structure sets its stds from them (e.g.
        scale / sqrt(rank) per factor, the scale itself for a diagonal), never zero.
        """
        scales = self.init_scales()
        with torch.no_grad():
            for name, value in self.params.mean.items():
                if value is not None:
                    value.normal_(0.0, scales[name])
        if self.params.cov is not None:
            self.params.cov.reset_parameters(
                {name: scales[name] for name in self.params.cov.structure.layout.names},
                generator=None,
            )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # An nn.Linear / nn.Conv* state dict: `weight` / `bias` become the means; the
        # covariance keys it lacks are filled with the current values, so strict loading
        # passes.
        if f"{prefix}weight" in state_dict:
            for name in ("weight", "bias"):
                if f"{prefix}{name}" in state_dict:
                    state_dict[f"{prefix}params.mean.{name}"] = state_dict.pop(f"{prefix}{name}")
            if self.params.cov is not None:
                for key, value in self.params.cov.state_dict(keep_vars=True).items():
                    state_dict.setdefault(f"{prefix}params.cov.{key}", value.detach())
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _repr_tail(self) -> str:
        text = ""
        if self.layer_type != "hidden":
            text += f", layer_type={self.layer_type!r}"
        if not isinstance(self.parametrization, Standard):
            text += f", parametrization={self.parametrization!r}"
        return text if self.stochastic else text + ", cov=None"


class Linear(_Layer):
    r"""A dense layer ``y = x W^T + b`` with Gaussian (or fixed) parameters.

    Thin glue around `structcov.linear`: the layer owns ``params`` and calls
    ``structcov.linear(input, self.params, ...)`` for every forward, so the
    structure-aware evaluation and its costs are the core's.

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
        callable returning one (``structcov.DiagonalCovariance``, ``lambda:
        structcov.LowRankPlusDiagonalCovariance(2)``), called once for this layer.
        A covariance object belongs to one parameter: passing one that another layer
        already uses raises ``ValueError`` (pass a callable to build one per layer).
    parametrization
        A `structcov.parametrizations.Parametrization`: ``Standard()`` (the default),
        ``NeuralTangent()`` or ``MaximalUpdate()`` (the seed's default). It sets the
        initial stds of the means and the covariance (`reset_parameters`) and the
        learning-rate factors `param_groups` applies.
    local_reparameterization
        `structcov.DiagonalCovariance` only: draw output noise instead of weights
        (see `structcov.linear`: it changes the joint distribution across the batch).
    device, dtype
        Where and in which dtype the parameters are created.

    Attributes
    ----------
    params
        A `GaussianParameter` (or a `DeterministicParameter` for ``cov=None``) with means
        ``weight`` ``(out_features, in_features)`` and ``bias`` ``(out_features,)``
        (``None`` without bias): state-dict keys ``params.mean.weight``,
        ``params.mean.bias``, ``params.cov.<storage path>``.

    Notes
    -----
    ``load_state_dict`` also accepts a ``torch.nn.Linear`` state dict (keys
    ``weight``, ``bias``): it sets the means and keeps the covariance as it is
    (strict loading passes).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        layer_type: LayerType = "hidden",
        cov: CovarianceSpec = None,
        parametrization: Parametrization = Standard(),  # noqa: B008 -- immutable
        *,
        local_reparameterization: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for argument, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{argument}` must be an int >= 1, got {value!r}")
        if cov is None and local_reparameterization:
            raise ValueError("`local_reparameterization=True` needs a covariance, got cov=None")
        self.in_features = in_features
        self.out_features = out_features
        self.local_reparameterization = local_reparameterization
        factory = {"device": device, "dtype": dtype}
        mean: dict[str, torch.Tensor | None] = {
            "weight": torch.empty(out_features, in_features, **factory),
            "bias": torch.empty(out_features, **factory) if bias else None,
        }
        self._build(mean, cov, layer_type, parametrization)

    def forward(
        self,
        input: torch.Tensor,
        /,
        sample_shape: Any = (),
        generator: torch.Generator | None = None,
        input_contains_samples: bool = False,
        parameter_samples: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``(*sample_shape, *batch, out_features)`` from ``(*batch, in_features)``.

        See `structcov.linear` for the arguments: one parameter draw per sample index,
        shared by the batch; ``sample_shape=None`` gives the mean forward ``(*batch,
        out_features)``; ``input_contains_samples=True`` takes an input
        ``(*sample_shape, *batch, in_features)``; ``parameter_samples`` uses given
        samples instead of drawing.

        A deterministic layer (``cov=None``) computes ``x W^T + b`` once; a
        ``sample_shape`` only adds leading axes, replicated (a broadcast view of the
        one result: clone it before writing in place). It takes no
        ``parameter_samples``.
        """
        if self.params.cov is not None:
            return cast(
                torch.Tensor,
                _linear(
                    input,
                    self.params,
                    sample_shape,
                    generator,
                    input_contains_samples=input_contains_samples,
                    parameter_samples=parameter_samples,
                    local_reparameterization=self.local_reparameterization,
                ),
            )
        out = nn.functional.linear(input, self.weight, self.bias)
        return _deterministic_forward(
            out, input, sample_shape, input_contains_samples, parameter_samples
        )

    def extra_repr(self) -> str:
        bias = self.params.mean["bias"] is not None
        text = f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"
        if self.local_reparameterization:
            text += ", local_reparameterization=True"
        return text + self._repr_tail()


def _tuple(value: Any, n: int, argument: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    if (
        isinstance(value, tuple)
        and len(value) == n
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return value
    raise ValueError(f"`{argument}` must be an int or a tuple of {n} ints, got {value!r}")


class _ConvNd(_Layer):
    """A convolution layer with Gaussian (or fixed) parameters; see `Conv2d`."""

    _spatial: int

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
        cov: CovarianceSpec = None,
        parametrization: Parametrization = Standard(),  # noqa: B008 -- immutable
        *,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n = self._spatial
        for argument, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("groups", groups),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{argument}` must be an int >= 1, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"`groups` ({groups}) must divide in_channels ({in_channels}) and "
                f"out_channels ({out_channels})"
            )
        if padding_mode != "zeros":
            raise ValueError(
                f"`padding_mode` must be 'zeros' (the only mode structcov.conv has), got "
                f"{padding_mode!r}: pad the input yourself (torch.nn.functional.pad) and "
                "use padding=0"
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _tuple(kernel_size, n, "kernel_size")
        self.stride = _tuple(stride, n, "stride")
        self.dilation = _tuple(dilation, n, "dilation")
        self.padding = padding if isinstance(padding, str) else _tuple(padding, n, "padding")
        self.padding_mode = padding_mode
        factory = {"device": device, "dtype": dtype}
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        mean: dict[str, torch.Tensor | None] = {
            "weight": torch.empty(shape, **factory),
            "bias": torch.empty(out_channels, **factory) if bias else None,
        }
        self._build(mean, cov, layer_type, parametrization)

    def forward(
        self,
        input: torch.Tensor,
        /,
        sample_shape: Any = (),
        generator: torch.Generator | None = None,
        input_contains_samples: bool = False,
        parameter_samples: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``(*sample_shape, *batch, C_out, *spatial_out)`` from ``(*batch, C_in, *spatial)``.

        See `structcov.conv` for the arguments and the cost per structure (Kronecker:
        one convolution with the input factor, then rank-sized products per sample).
        A deterministic layer (``params.cov`` is ``None``) convolves once with the
        means; ``sample_shape`` then only adds replicated leading axes.
        """
        options: dict[str, Any] = {
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "groups": self.groups,
        }
        if self.params.cov is not None:
            return cast(
                torch.Tensor,
                _conv(
                    input,
                    self.params,
                    sample_shape,
                    generator,
                    input_contains_samples=input_contains_samples,
                    parameter_samples=parameter_samples,
                    **options,
                ),
            )
        conv_nd = (nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d)
        item = input.shape[input.ndim - self._spatial - 1 :]  # (C_in, *spatial)
        out = conv_nd[self._spatial - 1](
            input.reshape(-1, *item), self.weight, self.bias, **options
        )  # the means, once, with torch's own convolution
        out = out.reshape(*input.shape[: input.ndim - len(item)], *out.shape[1:])
        return _deterministic_forward(
            out, input, sample_shape, input_contains_samples, parameter_samples
        )

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding != (0,) * self._spatial:
            text += f", padding={self.padding}"
        if self.dilation != (1,) * self._spatial:
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.params.mean["bias"] is None:
            text += ", bias=False"
        return text + self._repr_tail()


_CONV_DOC = """A {n}-D convolution layer with Gaussian (or fixed) parameters (as ``nn.Conv{n}d``).

    ``Conv{n}d(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
    groups=1, bias=True, padding_mode="zeros", layer_type="hidden", cov=None,
    parametrization=Standard(), *, device=None, dtype=None)``: the seed's signature.
    ``params`` holds the means ``weight`` ``(out_channels, in_channels / groups,
    *kernel_size)`` and ``bias`` ``(out_channels,)`` and the covariance; ``cov``,
    ``layer_type`` and ``parametrization`` as for `Linear` (fan_in = in_channels /
    groups * prod(kernel_size)). Every forward is `structcov.conv` on ``params``:
    ``forward(input, /, sample_shape=(), generator=None, input_contains_samples=False,
    parameter_samples=None)`` -> ``(*sample_shape, *batch, out_channels, *spatial_out)``
    with input ``(*batch, in_channels, *spatial)``; ``sample_shape=None`` is the mean
    forward. Only ``padding_mode="zeros"``. ``load_state_dict`` also takes a
    ``torch.nn.Conv{n}d`` state dict (its ``weight`` and ``bias`` become the means).
    """


class Conv1d(_ConvNd):
    _spatial = 1
    __doc__ = _CONV_DOC.format(n=1)


class Conv2d(_ConvNd):
    _spatial = 2
    __doc__ = _CONV_DOC.format(n=2)


class Conv3d(_ConvNd):
    _spatial = 3
    __doc__ = _CONV_DOC.format(n=3)


class Sequential(nn.Sequential, _Sampled):
    """``nn.Sequential`` that passes ``sample_shape`` and ``generator`` to structcov layers.

    ``forward(input, /, sample_shape=(), generator=None, input_contains_samples=False)``:
    the first stochastic layer (a `Linear` with a covariance, or a nested `Sequential`
    holding one) draws with ``sample_shape`` and returns ``(*sample_shape, *batch,
    out)``; every later structcov layer gets ``input_contains_samples=True`` and
    draws its own parameters for each sample index. Layers draw from ``generator``
    in order. Deterministic structcov layers before the first stochastic one run
    once (no sample axes yet); if no layer is stochastic the output is replicated
    over ``sample_shape`` at the end (a broadcast view). Any other module (e.g.
    ``nn.ReLU``) is called as ``module(x)`` on the whole tensor, sample axes
    included: it must act elementwise or on the last axes. ``sample_shape=None``
    gives the mean forward of every layer.
    """

    @property
    def stochastic(self) -> bool:
        """Whether any layer draws parameters."""
        return any(isinstance(m, _Sampled) and m.stochastic for m in self)

    def forward(
        self,
        input: torch.Tensor,
        /,
        sample_shape: Any = (),
        generator: torch.Generator | None = None,
        input_contains_samples: bool = False,
    ) -> torch.Tensor:
        shape = None if sample_shape is None else sample_shape_of(sample_shape)
        if shape is None and input_contains_samples:
            raise ValueError(
                "`input_contains_samples` needs a `sample_shape`, got sample_shape=None"
            )
        contains = input_contains_samples
        out = input
        for module in self:
            if not isinstance(module, _Sampled):
                out = module(out)
            elif contains or module.stochastic:
                out = module(out, shape, generator, input_contains_samples=contains)
                contains = shape is not None
            else:
                out = module(out, None)
        if shape is not None and not contains:
            out = out.expand(*shape, *out.shape)
        return out


# ------------------------------------------------------------------ conversion
def _convertible(module: nn.Module) -> bool:
    return type(module) in _CONVERTERS


def _linear_from(module: nn.Module, cov: CovarianceSpec, **options: Any) -> _Layer:
    assert isinstance(module, nn.Linear)
    return Linear(
        module.in_features,
        module.out_features,
        module.bias is not None,
        cov=cov,
        device=module.weight.device,
        dtype=module.weight.dtype,
        **options,
    )


def _conv_from(module: nn.Module, cov: CovarianceSpec, **options: Any) -> _Layer:
    assert isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    layer_class = {nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Conv3d: Conv3d}[type(module)]
    return layer_class(
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        module.groups,
        module.bias is not None,
        module.padding_mode,
        cov=cov,
        device=module.weight.device,
        dtype=module.weight.dtype,
        **options,
    )


#: deterministic module type -> builder of its structcov layer (same shapes, no values)
_CONVERTERS: dict[type, Callable[..., _Layer]] = {
    nn.Linear: _linear_from,
    nn.Conv1d: _conv_from,
    nn.Conv2d: _conv_from,
    nn.Conv3d: _conv_from,
}


def bayesian(
    model: nn.Module,
    cov: StructuredCovariance | Callable[[], StructuredCovariance],
    *,
    only: Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
    parametrization: Parametrization = Standard(),  # noqa: B008 -- immutable
) -> nn.Module:
    """A Bayesian copy of a deterministic ``model``: its layers with Gaussian parameters.

    Every ``nn.Linear`` (and ``nn.Conv1d/2d/3d``) selected by ``only`` becomes the
    structcov layer of the same shape with a covariance from ``cov`` (a zero-argument
    callable, called once per layer, or one covariance object for a single layer),
    its means equal to the trained weight and bias and its covariance reset at the
    parametrization's scales (`_Layer.reset_parameters`). Unselected layers are kept
    as they are, every ``nn.Sequential`` becomes a `Sequential` (so ``sample_shape``
    and ``generator`` reach the layers), and ``model`` is not changed (it is deep
    copied first).

    ``only``: ``None`` selects every convertible layer; an iterable of module paths
    (``model.named_modules()`` names, e.g. ``["fc"]`` or ``["4"]`` for the last layer
    of a Sequential) or a predicate ``(path, module) -> bool`` selects some. A path
    that names no convertible layer raises ``ValueError``. Layer types for the
    parametrization: the first selected layer in module order is ``"input"``, the
    last ``"output"`` (a single one: ``"output"``), the rest ``"hidden"``.

    Inside a plain ``nn.Module`` with its own ``forward`` the converted layers are
    called as ``layer(x)``: one parameter draw per call, no sample axes.
    """
    found = [(path, module) for path, module in model.named_modules() if _convertible(module)]
    if only is None:
        selected = [path for path, _ in found]
    elif callable(only):
        selected = [path for path, module in found if only(path, module)]
    else:
        wanted = list(only)
        paths = {path for path, _ in found}
        unknown = [path for path in wanted if path not in paths]
        if unknown:
            raise ValueError(
                f"`only` names no convertible layer (nn.Linear, nn.Conv1d/2d/3d) at {unknown}; "
                f"the convertible layers are at {sorted(paths)}"
            )
        selected = [path for path, _ in found if path in set(wanted)]
    if not selected:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no layer to convert "
            "(nn.Linear, nn.Conv1d/2d/3d) among the selected ones"
        )
    if isinstance(cov, StructuredCovariance) and len(selected) > 1:
        raise ValueError(
            f"one covariance object belongs to one layer, but {len(selected)} layers are "
            "selected: pass a zero-argument callable (e.g. structcov.DiagonalCovariance)"
        )
    types: dict[str, LayerType] = {path: "hidden" for path in selected}
    types[selected[0]] = "input"
    types[selected[-1]] = "output"
    copy = _copy.deepcopy(model)
    return _convert(copy, "", set(selected), types, cov, parametrization)


def _convert(
    module: nn.Module,
    path: str,
    selected: set[str],
    types: dict[str, LayerType],
    cov: Any,
    parametrization: Parametrization,
) -> nn.Module:
    if path in selected:
        layer = _CONVERTERS[type(module)](
            module, cov, layer_type=types[path], parametrization=parametrization
        )
        layer.load_state_dict(module.state_dict())  # the means; the covariance stays
        return layer.train(module.training)
    for name, child in list(module.named_children()):
        child_path = f"{path}.{name}" if path else name
        module._modules[name] = _convert(child, child_path, selected, types, cov, parametrization)
    if type(module) is nn.Sequential:
        converted = Sequential(OrderedDict(module._modules))  # keeps the child names
        return converted.train(module.training)
    return module
