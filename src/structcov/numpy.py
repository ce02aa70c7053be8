"""NumPy and CuPy conveniences: construction, saving/loading, closed-form posteriors.

NumPy and CuPy arrays work with the core directly (``structcov.GaussianParameter``
takes them as they are); this module adds what those libraries' users need
around it:

- `gaussian`: build a ``GaussianParameter`` and draw its covariance
  parameters from a seed (``numpy.random.default_rng`` or, for CuPy means,
  ``cupy.random.default_rng``).
- `save` / `load`: a checkpoint of one parameter in structcov's checkpoint format,
  the safetensors file of `structcov.io` (thin wrappers of ``structcov.io.save`` /
  ``structcov.io.load`` for NumPy/CuPy, which also take binary file objects), so a
  posterior saved here loads into torch or JAX and back. `load` also reads the legacy
  ``.npz`` files of earlier versions (never unpickling anything); nothing writes them
  any more.
- `to_dict` / `from_dict`: a round trip through a flat dict of arrays that restores
  an identical parameter (structure, ranks, mean names in order including ``None``
  entries, values bit for bit, dtype); the metadata is a JSON string in a unicode
  array, so nothing needs pickle. It is the layout of the legacy ``.npz`` files.
- `posterior_to_structure`: NumPy and CuPy have no autograd, so structcov cannot
  *fit* a structured posterior there; what it offers instead is to map a known
  Gaussian (e.g. a closed-form posterior) onto each structure.

Example: Bayesian multi-output linear regression ``y = W x + b + noise`` with
noise N(0, sigma^2 I) and prior N(0, tau^2 I) on every entry of W~ = [W | b]. Its
posterior has rows with the common covariance A^-1, A = X~^T X~ / sigma^2 + I / tau^2
(X~ = [X | 1]), so Sigma = I_out ⊗ A^-1 in the K-FAC convention: the Kronecker
structure holds it exactly, the diagonal keeps only its marginal variances::

    import numpy as np
    import structcov as sc
    from structcov import numpy as scnp

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((50, 4)), rng.standard_normal((50, 3))
    x_aug = np.concatenate([x, np.ones((50, 1))], axis=1)
    a = x_aug.T @ x_aug / 0.5**2 + np.eye(5)
    c_in = np.linalg.inv(a)
    m = (c_in @ x_aug.T @ y / 0.5**2).T                # (3, 5): posterior mean of W~
    sigma = np.kron(np.eye(3), c_in)                   # rows (o, i) of W~, i = 4: bias
    perm = [o * 5 + i for o in range(3) for i in range(4)] + [o * 5 + 4 for o in range(3)]
    sigma = sigma[np.ix_(perm, perm)]                  # flat order: weight row-major, then bias
    mean = {"weight": m[:, :4], "bias": m[:, 4]}
    exact = scnp.posterior_to_structure(mean, sigma, sc.KroneckerCovariance())
    marginal = scnp.posterior_to_structure(mean, sigma, sc.DiagonalCovariance())

This module imports NumPy; it imports CuPy only when CuPy arrays, a CuPy
generator or ``like="cupy"`` are involved, `structcov.io` and safetensors (the
``structcov[io]`` extra) only when `save` / `load` are called, and never imports torch
or JAX.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from ._array_api import Array, backend_name, namespace
from .covariances import FactorizedCovariance, StructuredCovariance
from .covariances._base import COVARIANCES
from .covariances._structure import SCALE_TRANSFORMS
from .gaussian import GaussianParameter
from .projection import from_dense as posterior_to_structure

__all__ = ["from_dict", "gaussian", "load", "posterior_to_structure", "save", "to_dict"]

#: The key of the metadata entry, and the format tag and version it carries.
METADATA_KEY = "__structcov__"
FORMAT_TAG = "structcov.GaussianParameter"
FORMAT_VERSION = 1

_MEAN_PREFIX = "mean/"
_COV_PREFIX = "cov/"

#: The structures that can be saved are those the structure modules register
#: (`structcov.covariances._base.COVARIANCES`); their constructor arguments are the keys
#: of ``cov._config()`` (``sample_scale`` is kept apart, as its own metadata field).


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


# --------------------------------------------------------------------------- helpers
def _library(value: Any) -> str | None:
    """``"numpy"`` or ``"cupy"`` for an ndarray of those libraries, else ``None``.

    Decided by type, so CuPy is never imported here.
    """
    if isinstance(value, (np.ndarray, np.generic)):  # a 0-d mean's storage may be a scalar
        return "numpy"
    module = type(value).__module__
    if module.split(".")[0] == "cupy" and type(value).__name__ == "ndarray":
        return "cupy"
    return None


def _cupy() -> Any:
    try:
        import cupy
    except ImportError:
        raise ImportError(
            'like="cupy" needs CuPy, which is not installed (pip install structcov[cupy] on a '
            "machine with a CUDA device)"
        ) from None
    return cupy


def _check_like(like: str | None, *, allow_none: bool) -> None:
    allowed: tuple[str | None, ...] = ("numpy", "cupy", None) if allow_none else ("numpy", "cupy")
    if like not in allowed:
        expected = '"numpy", "cupy" or None' if allow_none else '"numpy" or "cupy"'
        raise ValueError(f"`like` must be {expected}, got {like!r}")


def _move(value: Any, like: str | None) -> Any:
    """``value`` (NumPy or CuPy) as an array of the library ``like`` (no copy if already)."""
    if like is None or _library(value) == like:
        return value
    if like == "numpy":
        return value.get()
    return _cupy().asarray(value)


def _as_array(value: Any) -> Any:
    """A NumPy scalar as a 0-d array (NumPy's generator returns scalars for shape ())."""
    return np.asarray(value) if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------- gaussian
def gaussian(
    mean: Array | Mapping[str, Array | None],
    cov: FactorizedCovariance,
    *,
    scale: Mapping[str, float] | float = 1.0,
    seed: Any = None,
    generator: Any = None,
) -> GaussianParameter:
    """``GaussianParameter(mean, cov)`` with covariance parameters drawn from a seed.

    Calls ``cov.reset_parameters(scale, generator)`` with
    ``numpy.random.default_rng(seed)`` for NumPy means, or
    ``cupy.random.default_rng(seed)`` for CuPy means (the storage takes the means'
    library, dtype and device). The same seed gives the same parameters.

    Parameters
    ----------
    mean
        A mapping name -> NumPy/CuPy array (or ``None``), or a bare array.
    cov
        A covariance structure, e.g. ``structcov.DiagonalCovariance()``.
    scale
        The prior scale per mean (a float, or a mapping name -> float) that
        ``reset_parameters`` uses (see each structure for the std it implies).
    seed
        Anything ``default_rng`` accepts (an int, ``None`` for fresh OS entropy,
        a ``SeedSequence``).
    generator
        An existing ``numpy.random.Generator`` / ``cupy.random.Generator`` to
        draw from instead of ``seed`` (it advances). Give at most one of the two.

    Returns
    -------
    GaussianParameter
        The new parameter; ``cov`` is its covariance.
    """
    if seed is not None and generator is not None:
        raise TypeError("give `seed` or `generator`, not both")
    param = GaussianParameter(mean, cov)
    reference: Array = param.mean[param.names[0]]
    library = backend_name(namespace(reference))
    if library not in ("numpy", "cupy"):
        raise TypeError(
            f"structcov.numpy.gaussian needs NumPy or CuPy means, got {library} arrays "
            "(use GaussianParameter with that library's generator, or its adapter module)"
        )
    if generator is None:
        if library == "cupy":
            import cupy

            generator = cupy.random.default_rng(seed)
        else:
            generator = np.random.default_rng(seed)
    cov.reset_parameters(scale, generator)
    return param


# --------------------------------------------------------------------------- to_dict
def _constructor_state(cov: StructuredCovariance) -> tuple[str, dict[str, int | None], Any]:
    """(structure name, constructor ranks, sample_scale or None) of a saveable ``cov``."""
    name = type(cov).__name__
    if COVARIANCES.get(name) is not type(cov):
        raise TypeError(
            f"structcov.numpy can save only the structures {sorted(COVARIANCES)}, got "
            f"{type(cov).__module__}.{type(cov).__qualname__}"
        )
    config = cov._config()
    sample_scale = config.pop("sample_scale", None)
    config.pop("scale_transform", None)  # its own metadata field (files before it: identity)
    return name, config, None if sample_scale is None else float(sample_scale)


def to_dict(param: GaussianParameter) -> dict[str, Array]:
    """A flat dict of arrays that holds ``param`` entirely; `from_dict` inverts it.

    Layout of the dict:

    - ``"__structcov__"``: a 0-d NumPy unicode array holding a JSON string: the
      format tag and version, the structure's class name, its constructor
      ranks, ``sample_scale`` (Kronecker), the mean names in insertion order
      with their shapes (``None`` entries kept, shape ``null``), the storage
      paths with their shapes, K, and the dtype;
    - ``"mean/<name>"``: each non-``None`` mean array;
    - ``"cov/<path>"``: each stored covariance array (``param.cov.storage()``,
      e.g. ``"cov/factor.weight"``, ``"cov/output_factor"``).

    The arrays are the stored ones, not copies, and keep their library: CuPy
    arrays stay on their device. Nothing in the dict needs pickle. Cost: O(1)
    besides the metadata string.

    Raises ``TypeError`` for a structure outside structcov's own (a user
    subclass cannot be rebuilt by name) and for arrays other than NumPy/CuPy.
    """
    if type(param) is not GaussianParameter:
        raise TypeError(
            f"`param` must be a structcov.GaussianParameter, got {type(param).__module__}."
            f"{type(param).__qualname__}"
        )
    cov = param.cov
    structure, ranks, sample_scale = _constructor_state(cov)
    means = {name: value for name, value in param.mean.items() if value is not None}
    storage = cov.storage()
    reference = means[param.names[0]]
    checked = [
        *((f"mean[{n!r}]", v) for n, v in means.items()),
        *((f"cov storage {p!r}", v) for p, v in storage.items()),
    ]
    for key, value in checked:
        if _library(value) is None:
            raise TypeError(
                f"structcov.numpy saves NumPy or CuPy arrays only; {key} is "
                f"{type(value).__module__}.{type(value).__qualname__}"
            )
        if _library(value) != _library(reference):
            raise TypeError(
                f"{key} is a {_library(value)} array, the means are {_library(reference)}"
            )
    dtype = np.dtype(reference.dtype)
    for key, value in checked:
        if np.dtype(value.dtype) != dtype:
            raise TypeError(f"{key} has dtype {value.dtype}, the means have {dtype}: cannot save")
    metadata = {
        "format": FORMAT_TAG,
        "version": FORMAT_VERSION,
        "structure": structure,
        "ranks": ranks,
        "sample_scale": sample_scale,
        **(
            {"scale_transform": cov.scale_transform}
            if "scale_transform" in type(cov)._arguments
            else {}
        ),
        "num_factor_columns": cov.num_factor_columns,
        "dtype": dtype.str,
        "means": [
            [name, None if value is None else [int(d) for d in value.shape]]
            for name, value in param.mean.items()
        ],
        "storage": [[path, [int(d) for d in value.shape]] for path, value in storage.items()],
    }
    out: dict[str, Array] = {METADATA_KEY: np.array(json.dumps(metadata))}
    for name, value in means.items():
        out[_MEAN_PREFIX + name] = _as_array(value)
    for path, value in storage.items():
        out[_COV_PREFIX + path] = _as_array(value)
    return out


# --------------------------------------------------------------------------- from_dict
@dataclass(frozen=True)
class _Metadata:
    structure: str
    ranks: dict[str, Any]  # constructor arguments: ranks, and scale_transform where taken
    sample_scale: float | None
    num_factor_columns: int
    dtype: np.dtype[Any]
    means: list[tuple[str, tuple[int, ...] | None]]
    storage: list[tuple[str, tuple[int, ...]]]

    def expected_keys(self) -> list[str]:
        return [
            METADATA_KEY,
            *(_MEAN_PREFIX + name for name, shape in self.means if shape is not None),
            *(_COV_PREFIX + path for path, _ in self.storage),
        ]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {_MEAN_PREFIX + n: s for n, s in self.means if s is not None}
        shapes.update({_COV_PREFIX + p: s for p, s in self.storage})
        return shapes


class _InvalidData(ValueError):
    """Readable data that does not describe a structcov parameter; ``detail`` says why."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"not a valid structcov parameter dict: {detail}")
        self.detail = detail


def _bad(detail: str) -> _InvalidData:
    return _InvalidData(detail)


def _decode_metadata(raw: Any) -> Any:
    """The JSON object in the metadata entry (a 0-d/1-element str or bytes array, or str)."""
    if isinstance(raw, (str, bytes)):
        text: Any = raw
    elif isinstance(raw, np.ndarray) and raw.dtype.kind in "US" and raw.size == 1 and raw.ndim <= 1:
        text = raw.reshape(()).item()
    else:
        described = (
            f"an array of dtype {raw.dtype} and shape {raw.shape}"
            if isinstance(raw, np.ndarray)
            else type(raw).__name__
        )
        raise _bad(
            f"{METADATA_KEY!r} must be a 0-d or 1-element NumPy str/bytes array holding JSON, "
            f"got {described}"
        )
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _bad(f"{METADATA_KEY!r} is not UTF-8 text ({error})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise _bad(f"{METADATA_KEY!r} does not hold valid JSON ({error})") from None


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(d) is int and d >= 0 for d in value):
        raise _bad(f"metadata {what} must be a list of non-negative ints, got {value!r}")
    return tuple(value)


def _pairs(value: Any, what: str) -> list[tuple[Any, Any]]:
    if not isinstance(value, list) or not all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in value
    ):
        raise _bad(f"metadata {what!r} must be a list of [name, shape] pairs, got {value!r}")
    names = [p[0] for p in value]
    if len(set(names)) != len(names):
        raise _bad(f"metadata {what!r} repeats a name: {names}")
    return [(p[0], p[1]) for p in value]


def _parse_metadata(raw: Any) -> _Metadata:
    meta = _decode_metadata(raw)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_TAG:
        tag = meta.get("format") if isinstance(meta, dict) else None
        raise _bad(
            f"{METADATA_KEY!r} must carry the format tag {FORMAT_TAG!r}, got {tag!r} "
            "(this was not written by structcov.numpy)"
        )
    version = meta.get("version")
    if version != FORMAT_VERSION:
        raise _bad(
            f"unknown format version {version!r}: this structcov reads version {FORMAT_VERSION}"
            + (
                " (the data was written by a newer structcov)"
                if isinstance(version, int) and version > FORMAT_VERSION
                else ""
            )
        )
    fields = {
        "format",
        "version",
        "structure",
        "ranks",
        "sample_scale",
        "num_factor_columns",
        "dtype",
        "means",
        "storage",
    }
    if set(meta) - {"scale_transform"} != fields:
        raise _bad(f"metadata must have the fields {sorted(fields)}, got {sorted(meta)}")
    structure = meta["structure"]
    if not isinstance(structure, str) or structure not in COVARIANCES:
        raise _bad(f"unknown structure {structure!r}: expected one of {sorted(COVARIANCES)}")
    arguments = tuple(a for a in COVARIANCES[structure]._arguments if a != "scale_transform")
    # Files written before positive transforms stored the raw (identity) scale.
    transform = meta.get("scale_transform", "identity")
    if "scale_transform" not in COVARIANCES[structure]._arguments:
        if "scale_transform" in meta:
            raise _bad(f"metadata 'scale_transform' is not an argument of {structure}")
    elif transform not in SCALE_TRANSFORMS:
        raise _bad(
            f"metadata 'scale_transform' must be one of {list(SCALE_TRANSFORMS)}, got {transform!r}"
        )
    ranks = meta["ranks"]
    if (
        not isinstance(ranks, dict)
        or set(ranks) != set(arguments)
        or not all(v is None or type(v) is int for v in ranks.values())
    ):
        raise _bad(
            f"metadata 'ranks' of {structure} must map {list(arguments)} to ints or null, got "
            f"{ranks!r}"
        )
    sample_scale = meta["sample_scale"]
    if "sample_scale" in COVARIANCES[structure]._settings:
        if type(sample_scale) not in (int, float):
            raise _bad(f"metadata 'sample_scale' must be a number, got {sample_scale!r}")
        sample_scale = float(sample_scale)
    elif sample_scale is not None:
        raise _bad(f"metadata 'sample_scale' must be null for {structure}, got {sample_scale!r}")
    num_columns = meta["num_factor_columns"]
    if type(num_columns) is not int:
        raise _bad(f"metadata 'num_factor_columns' must be an int, got {num_columns!r}")
    try:
        dtype = np.dtype(meta["dtype"]) if isinstance(meta["dtype"], str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind != "f":
        raise _bad(f"metadata 'dtype' must name a real floating dtype, got {meta['dtype']!r}")
    means = [
        (name, None if shape is None else _shape(shape, f"shape of mean {name!r}"))
        for name, shape in _pairs(meta["means"], "means")
    ]
    storage = [
        (path, _shape(shape, f"shape of storage {path!r}"))
        for path, shape in _pairs(meta["storage"], "storage")
    ]
    if "scale_transform" in COVARIANCES[structure]._arguments:
        ranks = {**ranks, "scale_transform": transform}
    return _Metadata(structure, ranks, sample_scale, num_columns, dtype, means, storage)


def _check_keys(meta: _Metadata, keys: Iterable[str]) -> None:
    expected = meta.expected_keys()
    given = list(keys)
    missing = [k for k in expected if k not in given]
    extra = [k for k in given if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing arrays {missing}")
        if extra:
            parts.append(f"unexpected arrays {extra}")
        raise _bad(
            f"{' and '.join(parts)} for a {meta.structure} parameter (expected exactly {expected})"
        )


def _rebuild(meta: _Metadata, get: Callable[[str], Any], like: str | None) -> GaussianParameter:
    """Check every array against ``meta`` and rebuild through the real constructors."""
    shapes = meta.expected_shapes()
    arrays: dict[str, Any] = {}
    libraries = set()
    for key, shape in shapes.items():
        value = get(key)
        library = _library(value)
        if library is None:
            raise _bad(
                f"{key!r} must be a NumPy or CuPy array, got {type(value).__module__}."
                f"{type(value).__qualname__}"
            )
        if np.dtype(value.dtype) != meta.dtype:
            raise _bad(
                f"{key!r} must have dtype {meta.dtype} (from the metadata), got {value.dtype}"
            )
        if tuple(value.shape) != shape:
            raise _bad(f"{key!r} must have shape {shape} (from the metadata), got {value.shape}")
        libraries.add(library)
        arrays[key] = _as_array(value)
    if like is None and len(libraries) > 1:
        raise _bad("the arrays mix NumPy and CuPy: pass like='numpy' or like='cupy'")
    arrays = {key: _move(value, like) for key, value in arrays.items()}

    cls = COVARIANCES[meta.structure]
    mean = {
        name: None if shape is None else arrays[_MEAN_PREFIX + name] for name, shape in meta.means
    }
    try:
        cov = cls(**meta.ranks)
        if meta.sample_scale is not None:
            cov.sample_scale = meta.sample_scale
        param = GaussianParameter(mean, cov)
    except (TypeError, ValueError) as error:
        raise _bad(
            f"the metadata does not describe a valid {meta.structure} parameter: {error}"
        ) from None
    layout_storage = [(path, tuple(value.shape)) for path, value in cov.storage().items()]
    if layout_storage != meta.storage or cov.num_factor_columns != meta.num_factor_columns:
        raise _bad(
            f"the metadata is inconsistent: a {meta.structure} with ranks {meta.ranks} over "
            f"these means stores {layout_storage} with K = {cov.num_factor_columns}, the metadata "
            f"says {meta.storage} with K = {meta.num_factor_columns}"
        )
    cov.load_storage({path: arrays[_COV_PREFIX + path] for path, _ in meta.storage})
    return param


def from_dict(arrays: Mapping[str, Any], *, like: str | None = None) -> GaussianParameter:
    """Rebuild the parameter that `to_dict` turned into ``arrays``.

    The structure is rebuilt by name from a fixed allow-list of structcov's
    own classes, with the saved constructor ranks, through
    ``GaussianParameter(mean, cov)`` and ``cov.load_storage`` (the validated
    path); the result has the same class, ranks, mean names in order
    (``None`` entries included), dtype and values. The arrays are used as
    given, not copied.

    Parameters
    ----------
    arrays
        The flat dict (any mapping, e.g. an opened ``.npz``).
    like
        ``None`` (default): keep the arrays' library; ``"numpy"``: move CuPy
        arrays to the host; ``"cupy"``: move arrays to the current CuPy device.

    Raises
    ------
    ValueError
        Naming what is wrong: no format tag (not written by structcov), an
        unknown format version or structure, missing or unexpected arrays,
        an array of the wrong shape or dtype, or inconsistent metadata.
    """
    _check_like(like, allow_none=True)
    if not isinstance(arrays, Mapping):
        raise TypeError(
            f"`arrays` must be a mapping of names to arrays, got {type(arrays).__name__}"
        )
    if METADATA_KEY not in arrays:
        raise _bad(
            f"it has no {METADATA_KEY!r} entry, so it was not written by structcov.numpy "
            f"(keys: {sorted(arrays)[:10]})"
        )
    meta = _parse_metadata(arrays[METADATA_KEY])
    _check_keys(meta, arrays.keys())
    return _rebuild(meta, arrays.__getitem__, like)


# --------------------------------------------------------------------------- save / load
PathLike = str | os.PathLike[str]


def _checkpoints() -> Any:
    """``structcov.io``, imported on first use (the name ``io`` here is the standard library's)."""
    from . import io as checkpoints

    return checkpoints


def _check_binary(file: Any, method: str) -> None:
    """Refuse a text-mode file object, or an object without ``method`` (read/write)."""
    if isinstance(file, io.TextIOBase):
        raise TypeError(
            f"`file` must be a path or a binary file object (open(path, '{method[0]}b')), got "
            f"the text-mode file object {file!r}"
        )
    if not callable(getattr(file, method, None)):
        raise TypeError(
            f"`file` must be a path (str or os.PathLike) or a binary file object with a "
            f"{method}() method, got {type(file).__module__}.{type(file).__qualname__}"
        )


def save(file: PathLike | IO[bytes], param: GaussianParameter) -> None:
    """Write ``param`` to a structcov checkpoint: ``structcov.io.save(file, param)``.

    The file is structcov's one checkpoint format, the safetensors file of
    ``structcov.io`` (see that module): any backend reads it
    (``structcov.io.load(file, like="torch")``, ``"jax"``, ...), and `load` reads it
    back here. A path is written atomically and exactly as given (no suffix is added;
    ``.safetensors`` is the usual one). A binary file object (``open(path, "wb")``,
    ``io.BytesIO``) receives the same bytes, written from its current position (not
    atomically: the bytes are produced by ``structcov.io.save`` in a temporary
    directory first). CuPy arrays are copied to the host.

    Earlier versions wrote an ``.npz`` file here (and took ``compressed=``); `load`
    still reads those files.

    Raises
    ------
    TypeError
        For anything but a core ``structcov.GaussianParameter`` (models and collections:
        ``structcov.io.save``), a text-mode file object, or what ``structcov.io.save``
        refuses (a structure outside structcov's registry, a dtype other than
        float32/float64).
    ImportError
        Without the safetensors package (``pip install 'structcov[io]'``).
    """
    if type(param) is not GaussianParameter:
        raise TypeError(
            f"`param` must be a structcov.GaussianParameter, got {type(param).__module__}."
            f"{type(param).__qualname__} (structcov.io.save writes models and collections)"
        )
    checkpoints = _checkpoints()
    if isinstance(file, (str, os.PathLike)):
        checkpoints.save(file, param)
        return
    _check_binary(file, "write")
    with tempfile.TemporaryDirectory(prefix="structcov-") as folder:
        path = os.path.join(folder, "param.safetensors")
        checkpoints.save(path, param)
        with open(path, "rb") as written:
            data = written.read()
    file.write(data)


def load(file: PathLike | IO[bytes], *, like: str = "numpy") -> GaussianParameter:
    """Read a parameter saved by `save`: ``structcov.io.load(file, like=like)``, NumPy/CuPy.

    ``file`` holds structcov's checkpoint format (the safetensors file of
    ``structcov.io``, whichever backend wrote it) or, told apart by its first bytes
    (a zip archive), a legacy ``.npz`` file of earlier versions' ``save``.

    **Checkpoints** are read by ``structcov.io.load``, with its checks and errors
    (``ValueError`` "not a structcov safetensors file: ..." or "invalid structcov
    safetensors file: ...", ``FileNotFoundError`` for a missing path). The file must
    hold a single Gaussian parameter (``ValueError`` otherwise: read collections and
    layers with ``structcov.io.load``).

    **Legacy ``.npz`` files** (`to_dict`'s layout) are read without unpickling anything
    (``numpy.load(..., allow_pickle=False)``): an archive that cannot be read (truncated,
    corrupt, an entry holding pickled objects, no structcov metadata entry) is a
    ``ValueError`` starting with "not a structcov .npz file:"; wrong metadata or arrays
    (another structure's arrays, shapes, dtypes, an unknown version) a ``ValueError``
    starting with "invalid structcov .npz file:" that names what is wrong, as
    `from_dict` does. Re-save them with `save` (or ``structcov.io.save``) to convert.

    Parameters
    ----------
    file
        A path, or a binary file object open for reading (read from its current
        position; a checkpoint is copied to a temporary file for ``structcov.io.load``).
    like
        ``"numpy"`` (default) or ``"cupy"`` (the arrays go to the current CuPy
        device; ``ImportError`` if CuPy is not installed). Other backends:
        ``structcov.io.load(file, like=...)``.
    """
    _check_like(like, allow_none=False)
    if like == "cupy":
        _cupy()  # fail before reading if CuPy is missing
    if not isinstance(file, (str, os.PathLike)):
        _check_binary(file, "read")
        try:
            start = file.tell()
            magic = file.read(4)
            file.seek(start)
        except OSError as error:
            raise ValueError(f"cannot read {file!r} ({error})") from None
        if magic in _ZIP_MAGIC:
            return _load_legacy(file, file, like)
        with tempfile.TemporaryDirectory(prefix="structcov-") as folder:
            path = os.path.join(folder, "param.safetensors")
            with open(path, "wb") as copy:
                copy.write(file.read())
            return _load_checkpoint(path, like, described=repr(file))
    if os.path.isfile(file):
        try:
            with open(file, "rb") as handle:
                magic = handle.read(4)
        except OSError as error:
            raise ValueError(f"cannot read {os.fspath(file)!r} ({error})") from None
        if magic in _ZIP_MAGIC:
            with open(file, "rb") as handle:  # numpy.load leaks its own handle when corrupt
                return _load_legacy(handle, file, like)
    return _load_checkpoint(file, like, described=os.fspath(file))


def _load_checkpoint(path: PathLike, like: str, *, described: str) -> GaussianParameter:
    """``structcov.io.load(path, like=like)``, which must give one Gaussian parameter."""
    try:
        loaded = _checkpoints().load(path, like=like)
    except ValueError as error:
        if described == os.fspath(path):
            raise
        # A copy of a file object: name the caller's object, not the temporary path.
        raise ValueError(str(error).replace(os.fspath(path), described)) from None
    if type(loaded) is not GaussianParameter:
        held = (
            f"{len(loaded)} entries ({list(loaded)[:5]})"
            if isinstance(loaded, dict)
            else type(loaded).__name__
        )
        raise ValueError(
            f"structcov.numpy.load reads a checkpoint of one Gaussian parameter; {described} "
            f"holds {held}: read it with structcov.io.load"
        )
    return loaded


# -------------------------------------------------------------- legacy .npz reader
# Earlier versions' `save` wrote `to_dict`'s layout to an ``.npz`` file. The writer is
# gone; this reader stays so that those files still load (without unpickling anything).
def _describe_file(file: Any) -> str:
    return os.fspath(file) if isinstance(file, (str, os.PathLike)) else repr(file)


def _not_ours(file: Any, reason: str) -> ValueError:
    return ValueError(f"not a structcov .npz file: {_describe_file(file)}: {reason}")


def _load_legacy(handle: IO[bytes], file: Any, like: str) -> GaussianParameter:
    """The parameter in a legacy ``.npz`` file, open as ``handle`` (zip magic checked)."""
    try:
        archive = np.load(handle, allow_pickle=False)
    except Exception as error:  # any failure to open the archive: truncated, corrupt, ...
        raise _not_ours(
            file,
            f"not a readable zip archive, truncated or corrupt ({type(error).__name__}: {error})",
        ) from None
    with archive:
        if not isinstance(archive, np.lib.npyio.NpzFile):  # pragma: no cover -- magic checked
            raise _not_ours(file, "numpy did not read it as an .npz archive")
        keys = list(archive.files)

        def read(key: str) -> Any:
            try:
                return archive[key]
            except Exception as error:  # unpicklable objects, truncation, CRC errors, ...
                raise _not_ours(
                    file, f"entry {key!r} cannot be read ({type(error).__name__}: {error})"
                ) from None

        if METADATA_KEY not in keys:
            raise _not_ours(file, f"it has no {METADATA_KEY!r} entry (entries: {keys[:10]})")
        try:
            meta = _parse_metadata(read(METADATA_KEY))
            _check_keys(meta, keys)
            return _rebuild(meta, read, like)
        except _InvalidData as error:
            raise ValueError(
                f"invalid structcov .npz file: {_describe_file(file)}: {error.detail}"
            ) from None
