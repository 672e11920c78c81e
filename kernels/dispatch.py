"""`triton_attention`: DGA with the Triton kernels, or the blocked path with a one-time warning.

Step 1 runs in `scoring.py`, step 2 (a sort) in torch, steps 3–4 in `aggregation.py`,
step 5 in `attention.py`. On CUDA the kernel is launched through the triton op
``torch.ops.dga.fused_forward`` (`torch.library.triton_op` + `wrap_triton`), so Inductor sees
the kernel when a compiled graph calls `triton_attention`; CPU tensors (the interpreter, in
tests) call the launcher directly, because triton ops fail under torch.compile on CPU.
Differentiable: with autograd on, the aggregation runs in torch (differentiable) and step 5
is `_FusedAttention`, whose backward is `attention_bwd.fused_backward`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from dga_compile._validation import dga_applies
from dga_compile.blocked import _gather_rows, _Selection, blocked_attention, dense_attention
from dga_compile.config import DGAConfig
from dga_compile.reference import aggregate_groups, num_focus, split_focus, working_dtype

from ._runtime import interpreting, warn_fallback
from .aggregation import aggregate_groups_triton
from .attention import block_m_for, fused_forward
from .attention_bwd import fused_backward
from .scoring import importance_scores_triton
from .streams import MaskPlan, Streams, plan_mask, prepare_streams

__all__ = ["triton_attention", "MAX_HEAD_DIM"]

#: Largest head dim the fused kernel takes (one padded tile of q rows in registers).
MAX_HEAD_DIM = 256

def _unsupported(q: Tensor, v: Tensor, plan: MaskPlan, dropout_p: float) -> str:
    """Why the fused kernel cannot compute this call ("" when it can)."""
    if plan.reason:
        return plan.reason
    if dropout_p > 0:
        return f"dropout_p={dropout_p} (the kernel has no dropout)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype}"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims D={q.shape[-1]}, Dv={v.shape[-1]} above {MAX_HEAD_DIM}"
    if q.device.type != "cuda" and not interpreting():
        return f"device {q.device} (needs CUDA, or TRITON_INTERPRET=1)"
    return ""


def triton_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                     scale: Optional[float] = None, config: Optional[DGAConfig] = None,
                     dropout_p: float = 0.0) -> Tensor:
    """DGA with the Triton kernels. Same contract as `reference_attention`: q [B, Hq, Nq, D],
    k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] -> [B, Hq, Nq, Dv] in q's dtype. Differentiable
    (Triton backward; the focus choice itself has no gradient, as in the reference).

    Falls back to `blocked_attention` (one-time warning) on: per-head or general masks (other
    than causal × key padding), dropout, float64, head dims > 256, non-CUDA tensors outside
    the interpreter. Outside DGA's domain (`dga_applies`) it is exact dense attention.
    """
    cfg = config or DGAConfig()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, _, Nq, D = q.shape
    Nk = k.shape[2]
    if not dga_applies(Nq, Nk, cfg.min_seq_len):
        return dense_attention(q, k, v, attn_mask, is_causal, scale, dropout_p)
    plan = plan_mask(attn_mask, is_causal, B, Nq, Nk)
    reason = _unsupported(q, v, plan, dropout_p)
    if reason:
        warn_fallback(reason)
        return blocked_attention(q, k, v, attn_mask, is_causal, scale, cfg, dropout_p)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    block_m = block_m_for(D)
    args = (plan.causal, scale, cfg.group_bias * math.log(cfg.group_size), cfg.group_size, cfg.window, block_m)
    if grad:
        st = prepare_streams(_select_triton(q, k, v, plan, scale, cfg, differentiable=True), plan, Nq,
                             cfg.group_size, cfg.window, block_m, q.dtype)
        return _FusedAttention.apply(q, st.kf, st.vf, st.kg, st.vg, st.kn, st.vn, st.fpos, st.gpos, st.npos,
                                     st.bounds, *args)
    with torch.no_grad():
        st = prepare_streams(_select_triton(q, k, v, plan, scale, cfg), plan, Nq, cfg.group_size, cfg.window,
                             block_m, q.dtype)
        if q.device.type == "cuda" and _fused_forward_op is not None:
            return _fused_forward_op(q, *st, *args)
        return _launch(q, *st, *args)


class _FusedAttention(torch.autograd.Function):
    """Step 5 with gradients to q and to the stream arrays (which autograd carries on to k, v, q).
    Tensors are passed flat (autograd tracks only direct tensor arguments)."""

    @staticmethod
    def forward(ctx, q, kf, vf, kg, vg, kn, vn, fpos, gpos, npos, bounds, causal, scale, group_logit, group_size,
                window, block_m):
        st = Streams(fpos, kf, vf, gpos, kg, vg, npos, kn, vn, bounds)
        ctx.kw = dict(causal=causal, scale=scale, group_logit=group_logit, group_size=group_size, window=window,
                      block_m=block_m)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        out = fused_forward(q, st, lse=lse, **ctx.kw)
        ctx.save_for_backward(q, *st, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, *streams, out, lse = ctx.saved_tensors
        dq, *dstreams = fused_backward(q, Streams(*streams), out, lse, grad_out, **ctx.kw)
        return (dq, *dstreams) + (None,) * 10


def _select_triton(q: Tensor, k: Tensor, v: Tensor, plan: MaskPlan, scale: float, cfg: DGAConfig,
                   differentiable: bool = False) -> _Selection:
    """Steps 1–4 with the selection kernels; the same `_Selection` the blocked path builds.
    ``differentiable``: aggregate with the torch reference (autograd) instead of the kernel."""
    m = cfg.group_size
    with torch.no_grad():
        scores = importance_scores_triton(q, k, plan.key_visible, plan.causal, scale, cfg.num_probe)
        focus, nonfocus = split_focus(scores, num_focus(cfg.focus_ratio, k.shape[2]))
    if differentiable:
        wd = working_dtype(q.dtype)
        kbar, vbar = aggregate_groups(q.to(wd), k.to(wd), v.to(wd), nonfocus, scale, m)[:2]
    else:
        kbar, vbar = aggregate_groups_triton(q, k, v, nonfocus, scale, m)
    anchors = nonfocus[..., m - 1:kbar.shape[2] * m:m]
    return _Selection(focus, nonfocus, anchors, _gather_rows(k, focus), _gather_rows(v, focus),
                      _gather_rows(k, nonfocus), _gather_rows(v, nonfocus), kbar, vbar)


def _launch(q: Tensor, fpos: Tensor, kf: Tensor, vf: Tensor, gpos: Tensor, kg: Tensor, vg: Tensor, npos: Tensor,
            kn: Tensor, vn: Tensor, bounds: Tensor, causal: bool, scale: float, group_logit: float,
            group_size: int, window: int, block_m: int) -> Tensor:
    """The fused kernel on flat arguments (the triton op's signature)."""
    return fused_forward(q, Streams(fpos, kf, vf, gpos, kg, vg, npos, kn, vn, bounds), causal=causal, scale=scale,
                         group_logit=group_logit, group_size=group_size, window=window, block_m=block_m)


def _register_triton_op():
    """``torch.ops.dga.fused_forward`` as a triton op (torch ≥ 2.6), or None where torch lacks it."""
    if not hasattr(torch.library, "triton_op"):
        return None
    return torch.library.triton_op("dga::fused_forward", _launch, mutates_args=())


_fused_forward_op = _register_triton_op()
