"""Parameters of a Bayesian model: BNNParameter and GaussianParameter."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

from . import functional as F
from ._array_api import Array, is_array_api_obj, namespace
from ._layout import Layout, describe_means, normalize_mean
from .covariances import (
    CovarianceMethods,
    DiagonalCovariance,
    StructuredCovariance,
)
from .covariances._structure import Storage, Structure

__all__ = ["BNNParameter", "GaussianMethods", "GaussianParameter", "kl_divergence", "normal_prior"]


class BNNParameter:
    """Base class of the parameters of a Bayesian model.

    Holds the means: ``param.mean`` is the insertion-ordered mapping name ->
    array (``None`` entries are kept there but take no part), ``param[name]``
    one mean array. A bare array ``mean`` means ``{"mean": array}``.
    Subclasses define the distribution and `sample`.
    """

    def __init__(self, mean: Array | Mapping[str, Array | None]) -> None:
        self.mean: dict[str, Array | None] = normalize_mean(mean)
        self._layout: Layout = describe_means(self.mean)[0]

    @property
    def names(self) -> tuple[str, ...]:
        """The participating mean names (non-``None``), in insertion = flat order."""
        return self._layout.names

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> shape of each participating mean."""
        return dict(zip(self._layout.names, self._layout.shapes, strict=True))

    @property
    def num_params(self) -> int:
        """P, the length of the flat parameter vector."""
        return self._layout.num_params

    def __getitem__(self, name: str) -> Array | None:
        return self.mean[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def sample(self, sample_shape: Any = (), generator: Any = None) -> dict[str, Array]:
        """Draw samples; defined by each distribution."""
        raise NotImplementedError(f"{type(self).__name__} does not define a distribution to sample")


class GaussianMethods:
    """The distribution methods of a Gaussian parameter over ``cov`` and ``mean``.

    Holders provide ``cov`` (a `CovarianceMethods`: the core covariance, or the torch
    module) and ``mean`` (name -> array); every method is one call of
    `structcov.functional`. `kl_divergence` and `normal_prior` accept any holder.
    """

    cov: Any
    mean: Any

    def _parts(self) -> tuple[Structure, Storage, Mapping[str, Array]]:
        """(structure, storage, means): the arguments of the pure functions."""
        cov: CovarianceMethods = self.cov
        return cov.structure, cov._ops_storage(), self.mean

    def sample(self, sample_shape: Any = (), generator: Any = None) -> dict[str, Array]:
        """Draw ``mean + S z`` with z ~ N(0, I_K).

        Cost: drawing ``prod(sample_shape) * K`` normals plus one
        ``factor_matmul``; no copy of the factor.

        Parameters
        ----------
        sample_shape
            Leading sample dimensions (an int or a tuple).
        generator
            A backend generator fitting the means (``numpy.random.Generator``,
            ``torch.Generator``, a JAX key, ``cupy.random.Generator``) or ``None``
            for the backend's default (an error for JAX). The same state gives
            the same sample.

        Returns
        -------
        dict
            name -> array of shape ``(*sample_shape, *mean[name].shape)``.
        """
        return F.sample(*self._parts(), sample_shape, generator)

    def flat_mean(self) -> Array:
        """The mean as one flat vector of shape (P,), in the flat parameter order."""
        structure, _, mean = self._parts()
        return F.flat_mean(structure, mean)

    def log_prob(self, value: Mapping[str, Array]) -> Array:
        """log N(value; mean, Sigma); ``value`` name -> ``(*batch, *shape)``, returns ``(*batch,)``.

        = -0.5 (P log 2 pi + log det Sigma + (x - m)^T Sigma^-1 (x - m)), with the
        structure's ``solve`` and ``logdet`` sharing one setup (no P x P matrix).
        Raises ``ValueError`` for a singular covariance (no density exists).
        Cost: one ``solve`` of ``batch`` vectors plus one ``logdet``.
        """
        return F.log_prob(*self._parts(), value)

    def entropy(self) -> Array:
        """Differential entropy 0.5 (P (1 + log 2 pi) + log det Sigma), a 0-D array.

        ``-inf`` for a singular covariance. Cost: one ``logdet``.
        """
        structure, storage, _ = self._parts()
        return F.entropy(structure, storage)


class GaussianParameter(GaussianMethods, BNNParameter):
    """A Gaussian-distributed parameter: N(mean, cov) over the flat parameter vector.

    ``GaussianParameter(mean, cov)`` builds ``cov`` for the means' layout
    (``cov.initialize_parameters(mean)``), so the covariance storage takes the
    means' namespace, dtype and device. Covariance entries start at zero: call
    ``param.cov.reset_parameters(scales, generator)`` to draw initial values.
    A covariance belongs to one parameter: passing one that already belongs to
    another raises ``ValueError`` (create a new covariance per parameter).

    Parameters
    ----------
    mean
        A mapping name -> array (or ``None``), or a bare array.
    cov
        A covariance structure, e.g. [`DiagonalCovariance`][structcov.DiagonalCovariance].
    """

    cov: StructuredCovariance

    def __init__(self, mean: Array | Mapping[str, Array | None], cov: StructuredCovariance) -> None:
        if not isinstance(cov, StructuredCovariance):
            raise TypeError(
                f"`cov` must be a structcov covariance (e.g. DiagonalCovariance()), got "
                f"{type(cov).__name__}"
            )
        super().__init__(mean)
        cov._attach(self.mean)
        self.cov = cov

    @classmethod
    def _rebuild(cls, mean: Mapping[str, Any], cov: StructuredCovariance) -> GaussianParameter:
        """A GaussianParameter over an initialized ``cov``, without validation (adapters:
        leaves may be tracers, placeholders or floats)."""
        rebuilt = cls.__new__(cls)
        rebuilt.mean = dict(mean)
        rebuilt._layout = cov.structure.layout
        rebuilt.cov = cov
        return rebuilt

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}: {s}" for n, s in self.shapes.items())
        return f"GaussianParameter({{{shapes}}}, cov={self.cov!r})"


