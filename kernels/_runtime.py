"""What the Triton kernels may rely on here: whether Triton imports, whether it interprets."""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton is absent on macOS/Windows wheels
    triton = tl = None

__all__ = ["HAS_TRITON", "interpreting", "triton", "tl"]

HAS_TRITON = triton is not None


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on CPU tensors in the interpreter (tests only).

    The interpreter's bf16 ``tl.dot`` is wrong and autotuning fails there, so kernels take
    fp32 dots and launchers a fixed config when this holds.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
