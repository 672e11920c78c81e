"""``torch.ops.dga.decode_attention``: decode attention over a DGA cache's slots, and its dispatch.

The one place that picks the implementation (`resolve_decode_impl`):

| impl | where | what |
|---|---|---|
| ``"native"`` | CPU, float32, no autograd graph, extension built | C++ split-K kernel (``csrc/core/dga_decode.cc``) |
| ``"triton"`` | CUDA, Triton importable | split-K kernel (``kernels/decode.py``) |
| ``"reference"`` | anywhere | `dga_compile.decode_reference.slot_attention` (the PyTorch fallback) |

``DGAConfig.impl`` maps onto it: ``"auto"`` takes the first that applies, ``"blocked"`` means
native-or-reference on the CPU, ``"triton"`` / ``"reference"`` force those.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _extension
from .decode_reference import slot_attention

__all__ = ["decode_attention", "resolve_decode_impl", "native_available"]

_NATIVE_DTYPES = (torch.float32,)


def native_available() -> bool:
    """Whether the C++ extension is loaded and has the decode kernel (a library built before it lacks it)."""
    return _extension.available() and hasattr(torch.ops.dga_native, "decode_attention_cpu")


def resolve_decode_impl(impl: str, q: Tensor, tensors: tuple[Tensor, ...]) -> str:
    """``DGAConfig.impl`` -> "native", "triton" or "reference" for these inputs (see the module table)."""
    if impl == "reference":
        return "reference"
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, *tensors))
    if q.device.type == "cuda" and impl in ("auto", "triton"):
        from .kernels import available
        if available() and not grad:
            return "triton"
    if impl == "triton":
        from .kernels import interpreting
        if interpreting() and not grad:            # CPU tensors through the Triton interpreter (tests)
            return "triton"
    if (q.device.type == "cpu" and impl in ("auto", "blocked") and not grad
            and all(t.dtype in _NATIVE_DTYPES for t in (q, *tensors)) and native_available()):
        return "native"
    return "reference"


def decode_attention(q: Tensor, pk: Tensor, pv: Tensor, pl: Tensor, rk: Tensor, rv: Tensor, rl: Tensor,
                     scale: float, impl: str = "auto") -> Tensor:
    """q [B, Hq, n, D] over the packed slots (pk, pv, pl: [B, Hkv, P, ·]) and the recent raw tokens
    (rk, rv, rl: [B, Hkv, R, ·], the last n the step's own, causal) -> [B, Hq, n, Dv] in q's dtype.

    Semantics: `dga_compile.decode_reference.slot_attention`. Inputs may be strided views (the
    last dim contiguous); λ tensors are float32 (float64 for float64 caches). Under tracing
    (torch.compile, export) this is the custom op ``torch.ops.dga.decode_attention``; eagerly it
    calls the implementation directly (the custom op's dispatch costs about as much as the kernel
    at a few thousand slots)."""
    if torch.compiler.is_compiling():
        return torch.ops.dga.decode_attention(q, pk, pv, pl, rk, rv, rl, scale, impl)
    return _decode_attention(q, pk, pv, pl, rk, rv, rl, scale, impl)


def _decode_attention(q: Tensor, pk: Tensor, pv: Tensor, pl: Tensor, rk: Tensor, rv: Tensor, rl: Tensor,
                      scale: float, impl: str) -> Tensor:
    which = resolve_decode_impl(impl, q, (pk, pv, rk, rv))
    if which == "native":
        out = q.new_empty(q.shape[:3] + pv.shape[3:])
        torch.ops.dga_native.decode_attention_cpu(q, pk, pv, pl, rk, rv, rl, out, float(scale))
        return out
    if which == "triton":
        from .kernels.decode import triton_decode_attention
        return triton_decode_attention(q, pk, pv, pl, rk, rv, rl, scale)
    return slot_attention(q, pk, pv, pl, rk, rv, rl, scale).contiguous()


_op = torch.library.custom_op("dga::decode_attention", _decode_attention, mutates_args=())


@_op.register_fake
def _(q, pk, pv, pl, rk, rv, rl, scale, impl):
    return q.new_empty(q.shape[:3] + pv.shape[3:])