def _gaussian(value: Any, argument: str) -> GaussianMethods:
    if not isinstance(value, GaussianMethods):
        hint = ""
        if is_array_api_obj(value) or isinstance(value, Mapping):
            hint = " (wrap arrays as GaussianParameter(mean, cov) first)"
        raise TypeError(
            f"`{argument}` must be a structcov GaussianParameter (core or adapter), got "
            f"{type(value).__module__}.{type(value).__qualname__}{hint}"
        )
    return value


def normal_prior(like: Any, scale: Any = 1.0) -> GaussianParameter:
    """The prior N(0, scale^2 I) over the parameters of ``like`` (the usual VI prior).

    Parameters
    ----------
    like
        A `GaussianParameter` (core, or an adapter's module) whose names, shapes,
        namespace, dtype and device the prior takes.
    scale
        The prior standard deviation: a float (isotropic), or a mapping name ->
        float or array shaped like that mean (per-element sigma).

    Returns
    -------
    GaussianParameter
        A core parameter with zero mean and a `DiagonalCovariance` with
        ``scale[name]`` filled, so ``kl_divergence(q, normal_prior(q, sigma))``
        takes the structured path. It depends only on ``like``'s layout and
        arrays' kind, so a training loop can build it once and reuse it.
    """
    structure, _, mean = _gaussian(like, "like")._parts()
    names = structure.layout.names
    means = [mean[name] for name in names]
    xp = namespace(means[0])
    if isinstance(scale, Mapping):
        if set(scale) != set(names):
            raise ValueError(f"`scale` must have the keys {list(names)}, got {list(scale)}")
        scales = {name: scale[name] for name in names}
    else:
        scales = dict.fromkeys(names, scale)
    # *_like keeps the means' layout: a chunked (dask) or sharded (JAX) prior then
    # lines up with q, so the KL needs no rechunk or reshard of P-sized arrays.
    zeros = {name: xp.zeros_like(m) for name, m in zip(names, means, strict=True)}
    # The identity transform: the stored scales are the given sigmas, exactly.
    prior = GaussianParameter(zeros, DiagonalCovariance(scale_transform="identity"))
    filled = {}
    for name, m in zip(names, means, strict=True):
        filled[f"scale.{name}"] = _prior_scale(xp, scales[name], m, name)
    prior.cov.load_storage(filled)
    return prior


