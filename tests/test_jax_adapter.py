"""structcov.jax: pytree registration, jit/grad/vmap, optax, Equinox and Flax NNX wrappers.

Runs in the jax session (``STRUCTCOV_BACKEND`` unset or naming jax) when jax is
installed. The optax, Equinox and NNX tests skip themselves when those packages
are missing.
"""

from __future__ import annotations

import operator
import os
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

_selected = [b.strip() for b in os.environ.get("STRUCTCOV_BACKEND", "").split(",") if b.strip()]
if _selected and "jax" not in _selected:
    pytest.skip(
        f"the JAX adapter is tested in the jax session (STRUCTCOV_BACKEND={','.join(_selected)})",
        allow_module_level=True,
    )
jax = pytest.importorskip("jax", reason="jax is not installed (pip install structcov[jax])")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import structcov as sc  # noqa: E402
import structcov.jax as scj  # noqa: E402
from cases import CASE_IDS, CASES, Case, make_parameter  # noqa: E402
from conftest import Backend, tolerance  # noqa: E402

JAX = Backend("jax", jnp)
NUMPY = Backend("numpy", np)
keystr = jax.tree_util.keystr

STRUCTURES = {
    "diagonal": sc.DiagonalCovariance,
    "lowrank+diag": lambda: sc.LowRankPlusDiagonalCovariance(2),
    "factorized": sc.FactorizedCovariance,
    "kronecker": sc.KroneckerCovariance,
}


def to_jax(param: sc.GaussianParameter) -> Any:
    """The same parameter with JAX arrays: built with NumPy, moved leaf by leaf.

    Building with NumPy avoids compiling an eager JAX op per shape, and moving
    with ``tree_map`` exercises the pytree with NumPy leaves.
    """
    moved = jax.tree_util.tree_map(jnp.asarray, param)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(moved))
    return moved


