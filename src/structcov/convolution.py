"""Sampled convolution forward passes, written once against the array API.

`conv` is the functional 1-, 2- and 3-D convolution layer with Gaussian parameters:
``y_s = conv(x, W_s) + b_s`` with ``(W_s, b_s) ~ N(mean, Sigma)`` drawn once per sample
index ``s`` and shared across the batch, cross-correlation with torch's conventions
(stride, zero padding, dilation, groups). The noise is the sampler's (`draw_noise`),
so with the same generator state ``conv(x, param, shape, g)`` equals a convolution
with the weights of ``param.sample(shape, g)``.

Convolution is the one operation the array API standard lacks. It goes through a
small per-backend hook (`register_conv`): ``torch.nn.functional.conv{1,2,3}d`` for
torch, ``jax.lax.conv_general_dilated`` for JAX (both imported only when an array of
that backend arrives), and a generic array-API fallback (a sum over kernel offsets of
strided slices times the kernel slice) for NumPy, array_api_strict, CuPy and dask.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ._array_api import Array, backend_name, device_of
from .covariances._structure import Storage, Structure
from .covariances.kronecker import Kronecker
from .functional import draw_noise, sample_shape_of
from .gaussian import _gaussian
from .layers import _check_like, _formed_weights, _given_samples

__all__ = ["conv", "register_conv"]

_NAMES = ("weight", "bias")

#: ``padding`` as the hooks receive it: one (before, after) pair per spatial dimension.
Padding = tuple[tuple[int, int], ...]


class ConvHook(Protocol):
    """A plain batched convolution (cross-correlation, zero padding) of one backend.

    ``hook(xp, x, weight, stride=..., padding=..., dilation=..., groups=...)`` with
    ``x`` of shape ``(N, C_in, *spatial)``, ``weight`` ``(C_out, C_in // groups,
    *kernel)``, ``stride`` and ``dilation`` tuples of positive ints (one per spatial
    dimension), ``padding`` one ``(before, after)`` pair per spatial dimension, and
    ``groups`` dividing ``C_in`` and ``C_out``, returns ``(N, C_out, *spatial_out)``
    with ``spatial_out[d] = (spatial[d] + before + after - dilation[d] (kernel[d] - 1)
    - 1) // stride[d] + 1``, in ``x``'s namespace, dtype and device.
    """

    def __call__(
        self,
        xp: Any,
        x: Array,
        weight: Array,
        *,
        stride: tuple[int, ...],
        padding: Padding,
        dilation: tuple[int, ...],
        groups: int,
    ) -> Array: ...


#: (namespace name or predicate on the namespace, hook), the latest registration first.
_HOOKS: list[tuple[str | Callable[[Any], bool], ConvHook]] = []


def register_conv(predicate_or_namespace_name: str | Callable[[Any], bool], fn: ConvHook) -> None:
    """Register ``fn`` as the convolution of the namespaces it matches.

    ``predicate_or_namespace_name`` is a backend name as `structcov._array_api.backend_name`
    gives it (``"torch"``, ``"jax"``, ``"numpy"``, ``"cupy"``, ``"dask"``,
    ``"array_api_strict"``) or a predicate ``namespace -> bool``. ``fn`` follows
    `ConvHook`. A later registration wins over an earlier one; a namespace that no hook
    matches gets the generic array-API fallback `array_api_conv`. Registering imports
    nothing: a hook imports its library when it is first called.
    """
    if not (isinstance(predicate_or_namespace_name, str) or callable(predicate_or_namespace_name)):
        raise TypeError(
            "`predicate_or_namespace_name` must be a backend name (str) or a callable "
            f"namespace -> bool, got {type(predicate_or_namespace_name).__name__}"
        )
    if not callable(fn):
        raise TypeError(f"`fn` must be callable, got {type(fn).__name__}")
    _HOOKS.insert(0, (predicate_or_namespace_name, fn))


def _hook(xp: Any) -> ConvHook:
    name = backend_name(xp)
    for matcher, fn in _HOOKS:
        if (matcher == name) if isinstance(matcher, str) else matcher(xp):
            return fn
    return array_api_conv


# --------------------------------------------------------------------- hooks
def _zero_pad(xp: Any, x: Array, padding: Padding) -> Array:
    """``x`` (N, C, *spatial) with zeros before and after each spatial axis (concatenation)."""
    for axis, (before, after) in enumerate(padding, start=2):
        parts = []
        for width in (before, after):
            shape = (*x.shape[:axis], width, *x.shape[axis + 1 :])
            parts.append(xp.zeros(shape, dtype=x.dtype, device=device_of(x)) if width else None)
        if parts[0] is not None or parts[1] is not None:
            x = xp.concat([p for p in (parts[0], x, parts[1]) if p is not None], axis=axis)
    return x


def array_api_conv(
    xp: Any,
    x: Array,
    weight: Array,
    *,
    stride: tuple[int, ...],
    padding: Padding,
    dilation: tuple[int, ...],
    groups: int,
) -> Array:
    """The generic convolution over the array API: a sum over the kernel's offsets.

    For every offset ``j`` of the kernel (prod(kernel) of them), the strided slice of
    the zero-padded input that offset reads, ``x_pad[:, :, j*dilation :: stride]``
    (N, C_in, L), is multiplied with the kernel slice ``weight[..., j]`` per group,
    (g, C_out/g, C_in/g) @ (N, g, C_in/g, L), and added up:
    ``y[n, o, p] = sum_j sum_c weight[o, c, j] x_pad[n, c, p*stride + j*dilation]``.

    Cost: N C_out (C_in/g) prod(kernel) L multiply-adds (the direct convolution's
    count, L = prod(spatial_out)) in prod(kernel) GEMMs, plus one strided copy of
    N C_in L input entries per offset; memory one such slice and the (N, C_out, L)
    sum, never the prod(kernel)-times larger im2col matrix. Static shapes and Python
    loops only, so it stays lazy on dask and traceable under ``jax.jit``.
    """
    num_rows, c_in = x.shape[0], x.shape[1]
    c_out, c_group = weight.shape[0], weight.shape[1]
    kernel = tuple(weight.shape[2:])
    x = _zero_pad(xp, x, padding)
    out = _output_size(tuple(x.shape[2:]), kernel, stride, ((0, 0),) * len(kernel), dilation)
    length = math.prod(out)
    # (prod(kernel), g, C_out/g, C_in/g): one contiguous kernel slice per offset.
    slices = xp.reshape(weight, (groups, c_out // groups, c_group, math.prod(kernel)))
    slices = xp.permute_dims(slices, (3, 0, 1, 2))
    total: Array | None = None
    for flat, offset in enumerate(itertools.product(*(range(k) for k in kernel))):
        index = (
            slice(None),
            slice(None),
            *(
                slice(j * d, j * d + s * (m - 1) + 1, s)
                for j, d, s, m in zip(offset, dilation, stride, out, strict=True)
            ),
        )
        window = xp.reshape(x[index], (num_rows, groups, c_in // groups, length))
        term = xp.matmul(slices[flat, ...], window)  # (N, g, C_out/g, L)
        total = term if total is None else total + term
    assert total is not None  # the kernel has at least one offset
    return xp.reshape(total, (num_rows, c_out, *out))


def _torch_conv(
    xp: Any,
    x: Any,  # the backend's own array type
    weight: Any,
    *,
    stride: tuple[int, ...],
    padding: Padding,
    dilation: tuple[int, ...],
    groups: int,
) -> Any:
    """``torch.nn.functional.conv{1,2,3}d``; asymmetric padding through ``F.pad`` first."""
    from torch.nn import functional

    function = (functional.conv1d, functional.conv2d, functional.conv3d)[len(stride) - 1]
    if all(before == after for before, after in padding):
        symmetric = tuple(before for before, _ in padding)
    else:
        # F.pad takes (before, after) pairs from the last axis backwards.
        widths = [width for pair in reversed(padding) for width in pair]
        x = functional.pad(x, widths)
        symmetric = (0,) * len(padding)
    return function(x, weight, None, stride, symmetric, dilation, groups)


_JAX_DIMENSIONS = {
    1: ("NCH", "OIH", "NCH"),
    2: ("NCHW", "OIHW", "NCHW"),
    3: ("NCDHW", "OIDHW", "NCDHW"),
}


def _jax_conv(
    xp: Any,
    x: Any,  # the backend's own array type
    weight: Any,
    *,
    stride: tuple[int, ...],
    padding: Padding,
    dilation: tuple[int, ...],
    groups: int,
) -> Any:
    """``jax.lax.conv_general_dilated`` (a cross-correlation, as torch's)."""
    from jax import lax

    return lax.conv_general_dilated(
        x,
        weight,
        window_strides=stride,
        padding=padding,
        rhs_dilation=dilation,
        dimension_numbers=_JAX_DIMENSIONS[len(stride)],
        feature_group_count=groups,
    )


register_conv("torch", _torch_conv)
register_conv("jax", _jax_conv)


# --------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class _Geometry:
    """The static facts of one convolution: channels, kernel, stride, padding, ..."""

    c_out: int
    c_in: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Padding
    dilation: tuple[int, ...]
    groups: int
    has_bias: bool

    @property
    def ndim(self) -> int:
        return len(self.kernel)

    @property
    def c_group(self) -> int:
        """C_in / groups: the input channels each output channel reads."""
        return self.c_in // self.groups

    def apply(self, xp: Any, hook: ConvHook, x: Array, weight: Array, groups: int) -> Array:
        return hook(
            xp,
            x,
            weight,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=groups,
        )


def _per_dimension(value: Any, ndim: int, argument: str, minimum: int) -> tuple[int, ...]:
    """An int or a tuple of ``ndim`` ints >= ``minimum``, as a tuple."""
    items = (value,) * ndim if isinstance(value, int) else value
    if (
        not isinstance(items, (tuple, list))
        or len(items) != ndim
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in items)
    ):
        kind = "a positive int" if minimum > 0 else "a non-negative int"
        raise ValueError(
            f"`{argument}` must be {kind} or a tuple of {ndim} such ints (one per spatial "
            f"dimension), got {value!r}"
        )
    return tuple(items)


