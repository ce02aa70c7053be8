"""Run every ```python block of README.md and docs/*.md.

The blocks of one file run in order in one namespace, so later blocks may use
names defined by earlier ones. A block whose first line is ``# requires: a, b``
runs only where each requirement is met (see ``REQUIREMENTS``); otherwise it is
skipped, and the file's test reports the skipped blocks with their reasons after
running the rest. Blocks without that line must run with the test extra alone
(NumPy, array_api_strict). A block that needs a skipped block's names must carry
the same requirement.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_REQUIRES = re.compile(r"#\s*requires:\s*(.+)")


def _installed(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    return None


def _cupy_device() -> str | None:
    missing = _installed("cupy")
    if missing:
        return missing
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # any CUDA failure means "no device"
        return f"no CUDA device available to CuPy ({type(error).__name__})"
    return None if count > 0 else "no CUDA device available to CuPy"


def _torch_cuda() -> str | None:
    missing = _installed("torch")
    if missing:
        return missing
    import torch

    return None if torch.cuda.is_available() else "torch has no CUDA device"


#: requirement name -> check returning None when met, else the reason it is not.
REQUIREMENTS: dict[str, Callable[[], str | None]] = {
    "numpy": lambda: _installed("numpy"),
    "array_api_strict": lambda: _installed("array_api_strict"),
    "torch": lambda: _installed("torch"),
    "jax": lambda: _installed("jax"),
    "optax": lambda: _installed("optax"),
    "equinox": lambda: _installed("equinox"),
    "flax": lambda: _installed("flax"),
    "dask": lambda: _installed("dask"),
    "cupy": _cupy_device,
    "torch-cuda": _torch_cuda,
}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the block's first code line
    code: str
    requires: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The ```python blocks of ``path``, in order."""
    text = path.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        code = match.group(1)
        line = text.count("\n", 0, match.start(1)) + 1
        first = code.lstrip().splitlines()[0] if code.strip() else ""
        requires = _REQUIRES.fullmatch(first.strip())
        names = tuple(n.strip() for n in requires.group(1).split(",")) if requires else ()
        found.append(Block(path, line, code, names))
    return found


def _unmet(block: Block) -> str | None:
    for name in block.requires:
        if name not in REQUIREMENTS:
            raise ValueError(
                f"{block.where}: unknown requirement {name!r}; known: {sorted(REQUIREMENTS)}"
            )
        reason = REQUIREMENTS[name]()
        if reason:
            return reason
    return None


#: the files that have python blocks (api.md has none: it is all mkdocstrings)
DOC_FILES = [path for path in FILES if blocks(path)]


def test_the_pages_with_examples_are_found() -> None:
    found = {str(path.relative_to(ROOT)) for path in DOC_FILES}
    expected = {"README.md", "docs/index.md", "docs/concepts.md", "docs/backends.md"}
    assert expected <= found


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_code_blocks(path: Path) -> None:
    found = blocks(path)
    namespace: dict[str, Any] = {"__name__": f"docs_{path.stem}"}
    skipped = []
    for block in found:
        reason = _unmet(block)
        if reason:
            skipped.append(f"{block.where} ({reason})")
            continue
        # Pad with newlines so that tracebacks point at the markdown line.
        source = "\n" * (block.line - 1) + block.code
        exec(compile(source, str(block.path), "exec"), namespace)
    if skipped:
        ran = len(found) - len(skipped)
        pytest.skip(f"ran {ran} of {len(found)} blocks; skipped {'; '.join(skipped)}")
