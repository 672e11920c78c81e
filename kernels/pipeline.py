"""`triton_attention`: DGA with the Triton kernels (the implementation ``impl="triton"``).

Step 1 runs in `scoring.py`, step 2 (a sort, with the sinks) in torch, steps 3–4 in `aggregation.py`,
step 5 in `attention.py`. Step 5′ (τ > 0) runs the fused kernel once more first, with βe on the
groups, for each row's log-sum-exp over its base candidates; `streams.mark_expansion` turns it
into the expanded groups, and step 5 gathers their members. The result of steps 1–4 is a `dga_compile.selection.Selection`, which
`streams.prepare_streams` turns into the kernel's `Streams`. On CUDA the kernel is launched
through the triton op ``torch.ops.dga.fused_forward`` (`torch.library.triton_op` + `wrap_triton`),
so Inductor sees the kernel when a compiled graph calls `triton_attention`; CPU tensors (the
interpreter, in tests) call the launcher directly, because triton ops fail under torch.compile
on CPU. Differentiable: with autograd on, the aggregation runs in torch (differentiable) and
step 5 is `_FusedAttention`, whose backward is `attention_bwd.fused_backward`.

Which calls the kernels take is decided in `dga_compile.dispatch` (``_triton_applies``);
a call they cannot take raises ``NotImplementedError`` here.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from dga_compile._validation import dga_applies, validate_config
from dga_compile.config import DGAConfig
from dga_compile.reference import dense_attention
from dga_compile.selection import Selection, aggregate_groups, num_focus, split_focus, working_dtype

from .aggregation import aggregate_groups_triton
from .attention import block_m_for, fused_forward
from .attention_bwd import fused_backward
from .scoring import importance_scores_triton
from .streams import MaskPlan, Streams, mark_expansion, plan_mask, prepare_streams

__all__ = ["triton_attention"]


def triton_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                     scale: Optional[float] = None, config: Optional[DGAConfig] = None,
                     dropout_p: float = 0.0) -> Tensor:
    """DGA with the Triton kernels. Same contract as `reference_attention`: q [B, Hq, Nq, D],
    k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] -> [B, Hq, Nq, Dv] in q's dtype. Differentiable
    (Triton backward; the focus and expansion choices have no gradient, as in the reference).

    Takes the calls `dga_compile.dispatch` lets through (``kernels.unsupported`` is empty);
    raises ``NotImplementedError`` for a mask other than causal × key padding. Outside DGA's
    domain (`dga_applies`) it is exact dense attention.
    """
    cfg = validate_config(config)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, _, Nq, D = q.shape
    Nk = k.shape[2]
    if not dga_applies(Nq, Nk, cfg.min_seq_len):
        return dense_attention(q, k, v, attn_mask, is_causal, scale, dropout_p)
    plan = plan_mask(attn_mask, is_causal, B, Nq, Nk)
    if plan.reason:
        raise NotImplementedError(f"NYI: {plan.reason} in the Triton kernels; call dynamic_group_attention "
                                  f"(impl='auto' falls back to the blocked path)")
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    block_m = block_m_for(D)
    m = cfg.group_size
    with torch.set_grad_enabled(grad):
        st = prepare_streams(_select_triton(q, k, v, plan, scale, cfg, differentiable=grad), plan, Nq, m,
                             cfg.window, block_m, q.dtype)
    expanding = cfg.expand_mass > 0 and st.gpos.shape[-1] > 0
    query_block = min(cfg.query_block, Nq) if expanding else 0
    args = (plan.causal, scale, cfg.group_bias * math.log(m), m, cfg.window, block_m, query_block)
    if expanding:
        st = _expand(q, st, plan, scale, cfg, block_m)
    if grad:
        return _FusedAttention.apply(q, *st, *args)
    with torch.no_grad():
        if q.device.type == "cuda" and _fused_forward_op is not None:
            return _fused_forward_op(q, *st, *args)
        return _launch(q, *st, *args)


_STEP5_ARGS = ("causal", "scale", "group_logit", "group_size", "window", "block_m", "query_block")


def _expand(q: Tensor, st: Streams, plan: MaskPlan, scale: float, cfg: DGAConfig, block_m: int) -> Streams:
    """Step 5′: the fused kernel's row log-sum-exp over the base candidates with βe·log m on the
    groups (one more pass over the same streams), then `streams.mark_expansion`. No gradient."""
    with torch.no_grad():
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        fused_forward(q, st, causal=plan.causal, scale=scale, group_logit=cfg.expand_bias * math.log(cfg.group_size),
                      group_size=cfg.group_size, window=cfg.window, block_m=block_m, lse=lse)
        return mark_expansion(q, st, lse, plan.causal, scale, cfg, block_m)


class _FusedAttention(torch.autograd.Function):
    """Step 5 with gradients to q and to the stream arrays (which autograd carries on to k, v, q).
    Arguments: q, the `Streams` fields in order (autograd tracks only direct tensor arguments),
    then `_STEP5_ARGS`."""

    @staticmethod
    def forward(ctx, q, *args):
        st = Streams(*args[:len(Streams._fields)])
        ctx.kw = dict(zip(_STEP5_ARGS, args[len(Streams._fields):]))
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        out = fused_forward(q, st, lse=lse, **ctx.kw)
        ctx.save_for_backward(q, *st, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, *streams, out, lse = ctx.saved_tensors
        dq, dstreams = fused_backward(q, Streams(*streams), out, lse, grad_out, **ctx.kw)
        return (dq, *dstreams) + (None,) * len(_STEP5_ARGS)


def _select_triton(q: Tensor, k: Tensor, v: Tensor, plan: MaskPlan, scale: float, cfg: DGAConfig,
                   differentiable: bool = False) -> Selection:
    """Steps 1–4 with the selection kernels; the same `Selection` `dga_compile.selection.select` builds
    (step 1 skipped when no key is chosen by score: the focus set is the sinks).
    ``differentiable``: aggregate with the torch reference (autograd) instead of the kernel."""
    m, nk = cfg.group_size, k.shape[2]
    with torch.no_grad():
        if num_focus(cfg.focus_ratio, nk) == 0:
            scores = torch.zeros(k.shape[:3], dtype=torch.float32, device=k.device)
        else:
            scores = importance_scores_triton(q, k, plan.key_visible, plan.causal, scale, cfg.num_probe)
        focus, nonfocus = split_focus(scores, num_focus(cfg.focus_ratio, nk, cfg.sinks), cfg.sinks)
    if differentiable:
        wd = working_dtype(q.dtype)
        kbar, vbar = aggregate_groups(q.to(wd), k.to(wd), v.to(wd), nonfocus, scale, m)[:2]
    else:
        kbar, vbar = aggregate_groups_triton(q, k, v, nonfocus, scale, m)
    anchors = nonfocus[..., m - 1:kbar.shape[2] * m:m]
    return Selection.gather(k, v, focus, nonfocus, anchors, kbar, vbar)


def _launch(q: Tensor, fpos: Tensor, kf: Tensor, vf: Tensor, gpos: Tensor, kg: Tensor, vg: Tensor, npos: Tensor,
            kn: Tensor, vn: Tensor, bounds: Tensor, xmark: Tensor, xgroups: Tensor, causal: bool, scale: float,
            group_logit: float, group_size: int, window: int, block_m: int, query_block: int) -> Tensor:
    """The fused kernel on flat arguments: q, the `Streams` fields in order, then `_STEP5_ARGS`
    (the triton op infers its schema from this signature; tests check it against `Streams`)."""
    return fused_forward(q, Streams(fpos, kf, vf, gpos, kg, vg, npos, kn, vn, bounds, xmark, xgroups), causal=causal,
                         scale=scale, group_logit=group_logit, group_size=group_size, window=window, block_m=block_m,
                         query_block=query_block)


def _register_triton_op():
    """``torch.ops.dga.fused_forward`` as a triton op (torch ≥ 2.6), or None where torch lacks it."""
    if not hasattr(torch.library, "triton_op"):
        return None
    return torch.library.triton_op("dga::fused_forward", _launch, mutates_args=())


_fused_forward_op = _register_triton_op()
