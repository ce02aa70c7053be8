"""structcov.numpy: gaussian(), the dict round trip, save/load (structcov.io's checkpoint
format, and the legacy .npz reader), and posterior_to_structure.

Runs in the numpy session (``STRUCTCOV_BACKEND`` unset or including ``numpy``); the
CuPy paths run only where CuPy has a CUDA device and skip with the reason otherwise.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import array_api_compat.numpy as compat_numpy
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import structcov as sc
from cases import BARE, CASE_IDS, CASES, MEAN_SPECS, Case, make_parameter
from conftest import Backend, _cuda_reason, tolerance
from oracle import standard_deviations
from structcov import numpy as scnp


def _numpy_selected() -> bool:
    raw = os.environ.get("STRUCTCOV_BACKEND", "")
    return not raw or "numpy" in [b.strip() for b in raw.split(",")]


pytestmark = pytest.mark.skipif(
    not _numpy_selected(), reason="structcov.numpy is tested in the numpy backend session"
)

NUMPY = Backend("numpy", compat_numpy)
META = scnp.METADATA_KEY
NOT_OURS = "not a structcov .npz file"
NOT_A_CHECKPOINT = "not a structcov safetensors file"
BAD_DICT = "not a valid structcov parameter dict"

#: `save` writes, and `load` reads, structcov.io's safetensors checkpoints.
needs_io = pytest.mark.skipif(
    importlib.util.find_spec("safetensors") is None,
    reason="structcov.numpy.save/load checkpoints need safetensors (structcov[io])",
)


# ------------------------------------------------------------------ helpers
def _from_spec(spec: Any, dtype: str, rng: np.random.Generator) -> Any:
    if isinstance(spec, tuple) and spec[0] == BARE:
        return rng.standard_normal(spec[1]).astype(dtype)
    return {
        name: None if shape is None else rng.standard_normal(shape).astype(dtype)
        for name, shape in spec.items()
    }


def _kronecker_scaled() -> sc.FactorizedCovariance:
    cov = sc.KroneckerCovariance(input_rank=3)
    cov.sample_scale = 0.5
    return cov


#: Structures not in cases.STRUCTURES: id -> (factory, mean spec id)
EXTRA: dict[str, tuple[Callable[[], sc.FactorizedCovariance], str]] = {
    "lrpd-2-weight+bias": (lambda: sc.LowRankPlusDiagonalCovariance(2), "weight+bias"),
    "lrpd-2-bias-None": (lambda: sc.LowRankPlusDiagonalCovariance(2), "bias-None"),
    "lrpd-2-bare-array": (lambda: sc.LowRankPlusDiagonalCovariance(2), "bare-array"),
    "lrpd-2-bias-first": (lambda: sc.LowRankPlusDiagonalCovariance(2), "bias-first"),
    "lrpd-clamped-single-element": (
        lambda: sc.LowRankPlusDiagonalCovariance(1000),
        "single-element",
    ),
    "kronecker-sample-scale-weight+bias": (_kronecker_scaled, "weight+bias"),
    "kronecker-sample-scale-bias-first": (_kronecker_scaled, "bias-first"),
}


def _make(case: Case | str, dtype: str, seed: int = 0) -> sc.GaussianParameter:
    if isinstance(case, Case):
        return make_parameter(case, NUMPY, dtype, seed)[0]
    factory, spec_id = EXTRA[case]
    mean = _from_spec(MEAN_SPECS[spec_id], dtype, np.random.default_rng(seed))
    return scnp.gaussian(mean, factory(), seed=seed + 1)


ALL_CASES: list[Case | str] = [*CASES, *EXTRA]
ALL_IDS = [*CASE_IDS, *EXTRA]


def assert_identical(a: sc.GaussianParameter, b: sc.GaussianParameter) -> None:
    """Same class, ranks/static state, names in order (None kept), dtype, values bit for bit."""
    assert type(b) is type(a) is sc.GaussianParameter
    assert type(b.cov) is type(a.cov)
    assert b.cov.structure == a.cov.structure and b.cov._config() == a.cov._config()
    assert b.cov.rank == a.cov.rank
    assert list(b.mean) == list(a.mean)
    assert b.names == a.names
    for name, value in a.mean.items():
        other = b.mean[name]
        if value is None:
            assert other is None
            continue
        assert isinstance(other, np.ndarray)
        assert other.dtype == value.dtype
        assert other.shape == value.shape
        assert other.tobytes() == value.tobytes()
    sa, sb = a.cov.storage(), b.cov.storage()
    assert list(sb) == list(sa)
    for path, value in sa.items():
        assert isinstance(sb[path], np.ndarray)
        assert sb[path].dtype == value.dtype
        assert sb[path].shape == value.shape
        assert sb[path].tobytes() == value.tobytes()
    # End to end: the same generator state gives the same sample, bit for bit.
    xa = a.sample(2, generator=np.random.default_rng(7))
    xb = b.sample(2, generator=np.random.default_rng(7))
    assert list(xa) == list(xb)
    for name in xa:
        assert xa[name].tobytes() == xb[name].tobytes()


def _save(tmp_path: Path, param: sc.GaussianParameter, name: str = "param.safetensors") -> Path:
    path = tmp_path / name
    scnp.save(path, param)
    return path


def _host(value: Any) -> Any:
    return value.get() if type(value).__module__.split(".")[0] == "cupy" else value


def _save_legacy(
    tmp_path: Path, param: sc.GaussianParameter, name: str = "param.npz", compressed: bool = False
) -> Path:
    """A legacy ``.npz`` file as earlier versions' ``structcov.numpy.save`` wrote it:
    `to_dict`'s layout through ``numpy.savez`` (CuPy arrays copied to the host)."""
    path = tmp_path / name
    writer = np.savez_compressed if compressed else np.savez
    writer(path, **{key: _host(value) for key, value in scnp.to_dict(param).items()})
    return path


def _metadata(arrays: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(str(arrays[META].item())))


