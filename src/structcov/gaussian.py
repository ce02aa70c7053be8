"""Parameters of a Bayesian model: BNNParameter and GaussianParameter."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from . import _linalg
from ._array_api import (
    Array,
    Layout,
    chunks_of,
    describe_means,
    device_of,
    namespace,
    normalize_mean,
)
from ._random import standard_normal
from .covariances import DiagonalCovariance, FactorizedCovariance, KroneckerCovariance

__all__ = ["BNNParameter", "GaussianParameter", "kl_divergence", "normal_prior"]

_LOG_2PI = math.log(2.0 * math.pi)


def _sample_shape(sample_shape: Any) -> tuple[int, ...]:
    if isinstance(sample_shape, int) and not isinstance(sample_shape, bool):
        sample_shape = (sample_shape,)
    try:
        shape = tuple(sample_shape)
    except TypeError:
        raise TypeError(
            f"`sample_shape` must be a tuple of non-negative ints, got {sample_shape!r}"
        ) from None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise TypeError(
            f"`sample_shape` must be a tuple of non-negative ints, got {sample_shape!r}"
        )
    return shape


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

    @property
    def _reference(self) -> Array:
        """The first participating mean: its namespace, dtype and device are the parameter's."""
        return self.mean[self.names[0]]

    def __getitem__(self, name: str) -> Array | None:
        return self.mean[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def sample(self, sample_shape: Any = (), generator: Any = None) -> dict[str, Array]:
        """Draw samples; defined by each distribution."""
        raise NotImplementedError(f"{type(self).__name__} does not define a distribution to sample")


class GaussianParameter(BNNParameter):
    """A Gaussian-distributed parameter: N(mean, cov) over the flat parameter vector.

    ``GaussianParameter(mean, cov)`` calls ``cov.initialize_parameters(mean)``,
    so the covariance storage takes the means' namespace, dtype and device.
    Covariance entries start at zero: call
    ``param.cov.reset_parameters(scales, generator)`` to draw initial values.

    Parameters
    ----------
    mean
        A mapping name -> array (or ``None``), or a bare array.
    cov
        A covariance structure, e.g. [`DiagonalCovariance`][structcov.DiagonalCovariance].
    """

    def __init__(self, mean: Array | Mapping[str, Array | None], cov: FactorizedCovariance) -> None:
        if not isinstance(cov, FactorizedCovariance):
            raise TypeError(
                f"`cov` must be a structcov covariance (e.g. DiagonalCovariance()), got "
                f"{type(cov).__name__}"
            )
        super().__init__(mean)
        self.cov = cov
        cov.initialize_parameters(self.mean)

    @classmethod
    def _rebuild(
        cls, mean: Mapping[str, Array | None], cov: FactorizedCovariance
    ) -> GaussianParameter:
        """A GaussianParameter over an initialized ``cov``, without validation (adapters)."""
        rebuilt = cls.__new__(cls)
        rebuilt.mean = dict(mean)
        rebuilt._layout = cov.layout
        rebuilt.cov = cov
        return rebuilt

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
        shape = _sample_shape(sample_shape)
        means: dict[str, Array] = {name: self.mean[name] for name in self.names}
        reference = self._reference
        xp = namespace(reference)
        z = standard_normal(
            generator,
            (*shape, self.cov.num_factor_columns),
            xp=xp,
            dtype=reference.dtype,
            device=device_of(reference),
            chunks=_noise_chunks(xp, self, len(shape)),
            split_like=reference if self.cov._noise_per_parameter else None,
        )
        return self.cov.factor_matmul(z, additive_constant=means)

    def flat_mean(self) -> Array:
        """The mean as one flat vector of shape (P,), in the flat parameter order."""
        return self.cov.flatten({name: self.mean[name] for name in self.names})

    def log_prob(self, value: Mapping[str, Array]) -> Array:
        """log N(value; mean, Sigma); ``value`` name -> ``(*batch, *shape)``, returns ``(*batch,)``.

        = -0.5 (P log 2 pi + log det Sigma + (x - m)^T Sigma^-1 (x - m)), with the
        structure's ``solve`` and ``logdet`` (no P x P matrix). Raises
        ``ValueError`` for a singular covariance (no density exists).
        Cost: one ``solve`` of ``batch`` vectors plus one ``logdet``.
        """
        flat = self.cov.flatten(value)
        if flat.dtype != self._reference.dtype:
            raise TypeError(
                f"`value` must have the parameter's dtype {self._reference.dtype}, got {flat.dtype}"
            )
        centred = flat - self.flat_mean()
        xp = namespace(centred)
        quadratic = xp.sum(centred * self.cov.solve(centred), axis=-1)
        return -0.5 * (self.num_params * _LOG_2PI + self.cov.logdet() + quadratic)

    def entropy(self) -> Array:
        """Differential entropy 0.5 (P (1 + log 2 pi) + log det Sigma), a 0-D array.

        ``-inf`` for a singular covariance. Cost: one ``logdet``.
        """
        return 0.5 * (self.num_params * (1.0 + _LOG_2PI) + self.cov.logdet())

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}: {s}" for n, s in self.shapes.items())
        return f"GaussianParameter({{{shapes}}}, cov={self.cov!r})"


def _noise_chunks(xp: Any, param: GaussianParameter, sample_ndim: int) -> Any:
    """How a chunked backend (dask) splits the noise z of shape ``(*sample_shape, K)``.

    Like the columns of the factor S: the K axis takes the chunks of S^T m, a lazy
    product that is only built, never computed (for a diagonal S these are the
    means' chunks, for low rank plus diagonal ``rank`` then the means' chunks). The
    sample axes are dask's ``"auto"``. ``None`` on other backends: nothing is built.
    """
    if chunks_of(xp, param._reference) is None:
        return None
    layout = param.cov.layout
    rows = [
        xp.reshape(param.mean[name], (1, size))
        for name, size in zip(layout.names, layout.sizes, strict=True)
    ]
    columns = chunks_of(xp, param.cov._rblocks(xp, rows))
    assert columns is not None
    return ("auto",) * sample_ndim + (columns[-1],)


