"""Variational Bayesian MLP on scikit-learn's digits, float32: torch and JAX side by side.

    python benchmarks/vi_digits.py                         # both backends, default structures
    python benchmarks/vi_digits.py --backend jax --structures diagonal lrpd8 \\
        --scale-transform identity                         # one cell of the evidence run
    python benchmarks/vi_digits.py --smoke                 # 2 epochs, 1 seed (a check it runs)

The model: 64 -> 32 -> 10 with tanh, every dense layer Gaussian (mean-field VI
with a structured covariance per layer), float32, inputs standardised with the
training split's statistics. The split is fixed: 1347 training and 450 test
images, drawn with ``--split-seed`` (0). Training is minibatch Adam (lr 1e-2,
batch 128, the last partial batch of each shuffled epoch dropped so shapes stay
static: 10 steps an epoch) on

    loss = mean_s,i NLL(y_i | x_i, w_s)  +  KL(q || N(0, prior^2 I)) / N_train

with ``--train-samples`` (1) reparametrised draws w_s per step and the exact KL
(`structcov.kl_divergence`, summed over layers). Each covariance array's learning
rate is multiplied by its ``lr_scaling`` (``structcov.torch.param_groups`` /
``structcov.jax.lr_scaling_tree``; e.g. 1/rank for low-rank factors), as the
library recommends; ``--no-lr-scaling`` turns that off.

The same model twice:

- torch: `structcov.torch.Linear` layers in `structcov.torch.Sequential`,
  `structcov.torch.kl_divergence(model, prior)`, `structcov.torch.predictive`.
- JAX: `structcov.jax.EquinoxLinear` layers in `structcov.jax.EquinoxSequential`,
  `structcov.jax.kl_divergence(model, prior)`, `structcov.jax.predictive`; one
  epoch a ``jax.lax.scan`` of the Adam step (optax) over the model's arrays
  (``eqx.partition``), jitted once per structure and shared by its seeds.

Structures (``--structures``): ``diagonal``, ``lrpd8`` (low rank 8 plus
diagonal), ``kron`` (Kronecker, full-rank factors) and ``kron4x4`` (Kronecker
with input and output rank 4). ``--scale-transform`` (softplus, exp, identity)
is passed to the diagonal and low-rank-plus-diagonal covariances; without it
they use the library's default.

Singular structures have no VI objective. Plain low rank
(``LowRankCovariance(8)``) is not offered: S S^T of rank 8 < P is singular, so
KL(q || N(0, prior^2 I)) is +inf and the ELBO is -inf whatever its parameters;
low rank needs the diagonal (lrpd8). The same holds for reduced-rank Kronecker:
``kron4x4`` has rank 4 * 4 = 16 < P, so its loss is +inf at every step (counted
as non-finite). It can be selected to show exactly that, but is not run by
default.

Per run: test accuracy, test NLL and ECE (15 equal-width confidence bins) of the
Monte Carlo predictive (mean of softmax over ``--eval-samples`` = 32 draws),
seconds per epoch (median over epochs; the first JAX epoch includes
compilation), the number of steps whose loss was not finite, and whether the
run ended with non-finite parameters or predictions. A markdown table goes to
stdout; everything, with the machine, to ``benchmarks/results/vi_digits.json``
(``--output``).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, machine_info

import structcov as sc

STRUCTURE_NAMES = ("diagonal", "lrpd8", "kron", "kron4x4")
#: What runs by default: kron4x4 is singular (see the module docstring).
DEFAULT_STRUCTURES = ("diagonal", "lrpd8", "kron")
TRANSFORMS = ("softplus", "exp", "identity")
HIDDEN = 32
NUM_CLASSES = 10
ECE_BINS = 15


# ------------------------------------------------------------------------- data
def load_data(split_seed: int = 0, num_test: int = 450) -> dict[str, np.ndarray]:
    """Digits as float32, standardised with the training split's mean and std.

    Pixels constant on the training split (std 0) are only centred. Returns
    ``x_train`` (1347, 64), ``y_train`` (1347,), ``x_test`` (450, 64), ``y_test``.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(split_seed).permutation(len(y))
    test, train = order[:num_test], order[num_test:]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    x = ((x - mean) / std).astype(np.float32)
    return {
        "x_train": x[train],
        "y_train": y[train].astype(np.int64),
        "x_test": x[test],
        "y_test": y[test].astype(np.int64),
    }


