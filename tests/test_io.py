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
        header["version"] = 3
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
    return header


BAD_HEADERS = {
    "newer-version": "unknown format version 3: .*written by a newer structcov",
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
    with pytest.raises(TypeError, match=r"Gaussian parameters only.*'head.weight', 'head.bias'"):
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

        with pytest.raises(TypeError, match=r"Gaussian parameters only.*\['head'\]"):
            sio.save(path, Mixed(scj.equinox_module(a), jnp.zeros(2)))
    if reasons:
        pytest.skip(f"some wrappers not tested: {reasons}")
