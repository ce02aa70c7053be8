"""Sampled forward passes of layers, written once against the array API.

`linear` is the functional dense layer: ``y_s = x W_s^T + b_s`` with
``(W_s, b_s) ~ N(mean, Sigma)`` drawn once per sample index ``s`` and shared across
the batch. It reads its parameter through ``param._parts()`` (structure, storage,
means), so the core `structcov.GaussianParameter` and the adapters' modules
(``structcov.torch.GaussianParameter``, JAX pytrees) run the same code.

The noise is the sampler's: z of shape ``(*sample_shape, K)`` from the one RNG seam
(`structcov._random`), drawn exactly as `structcov.functional.sample` draws it, so
with the same generator state ``linear(x, param, shape, g)`` equals
``x @ W_s^T + b_s`` for ``param.sample(shape, g)``. What differs per structure is
only the order of the products: a sampled forward never builds per-sample weights
it does not need (see `linear` for the cost of each path and the identity it uses).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ._array_api import (
    Array,
    backend_function,
    device_of,
    is_array_api_obj,
    namespace,
    reshaped,
    same_device,
)
from ._random import standard_normal
from .covariances._structure import Storage, Structure, add_into
from .covariances.diagonal import Diagonal
from .covariances.factorized import Factorized
from .covariances.kronecker import Kronecker
from .covariances.low_rank_plus_diagonal import LowRankPlusDiagonal
from .functional import draw_noise, sample_shape_of
from .gaussian import _gaussian

__all__ = ["linear", "register_projection"]

#: How a sampled forward is evaluated: ``"project"`` (project the input onto the
#: factor's columns, then combine with z) or ``"weights"`` (form W_s = M + S z_s).
Plan = Literal["project", "weights"]

_NAMES = ("weight", "bias")


# --------------------------------------------------------------------- projections
#: ``forward(xp, structure, storage, means, x2, z2, has_bias)`` -> (S, N, d_out) (or any
#: shape of those elements in that order: the caller reshapes): the sampled forward
#: without forming per-sample weights.
ProjectionForward = Callable[[Any, Any, Storage, dict[str, Array], Array, Array, bool], Array]
#: ``costs(structure, S, N)`` -> (project, weights) multiply-adds for an input shared by
#: the samples; ``None``: always project.
ProjectionCosts = Callable[[Any, int, int], tuple[int, int]]


@dataclass(frozen=True)
class _Projection:
    forward: ProjectionForward
    costs: ProjectionCosts | None


#: structure type -> how `linear` projects the input onto its factor (the registry
#: counterpart of the KL one: a new structure registers here, `linear` stays as it is).
_PROJECTIONS: dict[type, _Projection] = {}


def register_projection(
    structure_type: type[Structure], forward: ProjectionForward, costs: ProjectionCosts | None
) -> None:
    """Register the projection forward of ``structure_type`` for `linear`.

    Structures without one (``Diagonal``) always form the per-sample weights
    W_s = M + S z_s; so does every structure when the input is per sample.
    """
    _PROJECTIONS[structure_type] = _Projection(forward, costs)


def _projection(structure: Structure) -> _Projection | None:
    for cls in type(structure).__mro__:
        found = _PROJECTIONS.get(cls)
        if found is not None:
            return found
    return None


def deterministic_forward(
    out: Any,
    x: Any,
    sample_shape: Any,
    input_contains_samples: bool,
    parameter_samples: Any,
    argument: str = "input",
) -> Any:
    """A deterministic layer's output ``out`` (computed once from the means) over samples.

    Shared by the adapters' layers built with ``cov=None``: ``sample_shape=None`` returns
    ``out``; with ``input_contains_samples`` the input ``x`` (named ``argument`` in the
    errors) must start with ``sample_shape`` and ``out`` already carries it; otherwise
    ``out`` is broadcast to ``(*sample_shape, *out.shape)`` (a view: no copy).
    ``parameter_samples`` is refused.
    """
    if parameter_samples is not None:
        raise ValueError("a deterministic layer (cov=None) takes no `parameter_samples`")
    if sample_shape is None:
        if input_contains_samples:
            raise ValueError(
                "`input_contains_samples` needs a `sample_shape`, got sample_shape=None"
            )
        return out
    shape = sample_shape_of(sample_shape)
    if input_contains_samples:
        if tuple(x.shape[: len(shape)]) != shape:
            raise ValueError(
                f"`{argument}` must start with the sample_shape {shape} "
                f"(input_contains_samples=True), got shape {tuple(x.shape)}"
            )
        return out
    return namespace(out).broadcast_to(out, (*shape, *out.shape))


def _plan(structure: Structure, num_samples: int, num_rows: int, per_sample_input: bool) -> Plan:
    """Which evaluation of a sampled forward is cheaper, from static shapes only.

    ``num_samples`` = S = prod(sample_shape), ``num_rows`` = N = prod(batch),
    P = d_out (d_in + has_bias) parameters, K factor columns (multiply-adds):

    - `Kronecker`: always ``"project"`` (rank-sized products, never a per-sample weight).
    - `Factorized` (full or low rank K), input shared across samples:
      ``"weights"`` S P K + S N P against ``"project"`` N P K + S N d_out K + N P.
    - `LowRankPlusDiagonal` (rank r), input shared: ``"weights"`` S P (r + 1) + S N P
      against ``"project"`` N P r + S N d_out r + S P + S N P (the diagonal part
      needs per-sample weights either way).
    - With a per-sample input (``input_contains_samples``) projecting costs S N P K:
      ``"weights"``. `Diagonal` (no registered projection): ``"weights"``.

    Ties go to ``"project"``. The costs are each structure's registration
    (`register_projection`).
    """
    projection = _projection(structure)
    if projection is None:
        return "weights"
    if projection.costs is None:
        return "project"
    if per_sample_input:
        return "weights"
    project, weights = projection.costs(structure, num_samples, num_rows)
    return "project" if project <= weights else "weights"


def _d_out(structure: Structure) -> int:
    return structure.layout.shapes[structure.layout.names.index("weight")][0]


def _factorized_costs(structure: Factorized, s: int, n: int) -> tuple[int, int]:
    p, k = structure.num_params, structure.rank
    return n * p * k + s * n * _d_out(structure) * k + n * p, s * p * k + s * n * p


def _low_rank_plus_diagonal_costs(
    structure: LowRankPlusDiagonal, s: int, n: int
) -> tuple[int, int]:
    p, r = structure.num_params, structure.rank
    return n * p * r + s * n * _d_out(structure) * r + s * p + s * n * p, s * p * (
        r + 1
    ) + s * n * p


# --------------------------------------------------------------------- checks
def _layer_shapes(structure: Structure) -> tuple[int, int, bool]:
    """(d_out, d_in, has_bias) of a dense layer's layout, or a ``ValueError`` naming ``param``."""
    layout = structure.layout
    names = list(layout.names)
    if "weight" not in names or any(name not in _NAMES for name in names):
        raise ValueError(
            "`param` must have means named 'weight' (out_features, in_features) and optionally "
            f"'bias' (out_features,), got the names {names}"
        )
    weight_shape = layout.shapes[names.index("weight")]
    if len(weight_shape) != 2:
        raise ValueError(
            "linear needs a 2-D `weight` mean of shape (out_features, in_features), got shape "
            f"{weight_shape} (a convolution weight needs a convolution layer)"
        )
    d_out, d_in = weight_shape
    has_bias = "bias" in names
    if has_bias and layout.shapes[names.index("bias")] != (d_out,):
        raise ValueError(
            f"`param`'s 'bias' mean must have shape ({d_out},) (out_features), got "
            f"{layout.shapes[names.index('bias')]}"
        )
    return d_out, d_in, has_bias