def make(structure: str, seed: int = 0, dtype: str = "float64", bias_first: bool = False) -> Any:
    """A full-rank GaussianParameter over weight (3, 4) and bias (3,), random values."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((3, 4)).astype(dtype)
    bias = rng.standard_normal(3).astype(dtype)
    mean = {"bias": bias, "weight": weight} if bias_first else {"weight": weight, "bias": bias}
    param = sc.GaussianParameter(mean, STRUCTURES[structure]())
    param.cov.reset_parameters(0.5, generator=rng)
    return to_jax(param)


def as_np(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def assert_same_parameter(got: sc.GaussianParameter, expected: sc.GaussianParameter) -> None:
    assert type(got) is type(expected)
    assert type(got.cov) is type(expected.cov)
    assert list(got.mean) == list(expected.mean)
    assert got.names == expected.names
    for name, value in expected.mean.items():
        if value is None:
            assert got.mean[name] is None
        else:
            np.testing.assert_array_equal(as_np(got.mean[name]), as_np(value))
    assert (
        got.cov.structure == expected.cov.structure and got.cov._config() == expected.cov._config()
    )
    got_storage, expected_storage = got.cov.storage(), expected.cov.storage()
    assert list(got_storage) == list(expected_storage)
    for path, value in expected_storage.items():
        assert got_storage[path].dtype == value.dtype
        np.testing.assert_array_equal(as_np(got_storage[path]), as_np(value))


def expected_paths(param: sc.GaussianParameter) -> list[str]:
    return [f"['{n}']" for n in param.names] + [f".cov['{p}']" for p in param.cov.storage()]


# --------------------------------------------------------------- flatten/unflatten
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_flatten_unflatten_round_trip(case: Case) -> None:
    param = to_jax(make_parameter(case, NUMPY, "float64")[0])
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(param)
    paths = [keystr(path) for path, _ in leaves_with_paths]
    leaves = [leaf for _, leaf in leaves_with_paths]
    assert paths == expected_paths(param)
    assert leaves == jax.tree_util.tree_leaves(param)

    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert_same_parameter(rebuilt, param)
    assert jax.tree_util.tree_structure(rebuilt) == treedef
    # the covariance alone is a pytree too
    cov_leaves, cov_treedef = jax.tree_util.tree_flatten(param.cov)
    assert cov_leaves == list(param.cov.storage().values())
    rebuilt_cov = jax.tree_util.tree_unflatten(cov_treedef, cov_leaves)
    assert_same_parameter(sc.GaussianParameter._rebuild(param.mean, rebuilt_cov), param)


def test_none_means_are_static_and_come_back() -> None:
    rng = np.random.default_rng(0)
    mean = {"weight": JAX.asarray(rng.standard_normal((3, 2)), "float64"), "bias": None}
    param = sc.GaussianParameter(mean, sc.KroneckerCovariance())
    rebuilt = jax.tree_util.tree_map(lambda x: x * 2, param)
    assert list(rebuilt.mean) == ["weight", "bias"]
    assert rebuilt.mean["bias"] is None
    assert len(jax.tree_util.tree_leaves(param)) == 1 + 2  # weight; input_factor.weight, output


def test_leaf_order_follows_insertion_order_not_sorted_keys() -> None:
    param = make("lowrank+diag", bias_first=True)
    paths = [
        keystr(path, simple=True, separator="/")
        for path, _ in jax.tree_util.tree_flatten_with_path(param)[0]
    ]
    assert paths == [
        "bias",
        "weight",
        "cov/factor.bias",
        "cov/factor.weight",
        "cov/scale.bias",
        "cov/scale.weight",
    ]
    # leaf shapes follow the same order
    shapes = [leaf.shape for leaf in jax.tree_util.tree_leaves(param)]
    assert shapes == [(3,), (3, 4), (3, 2), (3, 4, 2), (3,), (3, 4)]

    named = jax.tree_util.tree_map_with_path(
        lambda path, _: keystr(path, simple=True, separator="/"), param
    )
    assert named.mean == {"bias": "bias", "weight": "weight"}
    assert named.cov.factor == {"bias": "cov/factor.bias", "weight": "cov/factor.weight"}

    # the flat parameter order survives a round trip through jit
    flat = jax.jit(lambda p: p.flat_mean())(param)
    np.testing.assert_array_equal(
        as_np(flat), np.concatenate([as_np(param["bias"]), as_np(param["weight"]).ravel()])
    )


def test_static_state_is_aux_data() -> None:
    a, b = make("kronecker", seed=0), make("kronecker", seed=1)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    # different names order, ranks or structure give different treedefs
    assert jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(
        make("kronecker", bias_first=True)
    )
    assert jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(make("factorized"))
    hash(jax.tree_util.tree_structure(a))


def test_uninitialized_covariance_is_not_a_pytree() -> None:
    with pytest.raises(RuntimeError, match="has not been initialized"):
        jax.tree_util.tree_leaves(sc.DiagonalCovariance())


def test_register_a_user_subclass() -> None:
    class ScaledDiagonal(sc.DiagonalCovariance):
        pass

    rng = np.random.default_rng(0)
    mean = JAX.asarray(rng.standard_normal(4), "float64")
    param = sc.GaussianParameter(mean, ScaledDiagonal())
    assert jax.tree_util.tree_leaves(param.cov) == [param.cov]  # not registered yet: a leaf
    assert scj.register(ScaledDiagonal) is ScaledDiagonal
    assert scj.register(ScaledDiagonal) is ScaledDiagonal  # idempotent
    rebuilt = jax.tree_util.tree_map(lambda x: x, param)
    assert type(rebuilt.cov) is ScaledDiagonal
    assert_same_parameter(rebuilt, param)
    with pytest.raises(TypeError, match="`cls` must be a subclass"):
        scj.register(dict)


def test_subclasses_defined_before_import_are_registered() -> None:
    code = textwrap.dedent(
        """
        import structcov as sc

        class Mine(sc.LowRankPlusDiagonalCovariance):
            pass

        import jax, jax.numpy as jnp
        import structcov.jax

        param = sc.GaussianParameter(jnp.zeros(4), Mine(2))
        assert len(jax.tree_util.tree_leaves(param)) == 3, jax.tree_util.tree_leaves(param)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------- jax.jit
