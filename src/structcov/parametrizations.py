r"""Parametrizations: initial scales and learning-rate scales of a layer's parameters.

A parametrization says, for a layer with ``fan_in`` inputs and ``fan_out`` outputs
of type ``"input"``, ``"hidden"`` or ``"output"``, the std of the initial draw of
its weight and bias means and the factor its learning rate is multiplied by. The
layers (`structcov.torch.Linear`, the convolutions, the JAX layers) apply them the
same way:

- the means are drawn ``N(0, init_scale^2)``, name by name;
- the covariance is reset at the same per-name scales
  (``cov.reset_parameters({"weight": w, "bias": b})``, the seed's meaning of
  ``mean_parameter_scales``);
- the learning rate of a mean is ``lr * lr_scale``; of a covariance array,
  ``lr * lr_scale(weight) * cov.lr_scaling[path]`` (the weight's factor: a
  covariance array such as a Kronecker factor couples weight and bias, and the
  weight has the most entries).

All three are written in the *standard* form (no forward multipliers): the layer
computes ``x W^T + b`` in every parametrization, and a parametrization with
multipliers (NTP's ``W / sqrt(fan_in)``) is turned into the equivalent initial
scale and learning rate of ``W`` itself. For plain SGD, ``W = n^{-1/2} w`` trained
at rate η moves ``W`` at rate η/n; for Adam (invariant to gradient scale) at
η/sqrt(n). This keeps the function and the training dynamics of the cited
parametrization exactly, while every layer stays an ordinary one.

``fan_in`` of a convolution is ``C_in / groups * prod(kernel)``, ``fan_out``
``C_out * prod(kernel)`` (`fans`), as ``torch.nn.init`` computes them.

References: Standard — LeCun et al. (1998), "Efficient BackProp"; He et al. (2015),
arXiv:1502.01852. Neural tangent — Jacot, Gabriel and Hongler (2018), "Neural
Tangent Kernel", arXiv:1806.07572. Maximal update (μP) — Yang and Hu (2021),
"Tensor Programs IV", arXiv:2011.14522; Yang et al. (2022), "Tensor Programs V",
arXiv:2203.03466 (Table 3, whose bias conventions are followed here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

__all__ = [
    "LayerType",
    "MaximalUpdate",
    "NeuralTangent",
    "Optimizer",
    "Parametrization",
    "Standard",
    "check_layer_type",
    "fans",
]

LayerType = Literal["input", "hidden", "output"]
#: ``"sgd"`` (plain or momentum SGD) or ``"adam"`` (any optimizer whose step is
#: invariant to the gradient's scale: Adam, AdamW, RMSProp). Case-insensitive.
Optimizer = Literal["sgd", "adam"]


def check_layer_type(layer_type: object) -> LayerType:
    """``layer_type`` if it is ``"input"``, ``"hidden"`` or ``"output"``, else ``ValueError``."""
    if layer_type not in get_args(LayerType):
        raise ValueError(
            f"`layer_type` must be one of {list(get_args(LayerType))}, got {layer_type!r}"
        )
    return layer_type  # type: ignore[return-value]


def _optimizer(optimizer: object) -> Optimizer:
    name = optimizer.lower() if isinstance(optimizer, str) else optimizer
    if name == "adamw" or name == "rmsprop":
        return "adam"
    if name not in get_args(Optimizer):
        raise ValueError(
            "`optimizer` must be 'sgd' or 'adam' (also 'adamw', 'rmsprop'; any case), "
            f"got {optimizer!r}"
        )
    return name  # type: ignore[return-value]


def _check_fans(fan_in: object, fan_out: object) -> None:
    for argument, value in (("fan_in", fan_in), ("fan_out", fan_out)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{argument}` must be an int >= 1, got {value!r}")


def fans(weight_shape: Sequence[int]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight ``(out, in, *kernel)``, as ``torch.nn.init`` has them."""
    shape = tuple(weight_shape)
    if len(shape) < 2:
        raise ValueError(f"a layer weight has at least 2 axes (out, in, *kernel), got {shape}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


class Parametrization:
    """Initial scales and learning-rate scales by layer (the interface; see the module).

    Subclasses define the four ``*_scale`` methods; `init_scales` and `lr_scales`
    gather them per mean name. Instances are immutable and compare equal by type.
    """

    def weight_init_scale(
        self, fan_in: int, fan_out: int, layer_type: LayerType = "hidden"
    ) -> float:
        """Std of the weight mean's initial draw."""
        raise NotImplementedError

    def bias_init_scale(self, fan_in: int, fan_out: int, layer_type: LayerType = "hidden") -> float:
        """Std of the bias mean's initial draw."""
        raise NotImplementedError

    def weight_lr_scale(
        self, fan_in: int, fan_out: int, optimizer: str = "adam", layer_type: LayerType = "hidden"
    ) -> float:
        """Factor of the weight's learning rate (and of its covariance arrays')."""
        raise NotImplementedError

    def bias_lr_scale(
        self, fan_in: int, fan_out: int, optimizer: str = "adam", layer_type: LayerType = "hidden"
    ) -> float:
        """Factor of the bias's learning rate."""
        raise NotImplementedError

    def init_scales(
        self, fan_in: int, fan_out: int, layer_type: LayerType = "hidden"
    ) -> dict[str, float]:
        """``{"weight": ..., "bias": ...}``: the means' initial stds (also the covariance's)."""
        _check_fans(fan_in, fan_out)
        layer_type = check_layer_type(layer_type)
        return {
            "weight": self.weight_init_scale(fan_in, fan_out, layer_type),
            "bias": self.bias_init_scale(fan_in, fan_out, layer_type),
        }

    def lr_scales(
        self, fan_in: int, fan_out: int, optimizer: str = "adam", layer_type: LayerType = "hidden"
    ) -> dict[str, float]:
        """``{"weight": ..., "bias": ...}``: the learning-rate factors for ``optimizer``."""
        _check_fans(fan_in, fan_out)
        layer_type = check_layer_type(layer_type)
        kind = _optimizer(optimizer)
        return {
            "weight": self.weight_lr_scale(fan_in, fan_out, kind, layer_type),
            "bias": self.bias_lr_scale(fan_in, fan_out, kind, layer_type),
        }

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Standard(Parametrization):
    """Standard parametrization (SP): weights N(0, 1/fan_in), biases N(0, 1), one learning rate.

    The "LeCun"/fan-in initialisation (PyTorch's default draws the same variance
    scale, uniformly, up to a constant). Biases follow Tensor Programs V, Table 3:
    variance 1 (a bias's fan-in is 1), where ``torch.nn.Linear`` draws them in
    ±1/sqrt(fan_in). Learning rates are not scaled.
    """

    def weight_init_scale(
        self, fan_in: int, fan_out: int, layer_type: LayerType = "hidden"
    ) -> float:
        return 1.0 / math.sqrt(fan_in)

    def bias_init_scale(self, fan_in: int, fan_out: int, layer_type: LayerType = "hidden") -> float:
        return 1.0

    def weight_lr_scale(
        self, fan_in: int, fan_out: int, optimizer: str = "adam", layer_type: LayerType = "hidden"
    ) -> float:
        return 1.0

    def bias_lr_scale(
        self, fan_in: int, fan_out: int, optimizer: str = "adam", layer_type: LayerType = "hidden"
    ) -> float:
        return 1.0


class NeuralTangent(Parametrization):
    """Neural tangent parametrization (NTP, Jacot et al. 2018) in standard form.

    NTP computes ``x w^T / sqrt(fan_in) + b`` with ``w, b ~ N(0, 1)`` and one
    learning rate η. Written on ``W = w / sqrt(fan_in)``: weights N(0, 1/fan_in)
    (the same function at initialisation), weight learning rate η / fan_in under
    SGD and η / sqrt(fan_in) under Adam (see the module); the bias has multiplier 1,
    so N(0, 1) and an unscaled rate. Every layer type is treated alike (the input
    layer's multiplier is 1/sqrt(fan_in) too). NTP learns no features in the
    infinite-width limit; use `MaximalUpdate` to transfer learning rates across widths.
    """

    def weight_init_scale(
        self, fan_in: int, fan_out: int, layer_type: LayerType = "hidden"
    ) -> float:
        return 1.0 / math.sqrt(fan_in)

    def bias_init_scale(self, fan_in: int, fan_out: int, layer_type: LayerType = "hidden") -> float:
        return 1.0

    def weight_lr_scale(
        self, fan_in: int, fan_out: int, optimizer: str = "adam", layer_type: LayerType = "hidden"
    ) -> float:
        return 1.0 / fan_in if _optimizer(optimizer) == "sgd" else 1.0 / math.sqrt(fan_in)

    def bias_lr_scale(
        self, fan_in: int, fan_out: int, optimizer: str = "adam", layer_type: LayerType = "hidden"
    ) -> float:
        return 1.0


class MaximalUpdate(Parametrization):
    """Maximal update parametrization (μP; Tensor Programs IV and V, Table 3).

    Initial stds: input and hidden weights 1/sqrt(fan_in), output weights 1/fan_in,
    biases 1. Learning-rate factors:

    ======== ============= ============= =============
    type     input weight  hidden weight output weight
    ======== ============= ============= =============
    SGD      fan_out       1             1/fan_in
    Adam     1             1/fan_in      1/fan_in
    ======== ============= ============= =============

    biases: fan_out under SGD, 1 under Adam. Activations and their updates stay
    O(1) as the width grows, so a learning rate tuned on a narrow model transfers to
    a wide one.
    """

    def weight_init_scale(
        self, fan_in: int, fan_out: int, layer_type: LayerType = "hidden"
    ) -> float:
        return 1.0 / fan_in if layer_type == "output" else 1.0 / math.sqrt(fan_in)

    def bias_init_scale(self, fan_in: int, fan_out: int, layer_type: LayerType = "hidden") -> float:
        return 1.0

    def weight_lr_scale(
        self, fan_in: int, fan_out: int, optimizer: str = "adam", layer_type: LayerType = "hidden"
    ) -> float:
        if layer_type == "output":
            return 1.0 / fan_in
        if _optimizer(optimizer) == "sgd":
            return float(fan_out) if layer_type == "input" else 1.0
        return 1.0 if layer_type == "input" else 1.0 / fan_in

    def bias_lr_scale(
        self, fan_in: int, fan_out: int, optimizer: str = "adam", layer_type: LayerType = "hidden"
    ) -> float:
        return float(fan_out) if _optimizer(optimizer) == "sgd" else 1.0