def _with_metadata(arrays: dict[str, Any], **changes: Any) -> dict[str, Any]:
    meta = _metadata(arrays)
    meta.update(changes)
    return {**arrays, META: np.array(json.dumps(meta))}


_TRIPPED: list[str] = []


def _trip() -> list[str]:
    _TRIPPED.append("unpickled")
    return _TRIPPED


class Tripwire:
    """Unpickling this object calls ``_trip``: the tests assert it never happens."""

    def __reduce__(self) -> tuple[Callable[[], list[str]], tuple[()]]:
        return _trip, ()


@pytest.fixture(autouse=True)
def _no_unpickling() -> Any:
    _TRIPPED.clear()
    yield
    assert not _TRIPPED, "structcov.numpy unpickled an object"


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("case", ALL_CASES, ids=ALL_IDS)
def test_dict_round_trip(case: Case | str, dtype: str) -> None:
    param = _make(case, dtype)
    arrays = scnp.to_dict(param)
    for key, value in arrays.items():
        assert isinstance(value, np.ndarray), key
        assert value.dtype.kind != "O", key
    assert_identical(param, scnp.from_dict(arrays))


@needs_io
@pytest.mark.parametrize("case", ALL_CASES, ids=ALL_IDS)
def test_save_load_round_trip(case: Case | str, dtype: str, tmp_path: Path) -> None:
    """`save` writes structcov.io's checkpoint format: both loaders read it bit for bit."""
    import safetensors

    import structcov.io

    param = _make(case, dtype)
    path = _save(tmp_path, param)
    with safetensors.safe_open(str(path), framework="numpy") as handle:
        header = json.loads(handle.metadata()[structcov.io.METADATA_KEY])
    assert header["format"] == structcov.io.FORMAT_TAG and header["kind"] == "parameter"
    assert_identical(param, scnp.load(path))
    assert_identical(param, structcov.io.load(path))


@pytest.mark.parametrize("case", ALL_CASES, ids=ALL_IDS)
def test_legacy_npz_round_trip(case: Case | str, dtype: str, tmp_path: Path) -> None:
    """Files of the retired .npz writer still load, bit for bit."""
    param = _make(case, dtype)
    path = _save_legacy(tmp_path, param)
    with np.load(path, allow_pickle=False) as archive:  # readable without pickle
        assert META in archive.files
    assert_identical(param, scnp.load(path))


@needs_io
def test_checkpoints_of_structcov_io_load(tmp_path: Path) -> None:
    """A file written by structcov.io.save is the same format: `load` reads it."""
    import structcov.io

    param = _make("kronecker-sample-scale-bias-first", "float32")
    path = tmp_path / "io.safetensors"
    structcov.io.save(path, param)
    assert_identical(param, scnp.load(path))
    assert path.read_bytes() == _save(tmp_path, param).read_bytes()


def test_to_dict_layout_and_metadata() -> None:
    mean = {"weight": np.ones((3, 2)), "bias": None, "extra": np.zeros(3)}
    param = scnp.gaussian(mean, sc.LowRankPlusDiagonalCovariance(2), seed=0)
    arrays = scnp.to_dict(param)
    assert list(arrays) == [
        META,
        "mean/weight",
        "mean/extra",
        "cov/factor.weight",
        "cov/factor.extra",
        "cov/scale.weight",
        "cov/scale.extra",
    ]
    assert arrays[META].ndim == 0 and arrays[META].dtype.kind == "U"
    assert arrays["mean/weight"] is param.mean["weight"]  # no copies
    meta = _metadata(arrays)
    assert meta["format"] == scnp.FORMAT_TAG and meta["version"] == scnp.FORMAT_VERSION
    assert meta["structure"] == "LowRankPlusDiagonalCovariance"
    assert meta["ranks"] == {"rank": 2}
    assert meta["means"] == [["weight", [3, 2]], ["bias", None], ["extra", [3]]]
    assert meta["dtype"] == np.dtype("float64").str
    rebuilt = scnp.from_dict(arrays)
    assert list(rebuilt.mean) == ["weight", "bias", "extra"] and rebuilt.mean["bias"] is None


def test_requested_ranks_are_kept() -> None:
    """A clamped rank restores the requested one (the same object, not just the same shapes)."""
    param = scnp.gaussian({"w": np.ones(3)}, sc.LowRankCovariance(1000), seed=0)
    rebuilt = scnp.from_dict(scnp.to_dict(param))
    assert rebuilt.cov._requested_rank == 1000 and rebuilt.cov.rank == 3


def test_metadata_as_bytes_array() -> None:
    param = _make(CASES[0], "float64")
    arrays = scnp.to_dict(param)
    arrays[META] = np.array([str(arrays[META].item()).encode()])  # 1-d bytes
    assert_identical(param, scnp.from_dict(arrays))


@needs_io
def test_file_objects_and_paths(tmp_path: Path) -> None:
    param = _make("lrpd-2-weight+bias", "float32")
    path = tmp_path / "no-suffix"
    scnp.save(str(path), param)  # written exactly where asked: no suffix appended
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-suffix"]
    assert_identical(param, scnp.load(str(path)))
    buffer = io.BytesIO(b"head")
    buffer.seek(4)
    scnp.save(buffer, param)  # from the current position; the same bytes as the path
    assert buffer.getvalue() == b"head" + path.read_bytes()
    buffer.seek(4)
    assert_identical(param, scnp.load(buffer))
    with open(path, "rb") as handle:
        assert_identical(param, scnp.load(handle))
    with open(tmp_path / "written", "wb") as handle:
        scnp.save(handle, param)
    assert (tmp_path / "written").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
def test_legacy_npz_from_file_objects(tmp_path: Path, compressed: bool) -> None:
    param = _make("lrpd-2-weight+bias", "float32")
    path = _save_legacy(tmp_path, param, compressed=compressed)
    with open(path, "rb") as handle:
        assert_identical(param, scnp.load(handle))
    buffer = io.BytesIO(b"head" + path.read_bytes())
    buffer.seek(4)
    assert_identical(param, scnp.load(buffer))


