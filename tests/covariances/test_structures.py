"""The core of issue 11: frozen structures, pure functions over explicit storage,
registries, and ownership (a covariance belongs to one parameter)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

import structcov as sc
import structcov.functional as F
from cases import CASE_IDS, CASES, Case, well_conditioned
from conftest import Backend, tolerance
from oracle import dense_oracle, join
from structcov.covariances import (
    Diagonal,
    Factorized,
    Kronecker,
    LowRankPlusDiagonal,
    Structure,
)
from structcov.covariances._kl import kl_function
from structcov.covariances._structure import SCALE_TRANSFORMS

LAYER = {"weight": (3, 4), "bias": (3,)}


def fill_well_conditioned(
    param: Any, mean: Any, backend: Backend, dtype: str, rng: np.random.Generator
) -> None:
    storage = well_conditioned(param.cov, mean, rng)
    param.cov.load_storage({path: backend.asarray(v, dtype) for path, v in storage.items()})


def _mean(backend: Backend, dtype: str, spec: dict[str, Any] = LAYER, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    return {n: backend.asarray(rng.standard_normal(s), dtype) for n, s in spec.items()}


# ----------------------------------------------------------------- frozen values
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_structure_is_a_frozen_complete_value(case: Case, backend: Backend) -> None:
    mean = case.make_mean(backend, "float64", np.random.default_rng(0))
    a = sc.GaussianParameter(mean, case.make_cov()).cov.structure
    b = sc.GaussianParameter(mean, case.make_cov()).cov.structure
    assert isinstance(a, Structure)
    assert a == b and hash(a) == hash(b)  # a value: equal structures over equal layouts
    # Complete: the ranks are clamped already and the storage is fully described.
    assert a.num_factor_columns <= a.num_params + a.num_factor_columns  # an int, not None
    assert all(
        type(v) in (int, float) or (k == "scale_transform" and v in SCALE_TRANSFORMS)
        for k, v in a.config().items()
    )
    assert [slot.path for slot in a.slots] == list(a.paths)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.layout = b.layout  # type: ignore[misc]


def test_structure_ranks_are_clamped_once() -> None:
    mean = {"weight": np.zeros((3, 4)), "bias": np.zeros(3)}
    assert sc.GaussianParameter(mean, sc.LowRankCovariance(1000)).cov.structure.rank == 15
    kron = sc.GaussianParameter(mean, sc.KroneckerCovariance(99, 99)).cov.structure
    assert isinstance(kron, Kronecker)
    assert (kron.input_rank, kron.output_rank) == (5, 3)
    assert Factorized.build(kron.layout, rank=None).rank == 15
    with pytest.raises(ValueError, match="`rank` must be >= 1, got 0"):
        LowRankPlusDiagonal.build(kron.layout, rank=0)
    with pytest.raises(ValueError, match="`sample_scale` must be a finite float >= 0"):
        Kronecker.build(kron.layout, sample_scale=float("nan"))


def test_structures_differ_by_type_and_rank() -> None:
    layout = sc.GaussianParameter({"w": np.zeros(4)}, sc.DiagonalCovariance()).cov.layout
    structures = [
        Diagonal.build(layout),
        Factorized.build(layout, rank=2),
        Factorized.build(layout, rank=3),
        LowRankPlusDiagonal.build(layout, rank=2),
    ]
    assert len(set(structures)) == len(structures)


# ---------------------------------------------------- pure functions, explicit storage
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_pure_functions_read_only_the_storage_they_are_given(
    case: Case, backend: Backend, dtype: str
) -> None:
    """The functions of structcov.functional over a storage that is not the object's
    agree with the dense float64 oracle of that storage; the object is untouched."""
    mean = case.make_mean(backend, dtype, np.random.default_rng(1))
    param = sc.GaussianParameter(mean, case.make_cov())
    fill_well_conditioned(param, mean, backend, dtype, np.random.default_rng(2))
    before = {p: backend.to_numpy(v).copy() for p, v in param.cov.storage().items()}

    other = sc.GaussianParameter(mean, case.make_cov())
    fill_well_conditioned(other, mean, backend, dtype, np.random.default_rng(3))
    oracle = dense_oracle(other.cov, mean, backend.to_numpy)
    structure, storage = param.cov.structure, other.cov.storage()

    rng = np.random.default_rng(4)
    x64 = rng.standard_normal((2, oracle.P))
    x = backend.asarray(x64, dtype)
    x64 = backend.to_numpy(x)
    tol = tolerance(dtype)
    np.testing.assert_allclose(
        backend.to_numpy(F.matmul(structure, storage, x)), x64 @ oracle.Sigma, **tol
    )
    # Kronecker's Grams formed once (None where S (S^T x) is cheaper: small ranks)
    matmul_state = F.prepare_matmul(structure, storage)
    if not isinstance(structure, Kronecker):
        assert matmul_state is None
    np.testing.assert_allclose(
        backend.to_numpy(F.matmul(structure, storage, x, matmul_state)), x64 @ oracle.Sigma, **tol
    )
    np.testing.assert_allclose(
        backend.to_numpy(F.factor_rmatmul(structure, storage, x)), x64 @ oracle.S, **tol
    )
    np.testing.assert_allclose(
        backend.to_numpy(F.diagonal(structure, storage)), np.diag(oracle.Sigma), **tol
    )
    np.testing.assert_allclose(
        float(backend.to_numpy(F.trace(structure, storage))), np.trace(oracle.Sigma), **tol
    )
    if not structure.is_singular:
        sign, logdet = np.linalg.slogdet(oracle.Sigma)
        assert sign > 0
        state = F.prepare(structure, storage)
        got = float(backend.to_numpy(F.logdet(structure, storage, state)))
        np.testing.assert_allclose(got, logdet, rtol=tol["rtol"], atol=tol["atol"] * oracle.P)
        solved = backend.to_numpy(F.solve(structure, storage, x, state))
        np.testing.assert_allclose(
            solved @ oracle.Sigma, x64, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10
        )
    # The object's own storage did not change.
    for path, value in param.cov.storage().items():
        np.testing.assert_array_equal(backend.to_numpy(value), before[path])


def test_kronecker_matmul_state_is_its_grams_or_none(backend: Backend, dtype: str) -> None:
    """prepare_matmul gives the Grams at full ranks, None at small ranks (S (S^T x) is
    cheaper for every batch), and a state from elsewhere is refused by name."""
    mean = _mean(backend, dtype, {"weight": (6, 7), "bias": (6,)})
    full = sc.GaussianParameter(mean, sc.KroneckerCovariance())
    grams = F.prepare_matmul(full.cov.structure, full.cov.storage())
    assert grams is not None and tuple(grams.output.shape) == (6, 6)
    assert tuple(grams.input.shape) == (8, 8)
    low = sc.GaussianParameter(mean, sc.KroneckerCovariance(output_rank=1, input_rank=1))
    assert F.prepare_matmul(low.cov.structure, low.cov.storage()) is None
    x = backend.asarray(np.ones((2, full.num_params)), dtype)
    square = F.prepare(full.cov.structure, full.cov.storage())  # solve's state, not matmul's
    with pytest.raises(TypeError, match="must come from `prepare_matmul`"):
        F.matmul(full.cov.structure, full.cov.storage(), x, square)


def test_log_prob_and_kl_as_pure_functions(backend: Backend, dtype: str) -> None:
    """log N(v; m, Sigma) and KL against their dense closed forms, from explicit parts."""
    mean = _mean(backend, dtype)
    q = sc.GaussianParameter(mean, sc.LowRankPlusDiagonalCovariance(2))
    fill_well_conditioned(q, mean, backend, dtype, np.random.default_rng(5))
    prior = sc.normal_prior(q, 1.5)
    oracle = dense_oracle(q.cov, mean, backend.to_numpy)
    m64 = join({n: backend.to_numpy(v) for n, v in mean.items()}, oracle.layout)
    parts = (q.cov.structure, q.cov.storage(), mean)
    value = {n: v + 0.5 for n, v in mean.items()}
    v64 = join({n: backend.to_numpy(v) for n, v in value.items()}, oracle.layout)
    diff = v64 - m64
    expected = -0.5 * (
        oracle.P * np.log(2 * np.pi)
        + np.linalg.slogdet(oracle.Sigma)[1]
        + diff @ np.linalg.solve(oracle.Sigma, diff)
    )
    tol = tolerance(dtype)
    got = float(backend.to_numpy(F.log_prob(*parts, value)))
    np.testing.assert_allclose(got, expected, rtol=tol["rtol"] * 10, atol=tol["atol"] * oracle.P)
    sigma_p = 1.5**2 * np.eye(oracle.P)
    kl = 0.5 * (
        np.trace(np.linalg.solve(sigma_p, oracle.Sigma))
        + m64 @ np.linalg.solve(sigma_p, m64)
        - oracle.P
        + np.linalg.slogdet(sigma_p)[1]
        - np.linalg.slogdet(oracle.Sigma)[1]
    )
    got_kl = float(backend.to_numpy(F.kl_divergence(parts, prior._parts())))
    np.testing.assert_allclose(got_kl, kl, rtol=tol["rtol"] * 10, atol=tol["atol"] * oracle.P)


def test_check_storage_validates_the_whole_mapping(backend: Backend) -> None:
    param = sc.GaussianParameter(_mean(backend, "float64"), sc.KroneckerCovariance())
    structure, storage = param.cov.structure, param.cov.storage()
    with pytest.raises(ValueError, match="`storage` must have the keys"):
        F.check_storage(structure, {k: v for k, v in storage.items() if k != "output_factor"})
    wrong = dict(storage, output_factor=backend.asarray(np.zeros((2, 2)), "float64"))
    with pytest.raises(ValueError, match=r"`storage\['output_factor'\]` must have shape \(3, 3\)"):
        F.check_storage(structure, wrong)
    mixed = dict(storage, output_factor=backend.asarray(np.zeros((3, 3)), "float32"))
    with pytest.raises(TypeError, match="share one dtype"):
        F.check_storage(structure, mixed)
    with pytest.raises(TypeError, match="must be a mapping"):
        F.check_storage(structure, list(storage.values()))  # type: ignore[arg-type]


# ----------------------------------------------------------------------- registries
def test_kl_registry_picks_the_most_specific_pair() -> None:
    from structcov.covariances.diagonal import _kl_diagonal_diagonal, _kl_to_diagonal
    from structcov.covariances.kronecker import _kl_kronecker_kronecker
    from structcov.covariances.low_rank_plus_diagonal import _kl_lrpd_diagonal

    assert kl_function(Diagonal, Diagonal) is _kl_diagonal_diagonal
    assert kl_function(LowRankPlusDiagonal, Diagonal) is _kl_lrpd_diagonal
    assert kl_function(Kronecker, Kronecker) is _kl_kronecker_kronecker
    assert kl_function(Factorized, Diagonal) is _kl_to_diagonal
    # q of any type against a dense factor / low rank plus diagonal p: one function each.
    assert kl_function(Diagonal, Factorized) is kl_function(Kronecker, Factorized)
    assert kl_function(Kronecker, LowRankPlusDiagonal) is kl_function(
        Factorized, LowRankPlusDiagonal
    )
    # A pair nobody registered falls back to the generic form.
    from structcov.covariances._kl import _kl_generic
    from structcov.covariances._structure import Structure

    assert kl_function(Structure, Kronecker) is _kl_generic
    with pytest.raises(NotImplementedError, match=r"pair \(int, Diagonal\)"):
        kl_function(int, Diagonal)


def test_every_registered_covariance_class_builds_its_structure() -> None:
    from structcov.covariances._base import COVARIANCES

    assert set(COVARIANCES) == {
        "DiagonalCovariance",
        "FactorizedCovariance",
        "KroneckerCovariance",
        "LowRankCovariance",
        "LowRankPlusDiagonalCovariance",
    }
    mean = {"weight": np.zeros((2, 3)), "bias": np.zeros(2)}
    for name, cls in COVARIANCES.items():
        arguments = {key: 2 for key in cls._arguments if key != "scale_transform"}
        cov = cls(**arguments)
        sc.GaussianParameter(mean, cov)
        assert isinstance(cov.structure, cls._structure_type), name
        assert set(cov._config()) == set(cls._arguments) | set(cls._settings)


# ------------------------------------------------------------------------ ownership
def test_a_covariance_belongs_to_one_parameter(backend: Backend) -> None:
    m1 = _mean(backend, "float64", {"w": (3,)})
    m2 = _mean(backend, "float64", {"a": (2,), "b": (3,)})
    cov = sc.DiagonalCovariance()
    p1 = sc.GaussianParameter(m1, cov)
    cov.reset_parameters(1.0, backend.generator(0))
    before = backend.to_numpy(p1.cov.scale["w"]).copy()
    with pytest.raises(ValueError, match="already belongs to a GaussianParameter"):
        sc.GaussianParameter(m2, cov)
    with pytest.raises(ValueError, match="cannot be re-initialized"):
        cov.initialize_parameters(m2)
    assert p1.cov.num_params == p1.num_params == 3
    np.testing.assert_array_equal(backend.to_numpy(p1.cov.scale["w"]), before)


def test_a_failed_construction_changes_nothing(backend: Backend) -> None:
    cov = sc.KroneckerCovariance()
    bad = _mean(backend, "float64", {"weight": (3, 4), "bias": (2,)})
    with pytest.raises(ValueError, match=r"`bias` of shape \(3,\)"):
        sc.GaussianParameter(bad, cov)
    # Not attached, not half-built: it can still serve a good layer.
    p = sc.GaussianParameter(_mean(backend, "float64"), cov)
    assert p.cov.is_singular is False and p.cov.structure.has_bias  # type: ignore[attr-defined]


def test_storage_assignment_is_validated_and_atomic(backend: Backend) -> None:
    p = sc.GaussianParameter(_mean(backend, "float64"), sc.KroneckerCovariance())
    p.cov.reset_parameters(1.0, backend.generator(0))
    before = {k: backend.to_numpy(v).copy() for k, v in p.cov.storage().items()}
    with pytest.raises(ValueError, match=r"must have shape \(4, 5\)"):
        p.cov.input_factor["weight"] = backend.asarray(np.zeros((4, 4)), "float64")
    with pytest.raises(TypeError, match="share one dtype"):
        p.cov.output_factor = backend.asarray(np.zeros((3, 3)), "float32")
    with pytest.raises(AttributeError, match="cannot be replaced as a whole"):
        p.cov.input_factor = {}
    for path, value in p.cov.storage().items():
        np.testing.assert_array_equal(backend.to_numpy(value), before[path])
    new = backend.asarray(np.eye(3), "float64")
    p.cov.output_factor = new
    np.testing.assert_array_equal(backend.to_numpy(p.cov.output_factor), np.eye(3))


def test_sample_scale_is_validated_and_rebuilds_the_structure(backend: Backend) -> None:
    p = sc.GaussianParameter(_mean(backend, "float64"), sc.KroneckerCovariance())
    p.cov.reset_parameters(1.0, backend.generator(0))
    base = backend.to_numpy(p.cov.to_dense())
    p.cov.sample_scale = 0.5
    assert p.cov.structure.sample_scale == 0.5  # type: ignore[attr-defined]
    np.testing.assert_allclose(backend.to_numpy(p.cov.to_dense()), 0.25 * base, rtol=1e-12)
    for bad in (float("nan"), -1.0, "2", None):
        with pytest.raises(ValueError, match="`sample_scale` must be a finite float >= 0"):
            p.cov.sample_scale = bad  # type: ignore[assignment]
    assert p.cov.sample_scale == 0.5
