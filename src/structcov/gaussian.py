"""Parameters of a Bayesian model: BNNParameter and GaussianParameter."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from ._array_api import Array, Layout, describe_means, device_of, namespace, normalize_mean
from ._random import standard_normal
from .covariances import FactorizedCovariance

__all__ = ["BNNParameter", "GaussianParameter"]


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
    Subclasses define the distribution and :meth:`sample`.
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
        A covariance structure, e.g. :class:`structcov.DiagonalCovariance`.
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

    def sample(self, sample_shape: Any = (), generator: Any = None) -> dict[str, Array]:
        """Draw ``mean + S z`` with z ~ N(0, I_K).

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

        Cost: drawing ``prod(sample_shape) * K`` normals plus one
        ``factor_matmul``; no copy of the factor.
        """
        shape = _sample_shape(sample_shape)
        means: dict[str, Array] = {name: self.mean[name] for name in self.names}
        reference = means[self.names[0]]

        z = standard_normal(
            generator,
            (*shape, self.cov.num_factor_columns),
            xp=namespace(reference),
            dtype=reference.dtype,
            device=device_of(reference),
        )
        return self.cov.factor_matmul(z, additive_constant=means)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}: {s}" for n, s in self.shapes.items())
        return f"GaussianParameter({{{shapes}}}, cov={self.cov!r})"
