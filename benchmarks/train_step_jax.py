"""One variational training step of a Bayesian MLP under jax.jit: structcov and hand-written JAX.

    python benchmarks/train_step_jax.py [--repeats 30] [--width 256] [--batch 128] [--smoke]

The JAX counterpart of ``train_step.py``: JAX on its default device (CPU with
``jax[cpu]``), float32. The model is ``64 -> width -> width -> 10`` with ReLU, every
dense layer Gaussian with the same structure, and a step is what a VI training loop
does each minibatch: one reparametrised forward (one parameter sample), the
cross-entropy, the KL to N(0, I) over every layer divided by the training-set size
(1000), the gradient, and an Adam step (optax, lr 1e-3). The whole step (next key,
loss, gradient, optax update, apply) is one ``jax.jit`` program taking the model's
arrays, the Adam state, the minibatch and a PRNG key, and returning the new arrays,
state and key with the loss. Per structure (``diagonal``: softplus-parametrised
stds; ``kronecker``: full-rank factors, bias as the extra input column) it times,
interleaved after five warm-up steps each (the first compiles), the call and
``jax.block_until_ready`` on everything it returns:

- ``structcov``: `structcov.jax.EquinoxSequential` of `structcov.jax.EquinoxLinear`
  layers, ``structcov.jax.kl_divergence(model, 1.0)``; the model is split with
  ``eqx.partition`` into its arrays (what is differentiated and updated) and its
  static part, as ``vi_digits.py`` does;
- ``native``: the same maths written directly on per-layer dicts of plain ``jnp`` arrays: the
  minimal forward (``x W_s^T + b_s`` from ``M + softplus(rho) * eps`` for the
  diagonal, ``x M^T + b + ((x~ B) Z^T) A^T`` with ``x~ = [x, 1]`` for Kronecker) and
  the closed-form KL (Kronecker: ``tr`` and ``logdet`` from the factors), initialised
  at the scales of ``train_step.py``'s native model.

It prints a Markdown table of the median step (ms) and the ratio structcov / native.
``--smoke`` runs a tiny model for two steps.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from _common import load_average, machine_info

import structcov as sc
import structcov.jax as sj

NUM_TRAIN = 1000
IN, OUT = 64, 10
LR = 1e-3

#: (arrays, optimizer state, x, y, key) -> (arrays, optimizer state, key, loss)
Step = Callable[[Any, Any, Any, Any, Any], tuple[Any, Any, Any, Any]]


def sizes(width: int) -> list[tuple[int, int]]:
    return [(IN, width), (width, width), (width, OUT)]


def cross_entropy(logits: Any, y: Any) -> Any:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def jitted_step(loss: Callable[[Any, Any, Any, Any], Any], optimizer: Any) -> Step:
    """The jitted training step of ``loss(arrays, x, y, key)``: the key is split inside."""

    @jax.jit
    def step(params: Any, opt_state: Any, x: Any, y: Any, key: Any) -> Any:
        key, sub = jax.random.split(key)
        value, grads = jax.value_and_grad(loss)(params, x, y, sub)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, value

    return step


# ------------------------------------------------------------------ structcov
def structcov_model(kind: str, width: int, key: Any) -> tuple[Any, Step, Any]:
    """(arrays, jitted step, optimizer) of the structcov Equinox MLP."""
    cov = sc.DiagonalCovariance if kind == "diagonal" else sc.KroneckerCovariance
    keys = jax.random.split(key, len(sizes(width)))
    layers: list[Any] = []
    for k, (d_in, d_out) in zip(keys, sizes(width), strict=True):
        layers += [sj.EquinoxLinear(d_in, d_out, cov=cov, key=k, dtype=jnp.float32), jax.nn.relu]
    params, static = eqx.partition(sj.EquinoxSequential(*layers[:-1]), eqx.is_array)

    def loss(params: Any, x: Any, y: Any, key: Any) -> Any:
        model = eqx.combine(params, static)
        logits = model(x, (), key)
        return cross_entropy(logits, y) + sj.kl_divergence(model, 1.0) / NUM_TRAIN

    optimizer = optax.adam(LR)
    return params, jitted_step(loss, optimizer), optimizer


# ------------------------------------------------------------------ native
def native_layer(kind: str, d_in: int, d_out: int, key: Any) -> dict[str, Any]:
    """One layer's arrays, at the initial scales of ``train_step.py``'s ``NativeLayer``."""
    k_w, k_b, k_a, k_bb = jax.random.split(key, 4)
    bound = 1 / math.sqrt(d_in)
    f32 = jnp.float32
    layer = {
        "weight": jax.random.normal(k_w, (d_out, d_in), f32) * bound,
        "bias": jax.random.normal(k_b, (d_out,), f32),
    }
    if kind == "diagonal":
        start = math.log(math.expm1(bound))  # softplus^-1 of the std
        layer["rho_w"] = jnp.full((d_out, d_in), start, f32)
        layer["rho_b"] = jnp.full((d_out,), start, f32)
    else:
        layer["a"] = jax.random.normal(k_a, (d_out, d_out), f32) / math.sqrt(d_out)
        layer["b"] = jax.random.normal(k_bb, (d_in + 1, d_in + 1), f32) * (
            bound / math.sqrt(d_in + 1)
        )
    return layer


def native_forward(kind: str, layer: dict[str, Any], x: Any, key: Any) -> Any:
    if kind == "diagonal":
        k_w, k_b = jax.random.split(key)
        weight, bias = layer["weight"], layer["bias"]
        w = weight + jax.nn.softplus(layer["rho_w"]) * jax.random.normal(k_w, weight.shape)
        b = bias + jax.nn.softplus(layer["rho_b"]) * jax.random.normal(k_b, bias.shape)
        return x @ w.T + b
    a, b = layer["a"], layer["b"]
    z = jax.random.normal(key, (a.shape[1], b.shape[1]), a.dtype)
    xb = x @ b[:-1] + b[-1]  # x~ B, the bias as the last input row
    return x @ layer["weight"].T + layer["bias"] + (xb @ z.T) @ a.T


def native_kl(kind: str, layer: dict[str, Any]) -> Any:
    weight, bias = layer["weight"], layer["bias"]
    mean_sq = jnp.sum(weight**2) + jnp.sum(bias**2)
    if kind == "diagonal":
        std = [jax.nn.softplus(layer["rho_w"]), jax.nn.softplus(layer["rho_b"])]
        return 0.5 * sum(jnp.sum(s**2 - 1 - 2 * jnp.log(s)) for s in std) + 0.5 * mean_sq
    a, b = layer["a"], layer["b"]
    n_out, n_in = a.shape[0], b.shape[0]
    trace = jnp.sum(a**2) * jnp.sum(b**2)
    logdet = 2 * n_in * jnp.linalg.slogdet(a)[1] + 2 * n_out * jnp.linalg.slogdet(b)[1]
    return 0.5 * (trace + mean_sq - n_out * n_in - logdet)


def native_model(kind: str, width: int, key: Any) -> tuple[Any, Step, Any]:
    """(arrays, jitted step, optimizer) of the hand-written MLP: a list of dicts."""
    keys = jax.random.split(key, len(sizes(width)))
    params = [
        native_layer(kind, d_in, d_out, k)
        for k, (d_in, d_out) in zip(keys, sizes(width), strict=True)
    ]

    def loss(params: Any, x: Any, y: Any, key: Any) -> Any:
        keys = jax.random.split(key, len(params))
        h = x
        for i, (layer, k) in enumerate(zip(params, keys, strict=True)):
            h = native_forward(kind, layer, h, k)
            if i < len(params) - 1:
                h = jax.nn.relu(h)
        kl = sum(native_kl(kind, layer) for layer in params)
        return cross_entropy(h, y) + kl / NUM_TRAIN

    optimizer = optax.adam(LR)
    return params, jitted_step(loss, optimizer), optimizer


# ------------------------------------------------------------------ timing
def stepper(params: Any, step: Step, optimizer: Any, x: Any, y: Any, key: Any) -> Any:
    """A closure running one timed step; it carries the arrays, Adam state and key."""
    state = {"params": params, "opt": optimizer.init(params), "key": key}

    def run() -> float:
        start = time.perf_counter()
        out = step(state["params"], state["opt"], x, y, state["key"])
        jax.block_until_ready(out)
        elapsed = time.perf_counter() - start
        state["params"], state["opt"], state["key"], value = out
        if not math.isfinite(float(value)):
            raise FloatingPointError(f"non-finite loss {float(value)}")
        return elapsed

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    warmup = 5
    if args.smoke:
        args.repeats, args.width, args.batch, warmup = 2, 8, 4, 1
    print(machine_info())
    print(
        f"jax {jax.__version__} ({jax.default_backend()}: {jax.devices()}), float32, "
        f"MLP {IN}-{args.width}-{args.width}-{OUT}, batch {args.batch}, one sample, "
        f"optax Adam, whole step under jax.jit; {args.repeats} interleaved steps after "
        f"{warmup} warm-up steps each"
    )
    k_x, k_y, k_model, k_step = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k_x, (args.batch, IN), jnp.float32)
    y = jax.random.randint(k_y, (args.batch,), 0, OUT)
    print("| structure | structcov (ms) | native (ms) | / native |")
    print("|---|---|---|---|")
    for kind in ("diagonal", "kronecker"):
        builders = {"structcov": structcov_model, "native": native_model}
        steps = {
            name: stepper(*build(kind, args.width, k_model), x, y, k_step)
            for name, build in builders.items()
        }
        for step in steps.values():
            for _ in range(warmup):
                step()
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                times[name].append(step())
        med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        print(
            f"| {kind} | {med['structcov']:.2f} | {med['native']:.2f} "
            f"| {med['structcov'] / med['native']:.2f} |"
        )
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