@pytest.mark.parametrize(
    ("structure", "dtype"),
    [(s, "float64") for s in STRUCTURES] + [("kronecker", "float32")],
)
def test_jit_with_the_parameter_as_argument_equals_eager(structure: str, dtype: str) -> None:
    param = make(structure, dtype=dtype)
    key = jax.random.key(7)
    tol = tolerance(dtype)

    def sample(p: sc.GaussianParameter, key: Any) -> dict[str, Any]:
        return p.sample((5,), generator=key)

    eager = sample(param, key)
    jitted = jax.jit(sample)(param, key)
    assert set(jitted) == set(eager)
    for name in eager:
        assert jitted[name].dtype == eager[name].dtype
        np.testing.assert_allclose(as_np(jitted[name]), as_np(eager[name]), **tol)

    # a dict argument comes into jit with sorted keys; the core looks names up
    value = eager
    got = jax.jit(lambda p, v: p.log_prob(v))(param, value)
    assert got.shape == (5,)
    np.testing.assert_allclose(as_np(got), as_np(param.log_prob(value)), **tol)
    np.testing.assert_allclose(
        as_np(jax.jit(lambda p: p.entropy())(param)), as_np(param.entropy()), **tol
    )

    def kl(p: sc.GaussianParameter) -> Any:
        return sc.kl_divergence(p, sc.normal_prior(p, 0.8))

    got = jax.jit(kl)(param)
    assert got.shape == ()
    assert got.dtype == param["weight"].dtype
    np.testing.assert_allclose(as_np(got), as_np(kl(param)), **tol)
    # both sides traced: KL between two parameters
    other = make("factorized", seed=3, dtype=dtype)
    np.testing.assert_allclose(
        as_np(jax.jit(sc.kl_divergence)(param, other)),
        as_np(sc.kl_divergence(param, other)),
        **tol,
    )


def test_jit_returns_a_parameter() -> None:
    param = make("kronecker")
    out = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: 2 * x, p))(param)
    assert isinstance(out, sc.GaussianParameter)
    np.testing.assert_allclose(as_np(out.cov.to_dense()), 16 * as_np(param.cov.to_dense()))


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_a_step_on_its_own_output_compiles_once(structure: str) -> None:
    """Initial storage and storage drawn with a key lie where the means lie without being
    committed to a device: a committed leaf next to uncommitted means made a jitted
    step compile a second time when fed its own output (all committed then)."""
    for reset in (False, True):  # the initial storage, and storage drawn with a key
        mean = {"weight": jnp.zeros((3, 4)), "bias": jnp.zeros(3)}
        param = sc.GaussianParameter(mean, STRUCTURES[structure]())
        if reset:
            param.cov.reset_parameters(0.3, generator=jax.random.key(0))
        step = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: 0.5 * x, p))
        step(step(param))
        assert step._cache_size() == 1, reset


# ---------------------------------------------------------------------- jax.grad
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_grad_of_kl_matches_finite_differences(structure: str) -> None:
    param = make(structure)

    def kl(p: sc.GaussianParameter) -> Any:
        return sc.kl_divergence(p, sc.normal_prior(p, 0.7))

    grads = jax.jit(jax.grad(kl))(param)
    kl = jax.jit(kl)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(param)
    leaves, treedef = jax.tree_util.tree_flatten(param)
    grad_leaves = jax.tree_util.tree_leaves(grads)
    h = 1e-6
    rng = np.random.default_rng(0)
    for i, leaf in enumerate(leaves):
        for flat_index in {0, leaf.size - 1, int(rng.integers(leaf.size))}:
            index = np.unravel_index(flat_index, leaf.shape)

            def shifted(delta: float, i: int = i, index: Any = index) -> float:
                moved = list(leaves)
                moved[i] = leaves[i].at[index].add(delta)
                return float(kl(jax.tree_util.tree_unflatten(treedef, moved)))

            numeric = (shifted(h) - shifted(-h)) / (2 * h)
            np.testing.assert_allclose(
                float(grad_leaves[i][index]), numeric, rtol=1e-6, atol=1e-7, err_msg=f"leaf {i}"
            )


