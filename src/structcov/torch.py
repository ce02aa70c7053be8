"""PyTorch adapter: a ``GaussianParameter`` that is a ``torch.nn.Module``.

Storage and glue only; every operation delegates to the core. The means and the
covariance storage are ``nn.Parameter`` s with stable names, in insertion order:

- ``mean.<name>`` for each mean (``None`` entries are registered as ``None``),
- ``cov.<storage>.<name>`` for per-name storage (``cov.factor.weight``,
  ``cov.scale.bias``, ``cov.input_factor.weight``) and ``cov.<storage>`` for a
  single array (``cov.output_factor``) — the paths of ``cov.lr_scaling``.

Before each operation the core object is pointed at the module's current
parameters, so ``.to()``, ``load_state_dict``, ``torch.func.functional_call``
and ``vmap`` over stacked states all see what they expect.

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

from collections.abc import Iterator, Mapping
from typing import Any, cast

import torch
from torch import nn

from . import gaussian as _gaussian
from .covariances import FactorizedCovariance

__all__ = ["Covariance", "GaussianParameter", "kl_divergence", "normal_prior", "param_groups"]


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


class Covariance(nn.Module):
    """A core covariance's storage as ``nn.Parameter`` s; everything else is the core's.

    Attribute access that is not a parameter or submodule (``rank``,
    ``logdet()``, ``solve(x)``, ``reset_parameters(...)``, ...) goes to the core
    covariance after pointing it at the current parameters.
    """

    def __init__(self, structure: FactorizedCovariance) -> None:
        super().__init__()
        self._structure = structure
        for path, array in structure.storage().items():
            attribute, _, name = path.partition(".")
            if name:
                if attribute not in self._modules:
                    self.add_module(attribute, NamedParameters())
                self._holder(attribute).register_parameter(name, _as_parameter(array))
            else:
                self.register_parameter(attribute, _as_parameter(array))
        self._paths = tuple(structure.storage())

    def _holder(self, attribute: str) -> NamedParameters:
        return cast(NamedParameters, self._modules[attribute])

    def _parameter(self, path: str) -> torch.Tensor:
        attribute, _, name = path.partition(".")
        found = self._holder(attribute)[name] if name else self._parameters[attribute]
        return cast(torch.Tensor, found)

    def synced(self) -> FactorizedCovariance:
        """The core covariance, pointed at this module's current parameters."""
        self._structure.load_storage({path: self._parameter(path) for path in self._paths})
        return self._structure

    def reset_parameters(
        self, mean_parameter_scales: Mapping[str, float] | float = 1.0, generator: Any = None
    ) -> None:
        """Draw new values (see the core ``reset_parameters``), copied into the parameters."""
        structure = self.synced()
        structure.reset_parameters(mean_parameter_scales, generator)
        with torch.no_grad():
            for path, value in structure.storage().items():
                self._parameter(path).copy_(value)
        self.synced()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
        return getattr(self.synced(), name)


class GaussianParameter(nn.Module):
    """A Gaussian-distributed parameter as an ``nn.Module``: N(mean, cov).

    ``forward(sample_shape=(), generator=None)`` is ``sample``, so
    ``torch.func.functional_call(module, state, (shape,))`` draws with a swapped
    state.

    Parameters
    ----------
    mean
        A mapping name -> tensor (or ``None``), or a bare tensor (``{"mean": t}``).
    cov
        A core covariance structure, e.g. ``structcov.KroneckerCovariance()``;
        it is initialized for ``mean`` (storage entries zero: call
        ``param.cov.reset_parameters(scale, generator)``).
    """

    def __init__(self, mean: Any, cov: FactorizedCovariance) -> None:
        super().__init__()
        core = _gaussian.GaussianParameter(mean, cov)
        dotted = [name for name in core.mean if "." in name or not name]
        if dotted:
            raise ValueError(f"`mean` names must be non-empty and contain no '.', got {dotted}")
        holder = NamedParameters()
        for name, value in core.mean.items():
            holder.register_parameter(name, None if value is None else _as_parameter(value))
        self.mean = holder
        self.cov = Covariance(cov)
        self._core = core

    def synced(self) -> _gaussian.GaussianParameter:
        """The core GaussianParameter, pointed at this module's current parameters."""
        self._core.mean = dict(self.mean.items())
        self.cov.synced()
        return self._core

    # The core's interface, delegated.
    @property
    def names(self) -> tuple[str, ...]:
        """Participating mean names in flat order."""
        return self._core.names

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> mean shape."""
        return self._core.shapes

    @property
    def num_params(self) -> int:
        """P, the length of the flat parameter vector."""
        return self._core.num_params

    def __getitem__(self, name: str) -> nn.Parameter | None:
        return self.mean[name]

    def sample(self, sample_shape: Any = (), generator: Any = None) -> dict[str, torch.Tensor]:
        """Reparametrised samples ``mean + S z``: name -> ``(*sample_shape, *shape)``."""
        return self.synced().sample(sample_shape, generator)

    def forward(self, sample_shape: Any = (), generator: Any = None) -> dict[str, torch.Tensor]:
        return self.sample(sample_shape, generator)

    def log_prob(self, value: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """log density of ``value`` (name -> ``(*batch, *shape)``), shape ``(*batch,)``."""
        return cast(torch.Tensor, self.synced().log_prob(value))

    def entropy(self) -> torch.Tensor:
        """Differential entropy, a 0-D tensor."""
        return cast(torch.Tensor, self.synced().entropy())

    def flat_mean(self) -> torch.Tensor:
        """The mean as one flat vector of shape (P,)."""
        return cast(torch.Tensor, self.synced().flat_mean())


def _core_of(param: Any) -> _gaussian.GaussianParameter:
    return param.synced() if isinstance(param, GaussianParameter) else param


def kl_divergence(q: Any, p: Any) -> torch.Tensor:
    """KL(q || p) for modules of this adapter or core ``GaussianParameter`` s (see the core)."""
    return cast(torch.Tensor, _gaussian.kl_divergence(_core_of(q), _core_of(p)))


def normal_prior(like: Any, scale: Any = 1.0) -> _gaussian.GaussianParameter:
    """The prior N(0, scale^2 I) over ``like``'s parameters (a core object of tensors)."""
    return _gaussian.normal_prior(_core_of(like), scale)


def param_groups(module: nn.Module, lr: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups applying each covariance's ``lr_scaling``.

    Every covariance parameter of every ``GaussianParameter`` in ``module`` gets
    ``lr * cov.lr_scaling[path]``; all other parameters (means included) get
    ``lr``. Use as ``torch.optim.Adam(param_groups(model, 1e-3))``.
    """
    scaled: dict[float, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for submodule in module.modules():
        if isinstance(submodule, Covariance):
            for path, factor in submodule._structure.lr_scaling.items():
                parameter = submodule._parameter(path)
                scaled.setdefault(lr * factor, []).append(parameter)  # type: ignore[arg-type]
                seen.add(id(parameter))
    rest = [parameter for parameter in module.parameters() if id(parameter) not in seen]
    groups = [{"params": rest, "lr": lr}] if rest else []
    return groups + [{"params": params, "lr": rate} for rate, params in scaled.items()]
