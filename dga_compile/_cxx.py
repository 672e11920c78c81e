"""Building the native libraries from ``csrc/`` (the ONNX Runtime op, the PyTorch extension).

Both are plain compiler calls at set-up time: each rebuilds only when a source is newer than
the library, and builds into a temp dir first, so a failed build never leaves a broken library.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Iterable, Iterator

from . import _tools
from .errors import NativeBuildError

__all__ = ["REPO", "CSRC", "CXXFLAGS", "run", "compiler", "up_to_date", "staged"]

REPO = pathlib.Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
CXXFLAGS = ["-O3", "-march=native", "-fPIC", "-fvisibility=hidden", "-Wall", f"-I{CSRC / 'core'}"]


def run(cmd: list[str], what: str, cwd=None) -> None:
    """Runs ``cmd``; on failure raises `NativeBuildError` with ``what`` and the output's tail."""
    _tools.run(cmd, what, NativeBuildError, cwd)


def compiler() -> str:
    """``$CXX``, else g++ or c++ on PATH."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise NativeBuildError("no C++ compiler found (g++/c++); install one or set CXX")
    return cxx


def up_to_date(library: pathlib.Path, source_dirs: Iterable[pathlib.Path]) -> bool:
    """Whether ``library`` exists and is newer than every file in ``source_dirs``."""
    sources = [p for d in source_dirs for p in d.glob("*")]
    if not sources:
        raise NativeBuildError(f"no sources in {', '.join(map(str, source_dirs))}: the native libraries build "
                               f"from a source checkout of dga-compile (pip install -e .)")
    return library.is_file() and library.stat().st_mtime > max(p.stat().st_mtime for p in sources)


@contextlib.contextmanager
def staged(library: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields a temp path to build ``library`` into; renames it into place when the block succeeds
    (atomically, beside the library: a process that has the old one loaded keeps its file)."""
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dga-build-", dir=library.parent) as tmp:
        target = pathlib.Path(tmp) / library.name
        yield target
        os.replace(target, library)