def _check_like(value: Any, reference: Array, argument: str) -> Any:
    """``value`` is an array of ``reference``'s namespace, dtype and device; returns xp."""
    if not is_array_api_obj(value):
        raise TypeError(f"{argument} must be an array, got {type(value).__name__}")
    xp = namespace(value, reference, argument=f"{argument} and `param`")
    if value.dtype != reference.dtype:
        raise TypeError(
            f"{argument} must have the parameter's dtype {reference.dtype}, got {value.dtype}"
        )
    device, expected = device_of(value), device_of(reference)
    # A traced JAX array has no device (None): only two known devices are compared.
    if device is not None and expected is not None and not same_device(device, expected):
        raise ValueError(f"{argument} must be on the parameter's device {expected}, got {device}")
    return xp


def _check_x(
    x: Any, reference: Array, d_in: int, sample_shape: tuple[int, ...], per_sample: bool
) -> Any:
    xp = _check_like(x, reference, "`x`")
    if x.ndim < 1 or x.shape[-1] != d_in:
        raise ValueError(
            f"`x` must have last dimension {d_in} (in_features), got shape {tuple(x.shape)}"
        )
    if per_sample and (
        x.ndim < len(sample_shape) + 1 or tuple(x.shape[: len(sample_shape)]) != sample_shape
    ):
        raise ValueError(
            f"`x` must start with the sample dimensions {sample_shape} "
            f"(input_contains_samples=True), got shape {tuple(x.shape)}"
        )
    return xp