# ---------------------------------------------------------------------- jax.vmap
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_vmap_over_keys_equals_the_loop(structure: str) -> None:
    param = make(structure)
    keys = jax.random.split(jax.random.key(3), 4)
    batched = jax.vmap(lambda key: param.sample((2,), generator=key))(keys)
    for i in range(4):
        expected = param.sample((2,), generator=keys[i])
        for name in param.names:
            assert batched[name].shape == (4, 2, *param[name].shape)
            np.testing.assert_allclose(
                as_np(batched[name][i]), as_np(expected[name]), rtol=1e-12, atol=1e-12
            )


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_vmap_over_stacked_parameters(structure: str) -> None:
    params = [make(structure, seed=0), make(structure, seed=1)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *params)
    assert isinstance(stacked, sc.GaussianParameter)

    def kl(p: sc.GaussianParameter) -> Any:
        return sc.kl_divergence(p, sc.normal_prior(p))

    got = jax.vmap(kl)(stacked)
    assert got.shape == (2,)
    expected = [kl(p) for p in params]
    np.testing.assert_allclose(as_np(got), as_np(jnp.stack(expected)), rtol=1e-10)
    entropies = jax.jit(jax.vmap(lambda p: p.entropy()))(stacked)
    np.testing.assert_allclose(
        as_np(entropies), [float(p.entropy()) for p in params], rtol=1e-10, atol=1e-10
    )


# ------------------------------------------------------------- lr scaling tree
@pytest.mark.parametrize("structure", [*STRUCTURES, "lowrank"])
def test_lr_scaling_tree(structure: str) -> None:
    if structure == "lowrank":
        param = sc.GaussianParameter(jnp.zeros((4, 3)), sc.LowRankCovariance(3))
    else:
        param = make(structure)
    scales = scj.lr_scaling_tree(param)
    assert jax.tree_util.tree_structure(scales) == jax.tree_util.tree_structure(param)
    by_path = {
        keystr(path, simple=True, separator="/"): value
        for path, value in jax.tree_util.tree_flatten_with_path(scales)[0]
    }
    expected = {name: 1.0 for name in param.names}
    expected.update({f"cov/{path}": s for path, s in param.cov.lr_scaling.items()})
    assert by_path == expected
    # usable as a per-leaf multiplier
    scaled = jax.tree_util.tree_map(operator.mul, param, scales)
    assert isinstance(scaled, sc.GaussianParameter)


def test_lr_scaling_tree_of_a_bigger_tree() -> None:
    model = {"layer": make("kronecker"), "temperature": jnp.ones(()), "head": make("diagonal")}
    scales = scj.lr_scaling_tree(model, default=0.5)
    assert scales["temperature"] == 0.5
    assert scales["layer"].cov.output_factor == pytest.approx(1 / 3)
    assert scales["head"].cov.scale == {"weight": 1.0, "bias": 1.0}
    assert jax.tree_util.tree_structure(scales) == jax.tree_util.tree_structure(model)


# ------------------------------------------------------------------------ optax
def target_gaussian() -> tuple[Any, np.ndarray]:
    """A known full-rank p over weight (3, 2) and bias (3,): P = 9, Sigma_p = D + U U^T."""
    rng = np.random.default_rng(42)
    mean = {"weight": rng.standard_normal((3, 2)), "bias": rng.standard_normal(3)}
    u = 0.7 * rng.standard_normal((9, 2))
    sigma = np.diag(rng.uniform(0.3, 1.5, 9)) + u @ u.T
    factor = np.linalg.cholesky(sigma)
    p = sc.GaussianParameter(mean, sc.FactorizedCovariance())
    p.cov.load_storage({"factor.weight": factor[:6].reshape(3, 2, 9), "factor.bias": factor[6:]})
    np.testing.assert_allclose(p.cov.to_dense(), sigma, rtol=1e-10, atol=1e-12)
    return to_jax(p), sigma