def covariance_factory(structure: str, scale_transform: str | None) -> Callable[[], Any]:
    """A zero-argument factory of the core covariance for one layer."""
    options = {} if scale_transform is None else {"scale_transform": scale_transform}
    if structure == "diagonal":
        return lambda: sc.DiagonalCovariance(**options)
    if structure == "lrpd8":
        return lambda: sc.LowRankPlusDiagonalCovariance(8, **options)
    if structure == "kron":
        return sc.KroneckerCovariance
    if structure == "kron4x4":
        return lambda: sc.KroneckerCovariance(input_rank=4, output_rank=4)
    raise ValueError(f"`structure` must be one of {list(STRUCTURE_NAMES)}, got {structure!r}")


def batches(num_train: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """One shuffled epoch as (num_batches, batch_size) indices (last partial batch dropped)."""
    num_batches = num_train // batch_size
    return rng.permutation(num_train)[: num_batches * batch_size].reshape(num_batches, batch_size)


# ---------------------------------------------------------------------- metrics
def evaluate(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, NLL (mean -log p(y)) and ECE (15 equal-width bins) of predictive probs."""
    probs = probs.astype(np.float64)
    finite = bool(np.all(np.isfinite(probs)))
    picked = probs[np.arange(len(labels)), labels]
    nll = float(-np.mean(np.log(np.clip(picked, 1e-300, None)))) if finite else math.nan
    predicted = probs.argmax(axis=-1)
    correct = (predicted == labels).astype(np.float64)
    confidence = probs.max(axis=-1)
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    ece = 0.0
    bins = []  # (mean confidence, accuracy, count) of each non-empty bin: the reliability diagram
    for lower, upper in itertools.pairwise(edges):
        inside = (confidence > lower) & (confidence <= upper)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
            bins.append(
                [float(confidence[inside].mean()), float(correct[inside].mean()), int(inside.sum())]
            )
    return {
        "accuracy": float(correct.mean()) if finite else math.nan,
        "nll": nll,
        "ece": float(ece) if finite else math.nan,
        "reliability": bins if finite else [],
    }


# ------------------------------------------------------------------------ torch
def run_torch(data: dict[str, np.ndarray], structure: str, seed: int, cfg: argparse.Namespace):
    """Train and evaluate the torch model; returns the run record."""
    import torch
    from torch import nn

    import structcov.torch as st

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    factory = covariance_factory(structure, cfg.scale_transform)
    model = st.Sequential(
        st.Linear(64, HIDDEN, cov=factory, dtype=torch.float32),
        nn.Tanh(),
        st.Linear(HIDDEN, NUM_CLASSES, cov=factory, dtype=torch.float32),
    )
    initial = {k: v.detach().clone() for k, v in model.named_parameters() if ".cov." in k}
    groups = st.param_groups(model, cfg.lr) if cfg.lr_scaling else model.parameters()
    optimizer = torch.optim.Adam(groups, lr=cfg.lr)
    x_train, y_train = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    x_test = torch.from_numpy(data["x_test"])
    num_train = len(y_train)
    rng = np.random.default_rng(seed)

    nonfinite_steps, epoch_seconds, last_loss = 0, [], math.nan
    for _ in range(cfg.epochs):
        start = time.perf_counter()
        for index in batches(num_train, cfg.batch_size, rng):
            index_t = torch.from_numpy(index)
            logits = model(x_train[index_t], (cfg.train_samples,), generator)
            nll = nn.functional.cross_entropy(
                logits.reshape(-1, NUM_CLASSES), y_train[index_t].repeat(cfg.train_samples)
            )
            loss = nll + st.kl_divergence(model, cfg.prior_scale) / num_train
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last_loss = float(loss.detach())
            nonfinite_steps += not math.isfinite(last_loss)
        epoch_seconds.append(time.perf_counter() - start)

    with torch.no_grad():
        probs = st.predictive(
            model, x_test, (cfg.eval_samples,), generator, probabilities=True
        ).numpy()
    final = {k: v.detach() for k, v in model.named_parameters()}
    params_finite = all(bool(torch.isfinite(v).all()) for v in final.values())
    moved = all(not torch.equal(initial[k], final[k]) for k in initial)
    storage = {
        path: value.detach().numpy()
        for layer in (model[0], model[2])
        for path, value in layer.params.cov.storage().items()
    }
    return _record(
        "torch", structure, seed, cfg, data, probs, epoch_seconds, nonfinite_steps,
        last_loss, params_finite, moved, storage,
    )  # fmt: skip


# -------------------------------------------------------------------------- JAX
def jax_model(key: Any, factory: Callable[[], Any]) -> Any:
    """The MLP as ``structcov.jax.EquinoxSequential`` of ``EquinoxLinear`` layers (float32)."""
    import jax
    import jax.numpy as jnp

    import structcov.jax as sj

    k1, k2 = jax.random.split(key)
    return sj.EquinoxSequential(
        sj.EquinoxLinear(64, HIDDEN, cov=factory, key=k1, dtype=jnp.float32),
        jnp.tanh,
        sj.EquinoxLinear(HIDDEN, NUM_CLASSES, cov=factory, key=k2, dtype=jnp.float32),
    )


@functools.cache
def jax_program(structure: str, cfg_key: tuple[Any, ...]) -> tuple[Any, Any, Any, Any]:
    """(optimizer, static part, jitted epoch, jitted predict) for one structure.

    Cached so that every seed of a structure reuses one compilation. ``cfg_key`` is
    (scale_transform, lr, lr_scaling, train_samples, eval_samples, num_train,
    prior_scale). The model is split with ``eqx.partition`` into its arrays (what
    the scan carries and optax updates) and its static part.
    """
    import operator

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    import structcov.jax as sj

    scale_transform, lr, lr_scaling, samples, eval_samples, num_train, prior = cfg_key
    factory = covariance_factory(structure, scale_transform)
    like, static = eqx.partition(jax_model(jax.random.key(0), factory), eqx.is_array)
    if lr_scaling:
        scales = sj.lr_scaling_tree(like)
        optimizer = optax.chain(
            optax.adam(lr),
            optax.stateless(lambda updates, _: jax.tree.map(operator.mul, updates, scales)),
        )
    else:
        optimizer = optax.adam(lr)

    def loss_fn(params: Any, x: Any, y: Any, key: Any) -> Any:
        model = eqx.combine(params, static)
        logits = model(x, (samples,), key)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.mean(jnp.take_along_axis(log_probs, y[None, :, None], axis=-1))
        return nll + sj.kl_divergence(model, prior) / num_train

    @jax.jit
    def epoch(params: Any, opt_state: Any, x: Any, y: Any, key: Any) -> Any:
        """One epoch: a scan of Adam steps over the minibatches ``x`` (B, n, 64), ``y``."""

        def step(carry: Any, inputs: Any) -> Any:
            params, opt_state = carry
            xb, yb, key = inputs
            loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb, key)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        keys = jax.random.split(key, x.shape[0])
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (x, y, keys))
        return params, opt_state, losses

    @jax.jit
    def predict(params: Any, x: Any, key: Any) -> Any:
        model = eqx.combine(params, static)
        return sj.predictive(model, x, (eval_samples,), key, probabilities=True)

    return optimizer, static, epoch, predict


def run_jax(data: dict[str, np.ndarray], structure: str, seed: int, cfg: argparse.Namespace):
    """Train and evaluate the JAX (Equinox layers) model; returns the run record."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    num_train = len(data["y_train"])
    cfg_key = (cfg.scale_transform, cfg.lr, cfg.lr_scaling, cfg.train_samples,
               cfg.eval_samples, num_train, cfg.prior_scale)  # fmt: skip
    optimizer, static, epoch, predict = jax_program(structure, cfg_key)
    factory = covariance_factory(structure, cfg.scale_transform)
    key = jax.random.key(seed)
    key, k_model = jax.random.split(key)
    model = jax_model(k_model, factory)
    params, _ = eqx.partition(model, eqx.is_array)
    covs = [layer.params.cov for layer in (model.layers[0], model.layers[2])]
    initial_cov = [np.asarray(leaf) for cov in covs for leaf in jax.tree.leaves(cov)]
    opt_state = optimizer.init(params)
    x_train, y_train = data["x_train"], data["y_train"]

    rng = np.random.default_rng(seed)
    nonfinite_steps, epoch_seconds, last_loss = 0, [], math.nan
    for _ in range(cfg.epochs):
        start = time.perf_counter()
        key, sub = jax.random.split(key)
        index = batches(num_train, cfg.batch_size, rng)
        x, y = jnp.asarray(x_train[index]), jnp.asarray(y_train[index])
        params, opt_state, losses = epoch(params, opt_state, x, y, sub)
        losses = np.asarray(jax.block_until_ready(losses))
        epoch_seconds.append(time.perf_counter() - start)
        nonfinite_steps += int(np.sum(~np.isfinite(losses)))
        last_loss = float(losses[-1])

    key, sub = jax.random.split(key)
    probs = np.asarray(predict(params, jnp.asarray(data["x_test"]), sub))
    params_finite = all(bool(np.all(np.isfinite(leaf))) for leaf in jax.tree.leaves(params))
    model = eqx.combine(params, static)
    covs = [layer.params.cov for layer in (model.layers[0], model.layers[2])]
    final_cov = [np.asarray(leaf) for cov in covs for leaf in jax.tree.leaves(cov)]
    moved = all(not np.array_equal(a, b) for a, b in zip(initial_cov, final_cov, strict=True))
    storage = {path: np.asarray(v) for cov in covs for path, v in cov.storage().items()}
    return _record(
        "jax", structure, seed, cfg, data, probs, epoch_seconds, nonfinite_steps,
        last_loss, params_finite, moved, storage,
    )  # fmt: skip


# ----------------------------------------------------------------------- report
def min_diagonal_std(storage_arrays: dict[str, np.ndarray], transform: str | None) -> float:
    """The smallest |std| of the stored diagonal (``scale.*``) arrays; nan if there are none.

    For ``identity`` a value near 0 means the raw std came close to crossing zero.
    """
    scales = [np.asarray(v, np.float64) for k, v in storage_arrays.items() if "scale." in k]
    if not scales:
        return math.nan
    rho = np.concatenate([v.ravel() for v in scales])
    if transform in (None, "softplus"):
        std = np.logaddexp(rho, 0.0)
    elif transform == "exp":
        std = np.exp(rho)
    else:
        std = rho
    return float(np.min(np.abs(std)))


def _record(
    backend: str,
    structure: str,
    seed: int,
    cfg: argparse.Namespace,
    data: dict[str, np.ndarray],
    probs: np.ndarray,
    epoch_seconds: list[float],
    nonfinite_steps: int,
    last_loss: float,
    params_finite: bool,
    moved: bool,
    storage: dict[str, np.ndarray],
) -> dict[str, Any]:
    metrics = evaluate(probs, data["y_test"])
    applies = structure in ("diagonal", "lrpd8")
    return {
        "backend": backend,
        "structure": structure,
        "scale_transform": (cfg.scale_transform or "default") if applies else "-",
        "seed": seed,
        "epochs": cfg.epochs,
        **metrics,
        "seconds_per_epoch": statistics.median(epoch_seconds) if epoch_seconds else math.nan,
        "nonfinite_steps": nonfinite_steps,
        "steps": cfg.epochs * (len(data["y_train"]) // cfg.batch_size),
        "final_loss": last_loss,
        "ended_nan": not (params_finite and bool(np.all(np.isfinite(probs)))),
        "covariance_moved": moved,
        "min_diagonal_std": min_diagonal_std(storage, cfg.scale_transform),
    }


def _mean_std(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "nan"
    text = f"{statistics.mean(finite):.3f}"
    if len(finite) > 1:
        text += f" ± {statistics.stdev(finite):.3f}"
    if len(finite) < len(values):
        text += f" ({len(values) - len(finite)} nan)"
    return text


def _minimum(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    return f"{min(finite):.2e}" if finite else "-"


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """One row per (backend, structure, transform): mean ± std over seeds."""
    header = (
        "| backend | structure | transform | seeds | accuracy | test NLL | ECE | s/epoch "
        "| non-finite steps | runs ended NaN | min diag std |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [header]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["backend"], run["structure"], run["scale_transform"]), []).append(
            run
        )
    for (backend, structure, transform), group in groups.items():
        rows.append(
            f"| {backend} | {structure} | {transform} | {len(group)} "
            f"| {_mean_std([r['accuracy'] for r in group])} "
            f"| {_mean_std([r['nll'] for r in group])} "
            f"| {_mean_std([r['ece'] for r in group])} "
            f"| {statistics.median(r['seconds_per_epoch'] for r in group):.4f} "
            f"| {sum(r['nonfinite_steps'] for r in group)} / {sum(r['steps'] for r in group)} "
            f"| {sum(r['ended_nan'] for r in group)} / {len(group)} "
            f"| {_minimum([r.get('min_diagonal_std', math.nan) for r in group])} |"
        )
    return "\n".join(rows)


def plot_reliability(runs: list[dict[str, Any]], path: Path) -> None:
    """A reliability diagram per backend: accuracy against confidence, one line per structure.

    Bins are pooled over seeds (counts added, confidences and accuracies weighted by
    count); the diagonal is perfect calibration. Needs matplotlib (``structcov[bench]``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = sorted({run["backend"] for run in runs})
    fig, axes = plt.subplots(1, len(backends), figsize=(4.2 * len(backends), 4.0), squeeze=False)
    for ax, backend in zip(axes[0], backends, strict=True):
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="calibrated")
        structures = dict.fromkeys(r["structure"] for r in runs if r["backend"] == backend)
        for structure in structures:
            pooled: dict[int, list[float]] = {}
            group = [r for r in runs if (r["backend"], r["structure"]) == (backend, structure)]
            for run in group:
                for confidence, accuracy, count in run["reliability"]:
                    key = min(int(confidence * ECE_BINS), ECE_BINS - 1)
                    total = pooled.setdefault(key, [0.0, 0.0, 0.0])
                    total[0] += confidence * count
                    total[1] += accuracy * count
                    total[2] += count
            points = sorted((c / n, a / n) for c, a, n in pooled.values())
            if points:
                ece = statistics.mean(r["ece"] for r in group)
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3,
                        label=f"{structure} (ECE {ece:.3f})")  # fmt: skip
        ax.set(title=f"{backend}, float32", xlabel="confidence", ylabel="accuracy")
        ax.set(xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("torch", "jax", "both"), default="both")
    parser.add_argument(
        "--structures", nargs="+", choices=STRUCTURE_NAMES, default=list(DEFAULT_STRUCTURES)
    )
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. seeds-1")
    parser.add_argument(
        "--scale-transform",
        choices=TRANSFORMS,
        default=None,
        help="for diagonal and lrpd8 (default: the library's default)",
    )
    parser.add_argument("--smoke", action="store_true", help="2 epochs, 1 seed")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--prior-scale", type=float, default=1.0)
    parser.add_argument("--train-samples", type=int, default=1)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--no-lr-scaling", dest="lr_scaling", action="store_false")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--plot", type=Path, default=None, help="write a reliability diagram (PNG) here"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "vi_digits.json",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.seeds = 2, 1
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    cfg = parse_args(argv)
    data = load_data(cfg.split_seed)
    backends = ("torch", "jax") if cfg.backend == "both" else (cfg.backend,)
    runners = {"torch": run_torch, "jax": run_jax}
    if "torch" in backends:
        import torch

        torch.set_num_threads(cfg.threads)
    runs = []
    for backend in backends:
        for structure in cfg.structures:
            for seed in range(cfg.seeds):
                start = time.perf_counter()
                run = runners[backend](data, structure, seed, cfg)
                runs.append(run)
                print(
                    f"[{backend} {structure} {run['scale_transform']} seed {seed}] "
                    f"acc {run['accuracy']:.4f} nll {run['nll']:.4f} ece {run['ece']:.4f} "
                    f"non-finite {run['nonfinite_steps']} ({time.perf_counter() - start:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    table = markdown_table(runs)
    print(table)
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()}
    report = {
        "command": " ".join(["python", "benchmarks/vi_digits.py", *(argv or sys.argv[1:])]),
        "config": config,
        "machine": machine_info(),
        "load_average": load_average(),
        "runs": runs,
        "table": table,
    }
    cfg.output.write_text(json.dumps(report, indent=2) + "\n")
    if cfg.plot is not None:
        plot_reliability(runs, cfg.plot)
    return runs


if __name__ == "__main__":
    main()