@needs_io
def test_save_arguments(tmp_path: Path) -> None:
    param = _make(CASES[0], "float64")
    with pytest.raises(TypeError, match="compressed"):
        scnp.save(tmp_path / "q", param, compressed=True)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"must be a structcov\.GaussianParameter.*structcov\.io"):
        scnp.save(tmp_path / "q", {"q": param})  # type: ignore[arg-type]
    with (
        open(tmp_path / "text", "w", encoding="utf-8") as text,
        pytest.raises(TypeError, match="binary file object"),
    ):
        scnp.save(text, param)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a binary file object with a write"):
        scnp.save(42, param)  # type: ignore[arg-type]

    class MyDiagonal(sc.DiagonalCovariance):
        pass

    with pytest.raises(TypeError, match="can save only the structures"):
        scnp.save(tmp_path / "q", sc.GaussianParameter({"w": np.ones(3)}, MyDiagonal()))
    assert not list(tmp_path.glob("q*"))


@needs_io
def test_load_refuses_collections_and_other_files(tmp_path: Path) -> None:
    import safetensors.numpy

    import structcov.io

    param = _make(CASES[0], "float64")
    collection = tmp_path / "model.safetensors"
    structcov.io.save(collection, {"a": param, "b": param})
    with pytest.raises(ValueError, match=r"holds 2 entries \(\['a', 'b'\]\).*structcov\.io\.load"):
        scnp.load(collection)
    plain = tmp_path / "plain.safetensors"
    safetensors.numpy.save_file({"weight": np.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match=f"{NOT_A_CHECKPOINT}.*without structcov's"):
        scnp.load(plain)
    buffer = io.BytesIO(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"{NOT_A_CHECKPOINT}: <_io.BytesIO"):
        scnp.load(buffer)  # names the caller's object, not a temporary copy
    with pytest.raises(TypeError, match="a binary file object with a read"):
        scnp.load(42)  # type: ignore[arg-type]


def test_from_dict_keeps_arrays_without_copies() -> None:
    param = _make(CASES[0], "float64")
    arrays = scnp.to_dict(param)
    rebuilt = scnp.from_dict(arrays)
    assert rebuilt.mean["weight"] is arrays["mean/weight"]


_STRUCTURE_FACTORIES: list[Callable[[int], sc.FactorizedCovariance]] = [
    lambda r: sc.DiagonalCovariance(),
    lambda r: sc.FactorizedCovariance(),
    lambda r: sc.FactorizedCovariance(rank=r),
    lambda r: sc.LowRankCovariance(r),
    lambda r: sc.LowRankPlusDiagonalCovariance(r),
]


#: Any character a zip member name can hold (no NUL, no lone surrogate).
NAME_CHARACTERS = st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"])


@st.composite
def parameters(draw: st.DrawFn) -> sc.GaussianParameter:
    """Any names (unicode, '/', '.', empty; no NUL), any order, None entries, shapes, ranks."""
    names = draw(
        st.lists(
            st.text(NAME_CHARACTERS, max_size=6),
            min_size=1,
            max_size=4,
            unique=True,
        )
    )
    shapes = [draw(st.none() | st.lists(st.integers(1, 3), max_size=3).map(tuple)) for _ in names]
    if all(shape is None for shape in shapes):
        shapes[0] = (2,)
    dtype = draw(st.sampled_from(["float32", "float64"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    mean = {
        name: None if shape is None else rng.standard_normal(shape).astype(dtype)
        for name, shape in zip(names, shapes, strict=True)
    }
    factory = draw(st.sampled_from(_STRUCTURE_FACTORIES))
    return scnp.gaussian(mean, factory(draw(st.integers(1, 30))), seed=seed)


@needs_io
@given(parameters())
def test_round_trip_property(param: sc.GaussianParameter) -> None:
    assert_identical(param, scnp.from_dict(scnp.to_dict(param)))
    buffer = io.BytesIO()
    scnp.save(buffer, param)
    buffer.seek(0)
    assert_identical(param, scnp.load(buffer))
    legacy = io.BytesIO()
    np.savez(legacy, **scnp.to_dict(param))
    legacy.seek(0)
    assert_identical(param, scnp.load(legacy))


@needs_io
def test_unusual_names(tmp_path: Path) -> None:
    """A NUL in a name (which a zip could not hold) round-trips; a lone surrogate cannot be
    UTF-8 (JSON header, tensor names) and is refused with a ValueError."""
    param = scnp.gaussian({"a\x00b": np.ones(2), "": np.ones(1)}, sc.DiagonalCovariance(), seed=0)
    assert_identical(param, scnp.load(_save(tmp_path, param)))
    lone = scnp.gaussian({"a\ud800b": np.ones(2)}, sc.DiagonalCovariance(), seed=0)
    assert_identical(lone, scnp.from_dict(scnp.to_dict(lone)))  # a dict can hold it
    with pytest.raises(ValueError):
        scnp.save(tmp_path / "lone", lone)


def test_import_loads_no_other_backend() -> None:
    code = (
        "import sys, structcov.numpy; "
        "print(sorted(m for m in ('torch', 'jax', 'cupy') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------ files that are not ours
# A file that does not start like a zip archive goes to structcov.io.load (its errors); a zip
# archive to the legacy .npz reader ("not a structcov .npz file" / "invalid ...").
@needs_io
def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "random.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=f"{NOT_A_CHECKPOINT}.*cannot be read as safetensors"):
        scnp.load(path)


@needs_io
@pytest.mark.parametrize("legacy", [False, True], ids=["checkpoint", "legacy-npz"])
@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_truncated_file(tmp_path: Path, keep: float, legacy: bool) -> None:
    param = _make("kronecker-sample-scale-weight+bias", "float64")
    path = (_save_legacy if legacy else _save)(tmp_path, param)
    data = path.read_bytes()
    truncated = tmp_path / "truncated"
    truncated.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=NOT_OURS if legacy else NOT_A_CHECKPOINT):
        scnp.load(truncated)


def test_corrupted_legacy_entry(tmp_path: Path) -> None:
    """Flipping bytes inside a stored array of a legacy file: the zip CRC check fails."""
    param = scnp.gaussian({"w": np.zeros(2000)}, sc.DiagonalCovariance(), seed=0)
    path = _save_legacy(tmp_path, param)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=NOT_OURS):
        scnp.load(path)


@needs_io
def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.npz"
    path.write_text("these are not arrays\n")
    with pytest.raises(ValueError, match=NOT_A_CHECKPOINT):
        scnp.load(path)
    with (
        open(path, encoding="utf-8") as text,
        pytest.raises(TypeError, match="binary file object"),
    ):
        scnp.load(text)  # type: ignore[arg-type]


@needs_io
def test_empty_missing_and_directory(tmp_path: Path) -> None:
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=NOT_A_CHECKPOINT):
        scnp.load(empty)
    with pytest.raises(ValueError, match=NOT_A_CHECKPOINT):
        scnp.load(io.BytesIO())
    with pytest.raises(FileNotFoundError, match=r"absent\.safetensors"):
        scnp.load(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match=f"{NOT_A_CHECKPOINT}.*not a regular file"):
        scnp.load(tmp_path)


@needs_io
def test_npy_file(tmp_path: Path) -> None:
    path = tmp_path / "array.npy"
    np.save(path, np.ones(3))
    with pytest.raises(ValueError, match=NOT_A_CHECKPOINT):
        scnp.load(path)


@needs_io
def test_pickle_file(tmp_path: Path) -> None:
    path = tmp_path / "pickle.npz"
    path.write_bytes(pickle.dumps(Tripwire()))
    with pytest.raises(ValueError, match=NOT_A_CHECKPOINT):
        scnp.load(path)


def test_foreign_npz(tmp_path: Path) -> None:
    path = tmp_path / "foreign.npz"
    np.savez(path, weights=np.ones(3))
    with pytest.raises(ValueError, match=f"{NOT_OURS}.*no '{META}' entry"):
        scnp.load(path)


def test_pickled_object_array_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, payload=np.array([Tripwire()], dtype=object))
    with pytest.raises(ValueError, match=NOT_OURS):
        scnp.load(path)


def test_pickled_object_array_with_metadata(tmp_path: Path) -> None:
    """Valid metadata and the expected keys, but one entry holds pickled objects."""
    param = scnp.gaussian({"w": np.zeros(1)}, sc.DiagonalCovariance(), seed=0)
    arrays = scnp.to_dict(param)
    arrays["mean/w"] = np.array([Tripwire()], dtype=object)
    path = tmp_path / "objects.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=f"{NOT_OURS}.*'mean/w' cannot be read"):
        scnp.load(path)


def test_pickled_metadata(tmp_path: Path) -> None:
    param = scnp.gaussian({"w": np.zeros(1)}, sc.DiagonalCovariance(), seed=0)
    arrays = scnp.to_dict(param)
    arrays[META] = np.array([Tripwire(), str(arrays[META].item())], dtype=object)
    path = tmp_path / "objects.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=f"{NOT_OURS}.*'{META}' cannot be read"):
        scnp.load(path)


def test_other_structure_metadata_with_wrong_arrays(tmp_path: Path) -> None:
    """Kronecker metadata over a diagonal parameter's arrays: names the missing/extra arrays."""
    mean = {"weight": np.ones((3, 4)), "bias": np.ones(3)}
    kronecker = scnp.to_dict(scnp.gaussian(mean, sc.KroneckerCovariance(), seed=0))
    diagonal = scnp.to_dict(scnp.gaussian(mean, sc.DiagonalCovariance(), seed=0))
    mixed = {**diagonal, META: kronecker[META]}
    message = r"missing arrays \['cov/input_factor.weight'.*unexpected arrays \['cov/scale.weight'"
    with pytest.raises(ValueError, match=message):
        scnp.from_dict(mixed)
    path = tmp_path / "mixed.npz"
    np.savez(path, **mixed)
    with pytest.raises(ValueError, match=f"invalid structcov .npz file: .*mixed.npz: {message}"):
        scnp.load(path)


# ------------------------------------------------------------------ from_dict validation
@pytest.fixture
def good() -> dict[str, Any]:
    return scnp.to_dict(_make("kronecker-sample-scale-weight+bias", "float64"))


def test_missing_metadata(good: dict[str, Any]) -> None:
    del good[META]
    with pytest.raises(ValueError, match=f"{BAD_DICT}: it has no '{META}' entry"):
        scnp.from_dict(good)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (np.array("{not json"), "does not hold valid JSON"),
        (np.array('{"format": "someone else"}'), "format tag 'structcov.GaussianParameter'"),
        (np.array("[1, 2]"), "format tag"),
        (np.ones(3), "str/bytes array holding JSON"),
        (np.array(["a", "b"]), "str/bytes array holding JSON"),
        (np.array(b"\xff\xfe"), "not UTF-8"),
    ],
)
def test_bad_metadata_entry(good: dict[str, Any], raw: Any, message: str) -> None:
    good[META] = raw
    with pytest.raises(ValueError, match=message):
        scnp.from_dict(good)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version": 2}, "unknown format version 2.*newer structcov"),
        ({"version": "1"}, "unknown format version '1'"),
        ({"structure": "os.system"}, "unknown structure 'os.system'"),
        ({"structure": "StructuredCovariance"}, "unknown structure"),
        ({"ranks": {"rank": 2}}, "'ranks' of KroneckerCovariance"),
        ({"ranks": {"input_rank": 0, "output_rank": None}}, "input_rank"),
        ({"ranks": {"input_rank": 2, "output_rank": None}}, "inconsistent"),
        ({"sample_scale": "big"}, "'sample_scale' must be a number"),
        ({"dtype": "object"}, "'dtype' must name a real floating dtype"),
        ({"dtype": "no such dtype"}, "'dtype' must name a real floating dtype"),
        ({"dtype": "<f4"}, "must have dtype float32"),
        ({"num_factor_columns": 5}, "inconsistent"),
        ({"means": [["weight", [3, 4]]]}, r"unexpected arrays \['mean/bias'\]"),
        ({"means": [["weight", [3, -4]], ["bias", [3]]]}, "non-negative ints"),
        ({"means": [["weight", [3, 4]], ["weight", [3]]]}, "repeats a name"),
        ({"means": "weight"}, "list of \\[name, shape\\] pairs"),
        ({"storage": []}, "unexpected arrays"),
        ({"extra_field": 1}, "must have the fields"),
    ],
)
def test_bad_metadata_fields(good: dict[str, Any], changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        scnp.from_dict(_with_metadata(good, **changes))


def test_bias_before_weight_in_metadata(good: dict[str, Any]) -> None:
    """Names in another order are another parameter: caught as an inconsistency, not loaded."""
    meta = _metadata(good)
    meta["means"] = meta["means"][::-1]
    good[META] = np.array(json.dumps(meta))
    with pytest.raises(ValueError, match="inconsistent"):
        scnp.from_dict(good)


def test_missing_and_extra_arrays(good: dict[str, Any]) -> None:
    missing = dict(good)
    del missing["cov/output_factor"]
    with pytest.raises(ValueError, match=r"missing arrays \['cov/output_factor'\]"):
        scnp.from_dict(missing)
    extra = {**good, "cov/something": np.ones(2)}
    with pytest.raises(ValueError, match=r"unexpected arrays \['cov/something'\]"):
        scnp.from_dict(extra)


def test_wrong_shape_dtype_and_type(good: dict[str, Any]) -> None:
    shape = {**good, "mean/bias": np.ones(4)}
    with pytest.raises(ValueError, match=r"'mean/bias' must have shape \(3,\)"):
        scnp.from_dict(shape)
    dtype = {**good, "cov/output_factor": good["cov/output_factor"].astype(np.float32)}
    with pytest.raises(ValueError, match="'cov/output_factor' must have dtype float64"):
        scnp.from_dict(dtype)
    swapped = {**good, "mean/bias": good["mean/bias"].astype(">f8")}
    with pytest.raises(ValueError, match="must have dtype"):
        scnp.from_dict(swapped)
    listed = {**good, "mean/bias": [1.0, 2.0, 3.0]}
    with pytest.raises(ValueError, match="'mean/bias' must be a NumPy or CuPy array"):
        scnp.from_dict(listed)
    objects = {**good, "mean/bias": np.array([None, None, None], dtype=object)}
    with pytest.raises(ValueError, match="must have dtype"):
        scnp.from_dict(objects)


def test_from_dict_arguments(good: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="`arrays` must be a mapping"):
        scnp.from_dict([good])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`like` must be"):
        scnp.from_dict(good, like="torch")
    with pytest.raises(ValueError, match="`like` must be"):
        scnp.load(io.BytesIO(), like=None)  # type: ignore[arg-type]


def test_to_dict_rejects_what_it_cannot_rebuild() -> None:
    class MyDiagonal(sc.DiagonalCovariance):
        pass

    mean = {"w": np.ones(3)}
    with pytest.raises(TypeError, match="can save only the structures"):
        scnp.to_dict(sc.GaussianParameter(mean, MyDiagonal()))
    with pytest.raises(TypeError, match=r"must be a structcov\.GaussianParameter"):
        scnp.to_dict(mean)  # type: ignore[arg-type]
    param = scnp.gaussian(mean, sc.DiagonalCovariance(), seed=0)
    param.cov.load_storage({"scale.w": np.ones(3, dtype=np.float32)})
    with pytest.raises(TypeError, match="dtype float32, the means have float64"):
        scnp.to_dict(param)


def test_to_dict_rejects_other_libraries() -> None:
    strict = pytest.importorskip("array_api_strict")
    param = sc.GaussianParameter({"w": strict.ones(3)}, sc.DiagonalCovariance())
    with pytest.raises(TypeError, match="NumPy or CuPy arrays only"):
        scnp.to_dict(param)


def test_like_cupy_without_cupy(tmp_path: Path) -> None:
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("cupy is installed: the missing-CuPy error cannot be shown")
    for path in (tmp_path / "any.safetensors", _save_legacy(tmp_path, _make(CASES[0], "float64"))):
        with pytest.raises(ImportError, match='like="cupy" needs CuPy'):
            scnp.load(path, like="cupy")
    with pytest.raises(ImportError, match='like="cupy" needs CuPy'):
        scnp.from_dict(scnp.to_dict(_make(CASES[0], "float64")), like="cupy")


# ------------------------------------------------------------------ gaussian()
@pytest.mark.parametrize(
    "factory",
    [
        sc.DiagonalCovariance,
        lambda: sc.LowRankPlusDiagonalCovariance(2),
        lambda: sc.KroneckerCovariance(),
    ],
    ids=["diagonal", "lrpd", "kronecker"],
)
def test_gaussian_seed(factory: Callable[[], sc.FactorizedCovariance], dtype: str) -> None:
    mean = _from_spec(MEAN_SPECS["weight+bias"], dtype, np.random.default_rng(0))
    a = scnp.gaussian(mean, factory(), scale=0.3, seed=42)
    b = scnp.gaussian(mean, factory(), scale=0.3, seed=42)
    c = scnp.gaussian(mean, factory(), scale=0.3, generator=np.random.default_rng(42))
    d = scnp.gaussian(mean, factory(), scale=0.3, seed=43)
    assert_identical(a, b)
    assert_identical(a, c)
    sa, sd = a.cov.storage(), d.cov.storage()
    # another seed, other draws (a diagonal's scales are set, not drawn: nothing to differ)
    drawn = [slot.path for slot in a.cov.structure.slots if slot.random]
    assert any(not np.array_equal(sa[p], sd[p]) for p in drawn) or not drawn
    assert drawn or isinstance(a.cov, sc.DiagonalCovariance)
    for value in sa.values():
        assert value.dtype == np.dtype(dtype)


def test_gaussian_scale_mapping_and_errors() -> None:
    mean = {"weight": np.zeros((2, 3)), "bias": np.zeros(2)}
    param = scnp.gaussian(
        mean, sc.LowRankPlusDiagonalCovariance(1), scale={"weight": 2.0, "bias": 0.5}, seed=0
    )
    # the standard deviations (stored through the default softplus transform)
    std = {name: standard_deviations(param.cov.scale[name], "softplus") for name in mean}
    np.testing.assert_allclose(std["weight"], np.full((2, 3), 2.0), rtol=1e-14)
    np.testing.assert_allclose(std["bias"], np.full(2, 0.5), rtol=1e-14)
    with pytest.raises(TypeError, match="`seed` or `generator`, not both"):
        scnp.gaussian(mean, sc.DiagonalCovariance(), seed=0, generator=np.random.default_rng(0))


def test_gaussian_rejects_other_libraries() -> None:
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match="needs NumPy or CuPy means"):
        scnp.gaussian({"w": strict.ones(3)}, sc.DiagonalCovariance(), seed=0)