def _given_samples(
    parameter_samples: Any,
    structure: Structure,
    reference: Array,
    sample_shape: tuple[int, ...],
) -> dict[str, Array]:
    """Validate ``parameter_samples``: name -> ``(*sample_shape, *mean.shape)``."""
    layout = structure.layout
    if not isinstance(parameter_samples, Mapping):
        raise TypeError(
            "`parameter_samples` must be a mapping name -> array, got "
            f"{type(parameter_samples).__name__}"
        )
    present = {k: v for k, v in parameter_samples.items() if v is not None}
    if set(present) != set(layout.names):
        raise ValueError(
            f"`parameter_samples` must have the keys {list(layout.names)}, got {list(present)}"
        )
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        value = present[name]
        _check_like(value, reference, f"`parameter_samples[{name!r}]`")
        if tuple(value.shape) != (*sample_shape, *shape):
            raise ValueError(
                f"`parameter_samples[{name!r}]` must have shape {(*sample_shape, *shape)} "
                f"(sample_shape, then the mean's shape), got {tuple(value.shape)}"
            )
    return {name: present[name] for name in layout.names}


# --------------------------------------------------------------------- paths
def _apply_weights(
    xp: Any, x2: Array, weight: Array, bias: Array | None, num_samples: int
) -> Array:
    """``x W_s^T + b_s`` for W (S, d_out, d_in), b (S, d_out): returns (S, N, d_out).

    ``x2`` is (N, d_in) shared by every sample or (S, N, d_in). One batched GEMM,
    S N P multiply-adds.
    """
    out = xp.matmul(x2, xp.matrix_transpose(weight))  # (S, N, d_out)
    if bias is not None:
        out = out + xp.reshape(bias, (num_samples, 1, bias.shape[-1]))
    return out


def _formed_weights(
    xp: Any,
    structure: Structure,
    storage: Storage,
    means: dict[str, Array],
    z: Array,
) -> dict[str, Array]:
    """W_s = M + S z_s per name (``factor_matmul`` with the means): name -> (S, *shape)."""
    layout = structure.layout
    num_samples = z.shape[0]
    out = {}
    for name, shape, block in zip(
        layout.names, layout.shapes, structure.blocks(xp, storage, z), strict=True
    ):
        block = add_into(block, xp.reshape(means[name], (-1,)))  # the block is new
        out[name] = xp.reshape(block, (num_samples, *shape))
    return out


def _standard_affine(xp: Any, x: Array, weight: Array, bias: Array | None) -> Array:
    out = x @ xp.matrix_transpose(weight)  # the operator: no namespace wrapper's checks
    return out if bias is None else out + bias


def _torch_affine(xp: Any, x: Any, weight: Any, bias: Any) -> Array:
    import torch

    return torch.nn.functional.linear(x, weight, bias)


#: backend name -> ``x W^T + b`` in one kernel. The standard has no GEMM that adds into
#: its output; torch's ``linear`` is one ``addmm`` (no separate bias pass and node).
_AFFINE_HOOKS: dict[str, Callable[[Any, Array, Array, Array | None], Array]] = {
    "torch": _torch_affine
}
#: namespace module name -> its affine map (see `backend_function`).
_AFFINE: dict[str, Callable[[Any, Array, Array, Array | None], Array]] = {}


def _affine(xp: Any, x: Array, weight: Array, bias: Array | None) -> Array:
    """``x W^T + b`` for x (..., N, d_in), W (d_out, d_in), b (d_out,) or ``None``:
    (..., N, d_out). N d_out d_in multiply-adds."""
    return backend_function(xp, _AFFINE_HOOKS, _AFFINE, _standard_affine)(xp, x, weight, bias)


