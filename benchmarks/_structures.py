"""The benchmarked structures: data, the structcov call, the native version and the floor.

Every structure covers a dense layer with ``weight`` ``(d_out, d_in)`` and ``bias``
``(d_out,)`` (``P = d_out * (d_in + 1)``), float32. Its arrays are created once with
NumPy as *flat* native storage (e.g. one ``(P, r)`` factor); structcov gets per-name
views of the same buffers (NumPy, CPU torch), so no variant pays for a copy the other
does not.

Three variants per operation, all written against the backend's own module
(``numpy``, ``torch``, ``jax.numpy``, ``cupy``: ``kit.lib``), never structcov:

* **native**: the same maths hand-written as a user would, e.g. ``m + z @ F.T`` for a
  low-rank sample, returning the same per-name outputs (views/slices of one flat result);
* **floor**: the unavoidable kernel(s) of the same shapes and nothing else: for
  ``sample``/``factor_matmul`` the factor product without the additive constant
  and without the per-name split (one GEMM; one elementwise pass for the diagonal; the
  two GEMMs of a Kronecker product with the batch folded into 2-D GEMMs), for
  ``matmul`` the GEMMs alone, for the reductions the dominant kernel (the Gram GEMM
  ``U^T D^-1 U`` for low rank plus diagonal, one elementwise pass over the factor for
  low rank and diagonal, the LU of the factors for ``logdet``/KL of square factors).

``FLOORS`` and ``NATIVES`` below describe each one in words; the docs table is made
from them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

import structcov as sc

__all__ = ["OPERATIONS", "STRUCTURES", "Layer", "Structure", "sample_batch"]

#: Operations measured for every structure, in report order.
OPERATIONS = ("sample", "factor_matmul", "matmul", "diagonal", "trace", "logdet", "kl")

#: Vectors per ``matmul`` call.
MATMUL_BATCH = 8

NativeFn = Callable[[Any, dict[str, Any], dict[str, Any]], Any]


#: at most this many standard normals (B K) and outputs (B P) per ``sample`` call
MAX_NORMALS = 16_000_000
MAX_OUTPUTS = 64_000_000


def sample_batch(num_params: int, num_columns: int) -> int:
    """Samples B per ``sample``/``factor_matmul`` call: 64, fewer where B K or B P is large.

    64 up to P = 1e6 for low rank (K = 32) and up to P = 2.5e5 where K is about P; at
    P = 1e6 the diagonal draws 16 and low rank plus diagonal 15, at P = 1e7 one. Drawing
    normals dominates those calls (JAX's threefry and NumPy's generator alike), and the
    full run must fit in about ten minutes on two cores.
    """
    return max(1, min(64, MAX_NORMALS // num_columns, MAX_OUTPUTS // num_params))


@dataclass(frozen=True)
class Layer:
    """A dense layer's parameter layout and the sample batch B used with it."""

    d_out: int
    d_in: int
    batch: int = 64

    @property
    def num_params(self) -> int:
        return self.d_out * (self.d_in + 1)

    @property
    def n_weight(self) -> int:
        return self.d_out * self.d_in

    names = ("weight", "bias")

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return ((self.d_out, self.d_in), (self.d_out,))

    def split(self, flat: Any) -> dict[str, Any]:
        """A native ``(B, P)`` result as the per-name outputs structcov returns (views)."""
        batch, n = flat.shape[0], self.n_weight
        return {
            "weight": flat[:, :n].reshape(batch, self.d_out, self.d_in),
            "bias": flat[:, n:],
        }

    def mean_views(self, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return m[: self.n_weight].reshape(self.d_out, self.d_in), m[self.n_weight :]


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _positive(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    return (scale * (0.5 + rng.random(size, dtype=np.float32))).astype(np.float32)


class Structure:
    """One covariance structure: how to build it, and its native and floor variants."""

    key = ""
    #: largest P benchmarked by default (memory and time on a 2-core machine)
    max_params = 10**7
    #: operations that are not timed, with the reason
    skips: ClassVar[dict[str, str]] = {}

    @property
    def label(self) -> str:
        raise NotImplementedError

    def make_cov(self) -> sc.FactorizedCovariance:
        raise NotImplementedError

    def num_columns(self, layer: Layer) -> int:
        """K, the standard normals per sample."""
        raise NotImplementedError

    def arrays(self, layer: Layer, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Flat native storage (always ``m``, the flat mean), float32."""
        raise NotImplementedError

    def storage(self, layer: Layer, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """structcov's storage paths -> views of the flat arrays."""
        raise NotImplementedError

    def native(self, kit: Any, layer: Layer, op: str) -> NativeFn:
        raise NotImplementedError

    def floor(self, kit: Any, layer: Layer, op: str) -> NativeFn:
        raise NotImplementedError

    def floor_extras(
        self, layer: Layer, flat: dict[str, np.ndarray], op: str, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """Operands the floor takes ready-made (e.g. ``U / d^2`` for the Gram GEMM)."""
        return {}

    natives: ClassVar[dict[str, str]] = {}
    floors: ClassVar[dict[str, str]] = {}


# ---------------------------------------------------------------------- diagonal
class Diagonal(Structure):
    key = "diagonal"
    natives: ClassVar[dict[str, str]] = {
        "sample": "`randn(B, P) * s + m`",
        "factor_matmul": "`z * s + m`",
        "matmul": "`x * s**2`",
        "diagonal": "`s * s`",
        "trace": "`sum(s * s)`",
        "logdet": "`2 sum(log(abs(s)))`",
        "kl": "`0.5 sum(s² - 1 - log s² + m²)`",
    }
    floors: ClassVar[dict[str, str]] = {
        "sample": "`randn(B, P) * s` (draw + one elementwise pass)",
        "factor_matmul": "`z * s` (one elementwise pass)",
        "matmul": "`x * v`, v = s² precomputed (one pass)",
        "diagonal": "`s * s` (one pass over P)",
        "trace": "`s * s` (one pass over P)",
        "logdet": "`s * s` (one pass over P)",
        "kl": "`s * s` (one pass over P)",
    }

    @property
    def label(self) -> str:
        return "DiagonalCovariance()"

    def make_cov(self) -> sc.FactorizedCovariance:
        # identity: the stored scale is the s the native baselines read (softplus would
        # add one elementwise pass to both)
        return sc.DiagonalCovariance(scale_transform="identity")

    def num_columns(self, layer: Layer) -> int:
        return layer.num_params

    def arrays(self, layer: Layer, rng: np.random.Generator) -> dict[str, np.ndarray]:
        p = layer.num_params
        return {"m": _normal(rng, (p,), 0.1), "s": _positive(rng, p, 0.1)}

    def storage(self, layer: Layer, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        weight, bias = layer.mean_views(flat["s"])
        return {"scale.weight": weight, "scale.bias": bias}

    def native(self, kit: Any, layer: Layer, op: str) -> NativeFn:
        lib, batch, p, split = kit.lib, layer.batch, layer.num_params, layer.split
        functions: dict[str, NativeFn] = {
            "sample": lambda g, a, e: split(kit.randn(g, (batch, p)) * a["s"] + a["m"]),
            "factor_matmul": lambda g, a, e: split(e["z"] * a["s"] + a["m"]),
            "matmul": lambda g, a, e: e["x"] * (a["s"] * a["s"]),
            "diagonal": lambda g, a, e: a["s"] * a["s"],
            "trace": lambda g, a, e: (a["s"] * a["s"]).sum(),
            "logdet": lambda g, a, e: 2.0 * lib.log(lib.abs(a["s"])).sum(),
            "kl": lambda g, a, e: _diagonal_kl(lib, a["s"] * a["s"], a["m"]),
        }
        return functions[op]

    def floor(self, kit: Any, layer: Layer, op: str) -> NativeFn:
        batch, p = layer.batch, layer.num_params
        if op == "sample":
            return lambda g, a, e: kit.randn(g, (batch, p)) * a["s"]
        if op == "factor_matmul":
            return lambda g, a, e: e["z"] * a["s"]
        if op == "matmul":
            return lambda g, a, e: e["x"] * e["v"]
        return lambda g, a, e: a["s"] * a["s"]

    def floor_extras(
        self, layer: Layer, flat: dict[str, np.ndarray], op: str, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        return {"v": flat["s"] * flat["s"]} if op == "matmul" else {}


def _diagonal_kl(lib: Any, variances: Any, mean: Any) -> Any:
    return 0.5 * ((variances - 1.0 - lib.log(variances)).sum() + (mean * mean).sum())


# ---------------------------------------------------------------------- low rank
class LowRank(Structure):
    key = "low_rank"
    max_params = 10**6
    skips: ClassVar[dict[str, str]] = {
        "logdet": "singular (rank < P): logdet is -inf by construction, nothing to time",
        "kl": "singular (rank < P): KL to a full-rank prior is +inf by construction",
    }
    natives: ClassVar[dict[str, str]] = {
        "sample": "`m + randn(B, r) @ F.T`",
        "factor_matmul": "`m + z @ F.T`",
        "matmul": "`(x @ F) @ F.T`",
        "diagonal": "`sum(F * F, 1)`",
        "trace": "`sum(F * F)`",
        "logdet": "`2 slogdet(F)` (square F)",
        "kl": "`0.5 (sum(F * F) - P + sum(m²) - 2 slogdet(F))` (square F)",
    }
    floors: ClassVar[dict[str, str]] = {
        "sample": "`randn(B, K) @ F.T` (draw + one GEMM)",
        "factor_matmul": "`z @ F.T` (one GEMM)",
        "matmul": "`(x @ F) @ F.T` (the two GEMMs)",
        "diagonal": "`F * F` (one elementwise pass over the factor)",
        "trace": "`F * F` (one elementwise pass over the factor)",
        "logdet": "`slogdet(F)` (LU of the square factor)",
        "kl": "`slogdet(F)` (LU of the square factor)",
    }

    def __init__(self, rank: int = 32) -> None:
        self.rank = rank

    @property
    def label(self) -> str:
        return f"LowRankCovariance({self.rank})"

    def make_cov(self) -> sc.FactorizedCovariance:
        return sc.LowRankCovariance(self.rank)

    def num_columns(self, layer: Layer) -> int:
        return self.rank

    def arrays(self, layer: Layer, rng: np.random.Generator) -> dict[str, np.ndarray]:
        p, k = layer.num_params, self.num_columns(layer)
        return {"m": _normal(rng, (p,), 0.1), "F": _normal(rng, (p, k), 0.1 / np.sqrt(k))}

    def storage(self, layer: Layer, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, k, f = layer.n_weight, self.num_columns(layer), flat["F"]
        return {
            "factor.weight": f[:n].reshape(layer.d_out, layer.d_in, k),
            "factor.bias": f[n:],
        }

    def native(self, kit: Any, layer: Layer, op: str) -> NativeFn:
        lib, batch, k, p, split = kit.lib, layer.batch, self.num_columns(layer), *_pl(layer)
        functions: dict[str, NativeFn] = {
            "sample": lambda g, a, e: split(a["m"] + kit.randn(g, (batch, k)) @ a["F"].T),
            "factor_matmul": lambda g, a, e: split(a["m"] + e["z"] @ a["F"].T),
            "matmul": lambda g, a, e: (e["x"] @ a["F"]) @ a["F"].T,
            "diagonal": lambda g, a, e: (a["F"] * a["F"]).sum(1),
            "trace": lambda g, a, e: (a["F"] * a["F"]).sum(),
            "logdet": lambda g, a, e: 2.0 * lib.linalg.slogdet(a["F"])[1],
            "kl": lambda g, a, e: (
                0.5
                * (
                    (a["F"] * a["F"]).sum()
                    - p
                    + (a["m"] * a["m"]).sum()
                    - 2.0 * lib.linalg.slogdet(a["F"])[1]
                )
            ),
        }
        return functions[op]

    def floor(self, kit: Any, layer: Layer, op: str) -> NativeFn:
        lib, batch, k = kit.lib, layer.batch, self.num_columns(layer)
        if op == "sample":
            return lambda g, a, e: kit.randn(g, (batch, k)) @ a["F"].T
        if op == "factor_matmul":
            return lambda g, a, e: e["z"] @ a["F"].T
        if op == "matmul":
            return lambda g, a, e: (e["x"] @ a["F"]) @ a["F"].T
        if op in ("logdet", "kl"):
            return lambda g, a, e: lib.linalg.slogdet(a["F"])[1]
        return lambda g, a, e: a["F"] * a["F"]


def _pl(layer: Layer) -> tuple[int, Callable[[Any], dict[str, Any]]]:
    return layer.num_params, layer.split


class Factorized(LowRank):
    """Full rank: S is P x P (only small P)."""

    key = "factorized"
    max_params = 10**3
    skips: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        super().__init__(rank=0)

    @property
    def label(self) -> str:
        return "FactorizedCovariance() (full rank)"

    def make_cov(self) -> sc.FactorizedCovariance:
        return sc.FactorizedCovariance()

    def num_columns(self, layer: Layer) -> int:
        return layer.num_params


# ------------------------------------------------------ low rank plus diagonal
class LowRankPlusDiagonal(Structure):
    key = "low_rank_plus_diagonal"
    natives: ClassVar[dict[str, str]] = {
        "sample": "`m + z[:, :r] @ U.T + z[:, r:] * d`, z = randn(B, r + P)",
        "factor_matmul": "`m + z[:, :r] @ U.T + z[:, r:] * d`",
        "matmul": "`(x @ U) @ U.T + x * d**2`",
        "diagonal": "`sum(U * U, 1) + d * d`",
        "trace": "`sum(U * U) + sum(d * d)`",
        "logdet": "`slogdet(I + U.T @ (U / d²)) + sum log d²`",
        "kl": "`0.5 (sum(d² - 1 - log d²) + sum(U²) + sum(m²) - slogdet(C))`",
    }
    floors: ClassVar[dict[str, str]] = {
        "sample": "`randn(B, r + P)`, `z[:, :r] @ U.T + z[:, r:] * d` (no mean)",
        "factor_matmul": "`z[:, :r] @ U.T + z[:, r:] * d` (no mean)",
        "matmul": "`(x @ U) @ U.T` (the two GEMMs)",
        "diagonal": "Gram GEMM `U.T @ W`, W = U / d² precomputed",
        "trace": "Gram GEMM `U.T @ W`, W = U / d² precomputed",
        "logdet": "Gram GEMM `U.T @ W`, W = U / d² precomputed",
        "kl": "Gram GEMM `U.T @ W`, W = U / d² precomputed",
    }

    def __init__(self, rank: int = 64, max_params: int = 10**6) -> None:
        self.rank = rank
        self.max_params = max_params

    @property
    def label(self) -> str:
        return f"LowRankPlusDiagonalCovariance({self.rank})"

    @property
    def variant_key(self) -> str:
        return f"{self.key}:{self.rank}"

    def make_cov(self) -> sc.FactorizedCovariance:
        return sc.LowRankPlusDiagonalCovariance(self.rank, scale_transform="identity")

    def num_columns(self, layer: Layer) -> int:
        return self.rank + layer.num_params

    def arrays(self, layer: Layer, rng: np.random.Generator) -> dict[str, np.ndarray]:
        p, r = layer.num_params, self.rank
        return {
            "m": _normal(rng, (p,), 0.1),
            "U": _normal(rng, (p, r), 0.1 / np.sqrt(r)),
            "d": _positive(rng, p, 0.1),
        }

    def storage(self, layer: Layer, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, r = layer.n_weight, self.rank
        d_weight, d_bias = layer.mean_views(flat["d"])
        return {
            "factor.weight": flat["U"][:n].reshape(layer.d_out, layer.d_in, r),
            "factor.bias": flat["U"][n:],
            "scale.weight": d_weight,
            "scale.bias": d_bias,
        }

    def native(self, kit: Any, layer: Layer, op: str) -> NativeFn:
        lib, batch, r, p, split = kit.lib, layer.batch, self.rank, *_pl(layer)

        def product(z: Any, a: dict[str, Any]) -> Any:
            return a["m"] + z[:, :r] @ a["U"].T + z[:, r:] * a["d"]

        def capacitance_logdet(a: dict[str, Any]) -> Any:
            v = a["d"] * a["d"]
            c = kit.eye(r) + a["U"].T @ (a["U"] / v[:, None])
            return lib.linalg.slogdet(c)[1]

        def kl(a: dict[str, Any]) -> Any:
            v = a["d"] * a["d"]
            return 0.5 * (
                (v - 1.0 - lib.log(v)).sum()
                + (a["U"] * a["U"]).sum()
                + (a["m"] * a["m"]).sum()
                - capacitance_logdet(a)
            )

        functions: dict[str, NativeFn] = {
            "sample": lambda g, a, e: split(product(kit.randn(g, (batch, r + p)), a)),
            "factor_matmul": lambda g, a, e: split(product(e["z"], a)),
            "matmul": lambda g, a, e: (e["x"] @ a["U"]) @ a["U"].T + e["x"] * (a["d"] * a["d"]),
            "diagonal": lambda g, a, e: (a["U"] * a["U"]).sum(1) + a["d"] * a["d"],
            "trace": lambda g, a, e: (a["U"] * a["U"]).sum() + (a["d"] * a["d"]).sum(),
            "logdet": lambda g, a, e: capacitance_logdet(a) + lib.log(a["d"] * a["d"]).sum(),
            "kl": lambda g, a, e: kl(a),
        }
        return functions[op]

    def floor(self, kit: Any, layer: Layer, op: str) -> NativeFn:
        batch, r, p = layer.batch, self.rank, layer.num_params

        def product(z: Any, a: dict[str, Any]) -> Any:
            return z[:, :r] @ a["U"].T + z[:, r:] * a["d"]

        if op == "sample":
            return lambda g, a, e: product(kit.randn(g, (batch, r + p)), a)
        if op == "factor_matmul":
            return lambda g, a, e: product(e["z"], a)
        if op == "matmul":
            return lambda g, a, e: (e["x"] @ a["U"]) @ a["U"].T
        return lambda g, a, e: a["U"].T @ e["w"]

    def floor_extras(
        self, layer: Layer, flat: dict[str, np.ndarray], op: str, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        if op in ("diagonal", "trace", "logdet", "kl"):
            return {"w": flat["U"] / (flat["d"] * flat["d"])[:, None]}
        return {}


# --------------------------------------------------------------------- Kronecker
class Kronecker(Structure):
    """Full ranks: S_out is d_out x d_out, S_in (d_in + 1) x (d_in + 1)."""

    key = "kronecker"
    max_params = 10**5
    natives: ClassVar[dict[str, str]] = {
        "sample": "`Y = S_out @ Z @ S_in.T`, Z = randn(B, r_out, r_in); "
        "`W = Y[..., :d_in] + m_W`, `b = Y[..., d_in] + m_b`",
        "factor_matmul": "as `sample`, Z given",
        "matmul": "`X~ = concat(X_W, x_b)`; `S_out @ (S_out.T @ X~ @ S_in) @ S_in.T`; split",
        "diagonal": "`outer(rownorm²(S_out), rownorm²(S_in))`, weight part then bias",
        "trace": "`sum(S_out²) * sum(S_in²)`",
        "logdet": "`2 (d_aug slogdet(S_out) + d_out slogdet(S_in))`",
        "kl": "`0.5 (tr - P + sum(m²) - logdet)`",
    }
    floors: ClassVar[dict[str, str]] = {
        "sample": "draw + two 2-D GEMMs, batch folded into the GEMMs (z drawn in that layout)",
        "factor_matmul": "two 2-D GEMMs `S_out @ Z'`, `(.) @ S_in.T`, batch folded, no mean",
        "matmul": "four 2-D GEMMs, batch folded, on X~ pre-arranged",
        "diagonal": "`a[:, None] * c[None, :]` (one pass over P)",
        "trace": "`S_out * S_out`, `S_in * S_in` (one pass over each factor)",
        "logdet": "`slogdet(S_out)`, `slogdet(S_in)` (LU of both factors)",
        "kl": "`slogdet(S_out)`, `slogdet(S_in)` (LU of both factors)",
    }

    @property
    def label(self) -> str:
        return "KroneckerCovariance() (full ranks)"

    def make_cov(self) -> sc.FactorizedCovariance:
        return sc.KroneckerCovariance()

    def num_columns(self, layer: Layer) -> int:
        return layer.d_out * (layer.d_in + 1)

    def arrays(self, layer: Layer, rng: np.random.Generator) -> dict[str, np.ndarray]:
        d_out, d_aug = layer.d_out, layer.d_in + 1
        flat = {
            "m": _normal(rng, (layer.num_params,), 0.1),
            "S_out": _normal(rng, (d_out, d_out), 1.0 / np.sqrt(d_out)),
            "S_in": _normal(rng, (d_aug, d_aug), 0.1 / np.sqrt(d_aug)),
        }
        flat["m_W"], flat["m_b"] = layer.mean_views(flat["m"])
        return flat

    def storage(self, layer: Layer, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        d_in = layer.d_in
        return {
            "input_factor.weight": flat["S_in"][:d_in],
            "input_factor.bias": flat["S_in"][d_in:],
            "output_factor": flat["S_out"],
        }

    def native(self, kit: Any, layer: Layer, op: str) -> NativeFn:
        lib, batch, mm = kit.lib, layer.batch, MATMUL_BATCH
        d_out, d_in, p, n = layer.d_out, layer.d_in, layer.num_params, layer.n_weight
        d_aug = d_in + 1

        def product(z: Any, a: dict[str, Any]) -> dict[str, Any]:
            y = a["S_out"] @ z.reshape(z.shape[0], d_out, d_aug) @ a["S_in"].T
            return {"weight": y[:, :, :d_in] + a["m_W"], "bias": y[:, :, d_in] + a["m_b"]}

        def matmul(x: Any, a: dict[str, Any]) -> Any:
            x_aug = kit.concat(
                [x[:, :n].reshape(mm, d_out, d_in), x[:, n:].reshape(mm, d_out, 1)], axis=2
            )
            t = a["S_out"].T @ x_aug @ a["S_in"]
            y = a["S_out"] @ t @ a["S_in"].T
            return kit.concat([y[:, :, :d_in].reshape(mm, n), y[:, :, d_in]], axis=1)

        def diagonal(a: dict[str, Any]) -> Any:
            out = (a["S_out"] * a["S_out"]).sum(1)
            inp = (a["S_in"] * a["S_in"]).sum(1)
            full = out[:, None] * inp[None, :]
            return kit.concat([full[:, :d_in].reshape(n), full[:, d_in]], axis=0)

        def trace(a: dict[str, Any]) -> Any:
            return (a["S_out"] * a["S_out"]).sum() * (a["S_in"] * a["S_in"]).sum()

        def logdet(a: dict[str, Any]) -> Any:
            return 2.0 * (
                d_aug * lib.linalg.slogdet(a["S_out"])[1] + d_out * lib.linalg.slogdet(a["S_in"])[1]
            )

        def kl(a: dict[str, Any]) -> Any:
            mean_sq = (a["m_W"] * a["m_W"]).sum() + (a["m_b"] * a["m_b"]).sum()
            return 0.5 * (trace(a) - p + mean_sq - logdet(a))

        functions: dict[str, NativeFn] = {
            "sample": lambda g, a, e: product(kit.randn(g, (batch, d_out * d_aug)), a),
            "factor_matmul": lambda g, a, e: product(e["z"], a),
            "matmul": lambda g, a, e: matmul(e["x"], a),
            "diagonal": lambda g, a, e: diagonal(a),
            "trace": lambda g, a, e: trace(a),
            "logdet": lambda g, a, e: logdet(a),
            "kl": lambda g, a, e: kl(a),
        }
        return functions[op]

    def floor(self, kit: Any, layer: Layer, op: str) -> NativeFn:
        lib, batch, mm = kit.lib, layer.batch, MATMUL_BATCH
        d_out, d_aug = layer.d_out, layer.d_in + 1

        def two_gemms(zp: Any, a: dict[str, Any], b: int) -> Any:
            # z' is (r_out, B * r_in): S_out @ z' is one GEMM, then (d_out * B, r_in) @ S_in.T.
            t = a["S_out"] @ zp
            return t.reshape(d_out * b, d_aug) @ a["S_in"].T

        def four_gemms(xp: Any, a: dict[str, Any]) -> Any:
            # X~ arranged as (d_out * B, d_aug): every product is one 2-D GEMM.
            t = (xp @ a["S_in"]).reshape(d_out, mm * d_aug)
            t = a["S_out"] @ (a["S_out"].T @ t)
            return t.reshape(d_out * mm, d_aug) @ a["S_in"].T

        if op == "sample":
            return lambda g, a, e: two_gemms(kit.randn(g, (d_out, batch * d_aug)), a, batch)
        if op == "factor_matmul":
            return lambda g, a, e: two_gemms(e["zp"], a, batch)
        if op == "matmul":
            return lambda g, a, e: four_gemms(e["xp"], a)
        if op == "diagonal":
            return lambda g, a, e: e["a"][:, None] * e["c"][None, :]
        if op == "trace":
            return lambda g, a, e: (a["S_out"] * a["S_out"], a["S_in"] * a["S_in"])
        return lambda g, a, e: (
            lib.linalg.slogdet(a["S_out"])[1],
            lib.linalg.slogdet(a["S_in"])[1],
        )

    def floor_extras(
        self, layer: Layer, flat: dict[str, np.ndarray], op: str, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        d_out, d_aug = layer.d_out, layer.d_in + 1
        if op == "factor_matmul":
            return {"zp": rng.standard_normal((d_out, layer.batch * d_aug), dtype=np.float32)}
        if op == "matmul":
            shape = (d_out * MATMUL_BATCH, d_aug)
            return {"xp": rng.standard_normal(shape, dtype=np.float32)}
        if op == "diagonal":
            return {
                "a": (flat["S_out"] ** 2).sum(1).astype(np.float32),
                "c": (flat["S_in"] ** 2).sum(1).astype(np.float32),
            }
        return {}


def default_structures() -> list[Structure]:
    """The sweep: every structure, with the ranks the targets name."""
    return [
        Diagonal(),
        LowRank(32),
        LowRankPlusDiagonal(64, max_params=10**6),
        LowRankPlusDiagonal(8, max_params=10**7),
        Kronecker(),
        Factorized(),
    ]


STRUCTURES = default_structures()


def structure_id(structure: Structure) -> str:
    """A unique id per benchmarked structure (rank included where it varies)."""
    if isinstance(structure, LowRankPlusDiagonal):
        return f"{structure.key}_r{structure.rank}"
    if isinstance(structure, LowRank) and not isinstance(structure, Factorized):
        return f"{structure.key}_r{structure.rank}"
    return structure.key
