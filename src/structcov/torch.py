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

from . import functional as _functional
from . import gaussian as _gaussian
from .covariances import CovarianceMethods, StructuredCovariance
from .covariances._structure import Storage, Structure

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


class Covariance(CovarianceMethods, nn.Module):
    """A covariance's storage as ``nn.Parameter`` s and its frozen structure.

    Parameters are named by storage path (``factor.weight`` is
    ``self.factor["weight"]``, ``output_factor`` is ``self.output_factor``). The
    seed API's operations (``rank``, ``logdet()``, ``solve(x)``,
    ``reset_parameters(...)``, ...) call the core's pure functions with the current
    parameters.
    """

    def __init__(self, structure: Structure, storage: Storage) -> None:
        super().__init__()
        self._frozen = structure
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
        self.cov = Covariance(cov.structure, cov._ops_storage())

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


def kl_divergence(q: Any, p: Any) -> torch.Tensor:
    """KL(q || p) for modules of this adapter or core ``GaussianParameter`` s (see the core)."""
    return cast(torch.Tensor, _gaussian.kl_divergence(q, p))


def normal_prior(like: Any, scale: Any = 1.0) -> _gaussian.GaussianParameter:
    """The prior N(0, scale^2 I) over ``like``'s parameters (a core object of tensors).

    Build it once and reuse it: it depends only on ``like``'s shapes, dtype and device.
    """
    return _gaussian.normal_prior(like, scale)


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
            for path, factor in submodule.lr_scaling.items():
                parameter = submodule._parameter(path)
                scaled.setdefault(lr * factor, []).append(parameter)  # type: ignore[arg-type]
                seen.add(id(parameter))
    rest = [parameter for parameter in module.parameters() if id(parameter) not in seen]
    groups = [{"params": rest, "lr": lr}] if rest else []
    return groups + [{"params": params, "lr": rate} for rate, params in scaled.items()]