# ------------------------------------------------------------------ posterior_to_structure
def _spd(rng: np.random.Generator, n: int) -> np.ndarray:
    a = rng.standard_normal((n, n))
    return a @ a.T + n * np.eye(n)


def _flat_index(spec: dict[str, Any]) -> dict[str, int]:
    offsets, total = {}, 0
    for name, shape in spec.items():
        if shape is not None:
            offsets[name] = total
            total += int(np.prod(shape))
    return offsets


def kfac_sigma(spec: dict[str, Any], c_out: np.ndarray, c_in: np.ndarray) -> np.ndarray:
    """Sigma from DESIGN.md §1 element by element: Cov(W~[o,i], W~[o',i']) = C_out C_in.

    Entries (o, i) of the weight (i the flattened input index) and (o,) of the bias
    (input column d_in), placed at their flat indices; independent of the code under test.
    """
    weight_shape = spec["weight"]
    d_out, d_in = weight_shape[0], int(np.prod(weight_shape[1:]))
    offsets = _flat_index(spec)
    entries = [(offsets["weight"] + o * d_in + i, o, i) for o in range(d_out) for i in range(d_in)]
    if spec.get("bias") is not None:
        entries += [(offsets["bias"] + o, o, d_in) for o in range(d_out)]
    num = len(entries)
    sigma = np.zeros((num, num))
    for p, o, i in entries:
        for q, o2, i2 in entries:
            sigma[p, q] = c_out[o, o2] * c_in[i, i2]
    return sigma


