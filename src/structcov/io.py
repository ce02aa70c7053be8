"""Checkpoints that cross backends: structcov parameters and layers in a safetensors file.

``structcov.io.save(file, obj)`` writes Gaussian parameters and the deterministic
parameters of structcov's layers, of any backend; ``structcov.io.load(file, like=...)``
reads them into any backend the core runs on, and ``structcov.io.load_into(file,
model)`` into an existing model of any module system (a torch model of
``structcov.torch`` layers into its Equinox or Flax NNX counterpart, and back). Train
with torch, serve with JAX or NumPy: the file is the same.

**The file** is a plain `safetensors <https://github.com/huggingface/safetensors>`_
file: every array is a tensor under a stable dotted name (the names of the torch
adapter's ``state_dict``),

- ``<prefix>.mean.<name>`` for each mean that is not ``None``,
- ``<prefix>.cov.<path>`` for each stored covariance array, ``<path>`` a storage
  path of ``cov.storage()`` (``factor.weight``, ``scale.bias``, ``output_factor``),

with ``<prefix>.`` left out for a single parameter saved on its own (``mean.weight``,
``cov.factor.weight``). The safetensors string metadata holds one entry,
``"structcov"``: a JSON object with

- ``format`` (``"structcov.safetensors"``), ``version`` (`FORMAT_VERSION`) and, for
  information only, ``structcov_version``;
- ``kind``: ``"parameter"`` (one parameter, `load` returns it) or ``"collection"``
  (`load` returns a dict prefix -> parameter, in the saved order);
- ``parameters``: one record per parameter, in the saved order, with ``prefix`` and
  (since version 3) ``kind``:

  - ``"gaussian"``: ``covariance``, the class name in structcov's registry
    (``"KroneckerCovariance"``); ``config``, the constructor's arguments and settings
    (``{"input_rank": null, "output_rank": 2, "sample_scale": 0.5}``: ranks as
    requested, not clamped; ``scale_transform`` for Diagonal and LowRankPlusDiagonal,
    since version 2); ``structure``, the frozen structure's type name and ``config()``
    (clamped ranks); ``means``, every mean name in insertion order with its shape,
    ``None`` entries kept with shape ``null``; ``storage``, the storage paths in slot
    order with their shapes; ``num_factor_columns`` (K) and ``dtype`` (``"float32"``
    or ``"float64"``). Versions 1 and 2 hold these records only, without ``kind``.
  - ``"deterministic"`` (since version 3): the means of a layer built with
    ``cov=None``: ``means`` and ``dtype`` as above, nothing else.

That is everything needed to rebuild the object with no code from the writer.
**Loading executes nothing from the file**: the covariance class is looked up by
name in structcov's registry (``COVARIANCES``), built with the saved arguments
(``cls(**ranks)``, settings set as attributes), attached with
``GaussianParameter(mean, cov)`` and filled with ``cov.load_storage`` (the validated
path); the rebuilt structure must equal the one the header describes, and every
tensor's shape and dtype must be the header's. Values are copied bit for bit, so a
torch -> file -> JAX round trip gives identical storage.

**Writes are atomic**: the bytes go to a temporary file in the same directory,
which is flushed, ``fsync``-ed and renamed over ``file`` (``os.replace``); a crash
mid-write leaves the old file as it was.

Supported objects (`save`): a core `structcov.GaussianParameter` of any backend; a
``structcov.torch.GaussianParameter`` or ``DeterministicParameter`` module, or any
``torch.nn.Module`` holding such modules (the layers ``structcov.torch.Linear``,
``Conv1d``-``Conv3d``, ``Sequential``; prefixes from ``named_modules``:
``0.params``); the Equinox and Flax NNX wrappers and layers of `structcov.jax`
(prefixes from the attribute path in definition order: ``layers.0.params``) and any
JAX pytree of them or of core parameters (prefixes from the pytree's key paths); a
mapping name -> any of those, or a list/tuple of them (prefixes ``0``, ``1``, ...).
Arrays that belong to no structcov parameter (an ``nn.BatchNorm``'s tensors, an
``nn.Linear``'s weight) are refused with their names.

float32 and float64 are supported; float16 and bfloat16 are refused with a clear
error. This module imports NumPy; safetensors (the ``structcov[io]`` extra) is
imported on first use; the backend of ``like`` only when loading into it.
``import structcov`` imports none of them (its ``structcov.save`` / ``structcov.load``
import this module when called).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from ._array_api import backend_name, is_array_api_obj, namespace
from .covariances._base import COVARIANCES, StructuredCovariance
from .covariances._structure import SCALE_TRANSFORMS, Structure
from .gaussian import GaussianParameter

__all__ = ["FORMAT_TAG", "FORMAT_VERSION", "LIKE", "METADATA_KEY", "load", "load_into", "save"]

#: The key of structcov's entry in the safetensors string metadata.
METADATA_KEY = "structcov"
#: The format tag and version that entry carries.
FORMAT_TAG = "structcov.safetensors"
FORMAT_VERSION = 3
#: Versions `load` reads. Version 1 predates positive scale transforms: its Diagonal
#: and LowRankPlusDiagonal scales are raw (read with ``scale_transform="identity"``).
#: Versions 1 and 2 hold Gaussian records only (no record ``kind``).
READABLE_VERSIONS = (1, 2, 3)
#: The backends `load` reads into.
LIKE = ("numpy", "torch", "jax", "cupy", "array_api_strict")

_DTYPES = ("float32", "float64")
_SAFETENSORS_DTYPES = {"float32": "F32", "float64": "F64"}
_TOP_FIELDS = ("format", "version", "structcov_version", "kind", "parameters")
_PARAMETER_FIELDS = (
    "prefix",
    "covariance",
    "config",
    "structure",
    "means",
    "storage",
    "num_factor_columns",
    "dtype",
)
_DETERMINISTIC_FIELDS = ("prefix", "kind", "means", "dtype")
#: The record kinds of version 3: a Gaussian parameter, a deterministic layer's means.
_RECORD_KINDS = ("gaussian", "deterministic")

PathLike = str | os.PathLike[str]


def _safetensors() -> Any:
    try:
        import safetensors
        import safetensors.numpy
    except ImportError:
        raise ImportError(
            "structcov.io needs the safetensors package: pip install 'structcov[io]' "
            "(or pip install 'safetensors>=0.4')"
        ) from None
    return safetensors


# =========================================================================== save
@dataclass(frozen=True)
class _Entry:
    """One parameter to write: its name prefix and parts (``covariance`` None: the
    means of a deterministic layer, no covariance)."""

    prefix: str
    means: list[tuple[str, Any]]  # insertion order, None entries kept
    covariance: str | None = None
    config: dict[str, Any] | None = None
    structure: Structure | None = None
    storage: dict[str, Any] = field(default_factory=dict)  # path -> array, slot order


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _label(prefix: str) -> str:
    return repr(prefix) if prefix else "the parameter"


def _qualname(value: Any) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _class_of(structure: Structure) -> type[StructuredCovariance]:
    """The registered covariance class whose objects have ``structure``'s type.

    Several classes may share one (``LowRankCovariance`` and ``FactorizedCovariance``
    both hold a ``Factorized``): the most general one, of which the others are
    subclasses, rebuilds the same structure from the structure's own configuration.
    """
    candidates = [c for c in COVARIANCES.values() if c._structure_type is type(structure)]
    general = [c for c in candidates if all(issubclass(o, c) for o in candidates)]
    if not general:
        raise TypeError(
            f"cannot save a covariance with the structure {type(structure).__name__}: no "
            f"registered structcov class holds it (registered: {sorted(COVARIANCES)})"
        )
    return general[0]


def _from_core(param: GaussianParameter, prefix: str) -> _Entry:
    cov = param.cov
    name = type(cov).__name__
    if COVARIANCES.get(name) is not type(cov):
        raise TypeError(
            f"structcov.io can save only the structures {sorted(COVARIANCES)} (rebuilt by "
            f"name when loading); {_label(prefix)} has a {_qualname(cov)}"
        )
    means = list(param.mean.items())
    return _Entry(prefix, means, name, cov._config(), cov.structure, cov.storage())


def _from_torch(module: Any, prefix: str) -> _Entry:
    """A ``structcov.torch.GaussianParameter``: the core class and configuration it was
    built from; failing that, the most general class holding its structure with the
    clamped ranks."""
    structure: Structure = module.cov.structure
    means = [(n, module.mean[n]) for n in module.mean]
    name = getattr(module.cov, "_covariance_class", None)
    if name is not None and COVARIANCES.get(name) is not None:
        config = module.cov._config()
        return _Entry(prefix, means, name, config, structure, module.cov.storage())
    cls = _class_of(structure)
    config = structure.config()
    expected = set(cls._arguments + cls._settings)
    if set(config) != expected:  # pragma: no cover -- a structure/class registry mismatch
        raise TypeError(
            f"cannot save {_label(prefix)}: {type(structure).__name__}.config() has the keys "
            f"{sorted(config)}, {cls.__name__} takes {sorted(expected)}"
        )
    return _Entry(prefix, means, cls.__name__, config, structure, module.cov.storage())


def _from_deterministic(param: Any, prefix: str) -> _Entry:
    """The means of a deterministic layer (``cov`` None), in insertion order."""
    means = [(name, param.mean[name]) for name in param.mean]
    if all(value is None for _, value in means):
        raise ValueError(
            f"cannot save {_label(prefix)} ({_qualname(param)}): every mean is None "
            f"({[name for name, _ in means]}), nothing to save"
        )
    return _Entry(prefix, means)


def _adapter(name: str) -> Any:
    """``structcov.<name>`` if it is imported already (else None: nothing of it exists)."""
    return sys.modules.get(f"structcov.{name}")


def _kind_of(value: Any) -> str | None:
    """``"gaussian"``, ``"deterministic"`` or None (not a structcov parameter).

    Gaussian: a core `GaussianParameter`, a ``structcov.torch.GaussianParameter``
    module, the ``EquinoxGaussian`` / ``NNXGaussian`` wrappers. Deterministic: the
    ``DeterministicParameter`` of ``structcov.torch`` and ``structcov.jax``,
    ``NNXDeterministic``, and a torch ``GaussianParameter`` whose ``cov`` was set to
    None (a layer made deterministic).
    """
    if isinstance(value, GaussianParameter):
        return "gaussian"
    kind = type(value)
    if kind.__module__ == "structcov.jax":
        if kind.__qualname__ in ("EquinoxGaussian", "NNXGaussian"):
            return "gaussian"
        if kind.__qualname__ in ("DeterministicParameter", "NNXDeterministic"):
            return "deterministic"
        return None
    torch_adapter = _adapter("torch")
    if torch_adapter is not None:
        if isinstance(value, torch_adapter.GaussianParameter):
            return "gaussian" if value.cov is not None else "deterministic"
        if isinstance(value, torch_adapter.DeterministicParameter):
            return "deterministic"
    return None


def _is_parameter(value: Any) -> bool:
    return _kind_of(value) is not None


def _core_of(value: Any) -> Any:
    """The object holding ``mean`` and ``cov``: the core parameter of a JAX wrapper,
    else ``value`` itself (core parameters, torch modules, deterministic parameters)."""
    if type(value).__module__ == "structcov.jax" and type(value).__qualname__ in (
        "EquinoxGaussian",
        "NNXGaussian",
        "NNXDeterministic",
    ):
        return value.param
    return value


def _entry(value: Any, prefix: str) -> _Entry:
    core = _core_of(value)
    if _kind_of(value) == "deterministic":
        return _from_deterministic(core, prefix)
    if isinstance(core, GaussianParameter):
        return _from_core(core, prefix)
    return _from_torch(core, prefix)


_WHAT = "structcov parameter (a GaussianParameter, or a structcov layer's DeterministicParameter)"


def _torch_parameters(module: Any, prefix: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """The structcov parameter modules in ``module`` by ``named_modules`` (registration
    order) with their dotted names, and the names of the other tensors."""
    found: list[tuple[str, Any]] = []
    for name, sub in module.named_modules():
        if _is_parameter(sub):
            if any(name == f or name.startswith(f"{f}.") for f, _ in found if f):
                continue  # pragma: no cover -- a parameter module holds no parameter module
            found.append((name, sub))

    def owned(name: str) -> bool:
        return any(name.startswith(f"{f}.") or not f for f, _ in found)

    others = [n for n, _ in module.named_parameters() if not owned(n)]
    others += [n for n, _ in module.named_buffers() if not owned(n)]
    return [(_join(prefix, name), sub) for name, sub in found], others


def _collect_torch(module: Any, prefix: str, out: list[_Entry]) -> None:
    """The structcov parameter modules in ``module``, by ``named_modules``."""
    found, others = _torch_parameters(module, prefix)
    where = f" at {prefix!r}" if prefix else ""
    if others:
        raise TypeError(
            f"structcov.io saves structcov parameters only; the module {_qualname(module)}"
            f"{where} also holds the tensors {others[:10]}, which belong to no {_WHAT} (save "
            "those with safetensors.torch or torch.save)"
        )
    if not found:
        raise TypeError(
            f"the module {_qualname(module)}{where} holds no structcov.torch.GaussianParameter "
            "or DeterministicParameter: nothing to save"
        )
    out.extend(_entry(sub, name) for name, sub in found)


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)  # pragma: no cover -- JAX's key types all have one of the three


def _pytree_parameters(tree: Any, prefix: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """The structcov parameters among a JAX pytree's leaves (pytree order, dotted key
    paths) and the paths of the other array leaves."""
    import jax

    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_parameter)
    found: list[tuple[str, Any]] = []
    stray: list[str] = []
    for path, leaf in leaves:
        name = _join(prefix, ".".join(_key_name(key) for key in path))
        if _is_parameter(leaf):
            found.append((name, leaf))
        elif is_array_api_obj(leaf):
            stray.append(name)
    return found, stray


def _collect_pytree(tree: Any, prefix: str, out: list[_Entry]) -> None:
    found, stray = _pytree_parameters(tree, prefix)
    if stray:
        raise TypeError(
            f"structcov.io saves structcov parameters only; the pytree {_qualname(tree)} also "
            f"holds the arrays {stray[:10]}, which belong to no {_WHAT}"
        )
    if not found:
        raise TypeError(f"the pytree {_qualname(tree)} holds no {_WHAT}")
    out.extend(_entry(leaf, name) for name, leaf in found)


def _nnx_module_type() -> type | None:
    """``flax.nnx.Pytree`` (the base of every NNX module) if flax.nnx is imported."""
    nnx = sys.modules.get("flax.nnx")
    found: type | None = None if nnx is None else nnx.Pytree
    return found


def _nnx_parameters(model: Any, prefix: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """The structcov parameters in an NNX module, in definition order (attribute
    insertion order, list order: as ``named_modules`` of the torch counterpart, not the
    sorted order of NNX's graph), and the paths of the other arrays. A module reached
    twice (shared) counts once."""
    nnx = sys.modules["flax.nnx"]
    found: list[tuple[str, Any]] = []
    stray: list[str] = []
    seen: set[int] = set()

    def walk(node: Any, name: str) -> None:
        if _is_parameter(node):
            if id(node) not in seen:
                seen.add(id(node))
                found.append((name, node))
        elif isinstance(node, nnx.Variable):
            if is_array_api_obj(node.get_value()):
                stray.append(name)
        elif isinstance(node, nnx.Pytree):
            if id(node) in seen:
                return
            seen.add(id(node))
            for key, child in vars(node).items():
                if not key.startswith("_pytree__"):
                    walk(child, _join(name, key))
        elif isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, _join(name, str(key)))
        elif isinstance(node, (list, tuple)):
            for index, child in enumerate(node):
                walk(child, _join(name, str(index)))
        elif is_array_api_obj(node):
            stray.append(name)

    walk(model, prefix)
    return found, stray


def _collect_nnx(model: Any, prefix: str, out: list[_Entry]) -> None:
    found, stray = _nnx_parameters(model, prefix)
    if stray:
        raise TypeError(
            f"structcov.io saves structcov parameters only; the NNX module {_qualname(model)} "
            f"also holds the arrays {stray[:10]}, which belong to no {_WHAT}"
        )
    if not found:
        raise TypeError(f"the NNX module {_qualname(model)} holds no {_WHAT}")
    out.extend(_entry(leaf, name) for name, leaf in found)


def _is_nnx(value: Any) -> bool:
    nnx_type = _nnx_module_type()
    return nnx_type is not None and isinstance(value, nnx_type)


def _is_torch_module(value: Any) -> bool:
    return "torch" in sys.modules and isinstance(value, sys.modules["torch"].nn.Module)


def _collect(value: Any, prefix: str, out: list[_Entry]) -> None:
    if _is_parameter(value):
        out.append(_entry(value, prefix))
    elif _is_nnx(value):
        _collect_nnx(value, prefix, out)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or not key:
                raise TypeError(
                    f"the names of a mapping to save must be non-empty strings, got {key!r}"
                )
            _collect(item, _join(prefix, key), out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _collect(item, _join(prefix, str(index)), out)
    elif _is_torch_module(value):
        _collect_torch(value, prefix, out)
    elif "jax" in sys.modules and _has_jax_leaves(value):
        _collect_pytree(value, prefix, out)
    else:
        raise TypeError(
            "`obj` must be a structcov GaussianParameter (core, structcov.torch module, or "
            "the Equinox/NNX wrappers of structcov.jax), a structcov layer, a "
            "torch.nn.Module, NNX module or JAX pytree of them, or a mapping/list of "
            f"those; got {_qualname(value)}" + (f" at {prefix!r}" if prefix else "")
        )


def _has_jax_leaves(value: Any) -> bool:
    import jax

    leaves = jax.tree_util.tree_leaves(value, is_leaf=_is_parameter)
    return not (len(leaves) == 1 and leaves[0] is value)


def _to_numpy(value: Any, what: str) -> np.ndarray:
    """A C-contiguous NumPy copy (or view) of a backend array, on the host."""
    library = backend_name(namespace(value))
    if library == "torch":
        value = value.detach().cpu().resolve_conj().resolve_neg().numpy()
    elif library == "cupy":
        value = value.get()
    elif library == "dask":
        value = value.compute()
    try:
        array = np.asarray(value)
    except Exception as error:  # a JAX tracer, an array on a device NumPy cannot read
        raise TypeError(
            f"cannot save {what}: its {library} array cannot be copied to NumPy "
            f"({type(error).__name__}: {error})"
        ) from None
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    return array


def _dtype_name(array: np.ndarray, what: str) -> str:
    name = str(array.dtype)
    if name not in _DTYPES:
        raise TypeError(
            f"structcov.io saves float32 and float64 arrays only; {what} has dtype {name}"
        )
    return name


def _encode(entries: list[_Entry], kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors by name and the header of ``entries``."""
    from . import __version__

    tensors: dict[str, np.ndarray] = {}
    records: list[dict[str, Any]] = []
    prefixes: set[str] = set()
    for entry in entries:
        if entry.prefix in prefixes:
            raise ValueError(f"two parameters to save have the same name {entry.prefix!r}")
        prefixes.add(entry.prefix)
        named: dict[str, tuple[str, Any]] = {}
        for name, value in entry.means:
            if value is not None:
                named[_join(entry.prefix, f"mean.{name}")] = (f"mean[{name!r}]", value)
        for path, value in entry.storage.items():
            named[_join(entry.prefix, f"cov.{path}")] = (f"cov storage {path!r}", value)
        dtype = None
        for tensor, (what, value) in named.items():
            where = f"{what} of {_label(entry.prefix)}"
            if tensor in tensors:
                raise ValueError(
                    f"cannot save: the tensor name {tensor!r} of {where} is taken by another "
                    "parameter (rename a mean or a key so that the dotted names differ)"
                )
            array = _to_numpy(value, where)
            name = _dtype_name(array, where)
            if dtype is not None and name != dtype:
                raise TypeError(f"{where} has dtype {name}, the rest {dtype}: cannot save")
            dtype = name
            tensors[tensor] = array
        means = [
            [name, None if value is None else [int(d) for d in value.shape]]
            for name, value in entry.means
        ]
        if entry.structure is None:
            records.append(
                {"prefix": entry.prefix, "kind": "deterministic", "means": means, "dtype": dtype}
            )
            continue
        records.append(
            {
                "prefix": entry.prefix,
                "kind": "gaussian",
                "covariance": entry.covariance,
                "config": entry.config,
                "structure": {
                    "type": type(entry.structure).__name__,
                    "config": entry.structure.config(),
                },
                "means": means,
                "storage": [
                    [path, [int(d) for d in value.shape]] for path, value in entry.storage.items()
                ],
                "num_factor_columns": entry.structure.num_factor_columns,
                "dtype": dtype,
            }
        )
    header = {
        "format": FORMAT_TAG,
        "version": FORMAT_VERSION,
        "structcov_version": __version__,
        "kind": kind,
        "parameters": records,
    }
    return tensors, header


def _write_bytes(handle: IO[bytes], data: bytes) -> None:
    """Write ``data`` to ``handle`` (one seam, so that a crash mid-write can be tested)."""
    handle.write(data)


def _mode_for(path: str) -> int:
    """The permission bits of the file ``path`` after an atomic write: those of the file
    it replaces, else the usual default (0o666 less the umask)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    mode = _mode_for(path)
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            _write_bytes(handle, data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    # Make the rename itself durable (not possible on every platform / file system).
    with contextlib.suppress(OSError):
        directory_descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_descriptor)
        finally:
            os.close(directory_descriptor)


def save(file: PathLike, obj: Any) -> None:
    """Write structcov parameters and layers of any backend to a safetensors file, atomically.

    Parameters
    ----------
    file
        A path (``str`` or ``os.PathLike``); ``.safetensors`` is the usual suffix (none
        is added). An existing file is replaced only once the new one is complete.
    obj
        A core `structcov.GaussianParameter` (NumPy, torch, JAX, CuPy,
        array_api_strict or dask arrays; dask is computed); a
        ``structcov.torch.GaussianParameter`` or ``DeterministicParameter`` module, or a
        ``torch.nn.Module`` holding such modules (a model of ``structcov.torch`` layers:
        ``Linear``, ``Conv1d``-``Conv3d``, ``Sequential``, with or without covariance);
        the Equinox / NNX wrappers and layers of `structcov.jax`; a JAX pytree or NNX
        module of those or of core parameters; or a mapping name -> any of those (or a
        list). A single parameter is saved with no prefix and `load` returns it;
        anything else is a collection, each parameter under its dotted name (mapping
        keys, ``named_modules`` names, pytree key paths, NNX attribute paths in
        definition order), and `load` returns a dict. The means of a deterministic
        layer (``cov=None``) are a ``"deterministic"`` record.

    Raises
    ------
    TypeError
        For an object that holds no structcov parameter, a collection that also holds
        arrays of no structcov parameter (an ``nn.BatchNorm``'s tensors), a covariance
        class outside structcov's registry, or a dtype other than float32/float64.
    ValueError
        For two parameters or tensors with the same dotted name, or a deterministic
        parameter whose means are all ``None``.

    Notes
    -----
    A ``structcov.torch.GaussianParameter`` built from a core covariance keeps its class
    and requested ranks; one without that record is saved under the most general class
    holding its frozen structure (``LowRankCovariance`` -> ``FactorizedCovariance``,
    same maths and storage) with its clamped ranks.
    """
    safetensors = _safetensors()
    if not isinstance(file, (str, os.PathLike)):
        raise TypeError(f"`file` must be a path (str or os.PathLike), got {_qualname(file)}")
    path = os.fspath(file)
    entries: list[_Entry] = []
    _collect(obj, "", entries)
    single = len(entries) == 1 and entries[0].prefix == "" and _is_parameter(obj)
    tensors, header = _encode(entries, "parameter" if single else "collection")
    data = safetensors.numpy.save(tensors, metadata={METADATA_KEY: json.dumps(header)})
    _atomic_write(path, data)


# =========================================================================== load
class _Invalid(ValueError):
    """A structcov file whose header or tensors are wrong; ``detail`` says what."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class _NotOurs(ValueError):
    """A file that is not a readable structcov safetensors file; ``detail`` says why."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class _Record:
    """One parameter of the header, checked for types."""

    prefix: str
    covariance: type[StructuredCovariance]
    arguments: dict[str, Any]
    settings: dict[str, Any]
    structure_type: str
    structure_config: dict[str, Any]
    means: list[tuple[str, tuple[int, ...] | None]]
    storage: list[tuple[str, tuple[int, ...]]]
    num_factor_columns: int
    dtype: str

    @property
    def label(self) -> str:
        return f"parameter {self.prefix!r}" if self.prefix else "the parameter"

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, means first, as `save` names them."""
        out = {
            _join(self.prefix, f"mean.{name}"): shape
            for name, shape in self.means
            if shape is not None
        }
        out.update({_join(self.prefix, f"cov.{path}"): shape for path, shape in self.storage})
        return out


@dataclass(frozen=True)
class _DeterministicRecord:
    """The means of a deterministic layer (a ``"deterministic"`` record), checked."""

    prefix: str
    means: list[tuple[str, tuple[int, ...] | None]]
    dtype: str

    @property
    def label(self) -> str:
        return f"parameter {self.prefix!r}" if self.prefix else "the parameter"

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, as `save` names them."""
        return {
            _join(self.prefix, f"mean.{name}"): shape
            for name, shape in self.means
            if shape is not None
        }


_AnyRecord = _Record | _DeterministicRecord


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(d) is int and d >= 0 for d in value):
        raise _Invalid(f"{what} must be a list of non-negative ints, got {value!r}")
    return tuple(value)


def _pairs(value: Any, what: str) -> list[tuple[str, Any]]:
    if not isinstance(value, list) or not all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in value
    ):
        raise _Invalid(f"{what} must be a list of [name, shape] pairs, got {value!r}")
    names = [p[0] for p in value]
    if len(set(names)) != len(names):
        raise _Invalid(f"{what} repeats a name: {names}")
    return [(p[0], p[1]) for p in value]


def _fields(value: Any, fields: tuple[str, ...], what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != set(fields):
        got = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise _Invalid(f"{what} must be an object with the fields {sorted(fields)}, got {got}")
    return value


def _means(value: Any, what: str) -> list[tuple[str, tuple[int, ...] | None]]:
    means = [
        (mean, None if shape is None else _shape(shape, f"{what}: the shape of mean {mean!r}"))
        for mean, shape in _pairs(value, f"{what}: 'means'")
    ]
    if not any(shape is not None for _, shape in means):
        raise _Invalid(f"{what}: 'means' must name at least one mean with a shape, got {means}")
    return means


def _dtype_field(value: Any, what: str) -> str:
    if value not in _DTYPES:
        raise _Invalid(f"{what}: 'dtype' must be one of {list(_DTYPES)}, got {value!r}")
    return str(value)


def _record(value: Any, index: int, version: int) -> _AnyRecord:
    what = f"header parameter {index}"
    expected: tuple[str, ...] = _PARAMETER_FIELDS
    if version >= 3:
        kind = value.get("kind") if isinstance(value, dict) else None
        if kind not in _RECORD_KINDS:
            raise _Invalid(
                f"{what}: 'kind' must be one of {list(_RECORD_KINDS)} (a version {version} "
                f"record), got {kind!r}"
            )
        if kind == "deterministic":
            fields = _fields(value, _DETERMINISTIC_FIELDS, what)
            prefix = fields["prefix"]
            if not isinstance(prefix, str):
                raise _Invalid(f"{what}: 'prefix' must be a string, got {prefix!r}")
            what = f"header parameter {prefix!r}" if prefix else "header parameter"
            means = _means(fields["means"], what)
            return _DeterministicRecord(prefix, means, _dtype_field(fields["dtype"], what))
        expected = (*_PARAMETER_FIELDS, "kind")
    fields = _fields(value, expected, what)
    prefix = fields["prefix"]
    if not isinstance(prefix, str):
        raise _Invalid(f"{what}: 'prefix' must be a string, got {prefix!r}")
    what = f"header parameter {prefix!r}" if prefix else "header parameter"
    name = fields["covariance"]
    if not isinstance(name, str) or name not in COVARIANCES:
        raise _Invalid(
            f"{what}: unknown covariance {name!r}; this structcov knows {sorted(COVARIANCES)}"
        )
    cls = COVARIANCES[name]
    config = fields["config"]
    expected = cls._arguments + cls._settings
    structure = fields["structure"]
    if version == 1 and "scale_transform" in expected:
        # Version 1 stored raw scales, before the argument existed.
        config = {**config, "scale_transform": "identity"} if isinstance(config, dict) else config
        if isinstance(structure, dict) and isinstance(structure.get("config"), dict):
            structure = {
                **structure,
                "config": {**structure["config"], "scale_transform": "identity"},
            }
    if not isinstance(config, dict) or set(config) != set(expected):
        raise _Invalid(
            f"{what}: 'config' of {name} must have the keys {list(expected)}, got {config!r}"
        )
    for key in cls._arguments:
        if key == "scale_transform":
            if config[key] not in SCALE_TRANSFORMS:
                raise _Invalid(
                    f"{what}: {name} argument 'scale_transform' must be one of "
                    f"{list(SCALE_TRANSFORMS)}, got {config[key]!r}"
                )
        elif config[key] is not None and type(config[key]) is not int:
            raise _Invalid(
                f"{what}: {name} argument {key!r} must be an int or null, got {config[key]!r}"
            )
    for key in cls._settings:
        if type(config[key]) not in (int, float):
            raise _Invalid(f"{what}: {name} setting {key!r} must be a number, got {config[key]!r}")
    structure = _fields(structure, ("type", "config"), f"{what}: 'structure'")
    if structure["type"] != cls._structure_type.__name__ or not isinstance(
        structure["config"], dict
    ):
        raise _Invalid(
            f"{what}: 'structure' of {name} must be a {cls._structure_type.__name__} with a "
            f"config object, got {structure!r}"
        )
    means = _means(fields["means"], what)
    storage = [
        (path, _shape(shape, f"{what}: the shape of storage {path!r}"))
        for path, shape in _pairs(fields["storage"], f"{what}: 'storage'")
    ]
    columns = fields["num_factor_columns"]
    if type(columns) is not int:
        raise _Invalid(f"{what}: 'num_factor_columns' must be an int, got {columns!r}")
    dtype = _dtype_field(fields["dtype"], what)
    return _Record(
        prefix=prefix,
        covariance=cls,
        arguments={key: config[key] for key in cls._arguments},
        settings={key: config[key] for key in cls._settings},
        structure_type=structure["type"],
        structure_config=structure["config"],
        means=means,
        storage=storage,
        num_factor_columns=columns,
        dtype=dtype,
    )


def _parse(text: str) -> tuple[str, list[_AnyRecord]]:
    """The header's kind and records; `_NotOurs` for another format, `_Invalid` else."""
    try:
        header = json.loads(text)
    except json.JSONDecodeError as error:
        raise _Invalid(f"the {METADATA_KEY!r} metadata entry is not valid JSON ({error})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_TAG:
        tag = header.get("format") if isinstance(header, dict) else None
        raise _NotOurs(
            f"its {METADATA_KEY!r} metadata entry carries the format tag {tag!r}, expected "
            f"{FORMAT_TAG!r}: it was not written by structcov.io"
        )
    version = header.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        newer = type(version) is int and version > FORMAT_VERSION
        raise _Invalid(
            f"unknown format version {version!r}: this structcov reads versions "
            f"{list(READABLE_VERSIONS)}"
            + (" (the file was written by a newer structcov)" if newer else "")
        )
    _fields(header, _TOP_FIELDS, f"the {METADATA_KEY!r} header")
    kind = header["kind"]
    if kind not in ("parameter", "collection"):
        raise _Invalid(f"header 'kind' must be 'parameter' or 'collection', got {kind!r}")
    parameters = header["parameters"]
    if not isinstance(parameters, list) or not parameters:
        raise _Invalid(f"header 'parameters' must be a non-empty list, got {parameters!r}")
    records = [_record(value, index, version) for index, value in enumerate(parameters)]
    prefixes = [record.prefix for record in records]
    if len(set(prefixes)) != len(prefixes):
        raise _Invalid(f"header 'parameters' repeats a prefix: {prefixes}")
    if kind == "parameter" and prefixes != [""]:
        raise _Invalid(f"a 'parameter' header has one parameter with prefix '', got {prefixes}")
    if kind == "collection" and "" in prefixes:
        raise _Invalid("a 'collection' header names every parameter (a prefix '' was found)")
    return kind, records


def _check_tensors(records: list[_AnyRecord], handle: Any) -> None:
    """The file holds exactly the header's tensors, each of the header's shape and dtype."""
    expected: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for record in records:
        for tensor, shape in record.tensors().items():
            if tensor in expected:
                raise _Invalid(f"header names the tensor {tensor!r} twice")
            expected[tensor] = (shape, record.dtype, record.label)
    keys = list(handle.keys())
    missing = [k for k in expected if k not in keys]
    extra = [k for k in keys if k not in expected]
    if missing or extra:
        parts = ([f"missing tensors {missing}"] if missing else []) + (
            [f"unexpected tensors {extra}"] if extra else []
        )
        raise _Invalid(f"{' and '.join(parts)} (the header describes {list(expected)})")
    for tensor, (shape, dtype, label) in expected.items():
        found = handle.get_slice(tensor)
        got_shape, got_dtype = tuple(found.get_shape()), found.get_dtype()
        if got_shape != shape:
            raise _Invalid(
                f"tensor {tensor!r} of {label} has shape {got_shape}, the header says {shape}"
            )
        if got_dtype != _SAFETENSORS_DTYPES[dtype]:
            raise _Invalid(
                f"tensor {tensor!r} of {label} has dtype {got_dtype}, the header says {dtype}"
            )


def _converter(like: str, device: Any, dtypes: set[str]) -> Callable[[np.ndarray], Any]:
    """NumPy array -> array of ``like`` on ``device`` (dtype kept, values bit for bit)."""
    if like == "numpy":
        if device not in (None, "cpu"):
            raise ValueError(f'`device` must be None or "cpu" for like="numpy", got {device!r}')
        return lambda array: array
    if like == "torch":
        import torch

        target = None if device is None else torch.device(device)
        return lambda array: torch.from_numpy(array).to(device=target)
    if like == "jax":
        import jax
        import jax.numpy as jnp

        from . import jax as _registers_pytrees  # noqa: F401 -- loaded parameters are pytrees

        x64: Any = jax.config.read  # untyped in jax's stubs
        if "float64" in dtypes and not x64("jax_enable_x64"):
            raise _Invalid(
                "it holds float64 arrays and JAX's 64-bit mode is off, so JAX would turn them "
                "into float32: set JAX_ENABLE_X64=1 (or jax.config.update('jax_enable_x64', "
                "True)) before loading"
            )

        def to_jax(array: np.ndarray) -> Any:
            value = jnp.asarray(array, dtype=array.dtype)
            return value if device is None else jax.device_put(value, device)

        return to_jax
    if like == "cupy":
        try:
            import cupy
        except ImportError:
            raise ImportError(
                'like="cupy" needs CuPy, which is not installed (pip install structcov[cupy] '
                "on a machine with a CUDA device)"
            ) from None

        def to_cupy(array: np.ndarray) -> Any:
            if device is None:
                return cupy.asarray(array)
            with cupy.cuda.Device(device):
                return cupy.asarray(array)

        return to_cupy
    import array_api_strict

    if device is None:
        return lambda array: array_api_strict.asarray(array)
    return lambda array: array_api_strict.asarray(array, device=device)


def _rebuild(record: _AnyRecord, arrays: dict[str, Any], module: bool) -> Any:
    """Rebuild one parameter through the registry and check it against the header.

    A deterministic record gives its means, a dict name -> array (``None`` kept, in
    order), or with ``module`` a ``structcov.torch.DeterministicParameter``.
    """
    mean = {
        name: None if shape is None else arrays[_join(record.prefix, f"mean.{name}")]
        for name, shape in record.means
    }
    if isinstance(record, _DeterministicRecord):
        if module:
            from .torch import DeterministicParameter as TorchDeterministic

            return TorchDeterministic(mean)
        return mean
    cls = record.covariance
    storage = {path: arrays[_join(record.prefix, f"cov.{path}")] for path, _ in record.storage}
    try:
        cov = cls(**record.arguments)
        for key, value in record.settings.items():
            setattr(cov, key, value)
        if module:
            from .torch import GaussianParameter as TorchGaussian

            param: Any = TorchGaussian(mean, cov)
            rebuilt = param.cov
        else:
            param = GaussianParameter(mean, cov)
            rebuilt = cov
    except (TypeError, ValueError) as error:
        raise _Invalid(
            f"{record.label}: the header does not describe a valid {cls.__name__}: {error}"
        ) from None
    structure: Structure = rebuilt.structure
    layout = structure.layout
    header_layout = [(name, shape) for name, shape in record.means if shape is not None]
    rebuilt_storage = [(slot.path, slot.shape) for slot in structure.slots]
    mismatches = []
    if type(structure).__name__ != record.structure_type:  # pragma: no cover -- class checked
        mismatches.append(f"structure {type(structure).__name__} != {record.structure_type}")
    if structure.config() != record.structure_config:
        mismatches.append(
            f"structure config {structure.config()} != header {record.structure_config}"
        )
    if list(zip(layout.names, layout.shapes, strict=True)) != header_layout:
        mismatches.append(  # pragma: no cover -- the means are the header's
            f"layout {list(zip(layout.names, layout.shapes, strict=True))} != {header_layout}"
        )
    if rebuilt_storage != record.storage:
        mismatches.append(f"storage {rebuilt_storage} != header {record.storage}")
    if structure.num_factor_columns != record.num_factor_columns:
        mismatches.append(
            f"K = {structure.num_factor_columns} != header {record.num_factor_columns}"
        )
    if mismatches:
        raise _Invalid(
            f"{record.label}: a {cls.__name__} with {record.arguments | record.settings} over "
            f"these means does not match the header: {'; '.join(mismatches)}"
        )
    rebuilt.load_storage(storage)
    return param


def _check_like(like: Any, module: bool) -> None:
    if like not in LIKE:
        raise ValueError(f"`like` must be one of {list(LIKE)}, got {like!r}")
    if module and like != "torch":
        raise ValueError(
            f'`module=True` gives structcov.torch modules and needs like="torch", got {like!r}'
        )


def _read(
    file: Any, like: str, device: Any, module: bool
) -> tuple[str, str, list[_AnyRecord], dict[str, Any], dict[str, Any]]:
    """``(path, kind, records, {tensor: array}, {prefix: rebuilt})`` of a structcov
    file, checked (the rebuild validates every record)."""
    safetensors = _safetensors()
    if not isinstance(file, (str, os.PathLike)):
        raise TypeError(f"`file` must be a path (str or os.PathLike), got {_qualname(file)}")
    path = os.fspath(file)
    if not os.path.isfile(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such structcov file: {path!r}")
        raise ValueError(f"not a structcov safetensors file: {path}: it is not a regular file")
    try:
        handle = safetensors.safe_open(path, framework="numpy")
    except Exception as error:  # SafetensorError, OSError: truncated, corrupt, unreadable
        raise ValueError(
            f"not a structcov safetensors file: {path}: it cannot be read as safetensors, or is "
            f"truncated or corrupt ({type(error).__name__}: {error})"
        ) from None
    try:
        with handle:
            metadata = handle.metadata() or {}
            if METADATA_KEY not in metadata:
                raise _NotOurs(
                    f"it is a safetensors file without structcov's {METADATA_KEY!r} metadata "
                    f"entry, so it was not written by structcov.io (metadata keys: "
                    f"{sorted(metadata)[:10]}, tensors: {list(handle.keys())[:10]})"
                )
            kind, records = _parse(metadata[METADATA_KEY])
            _check_tensors(records, handle)
            convert = _converter(like, device, {record.dtype for record in records})
            arrays = {
                tensor: convert(handle.get_tensor(tensor))
                for record in records
                for tensor in record.tensors()
            }
    except _NotOurs as error:
        raise ValueError(f"not a structcov safetensors file: {path}: {error.detail}") from None
    except _Invalid as error:
        raise ValueError(f"invalid structcov safetensors file: {path}: {error.detail}") from None
    try:
        params = {record.prefix: _rebuild(record, arrays, module) for record in records}
    except _Invalid as error:
        raise ValueError(f"invalid structcov safetensors file: {path}: {error.detail}") from None
    return path, kind, records, arrays, params


def load(file: PathLike, *, like: str = "numpy", device: Any = None, module: bool = False) -> Any:
    """Read the parameters written by `save` into the backend ``like``.

    Nothing in the file is executed: the covariance classes are looked up by name in
    structcov's registry and rebuilt through their constructors,
    ``GaussianParameter(mean, cov)`` and ``cov.load_storage``; the rebuilt structure
    must equal the header's. Values are bit for bit those saved, in the saved dtype.
    To fill an existing model (a torch model's checkpoint into its Equinox or NNX
    counterpart), use `load_into`.

    Parameters
    ----------
    file
        A path (``str`` or ``os.PathLike``).
    like
        The backend of the arrays: ``"numpy"`` (default), ``"torch"``, ``"jax"``,
        ``"cupy"`` or ``"array_api_strict"``. For ``"jax"``, a float64 file needs JAX's
        64-bit mode (``JAX_ENABLE_X64=1``): without it the load raises rather than
        silently downcasting; ``structcov.jax`` is imported, so the results are pytrees.
    device
        Where the arrays go: ``None`` (the backend's default), a ``torch.device`` or
        string for torch, a ``jax.Device`` for JAX (``jax.device_put``), a device id for
        CuPy, an ``array_api_strict`` device; only ``None`` / ``"cpu"`` for NumPy.
    module
        ``like="torch"`` only: return ``structcov.torch.GaussianParameter`` modules
        (``nn.Parameter`` s, ready to train) instead of core parameters of tensors, and
        ``structcov.torch.DeterministicParameter`` modules for deterministic records.

    Returns
    -------
    GaussianParameter, dict
        The parameter, for a file holding one saved on its own; else a dict dotted
        name -> parameter, in the saved order (the names of `save`). A deterministic
        layer's record (version 3) comes back as its means, a dict name -> array
        (``None`` entries kept, in order) — or a ``structcov.torch.DeterministicParameter``
        with ``module=True``: the core has no deterministic parameter class.

    Raises
    ------
    ValueError
        Naming the file: "not a structcov safetensors file: <file>: ..." for a file
        safetensors cannot read (truncated, corrupt, not safetensors) or one without
        structcov's metadata entry (another writer's safetensors file);
        "invalid structcov safetensors file: <file>: ..." for structcov's entry with bad
        JSON, an unknown format version, wrong fields, missing or unexpected tensors, a
        shape or dtype that differs from the header, or a header that does not describe
        the structure it names (e.g. ranks that do not fit the shapes).
    FileNotFoundError
        When ``file`` does not exist.
    """
    _check_like(like, module)
    _, kind, _, _, params = _read(file, like, device, module)
    return params[""] if kind == "parameter" else params


# ====================================================================== load_into
@dataclass(frozen=True)
class _Target:
    """One structcov parameter of the model `load_into` fills, and its description."""

    prefix: str
    value: Any  # the parameter as found (module, wrapper, core object)
    kind: str  # "gaussian" or "deterministic"
    means: list[tuple[str, Any]]  # name -> array or None, insertion order
    storage: dict[str, Any]  # path -> array, slot order ({} when deterministic)
    structure: Structure | None

    @property
    def label(self) -> str:
        return repr(self.prefix) if self.prefix else "(the model itself)"


def _target(prefix: str, value: Any) -> _Target:
    kind = _kind_of(value)
    core = _core_of(value)
    means = [(name, core.mean[name]) for name in core.mean]
    if kind == "deterministic":
        return _Target(prefix, value, "deterministic", means, {}, None)
    return _Target(prefix, value, "gaussian", means, core.cov.storage(), core.cov.structure)


def _dtype_of(array: Any) -> str:
    """``"float32"`` of any backend's float32 array (``torch.float32``, ...)."""
    return str(array.dtype).rsplit(".", 1)[-1]


def _shape_of(array: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in array.shape)


def _describe_structure(structure_type: str, config: dict[str, Any]) -> str:
    return f"{structure_type} {config}"


def _mismatch(record: _AnyRecord, target: _Target) -> str | None:
    """What differs between a file record and a model parameter (None: they match)."""
    if isinstance(record, _DeterministicRecord) != (target.kind == "deterministic"):
        file_kind = "deterministic" if isinstance(record, _DeterministicRecord) else "Gaussian"
        model_kind = "deterministic" if target.kind == "deterministic" else "Gaussian"
        return f"the file's is {file_kind}, the model's {model_kind}"
    if isinstance(record, _Record) and target.structure is not None:
        structure = target.structure
        if (
            type(structure).__name__ != record.structure_type
            or structure.config() != record.structure_config
        ):
            return (
                "structure "
                f"{_describe_structure(record.structure_type, record.structure_config)} in the "
                "file, "
                f"{_describe_structure(type(structure).__name__, structure.config())} in the "
                "model"
            )
    model_means = [(n, None if v is None else _shape_of(v)) for n, v in target.means]
    if model_means != record.means:
        return f"means {record.means} in the file, {model_means} in the model"
    if isinstance(record, _Record):
        model_storage = [(path, _shape_of(v)) for path, v in target.storage.items()]
        if model_storage != record.storage:
            return f"storage {record.storage} in the file, {model_storage} in the model"
    arrays = [v for _, v in target.means if v is not None] + list(target.storage.values())
    dtypes = sorted({_dtype_of(v) for v in arrays})
    if dtypes != [record.dtype]:
        return f"dtype {record.dtype} in the file, {', '.join(dtypes)} in the model"
    return None


def _like_target(array: np.ndarray, target: Any) -> Any:
    """``array`` (NumPy) as an array of ``target``'s backend, device and dtype."""
    library = backend_name(namespace(target))
    if library == "torch":
        import torch

        return torch.from_numpy(array).to(device=target.device)
    if library == "jax":
        import jax

        sharding = getattr(target, "sharding", None)
        if sharding is None:  # pragma: no cover -- a concrete jax.Array has one
            return jax.numpy.asarray(array, dtype=array.dtype)
        return jax.device_put(array, sharding)
    if library == "cupy":  # pragma: no cover -- needs a CUDA device
        import cupy

        with target.device:
            return cupy.asarray(array)
    if library == "dask":
        import dask.array

        from_array: Any = dask.array.from_array
        return from_array(array, chunks=target.chunks)
    if library == "numpy":
        return array
    xp = namespace(target)
    return xp.asarray(array, device=target.device)


def _new_values(
    record: _AnyRecord, target: _Target, arrays: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The record's means (None kept) and storage as arrays like the target's."""
    means = {
        name: None
        if value is None
        else _like_target(arrays[_join(record.prefix, f"mean.{name}")], value)
        for name, value in target.means
    }
    storage = {
        path: _like_target(arrays[_join(record.prefix, f"cov.{path}")], value)
        for path, value in target.storage.items()
    }
    return means, storage


def _fill(target: _Target, means: dict[str, Any], storage: dict[str, Any]) -> Any:
    """The parameter over the new arrays: a torch parameter module or an NNX wrapper
    filled in place (returned), else a new one (`_replaced`)."""
    value = target.value
    if not (_is_torch_module(value) or _is_nnx(value)):
        return _replaced(target, means, storage)
    if _is_torch_module(value):
        import torch

        with torch.no_grad():
            for name, new in means.items():
                if new is not None:
                    value.mean[name].copy_(new)
            for path, old in target.storage.items():
                old.copy_(storage[path])
        return value
    for name, new in means.items():  # NNXGaussian / NNXDeterministic: nnx.Param s
        if new is not None:
            value.mean[name].set_value(new)
    for path, new in storage.items():
        value.cov[path].set_value(new)
    return value


def _replaced(target: _Target, means: dict[str, Any], storage: dict[str, Any]) -> Any:
    """A new parameter like ``target.value`` (its classes and configuration) over the
    new arrays: core parameters, JAX ``DeterministicParameter`` s, Equinox wrappers."""
    value = target.value
    core = _core_of(value)
    if target.kind == "deterministic":
        rebuilt: Any = type(core)(means)
    else:
        cov = core.cov
        fresh = type(cov)._from_parts(cov._config(), cov.structure, {})
        fresh.load_storage(storage)
        rebuilt = type(core)._rebuild(means, fresh)
    return rebuilt if core is value else type(value)(rebuilt)


def _targets(value: Any, prefix: str) -> tuple[list[tuple[str, Any]], Callable[[Any], Any]]:
    """The structcov parameters in ``value`` with their dotted names, in the order of
    `save`, and a function that gives the model back from an iterator of the new
    parameters: ``value`` itself for a torch or NNX module (filled in place), else a
    rebuilt core parameter / mapping / list / JAX pytree."""
    if _is_parameter(value):
        return [(prefix, value)], next
    if _is_torch_module(value) or _is_nnx(value):  # filled in place (`_fill`)
        finder = _torch_parameters if _is_torch_module(value) else _nnx_parameters
        found_in_place = finder(value, prefix)[0]

        def same(new: Any) -> Any:
            for _ in found_in_place:
                next(new)
            return value

        return found_in_place, same
    if isinstance(value, Mapping):
        parts = [(key, _targets(item, _join(prefix, str(key)))) for key, item in value.items()]

        def rebuild_mapping(new: Any) -> Any:
            items = {key: build(new) for key, (_, build) in parts}
            kind: Any = type(value)
            return items if kind is dict else kind(items)

        return [t for _, (found, _) in parts for t in found], rebuild_mapping
    if isinstance(value, (list, tuple)):
        members = [_targets(item, _join(prefix, str(index))) for index, item in enumerate(value)]

        def rebuild_sequence(new: Any) -> Any:
            items = [build(new) for _, build in members]
            if hasattr(value, "_make"):  # a namedtuple
                return value._make(items)
            return type(value)(items)

        return [t for found, _ in members for t in found], rebuild_sequence
    if "jax" in sys.modules and _has_jax_leaves(value):
        import jax

        leaves, treedef = jax.tree_util.tree_flatten(value, is_leaf=_is_parameter)
        found, _ = _pytree_parameters(value, prefix)

        def rebuild_pytree(new: Any) -> Any:
            fresh = [next(new) if _is_parameter(leaf) else leaf for leaf in leaves]
            return jax.tree_util.tree_unflatten(treedef, fresh)

        return found, rebuild_pytree
    return [], lambda new: value


def load_into(file: PathLike, model: Any) -> Any:
    """Fill ``model``'s structcov parameters with those of a file written by `save`.

    The i-th parameter in the file goes into the i-th structcov parameter of
    ``model`` (matched by position, in traversal order: ``named_modules`` for torch,
    attribute definition order for NNX, pytree order for Equinox and other pytrees,
    insertion order for mappings and lists: the order `save` writes), so a torch model
    of ``structcov.torch`` layers loads into its Equinox or Flax NNX counterpart (and
    back), whatever each side calls its layers. Each pair must agree on kind (Gaussian
    or deterministic), structure (type and configuration: clamped ranks,
    ``sample_scale``, ``scale_transform``), mean names and shapes (``None`` entries
    included), storage paths and shapes, and dtype. Every array is converted to the
    backend, device and dtype of the model's array it replaces; values are bit for bit
    those saved. Arrays of the model that belong to no structcov parameter (an
    ``nn.BatchNorm``'s) are left as they are. Nothing changes unless every pair matches.

    Parameters
    ----------
    file
        A path (``str`` or ``os.PathLike``) of a structcov file (any readable version).
    model
        A ``torch.nn.Module`` holding ``structcov.torch`` parameters (layers,
        ``Sequential``, ``GaussianParameter`` modules): updated in place, on its own
        device. A Flax NNX module (``NNXSequential``, ``NNXLinear``, ``NNXGaussian``,
        ...): updated in place. Anything else — an Equinox module (``EquinoxSequential``,
        ``EquinoxGaussian``), a JAX pytree, a core `structcov.GaussianParameter` of any
        backend, a mapping or list of them — is left unchanged and a new one returned.

    Returns
    -------
    object
        ``model`` itself (torch, NNX), or the new model with every parameter replaced
        (Equinox, pytrees, core parameters), of the same classes and configuration.

    Raises
    ------
    ValueError
        For a bad file (as `load`), a different number of parameters in the file and
        the model, or a pair that does not match: "cannot load <file> into <model>:
        parameter <i> differs: <prefix in the file> in the file, <prefix in the model> in
        the model: ..." says what differs.
    TypeError
        For a ``model`` that holds no structcov parameter.
    """
    path, _, records, arrays, _ = _read(file, "numpy", None, False)
    name = _qualname(model)
    found, rebuild = _targets(model, "")
    if not found:
        raise TypeError(
            f"`model` ({name}) holds no {_WHAT}: load_into needs a torch.nn.Module, NNX "
            "module, Equinox module or pytree of structcov parameters or layers"
        )
    targets = [_target(prefix, value) for prefix, value in found]
    if len(targets) != len(records):
        raise ValueError(
            f"cannot load {path} into {name}: the file holds {len(records)} parameters "
            f"({[r.prefix for r in records]}), the model {len(targets)} "
            f"({[t.prefix for t in targets]})"
        )
    for index, (record, target) in enumerate(zip(records, targets, strict=True)):
        problem = _mismatch(record, target)
        if problem is not None:
            raise ValueError(
                f"cannot load {path} into {name}: parameter {index} differs: "
                f"{record.prefix!r} in the file, {target.label} in the model: {problem}"
            )
    values = [_new_values(r, t, arrays) for r, t in zip(records, targets, strict=True)]
    new = [_fill(target, *value) for target, value in zip(targets, values, strict=True)]
    return rebuild(iter(new))
