"""What the Triton kernels may rely on here: Triton itself (or None), and shared helpers."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton is absent on macOS/Windows wheels
    triton = tl = None

__all__ = ["HAS_TRITON", "LOG2E", "head_block", "triton", "tl"]

HAS_TRITON = triton is not None

#: 1 / ln 2: kernels compute softmax in base 2 (exp2), with logits scaled by this.
LOG2E = 1.4426950408889634


def head_block(dim: int) -> int:
    """Tile width for a head dim: the next power of two, at least 16 (tl.dot's minimum); the
    padding columns are masked on load."""
    return max(16, 1 << (dim - 1).bit_length())
