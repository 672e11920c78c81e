"""Triton kernels for DGA on CUDA (installed as ``dga_compile.kernels``): the implementation
``impl="triton"``.

One file per kernel, each paired with the torch reference it must match:
``scoring.py`` (step 1; reference: `dga_compile.selection.importance_scores`),
``aggregation.py`` (steps 3–4; `dga_compile.selection.aggregate_groups`),
``attention.py`` / ``attention_bwd.py`` (fused step 5 and its backward; `dga_compile.reference`),
``streams.py`` (host-side stream bounds), ``pipeline.py`` (`triton_attention`, steps 1–5).
This module imports no Triton: `dga_compile.dispatch` reads what the kernels take from it.
"""

import os

import torch

__all__ = ["DTYPES", "MAX_HEAD_DIM", "available", "has_triton", "interpreting", "triton_attention"]

#: Input dtypes the kernels take (float64 runs elsewhere).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Largest head dim the fused kernel takes (one padded tile of q rows in registers).
MAX_HEAD_DIM = 256


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on CPU tensors in the interpreter (tests only).

    The interpreter's bf16 ``tl.dot`` is wrong and autotuning fails there, so kernels take
    fp32 dots and launchers a fixed config when this holds.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_triton() -> bool:
    """Whether Triton imports here."""
    from ._runtime import HAS_TRITON
    return HAS_TRITON


def available() -> bool:
    """Whether the Triton kernels can run DGA here: Triton imports and a CUDA device exists
    (or TRITON_INTERPRET=1, for tests that pass CPU tensors to `triton_attention`)."""
    return has_triton() and (torch.cuda.is_available() or interpreting())


def triton_attention(*args, **kwargs):
    """See `dga_compile.kernels.pipeline.triton_attention` (imported lazily: it defines kernels)."""
    if not has_triton():
        raise NotImplementedError("NYI: DGA without Triton in dga_compile.kernels; install triton, or call "
                                  "dynamic_group_attention (impl='auto' picks an implementation that runs here)")
    from .pipeline import triton_attention as fn
    return fn(*args, **kwargs)
