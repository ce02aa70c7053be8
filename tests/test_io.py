"""structcov.io: safetensors checkpoints that cross backends.

Each backend session saves parameters of its own backend (the ``backend`` fixture)
and loads them into every backend installed here (numpy, torch, jax,
array_api_strict; cupy where it has a CUDA device): over the sessions every pair is
run. The torch-module tests run in the torch session, the Equinox/NNX/pytree tests
in the JAX session, and the bad-file, atomic-write and import tests in the numpy
session; each skips elsewhere with the reason.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

import structcov as sc
from cases import CASE_IDS, CASES, MEAN_SPECS, Case, make_parameter
from conftest import Backend, _cuda_reason

pytest.importorskip("safetensors", reason="structcov.io needs safetensors")
import safetensors
import safetensors.numpy

import structcov.io as sio
from structcov._array_api import backend_name, namespace

NOT_OURS = "not a structcov safetensors file"
INVALID = "invalid structcov safetensors file"


def _session_has(name: str) -> bool:
    raw = os.environ.get("STRUCTCOV_BACKEND", "")
    return not raw or name in [b.strip() for b in raw.split(",")]


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


numpy_session = pytest.mark.skipif(
    not _session_has("numpy"), reason="backend-independent io tests run in the numpy session"
)
torch_session = pytest.mark.skipif(
    not (_session_has("torch") and _installed("torch")),
    reason="torch-module io tests run in the torch session (torch installed)",
)
jax_session = pytest.mark.skipif(
    not (_session_has("jax") and _installed("jax")),
    reason="JAX pytree io tests run in the jax session (jax installed)",
)


# ------------------------------------------------------------------ helpers
def _host(array: Any) -> np.ndarray:
    """A NumPy array of ``array`` in its own dtype (any backend)."""
    module = type(array).__module__.split(".")[0]
    if module == "torch":
        return array.detach().cpu().numpy()
    if module == "cupy":
        return array.get()
    if module == "dask":
        return np.asarray(array.compute(scheduler="synchronous"))
    return np.asarray(array)


def _like_array(like: str, array: np.ndarray) -> Any:
    """``array`` as an array of the backend ``like``."""
    if like == "torch":
        import torch

        return torch.from_numpy(array.copy())
    if like == "jax":
        import jax.numpy as jnp

        return jnp.asarray(array, dtype=array.dtype)
    if like == "cupy":
        import cupy

        return cupy.asarray(array)
    if like == "array_api_strict":
        import array_api_strict

        return array_api_strict.asarray(array)
    return array.copy()


def _like_reason(like: str) -> str | None:
    module = {"array_api_strict": "array_api_strict"}.get(like, like)
    if like == "cupy":
        return _cuda_reason()
    if not _installed(module):
        return f"{like} is not installed"
    return None


def _require(like: str) -> None:
    reason = _like_reason(like)
    if reason:
        pytest.skip(reason)


def _parts(param: Any) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """(means in insertion order with None kept, storage by path) of any holder."""
    return [(name, param.mean[name]) for name in param.mean], dict(param.cov.storage())


def assert_same_storage(a: Any, b: Any, like: str | None = None) -> None:
    """Names in order (None kept), structure, and every array bit for bit with its dtype."""
    assert a.cov.structure == b.cov.structure
    means_a, storage_a = _parts(a)
    means_b, storage_b = _parts(b)
    assert [n for n, _ in means_a] == [n for n, _ in means_b]
    assert list(storage_a) == list(storage_b)
    pairs = [(f"mean {n}", x, y) for (n, x), (_, y) in zip(means_a, means_b, strict=True)]
    pairs += [(f"cov {p}", storage_a[p], storage_b[p]) for p in storage_a]
    for what, x, y in pairs:
        if x is None:
            assert y is None, what
            continue
        if like is not None:
            assert backend_name(namespace(y)) == like, what
        hx, hy = _host(x), _host(y)
        assert hx.dtype == hy.dtype, what
        assert hx.shape == hy.shape, what
        assert hx.tobytes() == hy.tobytes(), what


def _normals(param: Any, dtype: Any, seed: int = 3) -> np.ndarray:
    k = param.cov.num_factor_columns
    return np.random.default_rng(seed).standard_normal((2, k)).astype(dtype)


def _factor_matmul(param: Any, z: Any) -> dict[str, np.ndarray]:
    means = {name: param.mean[name] for name in param.names}
    return {name: _host(v) for name, v in param.cov.factor_matmul(z, means).items()}


def _rebuilt_directly(like: str, param: Any) -> sc.GaussianParameter:
    """``param`` rebuilt in ``like`` through the public API (no file): the reference."""
    means, storage = _parts(param)
    mean = {n: None if v is None else _like_array(like, _host(v)) for n, v in means}
    rebuilt = sc.GaussianParameter(mean, _fresh_cov(param))
    rebuilt.cov.load_storage({p: _like_array(like, _host(v)) for p, v in storage.items()})
    return rebuilt


def _fresh_cov(param: Any) -> sc.FactorizedCovariance:
    config = param.cov._config()
    cls = type(param.cov)
    settings = {k: config.pop(k) for k in cls._settings}
    cov = cls(**config)
    for key, value in settings.items():
        setattr(cov, key, value)
    return cov


def _kronecker_scaled() -> sc.KroneckerCovariance:
    cov = sc.KroneckerCovariance(input_rank=3)
    cov.sample_scale = 0.5
    return cov


#: The oracle cases plus a Kronecker with a sample_scale and low rank plus diagonal.
ROUND_TRIP: list[Case] = [
    *CASES,
    Case("kronecker-scaled-weight+bias", "kronecker-2x1", MEAN_SPECS["weight+bias"]),
    Case("lrpd-bias-None", "lowrank+diag-2", MEAN_SPECS["bias-None"]),
]
ROUND_TRIP_IDS = [*CASE_IDS, "kronecker-scaled-weight+bias", "lrpd-bias-None"]


def _spread(cases: list[Case]) -> set[str]:
    """Ids of a subset with every structure and every mean spec at least once."""
    structures: set[str] = set()
    specs: set[str] = set()
    chosen = set()
    for case in cases:
        spec = case.id[len(case.structure) + 1 :]
        if case.structure not in structures or spec not in specs:
            chosen.add(case.id)
            structures.add(case.structure)
            specs.add(spec)
    return chosen


#: Cross-backend round trips run this subset; numpy and the session's own backend all.
SPREAD = _spread(ROUND_TRIP) | {"kronecker-scaled-weight+bias", "lrpd-bias-None"}


def _make(case: Case, backend: Backend, dtype: str, seed: int = 0) -> sc.GaussianParameter:
    param = make_parameter(case, backend, dtype, seed)[0]
    if case.id == "kronecker-scaled-weight+bias":
        param.cov.sample_scale = 0.5
    return param


def _numpy_param(structure: str = "kronecker-2x1", dtype: str = "float64") -> Any:
    spec = "weight+bias"
    case = Case(f"{structure}-{spec}", structure, MEAN_SPECS[spec])
    import array_api_compat.numpy as compat_numpy

    return make_parameter(case, Backend("numpy", compat_numpy), dtype)[0]


def _header(path: Path) -> dict[str, Any]:
    with safetensors.safe_open(str(path), framework="numpy") as handle:
        return dict(json.loads(handle.metadata()[sio.METADATA_KEY]))


def _rewrite(
    path: Path,
    header: Any = None,
    *,
    raw: str | None = None,
    tensors: dict[str, np.ndarray] | None = None,
) -> None:
    """Write ``path`` again with a changed header (object or raw text) and/or tensors."""
    old = safetensors.numpy.load_file(str(path))
    text = raw if raw is not None else json.dumps(header if header is not None else _header(path))
    safetensors.numpy.save_file(
        old if tensors is None else tensors, str(path), metadata={sio.METADATA_KEY: text}
    )


# ------------------------------------------------------------------ round trips
LIKES = ["numpy", "torch", "jax", "array_api_strict", "cupy"]


@pytest.mark.parametrize("like", LIKES)
@pytest.mark.parametrize("case", ROUND_TRIP, ids=ROUND_TRIP_IDS)
def test_round_trip_to_every_backend(
    case: Case, backend: Backend, dtype: str, like: str, tmp_path: Path
) -> None:
    """Saved from this session's backend, loaded into ``like``: identical storage, and
    the same normals give bit-identical samples to the parameter built in ``like``
    directly, and the source's samples up to the backends' rounding."""
    _require(like)
    if like not in ("numpy", backend.name) and case.id not in SPREAD:
        pytest.skip("cross-backend round trips run a spread of the cases (see SPREAD)")
    param = _make(case, backend, dtype)
    path = tmp_path / "param.safetensors"
    sio.save(path, param)
    loaded = sio.load(path, like=like)

    assert type(loaded) is sc.GaussianParameter
    assert type(loaded.cov) is type(param.cov)
    assert loaded.cov._config() == param.cov._config()
    assert list(loaded.mean) == list(param.mean)
    assert loaded.names == param.names
    assert_same_storage(param, loaded, like)

    z = _normals(param, dtype)
    got = _factor_matmul(loaded, _like_array(like, z))
    reference = _factor_matmul(_rebuilt_directly(like, param), _like_array(like, z))
    source = _factor_matmul(param, backend.asarray(z, dtype))
    assert list(got) == list(reference) == list(source)
    rtol = 1e-5 if dtype == "float32" else 1e-12
    for name in got:
        assert got[name].dtype == np.dtype(dtype)
        assert got[name].tobytes() == reference[name].tobytes(), name
        np.testing.assert_allclose(got[name], source[name], rtol=rtol, atol=rtol)


@numpy_session
def test_file_layout_and_header(tmp_path: Path) -> None:
    param = _numpy_param()
    param.cov.sample_scale = 0.25
    path = tmp_path / "kron.safetensors"
    sio.save(path, param)
    with safetensors.safe_open(str(path), framework="numpy") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
    assert keys == {
        "mean.weight",
        "mean.bias",
        "cov.input_factor.weight",
        "cov.input_factor.bias",
        "cov.output_factor",
    }
    assert set(metadata) == {sio.METADATA_KEY}
    header = json.loads(metadata[sio.METADATA_KEY])
    assert header["format"] == sio.FORMAT_TAG and header["version"] == sio.FORMAT_VERSION
    assert header["structcov_version"] == sc.__version__
    assert header["kind"] == "parameter"
    (record,) = header["parameters"]
    assert record == {
        "prefix": "",
        "kind": "gaussian",
        "covariance": "KroneckerCovariance",
        "config": {"input_rank": 2, "output_rank": 1, "sample_scale": 0.25},
        "structure": {
            "type": "Kronecker",
            "config": {"input_rank": 2, "output_rank": 1, "sample_scale": 0.25},
        },
        "means": [["weight", [3, 4]], ["bias", [3]]],
        "storage": [
            ["input_factor.weight", [4, 2]],
            ["input_factor.bias", [1, 2]],
            ["output_factor", [3, 1]],
        ],
        "num_factor_columns": 2,
        "dtype": "float64",
    }


@numpy_session
def test_requested_ranks_and_none_entries_are_kept(tmp_path: Path) -> None:
    mean = {"bias": None, "weight": np.ones((2, 3), np.float32), "extra": None}
    param = sc.GaussianParameter(mean, sc.LowRankCovariance(1000))  # clamped to P = 6
    path = tmp_path / "p.safetensors"
    sio.save(path, param)
    record = _header(path)["parameters"][0]
    assert record["config"] == {"rank": 1000} and record["structure"]["config"] == {"rank": 6}
    assert record["means"] == [["bias", None], ["weight", [2, 3]], ["extra", None]]
    loaded = sio.load(path)
    assert list(loaded.mean) == ["bias", "weight", "extra"]
    assert loaded.mean["bias"] is None and loaded.mean["extra"] is None
    assert loaded.cov._config() == {"rank": 1000} and loaded.cov.rank == 6
    assert type(loaded.cov) is sc.LowRankCovariance


@numpy_session
def test_resaving_gives_the_same_bytes(tmp_path: Path) -> None:
    param = _numpy_param("lowrank+diag-2", "float32")
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    sio.save(first, param)
    sio.save(second, sio.load(first))
    assert first.read_bytes() == second.read_bytes()


@numpy_session
def test_bare_array_zero_d_and_empty_means(tmp_path: Path) -> None:
    cases = [
        sc.GaussianParameter(np.arange(6.0).reshape(2, 3), sc.DiagonalCovariance()),
        sc.GaussianParameter({"s": np.asarray(1.5)}, sc.FactorizedCovariance()),
        sc.GaussianParameter({"w": np.zeros((0, 3)), "b": np.ones(2)}, sc.DiagonalCovariance()),
    ]
    for index, param in enumerate(cases):
        param.cov.reset_parameters(1.0, generator=np.random.default_rng(index))
        path = tmp_path / f"{index}.safetensors"
        sio.save(path, param)
        assert_same_storage(param, sio.load(path), "numpy")


@numpy_session
def test_a_collection_keeps_its_names_and_order(tmp_path: Path) -> None:
    a = _numpy_param("diagonal")
    b = _numpy_param("kronecker-full", "float64")
    c = _numpy_param("factorized-rank3")
    path = tmp_path / "model.safetensors"
    sio.save(path, {"z": a, "enc": {"q": b, "layers": [c]}})
    header = _header(path)
    assert header["kind"] == "collection"
    assert [r["prefix"] for r in header["parameters"]] == ["z", "enc.q", "enc.layers.0"]
    with safetensors.safe_open(str(path), framework="numpy") as handle:
        assert "enc.q.cov.output_factor" in set(handle.keys())
        assert "enc.layers.0.mean.weight" in set(handle.keys())
    loaded = sio.load(path)
    assert list(loaded) == ["z", "enc.q", "enc.layers.0"]
    for name, original in zip(loaded, (a, b, c), strict=True):
        assert_same_storage(original, loaded[name], "numpy")
    # A mapping with one entry is still a collection.
    sio.save(path, {"only": a})
    assert list(sio.load(path)) == ["only"]


@numpy_session
def test_what_cannot_be_saved(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    param = _numpy_param("diagonal")
    with pytest.raises(TypeError, match=r"`obj` must be a structcov GaussianParameter"):
        sio.save(path, np.zeros(3))
    with pytest.raises(TypeError, match=r"non-empty strings"):
        sio.save(path, {1: param})
    with pytest.raises(TypeError, match=r"float32 and float64 arrays only.*float16"):
        sio.save(
            path, sc.GaussianParameter({"w": np.zeros(3, np.float16)}, sc.DiagonalCovariance())
        )
    with pytest.raises(TypeError, match=r"`file` must be a path"):
        sio.save(cast(Any, io.BytesIO()), param)

    class MyCovariance(sc.DiagonalCovariance):
        pass

    with pytest.raises(TypeError, match=r"can save only the structures"):
        sio.save(path, sc.GaussianParameter({"w": np.zeros(3)}, MyCovariance()))
    # "a.mean.mean.x" is mean "mean.x" of "a" and mean "x" of "a.mean".
    first = sc.GaussianParameter({"x": np.zeros(2)}, sc.DiagonalCovariance())
    second = sc.GaussianParameter({"mean.x": np.zeros(2)}, sc.DiagonalCovariance())
    with pytest.raises(ValueError, match=r"tensor name 'a\.mean\.mean\.x'.*is taken"):
        sio.save(path, {"a": second, "a.mean": first})
    assert not path.exists()  # nothing was written


@numpy_session
def test_load_arguments(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    sio.save(path, _numpy_param("diagonal"))
    with pytest.raises(ValueError, match=r"`like` must be one of"):
        sio.load(path, like="tensorflow")
    with pytest.raises(ValueError, match=r'module=True.*needs like="torch"'):
        sio.load(path, module=True)
    with pytest.raises(ValueError, match=r'`device` must be None or "cpu"'):
        sio.load(path, device="cuda")
    assert sio.load(path, device="cpu").names == ("weight", "bias")
    with pytest.raises(FileNotFoundError, match=r"missing.safetensors"):
        sio.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=rf"{NOT_OURS}: .*not a regular file"):
        sio.load(tmp_path)


# ------------------------------------------------------------------ bad files
def _saved(tmp_path: Path, name: str = "good.safetensors") -> Path:
    path = tmp_path / name
    sio.save(path, _numpy_param("kronecker-2x1", "float32"))
    return path


@numpy_session
@pytest.mark.parametrize("keep", [0, 7, 20, 0.5, 0.99], ids=lambda k: f"keep-{k}")
def test_truncated_files(tmp_path: Path, keep: float) -> None:
    data = _saved(tmp_path).read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(
        ValueError, match=rf"{NOT_OURS}: {re.escape(str(truncated))}: .*truncated or corrupt"
    ):
        sio.load(truncated)


@numpy_session
def test_random_and_text_files(tmp_path: Path) -> None:
    for name, data in [
        ("random.safetensors", np.random.default_rng(0).bytes(4096)),
        ("text.safetensors", b"hello, this is not a checkpoint\n" * 20),
    ]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=rf"{NOT_OURS}: {re.escape(str(path))}: "):
            sio.load(path)


@numpy_session
def test_a_safetensors_file_of_another_writer(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    safetensors.numpy.save_file({"weight": np.zeros((2, 2), np.float32)}, str(plain))
    with pytest.raises(
        ValueError, match=rf"{NOT_OURS}: {re.escape(str(plain))}: .*not written by structcov.io"
    ):
        sio.load(plain)
    tagged = tmp_path / "tagged.safetensors"
    safetensors.numpy.save_file(
        {"weight": np.zeros(2, np.float32)}, str(tagged), metadata={"format": "pt"}
    )
    with pytest.raises(ValueError, match=rf"{NOT_OURS}: .*metadata keys: \['format'\]"):
        sio.load(tagged)
    other = tmp_path / "other.safetensors"
    safetensors.numpy.save_file(
        {"weight": np.zeros(2, np.float32)},
        str(other),
        metadata={sio.METADATA_KEY: json.dumps({"format": "someone-else"})},
    )
    with pytest.raises(ValueError, match=rf"{NOT_OURS}: .*format tag 'someone-else'"):
        sio.load(other)


@numpy_session
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"format": "structcov.safetensors", "version": 1,', "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "format tag None"),
    ],
    ids=["cut-json", "empty", "a-list"],
)
def test_tampered_header_json(tmp_path: Path, raw: str, message: str) -> None:
    path = _saved(tmp_path)
    _rewrite(path, raw=raw)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: .*{message}"):
        sio.load(path)


def _changed(header: dict[str, Any], change: str) -> dict[str, Any]:
    record = header["parameters"][0]
    if change == "newer-version":
        header["version"] = 4
    elif change == "version-string":
        header["version"] = "1"
    elif change == "extra-field":
        header["note"] = "x"
    elif change == "kind":
        header["kind"] = "model"
    elif change == "no-parameters":
        header["parameters"] = []
    elif change == "collection-without-prefix":
        header["kind"] = "collection"
    elif change == "unknown-covariance":
        record["covariance"] = "os.system"
    elif change == "config-keys":
        record["config"] = {"rank": 2}
    elif change == "rank-float":
        record["config"]["input_rank"] = 2.0
    elif change == "scale-string":
        record["config"]["sample_scale"] = "0.5"
    elif change == "structure-type":
        record["structure"]["type"] = "Diagonal"
    elif change == "structure-config":
        record["structure"]["config"]["input_rank"] = 3
    elif change == "ranks-vs-shapes":
        record["config"]["input_rank"] = 3
        record["structure"]["config"]["input_rank"] = 3
    elif change == "storage-shape":
        record["storage"][2][1] = [3, 2]
    elif change == "k":
        record["num_factor_columns"] = 99
    elif change == "dtype":
        record["dtype"] = "float16"
    elif change == "mean-shape":
        record["means"][0][1] = [3, -4]
    elif change == "repeated-mean":
        record["means"][1][0] = "weight"
    elif change == "no-means":
        record["means"] = [["weight", None], ["bias", None]]
    elif change == "not-a-layer":
        record["means"][0][0] = "kernel"
    elif change == "record-kind":
        record["kind"] = "bayesian"
    elif change == "no-record-kind":
        del record["kind"]
    elif change == "kind-in-version-2":
        header["version"] = 2
    elif change == "deterministic-with-covariance":
        record["kind"] = "deterministic"
    return header


BAD_HEADERS = {
    "newer-version": "unknown format version 4: .*written by a newer structcov",
    "version-string": "unknown format version '1'",
    "extra-field": "must be an object with the fields",
    "kind": "header 'kind' must be",
    "no-parameters": "'parameters' must be a non-empty list",
    "collection-without-prefix": "names every parameter",
    "unknown-covariance": "unknown covariance 'os.system'",
    "config-keys": "'config' of KroneckerCovariance must have the keys",
    "rank-float": "argument 'input_rank' must be an int or null",
    "scale-string": "setting 'sample_scale' must be a number",
    "structure-type": "'structure' of KroneckerCovariance must be a Kronecker",
    "structure-config": "does not match the header: structure config",
    "ranks-vs-shapes": "does not match the header: .*storage",
    "storage-shape": (
        "tensor 'cov.output_factor' .* has shape \\(3, 1\\), the header says \\(3, 2\\)"
    ),
    "k": "does not match the header: K = 2 != header 99",
    "dtype": "'dtype' must be one of",
    "mean-shape": "shape of mean 'weight' must be a list of non-negative ints",
    "repeated-mean": "'means' repeats a name",
    "no-means": "at least one mean",
    "not-a-layer": "does not describe a valid KroneckerCovariance: KroneckerCovariance needs",
    "record-kind": "'kind' must be one of \\['gaussian', 'deterministic'\\].*got 'bayesian'",
    "no-record-kind": "'kind' must be one of .*got None",
    "kind-in-version-2": "must be an object with the fields",  # versions 1, 2: no kind
    "deterministic-with-covariance": "must be an object with the fields \\['dtype', 'kind'",
}


@numpy_session
@pytest.mark.parametrize("change", list(BAD_HEADERS))
def test_tampered_header_fields(tmp_path: Path, change: str) -> None:
    path = _saved(tmp_path)
    header = _changed(_header(path), change)
    if change == "not-a-layer":  # rename the tensor too, so only the structure is wrong
        tensors = safetensors.numpy.load_file(str(path))
        tensors["mean.kernel"] = tensors.pop("mean.weight")
        _rewrite(path, header, tensors=tensors)
    else:
        _rewrite(path, header)
    with pytest.raises(
        ValueError, match=rf"{INVALID}: {re.escape(str(path))}: .*{BAD_HEADERS[change]}"
    ):
        sio.load(path)


@numpy_session
@pytest.mark.parametrize("kind", ["diagonal", "lowrank+diagonal"])
def test_version_1_files_hold_raw_scales(tmp_path: Path, kind: str) -> None:
    """Version 1 predates scale transforms: its scales load as ``"identity"`` (raw), so
    a file written then gives the same covariance now; a bad transform is refused."""
    mean = {"weight": np.ones((3, 2)), "bias": np.zeros(3)}
    cov = (
        sc.DiagonalCovariance(scale_transform="identity")
        if kind == "diagonal"
        else sc.LowRankPlusDiagonalCovariance(2, scale_transform="identity")
    )
    param = sc.GaussianParameter(mean, cov)
    param.cov.reset_parameters(0.3, generator=np.random.default_rng(0))
    path = tmp_path / "old.safetensors"
    sio.save(path, param)
    header = _header(path)
    header["version"] = 1
    for config in (
        header["parameters"][0]["config"],
        header["parameters"][0]["structure"]["config"],
    ):
        del config["scale_transform"]  # as version 1 wrote it
    del header["parameters"][0]["kind"]  # version 1 records are Gaussian, without a kind
    _rewrite(path, header)
    loaded = sio.load(path)
    assert loaded.cov.scale_transform == "identity"
    np.testing.assert_array_equal(loaded.cov.to_dense(), param.cov.to_dense())
    header["version"] = 2
    for config in (
        header["parameters"][0]["config"],
        header["parameters"][0]["structure"]["config"],
    ):
        config["scale_transform"] = "sigmoid"
    _rewrite(path, header)
    with pytest.raises(ValueError, match="'scale_transform' must be one of"):
        sio.load(path)


@numpy_session
def test_tensors_that_differ_from_the_header(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    good = safetensors.numpy.load_file(str(path))

    def load_with(tensors: dict[str, np.ndarray]) -> None:
        _rewrite(path, _header(path), tensors=tensors)
        sio.load(path)

    missing = {k: v for k, v in good.items() if k != "cov.output_factor"}
    with pytest.raises(ValueError, match=rf"{INVALID}: .*missing tensors \['cov.output_factor'\]"):
        load_with(missing)
    with pytest.raises(ValueError, match=r"unexpected tensors \['cov.extra'\]"):
        load_with({**good, "cov.extra": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match=r"'mean.bias' of the parameter has shape \(4,\)"):
        load_with({**good, "mean.bias": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match=r"'mean.bias' of the parameter has dtype F64"):
        load_with({**good, "mean.bias": np.zeros(3, np.float64)})


@numpy_session
def test_jax_without_x64_refuses_float64(tmp_path: Path) -> None:
    if not _installed("jax"):
        pytest.skip("jax is not installed")
    path = tmp_path / "f64.safetensors"
    sio.save(path, _numpy_param("diagonal", "float64"))
    small = tmp_path / "f32.safetensors"
    sio.save(small, _numpy_param("diagonal", "float32"))
    code = (
        "import sys, structcov.io as sio\n"
        f"print(sio.load({str(small)!r}, like='jax').mean['weight'].dtype)\n"
        "try:\n"
        f"    sio.load({str(path)!r}, like='jax')\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    env = {**os.environ, "JAX_ENABLE_X64": "0", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "float32"
    assert f"{INVALID}: {path}: it holds float64 arrays and JAX's 64-bit mode is off" in lines[1]
    assert "JAX_ENABLE_X64=1" in lines[1]


# ------------------------------------------------------------------ atomic writes
class Crash(RuntimeError):
    pass


@numpy_session
def test_a_crash_mid_write_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = _numpy_param("diagonal", "float32"), _numpy_param("kronecker-full", "float64")
    path = tmp_path / "ckpt.safetensors"
    sio.save(path, old)
    before = path.read_bytes()

    def crash(handle: Any, data: bytes) -> None:
        handle.write(data[: len(data) // 2])
        handle.flush()
        raise Crash("power cut")

    monkeypatch.setattr(sio, "_write_bytes", crash)
    with pytest.raises(Crash):
        sio.save(path, new)
    assert path.read_bytes() == before
    assert_same_storage(old, sio.load(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]  # no temp left
    fresh = tmp_path / "fresh.safetensors"
    with pytest.raises(Crash):
        sio.save(fresh, new)
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]

    monkeypatch.undo()
    sio.save(path, new)
    assert_same_storage(new, sio.load(path))


@numpy_session
def test_permissions_of_a_replaced_and_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    sio.save(path, _numpy_param("diagonal"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    path.chmod(0o640)
    sio.save(path, _numpy_param("diagonal"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


# ------------------------------------------------------------------ imports
@numpy_session
def test_core_import_is_free_of_safetensors() -> None:
    code = (
        "import sys, structcov\n"
        "assert 'safetensors' not in sys.modules and 'structcov.io' not in sys.modules\n"
        "import structcov.io\n"
        "print(sorted(m for m in ('torch', 'jax', 'cupy', 'array_api_strict') "
        "if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------ torch modules
@torch_session
def test_torch_module_round_trip(tmp_path: Path) -> None:
    import torch

    import structcov.torch as sct

    q = sct.GaussianParameter(
        {"weight": torch.randn(4, 3), "bias": None}, sc.LowRankPlusDiagonalCovariance(2)
    )
    q.cov.reset_parameters(0.3, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "q.safetensors"
    sio.save(path, q)
    with safetensors.safe_open(str(path), framework="numpy") as handle:
        assert set(handle.keys()) == {k for k, v in q.state_dict().items() if v is not None}
    core = sio.load(path, like="torch")
    assert type(core) is sc.GaussianParameter and type(core.cov) is sc.LowRankPlusDiagonalCovariance
    assert_same_storage(q, core, "torch")
    module = sio.load(path, like="torch", module=True)
    assert type(module) is sct.GaussianParameter
    assert_same_storage(q, module, "torch")
    assert all(isinstance(p, torch.nn.Parameter) for p in module.parameters())
    assert list(module.mean) == ["weight", "bias"] and module.mean["bias"] is None
    sio.save(tmp_path / "again.safetensors", module)
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


@torch_session
def test_torch_module_keeps_its_class_and_requested_ranks(tmp_path: Path) -> None:
    """A torch module remembers the core class and configuration it was built from: a
    LowRankCovariance(1000) over 5 parameters comes back as LowRankCovariance(1000), and
    a Kronecker module's sample_scale set on the module is saved."""
    import torch

    import structcov.torch as sct

    q = sct.GaussianParameter(
        {"w": torch.randn(5, dtype=torch.float64)}, sc.LowRankCovariance(1000)
    )
    q.cov.reset_parameters(1.0, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "q.safetensors"
    sio.save(path, q)
    record = _header(path)["parameters"][0]
    assert record["covariance"] == "LowRankCovariance" and record["config"] == {"rank": 1000}
    loaded = sio.load(path, like="torch")
    assert type(loaded.cov) is sc.LowRankCovariance and loaded.cov.rank == 5
    assert loaded.cov._requested_rank == 1000
    assert_same_storage(q, loaded, "torch")

    k = sct.GaussianParameter({"weight": torch.randn(3, 2)}, sc.KroneckerCovariance(None, 2))
    k.cov.sample_scale = 0.25
    sio.save(path, k)
    record = _header(path)["parameters"][0]
    assert record["covariance"] == "KroneckerCovariance"
    assert record["config"] == {"input_rank": None, "output_rank": 2, "sample_scale": 0.25}
    assert sio.load(path, like="numpy").cov.sample_scale == 0.25


@torch_session
def test_torch_model_with_several_parameters(tmp_path: Path) -> None:
    import torch

    import structcov.torch as sct

    def layer(d_out: int, d_in: int, cov: sc.FactorizedCovariance) -> Any:
        q = sct.GaussianParameter(
            {"weight": torch.randn(d_out, d_in), "bias": torch.randn(d_out)}, cov
        )
        q.cov.reset_parameters(0.1, generator=torch.Generator().manual_seed(d_in))
        return q

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = layer(4, 3, sc.KroneckerCovariance(output_rank=2))
            self.blocks = torch.nn.ModuleList([layer(2, 4, sc.DiagonalCovariance())])

    model = Model()
    path = tmp_path / "model.safetensors"
    sio.save(path, model)
    with safetensors.safe_open(str(path), framework="numpy") as handle:
        assert set(handle.keys()) == set(model.state_dict())
    loaded = sio.load(path, like="torch", module=True)
    assert list(loaded) == ["first", "blocks.0"]
    assert_same_storage(model.first, loaded["first"], "torch")
    assert_same_storage(model.blocks[0], loaded["blocks.0"], "torch")
    # A fresh model of the same architecture takes the loaded state as is.
    state = {f"{n}.{k}": v for n, m in loaded.items() for k, v in m.state_dict().items()}
    Model().load_state_dict(state)

    model.head = torch.nn.Linear(2, 1)
    with pytest.raises(TypeError, match=r"structcov parameters only.*'head.weight', 'head.bias'"):
        sio.save(path, model)
    with pytest.raises(TypeError, match=r"holds no structcov.torch.GaussianParameter"):
        sio.save(path, torch.nn.Sequential())


@torch_session
def test_torch_module_to_jax(tmp_path: Path) -> None:
    """The issue's path: train with torch, load into JAX, identical storage and samples."""
    _require("jax")
    import jax.numpy as jnp
    import torch

    import structcov.torch as sct

    torch.manual_seed(0)
    q = sct.GaussianParameter(
        {"weight": torch.randn(3, 4), "bias": torch.randn(3)}, sc.KroneckerCovariance(2, 2)
    )
    q.cov.reset_parameters(0.5, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(q.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        sct.kl_divergence(q, sct.normal_prior(q, 1.0)).backward()
        optimizer.step()
    path = tmp_path / "trained.safetensors"
    sio.save(path, q)
    p = sio.load(path, like="jax")
    assert_same_storage(q, p, "jax")
    z = _normals(p, np.float32)
    got = _factor_matmul(p, jnp.asarray(z))
    reference = _factor_matmul(_rebuilt_directly("jax", q_core := sio.load(path)), jnp.asarray(z))
    assert type(q_core) is sc.GaussianParameter
    for name in got:
        assert got[name].tobytes() == reference[name].tobytes()


# ------------------------------------------------------------------ JAX pytrees
@jax_session
def test_jax_pytrees_and_wrappers(tmp_path: Path) -> None:
    import jax
    import jax.numpy as jnp

    import structcov.jax as scj

    def param(seed: int, cov: sc.FactorizedCovariance) -> sc.GaussianParameter:
        mean = {"weight": jnp.ones((3, 2), dtype=jnp.float32), "bias": jnp.zeros(3, jnp.float32)}
        p = sc.GaussianParameter(mean, cov)
        p.cov.reset_parameters(0.2, generator=jax.random.key(seed))
        return p

    a, b = param(0, sc.KroneckerCovariance()), param(1, sc.DiagonalCovariance())
    path = tmp_path / "tree.safetensors"
    sio.save(path, {"b": b, "a": [a]})  # a dict: insertion order, not JAX's sorted order
    loaded = sio.load(path, like="jax")
    assert list(loaded) == ["b", "a.0"]
    assert_same_storage(a, loaded["a.0"], "jax")
    # Loaded parameters are pytrees with the originals' treedef.
    assert jax.tree_util.tree_structure(loaded["b"]) == jax.tree_util.tree_structure(b)

    reasons = []
    for make in (scj.equinox_module, scj.nnx_module):
        try:
            wrapped = make(a)
        except ImportError as error:  # equinox or flax not installed
            reasons.append(str(error))
            continue
        sio.save(path, wrapped)
        assert_same_storage(a, sio.load(path, like="jax"), "jax")
        sio.save(path, {"layer": wrapped})
        assert list(sio.load(path)) == ["layer"]
    if _installed("equinox"):
        import equinox as eqx

        class Model(eqx.Module):  # type: ignore[misc]
            first: Any
            rest: tuple[Any, ...]

        model = Model(scj.equinox_module(a), (b,))
        sio.save(path, model)
        assert list(sio.load(path)) == ["first", "rest.0"]

        class Mixed(eqx.Module):  # type: ignore[misc]
            q: Any
            head: Any

        with pytest.raises(TypeError, match=r"structcov parameters only.*\['head'\]"):
            sio.save(path, Mixed(scj.equinox_module(a), jnp.zeros(2)))
    if reasons:
        pytest.skip(f"some wrappers not tested: {reasons}")


# ------------------------------------------------------------------ layers (version 3)
def _deterministic_header(path: Path) -> dict[str, Any]:
    """``path``'s header with a deterministic record ``head`` added (as `save` writes one)."""
    header = _header(path)
    header["parameters"].append(
        {
            "prefix": "head",
            "kind": "deterministic",
            "means": [["weight", [2, 3]], ["bias", None]],
            "dtype": "float32",
        }
    )
    return header


@numpy_session
def test_deterministic_records(tmp_path: Path) -> None:
    """A deterministic record holds means only; `load` gives them as a dict (None kept),
    whatever the backend; a bad record is refused with what is wrong."""
    path = tmp_path / "layers.safetensors"
    q = _numpy_param("diagonal", "float32")
    sio.save(path, {"q": q})
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensors = {**safetensors.numpy.load_file(str(path)), "head.mean.weight": weight}
    _rewrite(path, _deterministic_header(path), tensors=tensors)
    loaded = sio.load(path)
    assert list(loaded) == ["q", "head"]
    assert_same_storage(q, loaded["q"], "numpy")
    assert type(loaded["head"]) is dict and list(loaded["head"]) == ["weight", "bias"]
    assert loaded["head"]["bias"] is None
    assert loaded["head"]["weight"].tobytes() == weight.tobytes()
    if _like_reason("array_api_strict") is None:
        strict = sio.load(path, like="array_api_strict")["head"]["weight"]
        assert backend_name(namespace(strict)) == "array_api_strict"

    bad = {
        "extra-field": ({"storage": []}, "must be an object with the fields"),
        "no-means": ({"means": [["weight", None]]}, "at least one mean"),
        "dtype": ({"dtype": "int8"}, "'dtype' must be one of"),
        "prefix": ({"prefix": 3}, "'prefix' must be a string"),
    }
    good = _header(path)
    for change, message in bad.values():
        header = json.loads(json.dumps(good))
        header["parameters"][1] = header["parameters"][1] | change
        _rewrite(path, header, tensors=tensors)
        with pytest.raises(ValueError, match=rf"{INVALID}: .*{message}"):
            sio.load(path)
    # Its tensors are checked like any other.
    _rewrite(path, good, tensors={**tensors, "head.mean.weight": weight.T})
    with pytest.raises(ValueError, match=r"'head.mean.weight' of parameter 'head' has shape"):
        sio.load(path)


@numpy_session
def test_version_2_files_are_read(tmp_path: Path) -> None:
    """A version 2 file (Gaussian records without ``kind``) loads as it did."""
    path = tmp_path / "v2.safetensors"
    param = _numpy_param("lowrank+diag-2", "float64")
    sio.save(path, {"a": param})
    header = _header(path)
    header["version"] = 2
    for record in header["parameters"]:
        del record["kind"]
    _rewrite(path, header)
    assert_same_storage(param, sio.load(path)["a"], "numpy")
    assert_same_storage(param, sio.load_into(path, [param])[0], "numpy")


@numpy_session
def test_top_level_save_and_load(tmp_path: Path) -> None:
    """``structcov.save`` / ``structcov.load`` are `structcov.io`'s, imported on call."""
    path = tmp_path / "p.safetensors"
    param = _numpy_param("kronecker-2x1", "float32")
    sc.save(path, param)
    assert_same_storage(param, sc.load(path, like="numpy"), "numpy")
    assert sc.load(path, device="cpu").names == param.names
    code = (
        "import sys, structcov\n"
        "assert callable(structcov.save) and callable(structcov.load)\n"
        "assert 'structcov.io' not in sys.modules and 'safetensors' not in sys.modules\n"
        "assert 'numpy' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


@numpy_session
def test_load_into_core_parameters(tmp_path: Path) -> None:
    """A core parameter (any backend, no JAX needed) or a mapping/list of them: a new one
    of the target's own class over the file's arrays; the target is left as it was."""
    path = tmp_path / "p.safetensors"
    saved = {"a": _numpy_param("kronecker-2x1", "float32"), "b": _numpy_param("diagonal")}
    sio.save(path, saved)
    a = _numpy_param("kronecker-2x1", "float32")
    a.cov.reset_parameters(0.7, generator=np.random.default_rng(5))
    before = a.cov.storage()["output_factor"].copy()
    b = _numpy_param("diagonal")
    filled = sio.load_into(path, {"x": a, "y": (b,)})
    assert list(filled) == ["x", "y"] and type(filled["y"]) is tuple
    assert_same_storage(saved["a"], filled["x"], "numpy")
    assert_same_storage(saved["b"], filled["y"][0], "numpy")
    assert type(filled["x"].cov) is type(a.cov) and filled["x"].cov is not a.cov
    np.testing.assert_array_equal(a.cov.storage()["output_factor"], before)
    if _like_reason("array_api_strict") is None:
        import array_api_strict

        strict = sc.GaussianParameter(
            {n: array_api_strict.asarray(_host(v)) for n, v in saved["b"].mean.items()},
            sc.DiagonalCovariance(),
        )
        into = sio.load_into(path, [_numpy_param("kronecker-2x1", "float32"), strict])
        assert_same_storage(saved["b"], into[1], "array_api_strict")

    def fails(model: Any, message: str, error: type[Exception] = ValueError) -> None:
        with pytest.raises(error, match=message):
            sio.load_into(path, model)

    prefix = rf"cannot load {re.escape(str(path))} into "
    fails([a], prefix + r"builtins.list: the file holds 2 parameters \(\['a', 'b'\]\), the model 1")
    fails(
        [a, _numpy_param("diagonal", "float32")],
        prefix + r".*parameter 1 differs: 'b' in the file, '1' in the model: dtype float64 in "
        r"the file, float32 in the model",
    )
    fails(
        {"x": b, "y": b},
        r"parameter 0 differs: 'a' in the file, 'x' in the model: structure Kronecker .* in the "
        r"file, Diagonal .* in the model",
    )
    other = sc.GaussianParameter(
        {"weight": np.zeros((3, 4)), "bias": None}, sc.DiagonalCovariance()
    )
    fails(
        [a, other],
        r"parameter 1 differs: .*means \[\('weight', \(3, 4\)\), \('bias', \(3,\)\)\] "
        r"in the file, \[\('weight', \(3, 4\)\), \('bias', None\)\] in the model",
    )
    fails({"nothing": np.zeros(3)}, r"holds no structcov parameter", TypeError)
    fails(tmp_path / "missing", r"holds no", TypeError)
    with pytest.raises(FileNotFoundError):
        sio.load_into(tmp_path / "missing.safetensors", [a, b])


def _torch_layer_model(seed: int = 0) -> Any:
    """Conv (Kronecker, Diagonal) -> MLP (low rank plus diagonal, deterministic), random
    storage: the torch side of the layer round trips."""
    import torch

    import structcov.torch as sct

    torch.manual_seed(seed)
    model = sct.Sequential(
        sct.Conv2d(2, 3, 3, padding=1, cov=sc.KroneckerCovariance(output_rank=2)),
        torch.nn.ReLU(),
        sct.Conv2d(3, 2, 3, bias=False, cov=sc.DiagonalCovariance()),
        torch.nn.Flatten(-3),
        sct.Linear(8, 5, cov=sc.LowRankPlusDiagonalCovariance(2)),
        torch.nn.ReLU(),
        sct.Linear(5, 3, cov=None),
    )
    for layer in model:
        if isinstance(layer, sct.GaussianParameter) or getattr(layer, "stochastic", False):
            storage = layer.params.cov.storage()
            layer.params.cov.load_storage(
                {p: 0.3 * torch.randn_like(v) for p, v in storage.items()}
            )
    return model


def _jax_layer_model(system: str) -> Any:
    """The Equinox / NNX counterpart of `_torch_layer_model` (other initial values)."""
    import jax
    import jax.numpy as jnp

    import structcov.jax as scj

    f32 = jnp.float32  # whatever JAX's default float (x64 on or off)

    flatten = lambda x: x.reshape(*x.shape[:-3], -1)  # noqa: E731
    if system == "equinox":
        keys = iter(jax.random.split(jax.random.key(7), 4))
        made = [
            scj.EquinoxConv2d(
                2,
                3,
                3,
                padding=1,
                cov=sc.KroneckerCovariance(output_rank=2),
                key=next(keys),
                dtype=f32,
            ),
            scj.EquinoxConv2d(
                3, 2, 3, bias=False, cov=sc.DiagonalCovariance(), key=next(keys), dtype=f32
            ),
            scj.EquinoxLinear(
                8, 5, cov=sc.LowRankPlusDiagonalCovariance(2), key=next(keys), dtype=f32
            ),
            scj.EquinoxLinear(5, 3, cov=None, key=next(keys), dtype=f32),
        ]
        return scj.EquinoxSequential(
            made[0], jax.nn.relu, made[1], flatten, made[2], jax.nn.relu, made[3]
        )
    from flax import nnx

    rngs = nnx.Rngs(7)
    made = [
        scj.NNXConv2d(
            2, 3, 3, padding=1, cov=sc.KroneckerCovariance(output_rank=2), rngs=rngs, dtype=f32
        ),
        scj.NNXConv2d(3, 2, 3, bias=False, cov=sc.DiagonalCovariance(), rngs=rngs, dtype=f32),
        scj.NNXLinear(8, 5, cov=sc.LowRankPlusDiagonalCovariance(2), rngs=rngs, dtype=f32),
        scj.NNXLinear(5, 3, cov=None, rngs=rngs, dtype=f32),
    ]
    return scj.NNXSequential(made[0], jax.nn.relu, made[1], flatten, made[2], jax.nn.relu, made[3])


def _layer_params(model: Any) -> list[Any]:
    """The core-like parameters of a sequential's structcov layers, in order."""
    layers = list(model.layers) if hasattr(model, "layers") else list(model)
    found = [layer.params for layer in layers if hasattr(layer, "params")]
    return [p.param if hasattr(p, "param") else p for p in found]


def _assert_same_means(a: Any, b: Any) -> None:
    assert list(a.mean) == list(b.mean)
    for name in a.mean:
        if a.mean[name] is None:
            assert b.mean[name] is None
            continue
        x, y = _host(a.mean[name]), _host(b.mean[name])
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name


@torch_session
def test_torch_layer_model_round_trip(tmp_path: Path) -> None:
    """A torch Sequential of structcov layers, Bayesian and deterministic: the state-dict
    names, version 3 records, `load` (modules, core, dicts of means) and `load_into`."""
    import torch

    import structcov.torch as sct

    model = _torch_layer_model()
    path = tmp_path / "layers.safetensors"
    sio.save(path, model)
    with safetensors.safe_open(str(path), framework="numpy") as handle:
        assert set(handle.keys()) == {k for k, v in model.state_dict().items() if v is not None}
    header = _header(path)
    assert header["version"] == sio.FORMAT_VERSION == 3
    records = header["parameters"]
    assert [r["prefix"] for r in records] == ["0.params", "2.params", "4.params", "6.params"]
    assert [r["kind"] for r in records] == ["gaussian"] * 3 + ["deterministic"]
    assert records[3] == {
        "prefix": "6.params",
        "kind": "deterministic",
        "means": [["weight", [3, 5]], ["bias", [3]]],
        "dtype": "float32",
    }
    assert records[1]["means"] == [["weight", [2, 3, 3, 3]], ["bias", None]]

    modules = sio.load(path, like="torch", module=True)
    assert type(modules["6.params"]) is sct.DeterministicParameter
    assert type(modules["0.params"]) is sct.GaussianParameter
    core = sio.load(path)
    assert type(core["6.params"]) is dict and list(core["6.params"]) == ["weight", "bias"]
    for index in (0, 2, 4):
        assert_same_storage(model[index].params, core[f"{index}.params"], "numpy")

    fresh = _torch_layer_model(seed=1)
    assert sio.load_into(path, fresh) is fresh
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    x = torch.randn(4, 2, 4, 4)
    torch.testing.assert_close(fresh(x, None), model(x, None), rtol=0, atol=0)
    sio.save(tmp_path / "again.safetensors", fresh)
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()

    # A layer made deterministic afterwards is saved as one.
    model[4].params.cov = None
    sio.save(path, model)
    assert [r["kind"] for r in _header(path)["parameters"]][2] == "deterministic"
    # Tensors of no structcov parameter are still refused, by name.
    with pytest.raises(TypeError, match=r"structcov parameters only.*'1\.weight', '1\.bias'"):
        sio.save(path, sct.Sequential(sct.Linear(2, 3), torch.nn.BatchNorm1d(3)))


@torch_session
def test_load_into_torch_checks_every_pair_first(tmp_path: Path) -> None:
    import torch

    import structcov.torch as sct

    path = tmp_path / "layers.safetensors"
    sio.save(path, _torch_layer_model())
    prefix = rf"cannot load {re.escape(str(path))} into structcov\.torch\.Sequential: "

    def refused(model: Any, message: str) -> None:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=prefix + message):
            sio.load_into(path, model)
        for key, value in model.state_dict().items():  # nothing changed
            assert torch.equal(value, before[key]), key

    wrong_kind = _torch_layer_model()
    wrong_kind[6] = sct.Linear(5, 3, cov=sc.DiagonalCovariance())
    refused(
        wrong_kind,
        r"parameter 3 differs: '6\.params' in the file, '6\.params' in the model: the file's "
        r"is deterministic, the model's Gaussian",
    )
    wrong_rank = _torch_layer_model()
    wrong_rank[4] = sct.Linear(8, 5, cov=sc.LowRankPlusDiagonalCovariance(3))
    refused(wrong_rank, r"parameter 2 differs: .*structure LowRankPlusDiagonal \{'rank': 2")
    wrong_shape = _torch_layer_model()
    wrong_shape[6] = sct.Linear(5, 3, bias=False)
    refused(wrong_shape, r"parameter 3 differs: .*means .*\('bias', \(3,\)\)\] in the file")
    refused(_torch_layer_model().double(), r"parameter 0 differs: .*dtype float32 in the file")
    refused(_torch_layer_model()[:3], r"the file holds 4 parameters .* the model 2")
    # Arrays of no structcov parameter in the target are left as they are.
    extra = _torch_layer_model(seed=2)
    extra.append(torch.nn.BatchNorm1d(3))
    norm = extra[7].weight.detach().clone()
    sio.load_into(path, extra)
    assert torch.equal(extra[7].weight, norm)
    with pytest.raises(TypeError, match=r"holds no structcov parameter"):
        sio.load_into(path, torch.nn.Linear(2, 3))


@torch_session
@pytest.mark.parametrize("system", ["equinox", "nnx"])
def test_torch_layer_model_into_jax_and_back(tmp_path: Path, system: str) -> None:
    """The issue's path for layers: a torch model loads into its Equinox / NNX
    counterpart by position: bit-identical means and storage, the same mean forward,
    the same samples from the same normals; and back from JAX into torch."""
    _require("jax")
    pytest.importorskip("equinox" if system == "equinox" else "flax.nnx")
    import jax.numpy as jnp
    import torch

    model = _torch_layer_model()
    path = tmp_path / "layers.safetensors"
    sio.save(path, model)
    target = _jax_layer_model(system)
    filled = sio.load_into(path, target)
    if system == "nnx":
        assert filled is target  # updated in place
    else:
        assert filled is not target and type(filled) is type(target)
        assert not all(  # the original keeps its own values
            _host(a.mean["weight"]).tobytes() == _host(b.mean["weight"]).tobytes()
            for a, b in zip(_layer_params(target), _layer_params(filled), strict=True)
        )
    reference = sio.load(path, like="jax")
    torch_params = _layer_params(model)
    jax_params = _layer_params(filled)
    for prefix, mine, theirs in zip(reference, jax_params, torch_params, strict=True):
        _assert_same_means(theirs, mine)
        if theirs.cov is None:
            assert mine.cov is None
            continue
        assert_same_storage(theirs, mine, "jax")
        z = _normals(mine, np.float32)
        got = _factor_matmul(mine, jnp.asarray(z))
        for name, value in _factor_matmul(reference[prefix], jnp.asarray(z)).items():
            assert got[name].tobytes() == value.tobytes(), (prefix, name)  # bit for bit
        source = _factor_matmul(theirs, torch.from_numpy(z))
        for name in got:
            np.testing.assert_allclose(got[name], source[name], rtol=1e-5, atol=1e-6)

    x = np.random.default_rng(0).standard_normal((4, 2, 4, 4)).astype(np.float32)
    expected = model(torch.from_numpy(x), None).detach().numpy()
    served = np.asarray(filled(jnp.asarray(x), None))
    assert served.shape == expected.shape == (4, 3)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-5)

    # Back: JAX -> file -> torch, every tensor as the original model's.
    back = tmp_path / "from-jax.safetensors"
    sio.save(back, filled)
    assert [r["prefix"] for r in _header(back)["parameters"]] == [
        "layers.0.params",
        "layers.2.params",
        "layers.4.params",
        "layers.6.params",
    ]
    again = sio.load_into(back, _torch_layer_model(seed=3))
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


@jax_session
def test_jax_layers_save_load_and_load_into(tmp_path: Path) -> None:
    """Equinox and NNX layer models: deterministic layers saved as such, NNX modules in
    definition order, `load_into` between them and into pytrees of core parameters."""
    pytest.importorskip("equinox")
    pytest.importorskip("flax.nnx")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import structcov.jax as scj

    f32 = jnp.float32
    eqx_model = scj.EquinoxSequential(
        scj.EquinoxLinear(4, 3, cov=sc.KroneckerCovariance(), key=jax.random.key(0), dtype=f32),
        jax.nn.tanh,
        scj.EquinoxLinear(3, 2, bias=False, key=jax.random.key(1), dtype=f32),
    )
    path = tmp_path / "eqx.safetensors"
    sio.save(path, eqx_model)
    records = _header(path)["parameters"]
    assert [(r["prefix"], r["kind"]) for r in records] == [
        ("layers.0.params", "gaussian"),
        ("layers.2.params", "deterministic"),
    ]
    loaded = sio.load(path, like="jax")
    assert list(loaded["layers.2.params"]) == ["weight", "bias"]
    assert loaded["layers.2.params"]["bias"] is None
    assert isinstance(loaded["layers.2.params"]["weight"], jax.Array)

    # A deterministic parameter saved on its own comes back as its means.
    sio.save(path, eqx_model.layers[2].params)
    assert _header(path)["kind"] == "parameter"
    alone = sio.load(path, like="jax")
    assert list(alone) == ["weight", "bias"] and alone["bias"] is None

    class Model(nnx.Module):  # type: ignore[misc]
        def __init__(self, rngs: Any) -> None:
            # Attributes in definition order: "second" before "first" (NNX sorts them).
            self.second = scj.NNXLinear(4, 3, cov=sc.KroneckerCovariance(), rngs=rngs, dtype=f32)
            self.first = scj.NNXLinear(3, 2, bias=False, rngs=rngs, dtype=f32)

        def __call__(self, x: Any) -> Any:
            return self.first(jnp.tanh(self.second(x, None)), None)

    nnx_model = Model(nnx.Rngs(3))
    sio.save(path, nnx_model)
    assert [r["prefix"] for r in _header(path)["parameters"]] == ["second.params", "first.params"]
    into = sio.load_into(path, eqx_model)
    x = jnp.ones((5, 4), dtype=f32)
    np.testing.assert_array_equal(np.asarray(into(x, None)), np.asarray(nnx_model(x)))
    assert_same_storage(nnx_model.second.params.param, into.layers[0].params, "jax")
    sio.save(path, eqx_model)
    assert sio.load_into(path, nnx_model) is nnx_model
    np.testing.assert_array_equal(np.asarray(eqx_model(x, None)), np.asarray(nnx_model(x)))

    # Into a pytree of core parameters and a JAX DeterministicParameter (new objects).
    tree = {"q": eqx_model.layers[0].params, "head": (into.layers[2].params,)}
    filled = sio.load_into(path, tree)
    assert_same_storage(eqx_model.layers[0].params, filled["q"], "jax")
    assert type(filled["head"][0]) is scj.DeterministicParameter
    _assert_same_means(eqx_model.layers[2].params, filled["head"][0])
    # Wrappers: EquinoxGaussian rebuilt, NNXGaussian filled in place.
    wrappers = [scj.equinox_module(into.layers[0].params), into.layers[2].params]
    assert_same_storage(eqx_model.layers[0].params, sio.load_into(path, wrappers)[0].param)
    nnx_q = scj.nnx_module(into.layers[0].params)
    with pytest.raises(ValueError, match=r"the file holds 2 parameters"):
        sio.load_into(path, nnx_q)
    sio.save(path, {"q": eqx_model.layers[0].params})
    assert sio.load_into(path, nnx_q) is nnx_q
    assert_same_storage(eqx_model.layers[0].params, nnx_q.param, "jax")

    class WithState(nnx.Module):  # type: ignore[misc]
        def __init__(self, rngs: Any) -> None:
            self.layer = scj.NNXLinear(2, 2, rngs=rngs, dtype=f32)
            self.norm = nnx.BatchNorm(2, rngs=rngs)

    with pytest.raises(TypeError, match=r"structcov parameters only.*'norm\.\w+"):
        sio.save(path, WithState(nnx.Rngs(0)))
