"""Test matrix: one session per array backend, plus lint.

``nox`` runs every session; the cupy session skips itself on machines without a
CUDA device. ``nox -s tests-torch`` runs one backend. Extra arguments go to
pytest: ``nox -s tests-numpy -- -k kronecker``.
"""

from __future__ import annotations

import shutil

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False
nox.options.error_on_missing_interpreters = False

# What each backend session installs on top of the package and its test extra.
# Keep the torch/jax/dask pins in sync with pyproject.toml's extras.
BACKENDS = {
    "numpy": [],
    "array_api_strict": [],
    "torch": ["torch"],
    # torch too: the cross-backend checkpoint tests and docs (torch-train, JAX-serve) run here.
    "jax": ["jax-extras", "torch"],
    "cupy": ["cupy"],
    "dask": ["dask"],
}

nox.options.sessions = [f"tests-{name}" for name in BACKENDS] + ["lint", "docs"]


def _has_cuda_device() -> bool:
    return shutil.which("nvidia-smi") is not None


def _tests(session: nox.Session, backend: str) -> None:
    """Run the test suite on one array backend (STRUCTCOV_BACKEND=<backend>)."""
    if backend == "cupy" and not _has_cuda_device():
        session.skip("cupy needs a CUDA device; none found (no nvidia-smi)")
    extras = ",".join(["test", *BACKENDS[backend]])
    session.install("-e", f".[{extras}]")
    env = {"STRUCTCOV_BACKEND": backend}
    if backend == "jax":
        env["JAX_ENABLE_X64"] = "1"
    # One worker per core (pytest-xdist): the JAX session is compile-bound.
    session.run("pytest", "-n", "auto", *session.posargs, env=env)


def _tests_session(backend: str) -> None:
    def run(session: nox.Session) -> None:
        _tests(session, backend)

    run.__doc__ = f"Run the test suite on {backend} (STRUCTCOV_BACKEND={backend})."
    nox.session(name=f"tests-{backend}")(run)


for _backend in BACKENDS:
    _tests_session(_backend)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint + format check) and mypy --strict on src/."""
    # The adapters are type-checked against the real torch and jax.
    session.install("-e", ".[test,torch,jax-extras]", "ruff>=0.6", "mypy>=1.10")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site with mkdocs --strict (output in site/)."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def thorough(session: nox.Session) -> None:
    """The hypothesis property files with the `thorough` profile (>= 10^4 examples per
    property) on NumPy. Long (see docs/testing.md); not in nox.options.sessions, so CI's
    plain `nox` never runs it: `nox -s thorough`."""
    session.install("-e", ".[test]")
    session.run(
        "pytest",
        "-n",
        "auto",
        "-p",
        "no:cacheprovider",
        "tests/test_conditioning.py",
        "tests/covariances/test_properties.py",
        *session.posargs,
        env={"STRUCTCOV_BACKEND": "numpy", "HYPOTHESIS_PROFILE": "thorough"},
    )


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark suite on numpy, torch and jax.jit (results in benchmarks/results/)."""
    session.install("-e", ".[bench,torch,jax]")
    # The seed library, for benchmarks/layer_speed.py: no deps (its torchvision pin would
    # replace the CPU torch build; only inferno.bnn is imported, which needs none).
    session.install("--no-deps", "inferno-torch==0.0.8")
    session.run(
        "python",
        "benchmarks/suite.py",
        "--out",
        "benchmarks/results",
        *session.posargs,
        env={"JAX_ENABLE_X64": "0"},
    )