def _mean_forward(xp: Any, x2: Array, means: dict[str, Array]) -> Array:
    """``x M^T + b`` for x (..., N, d_in): (..., N, d_out). N P multiply-adds."""
    return _affine(xp, x2, means["weight"], means.get("bias"))


def _kronecker_forward(
    xp: Any,
    structure: Kronecker,
    storage: Storage,
    means: dict[str, Array],
    x2: Array,
    z: Array,
) -> Array:
    """x~ W~_s^T = x~ M~^T + sample_scale ((x~ B) Z_s^T) A^T, returns (S, N, d_out)
    ((N, d_out) for one draw with a shared input).

    W~_s = M~ + sample_scale A Z_s B^T (K-FAC, `Kronecker`), A = S_out (d_out, r_out),
    B = S_in (d_in + has_bias, r_in) whose last row is the bias row, Z_s the noise
    reshaped row-major to (r_out, r_in). x~ B = x B_w + B_b (no ones column).
    """
    num_samples = z.shape[0]
    ranks = (structure.output_rank, structure.input_rank)
    # one draw, shared input (a training step): Z 2-D, so no batched GEMM over an axis of
    # size one for autograd to reduce on the way back (as in `_one_draw_forward`)
    one_draw = num_samples == 1 and x2.ndim == 2
    zz = xp.reshape(z, ranks if one_draw else (num_samples, *ranks))
    rank = structure.input_rank  # the bias row (1, r_in) as the affine map's (r_in,): a view
    bias = xp.reshape(storage["input_factor.bias"], (rank,)) if structure.has_bias else None
    # x~ B = x B_w + B_b, (..., N, r_in): B_w^T is a view, read transposed by the GEMM
    projected = _affine(xp, x2, xp.matrix_transpose(storage["input_factor.weight"]), bias)
    mixed = projected @ xp.matrix_transpose(zz)  # (S, N, r_out), or (N, r_out)
    s_out = storage["output_factor"]
    if structure.sample_scale != 1.0:
        s_out = s_out * structure.sample_scale
    return _mean_forward(xp, x2, means) + mixed @ xp.matrix_transpose(s_out)


def _factor_projection(
    xp: Any, storage: Storage, attribute: str, has_bias: bool, x2: Array, z_low: Array
) -> Array:
    """sum_k z_{s,k} (x S_w[:, :, k]^T + S_b[:, k]): returns (S, N, d_out).

    x S_w^T for all k at once: a (d_out, N, K) array (N P K), then one GEMM with z^T
    (S N d_out K). No copy of the factor: the batched GEMM reads S_w as stored. With
    a per-sample ``x2`` (S, N, d_in) the projection is per sample, (S, d_out, N, K)
    (S N P K: `_plan` forms the weights instead; kept correct for every input).
    """
    factor = storage[f"{attribute}.weight"]  # (d_out, d_in, K)
    bias = xp.expand_dims(storage[f"{attribute}.bias"], axis=1) if has_bias else None
    if x2.ndim == 3:
        projected = xp.matmul(xp.expand_dims(x2, axis=1), factor)  # (S, d_out, N, K)
        if bias is not None:
            projected = projected + bias
        num_samples, num_columns = z_low.shape
        mixed = xp.matmul(projected, xp.reshape(z_low, (num_samples, 1, num_columns, 1)))
        return xp.permute_dims(mixed[..., 0], (0, 2, 1))
    projected = xp.matmul(x2, factor)  # (d_out, N, K)
    if bias is not None:
        projected = projected + bias
    mixed = xp.matmul(projected, xp.matrix_transpose(z_low))  # (d_out, N, S)
    return xp.permute_dims(mixed, (2, 1, 0))


def _low_rank_plus_diagonal_forward(
    xp: Any,
    structure: LowRankPlusDiagonal,
    storage: Storage,
    means: dict[str, Array],
    x2: Array,
    z: Array,
    has_bias: bool,
) -> Array:
    """Projection for U z_r, per-sample weights for the diagonal: (S, N, d_out).

    W_s = (M + d_w * z_d,w) + U_w z_r: the first term is formed per sample (S P),
    applied in one batched GEMM (S N P); the low rank part is `_factor_projection`.
    """
    layout = structure.layout
    rank, num_samples = structure.rank, z.shape[0]
    diagonal = {}
    for name, shape, offset, size in zip(
        layout.names, layout.shapes, layout.offsets, layout.sizes, strict=True
    ):
        noise = xp.reshape(z[:, rank + offset : rank + offset + size], (num_samples, *shape))
        diagonal[name] = noise * structure.standard_deviation(xp, storage, name) + means[name]
    out = _apply_weights(xp, x2, diagonal["weight"], diagonal.get("bias"), num_samples)
    return out + _factor_projection(xp, storage, "factor", has_bias, x2, z[:, :rank])


