"""Triton kernels for DGA on CUDA (installed as ``dga_compile.kernels``).

One file per kernel, each paired with the torch reference it must match:
``attention.py`` (fused step 5; reference: `dga_compile.blocked` / `dga_compile.reference`),
``streams.py`` (host-side stream bounds), ``dispatch.py`` (`triton_attention`, fallbacks).
"""

from ._runtime import HAS_TRITON, interpreting, warn_fallback

__all__ = ["available", "triton_attention"]


def available() -> bool:
    """Whether the Triton kernels can run DGA here: Triton imports and a CUDA device exists
    (or TRITON_INTERPRET=1, for tests that pass CPU tensors to `triton_attention`)."""
    if not HAS_TRITON:
        return False
    import torch
    return torch.cuda.is_available() or interpreting()


def triton_attention(*args, **kwargs):
    """See `dga_compile.kernels.dispatch.triton_attention` (imported lazily: it defines kernels).
    Without Triton: the blocked path, with the one-time warning."""
    if not HAS_TRITON:
        from dga_compile.blocked import blocked_attention
        warn_fallback("Triton is not installed")
        return blocked_attention(*args, **kwargs)
    from .dispatch import triton_attention as fn
    return fn(*args, **kwargs)
