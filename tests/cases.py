"""The shared factory list of (structure, mean shapes) cases used by every oracle test.

A *mean spec* maps names to shapes, or to ``None`` for an absent entry
(``bias=None``); the special spec :data:`BARE` stands for a bare array.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import structcov as sc
from oracle import flat_layout

BARE = "bare"

#: id -> mean spec. Weight shapes are (d_out, *in_shape).
MEAN_SPECS: dict[str, Any] = {
    "weight+bias": {"weight": (3, 4), "bias": (3,)},
    "weight-only": {"weight": (2, 5)},
    "bias-None": {"weight": (3, 2), "bias": None},
    "single-element": {"w": (1,)},
    "conv4d+bias": {"weight": (2, 3, 2, 2), "bias": (2,)},
    "bare-array": (BARE, (4, 3)),
    "bias-first": {"bias": (2,), "weight": (2, 3)},
}

#: id -> (factory, needs a layer: weight (+ bias) only)
STRUCTURES: dict[str, tuple[Callable[[], sc.FactorizedCovariance], bool]] = {
    "factorized-full": (lambda: sc.FactorizedCovariance(), False),
    "factorized-rank3": (lambda: sc.FactorizedCovariance(rank=3), False),
    "diagonal": (lambda: sc.DiagonalCovariance(), False),
    "lowrank-2": (lambda: sc.LowRankCovariance(2), False),
    "lowrank-clamped": (lambda: sc.LowRankCovariance(1000), False),
    "lowrank+diag-2": (lambda: sc.LowRankPlusDiagonalCovariance(2), False),
    "kronecker-full": (lambda: sc.KroneckerCovariance(), True),
    "kronecker-2x1": (lambda: sc.KroneckerCovariance(input_rank=2, output_rank=1), True),
}


def is_layer(spec: Any) -> bool:
    if not isinstance(spec, dict):
        return False
    present = [k for k, v in spec.items() if v is not None]
    return "weight" in present and set(present) <= {"weight", "bias"} and len(spec["weight"]) >= 2


@dataclass(frozen=True)
class Case:
    id: str
    structure: str
    spec: Any

    def make_cov(self) -> sc.FactorizedCovariance:
        return STRUCTURES[self.structure][0]()

    def make_mean(self, backend: Any, dtype: str, rng: np.random.Generator) -> Any:
        """Means as backend arrays of ``dtype`` (a dict, or a bare array)."""
        if isinstance(self.spec, tuple):
            return backend.asarray(rng.standard_normal(self.spec[1]), dtype)
        return {
            name: None if shape is None else backend.asarray(rng.standard_normal(shape), dtype)
            for name, shape in self.spec.items()
        }


CASES: list[Case] = [
    Case(f"{structure}-{spec_id}", structure, spec)
    for structure, (_, needs_layer) in STRUCTURES.items()
    for spec_id, spec in MEAN_SPECS.items()
    if not needs_layer or is_layer(spec)
]
CASE_IDS = [case.id for case in CASES]


def make_parameter(
    case: Case, backend: Any, dtype: str, seed: int = 0
) -> tuple[sc.GaussianParameter, Any]:
    """A GaussianParameter of ``case`` with random means and covariance parameters."""
    rng = np.random.default_rng(seed)
    mean = case.make_mean(backend, dtype, rng)
    cov = case.make_cov()
    param = sc.GaussianParameter(mean, cov)
    cov.reset_parameters(1.0, generator=backend.generator(seed + 1))
    return param, mean


def well_conditioned(cov: Any, mean: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Float64 storage by path with a dominant diagonal, laid out from the means alone.

    Square factors are I + 0.1 N (rows in the flat order; the Kronecker bias row
    last); non-square factors 0.5 N; diagonal scales (1 + 0.1 N) with random signs
    (only |s| may matter); low rank plus diagonal U = 0.3 N and d as the scales.
    """
    layout = flat_layout(mean)
    shapes = {path: tuple(array.shape) for path, array in cov.storage().items()}

    def square_or_not(rows: int, columns: int) -> np.ndarray:
        if rows == columns:
            return np.eye(rows) + 0.1 * rng.standard_normal((rows, rows))
        return 0.5 * rng.standard_normal((rows, columns))

    def scales(shape: tuple[int, ...]) -> np.ndarray:
        signs = rng.choice([-1.0, 1.0], size=shape)
        return signs * (1.0 + 0.1 * rng.standard_normal(shape))

    out: dict[str, np.ndarray] = {}
    kind = type(cov)
    if kind is sc.KroneckerCovariance:
        d_out, r_out = shapes["output_factor"]
        out["output_factor"] = square_or_not(d_out, r_out)
        in_shape = layout.shapes[layout.names.index("weight")][1:]
        d_in, r_in = math.prod(in_shape), shapes["input_factor.weight"][-1]
        has_bias = "bias" in layout.names
        s_in = square_or_not(d_in + int(has_bias), r_in)
        out["input_factor.weight"] = s_in[:d_in].reshape((*in_shape, r_in))
        if has_bias:
            out["input_factor.bias"] = s_in[d_in:]
    elif kind is sc.DiagonalCovariance:
        for name, shape in zip(layout.names, layout.shapes, strict=True):
            out[f"scale.{name}"] = scales(shape)
    elif kind is sc.LowRankPlusDiagonalCovariance:
        for name, shape in zip(layout.names, layout.shapes, strict=True):
            out[f"factor.{name}"] = 0.3 * rng.standard_normal(shapes[f"factor.{name}"])
            out[f"scale.{name}"] = scales(shape)
    else:  # FactorizedCovariance, LowRankCovariance
        rank = shapes[f"factor.{layout.names[0]}"][-1]
        s = square_or_not(layout.num_params, rank)
        for name, shape in zip(layout.names, layout.shapes, strict=True):
            out[f"factor.{name}"] = s[layout.slots[name]].reshape((*shape, rank))
    assert {p: v.shape for p, v in out.items()} == shapes
    return out