def _local_reparameterization(
    xp: Any,
    structure: Structure,
    storage: Storage,
    means: dict[str, Array],
    x2: Array,
    generator: Any,
    noise_shape: tuple[int, ...],
    mean_shape: tuple[int, ...],
) -> Array:
    """y = m + sqrt(v) eps, m = x M^T + b, v = x^2 (s_w^2)^T + s_b^2, eps ~ N(0, I).

    ``structure`` is `Diagonal` (checked by the caller). Cost: 2 N P + the draw.
    """
    reference = means["weight"]
    mean = _mean_forward(xp, x2, means)
    assert isinstance(structure, Diagonal)
    s_weight = structure.standard_deviation(xp, storage, "weight")
    variance = xp.matmul(x2 * x2, xp.matrix_transpose(s_weight**2))
    if "bias" in means:
        variance = variance + structure.standard_deviation(xp, storage, "bias") ** 2
    # sqrt has an infinite derivative at 0 (e.g. the zero-initialised storage): the
    # double `where` keeps the value and gives a zero gradient there instead of NaN.
    positive = variance > 0
    safe = xp.where(positive, variance, xp.ones_like(variance))
    std = xp.where(positive, xp.sqrt(safe), xp.zeros_like(variance))
    eps = standard_normal(
        generator, noise_shape, xp=xp, dtype=reference.dtype, device=device_of(reference)
    )
    return xp.reshape(mean, mean_shape) + xp.reshape(std, mean_shape) * eps


