"""What the Triton kernels may rely on here: whether Triton imports, whether it interprets."""

from __future__ import annotations

import os
import warnings

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton is absent on macOS/Windows wheels
    triton = tl = None

__all__ = ["HAS_TRITON", "LOG2E", "head_block", "interpreting", "warn_fallback", "triton", "tl"]

HAS_TRITON = triton is not None


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on CPU tensors in the interpreter (tests only).

    The interpreter's bf16 ``tl.dot`` is wrong and autotuning fails there, so kernels take
    fp32 dots and launchers a fixed config when this holds.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: 1 / ln 2: kernels compute softmax in base 2 (exp2), with logits scaled by this.
LOG2E = 1.4426950408889634


def head_block(dim: int) -> int:
    """Tile width for a head dim: the next power of two, at least 16 (tl.dot's minimum); the
    padding columns are masked on load."""
    return max(16, 1 << (dim - 1).bit_length())


_warned: set[str] = set()


def warn_fallback(reason: str) -> None:
    """The one-time warning for a call the kernels cannot take (then the blocked path runs)."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"dga_compile.kernels: NYI: {reason}; computing DGA with the blocked PyTorch path "
                      f"instead (same result, slower). This warning is shown once per reason.", stacklevel=4)
