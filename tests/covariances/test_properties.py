"""Hypothesis property tests of the algebraic identities, over every structure and backend.

Shapes, ranks, dtypes, coefficients and (through seeds) the stored values are drawn.
The storage is written directly from NumPy draws seeded per storage path, so that the
same parameter can be rebuilt with its means inserted in another order.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import structcov as sc
from conftest import Backend, tolerance
from oracle import dense_oracle, join

KINDS = ("factorized", "lowrank", "diagonal", "kronecker", "lowrank+diagonal")
NAME_POOL = ("weight", "bias", "a", "log_tau", "z")
dims = st.integers(1, 3)


def _eps(dtype: str) -> float:
    return float(np.finfo(dtype).eps)


@dataclass(frozen=True)
class Drawn:
    """One drawn parameter: structure, mean spec (insertion order), ranks, dtype, seed."""

    kind: str
    spec: tuple[tuple[str, tuple[int, ...] | None], ...]  # (name, shape or None), in order
    bare: bool
    rank: int | None  # factorized / lowrank / lowrank+diagonal
    input_rank: int | None  # kronecker
    output_rank: int | None  # kronecker
    dtype: str
    seed: int

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape for name, shape in self.spec if shape is not None}

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())

    # Expected (clamped) ranks, from the seed API: rank > P -> P, Kronecker ranks
    # clamped to d_out and d_in + has_bias.
    @property
    def d_out(self) -> int:
        return self.shapes["weight"][0]

    @property
    def d_in_augmented(self) -> int:
        return math.prod(self.shapes["weight"][1:]) + int("bias" in self.shapes)

    @property
    def expected_ranks(self) -> tuple[int, int]:
        """(r_out, r_in) for Kronecker."""
        r_out = self.d_out if self.output_rank is None else min(self.output_rank, self.d_out)
        r_in = (
            self.d_in_augmented
            if self.input_rank is None
            else min(self.input_rank, self.d_in_augmented)
        )
        return r_out, r_in

    @property
    def expected_rank(self) -> int:
        """Clamped ``rank`` (the low-rank part for lowrank+diagonal); P for diagonal."""
        if self.kind == "diagonal" or self.rank is None:
            return self.num_params
        return min(self.rank, self.num_params)

    @property
    def expected_k(self) -> int:
        """K, the columns of S: r_out r_in (Kronecker), rank + P (lowrank+diagonal), rank."""
        if self.kind == "kronecker":
            r_out, r_in = self.expected_ranks
            return r_out * r_in
        if self.kind == "lowrank+diagonal":
            return self.expected_rank + self.num_params
        return self.expected_rank

    def reordered(self, order: list[int]) -> Drawn:
        spec = tuple(self.spec[i] for i in order)
        return Drawn(
            self.kind,
            spec,
            self.bare,
            self.rank,
            self.input_rank,
            self.output_rank,
            self.dtype,
            self.seed,
        )


@st.composite
def drawn_parameters(draw: Any, kinds: tuple[str, ...] = KINDS) -> Drawn:
    kind = draw(st.sampled_from(kinds))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    seed = draw(st.integers(0, 2**32 - 1))
    bare = False
    if kind == "kronecker":
        weight = (draw(st.integers(1, 4)), *draw(st.lists(dims, min_size=1, max_size=3)))
        bias = draw(st.sampled_from(["absent", "none", "present"]))
        entries: list[tuple[str, tuple[int, ...] | None]] = [("weight", weight)]
        if bias != "absent":
            entries.append(("bias", (weight[0],) if bias == "present" else None))
        if draw(st.booleans()):
            entries.reverse()
        d_in_aug = math.prod(weight[1:]) + int(bias == "present")
        input_rank = draw(st.none() | st.integers(1, d_in_aug + 3))
        output_rank = draw(st.none() | st.integers(1, weight[0] + 2))
        return Drawn(kind, tuple(entries), False, None, input_rank, output_rank, dtype, seed)
    if draw(st.integers(0, 5)) == 0:
        bare = True
        entries = [("mean", tuple(draw(st.lists(dims, min_size=0, max_size=3))))]
    else:
        names = draw(st.lists(st.sampled_from(NAME_POOL), min_size=1, max_size=3, unique=True))
        entries = [(n, tuple(draw(st.lists(dims, min_size=0, max_size=3)))) for n in names]
        if draw(st.booleans()):
            # A None entry somewhere: it takes no part.
            entries.insert(draw(st.integers(0, len(entries))), ("absent", None))
    num_params = sum(math.prod(shape) for _, shape in entries if shape is not None)
    rank: int | None = None
    if kind in ("lowrank", "lowrank+diagonal"):
        rank = draw(st.integers(1, 2 * num_params + 1))
    elif kind == "factorized":
        rank = draw(st.none() | st.integers(1, 2 * num_params + 1))
    return Drawn(kind, tuple(entries), bare, rank, None, None, dtype, seed)


def _rng(seed: int, path: str) -> np.random.Generator:
    """A generator per (seed, storage path): values do not depend on the insertion order."""
    return np.random.default_rng([seed, zlib.crc32(path.encode())])


def _make_cov(d: Drawn) -> sc.FactorizedCovariance:
    if d.kind == "factorized":
        return sc.FactorizedCovariance(d.rank)
    if d.kind == "lowrank":
        assert d.rank is not None
        return sc.LowRankCovariance(d.rank)
    if d.kind == "diagonal":
        return sc.DiagonalCovariance()
    if d.kind == "lowrank+diagonal":
        assert d.rank is not None
        return sc.LowRankPlusDiagonalCovariance(d.rank)
    return sc.KroneckerCovariance(input_rank=d.input_rank, output_rank=d.output_rank)


def build(d: Drawn, backend: Backend) -> tuple[sc.FactorizedCovariance, Any]:
    """The covariance of ``d`` with drawn storage, and the means it was initialized with."""
    mean_np = {
        name: None if shape is None else _rng(d.seed, "mean." + name).standard_normal(shape)
        for name, shape in d.spec
    }
    mean_x = {n: None if v is None else backend.asarray(v, d.dtype) for n, v in mean_np.items()}
    mean: Any = mean_x["mean"] if d.bare else mean_x
    cov = _make_cov(d)
    sc.GaussianParameter(mean, cov)

    def put(store: dict[str, Any] | None, attribute: str, name: str | None, shape: tuple) -> Any:
        path = attribute if name is None else f"{attribute}.{name}"
        current = getattr(cov, attribute) if store is None else store[name]
        assert tuple(current.shape) == shape, (path, tuple(current.shape), shape)
        return backend.asarray(_rng(d.seed, path).standard_normal(shape), d.dtype)

    if d.kind in ("factorized", "lowrank", "lowrank+diagonal"):
        for name, shape in d.shapes.items():
            cov.factor[name] = put(cov.factor, "factor", name, (*shape, d.expected_rank))
    if d.kind in ("diagonal", "lowrank+diagonal"):
        for name, shape in d.shapes.items():
            cov.scale[name] = put(cov.scale, "scale", name, shape)
    if d.kind == "kronecker":
        r_out, r_in = d.expected_ranks
        for name, shape in d.shapes.items():
            storage = (*shape[1:], r_in) if name == "weight" else (1, r_in)
            cov.input_factor[name] = put(cov.input_factor, "input_factor", name, storage)
        cov.output_factor = put(None, "output_factor", None, (d.d_out, r_out))
    return cov, mean


def _z(backend: Backend, d: Drawn, shape: tuple[int, ...], tag: str) -> tuple[Any, np.ndarray]:
    z = backend.asarray(_rng(d.seed, tag).standard_normal(shape), d.dtype)
    return z, backend.to_numpy(z)


def _columns_of_s(cov: Any, d: Drawn, backend: Backend, mean: Any) -> np.ndarray:
    """S (P, K) in float64 from factor_matmul(eye(K)), flattened by the test's own join."""
    k = d.expected_k
    out = cov.factor_matmul(backend.asarray(np.eye(k), d.dtype))
    layout = dense_oracle(cov, mean, backend.to_numpy).layout
    cols = {name: backend.to_numpy(value) for name, value in out.items()}
    return np.stack([join({n: c[j] for n, c in cols.items()}, layout) for j in range(k)], axis=1)