# --------------------------------------------------------------------- public
def linear(
    x: Array,
    param: Any,
    /,
    sample_shape: Any = (),
    generator: Any = None,
    *,
    input_contains_samples: bool = False,
    parameter_samples: Mapping[str, Array] | None = None,
    local_reparameterization: bool = False,
) -> Array:
    r"""A dense layer with Gaussian parameters: ``y_s = x W_s^T + b_s``.

    ``(W_s, b_s) ~ N(mean, Sigma)``: one parameter draw per sample index ``s``, shared
    by every row of the batch. The draw is ``mean + S z_s`` with z of shape
    ``(*sample_shape, K)`` (K = ``structure.num_factor_columns``) drawn through the
    RNG seam exactly as ``param.sample`` draws it, so with the same generator state
    the output equals ``x @ W_s^T + b_s`` for ``param.sample(sample_shape, generator)``
    (and ``factor_matmul(structure, storage, z, additive_constant=mean)``).

    Parameters
    ----------
    x
        Input of shape ``(*batch, in_features)`` (``(*sample_shape, *batch,
        in_features)`` with ``input_contains_samples=True``), in the parameter's
        namespace, dtype and device.
    param
        A structcov Gaussian parameter (the core `structcov.GaussianParameter`, or an
        adapter's, e.g. ``structcov.torch.GaussianParameter``) whose means are named
        ``"weight"`` of shape ``(out_features, in_features)`` and optionally
        ``"bias"`` of shape ``(out_features,)``.
    sample_shape
        Leading sample dimensions (an int or a tuple). ``None``: the mean forward
        ``x M^T + b`` (no sampling; output ``(*batch, out_features)``).
    generator
        A backend generator (see `structcov._random`; a key for JAX) or ``None``.
        Ignored with ``parameter_samples``.
    input_contains_samples
        ``x`` already starts with ``sample_shape``: sample ``s`` uses its own ``x_s``.
    parameter_samples
        name -> array of shape ``(*sample_shape, *mean.shape)``: use these parameter
        samples instead of drawing (``y_s = x W_s^T + b_s`` with them).
    local_reparameterization
        `Diagonal` structure only: draw the output noise instead,
        ``y ~ N(x M^T + b, x^2 (s_w^2)^T + s_b^2)`` independently per batch row and
        output. This **changes the joint distribution**: rows of a batch no longer
        share one weight draw (their outputs are independent), though each row's
        marginal is the same; it draws ``prod(sample_shape) * N * out_features``
        normals rather than ``prod(sample_shape) * K``, so the same generator state
        does not reproduce ``param.sample``. Cost: 2 N P (2 S N P with
        ``input_contains_samples``) for the mean and variance, plus S N d_out.

    Returns
    -------
    array
        Shape ``(*sample_shape, *batch, out_features)`` (``(*batch, out_features)``
        for ``sample_shape=None``), in the parameter's namespace, dtype and device.

    Notes
    -----
    Costs in multiply-adds, for S = prod(sample_shape) samples, N = prod(batch)
    rows, P = d_out (d_in + has_bias) parameters, K factor columns; "input shared"
    means ``input_contains_samples=False``. The evaluation is picked from static
    shapes (never from values), so the call stays ``jax.jit``-safe.

    - `Kronecker` (K-FAC: W~ = [W | b] = M~ + sample_scale A Z B^T, A = S_out
      (d_out, r_out), B = S_in (d_in + has_bias, r_in), its last row the bias's)::

          x~ W~_s^T = x~ M~^T + sample_scale ((x~ B) Z_s^T) A^T,   x~ B = x B_w + B_b

      the mean forward once (N P) and x B once (N d_in r_in) — both per sample
      when the input has samples — then per sample only rank-sized products,
      S N r_out (r_in + d_out). No per-sample (d_out, d_in) weight is formed.
    - `Factorized` / low rank (dense S, ``factor.weight`` (d_out, d_in, K),
      ``factor.bias`` (d_out, K)), the cheaper of:
      forming W_s = M + S z_s (S P K + S N P), or projecting the input onto the
      factor columns, y_s = x M^T + b + sum_k z_{s,k} (x S_w[:, :, k]^T + S_b[:, k])
      (N P K once for the (d_out, N, K) projection, then S N d_out K). With a
      per-sample input, forming W_s.
    - `LowRankPlusDiagonal` (S = [U, diag(d)], z = [z_r, z_d]): the diagonal part
      needs per-sample weights M + d * z_d (S P, then S N P); U z_r is projected like
      the factorised case (N P r + S N d_out r) or formed with it (S P r), whichever
      is cheaper.
    - `Diagonal`: W_s = M + s * z_s (S P), then one batched GEMM (S N P).
    - Any other structure: W_s formed through its ``blocks`` (``factor_matmul``).
    - Wherever W_s is formed, one draw with a shared input (S = 1, a training step)
      forms W 2-D and multiplies with one 2-D GEMM: no sample axis of size one for
      autograd to reduce over on the way back.

    The mean forward (``sample_shape=None``) is N P; given ``parameter_samples``,
    S N P.
    """
    gaussian = _gaussian(param, "param")
    structure, storage, mean = gaussian._parts()
    d_out, d_in, has_bias = _layer_shapes(structure)
    names = structure.layout.names
    means = {name: mean[name] for name in names}
    reference = means[names[0]]
    shape = None if sample_shape is None else sample_shape_of(sample_shape)
    per_sample = input_contains_samples and bool(shape)
    if shape is None and (input_contains_samples or parameter_samples is not None):
        argument = "input_contains_samples" if input_contains_samples else "parameter_samples"
        raise ValueError(f"`{argument}` needs a `sample_shape`, got sample_shape=None")
    if local_reparameterization and not isinstance(structure, Diagonal):
        raise ValueError(
            "`local_reparameterization=True` needs a diagonal covariance (DiagonalCovariance: "
            f"independent weights), got {structure!r}"
        )
    if local_reparameterization and parameter_samples is not None:
        raise ValueError(
            "`local_reparameterization=True` draws output noise: it cannot use `parameter_samples`"
        )
    xp = _check_x(x, reference, d_in, shape or (), per_sample)

    sample_ndim = len(shape) if per_sample and shape is not None else 0
    batch = tuple(x.shape[sample_ndim:-1])
    num_rows = math.prod(batch)
    num_samples = 1 if shape is None else math.prod(shape)
    x2 = reshaped(xp, x, (num_samples, num_rows, d_in) if per_sample else (num_rows, d_in))

    if shape is None:
        return reshaped(xp, _mean_forward(xp, x2, means), (*batch, d_out))
    out_shape = (*shape, *batch, d_out)
    if local_reparameterization:
        mean_shape = out_shape if per_sample else (*batch, d_out)
        return _local_reparameterization(
            xp, structure, storage, means, x2, generator, out_shape, mean_shape
        )
    if parameter_samples is not None:
        given = _given_samples(parameter_samples, structure, reference, shape)
        weight = xp.reshape(given["weight"], (num_samples, d_out, d_in))
        bias = given.get("bias")
        out = _apply_weights(xp, x2, weight, bias, num_samples)
        return xp.reshape(out, out_shape)

    z = draw_noise(structure, storage, means, shape, generator)
    num_columns = structure.num_factor_columns
    if num_samples == 1 and not per_sample and isinstance(structure, Diagonal):
        # z read flat, (K,) as drawn for sample_shape=(): no (1, K) view to index into
        flat = reshaped(xp, z, (num_columns,))
        return reshaped(xp, _diagonal_one_draw(xp, structure, storage, means, x2, flat), out_shape)
    plan = _plan(structure, num_samples, num_rows, per_sample)
    projection = _projection(structure)
    z2 = reshaped(xp, z, (num_samples, num_columns))
    if plan == "project" and projection is not None:
        out = projection.forward(xp, structure, storage, means, x2, z2, has_bias)
    elif num_samples == 1 and not per_sample:
        out = _one_draw_forward(xp, structure, storage, means, x2, z2)
    else:
        formed = _formed_weights(xp, structure, storage, means, z2)
        out = _apply_weights(xp, x2, formed["weight"], formed.get("bias"), num_samples)
    return reshaped(xp, out, out_shape)


