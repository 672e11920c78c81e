"""The native ONNX Runtime custom-op library (``csrc/ort/``): headers, build, location, loading.

ONNX Runtime's C/C++ headers ship in no pip wheel. They come from ``ORT_INCLUDE_DIR`` (or
``include_dir=``), else from Debian trixie's ``libonnxruntime-dev`` fetched with a private apt
configuration in a temp dir (the system's apt sources are never touched) and unpacked into
``.cache/ort-headers/``. The library links nothing from ONNX Runtime: it takes the C API from
the ``OrtApiBase`` handed to ``RegisterCustomOps`` and checks the API version there.

``python -m dga_compile.onnx.native --build`` builds it (the set-up runs this).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pathlib
import shutil
import sys
from typing import Optional

from ..errors import CLIError, NativeBuildError

__all__ = ["library_path", "build_library", "header_dir", "check_api_version", "register_library", "add_parser"]

_HEADERS_DEB = "libonnxruntime-dev"


def _build_path() -> pathlib.Path:
    """Where `build_library` puts the library (the build tooling is imported here, not at import)."""
    from .._cxx import REPO

    return REPO / "build" / "ort" / "libdga_ort.so"


def library_path() -> Optional[pathlib.Path]:
    """The built library (``$DGA_ORT_LIBRARY`` if set), or None when it has not been built."""
    path = pathlib.Path(os.environ.get("DGA_ORT_LIBRARY") or _build_path())
    return path if path.is_file() else None


def header_dir(include_dir: Optional[str | os.PathLike] = None) -> pathlib.Path:
    """The directory holding ``onnxruntime_cxx_api.h``: ``include_dir``, ``$ORT_INCLUDE_DIR``,
    the cache, or freshly fetched headers (needs apt's network access once)."""
    from .._cxx import REPO
    from .._tools import debian_package

    given = include_dir or os.environ.get("ORT_INCLUDE_DIR")
    if given:
        path = pathlib.Path(given)
        if not (path / "onnxruntime_cxx_api.h").is_file():
            raise NativeBuildError(f"{path} has no onnxruntime_cxx_api.h; point ORT_INCLUDE_DIR (or "
                                   f"--include-dir) at the directory holding ONNX Runtime's C/C++ headers")
        return path
    cache = REPO / ".cache" / "ort-headers"
    cached = cache / "usr" / "include" / "onnxruntime"
    if not (cached / "onnxruntime_cxx_api.h").is_file():
        debian_package(_HEADERS_DEB, cache, NativeBuildError)
    return cached


def _nvcc() -> Optional[str]:
    """nvcc when the CUDA kernel should be built (``DGA_ORT_CUDA=0`` turns it off)."""
    return None if os.environ.get("DGA_ORT_CUDA") == "0" else shutil.which("nvcc")


def build_library(include_dir: Optional[str | os.PathLike] = None, force: bool = False) -> pathlib.Path:
    """Build ``build/ort/libdga_ort.so`` (CPU kernel; CUDA kernel too when nvcc is present).

    Skips the build when the library is newer than every source, unless ``force``. Fetches the
    headers first if needed. Raises `NativeBuildError` with the reason on failure.
    """
    from .._cxx import CSRC, CXXFLAGS, compiler, run, staged, up_to_date

    library, flags = _build_path(), ["-std=c++17", *CXXFLAGS]
    if not force and up_to_date(library, (CSRC / "ort", CSRC / "core")):
        return library
    cxx = compiler()
    include = header_dir(include_dir)
    with staged(library) as target:
        cxx_sources = [str(CSRC / "ort" / "dga_op.cc"), str(CSRC / "core" / "dga_cpu.cc")]
        nvcc = _nvcc()
        if nvcc is None:
            run([cxx, *flags, "-shared", f"-I{include}", *cxx_sources, "-o", str(target)],
                f"{cxx} (custom-op library)")
        else:  # nvcc links, so that it finds its static CUDA runtime; nothing needs libcudart.so at load
            objects = [str(target.with_name(name)) for name in ("dga_op.o", "dga_cpu.o", "dga_cuda.o")]
            for src, obj in zip(cxx_sources, objects):
                run([cxx, *flags, "-DDGA_WITH_CUDA", f"-I{include}", "-c", src, "-o", obj], f"{cxx} {src}")
            run([nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden", f"-I{CSRC / 'core'}", "-c",
                 str(CSRC / "ort" / "dga_cuda.cu"), "-o", objects[2]], "nvcc (CUDA kernel)")
            run([nvcc, "-shared", "-cudart", "static", *objects, "-o", str(target)], "nvcc (link)")
    return library


def check_api_version(library: str | os.PathLike, runtime_version: Optional[str] = None) -> int:
    """The C API version ``library`` was built for; raises `RuntimeError` naming both versions
    when ONNX Runtime ``runtime_version`` (default: the installed one) is older.

    (The library repeats this check in ``RegisterCustomOps``; failing here first gives the fix.)
    """
    built = ctypes.CDLL(str(library)).DgaOrtApiVersion()
    if runtime_version is None:
        import onnxruntime
        runtime_version = onnxruntime.__version__
    parts = runtime_version.split(".")
    runtime_api = int(parts[1]) if len(parts) > 1 and parts[0] == "1" and parts[1].isdigit() else None
    if runtime_api is not None and runtime_api < built:
        raise RuntimeError(f"{library} was built against the ONNX Runtime C API version {built} (ONNX Runtime "
                           f"1.{built} headers) but ONNX Runtime {runtime_version} provides only up to {runtime_api}; "
                           f"upgrade onnxruntime or rebuild with matching headers "
                           f"(ORT_INCLUDE_DIR=... dga-compile build-ort-op)")
    return built


def register_library(session_options) -> pathlib.Path:
    """Register the built library with an ``onnxruntime.SessionOptions``; returns its path.

    Raises `FileNotFoundError` when it has not been built, `RuntimeError` on an API mismatch.
    """
    path = library_path()
    if path is None:
        raise FileNotFoundError(f"the ai.dga custom-op library is not built ({_build_path()} is missing); "
                                f"run `dga-compile build-ort-op` or `python -m dga_compile.onnx.native --build`")
    check_api_version(path)
    session_options.register_custom_ops_library(str(path))
    return path


def _add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--include-dir", help="ONNX Runtime headers (default: $ORT_INCLUDE_DIR or fetched)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``dga-compile build-ort-op`` (registered in `dga_compile.cli.SUBCOMMANDS`)."""
    about = "Build the ONNX Runtime custom-op library (ai.dga::DynamicGroupAttention)."
    p = subparsers.add_parser("build-ort-op", help=about, description=about)
    _add_build_arguments(p)
    p.set_defaults(handler=_run_build)
    return p


def _run_build(args: argparse.Namespace) -> int:
    try:
        path = build_library(args.include_dir, args.force)
    except NativeBuildError as err:
        raise CLIError(f"ONNX Runtime custom-op library not built: {err}") from err
    print(f"built {path}" + (" (CPU + CUDA kernels)" if _nvcc() else " (CPU kernel)"))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dga_compile.onnx.native", description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="build the library (fetching headers if needed)")
    _add_build_arguments(parser)
    parser.add_argument("--soft", action="store_true", help="on failure print the reason and exit 0")
    args = parser.parse_args(argv)
    if not args.build:
        print(library_path() or "not built")
        return 0
    try:
        path = build_library(args.include_dir, args.force)
    except NativeBuildError as err:
        print(f"dga-compile: ONNX Runtime custom-op library not built: {err}", file=sys.stderr)
        return 0 if args.soft else 1
    print(f"built {path}" + (" (CPU + CUDA kernels)" if _nvcc() else " (CPU kernel)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