def _run(backend: Backend, test: Callable[..., None], **strategies: Any) -> None:
    """Run a hypothesis test for ``backend``.

    JAX compiles a kernel for every new shape (about 0.1-0.3 s per operation on this
    machine), so it runs a fifth of the profile's examples to stay in the time budget;
    every other backend runs the full profile.
    """
    current = settings.default
    examples = current.max_examples
    if backend.name == "jax":
        examples = max(5, examples // 5)
    configured = settings(
        current,
        max_examples=examples,
        deadline=None,
        suppress_health_check=[*current.suppress_health_check, HealthCheck.too_slow],
    )
    configured(given(**strategies)(test))()


# ----------------------------------------------------------------------------- tests


def test_to_dense_is_s_s_t_and_matches_oracle(backend: Backend) -> None:
    def check(d: Drawn) -> None:
        cov, mean = build(d, backend)
        dense = backend.to_numpy(cov.to_dense())
        s = _columns_of_s(cov, d, backend, mean)
        oracle = dense_oracle(cov, mean, backend.to_numpy)
        assert s.shape == (d.num_params, d.expected_k)
        assert dense.shape == (d.num_params, d.num_params)
        scale = max(1.0, float(np.abs(oracle.Sigma).max()))
        tol = {"rtol": 2000 * _eps(d.dtype), "atol": 2000 * _eps(d.dtype) * scale}
        np.testing.assert_allclose(dense, s @ s.T, **tol)
        np.testing.assert_allclose(dense, oracle.Sigma, **tol)
        np.testing.assert_allclose(s, oracle.S, **tolerance(d.dtype))

    _run(backend, check, d=drawn_parameters())


def test_to_dense_symmetric_psd(backend: Backend) -> None:
    def check(d: Drawn) -> None:
        cov, _ = build(d, backend)
        dense = backend.to_numpy(cov.to_dense())
        scale = max(1.0, float(np.abs(dense).max()))
        np.testing.assert_allclose(dense, dense.T, rtol=0, atol=100 * _eps(d.dtype) * scale)
        eigenvalues = np.linalg.eigvalsh((dense + dense.T) / 2)
        assert eigenvalues.min() >= -1000 * _eps(d.dtype) * scale * d.num_params, eigenvalues
        # Rank: at most K nonzero eigenvalues.
        big = np.sum(eigenvalues > 1e3 * _eps(d.dtype) * scale * d.num_params)
        assert big <= d.expected_k

    _run(backend, check, d=drawn_parameters())


def test_factor_matmul_is_linear(backend: Backend) -> None:
    coefficient = st.floats(-3, 3, allow_nan=False, width=32)

    def check(d: Drawn, a: float, b: float, batch: tuple[int, ...]) -> None:
        cov, _ = build(d, backend)
        k = d.expected_k
        z1, z1_np = _z(backend, d, (*batch, k), "z1")
        z2, z2_np = _z(backend, d, (*batch, k), "z2")
        combined = backend.asarray(a * z1_np + b * z2_np, d.dtype)
        left = cov.factor_matmul(combined)
        out1, out2 = cov.factor_matmul(z1), cov.factor_matmul(z2)
        assert list(left) == list(d.shapes)
        for name, shape in d.shapes.items():
            one, two = backend.to_numpy(out1[name]), backend.to_numpy(out2[name])
            assert one.shape == (*batch, *shape)
            scale = 1.0 + abs(a) * np.abs(one).max() + abs(b) * np.abs(two).max()
            np.testing.assert_allclose(
                backend.to_numpy(left[name]),
                a * one + b * two,
                rtol=0,
                atol=2000 * _eps(d.dtype) * scale,
                err_msg=name,
            )

    _run(
        backend,
        check,
        d=drawn_parameters(),
        a=coefficient,
        b=coefficient,
        batch=st.sampled_from([(), (2,), (2, 1)]),
    )


def test_additive_constant_adds_exactly(backend: Backend) -> None:
    def check(d: Drawn, flat: bool, batch: tuple[int, ...]) -> None:
        cov, mean = build(d, backend)
        xp = backend.xp
        z, _ = _z(backend, d, (*batch, d.expected_k), "z")
        parts_np = {n: _rng(d.seed, "m." + n).standard_normal(s) for n, s in d.shapes.items()}
        parts = {n: backend.asarray(v, d.dtype) for n, v in parts_np.items()}
        if flat:
            layout = dense_oracle(cov, mean, backend.to_numpy).layout
            constant: Any = backend.asarray(join(parts_np, layout), d.dtype)
        else:
            constant = parts
        with_constant = cov.factor_matmul(z, additive_constant=constant)
        without = cov.factor_matmul(z)
        assert list(with_constant) == list(d.shapes)
        for name in d.shapes:
            # Bit for bit: one addition of the constant to the same product.
            expected = backend.to_numpy(xp.add(without[name], parts[name]))
            np.testing.assert_array_equal(backend.to_numpy(with_constant[name]), expected)

    _run(
        backend,
        check,
        d=drawn_parameters(),
        flat=st.booleans(),
        batch=st.sampled_from([(), (3,), (2, 2)]),
    )


def test_batch_equals_loop(backend: Backend) -> None:
    def check(d: Drawn, batch: tuple[int, ...]) -> None:
        cov, _ = build(d, backend)
        z, z_np = _z(backend, d, (*batch, d.expected_k), "z")
        batched = {n: backend.to_numpy(v) for n, v in cov.factor_matmul(z).items()}
        for index in np.ndindex(*batch):
            single = cov.factor_matmul(backend.asarray(z_np[index], d.dtype))
            for name, shape in d.shapes.items():
                value = backend.to_numpy(single[name])
                assert value.shape == shape
                np.testing.assert_allclose(
                    batched[name][index], value, **tolerance(d.dtype), err_msg=f"{name}{index}"
                )

    _run(backend, check, d=drawn_parameters(), batch=st.sampled_from([(2,), (2, 3), (1, 2, 2)]))


def test_flat_order_follows_insertion_order(backend: Backend) -> None:
    def check(d: Drawn, order: list[int]) -> None:
        permuted = d.reordered(order)
        cov_a, _ = build(d, backend)
        cov_b, _ = build(permuted, backend)
        dense_a = backend.to_numpy(cov_a.to_dense())
        dense_b = backend.to_numpy(cov_b.to_dense())
        # Flat indices of each name under order A, then gathered in order B.
        slots, start = {}, 0
        for name, shape in d.shapes.items():
            slots[name] = np.arange(start, start + math.prod(shape))
            start += math.prod(shape)
        perm = np.concatenate([slots[name] for name in permuted.shapes])
        tol = tolerance(d.dtype)
        np.testing.assert_allclose(dense_b, dense_a[np.ix_(perm, perm)], **tol)
        # S_B = Pi S_A for the factorized and Kronecker structures (same columns); the
        # diagonal part has one column per flat index, so there S_B = Pi S_A Pi^T.
        z, z_np = _z(backend, d, (d.expected_k,), "z")
        z_b = z
        if d.kind in ("diagonal", "lowrank+diagonal"):
            low = d.expected_k - d.num_params  # the low-rank columns come first
            z_b = backend.asarray(np.concatenate([z_np[:low], z_np[low:][perm]]), d.dtype)
        out_a, out_b = cov_a.factor_matmul(z), cov_b.factor_matmul(z_b)
        assert list(out_a) == list(d.shapes)
        assert list(out_b) == list(permuted.shapes)
        for name in d.shapes:
            np.testing.assert_allclose(
                backend.to_numpy(out_b[name]), backend.to_numpy(out_a[name]), **tol
            )

    @st.composite
    def with_order(draw: Any) -> tuple[Drawn, list[int]]:
        d = draw(drawn_parameters().filter(lambda d: not d.bare and len(d.spec) > 1))
        order = draw(st.permutations(range(len(d.spec))))
        return d, order

    _run(backend, lambda pair: check(*pair), pair=with_order())


def test_rank_clamping(backend: Backend) -> None:
    def check(d: Drawn) -> None:
        cov, _ = build(d, backend)  # build() checks every storage shape with clamped ranks
        assert cov.num_factor_columns == d.expected_k
        if d.kind == "kronecker":
            r_out, r_in = d.expected_ranks
            assert (cov.output_rank, cov.input_rank, cov.rank) == (r_out, r_in, r_out * r_in)
            assert r_in <= d.d_in_augmented and r_out <= d.d_out
            expected_lr = {f"input_factor.{n}": 1 / r_in for n in d.shapes}
            expected_lr["output_factor"] = 1 / r_out
        else:
            assert cov.rank == d.expected_rank <= d.num_params
            expected_lr = {}
            if d.kind != "diagonal":
                expected_lr.update({f"factor.{n}": 1 / d.expected_rank for n in d.shapes})
            if d.kind in ("diagonal", "lowrank+diagonal"):
                expected_lr.update({f"scale.{n}": 1.0 for n in d.shapes})
        assert cov.lr_scaling == pytest.approx(expected_lr)
        assert list(cov.lr_scaling) == list(expected_lr)

    _run(backend, check, d=drawn_parameters())


@pytest.mark.parametrize(
    "cls",
    [sc.FactorizedCovariance, sc.LowRankCovariance, sc.LowRankPlusDiagonalCovariance],
    ids=lambda cls: cls.__name__,
)
def test_rank_below_one_is_an_error(cls: type) -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match="rank"):
            cls(bad)
    with pytest.raises(ValueError, match="input_rank"):
        sc.KroneckerCovariance(input_rank=0)
    with pytest.raises(ValueError, match="output_rank"):
        sc.KroneckerCovariance(output_rank=0)