def _prior_scale(xp: Any, value: Any, mean: Array, name: str) -> Array:
    """The prior standard deviations for ``mean``: a number >= 0, or an array that
    broadcasts to the mean's shape, in the mean's namespace (cast to its dtype)."""
    argument = f"`scale` for {name!r}"
    if is_array_api_obj(value) and not isinstance(value, numbers.Real):
        namespace(value, mean, argument=f"{argument} and the means")
        try:
            return xp.broadcast_to(xp.astype(value, mean.dtype), tuple(mean.shape))
        except (ValueError, RuntimeError, TypeError):
            raise ValueError(
                f"{argument} must broadcast to the mean's shape {tuple(mean.shape)}, got shape "
                f"{tuple(value.shape)}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{argument} must be a float >= 0 (a standard deviation) or an array, got {value!r}"
        )
    number = float(value)  # Python and NumPy scalars alike
    if not math.isfinite(number) or number < 0:
        raise ValueError(
            f"{argument} must be a finite float >= 0 (a standard deviation) or an array, got "
            f"{value!r}"
        )
    return xp.full_like(mean, number)


def kl_divergence(q: Any, p: Any) -> Array:
    """KL(q || p) between two Gaussians over the same parameters, a 0-D array.

    KL = 0.5 [tr(Sigma_p^-1 Sigma_q) + (m_p - m_q)^T Sigma_p^-1 (m_p - m_q) - P
              + log det Sigma_p - log det Sigma_q].

    Exact for every pair of structures, dispatched per (type of q's structure,
    type of p's structure) (`structcov.covariances._kl`), and structured for every
    pair: nothing of size P x P unless one side stores a P x P factor (a full-rank
    `FactorizedCovariance`). The trace term goes through the structures' own
    operations: diag(Sigma_q) / s^2 against a diagonal p; whitened by p's diagonal
    with r products with S_q against a low rank plus diagonal p (O(P r^2 + r
    products)); diag(Sigma_p^-1) and Kronecker solves on q's low-rank columns against
    a Kronecker p; the mixed-product rule for two Kronecker structures. The cost
    and memory of each pair are tabulated on the Concepts page.

    ``p`` may also be a float ``sigma`` > 0, the prior N(0, sigma^2 I): the same value
    as against ``normal_prior(q, sigma)``, computed without building that prior
    (`structcov.functional.kl_to_normal`: O(P) elementwise for a diagonal q, else q's
    trace and log-determinant), the cheapest form for a training loop's KL term.

    ``q`` and ``p`` are core `GaussianParameter` s or an adapter's modules. ``+inf``
    exactly when one side is singular by construction (e.g. low rank with rank < P)
    and the other is not: q is then not absolutely continuous with respect to p (or
    log det Sigma_q = -inf). Both singular by construction: the KL of the two densities
    on their common support (pseudo-determinants and pseudo-inverse) when the supports
    coincide, ``+inf`` otherwise; "coincide" is decided with a tolerance of
    max(P, K) eps cond (see `structcov.functional.kl_divergence`).
    """
    if not isinstance(p, bool) and isinstance(p, numbers.Real):
        sigma = float(p)
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(
                "`p` as a number is sigma of the prior N(0, sigma^2 I) and must be a finite "
                f"float >= 0, got {p!r}"
            )
        if sigma == 0:  # N(0, 0): singular, decided by the structured path
            return F.kl_divergence(_gaussian(q, "q")._parts(), normal_prior(q, 0.0)._parts())
        return F.kl_to_normal(*_gaussian(q, "q")._parts(), sigma)
    return F.kl_divergence(_gaussian(q, "q")._parts(), _gaussian(p, "p")._parts())
