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


def native_library() -> Optional[pathlib.Path]:
    """The built ``ai.dga`` custom-op library, or None (module `dga_compile.onnx.native` absent or no build)."""
    try:
        native = importlib.import_module(f"{__package__}.native")
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.native":
            raise
        return None
    return native.library_path()


def session(path: Union[str, os.PathLike], providers: Optional[Sequence] = None,
            options: Optional[ort.SessionOptions] = None, native: bool = True) -> ort.InferenceSession:
    """An `onnxruntime.InferenceSession` for ``path``.

    With ``native`` and a built custom-op library (`native_library`), the library is registered
    and ``ai.dga::DynamicGroupAttention`` nodes run its kernel; otherwise ONNX Runtime inlines
    the op's ONNX function carried by the model. The choice is logged (INFO, logger
    ``dga_compile.onnx``) and stored on the session as ``session.dga_impl``: ``"native"`` or
    ``"function"``.
    """
    options = options or ort.SessionOptions()
    lib = native_library() if native else None
    if lib is not None:
        options.register_custom_ops_library(str(lib))
    impl = "function" if lib is None else "native"
    sess = ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
    sess.dga_impl = impl
    log.info("dga: %s runs DynamicGroupAttention with the %s", path,
             f"native custom op ({lib})" if lib else "ONNX function body (no native library)")
    return sess