def normal_prior(like: GaussianParameter, scale: Any = 1.0) -> GaussianParameter:
    """The prior N(0, scale^2 I) over the parameters of ``like`` (the usual VI prior).

    Parameters
    ----------
    like
        A `GaussianParameter` whose names, shapes, namespace, dtype and
        device the prior takes.
    scale
        The prior standard deviation: a float (isotropic), or a mapping name ->
        float or array shaped like that mean (per-element sigma).

    Returns
    -------
    GaussianParameter
        Zero mean and a `DiagonalCovariance` with ``scale[name]`` filled,
        so ``kl_divergence(q, normal_prior(q, sigma))`` takes the structured path.
    """
    reference = like._reference
    xp = namespace(reference)
    dtype = reference.dtype
    if isinstance(scale, Mapping):
        missing = [name for name in like.names if name not in scale]
        if missing:
            raise ValueError(f"`scale` must have the keys {list(like.names)}, got {list(scale)}")
        scales = {name: scale[name] for name in like.names}
    else:
        scales = dict.fromkeys(like.names, scale)
    # *_like keeps the means' layout: a chunked (dask) or sharded (JAX) prior then
    # lines up with q, so the KL needs no rechunk or reshard of P-sized arrays.
    means = {name: xp.zeros_like(like.mean[name]) for name in like.names}
    prior = GaussianParameter(means, DiagonalCovariance())
    filled = {}
    for name, shape in like.shapes.items():
        value = scales[name]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            filled[f"scale.{name}"] = xp.full_like(like.mean[name], float(value))
        else:
            filled[f"scale.{name}"] = xp.broadcast_to(xp.asarray(value, dtype=dtype), shape)
    prior.cov.load_storage(filled)
    return prior


def kl_divergence(q: GaussianParameter, p: GaussianParameter) -> Array:
    """KL(q || p) between two Gaussians over the same parameters, a 0-D array.

    KL = 0.5 [tr(Sigma_p^-1 Sigma_q) + (m_p - m_q)^T Sigma_p^-1 (m_p - m_q) - P
              + log det Sigma_p - log det Sigma_q].

    Exact for every pair of structures. Structured (nothing of size P x P) when
    ``p`` is diagonal — e.g. `normal_prior` — (trace term = sum of
    diag(Sigma_q) / diag(Sigma_p), O(P K_q)) and for Kronecker-Kronecker pairs
    (tr = tr(C_out^p^-1 C_out^q) tr(C_in^p^-1 C_in^q), mixed-product rule). Other
    pairs use tr(Sigma_p^-1 S_q S_q^T) = sum_k s_k^T Sigma_p^-1 s_k over the K_q
    columns of S_q: O(K_q P) memory.

    A singular ``q`` (e.g. low rank with rank < P) against a full-rank ``p``
    gives ``+inf``; a singular ``p`` raises ``ValueError`` (the divergence is
    infinite or undefined).
    """
    for argument, value in (("q", q), ("p", p)):
        if not isinstance(value, GaussianParameter):
            raise TypeError(f"`{argument}` must be a GaussianParameter, got {type(value).__name__}")
    if q.names != p.names or q.shapes != p.shapes:
        raise ValueError(
            "`q` and `p` must have the same names (in the same order) and shapes, got "
            f"{q.shapes} and {p.shapes}"
        )
    q_dtype, p_dtype = q._reference.dtype, p._reference.dtype
    if q_dtype != p_dtype:
        raise TypeError(f"`q` and `p` must share one dtype, got {q_dtype} and {p_dtype}")
    if p.cov.is_singular:
        raise ValueError(
            f"KL(q || p) needs a full-rank `p`, got the singular {p.cov!r} (it has no density)"
        )
    difference = p.flat_mean() - q.flat_mean()
    xp = namespace(difference)
    if isinstance(p.cov, DiagonalCovariance):
        variances = p.cov.diagonal()
        return q.cov._kl_to_diagonal(xp, variances) + 0.5 * xp.sum(difference**2 / variances)
    mahalanobis = xp.sum(difference * p.cov.solve(difference))
    if isinstance(q.cov, KroneckerCovariance) and isinstance(p.cov, KroneckerCovariance):
        trace = _kronecker_trace_ratio(xp, q.cov, p.cov)
    else:
        columns = q.cov.flatten(q.cov.factor_matmul(_eye_like(xp, q)))  # (K_q, P) = S_q^T
        trace = xp.sum(columns * p.cov.solve(columns))
    return 0.5 * (trace + mahalanobis - q.num_params + p.cov.logdet() - q.cov.logdet())


def _eye_like(xp: Any, param: GaussianParameter) -> Array:
    reference = param._reference
    columns = param.cov.num_factor_columns
    return xp.eye(columns, dtype=reference.dtype, device=device_of(reference))


def _kronecker_trace_ratio(xp: Any, q: KroneckerCovariance, p: KroneckerCovariance) -> Array:
    """tr((C_out^p ⊗ C_in^p)^-1 (C_out^q ⊗ C_in^q)) = prod over sides of ||S_p^-1 S_q||_F^2."""
    factors = (
        (p.output_factor, q.output_factor),
        (p._square_input_factor(xp), q._square_input_factor(xp)),
    )
    ratios = [xp.sum(_linalg.solve(xp, s_p, s_q) ** 2) for s_p, s_q in factors]
    return ratios[0] * ratios[1] * (q.sample_scale / p.sample_scale) ** 2