def _tol(dtype: str) -> dict[str, float]:
    return tolerance(dtype)


def test_posterior_diagonal(dtype: str) -> None:
    rng = np.random.default_rng(0)
    mean = _from_spec(MEAN_SPECS["weight+bias"], dtype, rng)
    variances = rng.uniform(0.5, 2.0, 15)
    param = scnp.posterior_to_structure(
        mean, np.diag(variances).astype(dtype), sc.DiagonalCovariance()
    )
    assert param.cov.scale["weight"].dtype == np.dtype(dtype)
    np.testing.assert_allclose(param.cov.to_dense(), np.diag(variances), **_tol(dtype))
    assert param.mean["weight"] is mean["weight"]
    # Not diagonal: the marginal variances are kept.
    sigma = _spd(rng, 15)
    param = scnp.posterior_to_structure(mean, sigma.astype(dtype), sc.DiagonalCovariance())
    np.testing.assert_allclose(param.cov.diagonal(), np.diag(sigma), **_tol(dtype))


@pytest.mark.parametrize("spec_id", ["weight+bias", "bias-None", "bare-array", "bias-first"])
def test_posterior_factorized_full(spec_id: str, dtype: str) -> None:
    rng = np.random.default_rng(1)
    mean = _from_spec(MEAN_SPECS[spec_id], dtype, rng)
    num = sc.GaussianParameter(mean, sc.DiagonalCovariance()).num_params
    sigma = _spd(rng, num)
    param = scnp.posterior_to_structure(mean, sigma.astype(dtype), sc.FactorizedCovariance())
    scale = np.abs(sigma).max()
    np.testing.assert_allclose(param.cov.to_dense() / scale, sigma / scale, **_tol(dtype))
    # The Cholesky factor, rows in the flat order: lower triangular.
    layout = param.cov.layout
    blocks = zip(layout.names, layout.sizes, strict=True)
    stacked = np.concatenate([param.cov.factor[n].reshape(s, -1) for n, s in blocks])
    np.testing.assert_array_equal(np.triu(stacked, 1), 0.0)
    np.testing.assert_allclose(stacked, np.linalg.cholesky(sigma), **_tol(dtype))


