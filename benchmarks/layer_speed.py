"""Sampled dense-layer forward: structcov.torch.Linear against the seed's layer and the floor.

    python benchmarks/layer_speed.py [--repeats 15] [--samples 16] [--batch 128]
                                     [--features 512] [--smoke]

torch CPU, float32, a ``features -> features`` layer with bias, ``batch`` inputs and
``samples`` parameter samples per forward (the layers issue's setting: 512 -> 512,
batch 128, 16 samples). Per covariance it times, interleaved and after one warm-up
call each:

- ``structcov``: ``structcov.torch.Linear(..., cov=...)(x, (samples,), g)``;
- ``seed``: inferno's ``bnn.Linear`` with the same kind of covariance (same ranks;
  inferno 0.0.8 from PyPI, imported without its datasets package, which needs
  torchvision), which forms the per-sample weights and applies them with einsum;
- ``floor``: the unavoidable work written by hand on plain tensors — the mean
  forward plus the per-sample products of the cheapest evaluation: per-sample
  weights for the diagonal and the low rank (``W_s = M + U z_s``), and for Kronecker
  ``x~ M~^T + ((x~ B) Z_s^T) A^T`` (never a per-sample weight).

each for the forward alone and for forward + backward of ``out.sum()``. It prints a
Markdown table of medians (ms) and the ratios structcov / seed and structcov /
floor. Timings on a shared machine are noisy: read the ratios, measured in one run.
``--smoke`` runs a tiny size once (checks the script, not the timings).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import torch
from _common import load_average, machine_info

import structcov as sc
import structcov.torch as st


def import_seed() -> Any:
    """inferno.bnn, without running ``inferno/__init__.py`` (it imports torchvision datasets)."""
    spec = importlib.util.find_spec("inferno")
    if spec is None or spec.submodule_search_locations is None:
        return None
    package = types.ModuleType("inferno")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("inferno", package)
    import inferno.bnn as bnn  # type: ignore[import-not-found]

    return bnn


#: id -> (structcov covariance factory, seed covariance factory name and args)
def kinds(features: int) -> dict[str, tuple[Callable[[], Any], str, tuple[int, ...]]]:
    return {
        "diagonal": (sc.DiagonalCovariance, "DiagonalCovariance", ()),
        "low_rank(32)": (lambda: sc.LowRankCovariance(32), "LowRankCovariance", (32,)),
        "kronecker(full)": (sc.KroneckerCovariance, "KroneckerCovariance", ()),
        "kronecker(16,16)": (
            lambda: sc.KroneckerCovariance(16, 16),
            "KroneckerCovariance",
            (16, 16),
        ),
    }


def floor_forward(kind: str, layer: st.Linear, x: torch.Tensor, samples: int, g: Any) -> Any:
    """The unavoidable work of one sampled forward, on the layer's own tensors."""
    weight, bias = layer.weight, layer.bias
    d_out, d_in = weight.shape
    if kind == "diagonal":
        std_w = torch.nn.functional.softplus(layer.params.cov.scale["weight"])
        std_b = torch.nn.functional.softplus(layer.params.cov.scale["bias"])
        w = weight + std_w * torch.randn(samples, d_out, d_in, generator=g)
        b = bias + std_b * torch.randn(samples, d_out, generator=g)
        return torch.baddbmm(b.unsqueeze(1), x.expand(samples, *x.shape), w.transpose(1, 2))
    if kind.startswith("low_rank"):
        u_w = layer.params.cov.factor["weight"]  # (d_out, d_in, K)
        u_b = layer.params.cov.factor["bias"]  # (d_out, K)
        k = u_w.shape[-1]
        z = torch.randn(samples, k, generator=g)
        w = weight + (z @ u_w.reshape(-1, k).T).reshape(samples, d_out, d_in)
        b = bias + z @ u_b.T
        return torch.baddbmm(b.unsqueeze(1), x.expand(samples, *x.shape), w.transpose(1, 2))
    # Kronecker: W~ = M~ + c A Z B^T with the bias as the extra input column
    a = layer.params.cov.output_factor  # (d_out, r_out)
    b_w = layer.params.cov.input_factor["weight"]  # (d_in, r_in)
    b_b = layer.params.cov.input_factor["bias"]  # (1, r_in)
    scale = layer.params.cov.sample_scale
    z = torch.randn(samples, a.shape[1], b_w.shape[1], generator=g)
    mean = torch.nn.functional.linear(x, weight, bias)
    xb = torch.addmm(b_b, x, b_w)  # x~ B: (N, r_in)
    return mean + scale * torch.matmul(torch.matmul(xb, z.transpose(1, 2)), a.T)


def timed(fn: Callable[[], Any], backward: bool) -> float:
    start = time.perf_counter()
    out = fn()
    if backward:
        out.sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.samples, args.batch, args.features = 1, 2, 4, 8
    bnn = import_seed()
    n, s, f = args.batch, args.samples, args.features
    print(machine_info())
    print(
        f"torch {torch.__version__}, float32, {f} -> {f} with bias, batch {n}, {s} samples, "
        f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats; "
        f"seed: {'inferno ' + bnn.__name__ if bnn else 'not installed'}"
    )
    x = torch.randn(n, f, generator=torch.Generator().manual_seed(0))
    g = torch.Generator()  # re-seeded per pass; every run draws from it in turn
    header = "| covariance | pass | structcov (ms) | seed (ms) | floor (ms) | / seed | / floor |"
    print(header)
    print("|---|---|---|---|---|---|---|")
    for kind, (ours, seed_name, seed_args) in kinds(f).items():
        torch.manual_seed(0)
        layer = st.Linear(f, f, cov=ours)
        runs: dict[str, Callable[[], Any]] = {
            "structcov": lambda layer=layer: layer(x, (s,), g),
            "floor": lambda layer=layer, kind=kind: floor_forward(kind, layer, x, s, g),
        }
        if bnn is not None:
            seed_cov = getattr(bnn.params, seed_name)(*seed_args)
            seed_layer = bnn.Linear(f, f, cov=seed_cov)
            runs["seed"] = lambda seed_layer=seed_layer: seed_layer(x, torch.Size([s]), g)
        for backward in (False, True):
            g.manual_seed(1)
            times: dict[str, list[float]] = {name: [] for name in runs}
            for fn in runs.values():  # warm-up
                with torch.set_grad_enabled(backward):
                    timed(fn, backward)
            for _ in range(args.repeats):
                for name, fn in runs.items():
                    with torch.set_grad_enabled(backward):
                        times[name].append(timed(fn, backward))
            med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
            seed = med.get("seed", math.nan)
            print(
                f"| {kind} | {'fwd+bwd' if backward else 'forward'} | {med['structcov']:.2f} | "
                f"{seed:.2f} | {med['floor']:.2f} | {med['structcov'] / seed:.2f} | "
                f"{med['structcov'] / med['floor']:.2f} |"
            )
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
