"""Short float32 VI runs on real data (scikit-learn's digits), per structure and backend.

A Bayesian MLP 64 -> 16 -> 10 (tanh), every dense layer Gaussian with the
structure under test at the library's defaults (no ``scale_transform``, the
layers' own initialisation, each covariance array's ``lr_scaling``), is trained
for a few dozen Adam steps on minibatches of standardised digits with the loss

    mean NLL of one reparametrised draw + KL(q || N(0, I)) / N_train.

Each test asserts what a real training run needs (DESIGN.md, section 5): the
loss is finite at every step, the Monte Carlo predictive NLL on held-out digits
is lower after training than at initialisation, every stored covariance array
moved, and everything stayed float32. The long multi-seed run is
``benchmarks/vi_digits.py``.

Structures: diagonal, low rank (8) plus diagonal and full-rank Kronecker.
Reduced-rank Kronecker (e.g. ranks 4 x 4) and plain low rank are singular
(rank < P), so their KL to the prior is +inf: they have no VI objective.

The torch tests run in the torch session and the JAX tests in the jax session
(``STRUCTCOV_BACKEND``; both when it is unset), like the end-to-end tests.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_digits

import structcov as sc

STRUCTURES: dict[str, Callable[[], Any]] = {
    "diagonal": sc.DiagonalCovariance,
    "lowrank8+diag": lambda: sc.LowRankPlusDiagonalCovariance(8),
    "kronecker": sc.KroneckerCovariance,
}

HIDDEN = 16
STEPS = 30
BATCH = 64
LR = 1e-2
PRIOR_SCALE = 1.0
EVAL_SAMPLES = 16
NUM_TRAIN = 640
NUM_TEST = 256


def _session_runs(backend: str) -> bool:
    selected = os.environ.get("STRUCTCOV_BACKEND")
    return not selected or backend in [name.strip() for name in selected.split(",")]


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """A fixed split of digits: float32 inputs standardised with the training statistics."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:NUM_TRAIN], order[NUM_TRAIN : NUM_TRAIN + NUM_TEST]
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    x = ((x - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)
    # STEPS minibatches of BATCH training indices, fixed.
    rng = np.random.default_rng(1)
    epochs = math.ceil(STEPS * BATCH / NUM_TRAIN)
    index = np.concatenate([rng.permutation(NUM_TRAIN) for _ in range(epochs)])
    batches = index[: STEPS * BATCH].reshape(STEPS, BATCH)
    return {
        "x_batches": x[train][batches],
        "y_batches": y[train][batches].astype(np.int64),
        "x_test": x[test],
        "y_test": y[test].astype(np.int64),
    }


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(probs[np.arange(len(labels)), labels].astype(np.float64))))