@pytest.mark.parametrize(
    "factory", [lambda: sc.LowRankCovariance(3), lambda: sc.FactorizedCovariance(rank=3)]
)
def test_posterior_low_rank_is_eigen_truncation(
    factory: Callable[[], sc.FactorizedCovariance], dtype: str
) -> None:
    rng = np.random.default_rng(2)
    mean = _from_spec(MEAN_SPECS["weight+bias"], dtype, rng)
    sigma = _spd(rng, 15)
    param = scnp.posterior_to_structure(mean, sigma.astype(dtype), factory())
    values, vectors = np.linalg.eigh(sigma)
    best = (vectors[:, -3:] * values[-3:]) @ vectors[:, -3:].T
    scale = np.abs(sigma).max()
    np.testing.assert_allclose(param.cov.to_dense() / scale, best / scale, **_tol(dtype))


@pytest.mark.parametrize(
    "spec_id", ["weight+bias", "weight-only", "bias-None", "conv4d+bias", "bias-first"]
)
@pytest.mark.parametrize("sample_scale", [1.0, 2.0])
def test_posterior_kronecker_exact(spec_id: str, sample_scale: float, dtype: str) -> None:
    spec = MEAN_SPECS[spec_id]
    rng = np.random.default_rng(3)
    weight_shape = spec["weight"]
    d_out, d_in = weight_shape[0], int(np.prod(weight_shape[1:]))
    d_aug = d_in + int(spec.get("bias") is not None)
    c_out, c_in = _spd(rng, d_out), _spd(rng, d_aug)
    sigma = kfac_sigma(spec, c_out, c_in)
    mean = _from_spec(spec, dtype, rng)
    structure = sc.KroneckerCovariance()
    structure.sample_scale = sample_scale
    param = scnp.posterior_to_structure(mean, sigma.astype(dtype), structure)
    assert param.cov.output_factor.dtype == np.dtype(dtype)
    scale = np.abs(sigma).max()
    np.testing.assert_allclose(param.cov.to_dense() / scale, sigma / scale, **_tol(dtype))
    # The factors are C_out and C_in up to a positive scalar that cancels.
    s_out = param.cov.output_factor * sample_scale
    s_in = param.cov.structure.square_input_factor(compat_numpy, param.cov.storage())
    got_out, got_in = s_out @ s_out.T, s_in @ s_in.T
    ratio = got_out[0, 0] / c_out[0, 0]
    assert ratio > 0
    np.testing.assert_allclose(got_out / ratio, c_out, rtol=1e-3 if dtype == "float32" else 1e-9)
    np.testing.assert_allclose(got_in * ratio, c_in, rtol=1e-3 if dtype == "float32" else 1e-9)