def _one_draw_forward(
    xp: Any, structure: Structure, storage: Storage, means: dict[str, Array], x2: Array, z: Array
) -> Array:
    """``x W^T + b`` for one draw W = M + S z shared by the batch (a training step's
    call): (N, d_out). S P to form W, N P for the GEMM.

    The weights are formed without the sample axis and the mean added out of place:
    a (1, n) block broadcast against the mean, a (1, d_out, d_in) batched GEMM or an
    in-place add into a block autograd tracks each cost a copy or a reduction over
    that axis of size one on the way back (about 1.4x this path's forward + backward
    on CPU torch at 256 x 256).
    """
    layout = structure.layout
    formed = {
        name: xp.reshape(block, shape) + means[name]
        for name, shape, block in zip(
            layout.names, layout.shapes, structure.blocks(xp, storage, z), strict=True
        )
    }
    return _affine(xp, x2, formed["weight"], formed.get("bias"))


def _diagonal_one_draw(
    xp: Any, structure: Diagonal, storage: Storage, means: dict[str, Array], x2: Array, z: Array
) -> Array:
    """`_one_draw_forward` of a `Diagonal` structure, z flat (K,): (N, d_out).

    M + s * z per name in the mean's shape, s read as stored: no flat (1, n) copy of s
    or of the product, so backward has three nodes per name, not six (about 0.1 ms of a
    256 x 256 layer's forward + backward on CPU torch). S P + N P.
    """
    layout = structure.layout
    formed = {
        name: means[name]
        + structure.standard_deviation(xp, storage, name)
        * reshaped(xp, z[offset : offset + size], shape)
        for name, shape, offset, size in zip(
            layout.names, layout.shapes, layout.offsets, layout.sizes, strict=True
        )
    }
    return _affine(xp, x2, formed["weight"], formed.get("bias"))


def _factorized_forward(
    xp: Any,
    structure: Factorized,
    storage: Storage,
    means: dict[str, Array],
    x2: Array,
    z: Array,
    has_bias: bool,
) -> Array:
    """x M^T + b + the projection of x onto the factor's columns: (S, N, d_out)."""
    return _mean_forward(xp, x2, means) + _factor_projection(xp, storage, "factor", has_bias, x2, z)


def _kronecker_projection(
    xp: Any,
    structure: Kronecker,
    storage: Storage,
    means: dict[str, Array],
    x2: Array,
    z: Array,
    has_bias: bool,
) -> Array:
    return _kronecker_forward(xp, structure, storage, means, x2, z)


register_projection(Kronecker, _kronecker_projection, None)
register_projection(Factorized, _factorized_forward, _factorized_costs)
register_projection(
    LowRankPlusDiagonal, _low_rank_plus_diagonal_forward, _low_rank_plus_diagonal_costs
)