# ----------------------------------------------------------------------------- torch
@pytest.fixture
def torch_one_thread() -> Iterator[Any]:
    """torch with one intra-op thread for this test (restored after): a model this small
    runs faster on one, and many times faster on a loaded machine."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield torch
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not _session_runs("torch"), reason="torch training runs in the torch session")
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_torch_vi_on_digits(
    structure: str, digits: dict[str, np.ndarray], torch_one_thread: Any
) -> None:
    torch = torch_one_thread
    import structcov.torch as st

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = st.Sequential(
        st.Linear(64, HIDDEN, cov=STRUCTURES[structure], dtype=torch.float32),
        torch.nn.Tanh(),
        st.Linear(HIDDEN, 10, cov=STRUCTURES[structure], dtype=torch.float32),
    )
    optimizer = torch.optim.Adam(st.param_groups(model, LR))
    x_test, y_test = torch.from_numpy(digits["x_test"]), digits["y_test"]

    def test_nll() -> float:
        eval_generator = torch.Generator().manual_seed(123)
        with torch.no_grad():
            probs = st.predictive(
                model, x_test, (EVAL_SAMPLES,), eval_generator, probabilities=True
            )
        assert probs.dtype == torch.float32
        return _nll(probs.numpy(), y_test)

    initial_nll = test_nll()
    initial_cov = {k: v.detach().clone() for k, v in model.named_parameters() if ".cov." in k}
    assert len(initial_cov) == 2 * len(model[0].params.cov.storage())

    losses = []
    for x_np, y_np in zip(digits["x_batches"], digits["y_batches"], strict=True):
        logits = model(torch.from_numpy(x_np), (1,), generator)[0]
        nll = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y_np))
        loss = nll + st.kl_divergence(model, PRIOR_SCALE) / NUM_TRAIN
        assert loss.dtype == torch.float32
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    assert all(math.isfinite(value) for value in losses), losses
    final_nll = test_nll()
    assert final_nll < initial_nll, (initial_nll, final_nll)
    final = dict(model.named_parameters())
    unchanged = [k for k, v in initial_cov.items() if torch.equal(v, final[k].detach())]
    assert not unchanged, f"covariance arrays that did not move: {unchanged}"
    assert all(v.dtype == torch.float32 for v in final.values())


# ------------------------------------------------------------------------------- JAX
@pytest.mark.skipif(not _session_runs("jax"), reason="JAX training runs in the jax session")
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_jax_vi_on_digits(structure: str, digits: dict[str, np.ndarray]) -> None:
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import operator

    import jax.numpy as jnp

    import structcov.jax as sj

    def layer(key: Any, d_in: int, d_out: int) -> sc.GaussianParameter:
        # Means at torch.nn.Linear's bounds, the covariance at the same scale (st.Linear's).
        bound = 1.0 / math.sqrt(d_in)
        k_w, k_b, k_c = jax.random.split(key, 3)
        param = sc.GaussianParameter(
            {
                "weight": jax.random.uniform(k_w, (d_out, d_in), jnp.float32, -bound, bound),
                "bias": jax.random.uniform(k_b, (d_out,), jnp.float32, -bound, bound),
            },
            STRUCTURES[structure](),
        )
        param.cov.reset_parameters(bound, generator=k_c)
        return param

    def forward(params: Any, x: Any, sample_shape: tuple[int, ...], key: Any) -> Any:
        k1, k2 = jax.random.split(key)
        hidden = jnp.tanh(sc.linear(x, params[0], sample_shape, k1))
        return sc.linear(hidden, params[1], sample_shape, k2, input_contains_samples=True)

    k1, k2 = jax.random.split(jax.random.key(0))
    params = (layer(k1, 64, HIDDEN), layer(k2, HIDDEN, 10))
    priors = tuple(sc.normal_prior(p, PRIOR_SCALE) for p in params)
    scales = sj.lr_scaling_tree(params)
    optimizer = optax.chain(
        optax.adam(LR),
        optax.stateless(lambda updates, _: jax.tree.map(operator.mul, updates, scales)),
    )

    def loss_fn(params: Any, x: Any, y: Any, key: Any) -> Any:
        log_probs = jax.nn.log_softmax(forward(params, x, (1,), key)[0], axis=-1)
        nll = -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=-1))
        kl = sum(sc.kl_divergence(p, prior) for p, prior in zip(params, priors, strict=True))
        return nll + kl / NUM_TRAIN

    @jax.jit
    def train(params: Any, x: Any, y: Any, key: Any) -> Any:
        """Every step in one scan: one compilation per structure."""

        def step(carry: Any, inputs: Any) -> Any:
            params, state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, *inputs)
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        keys = jax.random.split(key, x.shape[0])
        (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), (x, y, keys))
        return params, losses

    @jax.jit
    def predictive(params: Any, x: Any) -> Any:
        logits = forward(params, x, (EVAL_SAMPLES,), jax.random.key(123))
        return jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)

    x_test, y_test = jnp.asarray(digits["x_test"]), digits["y_test"]
    initial_nll = _nll(np.asarray(predictive(params, x_test)), y_test)
    trained, losses = train(
        params,
        jnp.asarray(digits["x_batches"]),
        jnp.asarray(digits["y_batches"]),
        jax.random.key(1),
    )

    losses = np.asarray(losses)
    assert losses.dtype == np.float32
    assert np.all(np.isfinite(losses)), losses
    final_nll = _nll(np.asarray(predictive(trained, x_test)), y_test)
    assert final_nll < initial_nll, (initial_nll, final_nll)
    for before, after in zip(params, trained, strict=True):
        for path, array in after.cov.storage().items():
            assert array.dtype == jnp.float32, path
            assert not np.array_equal(np.asarray(before.cov.storage()[path]), np.asarray(array)), (
                f"covariance array {path!r} did not move"
            )