def test_posterior_kronecker_low_ranks() -> None:
    """Sigma = (rank-1 C_out) ⊗ (rank-2 C_in) is held exactly by ranks (2, 1)."""
    spec = MEAN_SPECS["weight+bias"]
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((3, 1)), rng.standard_normal((5, 2))
    sigma = kfac_sigma(spec, a @ a.T, b @ b.T)
    mean = _from_spec(spec, "float64", rng)
    structure = sc.KroneckerCovariance(input_rank=2, output_rank=1)
    param = scnp.posterior_to_structure(mean, sigma, structure)
    np.testing.assert_allclose(param.cov.to_dense(), sigma, atol=1e-12)


def test_posterior_kronecker_nearest_is_a_fixed_point() -> None:
    """Not Kronecker: the nearest Kronecker product, mapped again, stays put."""
    spec = MEAN_SPECS["weight+bias"]
    rng = np.random.default_rng(5)
    sigma = kfac_sigma(spec, _spd(rng, 3), _spd(rng, 5)) + 0.5 * _spd(rng, 15)
    mean = _from_spec(spec, "float64", rng)
    first = scnp.posterior_to_structure(mean, sigma, sc.KroneckerCovariance()).cov.to_dense()
    second = scnp.posterior_to_structure(mean, first, sc.KroneckerCovariance()).cov.to_dense()
    np.testing.assert_allclose(second, first, rtol=1e-9, atol=1e-9)
    # ... and it is nearer to Sigma (Frobenius) than the exact Kronecker part it was built from.
    base = kfac_sigma(spec, *(_spd(np.random.default_rng(5), n) for n in (3, 5)))
    assert np.linalg.norm(sigma - first) <= np.linalg.norm(sigma - base)


@pytest.mark.parametrize("spec_id", ["weight+bias", "bias-None", "bias-first"])
def test_posterior_low_rank_plus_diagonal(spec_id: str, dtype: str) -> None:
    rng = np.random.default_rng(6)
    mean = _from_spec(MEAN_SPECS[spec_id], dtype, rng)
    num = sc.GaussianParameter(mean, sc.DiagonalCovariance()).num_params
    rank = 3
    q, _ = np.linalg.qr(rng.standard_normal((num, rank)))
    u = q * np.array([3.0, 2.0, 1.0])  # well separated eigenvalues 9, 4, 1
    small = rng.uniform(1e-4, 2e-4, num)
    sigma = u @ u.T + np.diag(small)
    param = scnp.posterior_to_structure(
        mean, sigma.astype(dtype), sc.LowRankPlusDiagonalCovariance(rank)
    )
    tol = _tol(dtype)
    # The diagonal is kept exactly (up to rounding).
    np.testing.assert_allclose(param.cov.diagonal(), np.diag(sigma), **tol)
    # The low-rank part is the rank-r eigen-truncation of Sigma ...
    layout = param.cov.layout
    stacked = np.concatenate(
        [
            param.cov.factor[n].reshape(s, -1).astype(np.float64)
            for n, s in zip(layout.names, layout.sizes, strict=True)
        ]
    )
    values, vectors = np.linalg.eigh(sigma)
    truncated = (vectors[:, -rank:] * values[-rank:]) @ vectors[:, -rank:].T
    np.testing.assert_allclose(stacked @ stacked.T, truncated, **tol)
    # ... so the top-r eigenpairs of the result are Sigma's, up to O(max d^2).
    got_values, got_vectors = np.linalg.eigh(param.cov.to_dense().astype(np.float64))
    np.testing.assert_allclose(got_values[-rank:], values[-rank:], atol=1e-3)
    overlaps = np.abs(np.sum(got_vectors[:, -rank:] * vectors[:, -rank:], axis=0))
    np.testing.assert_allclose(overlaps, 1.0, atol=1e-3)


def test_posterior_low_rank_plus_diagonal_clamped_and_clipped() -> None:
    """Rank P: the eigen part is all of Sigma, the residual diagonal is clipped positive."""
    rng = np.random.default_rng(7)
    mean = {"w": rng.standard_normal(4)}
    sigma = _spd(rng, 4)
    param = scnp.posterior_to_structure(mean, sigma, sc.LowRankPlusDiagonalCovariance(10))
    assert np.all(standard_deviations(param.cov.scale["w"], "softplus") > 0)
    np.testing.assert_allclose(param.cov.to_dense(), sigma, rtol=1e-10, atol=1e-10)
    assert np.isfinite(param.cov.logdet())