def fit(q: Any, p: Any, optimizer: Any, steps: int) -> tuple[Any, list[float]]:
    optax = pytest.importorskip("optax")

    @jax.jit
    def step(q: Any, state: Any) -> tuple[Any, Any, Any]:
        loss, grads = jax.value_and_grad(lambda q: sc.kl_divergence(q, p))(q)
        updates, state = optimizer.update(grads, state, q)
        return optax.apply_updates(q, updates), state, loss

    state = optimizer.init(q)
    losses = []
    for _ in range(steps):
        q, state, loss = step(q, state)
        losses.append(float(loss))
    return q, losses


@pytest.mark.parametrize("structure", ["diagonal", "lowrank+diag"])
def test_optax_adam_fits_q_to_p(structure: str) -> None:
    optax = pytest.importorskip("optax")
    p, sigma = target_gaussian()
    q = sc.GaussianParameter(
        {"weight": np.zeros((3, 2)), "bias": np.zeros(3)}, STRUCTURES[structure]()
    )
    q.cov.reset_parameters(1.0, generator=np.random.default_rng(0))
    q = to_jax(q)
    scales = scj.lr_scaling_tree(q)
    optimizer = optax.chain(
        optax.adam(0.05),
        optax.stateless(lambda updates, _: jax.tree_util.tree_map(operator.mul, updates, scales)),
    )
    q_fit, losses = fit(q, p, optimizer, 400)
    assert isinstance(q_fit, sc.GaussianParameter)
    assert q_fit.cov.structure == q.cov.structure and q_fit.cov._config() == q.cov._config()
    final = float(jax.jit(sc.kl_divergence)(q_fit, p))
    if structure == "diagonal":
        # KL(q || p) over diagonal q is minimised by 1 / diag(Sigma_p^-1), mean = m_p.
        precision_diag = np.diag(np.linalg.inv(sigma))
        best = 0.5 * (np.linalg.slogdet(sigma)[1] + np.sum(np.log(precision_diag)))
    else:
        best = 0.0  # q = p is reachable: Sigma_p is diagonal + rank 2
    assert losses[0] - best > 1.0
    assert final - best < 1e-3 * (losses[0] - best), (losses[0], final, best)


def test_optax_multi_transform_with_scaling_labels() -> None:
    optax = pytest.importorskip("optax")
    p, _ = target_gaussian()
    q = sc.GaussianParameter(
        {"weight": np.zeros((3, 2)), "bias": np.zeros(3)}, sc.LowRankPlusDiagonalCovariance(2)
    )
    q.cov.reset_parameters(1.0, generator=np.random.default_rng(0))
    q = to_jax(q)
    labels = scj.lr_scaling_tree(q)
    optimizer = optax.multi_transform(
        {s: optax.adam(0.05 * s) for s in set(jax.tree_util.tree_leaves(labels))}, labels
    )
    _, losses = fit(q, p, optimizer, 50)
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------- Equinox
def test_equinox_module() -> None:
    eqx = pytest.importorskip("equinox")
    optax = pytest.importorskip("optax")
    param = make("lowrank+diag")
    module = scj.equinox_module(param)
    assert isinstance(module, eqx.Module)
    assert isinstance(module, scj.EquinoxGaussian)
    assert module.param is param
    key = jax.random.key(1)
    for name, value in module.sample(key, (3,)).items():
        np.testing.assert_array_equal(as_np(value), as_np(param.sample((3,), generator=key)[name]))
    np.testing.assert_allclose(
        as_np(eqx.filter_jit(lambda m: m.kl_divergence())(module)),
        as_np(sc.kl_divergence(param, sc.normal_prior(param))),
        rtol=1e-12,
    )
    np.testing.assert_allclose(as_np(module.entropy()), as_np(param.entropy()))

    # a user model holding the wrapper (or a GaussianParameter directly) trains with optax
    class Model(eqx.Module):
        gaussian: Any
        raw: sc.GaussianParameter
        activation: Any = jax.nn.relu

        def loss(self) -> Any:
            return self.gaussian.kl_divergence() + sc.kl_divergence(
                self.raw, sc.normal_prior(self.raw)
            )

    model = Model(module, make("kronecker"))
    params = eqx.filter(model, eqx.is_array)
    scales = scj.lr_scaling_tree(params)
    optimizer = optax.chain(
        optax.adam(0.02),
        optax.stateless(lambda updates, _: jax.tree_util.tree_map(operator.mul, updates, scales)),
    )
    state = optimizer.init(params)

    @eqx.filter_jit
    def step(model: Model, state: Any) -> tuple[Model, Any, Any]:
        loss, grads = eqx.filter_value_and_grad(lambda m: m.loss())(model)
        updates, state = optimizer.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, loss

    first = float(model.loss())
    for _ in range(100):
        model, state, _ = step(model, state)
    assert float(model.loss()) < 0.5 * first


