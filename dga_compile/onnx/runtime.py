"""`session`: an ONNX Runtime session for an exported DGA model, native op when available."""

from __future__ import annotations

import importlib
import logging
import os
import pathlib
from typing import Optional, Sequence, Union

import onnxruntime as ort

__all__ = ["session", "native_library"]

log = logging.getLogger("dga_compile.onnx")


def _native_module():
    """`dga_compile.onnx.native`, or None when this build does not ship it."""
    try:
        return importlib.import_module(f"{__package__}.native")
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.native":
            raise
        return None


def native_library() -> Optional[pathlib.Path]:
    """The built ``ai.dga`` custom-op library, or None (module `dga_compile.onnx.native` absent or no build)."""
    native = _native_module()
    return None if native is None else native.library_path()


def _register_native(options: ort.SessionOptions) -> Optional[pathlib.Path]:
    """Registers the library with ``options`` if it is built and usable; its path, or None."""
    if native_library() is None:
        return None
    try:
        return _native_module().register_library(options)  # checks the C API version first
    except (RuntimeError, OSError) as e:
        log.warning("dga: the native ai.dga library is not usable (%s); using the ONNX function body", e)
        return None


def session(path: Union[str, os.PathLike], providers: Optional[Sequence] = None,
            options: Optional[ort.SessionOptions] = None, native: bool = True) -> ort.InferenceSession:
    """An `onnxruntime.InferenceSession` for ``path``.

    With ``native`` and a built, API-compatible custom-op library (`native_library`), the
    library is registered and ``ai.dga::DynamicGroupAttention`` nodes run its kernel; otherwise
    ONNX Runtime inlines the op's ONNX function carried by the model. The choice is logged
    (INFO, logger ``dga_compile.onnx``; a built but unusable library: WARNING) and stored on the
    session as ``session.dga_impl``: ``"native"`` or ``"function"``.
    """
    options = options or ort.SessionOptions()
    lib = _register_native(options) if native else None
    sess = ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
    sess.dga_impl = "function" if lib is None else "native"
    log.info("dga: %s runs DynamicGroupAttention with the %s", path,
             f"native custom op ({lib})" if lib else "ONNX function body (no native library)")
    return sess