def test_posterior_errors() -> None:
    mean = {"weight": np.zeros((2, 3)), "bias": np.zeros(2)}
    with pytest.raises(ValueError, match=r"`cov_dense` must have shape \(8, 8\)"):
        scnp.posterior_to_structure(mean, np.eye(7), sc.DiagonalCovariance())
    with pytest.raises(TypeError, match="`cov_dense` must have the means' dtype float64"):
        scnp.posterior_to_structure(mean, np.eye(8, dtype=np.float32), sc.DiagonalCovariance())
    with pytest.raises(ValueError, match="positive definite"):
        scnp.posterior_to_structure(mean, -np.eye(8), sc.FactorizedCovariance())

    class MyCov(sc.FactorizedCovariance):
        pass

    with pytest.raises(TypeError, match="`structure` must be one of"):
        scnp.posterior_to_structure(mean, np.eye(8), MyCov())


def test_closed_form_regression_posterior(tmp_path: Path) -> None:
    """The module docstring's model: Bayesian linear regression, mapped onto each structure."""
    rng = np.random.default_rng(0)
    d_in, d_out, n, noise, prior = 4, 3, 50, 0.5, 1.0
    x, y = rng.standard_normal((n, d_in)), rng.standard_normal((n, d_out))
    x_aug = np.concatenate([x, np.ones((n, 1))], axis=1)
    precision = x_aug.T @ x_aug / noise**2 + np.eye(d_in + 1) / prior**2
    c_in = np.linalg.inv(precision)
    m = (c_in @ x_aug.T @ y / noise**2).T  # (d_out, d_in + 1)
    spec = {"weight": (d_out, d_in), "bias": (d_out,)}
    sigma = kfac_sigma(spec, np.eye(d_out), c_in)
    mean = {"weight": m[:, :d_in], "bias": m[:, d_in]}

    exact = scnp.posterior_to_structure(mean, sigma, sc.FactorizedCovariance())
    structures = {
        "kronecker": sc.KroneckerCovariance(),
        "diagonal": sc.DiagonalCovariance(),
        "lrpd": sc.LowRankPlusDiagonalCovariance(2),
    }
    kl = {}
    for key, structure in structures.items():
        q = scnp.posterior_to_structure(mean, sigma, structure)
        np.testing.assert_allclose(q.cov.diagonal(), np.diag(sigma), rtol=1e-10)
        kl[key] = float(sc.kl_divergence(exact, q))
        assert_identical(q, scnp.from_dict(scnp.to_dict(q)))
        if importlib.util.find_spec("safetensors") is not None:
            assert_identical(q, scnp.load(_save(tmp_path, q, f"{key}.safetensors")))
    assert abs(kl["kronecker"]) < 1e-8  # the posterior is exactly Kronecker
    assert kl["diagonal"] > 1e-3  # the diagonal loses the input correlations
    assert 0.0 < kl["lrpd"] < np.inf  # rank 2 + diagonal: an approximation, full rank


# ------------------------------------------------------------------ CuPy
def _cupy_backend() -> Backend:
    reason = _cuda_reason()
    if reason:
        pytest.skip(f"CuPy paths of structcov.numpy: {reason}")
    import array_api_compat.cupy as compat_cupy

    return Backend("cupy", compat_cupy)


def test_cupy_gaussian_and_round_trip(tmp_path: Path, dtype: str) -> None:
    backend = _cupy_backend()
    import cupy

    mean = {
        "weight": backend.asarray(np.ones((3, 4)), dtype),
        "bias": None,
        "b": backend.asarray(np.zeros(3), dtype),
    }
    param = scnp.gaussian(mean, sc.LowRankPlusDiagonalCovariance(2), seed=3)
    again = scnp.gaussian(mean, sc.LowRankPlusDiagonalCovariance(2), seed=3)
    for path, value in param.cov.storage().items():
        assert isinstance(value, cupy.ndarray) and value.dtype == np.dtype(dtype)
        assert bool(cupy.all(value == again.cov.storage()[path]))
    arrays = scnp.to_dict(param)
    assert isinstance(arrays["mean/weight"], cupy.ndarray)
    rebuilt = scnp.from_dict(arrays)
    assert list(rebuilt.mean) == ["weight", "bias", "b"]
    assert (
        rebuilt.cov.structure == param.cov.structure
        and rebuilt.cov._config() == param.cov._config()
    )

    host = scnp.from_dict(arrays, like="numpy")
    for path in (_save(tmp_path, param), _save_legacy(tmp_path, param)):
        assert_identical(host, scnp.load(path))
        on_device = scnp.load(path, like="cupy")
        assert list(on_device.mean) == ["weight", "bias", "b"]
        for key, value in on_device.cov.storage().items():
            assert isinstance(value, cupy.ndarray)
            assert value.get().tobytes() == param.cov.storage()[key].get().tobytes()


def test_cupy_posterior(dtype: str) -> None:
    backend = _cupy_backend()
    spec = MEAN_SPECS["weight+bias"]
    rng = np.random.default_rng(8)
    sigma = kfac_sigma(spec, _spd(rng, 3), _spd(rng, 5))
    mean = {
        name: backend.asarray(rng.standard_normal(shape), dtype) for name, shape in spec.items()
    }
    for structure in (sc.KroneckerCovariance(), sc.FactorizedCovariance(), sc.DiagonalCovariance()):
        param = scnp.posterior_to_structure(mean, backend.asarray(sigma, dtype), structure)
        dense = backend.to_numpy(param.cov.to_dense())
        if isinstance(structure, sc.DiagonalCovariance):
            np.testing.assert_allclose(np.diag(dense), np.diag(sigma), rtol=1e-3)
        else:
            scale = np.abs(sigma).max()
            np.testing.assert_allclose(dense / scale, sigma / scale, **_tol(dtype))
