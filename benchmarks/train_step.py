"""One variational training step of a Bayesian MLP: structcov, the seed and hand-written torch.

    python benchmarks/train_step.py [--repeats 30] [--width 256] [--batch 128] [--smoke]

torch CPU, float32. The model is ``64 -> width -> width -> 10`` with ReLU, every dense
layer Gaussian with the same structure, and a step is what a VI training loop does
each minibatch: one reparametrised forward (one parameter sample), the cross-entropy,
the KL to N(0, I) over every layer divided by the training-set size (1000), backward,
and an Adam step. Per structure (``diagonal``: softplus-parametrised stds;
``kronecker``: full-rank factors, bias as the extra input column) it times,
interleaved after five warm-up steps each:

- ``structcov``: `structcov.torch.Sequential` of `structcov.torch.Linear` layers,
  ``structcov.torch.kl_divergence(model, 1.0)``;
- ``seed``: inferno 0.0.8's ``bnn.Sequential`` of ``bnn.Linear`` with the same
  covariance kind (imported without its datasets package, see ``layer_speed.py``),
  with the KL written by hand for its storage (the seed has no KL); its diagonal
  stores raw stds;
- ``structcov, native's KL`` (diagonal only): structcov's layers with the native
  KL's formula on their storage, which isolates the cost of structcov's KL (summed
  per element, exact near s = 1, against two separate sums);
- ``native``: the same maths written directly on plain tensors: the minimal
  forward (``x W_s^T + b_s`` from ``M + sigma * eps`` for the diagonal,
  ``x~ M~^T + ((x~ B) Z^T) A^T`` for Kronecker) and the closed-form KL
  (Kronecker: ``tr`` and ``logdet`` from the factors).

It prints a Markdown table of the median step (ms) and the ratios structcov / seed
and structcov / native. ``--smoke`` runs a tiny model for two steps.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import load_average, machine_info
from layer_speed import import_seed
from torch import nn

import structcov as sc
import structcov.torch as st

NUM_TRAIN = 1000
IN, OUT = 64, 10


def sizes(width: int) -> list[tuple[int, int]]:
    return [(IN, width), (width, width), (width, OUT)]


# ------------------------------------------------------------------ structcov
def structcov_model(kind: str, width: int) -> tuple[nn.Module, Callable[[Any, Any, Any], Any]]:
    cov = sc.DiagonalCovariance if kind == "diagonal" else sc.KroneckerCovariance
    layers: list[nn.Module] = []
    for d_in, d_out in sizes(width):
        layers += [st.Linear(d_in, d_out, cov=cov), nn.ReLU()]
    model = st.Sequential(*layers[:-1])

    def loss(x: Any, y: Any, g: Any) -> Any:
        logits = model(x, (), g)
        return nn.functional.cross_entropy(logits, y) + st.kl_divergence(model, 1.0) / NUM_TRAIN

    return model, loss


def structcov_two_sum_model(width: int) -> tuple[nn.Module, Callable[[Any, Any, Any], Any]]:
    """structcov's diagonal layers with ``NativeLayer``'s KL formula on their storage.

    Isolates the KL: the native KL sums ``s^2`` and ``log s`` separately (two sums of
    first-order terms whose difference is second order near s = 1), where structcov
    sums ``(s - 1)(s + 1) - 2 log s`` per element (more passes, exact near s = 1).
    """
    model, _ = structcov_model("diagonal", width)
    layers = [m for m in model if isinstance(m, st.Linear)]

    def kl() -> Any:
        total = 0.0
        for layer in layers:
            for name, mean in layer.params.mean.items():
                std = nn.functional.softplus(layer.params.cov.storage()[f"scale.{name}"])
                total = total + 0.5 * (std.square().sum() + mean.square().sum() - std.numel())
                total = total - std.log().sum()
        return total

    def loss(x: Any, y: Any, g: Any) -> Any:
        logits = model(x, (), g)
        return nn.functional.cross_entropy(logits, y) + kl() / NUM_TRAIN

    return model, loss


# ------------------------------------------------------------------ seed
def seed_model(bnn: Any, kind: str, width: int) -> tuple[nn.Module, Callable[[Any, Any, Any], Any]]:
    layers: list[nn.Module] = []
    for d_in, d_out in sizes(width):
        cov = (
            bnn.params.DiagonalCovariance()
            if kind == "diagonal"
            else bnn.params.KroneckerCovariance()
        )
        layers += [bnn.Linear(d_in, d_out, cov=cov), nn.ReLU()]
    model = bnn.Sequential(*layers[:-1])
    linears = [m for m in model if isinstance(m, bnn.Linear)]

    def kl() -> Any:
        total = 0.0
        for layer in linears:
            weight, bias, cov = layer.params.weight, layer.params.bias, layer.params.cov
            mean_sq = weight.square().sum() + bias.square().sum()
            if kind == "diagonal":
                var = [cov.scale["weight"].square(), cov.scale["bias"].square()]
                p = sum(v.numel() for v in var)
                total = total + 0.5 * (
                    sum(v.sum() for v in var) + mean_sq - p - sum(v.log().sum() for v in var)
                )
            else:
                a = cov.output_factor
                b = torch.cat([cov.input_factor["weight"], cov.input_factor["bias"]])
                p = a.shape[0] * b.shape[0]
                trace = a.square().sum() * b.square().sum()
                logdet = (
                    2 * b.shape[0] * torch.linalg.slogdet(a)[1]
                    + 2 * a.shape[0] * torch.linalg.slogdet(b)[1]
                )
                total = total + 0.5 * (trace + mean_sq - p - logdet)
        return total

    def loss(x: Any, y: Any, g: Any) -> Any:
        logits = model(x, torch.Size([]), g)
        return nn.functional.cross_entropy(logits, y) + kl() / NUM_TRAIN

    return model, loss


# ------------------------------------------------------------------ native
class NativeLayer(nn.Module):
    """One Gaussian dense layer written directly: the minimal forward and closed-form KL."""

    def __init__(self, kind: str, d_in: int, d_out: int) -> None:
        super().__init__()
        self.kind = kind
        bound = 1 / math.sqrt(d_in)
        self.weight = nn.Parameter(torch.randn(d_out, d_in) * bound)
        self.bias = nn.Parameter(torch.randn(d_out))
        if kind == "diagonal":
            start = math.log(math.expm1(bound))  # softplus^-1 of the std
            self.rho_w = nn.Parameter(torch.full((d_out, d_in), start))
            self.rho_b = nn.Parameter(torch.full((d_out,), start))
        else:
            self.a = nn.Parameter(torch.randn(d_out, d_out) / math.sqrt(d_out))
            self.b = nn.Parameter(torch.randn(d_in + 1, d_in + 1) * bound / math.sqrt(d_in + 1))

    def forward(self, x: Any, g: Any) -> Any:
        if self.kind == "diagonal":
            std_w, std_b = nn.functional.softplus(self.rho_w), nn.functional.softplus(self.rho_b)
            w = self.weight + std_w * torch.randn(self.weight.shape, generator=g)
            b = self.bias + std_b * torch.randn(self.bias.shape, generator=g)
            return nn.functional.linear(x, w, b)
        z = torch.randn(self.a.shape[1], self.b.shape[1], generator=g)
        xb = torch.addmm(self.b[-1], x, self.b[:-1])  # x~ B, the bias as the last input row
        return nn.functional.linear(x, self.weight, self.bias) + (xb @ z.T) @ self.a.T

    def kl(self) -> Any:
        mean_sq = self.weight.square().sum() + self.bias.square().sum()
        if self.kind == "diagonal":
            std = [nn.functional.softplus(self.rho_w), nn.functional.softplus(self.rho_b)]
            p = self.weight.numel() + self.bias.numel()
            var = sum(s.square().sum() for s in std)
            return 0.5 * (var + mean_sq - p) - sum(s.log().sum() for s in std)
        n_out, n_in = self.a.shape[0], self.b.shape[0]
        trace = self.a.square().sum() * self.b.square().sum()
        logdet = (
            2 * n_in * torch.linalg.slogdet(self.a)[1] + 2 * n_out * torch.linalg.slogdet(self.b)[1]
        )
        return 0.5 * (trace + mean_sq - n_out * n_in - logdet)


def native_model(kind: str, width: int) -> tuple[nn.Module, Callable[[Any, Any, Any], Any]]:
    layers = nn.ModuleList(NativeLayer(kind, d_in, d_out) for d_in, d_out in sizes(width))

    def loss(x: Any, y: Any, g: Any) -> Any:
        h = x
        for i, layer in enumerate(layers):
            h = layer(h, g)
            if i < len(layers) - 1:
                h = torch.relu(h)
        kl = sum(layer.kl() for layer in layers)
        return nn.functional.cross_entropy(h, y) + kl / NUM_TRAIN

    return layers, loss


# ------------------------------------------------------------------ timing
def stepper(
    model: nn.Module, loss: Callable[..., Any], x: Any, y: Any, g: Any
) -> Callable[[], Any]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        value = loss(x, y, g)
        value.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if not math.isfinite(float(value.detach())):
            raise FloatingPointError(f"non-finite loss {float(value.detach())}")
        return elapsed

    return step


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
    bnn = import_seed()
    print(machine_info())
    print(
        f"torch {torch.__version__}, float32, MLP {IN}-{args.width}-{args.width}-{OUT}, "
        f"batch {args.batch}, one sample, Adam; {torch.get_num_threads()} threads; "
        f"{args.repeats} interleaved steps after {warmup} warm-up steps each; "
        f"seed: {'inferno' if bnn else 'not installed'}"
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, IN, generator=g)
    y = torch.randint(0, OUT, (args.batch,), generator=g)
    print(
        "| structure | structcov (ms) | seed (ms) | native (ms) | / seed | / native "
        "| structcov, native's KL (ms) | / native |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind in ("diagonal", "kronecker"):
        torch.manual_seed(0)
        builders = {
            "structcov": lambda kind=kind: structcov_model(kind, args.width),
            "native": lambda kind=kind: native_model(kind, args.width),
        }
        if bnn is not None:
            builders["seed"] = lambda kind=kind: seed_model(bnn, kind, args.width)
        if kind == "diagonal":
            builders["two_sum"] = lambda: structcov_two_sum_model(args.width)
        steps = {name: stepper(*build(), x, y, g) for name, build in builders.items()}
        for step in steps.values():
            for _ in range(warmup):
                step()
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                times[name].append(step())
        med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        seed = med.get("seed", math.nan)
        two_sum = (
            f"{med['two_sum']:.2f} | {med['two_sum'] / med['native']:.2f}"
            if "two_sum" in med
            else "- | -"
        )
        print(
            f"| {kind} | {med['structcov']:.2f} | {seed:.2f} | {med['native']:.2f} "
            f"| {med['structcov'] / seed:.2f} | {med['structcov'] / med['native']:.2f} "
            f"| {two_sum} |"
        )
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