# ---------------------------------------------------------------------- Flax NNX
def test_nnx_module() -> None:
    pytest.importorskip("flax")
    optax = pytest.importorskip("optax")
    from flax import nnx

    param = make("kronecker", bias_first=True)
    module = scj.nnx_module(param)
    assert isinstance(module, nnx.Module)
    assert isinstance(module, scj.NNXGaussian)
    state = nnx.state(module, nnx.Param)
    flat = {"/".join(map(str, path)): v for path, v in nnx.to_flat_state(state)}
    assert set(flat) == {
        "mean/bias",
        "mean/weight",
        "cov/input_factor.bias",
        "cov/input_factor.weight",
        "cov/output_factor",
    }
    assert flat["cov/output_factor"].get_metadata()["lr_scaling"] == pytest.approx(1 / 3)
    assert flat["mean/weight"].get_metadata()["lr_scaling"] == 1.0
    assert_same_parameter(module.param, param)

    key = jax.random.key(2)
    for name, value in module.sample(key, (3,)).items():
        np.testing.assert_allclose(
            as_np(value), as_np(param.sample((3,), generator=key)[name]), rtol=1e-12
        )
    expected = as_np(sc.kl_divergence(param, sc.normal_prior(param)))
    np.testing.assert_allclose(as_np(module.kl_divergence()), expected, rtol=1e-12)
    np.testing.assert_allclose(
        as_np(nnx.jit(lambda m: m.kl_divergence())(module)), expected, rtol=1e-12
    )
    np.testing.assert_allclose(
        as_np(module.kl_divergence(sc.normal_prior(param, 2.0))),
        as_np(sc.kl_divergence(param, sc.normal_prior(param, 2.0))),
        rtol=1e-12,
    )

    # per-leaf learning-rate scaling from the nnx.Param metadata (as in the class docstring)
    scales = jax.tree_util.tree_map(
        lambda v: v.get_metadata().get("lr_scaling", 1.0),
        nnx.state(module, nnx.Param),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    tx = optax.chain(
        optax.adam(0.02),
        optax.stateless(lambda updates, _: jax.tree_util.tree_map(operator.mul, updates, scales)),
    )
    optimizer = nnx.Optimizer(module, tx, wrt=nnx.Param)

    @nnx.jit
    def step(module: Any, optimizer: Any) -> Any:
        loss, grads = nnx.value_and_grad(lambda m: m.kl_divergence())(module)
        optimizer.update(module, grads)
        return loss

    first = float(module.kl_divergence())
    for _ in range(100):
        step(module, optimizer)
    assert float(module.kl_divergence()) < 0.5 * first
    # the rebuilt parameter follows the updated nnx.Params
    assert not np.allclose(as_np(module.param["weight"]), as_np(param["weight"]))


def test_wrappers_reject_non_parameters() -> None:
    pytest.importorskip("equinox")
    with pytest.raises(TypeError, match="`param` must be a GaussianParameter"):
        scj.equinox_module(sc.DiagonalCovariance())