def _padding(
    padding: Any,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
) -> Padding:
    """torch's ``padding`` (int, tuple, ``"valid"``, ``"same"``) as (before, after) pairs.

    ``"same"`` (stride 1 only, as in torch) pads d (k - 1) in total per dimension,
    ``total // 2`` before and the rest after.
    """
    ndim = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * ndim
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(
                    f"`padding='same'` needs stride 1 (as in torch), got stride={stride}"
                )
            pairs = []
            for k, d in zip(kernel, dilation, strict=True):
                total = d * (k - 1)
                pairs.append((total // 2, total - total // 2))
            return tuple(pairs)
        raise ValueError(
            f"`padding` must be 'valid', 'same', an int or a tuple of ints, got {padding!r}"
        )
    return tuple((p, p) for p in _per_dimension(padding, ndim, "padding", 0))


def _output_size(
    spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: Padding,
    dilation: tuple[int, ...],
) -> tuple[int, ...]:
    return tuple(
        (n + before + after - d * (k - 1) - 1) // s + 1
        for n, k, s, (before, after), d in zip(
            spatial, kernel, stride, padding, dilation, strict=True
        )
    )


def _conv_shapes(structure: Structure, groups: Any) -> tuple[int, int, tuple[int, ...], bool]:
    """(C_out, C_in, kernel, has_bias) of a conv layout, or a ``ValueError`` naming ``param``."""
    layout = structure.layout
    names = list(layout.names)
    if "weight" not in names or any(name not in _NAMES for name in names):
        raise ValueError(
            "`param` must have means named 'weight' (out_channels, in_channels/groups, "
            f"*kernel_size) and optionally 'bias' (out_channels,), got the names {names}"
        )
    weight_shape = layout.shapes[names.index("weight")]
    if len(weight_shape) not in (3, 4, 5):
        raise ValueError(
            "conv needs a `weight` mean of shape (out_channels, in_channels/groups, "
            f"*kernel_size) with 1, 2 or 3 kernel dimensions, got shape {weight_shape}"
        )
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"`groups` must be a positive int, got {groups!r}")
    c_out, c_group, *kernel = weight_shape
    if c_out % groups:
        raise ValueError(
            f"`groups` must divide out_channels {c_out} (the `weight` mean's first dimension), "
            f"got groups={groups}"
        )
    has_bias = "bias" in names
    if has_bias and layout.shapes[names.index("bias")] != (c_out,):
        raise ValueError(
            f"`param`'s 'bias' mean must have shape ({c_out},) (out_channels), got "
            f"{layout.shapes[names.index('bias')]}"
        )
    return c_out, c_group * groups, tuple(kernel), has_bias


def _check_x(
    x: Array,
    reference: Array,
    geometry: _Geometry,
    sample_shape: tuple[int, ...],
    per_sample: bool,
) -> Any:
    xp = _check_like(x, reference, "`x`")
    ndim = geometry.ndim
    sample_ndim = len(sample_shape) if per_sample else 0
    layout = f"({'*sample_shape, ' if per_sample else ''}*batch, in_channels, *spatial)"
    if x.ndim < sample_ndim + ndim + 1:
        raise ValueError(
            f"`x` must have at least {sample_ndim + ndim + 1} dimensions {layout} for a "
            f"{ndim}-D convolution, got shape {tuple(x.shape)}"
        )
    if x.shape[-ndim - 1] != geometry.c_in:
        raise ValueError(
            f"`x` must have {geometry.c_in} channels (in_channels = {geometry.c_group} x "
            f"groups {geometry.groups}) at dimension {-ndim - 1}, got shape {tuple(x.shape)}"
        )
    if per_sample and tuple(x.shape[:sample_ndim]) != sample_shape:
        raise ValueError(
            f"`x` must start with the sample dimensions {sample_shape} "
            f"(input_contains_samples=True), got shape {tuple(x.shape)}"
        )
    spatial = tuple(x.shape[-ndim:])
    out = _output_size(
        spatial, geometry.kernel, geometry.stride, geometry.padding, geometry.dilation
    )
    if any(n < 1 for n in out):
        dilated = tuple(
            d * (k - 1) + 1 for k, d in zip(geometry.kernel, geometry.dilation, strict=True)
        )
        raise ValueError(
            f"`x`'s spatial shape {spatial} is smaller than the dilated kernel {dilated} "
            f"after padding {geometry.padding}"
        )
    return xp


# --------------------------------------------------------------------- paths
def _spatial_ones(geometry: _Geometry) -> tuple[int, ...]:
    return (1,) * geometry.ndim


def _mean_forward(
    xp: Any, hook: ConvHook, geometry: _Geometry, x2: Array, means: Mapping[str, Array]
) -> Array:
    """conv(x, M) + b for x (N, C_in, *spatial): (N, C_out, *out). N C_out (C_in/g) k L."""
    out = geometry.apply(xp, hook, x2, means["weight"], geometry.groups)
    bias = means.get("bias")
    if bias is None:
        return out
    return out + xp.reshape(bias, (geometry.c_out, *_spatial_ones(geometry)))


def _apply_weights(
    xp: Any,
    hook: ConvHook,
    geometry: _Geometry,
    x2: Array,
    weight: Array,
    bias: Array | None,
) -> Array:
    """conv(x, W_s) + b_s for W (S, C_out, C_in/g, *k), b (S, C_out): (S, N, C_out, *out).

    One call of the backend's convolution for all samples: a convolution takes one
    weight for its whole batch, so samples cannot go into the batch axis (that would
    need a per-row weight, i.e. a vmap, which not every backend has). They go into
    the channels instead:

    - input shared by the samples, ``x2`` (N, C_in, *spatial): the S kernels are
      stacked as S C_out output channels (ordered group, sample, channel so each
      group still reads its own input channels), one convolution with ``groups``; the
      input is read once and never copied per sample.
    - per-sample input, ``x2`` (S, N, C_in, *spatial): samples become groups,
      (N, S C_in, *spatial) against (S C_out, C_in/g, *k) with S g groups.

    Cost: S N C_out (C_in/g) prod(k) L multiply-adds either way.
    """
    num_samples, g = weight.shape[0], geometry.groups
    c_out, c_group, kernel = geometry.c_out, geometry.c_group, geometry.kernel
    ones = _spatial_ones(geometry)
    if x2.ndim == geometry.ndim + 2:  # shared
        stacked = xp.reshape(weight, (num_samples, g, c_out // g, c_group, *kernel))
        stacked = xp.permute_dims(stacked, (1, 0, *range(2, stacked.ndim)))
        stacked = xp.reshape(stacked, (num_samples * c_out, c_group, *kernel))
        y = geometry.apply(xp, hook, x2, stacked, g)  # (N, g S C_out/g, *out)
        num_rows, out = y.shape[0], tuple(y.shape[2:])
        y = xp.reshape(y, (num_rows, g, num_samples, c_out // g, *out))
        y = xp.permute_dims(y, (2, 0, 1, *range(3, y.ndim)))
        y = xp.reshape(y, (num_samples, num_rows, c_out, *out))
    else:  # per sample: samples as groups
        num_rows, spatial = x2.shape[1], tuple(x2.shape[3:])
        folded = xp.permute_dims(x2, (1, 0, *range(2, x2.ndim)))
        folded = xp.reshape(folded, (num_rows, num_samples * geometry.c_in, *spatial))
        stacked = xp.reshape(weight, (num_samples * c_out, c_group, *kernel))
        y = geometry.apply(xp, hook, folded, stacked, num_samples * g)
        out = tuple(y.shape[2:])
        y = xp.reshape(y, (num_rows, num_samples, c_out, *out))
        y = xp.permute_dims(y, (1, 0, *range(2, y.ndim)))
    if bias is not None:
        y = y + xp.reshape(bias, (num_samples, 1, c_out, *ones))
    return y


def _kronecker_forward(
    xp: Any,
    hook: ConvHook,
    geometry: _Geometry,
    structure: Kronecker,
    storage: Storage,
    means: Mapping[str, Array],
    x2: Array,
    z: Array,
) -> Array:
    """conv(x, W_s) + b_s = conv(x, M) + b + sample_scale A (Z_s u): (S, N, C_out, *out).

    K-FAC (`Kronecker`): W~_s = [W_s.reshape(C_out, d_in) | b_s] = M~ + sample_scale
    A Z_s B^T with A = S_out (C_out, r_out), B = S_in (d_in + has_bias, r_in),
    d_in = (C_in/g) prod(k) in the weight's row-major order, Z_s the noise (r_out, r_in).
    A convolution is linear in its kernel, and column b of B reshaped to (C_in/g, *k)
    is a kernel, so

        conv(x, W_s)[o] + b_s[o] = conv(x, M)[o] + b[o]
                                   + sample_scale sum_a A[o, a] sum_b Z_s[a, b] u[b]
        u[b] = conv(x, B_w[:, b]) + B_b[b]

    (the bias column is an input that is 1 at every output position: a constant
    channel). With groups g the r_in kernels are applied to every group's input
    channels (one grouped convolution with g r_in output channels) and output channel
    o mixes only its group's u. No per-sample kernel is formed.
    """
    num_samples, g = z.shape[0], geometry.groups
    r_in, r_out = structure.input_rank, structure.output_rank
    # B's columns as kernels: (C_in/g, *k, r_in) -> (r_in, C_in/g, *k), once per group.
    kernels = storage["input_factor.weight"]
    kernels = xp.permute_dims(kernels, (kernels.ndim - 1, *range(kernels.ndim - 1)))
    if g > 1:
        kernels = xp.broadcast_to(xp.expand_dims(kernels, axis=0), (g, *kernels.shape))
        kernels = xp.reshape(kernels, (g * r_in, *kernels.shape[2:]))
    per_sample = x2.ndim == geometry.ndim + 3
    num_rows = x2.shape[1] if per_sample else x2.shape[0]
    flat = xp.reshape(x2, (num_samples * num_rows, *x2.shape[2:])) if per_sample else x2
    mean = _mean_forward(xp, hook, geometry, flat, means)  # (M, C_out, *out)
    u = geometry.apply(xp, hook, flat, kernels, g)  # (M, g r_in, *out)
    out = tuple(u.shape[2:])
    length = math.prod(out)
    u = xp.reshape(u, (*x2.shape[: x2.ndim - geometry.ndim - 1], g, r_in, length))
    if structure.has_bias:
        u = u + xp.reshape(storage["input_factor.bias"], (r_in, 1))
    if per_sample:
        mean = xp.reshape(mean, (num_samples, num_rows, *mean.shape[1:]))
    zz = xp.reshape(z, (num_samples, 1, 1, r_out, r_in))
    a = storage["output_factor"]
    if structure.sample_scale != 1.0:
        a = a * structure.sample_scale
    a = xp.reshape(a, (g, geometry.c_out // g, r_out))
    if _mix_noise_first(geometry, num_samples, num_rows, r_in, r_out, length):
        mixed = xp.matmul(zz, u)  # (S, N, g, r_out, L)
        noise = xp.matmul(a, mixed)  # (S, N, g, C_out/g, L)
    else:
        left = xp.matmul(a, zz)  # (S, 1, g, C_out/g, r_in)
        noise = xp.matmul(left, u)  # (S, N, g, C_out/g, L)
    noise = xp.reshape(noise, (num_samples, num_rows, geometry.c_out, *out))
    return mean + noise


def _mix_noise_first(
    geometry: _Geometry, num_samples: int, num_rows: int, r_in: int, r_out: int, length: int
) -> bool:
    """Whether A (Z_s u) is cheaper than (A Z_s) u, from static shapes (ties: Z_s u).

    Z_s u first: S N g r_out r_in L + S N C_out r_out L; A Z_s first:
    S C_out r_out r_in + S N C_out r_in L.
    """
    s, n, c_out, g = num_samples, num_rows, geometry.c_out, geometry.groups
    noise_first = s * n * g * r_out * r_in * length + s * n * c_out * r_out * length
    factor_first = s * c_out * r_out * r_in + s * n * c_out * r_in * length
    return noise_first <= factor_first


# --------------------------------------------------------------------- public
def conv(
    x: Array,
    param: Any,
    /,
    sample_shape: Any = (),
    generator: Any = None,
    *,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    input_contains_samples: bool = False,
    parameter_samples: Mapping[str, Array] | None = None,
) -> Array:
    r"""A 1-, 2- or 3-D convolution with Gaussian parameters: ``y_s = conv(x, W_s) + b_s``.

    ``(W_s, b_s) ~ N(mean, Sigma)``: one parameter draw per sample index ``s``, shared
    by every row of the batch. The draw is ``mean + S z_s`` with z of shape
    ``(*sample_shape, K)`` drawn through the RNG seam exactly as ``param.sample`` draws
    it, so with the same generator state the output equals the convolution with the
    weights of ``param.sample(sample_shape, generator)``. The convolution is torch's:
    a cross-correlation, ``y[n, o, p] = b[o] + sum_{c, j} W[o, c, j]
    x_pad[n, g(o) C_in/groups + c, p * stride + j * dilation]`` with zero padding.

    Parameters
    ----------
    x
        Input of shape ``(*batch, in_channels, *spatial)`` (``(*sample_shape, *batch,
        in_channels, *spatial)`` with ``input_contains_samples=True``), in the
        parameter's namespace, dtype and device; ``batch`` may be empty.
    param
        A structcov Gaussian parameter (core or adapter) whose means are named
        ``"weight"`` of shape ``(out_channels, in_channels / groups, *kernel_size)``
        (1 to 3 kernel dimensions: the number of spatial dimensions) and optionally
        ``"bias"`` of shape ``(out_channels,)``.
    sample_shape
        Leading sample dimensions (an int or a tuple). ``None``: the mean forward
        ``conv(x, M) + b`` (output ``(*batch, out_channels, *spatial_out)``).
    generator
        A backend generator (a key for JAX) or ``None``. Ignored with
        ``parameter_samples``.
    stride, dilation
        A positive int or a tuple with one per spatial dimension.
    padding
        Zeros added before and after each spatial dimension: a non-negative int, a
        tuple with one per spatial dimension, ``"valid"`` (0) or ``"same"`` (stride 1
        only; ``dilation (k - 1)`` in total, the odd one after, as torch does).
    groups
        Blocked connections: input and output channels split into ``groups`` groups,
        output group ``i`` reading input group ``i`` only. Must divide out_channels.
    input_contains_samples
        ``x`` already starts with ``sample_shape``: sample ``s`` uses its own ``x_s``.
    parameter_samples
        name -> array of shape ``(*sample_shape, *mean.shape)``: use these parameter
        samples instead of drawing.

    Returns
    -------
    array
        Shape ``(*sample_shape, *batch, out_channels, *spatial_out)``,
        ``spatial_out[d] = (spatial[d] + 2 padding[d] - dilation[d] (k[d] - 1) - 1)
        // stride[d] + 1``, in the parameter's namespace, dtype and device.

    Notes
    -----
    Costs in multiply-adds, for S = prod(sample_shape), N = prod(batch), C_out,
    C_in, g = groups, k = prod(kernel_size), L = prod(spatial_out),
    P = C_out (C_in/g) k + has_bias parameters, K factor columns. One convolution of
    the mean (or of the samples' weights) costs N C_out (C_in/g) k L.

    - `Kronecker` (K-FAC, the weight flattened row-major to (C_out, (C_in/g) k) and
      the bias as the extra input column; W~ = M~ + sample_scale A Z B^T)::

          conv(x, W_s) + b_s = conv(x, M) + b + sample_scale A (Z_s u),
          u = conv(x, B_w as r_in kernels) + B_b

      the mean convolution and one convolution with the r_in columns of S_in as
      kernels (N g r_in (C_in/g) k L), each once (per sample with
      ``input_contains_samples``), then per sample only rank-sized products: the
      cheaper of S N L (g r_out r_in + C_out r_out) and S C_out r_out r_in +
      S N C_out r_in L. No per-sample kernel is formed; every ``groups`` works.
    - Every other structure (`Factorized`, low rank, `Diagonal`,
      `LowRankPlusDiagonal`): the per-sample weights W_s = M + S z_s through the
      structure's ``blocks`` (S P K; S P for `Diagonal`), then one convolution for all
      samples, samples folded into the output channels for a shared input or into
      the groups for a per-sample input (S N C_out (C_in/g) k L).
    - ``sample_shape=None``: N C_out (C_in/g) k L; given ``parameter_samples``,
      S N C_out (C_in/g) k L.

    The convolution itself is `register_conv`'s hook: torch's ``conv{1,2,3}d``,
    ``jax.lax.conv_general_dilated``, or `array_api_conv` (the same multiply-adds in
    k GEMMs) for NumPy, array_api_strict, CuPy and dask. Every choice depends on
    static shapes only, so the call is ``jax.jit``-safe and stays lazy on dask.
    """
    gaussian = _gaussian(param, "param")
    structure, storage, mean = gaussian._parts()
    c_out, c_in, kernel, has_bias = _conv_shapes(structure, groups)
    names = structure.layout.names
    means = {name: mean[name] for name in names}
    reference = means["weight"]
    ndim = len(kernel)
    stride_t = _per_dimension(stride, ndim, "stride", 1)
    dilation_t = _per_dimension(dilation, ndim, "dilation", 1)
    geometry = _Geometry(
        c_out,
        c_in,
        kernel,
        stride_t,
        _padding(padding, kernel, stride_t, dilation_t),
        dilation_t,
        groups,
        has_bias,
    )
    shape = None if sample_shape is None else sample_shape_of(sample_shape)
    per_sample = input_contains_samples and bool(shape)
    if shape is None and (input_contains_samples or parameter_samples is not None):
        argument = "input_contains_samples" if input_contains_samples else "parameter_samples"
        raise ValueError(f"`{argument}` needs a `sample_shape`, got sample_shape=None")
    xp = _check_x(x, reference, geometry, shape or (), per_sample)
    hook = _hook(xp)

    sample_ndim = len(shape) if per_sample and shape is not None else 0
    batch = tuple(x.shape[sample_ndim : -ndim - 1])
    spatial = tuple(x.shape[-ndim:])
    num_rows = math.prod(batch)
    num_samples = 1 if shape is None else math.prod(shape)
    x2 = xp.reshape(
        x,
        (num_samples, num_rows, c_in, *spatial) if per_sample else (num_rows, c_in, *spatial),
    )
    out_spatial = _output_size(spatial, kernel, stride_t, geometry.padding, dilation_t)

    if shape is None:
        y = _mean_forward(xp, hook, geometry, x2, means)
        return xp.reshape(y, (*batch, c_out, *out_spatial))
    out_shape = (*shape, *batch, c_out, *out_spatial)
    if parameter_samples is not None:
        given = _given_samples(parameter_samples, structure, reference, shape)
        weight = xp.reshape(given["weight"], (num_samples, c_out, c_in // groups, *kernel))
        bias = given.get("bias")
        if bias is not None:
            bias = xp.reshape(bias, (num_samples, c_out))
        y = _apply_weights(xp, hook, geometry, x2, weight, bias)
        return xp.reshape(y, out_shape)

    z = draw_noise(structure, storage, means, shape, generator)
    z2 = xp.reshape(z, (num_samples, structure.num_factor_columns))
    if isinstance(structure, Kronecker):
        y = _kronecker_forward(xp, hook, geometry, structure, storage, means, x2, z2)
    else:
        formed = _formed_weights(xp, structure, storage, means, z2)
        y = _apply_weights(xp, hook, geometry, x2, formed["weight"], formed.get("bias"))
    return xp.reshape(y, out_shape)
