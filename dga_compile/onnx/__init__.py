"""ONNX export of DGA models and ONNX Runtime deployment (custom domain ``ai.dga``, version 1).

`export` writes one ``ai.dga::DynamicGroupAttention`` node per DGA site plus the op's ONNX
function (standard ops, ai.onnx opset `OPSET`), so any ONNX Runtime runs the file; `session`
opens it with the native custom-op library when one is built.
"""

from ._schema import DOMAIN, DOMAIN_VERSION, OP_TYPE
from .export import OPSET, export
from .runtime import native_library, session

__all__ = ["DOMAIN", "DOMAIN_VERSION", "OP_TYPE", "OPSET", "export", "native_library", "session"]
